"""`mpiexec -n 2 ingest build-shards` when a rank fails mid-run (killed, its share failing, Ctrl-C, interrupted
while it waits for the others): every rank ends non-zero within a bound, the catalog a reader trusts is the one
committed before, no process of the run is left behind, and a rerun does the work. (What only rank 0 decides
before the decode, and a killed rank with a rerun on another number of ranks, are in test_ingest_mpi.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import catalog
from catalog.query import VIEWS
from ingest.build import build_shards
from ingest.config import IngestConfig
from tests.test_ingest_mpi import ROOT, _pids_of_rank, assert_verified, config_file, ingest_argv, shard_hashes, view

# Measured from the kill (or signal) to mpiexec's exit, series of 10 runs each on the 2 shared cores
# (bench/RESULTS.md, 2026-12-04): a killed rank 0.02-0.13 s, a killed worker 0.3-1.0 s, Ctrl-C 0.2-0.8 s. The bound is
# a generous multiple of the slowest: a rank that waits for ever fails it, a busy machine does not.
EXIT_BOUND_S = 15.0
FIRST_NODE = "W056"  # the first, committed build holds this node; the run under test decodes the other two


pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def first_build(synth_raw, tmp_path_factory) -> Path:
    """A dataset whose committed catalog holds one node of synth_raw: the state a failed run must leave as it was."""
    root = tmp_path_factory.mktemp("first")
    part = root / "raw"
    part.mkdir()
    for name in (FIRST_NODE, "metadata", "nodes.csv"):
        (shutil.copytree if (synth_raw / name).is_dir() else shutil.copy)(synth_raw / name, part / name)
    dataset = root / "dataset"
    build_shards(part, dataset, IngestConfig(workers=1, shard_target_mb=8.0), nodes_csv=part / "nodes.csv",
                 progress=False, log=lambda m: None)
    return dataset


@pytest.fixture()
def dataset(first_build, tmp_path) -> Path:
    target = tmp_path / "dataset"
    shutil.copytree(first_build, target)
    return target


def committed(dataset: Path) -> dict[str, list[dict]]:
    """Everything a reader of the catalog sees."""
    with catalog.open(dataset) as cat:
        return {name: cat.query(f"SELECT * FROM {name} ORDER BY ALL").to_pylist() for name in VIEWS}


class Run:
    """One `mpiexec -n 2 ingest build-shards` of synth_raw into ``dataset``, stopped while rank 1 decodes."""

    def __init__(self, synth_raw: Path, dataset: Path, tmp_path: Path) -> None:
        self.dataset = dataset
        self.process = subprocess.Popen(ingest_argv(synth_raw, dataset, config_file(tmp_path), ranks=2),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                        start_new_session=True)
        self.pids: list[int] = []

    def wait_until_rank_1_decodes(self) -> tuple[int, list[int]]:
        """(rank 1's own pid, its decode workers' pids) once rank 1 has started its first piece of frames."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            if any((self.dataset / "shards").glob("*.tmp/r0001-p*.seg")):
                rank_1 = _pids_of_rank(self.process.pid, 1)
                self.pids = rank_1 + _pids_of_rank(self.process.pid, 0)
                main = [pid for pid in rank_1 if _parent(pid) not in rank_1]
                if len(main) == 1 and len(rank_1) > 1:
                    return main[0], [pid for pid in rank_1 if pid != main[0]]
            time.sleep(0.002)
        raise AssertionError("the build ended before rank 1 was decoding")

    def wait_until_rank_1_waits(self, rank_1: int) -> None:
        """Until rank 1 has written its share (its workers gone) and waits for the others: a rank waiting for a step
        sleeps between looks at it, and a rank decoding never sleeps (it waits on its workers' results)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            if _pids_of_rank(self.process.pid, 1) == [rank_1] and _sleeping(rank_1):
                return
            time.sleep(0.01)
        raise AssertionError("rank 1 never finished its share")

    def seconds_to_exit(self) -> tuple[float, str]:
        """Seconds from now until mpiexec has exited (at most a minute), and its stderr."""
        started = time.monotonic()
        try:
            _, stderr = self.process.communicate(timeout=60)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        return time.monotonic() - started, stderr

    def assert_nothing_left(self) -> None:
        """No rank and no decode worker of the run outlives it (a worker left over would hold the launcher)."""
        deadline = time.monotonic() + 10
        while (alive := [pid for pid in self.pids if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"processes of the failed run still running: {alive}"


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _sleeping(pid: int) -> bool:
    """Whether the process's main thread is in a sleep (time.sleep), as the kernel says."""
    try:
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


def _failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ingest build-shards:")]


