"""shards.cache.ShardCache: round trip, LRU eviction within the limit, crashed writers, several processes at once;
check_limit's refusal and parse_size."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import random
import time
from pathlib import Path

import pytest

from shards.cache import STALE_TEMP_S, ShardCache, check_limit, format_size, parse_size


def _blob(n: int, seed: int) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(n)
    return hashlib.sha256(data).hexdigest(), data


def _stored(directory: Path) -> dict[str, int]:
    """name -> size of every file under directory except the lock."""
    return {p.name: p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name != ".lock"}


def _set_time(cache: ShardCache, sha: str, t: float) -> None:
    os.utime(cache.path(sha), (t, t))


def test_round_trip_and_layout(tmp_path):
    cache = ShardCache(tmp_path / "c", 10_000)
    sha, data = _blob(1000, 0)
    cache.put(sha, data)
    assert cache.get(sha) == data
    assert cache.path(sha) == tmp_path / "c" / sha[:2] / sha
    assert _stored(tmp_path / "c") == {sha: 1000}
    assert cache.total_bytes() == 1000
    cache.put(sha, memoryview(data))  # again (another reader got there too): still one copy
    assert cache.get(sha) == data and cache.total_bytes() == 1000


def test_miss(tmp_path):
    cache = ShardCache(tmp_path / "never-made", 10_000)
    sha, _ = _blob(10, 1)
    assert cache.get(sha) is None
    assert cache.total_bytes() == 0
    with pytest.raises(ValueError, match="not a sha256"):
        cache.get("../../etc/passwd")


def test_empty_shard(tmp_path):
    cache = ShardCache(tmp_path, 100)
    sha = hashlib.sha256(b"").hexdigest()
    cache.put(sha, b"")
    assert cache.get(sha) == b""


def test_lru_eviction_order(tmp_path):
    cache = ShardCache(tmp_path, 3000)
    blobs = [_blob(1000, i) for i in range(3)]
    for i, (sha, data) in enumerate(blobs):
        cache.put(sha, data)
        _set_time(cache, sha, 1_000_000 + i)  # put order: 0 oldest
    assert cache.get(blobs[0][0]) == blobs[0][1]  # 0 is now the most recently used
    assert cache.path(blobs[0][0]).stat().st_mtime > 1_000_002
    sha3, data3 = _blob(1000, 3)
    cache.put(sha3, data3)  # evicts 1, the least recently used
    assert set(_stored(tmp_path)) == {blobs[0][0], blobs[2][0], sha3}
    _set_time(cache, blobs[2][0], 1)  # 2 now the oldest, then 0, then 3
    _set_time(cache, blobs[0][0], 2)
    _set_time(cache, sha3, 3)
    sha4, data4 = _blob(2000, 4)
    cache.put(sha4, data4)  # needs two out: 2 then 0
    assert set(_stored(tmp_path)) == {sha3, sha4}
    assert cache.get(blobs[1][0]) is None and cache.get(sha4) == data4


def test_limit_respected_after_many_puts(tmp_path):
    cache = ShardCache(tmp_path, 50_000)
    rng = random.Random(5)
    for i in range(200):
        sha, data = _blob(rng.randrange(1, 20_000), i)
        cache.put(sha, data)
        assert cache.total_bytes() <= 50_000
        assert cache.get(sha) == data  # the newest always fits
    assert sum(_stored(tmp_path).values()) <= 50_000


def test_object_over_limit_not_stored(tmp_path):
    cache = ShardCache(tmp_path, 1000)
    small, small_data = _blob(600, 1)
    cache.put(small, small_data)
    big, big_data = _blob(1001, 2)
    cache.put(big, big_data)
    assert cache.get(big) is None
    assert cache.get(small) == small_data  # nothing evicted for it
    off = ShardCache(tmp_path / "off", 0)
    off.put(small, small_data)
    assert off.get(small) is None and not (tmp_path / "off").exists()


def test_crashed_writer_temp_never_served_and_cleaned(tmp_path):
    cache = ShardCache(tmp_path, 10_000)
    sha, data = _blob(1000, 7)
    sub = tmp_path / sha[:2]
    sub.mkdir()
    stale = sub / f".tmp-{sha[:16]}-dead"
    stale.write_bytes(data[:300])  # a writer died part way
    fresh = sub / f".tmp-{sha[:16]}-live"
    fresh.write_bytes(data[:100])  # a writer in progress in another process
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    assert cache.get(sha) is None
    assert cache.total_bytes() == 0  # temp files are not shards
    other, other_data = _blob(500, 8)
    cache.put(other, other_data)
    assert not stale.exists()  # cleaned by the next put
    assert fresh.exists()  # left to its writer
    cache.put(sha, data)
    assert cache.get(sha) == data


@pytest.mark.parametrize("verify", [True, False])
def test_zero_length_or_damaged_file_never_served(tmp_path, verify):
    cache = ShardCache(tmp_path, 10_000, verify=verify)
    sha, data = _blob(1000, 9)
    cache.put(sha, data)
    cache.path(sha).write_bytes(b"")  # e.g. a crash after the rename but before the data reached the disk
    assert cache.get(sha) is None
    assert not cache.path(sha).exists()  # dropped, so the next fetch stores it again
    cache.put(sha, data)
    damaged = bytearray(data)
    damaged[500] ^= 1
    cache.path(sha).write_bytes(damaged)
    assert cache.get(sha) == (None if verify else bytes(damaged))


def test_pickle_round_trip(tmp_path):
    cache = ShardCache(str(tmp_path), 12345, verify=False)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone == cache and clone.directory == tmp_path and isinstance(clone.directory, Path)
    sha, data = _blob(100, 3)
    cache.put(sha, data)
    assert clone.get(sha) == data
    assert ShardCache(tmp_path, 1).__dict__.keys() == {"directory", "limit_bytes", "verify"}  # no open handles
    with pytest.raises(ValueError):
        ShardCache(tmp_path, -1)


_OBJECTS = 24  # shared among the processes, so they read and evict each other's
_OBJECT_BYTES = 100_000


def _worker(args: tuple[str, int]) -> tuple[int, int, int]:
    """30 rounds of get-or-put of random shared objects; (hits, misses, wrong bytes)."""
    directory, seed = args
    cache = ShardCache(directory, 1_000_000, verify=False)  # the test, not the cache, checks the bytes
    rng = random.Random(seed)
    hits = misses = wrong = 0
    for _ in range(30):
        k = rng.randrange(_OBJECTS)
        data = random.Random(k).randbytes(_OBJECT_BYTES)
        sha = hashlib.sha256(data).hexdigest()
        got = cache.get(sha)
        if got is None:
            misses += 1
            cache.put(sha, data)
        else:
            hits += 1
            wrong += hashlib.sha256(got).hexdigest() != sha
    return hits, misses, wrong


def test_several_processes(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(4) as pool:
        results = pool.map_async(_worker, [(str(tmp_path), seed) for seed in range(4)]).get(timeout=300)
    assert sum(r[2] for r in results) == 0
    assert sum(r[0] + r[1] for r in results) == 4 * 30
    stored = _stored(tmp_path)
    assert not [n for n in stored if n.startswith(".tmp-")]
    assert sum(stored.values()) <= 1_000_000
    cache = ShardCache(tmp_path, 1_000_000)
    for name in stored:
        assert hashlib.sha256(cache.get(name)).hexdigest() == name


def test_check_limit_message():
    with pytest.raises(ValueError) as exc:
        check_limit(100 * 10**6, 64 * 10**6, 4, 2)
    assert str(exc.value) == ("cache limit 100 MB is below the 512 MB that 4 readers × 2 shards × 64 MB in flight "
                              "need; raise it to at least 512 MB")
    with pytest.raises(ValueError) as exc:
        check_limit(parse_size("512MiB"), 67_108_864, 4, 3)  # 64 MiB shards: 805306368 bytes needed
    assert str(exc.value) == ("cache limit 536.9 MB is below the 805.3 MB that 4 readers × 3 shards × 67.1 MB in "
                              "flight need; raise it to at least 805.4 MB")
    with pytest.raises(ValueError, match=r"^cache limit 1 KB .* 1 reader × 1 shard × 2 KB .* at least 2 KB$"):
        check_limit(1000, 2000, 1, 1)
    check_limit(512 * 10**6, 64 * 10**6, 4, 2)  # exactly enough
    check_limit(0, 64 * 10**6, 4, 2)  # no cache


def test_format_size():
    assert format_size(999) == "999 B"
    assert format_size(64 * 10**6) == "64 MB"
    assert format_size(1_073_741_824) == "1.1 GB"
    assert format_size(1_010_000_000, round_up=True) == "1.1 GB"
    assert format_size(20 * 10**9) == "20 GB"


@pytest.mark.parametrize("text, n", [
    ("20GB", 20 * 10**9), ("512 MB", 512 * 10**6), ("1.5GiB", 1_610_612_736), ("0", 0), ("  7 b ", 7),
    ("64mib", 64 << 20), ("2 TB", 2 * 10**12), ("100KB", 100_000), ("1KiB", 1024), ("1.5", 1), (".5KB", 500),
    (4096, 4096),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "1 GG", "1e9", "twenty GB", "1,5GB", "nan", "1 G", None, -5])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError) as exc:
        parse_size(text)
    assert repr(text) in str(exc.value) and "\n" not in str(exc.value)
