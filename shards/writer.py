"""Write WebDataset shards atomically: ``*.tar.tmp`` -> fsync -> sha256 -> rename.

Shards are plain USTAR with fixed uid/gid/mode/owner names and each member's mtime set to the capture time,
so the same samples always give the same bytes. Member byte offsets are returned for the catalog, which is
what lets readers seek straight to a sample. A shard only becomes visible under its final name once it is
complete and on disk; a reader still trusts it only when the catalog lists it with a matching sha256.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shards.layout import BLOCK, KEY_RE, MEMBERS, member_span, shard_name

__all__ = ["MemberLocation", "SampleLocation", "ShardRecord", "ShardWriter", "fsync_dir"]

_OWNER = "sagepairs"


@dataclass(frozen=True)
class MemberLocation:
    offset: int  # first data byte in the shard
    size: int  # data bytes


@dataclass(frozen=True)
class SampleLocation:
    shard: str
    offset: int  # first header byte of the sample's first member
    length: int  # bytes from offset to the end of the last member's padded data
    members: dict[str, MemberLocation]


@dataclass(frozen=True)
class ShardRecord:
    name: str
    sha256: str
    bytes: int
    n_samples: int
    first_key: str
    last_key: str


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes, so a shard is never read back to hash it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.position = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.raw.write(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Append samples to numbered shards, starting a new shard before one would pass ``target_bytes``.

    ``on_commit`` is called with each ShardRecord right after its rename.
    """

    def __init__(
        self,
        directory: Path,
        prefix: str,
        first_index: int,
        target_bytes: int,
        on_commit: Callable[[ShardRecord], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.next_index = first_index
        self.target_bytes = target_bytes
        self.on_commit = on_commit
        self.committed: list[ShardRecord] = []
        self._file: BinaryIO | None = None
        self._hasher: _HashingWriter | None = None
        self._name = ""
        self._keys: list[str] = []

    def _open(self) -> None:
        self._name = shard_name(self.prefix, self.next_index)
        self.next_index += 1
        self._file = open(self.directory / (self._name + ".tmp"), "wb")
        self._hasher = _HashingWriter(self._file)
        self._keys = []

    def write(self, key: str, members: dict[str, bytes], mtime: int) -> SampleLocation:
        if not KEY_RE.match(key):
            raise ValueError(f"invalid sample key {key!r}")
        if tuple(members) != MEMBERS:
            raise ValueError(f"sample {key}: members must be exactly {MEMBERS} in that order, got {tuple(members)}")
        size = sum(member_span(len(data)) for data in members.values())
        if self._hasher is not None and self._keys and self._hasher.position + size + 2 * BLOCK > self.target_bytes:
            self._commit()
        if self._hasher is None:
            self._open()
        assert self._hasher is not None
        start = self._hasher.position
        locations = {}
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = _OWNER
            info.type = tarfile.REGTYPE
            # One header block, the data, zero padding to a whole block: what tarfile.addfile writes, in
            # three writes instead of a 16 KiB copy loop.
            header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            self._hasher.write(header)
            locations[ext] = MemberLocation(offset=self._hasher.position, size=len(data))
            self._hasher.write(data)
            if len(data) % BLOCK:
                self._hasher.write(bytes(BLOCK - len(data) % BLOCK))
        self._keys.append(key)
        return SampleLocation(self._name, start, self._hasher.position - start, locations)

    def _commit(self) -> None:
        assert self._file is not None and self._hasher is not None
        # End of archive as tarfile writes it: two zero blocks, then zeros to a whole 20-block record.
        self._hasher.write(bytes(2 * BLOCK))
        if self._hasher.position % tarfile.RECORDSIZE:
            self._hasher.write(bytes(tarfile.RECORDSIZE - self._hasher.position % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = self.directory / (self._name + ".tmp")
        os.rename(tmp, self.directory / self._name)
        fsync_dir(self.directory)
        record = ShardRecord(
            name=self._name,
            sha256=self._hasher.sha256.hexdigest(),
            bytes=self._hasher.position,
            n_samples=len(self._keys),
            first_key=self._keys[0],
            last_key=self._keys[-1],
        )
        self.committed.append(record)
        self._file = self._hasher = None
        if self.on_commit is not None:
            self.on_commit(record)

    def close(self) -> list[ShardRecord]:
        """Commit the open shard (if it has samples) and return every shard this writer committed."""
        if self._hasher is not None:
            if self._keys:
                self._commit()
            else:
                self.abort()
        return self.committed

    def abort(self) -> None:
        """Drop the open shard's temporary file (committed shards stay)."""
        if self._file is not None:
            self._file.close()
            try:
                os.unlink(self.directory / (self._name + ".tmp"))
            except FileNotFoundError:
                pass
        self._file = self._hasher = None
