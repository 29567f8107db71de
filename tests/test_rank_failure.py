"""A rank that dies mid-run (SIGKILL: what the out-of-memory killer sends) ends the other ranks within a bound,
with one line naming it: the watch itself, and `analysis embed` under mpiexec (training's is in test_training.py,
ingest's in test_ingest_rank_failure.py).

Hydra runs with -disable-auto-cleanup, so it does not end the survivors for us: they must notice by themselves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from catalog.ranks import Peer, PeerWatch, gone_peers, this_peer
from ingest.build import build_shards
from ingest.config import IngestConfig
from ingest.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Measured on 2 busy cores: the survivor ends 0.5-1.3 s after the kill (tests/repeat.py --only rank_failure).
EXIT_BOUND_S = 15.0


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory) -> Path:
    """Enough samples that each embed rank has seconds of chunks left when the test stops it."""
    root = tmp_path_factory.mktemp("wide")
    synthesize(root / "raw", SynthConfig(nodes=1, frames=240, seed=3, scale=0.2, faults=False, workers=2),
               progress=False)
    build_shards(root / "raw", root / "dataset", IngestConfig(workers=2), nodes_csv=root / "raw" / "nodes.csv",
                 progress=False, log=lambda m: None)
    return root / "dataset"


def _ranks(marker: str, count: int = 2, timeout: float = 60) -> list[int]:
    """The pids of the ranks whose command line holds ``marker``, in rank order (from the launcher's PMI_RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        ranks = {_pmi_rank(int(p)): int(p) for p in found if _is_rank(int(p))}
        if sorted(ranks) == list(range(count)):
            return [ranks[r] for r in range(count)]
        time.sleep(0.05)
    raise AssertionError(f"no {count} ranks running {marker}")


def _pmi_rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = [item.split(b"=", 1)[1] for item in environ if item.startswith(b"PMI_RANK=")]
    return int(values[0]) if values else None


def _is_rank(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        parent = Path(f"/proc/{ppid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return False
    return "python" in argv0 and not parent.startswith("python")  # not a DataLoader worker


def _assert_the_dead_rank_is_named(command: str, victim: int, stdout: str, stderr: str) -> None:
    """The survivor's line names rank 1, unless Hydra ended the survivor first (it does within milliseconds of
    telling it, and then drops what it was still forwarding): then Hydra's own line says a rank was killed."""
    ours = [line for line in stderr.splitlines() if line.startswith(f"{command}:")]
    if ours:
        assert re.fullmatch(rf"{command}: rank 1 \(pid {victim}\) of 2 died .*rank 0 ends every rank", ours[0]), ours
    else:
        assert "Killed (signal 9)" in stdout + stderr, stdout[-2000:] + stderr[-3000:]


def _done_chunks(store: Path) -> tuple[int, int]:
    try:
        done = zarr.open_group(str(store), mode="r")["done"][:]
    except Exception:  # noqa: BLE001 - not created yet
        return 0, 0
    return int(done.sum()), len(done)


def test_the_watch_names_a_dead_rank_of_this_host_and_ends_the_rest(capfd):
    """PeerWatch alone, with a real second process as rank 1: killed, it is named and every rank is ended."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        peers = (this_peer(), _peer_of(other.pid))
        ended: list[float] = []
        watch = PeerWatch("test", 0, peers, lambda code: ended.append(time.monotonic()), interval_s=0.05)
        with watch:
            time.sleep(0.3)
            assert not ended, "a live rank was taken for a dead one"
            other.kill()
            other.wait()
            killed_at = time.monotonic()
            deadline = killed_at + 5
            while not ended and time.monotonic() < deadline:
                time.sleep(0.01)
        assert ended and ended[0] - killed_at < 1.0
        assert f"test: rank 1 (pid {other.pid}) of 2 died" in capfd.readouterr().err
    finally:
        other.kill()
    assert gone_peers(peers, 0) == [1] and gone_peers(peers, 1) == []


def test_a_reused_pid_is_not_taken_for_the_rank():
    me = this_peer()
    assert gone_peers((me, Peer(me.host, me.pid, me.started + 1)), 0) == [1]
    assert gone_peers((me, Peer("another-host", 1, 0)), 0) == []  # another host's ranks are the launcher's


def _peer_of(pid: int) -> Peer:
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return Peer(this_peer().host, pid, ticks)


@pytest.mark.slow
@pytest.mark.mpi
def test_a_rank_killed_mid_embed_ends_the_other_with_one_line(trained_run_copy, wide_dataset, tmp_path):
    config = tmp_path / "analysis.toml"
    config.write_text("[embed]\nchunk_rows = 2\nbatch_size = 2\nworkers = 0\n")
    store = trained_run_copy / "embeddings" / "last.zarr"
    argv = [str(BIN / "mpiexec"), "-disable-auto-cleanup", "-n", "2", sys.executable, "-m", "analysis", "embed",
            str(trained_run_copy), "--dataset", str(wide_dataset), "--config", str(config), "--quiet"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        survivor, victim = _ranks(str(trained_run_copy))
        deadline = time.monotonic() + 120
        while _done_chunks(store)[0] == 0:  # both ranks are past their start-up: embedding
            assert time.monotonic() < deadline and process.poll() is None, "embed never wrote a chunk"
            time.sleep(0.02)
        for pid in (survivor, victim):
            os.kill(pid, signal.SIGSTOP)
        done, total = _done_chunks(store)
        assert done < total // 2, f"{done} of {total} chunks were done already: not mid-embed"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        os.kill(survivor, signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, stderr[-3000:]
    assert took < EXIT_BOUND_S, f"the survivor took {took:.1f} s"
    _assert_the_dead_rank_is_named("analysis embed", victim, stdout, stderr)
    assert _done_chunks(store)[0] < total
    assert not zarr.open_group(str(store), mode="r").attrs.get("complete"), "a store missing chunks was marked complete"
