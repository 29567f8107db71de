"""`mpiexec -n 2 ingest build-shards`: the catalog of one process, byte-identical reruns, a killed rank that
commits nothing and leaves work that a rerun with another number of ranks completes, and what only rank 0 decides
(the configuration, the lock) ending every rank alike, reported once. (Ranks failing mid-decode:
test_ingest_rank_failure.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import catalog
from catalog.store import dataset_lock
from ingest.build import BuildError, build_shards
from ingest.config import IngestConfig
from shards.cli import main as shards_main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = "workers = 1\nshard_target_mb = 8.0\n"  # the shard size of conftest's `built`

pytestmark = pytest.mark.mpi


def ingest_argv(raw: Path, dataset: Path, config: Path, ranks: int) -> list[str]:
    argv = [sys.executable, "-m", "ingest", "build-shards", str(raw), str(dataset), "--nodes", str(raw / "nodes.csv"),
            "--config", str(config), "--quiet"]
    return [str(BIN / "mpiexec"), "-n", str(ranks), *argv] if ranks > 1 else argv


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "ingest.toml"
    path.write_text(CONFIG)
    return path


def view(dataset: Path) -> dict:
    """What a build decided, without where the bytes went (each rank writes shards of its own) or run ids."""
    placement = "shard, sample_offset, sample_length, ir_offset, json_offset, rgb_offset, ingest_run"
    with catalog.open(dataset) as cat:
        return {
            "samples": cat.query(f"SELECT * EXCLUDE ({placement}) FROM samples ORDER BY key").to_pylist(),
            "files": cat.query("SELECT * EXCLUDE (ingest_run) FROM files ORDER BY path").to_pylist(),
        }


def shard_hashes(dataset: Path) -> list[tuple[str, str]]:
    with catalog.open(dataset) as cat:
        return [tuple(r.values()) for r in cat.query("SELECT name, sha256 FROM shards ORDER BY name").to_pylist()]


def assert_verified(dataset: Path) -> None:
    assert shards_main(["verify", str(dataset)]) == 0


def test_two_ranks_give_the_single_process_catalog(synth_raw, built, tmp_path):
    config = config_file(tmp_path)
    for name in ("a", "b"):
        result = subprocess.run(ingest_argv(synth_raw, tmp_path / name, config, ranks=2), capture_output=True,
                                text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("run-000001:") == 1, "only rank 0 reports"
        assert_verified(tmp_path / name)
    assert view(tmp_path / "a") == view(built)
    assert len(shard_hashes(tmp_path / "a")) >= 2, "each rank writes shards of its own"
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b"), "same R: byte-identical shards"
    assert not list((tmp_path / "a" / "shards").glob("*.tmp")), "the work directory is gone"


def test_shard_bytes_do_not_depend_on_the_number_of_workers(synth_raw, built, tmp_path):
    # `built` used 2 worker processes; one process alone (no pool) must write the very same shards.
    build_shards(synth_raw, tmp_path / "one", IngestConfig(workers=1, shard_target_mb=8.0),
                 nodes_csv=synth_raw / "nodes.csv", progress=False, log=lambda m: None)
    assert shard_hashes(tmp_path / "one") == shard_hashes(built)


def _pids_of_rank(launcher: int, rank: int) -> list[int]:
    """The processes under ``launcher`` that MPI started as ``rank``: the rank and its forked workers (Hydra
    starts each rank in a session of its own, so the process tree is the way to find them)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue

    def under_launcher(pid: int) -> bool:
        while pid > 1:
            pid = parent_of.get(pid, 1)
            if pid == launcher:
                return True
        return False

    pids = []
    for pid in filter(under_launcher, parent_of):
        try:
            if f"PMI_RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_a_killed_rank_commits_nothing_and_one_process_finishes_the_work(synth_raw, built, tmp_path):
    dataset = tmp_path / "dataset"
    config = config_file(tmp_path)
    process = subprocess.Popen(ingest_argv(synth_raw, dataset, config, ranks=2), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 120
    killed: list[int] = []
    while not killed and time.monotonic() < deadline and process.poll() is None:
        if any((dataset / "shards").glob("*.tmp/r0001-p*.seg")):  # rank 1 is writing its share
            killed = _pids_of_rank(process.pid, 1)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
    assert killed, "the build ended before rank 1 could be killed"
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert not (dataset / "catalog" / "runs").is_dir() or not [
        p for p in (dataset / "catalog" / "runs").iterdir() if not p.name.endswith(".tmp")
    ], "a run with a dead rank must commit nothing"

    rerun = subprocess.run(ingest_argv(synth_raw, dataset, config, ranks=1), capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "removed uncommitted" in rerun.stdout
    assert view(dataset) == view(built)
    assert shard_hashes(dataset) == shard_hashes(built), "one process after the failed run: the usual bytes"
    assert_verified(dataset)


def test_an_mpi_library_that_is_not_the_launchers_is_a_clear_error(monkeypatch, synth_raw, tmp_path):
    # What a lent machine did: MPICH's mpiexec started 2 ranks, mpi4py loaded the system's Open MPI, and each
    # process saw a world of 1. Faked here because a real mismatch makes MPICH wait for the missing rank.
    world = types.SimpleNamespace(Get_size=lambda: 1)
    fake_mpi = types.SimpleNamespace(COMM_WORLD=world, Get_library_version=lambda: "Open MPI v4.1.6, Debian\n")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=fake_mpi))
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(BuildError, match=r"started 2 ranks but MPI sees 1.*Open MPI v4\.1\.6.*MPI4PY_LIBMPI"):
        build_shards(synth_raw, tmp_path / "dataset", IngestConfig(workers=1), progress=False, log=lambda m: None)
    assert not (tmp_path / "dataset").exists()


