"""How the catalog lives on disk, and how writers commit to it.

```
DATASET/
  .lock                                  held (flock) by the one writer at a time
  shards/<prefix>-NNNNNN.tar             trusted only when a committed catalog part lists them
  catalog/runs/run-NNNNNN/               one ingest run: samples, files, shards, runs (+ nodes) .parquet, config.toml
  catalog/snapshots/snap-NNNNNN/         compacted samples + files + nodes, covering the runs in manifest.json
```

- An ingest run writes its shards (in ``shards/run-N.tmp/``, then renamed into ``shards/``), then
  ``runs/run-N.tmp/``, fsyncs it and renames it to ``runs/run-N/``: that rename is the commit. Anything else a
  killed run left (``*.tmp``, shards no part lists) is removed by the next writer, under the lock.
- A snapshot is an optimisation and the way ``set-nodes`` recomputes location columns without touching a
  shard: readers take the newest snapshot plus every committed run it does not cover.
- ``files`` rows are the latest word on each path: a later run's row replaces an earlier one (an
  ``unpaired`` file whose partner has arrived becomes a ``sample``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.schema import TABLES

__all__ = [
    "DatasetLocked",
    "DatasetLayout",
    "dataset_lock",
    "write_parts",
    "Snapshot",
    "fsync_path",
]

_RUN_PREFIX = "run-"
_SNAP_PREFIX = "snap-"


class DatasetLocked(RuntimeError):
    """Another writer holds DATASET/.lock."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    covered_runs: tuple[str, ...]


class DatasetLayout:
    """Paths of one dataset, and what is committed in it."""

    def __init__(self, dataset: str | os.PathLike[str]) -> None:
        self.root = Path(dataset)
        self.shards_dir = self.root / "shards"
        self.catalog_dir = self.root / "catalog"
        self.runs_dir = self.catalog_dir / "runs"
        self.snapshots_dir = self.catalog_dir / "snapshots"
        self.lock_path = self.root / ".lock"

    def exists(self) -> bool:
        return self.catalog_dir.is_dir()

    def committed_runs(self) -> list[Path]:
        """Committed run directories, oldest first."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(
            p for p in self.runs_dir.iterdir() if p.is_dir() and p.name.startswith(_RUN_PREFIX) and "." not in p.name
        )

    def latest_snapshot(self) -> Snapshot | None:
        if not self.snapshots_dir.is_dir():
            return None
        snaps = sorted(
            p
            for p in self.snapshots_dir.iterdir()
            if p.is_dir() and p.name.startswith(_SNAP_PREFIX) and "." not in p.name
        )
        if not snaps:
            return None
        manifest = json.loads((snaps[-1] / "manifest.json").read_text())
        return Snapshot(snaps[-1], tuple(manifest["covered_runs"]))

    def uncovered_runs(self, snapshot: Snapshot | None) -> list[Path]:
        covered = set(snapshot.covered_runs) if snapshot else set()
        return [p for p in self.committed_runs() if p.name not in covered]

    def next_run_id(self) -> str:
        return _next_numbered(self.runs_dir, _RUN_PREFIX)

    def next_snapshot_path(self) -> Path:
        return self.snapshots_dir / _next_numbered(self.snapshots_dir, _SNAP_PREFIX)

    def remove_uncommitted(self, committed_shards: set[str]) -> list[str]:
        """Delete what killed writers left: ``*.tmp`` parts and shards, and shards no committed part lists.

        Call only while holding the lock. Returns what was removed, for the log.
        """
        removed = []
        for directory in (self.runs_dir, self.snapshots_dir):
            if directory.is_dir():
                for p in directory.iterdir():
                    if p.name.endswith(".tmp"):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                        removed.append(str(p.relative_to(self.root)))
        if self.shards_dir.is_dir():
            for p in self.shards_dir.iterdir():
                if p.is_dir() and p.name.endswith(".tmp"):  # a run's work directory (segments, unnamed shards)
                    shutil.rmtree(p)
                    removed.append(str(p.relative_to(self.root)))
                elif p.name.endswith(".tar.tmp") or (p.name.endswith(".tar") and p.name not in committed_shards):
                    p.unlink()
                    removed.append(str(p.relative_to(self.root)))
        return removed

    def prune_snapshots(self, keep: Path) -> None:
        """Remove snapshots older than ``keep`` (a reader that already opened one keeps its open files)."""
        for p in self.snapshots_dir.iterdir():
            if p.is_dir() and p.name.startswith(_SNAP_PREFIX) and p.name < keep.name:
                shutil.rmtree(p, ignore_errors=True)


_HELD_LOCK_FDS: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (an ingest worker), close the parent's lock fd: flock locks belong to the open file,
    so a child holding a copy would keep the dataset locked after its parent was killed."""
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _next_numbered(directory: Path, prefix: str) -> str:
    """``<prefix>NNNNNN`` one past the highest number in ``directory``, counting uncommitted ``*.tmp`` too."""
    numbers = [0]
    if directory.is_dir():
        for p in directory.iterdir():
            stem = p.name.split(".")[0]
            if stem.startswith(prefix) and stem[len(prefix) :].isdigit():
                numbers.append(int(stem[len(prefix) :]))
    return f"{prefix}{max(numbers) + 1:06d}"


@contextmanager
def dataset_lock(dataset: str | os.PathLike[str], purpose: str) -> Iterator[None]:
    """Exclusive writer lock on DATASET; fails at once (DatasetLocked) when another writer holds it."""
    layout = DatasetLayout(dataset)
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise DatasetLocked(
                f"{layout.root}: another writer is working on this dataset ({holder}); "
                "nothing was touched. Wait for it to finish, or stop it and run again."
            ) from None
        _HELD_LOCK_FDS.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{purpose}, pid {os.getpid()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        _HELD_LOCK_FDS.discard(fd)
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parts(final_dir: Path, tables: dict[str, pa.Table], texts: dict[str, str] | None = None) -> Path:
    """Write Parquet tables (and text files) into ``final_dir.tmp``, fsync, then rename: the commit point."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, table in tables.items():
        schema = TABLES.get(name)
        if schema is not None:
            table = table.select(schema.names).cast(schema)
        path = tmp / f"{name}.parquet"
        pq.write_table(table, path, compression="snappy")
        fsync_path(path)
    for name, text in (texts or {}).items():
        path = tmp / name
        path.write_text(text)
        fsync_path(path)
    fsync_path(tmp)
    os.rename(tmp, final_dir)
    fsync_path(final_dir.parent)
    return final_dir
