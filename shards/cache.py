"""A local cache of whole shards fetched from a remote dataset, keyed by the shard's sha256, least recently used out.

Each shard is one file ``DIR/ab/abcdef…`` named by its sha256, so a republished shard (new hash) is never served
stale. Writers write a temp file in the same directory and ``os.replace`` it into place, so a crashed writer
leaves only a temp file that readers never open (and that a later put removes once it is an hour old). Several
processes (DataLoader workers, ranks on one node) may share a directory: the accounting and eviction after each
put run under an exclusive ``flock`` on ``DIR/.lock``; reads take no lock (a file evicted while another process
reads it stays readable through the open handle on POSIX, and one vanishing before the open is a miss).

``ShardCache`` holds only a path and numbers, so it pickles to DataLoader workers. ``check_limit`` refuses up
front a limit too small for the shards readers hold at once; ``parse_size`` reads "20GB", "1.5GiB", "0".
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

__all__ = ["ShardCache", "check_limit", "parse_size", "format_size", "STALE_TEMP_S"]

STALE_TEMP_S = 3600  # a temp file this old belongs to a writer that died (a 64 MB write takes well under a second)
_TEMP_PREFIX = ".tmp-"
_LOCK = ".lock"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class ShardCache:
    """Whole shards by sha256 under ``directory``, at most ``limit_bytes`` in all (0: store nothing).

    ``verify``: ``get`` re-hashes what it read and drops a file whose sha256 differs (about 40 ms per 64 MB
    shard, the same as reading it from the page cache), so a file damaged on disk is refetched, never served.
    """

    directory: Path
    limit_bytes: int
    verify: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        if isinstance(self.limit_bytes, bool) or not isinstance(self.limit_bytes, int) or self.limit_bytes < 0:
            raise ValueError(f"cache limit must be a whole number of bytes >= 0, not {self.limit_bytes!r}")

    def path(self, sha256: str) -> Path:
        """Where the shard with this sha256 is (or would be) stored."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 (64 lowercase hex digits): {sha256!r}")
        return self.directory / sha256[:2] / sha256

    def get(self, sha256: str) -> bytes | None:
        """The shard's bytes, marked recently used; None when it is not here (or what is here is damaged)."""
        target = self.path(sha256)
        try:
            with open(target, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read()
                try:
                    os.utime(f.fileno())  # recently used: eviction goes by mtime
                except OSError:
                    pass  # read-only or someone else's file: still a hit
        except (FileNotFoundError, NotADirectoryError):
            return None  # never stored, or evicted between another process's listing and our open
        if len(data) != size or (size == 0 and sha256 != _EMPTY_SHA256) or (
                self.verify and hashlib.sha256(data).hexdigest() != sha256):
            _remove(target)  # zero-length or damaged (e.g. a crash before the data reached disk): refetch it
            return None
        return data

    def put(self, sha256: str, data: bytes | bytearray | memoryview) -> None:
        """Store the shard (the caller has checked ``data`` against ``sha256``), evicting the least recently used
        so the total stays within the limit. An object larger than the limit is not stored."""
        target = self.path(sha256)
        size = memoryview(data).nbytes
        if self.limit_bytes == 0 or size > self.limit_bytes:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{sha256[:16]}-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            with self._locked():
                entries = [e for e in self._scan() if e[2] != target]  # a copy already there is replaced
                total = sum(s for _, s, _ in entries)
                for _, s, path in entries:  # oldest first
                    if total + size <= self.limit_bytes:
                        break
                    if _remove(path):
                        total -= s
                os.replace(temp, target)
        finally:
            _remove(Path(temp))  # gone already when os.replace moved it into place

    def total_bytes(self) -> int:
        """Bytes of stored shards now (temp files of writers in progress not counted)."""
        return sum(s for _, s, _ in self._scan(clean=False))

    def _locked(self):
        """An exclusive flock on DIR/.lock, held only while accounting and evicting."""
        return _FileLock(self.directory / _LOCK)

    def _scan(self, clean: bool = True) -> list[tuple[int, int, Path]]:
        """(mtime_ns, size, path) of every stored shard, least recently used first; with ``clean`` removes temp
        files older than STALE_TEMP_S (crashed writers)."""
        entries: list[tuple[int, int, Path]] = []
        stale = time.time() - STALE_TEMP_S
        try:
            subdirs = [e for e in os.scandir(self.directory) if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return entries
        for sub in subdirs:
            try:
                files = list(os.scandir(sub.path))
            except FileNotFoundError:
                continue
            for entry in files:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # evicted or replaced meanwhile
                if entry.name.startswith(_TEMP_PREFIX):
                    if clean and st.st_mtime < stale:
                        _remove(Path(entry.path))
                elif _SHA256.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    entries.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        entries.sort(key=lambda e: (e[0], e[2].name))
        return entries


class _FileLock:
    """``with _FileLock(path):`` holds an exclusive flock on path (created if missing); the fd lives only inside."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, *exc) -> None:
        os.close(self._fd)  # closing releases the flock


def _remove(path: Path) -> bool:
    """Remove path; False when it was already gone."""
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


def check_limit(limit_bytes: int, largest_shard_bytes: int, readers: int, shards_in_flight_per_reader: int) -> None:
    """Raise a one-line ValueError when ``limit_bytes`` cannot hold every shard the readers may hold at once
    (they would evict each other's shards before use and refetch them forever). A limit of 0 (no cache) passes."""
    if limit_bytes == 0:
        return
    need = largest_shard_bytes * readers * shards_in_flight_per_reader
    if limit_bytes < need:
        raise ValueError(
            f"cache limit {format_size(limit_bytes)} is below the {format_size(need)} that {readers} "
            f"reader{'s' if readers != 1 else ''} × {shards_in_flight_per_reader} "
            f"shard{'s' if shards_in_flight_per_reader != 1 else ''} × {format_size(largest_shard_bytes)} in "
            f"flight need; raise it to at least {format_size(need, round_up=True)}")


_UNITS = {"": 1, "b": 1,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes in "20GB", "512 MB", "1.5GiB", "0" (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024;
    case does not matter; a fraction of a byte is dropped)."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"not a size: {text!r} (expected a number and a unit such as 20GB, 512 MB, 1.5GiB or 0)")
    try:
        return int(Decimal(match.group(1)) * unit)
    except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
        raise ValueError(f"not a size: {text!r}") from None


def format_size(n: int, round_up: bool = False) -> str:
    """``n`` bytes in the largest power-of-1000 unit it reaches, "512 MB", "1.5 GB" (``round_up``: never below n)."""
    for name, unit in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= unit:
            break
    else:
        return f"{n} B"
    tenths = (math.ceil if round_up else round)(Decimal(n) * 10 / unit)
    return f"{tenths // 10} {name}" if tenths % 10 == 0 else f"{tenths / 10:.1f} {name}"
