"""Write WebDataset shards atomically: a temporary file -> fsync -> sha256 -> rename.

Shards are plain USTAR with fixed uid/gid/mode/owner names and each member's mtime set to the capture time,
so the same samples always give the same bytes. Member byte offsets are returned for the catalog, which is
what lets readers seek straight to a sample. A shard only becomes visible under its final name once it is
complete and on disk; a reader still trusts it only when the catalog lists it with a matching sha256.

The work is split so that it scales over processes (and MPI ranks): whoever makes a sample turns it into its
tar bytes (:func:`sample_bytes`) and appends them to a segment file; :class:`ShardCuts` decides, from the
samples' lengths alone, where each shard ends; :func:`assemble_shard` concatenates byte ranges of segments
into a complete, fsynced, hashed shard. The bytes of a shard depend only on its samples, in order.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shards.layout import BLOCK, IR_MEMBERS, KEY_RE, member_span, sample_members

__all__ = [
    "MemberLocation", "ShardRecord", "sample_bytes", "ShardCuts", "assemble_shard",
    "fsync_dir",
]

_OWNER = "sagepairs"
_COPY_BYTES = 8 << 20


@dataclass(frozen=True)
class MemberLocation:
    offset: int  # first data byte (in the shard, or relative to the sample's start in :func:`sample_bytes`)
    size: int  # data bytes


@dataclass(frozen=True)
class ShardRecord:
    name: str
    sha256: str
    bytes: int
    n_samples: int
    first_key: str
    last_key: str


def sample_bytes(key: str, members: dict[str, bytes], mtime: int) -> tuple[bytes, dict[str, MemberLocation]]:
    """One sample as the tar bytes of its members (header, data, zero padding each) and where each member's
    data starts relative to the first byte: what ``tarfile.addfile`` writes, without its 16 KiB copy loop."""
    if not KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}")
    names = tuple(members)
    if not names or names[0] not in IR_MEMBERS or names != sample_members(names[0]):
        raise ValueError(f"sample {key}: members must be exactly {sample_members()} in that order (or the older "
                         f"{sample_members(IR_MEMBERS[0])}), got {names}")
    parts: list[bytes] = []
    locations = {}
    position = 0
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = mtime
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = _OWNER
        info.type = tarfile.REGTYPE
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        locations[ext] = MemberLocation(offset=position + len(header), size=len(data))
        parts += [header, data, bytes(-len(data) % BLOCK)]
        position += member_span(len(data))
    return b"".join(parts), locations


class ShardCuts:
    """Where shards end in an ordered stream of samples: a shard is closed before a sample would take it (with
    the end-of-archive blocks) past ``target_bytes``; a sample larger than that gets a shard of its own."""

    def __init__(self, target_bytes: int) -> None:
        self.target_bytes = target_bytes
        self.shard_bytes = 0
        self.shard_samples = 0

    def starts_shard(self, length: int) -> bool:
        """Add a sample of ``length`` bytes; True when it is the first of a new shard."""
        new = self.shard_samples == 0 or self.shard_bytes + length + 2 * BLOCK > self.target_bytes
        if new:
            self.shard_bytes = self.shard_samples = 0
        self.shard_bytes += length
        self.shard_samples += 1
        return new


def _archive_end(position: int) -> bytes:
    """End of archive as tarfile writes it: two zero blocks, then zeros to a whole 20-block record."""
    end = position + 2 * BLOCK
    return bytes(2 * BLOCK + -end % tarfile.RECORDSIZE)


def assemble_shard(path: str | os.PathLike[str], ranges: Iterable[tuple[str | os.PathLike[str], int, int]]) -> tuple[str, int]:
    """Write a complete shard to ``path`` from ``(segment file, offset, length)`` ranges of sample bytes, in
    order, then the end of archive; fsync it. Returns (sha256, bytes). The caller renames it into place."""
    sha256 = hashlib.sha256()
    position = 0
    handles: dict[str, object] = {}
    try:
        with open(path, "wb") as out:
            for segment, offset, length in ranges:
                source = handles.get(str(segment))
                if source is None:
                    source = handles[str(segment)] = open(segment, "rb")
                source.seek(offset)  # type: ignore[attr-defined]
                left = length
                while left:
                    chunk = source.read(min(left, _COPY_BYTES))  # type: ignore[attr-defined]
                    if not chunk:
                        raise OSError(f"{segment}: ends before byte {offset + length} (truncated segment)")
                    sha256.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
                    position += len(chunk)
            end = _archive_end(position)
            sha256.update(end)
            out.write(end)
            position += len(end)
            out.flush()
            os.fsync(out.fileno())
    finally:
        for source in handles.values():
            source.close()  # type: ignore[attr-defined]
    return sha256.hexdigest(), position


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
