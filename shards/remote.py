"""Fetch the byte ranges a Selection wants from a published dataset, with many requests in flight.

For each shard a reader visits it fetches only the wanted ranges, in one gathered call that merges neighbours
closer than ``gap`` bytes, or the whole shard (in parallel parts, checked against the catalog's sha256) when
most of it is wanted. Every shard of a window of samples is fetched at once, and the reader asks for the next
window while it yields this one.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from catalog.storage import Storage, StorageError

__all__ = ["ShardReadError", "ShardRead", "fetch_reads", "GAP", "PART"]

GAP = 64 << 10  # ranges closer than this are fetched as one (a few percent more bytes, far fewer requests)
PART = 8 << 20  # a whole shard comes in parts of this size, in parallel


class ShardReadError(IOError):
    """A shard does not hold what the catalog says; the message names the shard and the sample."""


class ShardCache(Protocol):
    """Whole shards by sha256 (shards.cache.ShardCache)."""

    def get(self, sha256: str) -> bytes | None: ...

    def put(self, sha256: str, data: bytes) -> None: ...


@dataclass(frozen=True)
class ShardRead:
    """What one run of Selection rows wants from one shard: [starts[i], ends[i]) in the rows' order."""

    shard: str
    shard_bytes: int
    sha256: str | None  # None for a Selection made before selections carried it
    starts: np.ndarray
    ends: np.ndarray

    @property
    def wanted_bytes(self) -> int:
        return int((self.ends - self.starts).sum())


async def _whole(store: Storage, key: str, read: ShardRead, cache: ShardCache | None) -> bytes:
    starts = list(range(0, read.shard_bytes, PART))
    ends = [min(s + PART, read.shard_bytes) for s in starts]
    data = b"".join(await store.read_ranges_async(key, starts, ends, coalesce=0)) if starts else b""
    if len(data) != read.shard_bytes:
        raise ShardReadError(f"{store.object_url(key)}: {len(data)} bytes there, the catalog says "
                             f"{read.shard_bytes} (truncated or rewritten; republish it)")
    if read.sha256 and hashlib.sha256(data).hexdigest() != read.sha256:
        raise ShardReadError(f"{store.object_url(key)}: sha256 does not match the catalog (corrupt or rewritten "
                             "after publishing; republish it)")
    if cache is not None and read.sha256:
        cache.put(read.sha256, data)
    return data


async def _fetch(store: Storage, read: ShardRead, scan_fraction: float, gap: int,
                 cache: ShardCache | None) -> list[memoryview]:
    key = f"shards/{read.shard}"
    try:
        cached = cache.get(read.sha256) if cache is not None and read.sha256 else None
        if cached is not None or read.wanted_bytes >= scan_fraction * read.shard_bytes:
            whole = memoryview(cached if cached is not None else await _whole(store, key, read, cache))
            return [whole[s:e] for s, e in zip(read.starts.tolist(), read.ends.tolist())]
        return await store.read_ranges_async(key, read.starts.tolist(), read.ends.tolist(), coalesce=gap)
    except StorageError as exc:
        raise ShardReadError(str(exc)) from None


async def fetch_reads(store: Storage, reads: list[ShardRead], *, scan_fraction: float = 0.5, gap: int = GAP,
                      cache: ShardCache | None = None) -> list[list[memoryview]]:
    """Each read's spans, every shard's requests in flight together."""
    return list(await asyncio.gather(*(_fetch(store, r, scan_fraction, gap, cache) for r in reads)))
