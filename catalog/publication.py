"""A dataset published to object storage: its manifest, and ``shards publish`` that writes it.

A publication at URL holds the same keys as the dataset directory (``shards/<name>.tar``,
``catalog/runs/run-N/…``, ``catalog/snapshots/snap-N/…``) plus ``manifest.json``, which lists every object of the
publication with its size and sha256. The manifest is written last, in one PUT: a reader that fetches it sees the
previous publication or the new one, whole. Objects are never overwritten under a manifest that names them, so a
publish killed at any moment leaves the previous publication readable, and the next run completes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from catalog.storage import Storage, StorageError, bytes_match, file_sha256, run, storage
from catalog.store import DatasetLayout

__all__ = ["MANIFEST", "Manifest", "ObjectEntry", "PublishPlan", "plan_publish", "publish", "read_manifest",
           "PublishError"]

MANIFEST = "manifest.json"
FORMAT = "sagepairs-publication"
VERSION = 1
_CHUNK = 16 << 20
_OBJECTS_AT_ONCE = 4


class PublishError(RuntimeError):
    """A publish that cannot go ahead; one line naming the file or object and what to do."""


@dataclass(frozen=True)
class ObjectEntry:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a publication holds: every object by key, with its size and sha256."""

    objects: dict[str, ObjectEntry]
    published: str = ""

    def to_json(self) -> bytes:
        body = {"format": FORMAT, "version": VERSION, "published": self.published,
                "objects": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(self.objects.items())}}
        return (json.dumps(body, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, not {FORMAT!r}")
            if int(body.get("version", 0)) > VERSION:
                raise ValueError(f"version {body['version']} is newer than this sagepairs reads ({VERSION}); upgrade")
            objects = {k: ObjectEntry(k, int(v["size"]), str(v["sha256"])) for k, v in body["objects"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{where}: not a sagepairs manifest ({exc})") from None
        return cls(objects, str(body.get("published", "")))

    def catalog_entries(self) -> list[ObjectEntry]:
        return [e for k, e in sorted(self.objects.items()) if k.startswith("catalog/")]


def read_manifest(store: Storage) -> Manifest | None:
    """The publication's manifest, or None where nothing was published yet."""
    if store.size(MANIFEST) is None:
        return None
    return Manifest.from_json(store.read(MANIFEST), store.object_url(MANIFEST))


# -- what a dataset directory publishes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalObject:
    key: str
    path: Path
    size: int
    sha256: str  # the catalog's word for shards; hashed here for catalog parts


def local_objects(dataset: str | os.PathLike[str]) -> list[LocalObject]:
    """The committed catalog parts (newest snapshot, every committed run) and the shards they list."""
    layout = DatasetLayout(dataset)
    if not layout.exists():
        raise PublishError(f"{layout.root}: not a sagepairs dataset (no catalog/ directory)")
    snapshot = layout.latest_snapshot()
    part_dirs = ([snapshot.path] if snapshot else []) + layout.committed_runs()
    objects = []
    for directory in part_dirs:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            key = path.relative_to(layout.root).as_posix()
            objects.append(LocalObject(key, path, path.stat().st_size, file_sha256(path)))
    for run_dir in layout.committed_runs():
        shards_part = run_dir / "shards.parquet"
        if shards_part.exists():
            for row in pq.read_table(shards_part, columns=["name", "sha256", "bytes"]).to_pylist():
                path = layout.shards_dir / row["name"]
                objects.append(LocalObject(f"shards/{row['name']}", path, int(row["bytes"]), row["sha256"]))
    return objects


# -- the plan --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishPlan:
    """What a publish moves: ``upload`` (missing there), ``check`` (there, but no manifest vouches for it: it is
    read back and hashed) and ``keep`` (named by the current manifest, same size and sha256)."""

    url: str
    objects: tuple[LocalObject, ...]
    upload: tuple[LocalObject, ...]
    check: tuple[LocalObject, ...]
    keep: tuple[LocalObject, ...]
    previous: Manifest | None = field(default=None, compare=False)

    @property
    def bytes_to_upload(self) -> int:
        return sum(o.size for o in self.upload)


def plan_publish(dataset: str | os.PathLike[str], url: str, *, replace: bool = False) -> PublishPlan:
    """Compare the dataset's committed objects with what the publication at ``url`` already holds."""
    objects = local_objects(dataset)
    store = storage(url)
    previous = read_manifest(store)
    there = store.listing()
    upload, check, keep = [], [], []
    for obj in objects:
        vouched = previous.objects.get(obj.key) if previous else None
        if vouched is not None and vouched.sha256 != obj.sha256 and not replace:
            raise PublishError(
                f"{store.object_url(obj.key)}: the publication holds a different {obj.key} (another dataset was "
                "published here); publish to a new URL, or pass --replace (readers of the old publication may "
                "then fail until they reopen it)"
            )
        if obj.key not in there or there[obj.key] != obj.size:
            upload.append(obj)
        elif vouched is not None and vouched.sha256 == obj.sha256:
            keep.append(obj)
        else:
            check.append(obj)
    return PublishPlan(store.url, tuple(objects), tuple(upload), tuple(check), tuple(keep), previous)


# -- moving bytes ----------------------------------------------------------------------------------------------------
def _chunks_checked(obj: LocalObject, progress: Callable[[int], None]) -> Iterator[bytes]:
    """The file's bytes in chunks; raises before the last chunk when size or sha256 differ from the catalog's,
    so a corrupt local file aborts its upload and never appears there."""
    digest = hashlib.sha256()
    size = 0
    pending = None
    with open(obj.path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if pending is not None:
                yield pending
                progress(len(pending))
            pending = chunk
    if size != obj.size or digest.hexdigest() != obj.sha256:
        raise PublishError(f"{obj.path}: {size} bytes with sha256 {digest.hexdigest()[:12]}…, the catalog says "
                           f"{obj.size} bytes, {obj.sha256[:12]}…; run `shards verify` and do not publish it")
    if pending is not None:
        yield pending
        progress(len(pending))


async def _upload(store: Storage, obj: LocalObject, gate: asyncio.Semaphore, progress: Callable[[int], None]) -> None:
    async with gate:
        if obj.size <= _CHUNK:
            data = obj.path.read_bytes()
            if not bytes_match(data, obj.size, obj.sha256):
                raise PublishError(f"{obj.path}: does not match the catalog's size and sha256; run `shards verify`")
            await store.write_async(obj.key, data)
            progress(obj.size)
        else:
            await store.write_async(obj.key, _chunks_checked(obj, progress), chunk_size=_CHUNK)
    landed = store.size(obj.key)
    if landed != obj.size:
        raise PublishError(f"{store.object_url(obj.key)}: {landed} bytes after upload, expected {obj.size}")


async def _matches(store: Storage, obj: LocalObject, gate: asyncio.Semaphore) -> bool:
    async with gate:
        data = await store.read_async(obj.key)
    return bytes_match(data, obj.size, obj.sha256)


async def _move(store: Storage, plan: PublishPlan, progress: Callable[[int], None]) -> int:
    gate = asyncio.Semaphore(_OBJECTS_AT_ONCE)
    checked = await asyncio.gather(*(_matches(store, o, gate) for o in plan.check))
    stale = [o for o, ok in zip(plan.check, checked) if not ok]
    for o, ok in zip(plan.check, checked):
        if ok:
            progress(o.size)
    await asyncio.gather(*(_upload(store, o, gate, progress) for o in list(plan.upload) + stale))
    return len(stale)


def publish(plan: PublishPlan, progress: Callable[[int], None] = lambda n: None) -> Manifest:
    """Upload what the plan says, then the manifest: the one write that makes the new publication visible."""
    store = storage(plan.url)
    run(_move(store, plan, progress))
    objects = {o.key: ObjectEntry(o.key, o.size, o.sha256) for o in plan.objects}
    if plan.previous is not None and plan.previous.objects == objects:
        return plan.previous  # nothing changed: the publication stays as it is
    manifest = Manifest(objects, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    run(store.write_async(MANIFEST, manifest.to_json()))
    return manifest