def test_a_rank_killed_mid_decode_ends_the_run_and_a_rerun_does_the_work(synth_raw, built, dataset, tmp_path):
    # What the out-of-memory killer does: SIGKILL to the rank's own process; its decode workers must die with it.
    before = committed(dataset)
    run = Run(synth_raw, dataset, tmp_path)
    rank_1, _ = run.wait_until_rank_1_decodes()
    os.kill(rank_1, signal.SIGKILL)
    took, stderr = run.seconds_to_exit()
    assert run.process.returncode != 0, stderr[-3000:]
    assert took < EXIT_BOUND_S, f"mpiexec took {took:.1f} s to end after rank 1 was killed"
    run.assert_nothing_left()
    assert committed(dataset) == before, "a run with a dead rank must commit nothing"
    assert_verified(dataset)

    rerun = subprocess.run(ingest_argv(synth_raw, dataset, config_file(tmp_path), ranks=2), capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "removed uncommitted" in rerun.stdout
    assert view(dataset) == view(built)
    assert_verified(dataset)
    assert not list((dataset / "shards").glob("*.tmp"))


def test_a_failed_share_on_one_rank_stops_every_rank_with_one_line(synth_raw, dataset, tmp_path):
    # A decode worker of rank 1 killed (out of memory): rank 1's share fails with an error, not a death.
    before = committed(dataset)
    run = Run(synth_raw, dataset, tmp_path)
    _, workers = run.wait_until_rank_1_decodes()
    os.kill(workers[0], signal.SIGKILL)
    took, stderr = run.seconds_to_exit()
    assert run.process.returncode == 2, stderr[-3000:]
    assert took < EXIT_BOUND_S, f"mpiexec took {took:.1f} s to end after rank 1's worker was killed"
    lines = _failure_lines(stderr)
    assert len(lines) == 1 and re.fullmatch(
        r"ingest build-shards: rank 1: WorkerDied: a worker process died .*; nothing was committed", lines[0]
    ), stderr[-3000:]
    run.assert_nothing_left()
    assert committed(dataset) == before
    assert_verified(dataset)
    assert not list((dataset / "shards").glob("*.tmp")), "rank 0 removes the run's work directory"


def test_ctrl_c_mid_decode_ends_every_rank_with_nothing_committed(synth_raw, dataset, tmp_path):
    # mpiexec passes Ctrl-C on to every rank; wherever each one is, all of them must end.
    before = committed(dataset)
    run = Run(synth_raw, dataset, tmp_path)
    run.wait_until_rank_1_decodes()
    run.process.send_signal(signal.SIGINT)
    took, stderr = run.seconds_to_exit()
    assert run.process.returncode != 0, stderr[-3000:]
    assert took < EXIT_BOUND_S, f"mpiexec took {took:.1f} s to end after Ctrl-C"
    assert any("rank" in line and "interrupted" in line for line in _failure_lines(stderr)), stderr[-3000:]
    run.assert_nothing_left()
    assert committed(dataset) == before
    assert shard_hashes(dataset) == [(r["name"], r["sha256"]) for r in before["shards"]]
    assert_verified(dataset)


def test_a_rank_interrupted_while_it_waits_ends_every_rank(synth_raw, dataset, tmp_path):
    # Rank 0 held still (SIGSTOP) mid-decode, so that rank 1 finishes its share and waits for it in a collective
    # step; an interrupt there cannot be reported in that step, so rank 1 ends every rank (MPI Abort). Rank 0 goes
    # on shortly after: the launcher's SIGTERM cannot end a stopped process.
    before = committed(dataset)
    run = Run(synth_raw, dataset, tmp_path)
    rank_1, _ = run.wait_until_rank_1_decodes()
    rank_0 = next(pid for pid in _pids_of_rank(run.process.pid, 0) if _parent(pid) not in run.pids)
    os.kill(rank_0, signal.SIGSTOP)
    try:
        run.wait_until_rank_1_waits(rank_1)
        os.kill(rank_1, signal.SIGINT)
        time.sleep(0.2)
    finally:
        os.kill(rank_0, signal.SIGCONT)
    took, stderr = run.seconds_to_exit()
    took += 0.2
    assert run.process.returncode == 130, stderr[-3000:]
    assert took < EXIT_BOUND_S, f"mpiexec took {took:.1f} s to end after rank 1 was interrupted"
    assert _failure_lines(stderr) == [
        "ingest build-shards: rank 1 of 2 failed: interrupted (SIGINT); ending every rank"
    ], stderr[-3000:]
    run.assert_nothing_left()
    assert committed(dataset) == before
    assert_verified(dataset)