def _failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ingest build-shards:")]


def test_a_locked_dataset_stops_every_rank_with_one_line(synth_raw, tmp_path):
    # Rank 0 alone takes the lock; what it finds must end every rank, with rank 0's exit code.
    dataset = tmp_path / "dataset"
    with dataset_lock(dataset, "another writer of this test"):
        result = subprocess.run(ingest_argv(synth_raw, dataset, config_file(tmp_path), ranks=2), capture_output=True,
                                text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 3, result.stderr[-3000:]
    lines = _failure_lines(result.stderr)
    assert len(lines) == 1 and "another writer of this test" in lines[0], result.stderr[-3000:]
    assert not (dataset / "catalog").exists()


def test_a_bad_config_is_reported_once(synth_raw, tmp_path):
    config = tmp_path / "ingest.toml"
    config.write_text('workers = "two"\n')
    result = subprocess.run(ingest_argv(synth_raw, tmp_path / "dataset", config, ranks=2), capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert _failure_lines(result.stderr) == [f"ingest build-shards: {config}.workers: expected an integer, got 'two'"]


def test_the_config_is_rank_0s_even_where_another_rank_cannot_read_it(synth_raw, built, tmp_path):
    # Each rank starts in a directory of its own and the config path is relative: only rank 0's holds the file.
    # Every rank reading it for itself left rank 1 failing alone while rank 0 waited for it for ever.
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank1").mkdir()
    config_file(tmp_path / "rank0")
    dataset = tmp_path / "dataset"
    argv = [sys.executable, "-m", "ingest", "build-shards", str(synth_raw), str(dataset), "--nodes",
            str(synth_raw / "nodes.csv"), "--config", "ingest.toml", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    mpmd = [str(BIN / "mpiexec"), "-n", "1", "-wdir", str(tmp_path / "rank0"), *argv,
            ":", "-n", "1", "-wdir", str(tmp_path / "rank1"), *argv]
    result = subprocess.run(mpmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert view(dataset) == view(built)
    assert len(shard_hashes(dataset)) >= 2, "both ranks wrote shards"
