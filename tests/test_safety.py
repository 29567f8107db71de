"""A killed build leaves nothing trusted and a rerun ends where an uninterrupted build would; the lock holds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import catalog
from catalog.store import DatasetLocked, dataset_lock
from ingest.build import build_shards
from ingest.cli import main as ingest_main
from ingest.config import IngestConfig

SMALL_SHARDS = IngestConfig(workers=2, shard_target_mb=2.0)
QUIET = {"progress": False, "log": lambda message: None}


def snapshot_of(dataset: Path) -> dict:
    """What a reader can see of a dataset, without run ids and times."""
    with catalog.open(dataset) as cat:
        return {
            "samples": cat.query("SELECT * EXCLUDE (ingest_run) FROM samples ORDER BY key").to_pylist(),
            "files": cat.query("SELECT * EXCLUDE (ingest_run) FROM files ORDER BY path").to_pylist(),
            "shards": cat.query("SELECT name, sha256, bytes, n_samples FROM shards ORDER BY name").to_pylist(),
        }


@pytest.fixture(scope="module")
def reference(synth_raw, tmp_path_factory) -> dict:
    dataset = tmp_path_factory.mktemp("reference") / "dataset"
    build_shards(synth_raw, dataset, SMALL_SHARDS, nodes_csv=synth_raw / "nodes.csv", **QUIET)
    return snapshot_of(dataset)


def _start_build(raw: Path, dataset: Path, config_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ingest", "build-shards", str(raw), str(dataset), "--nodes", str(raw / "nodes.csv"),
         "--config", str(config_path), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def _kill_when(process: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("condition never met")


KILL_POINTS = {
    "while decoding the first frames": lambda ds: any((ds / "shards").glob("*.tmp/*.seg")),
    "after two shards were assembled": lambda ds: len(list((ds / "shards").glob("*.tmp/*.tar"))) >= 2,
    "while writing the catalog part": lambda ds: any((ds / "catalog" / "runs").glob("*.tmp")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_equals_uninterrupted(point, synth_raw, reference, tmp_path):
    dataset = tmp_path / "dataset"
    config_path = tmp_path / "ingest.toml"
    config_path.write_text("workers = 2\nshard_target_mb = 2.0\n")
    process = _start_build(synth_raw, dataset, config_path)
    killed = _kill_when(process, lambda: KILL_POINTS[point](dataset))
    assert killed, f"the build finished before the kill point ({point})"
    if killed:
        # Nothing half-written is visible: either no catalog yet, or a catalog without this run.
        if (dataset / "catalog").exists():
            with catalog.open(dataset) as cat:
                assert cat.query("SELECT count(*) AS n FROM runs").to_pylist()[0]["n"] == 0
    summary = build_shards(synth_raw, dataset, SMALL_SHARDS, nodes_csv=synth_raw / "nodes.csv", **QUIET)
    if killed and point != "while decoding the first frames":
        assert summary.removed_uncommitted, "the rerun should have removed what the killed run left"
    assert snapshot_of(dataset) == reference
    assert not list(dataset.rglob("*.tmp"))


def test_a_killed_worker_fails_the_run_at_once_with_nothing_committed(synth_raw, reference, tmp_path):
    """A worker that dies (the OOM killer, say) must not leave the build waiting for ever for its piece."""
    dataset = tmp_path / "dataset"
    config_path = tmp_path / "ingest.toml"
    config_path.write_text("workers = 2\nshard_target_mb = 2.0\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "ingest", "build-shards", str(synth_raw), str(dataset), "--nodes",
         str(synth_raw / "nodes.csv"), "--config", str(config_path), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while not workers and time.monotonic() < deadline and process.poll() is None:
        if any((dataset / "shards").glob("*.tmp/*.seg")):
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
            workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        time.sleep(0.002)
    assert workers, "the build ended before a worker could be killed"
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2 and "worker process died" in stderr and "nothing was committed" in stderr, stderr
    assert not [p for p in (dataset / "catalog" / "runs").glob("run-*") if not p.name.endswith(".tmp")]
    assert not list((dataset / "shards").glob("*.tmp")), "a failed run removes its work directory"
    build_shards(synth_raw, dataset, SMALL_SHARDS, nodes_csv=synth_raw / "nodes.csv", **QUIET)
    assert snapshot_of(dataset) == reference


def test_compaction_changes_nothing_a_reader_sees(built_copy):
    from catalog.maintain import write_snapshot
    from catalog.store import DatasetLayout

    before = snapshot_of(built_copy)
    write_snapshot(DatasetLayout(built_copy))
    assert (built_copy / "catalog" / "snapshots").is_dir()
    assert snapshot_of(built_copy) == before
    shutil.rmtree(built_copy / "catalog" / "snapshots")  # as if killed before compacting
    assert snapshot_of(built_copy) == before


def test_second_writer_stops_at_once_without_touching_anything(built_copy, synth_raw, capsys):
    def listing():
        return sorted((p.relative_to(built_copy), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in built_copy.rglob("*") if p.name != ".lock")

    before = listing()
    with dataset_lock(built_copy, "test holder"):
        started = time.monotonic()
        code = ingest_main(["build-shards", str(synth_raw), str(built_copy), "--quiet"])
        assert time.monotonic() - started < 5
        with pytest.raises(DatasetLocked):
            with dataset_lock(built_copy, "another"):
                pass
    assert code == 3
    err = capsys.readouterr().err
    assert "another writer" in err and "test holder" in err
    assert listing() == before


def test_forked_workers_do_not_keep_the_lock(tmp_path):
    """A worker forked while the lock is held must not hold it once its parent is gone."""
    import multiprocessing

    dataset = tmp_path / "dataset"
    ready = multiprocessing.get_context("fork").Event()
    release = multiprocessing.get_context("fork").Event()

    def child() -> None:
        ready.set()
        release.wait(30)

    with dataset_lock(dataset, "parent"):
        worker = multiprocessing.get_context("fork").Process(target=child)
        worker.start()
        ready.wait(10)
    try:
        with dataset_lock(dataset, "next writer"):  # the parent let go; the live child must not block this
            pass
    finally:
        release.set()
        worker.join(10)
