"""A published dataset's catalog, fetched into a local cache so the DuckDB views run over local files.

The manifest names every catalog part with its sha256; parts are cached whole under that hash
(``CACHE/objects/ab/abcdef…``), so a part shared by two publications, or by two versions of one, is fetched once,
and a republished part is never served stale. The parts of one manifest are then laid out as a dataset's
``catalog/`` directory of symlinks (``CACHE/catalogs/<manifest sha256>/``), which ``catalog.Catalog`` reads like
any local dataset. DuckDB's httpfs extension is not used: it downloads itself at run time, which offline compute
nodes cannot do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from catalog.publication import MANIFEST, Manifest, ObjectEntry
from catalog.storage import Storage, StorageError, bytes_match, cache_root, run, storage

__all__ = ["fetch_catalog", "cached_object"]

_FETCH_AT_ONCE = 8


def cached_object(cache: Path, sha256: str) -> Path:
    return cache / "objects" / sha256[:2] / sha256


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def _fetch_part(store: Storage, entry: ObjectEntry, cache: Path, gate: asyncio.Semaphore) -> None:
    target = cached_object(cache, entry.sha256)
    if target.exists() and target.stat().st_size == entry.size:
        return
    async with gate:
        data = await store.read_async(entry.key)
    if not bytes_match(data, entry.size, entry.sha256):
        raise StorageError(f"{store.object_url(entry.key)}: {len(data)} bytes that do not match the manifest's size "
                           "and sha256 (corrupt, or changed after publishing); republish the dataset")
    _write_atomically(target, data)


async def _fetch_parts(store: Storage, entries: list[ObjectEntry], cache: Path) -> None:
    gate = asyncio.Semaphore(_FETCH_AT_ONCE)
    await asyncio.gather(*(_fetch_part(store, e, cache, gate) for e in entries))


def _lay_out(mirror: Path, entries: list[ObjectEntry], cache: Path) -> None:
    """``mirror/catalog/...`` as symlinks to the cached parts, made in a temporary directory and renamed into place
    (a concurrent process making the same mirror loses the rename and uses the winner's)."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=mirror.parent, prefix=f".{mirror.name}.", suffix=".tmp"))
    try:
        for entry in entries:
            link = tmp / entry.key
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(cached_object(cache, entry.sha256).resolve())
        try:
            os.rename(tmp, mirror)
        except OSError:
            if not mirror.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_catalog(url: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """A local directory whose ``catalog/`` is the publication's catalog at ``url``, as of its manifest now."""
    cache_dir = Path(cache) if cache is not None else cache_root()
    store = storage(url)
    if store.size(MANIFEST) is None:
        store.check_bucket()
        raise StorageError(f"{store.object_url(MANIFEST)}: no published dataset there; check the URL, or publish "
                           "one with `shards publish DATASET URL`")
    raw = store.read(MANIFEST)
    manifest = Manifest.from_json(raw, store.object_url(MANIFEST))
    mirror = cache_dir / "catalogs" / hashlib.sha256(raw).hexdigest()
    entries = manifest.catalog_entries()
    if (mirror / "catalog").is_dir() and all((mirror / e.key).exists() for e in entries):
        return mirror
    run(_fetch_parts(store, entries, cache_dir))
    if mirror.exists() and not all((mirror / e.key).exists() for e in entries):
        shutil.rmtree(mirror, ignore_errors=True)  # its cached parts were removed by hand: lay it out again
    _lay_out(mirror, entries, cache_dir)
    return mirror
