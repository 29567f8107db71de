"""`shards verify`: every committed shard re-hashed against the catalog, every member's place checked.

A member is where the catalog says when the 512-byte USTAR header just before its data names
``<key>.<field>`` and gives its size (the IR member's field is the sample's ``ir_member``: ``ir.npy.gz``, or
``ir.npy`` where the row has none, as in datasets built before 2026-12-05). Problems are reported per shard and
per sample; nothing is repaired. A published dataset (``s3://``, ``https://``) is checked the same way, each
shard fetched whole.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from catalog.storage import Storage, file_sha256, is_remote, storage
from shards.layout import BLOCK, IR_MEMBER, IR_MEMBERS, sample_members

__all__ = ["Problem", "VerifyReport", "verify_shards", "check_member_header"]

@dataclass(frozen=True)
class Problem:
    shard: str
    key: str | None  # None: the shard as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.shard}{' ' + self.key if self.key else ''}: {self.message}"


@dataclass
class VerifyReport:
    shards_checked: int = 0
    samples_checked: int = 0
    bytes_hashed: int = 0
    problems: list[Problem] = field(default_factory=list)
    untracked: list[str] = field(default_factory=list)  # shard files no catalog part lists (never trusted)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_member_header(header: bytes, expected_name: str, expected_size: int) -> str | None:
    """None when ``header`` is the USTAR header of ``expected_name`` with ``expected_size`` data bytes."""
    if len(header) < BLOCK:
        return f"header of {expected_name} is past the end of the shard"
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return f"no valid tar header before {expected_name}: {exc}"
    if info.name != expected_name:
        return f"tar header names {info.name!r}, catalog expects {expected_name!r}"
    if info.size != expected_size:
        return f"{expected_name} is {info.size} bytes in the tar header, catalog says {expected_size}"
    return None


@dataclass(frozen=True)
class _ShardBytes:
    """A shard's size, sha256 and a way to read a block of it: from disk, or fetched whole from a publication."""

    size: int
    sha256: str
    read: Callable[[int, int], bytes]  # (offset, length) -> bytes
    where: str  # "on disk", "in the publication": for messages


def _local_shard(path: Path, fh) -> _ShardBytes:
    return _ShardBytes(path.stat().st_size, file_sha256(path), lambda offset, n: os.pread(fh.fileno(), n, offset), "on disk")


def _remote_shard(store: Storage, name: str) -> _ShardBytes | None:
    key = f"shards/{name}"
    if store.size(key) is None:
        return None
    data = store.read(key)
    return _ShardBytes(len(data), hashlib.sha256(data).hexdigest(), lambda offset, n: data[offset : offset + n],
                       "in the publication")


def verify_shards(dataset: str | os.PathLike[str], shards: list[dict], samples: list[dict]) -> VerifyReport:
    """Check ``shards`` (catalog rows: name, sha256, bytes, n_samples) and their ``samples`` rows (key, shard,
    sample_offset, the members' offsets and sizes, ir_member). A published dataset's shards are fetched whole,
    one at a time."""
    report = VerifyReport()
    by_shard: dict[str, list[dict]] = {}
    for row in samples:
        by_shard.setdefault(row["shard"], []).append(row)
    remote = storage(str(dataset)) if is_remote(str(dataset)) else None
    shards_dir = Path(dataset) / "shards"
    if remote is None and shards_dir.is_dir():
        listed = {row["name"] for row in shards}
        report.untracked = sorted(p.name for p in shards_dir.iterdir() if p.name.endswith(".tar") and p.name not in listed)
    for row in sorted(shards, key=lambda r: r["name"]):
        report.shards_checked += 1
        if remote is not None:
            _check_shard(report, row, by_shard.get(row["name"], []), _remote_shard(remote, row["name"]))
            continue
        path = shards_dir / row["name"]
        if not path.is_file():
            _check_shard(report, row, [], None)
            continue
        with open(path, "rb") as fh:
            _check_shard(report, row, by_shard.get(row["name"], []), _local_shard(path, fh))
    return report


def _check_shard(report: VerifyReport, row: dict, rows: list[dict], shard: _ShardBytes | None) -> None:
    name = row["name"]
    if shard is None:
        report.problems.append(Problem(name, None, "missing (listed in the catalog, not there)"))
        return
    if shard.size != row["bytes"]:
        report.problems.append(Problem(name, None, f"{shard.size} bytes {shard.where}, catalog says {row['bytes']}"))
    report.bytes_hashed += shard.size
    if shard.sha256 != row["sha256"]:
        report.problems.append(Problem(name, None, f"sha256 {shard.sha256[:16]}… does not match the catalog's {row['sha256'][:16]}…"))
    if len(rows) != row["n_samples"]:
        report.problems.append(Problem(name, None, f"catalog lists {len(rows)} samples, shard record says {row['n_samples']}"))
    for sample in sorted(rows, key=lambda r: r["sample_offset"]):
        report.samples_checked += 1
        ir_member = sample.get("ir_member") or IR_MEMBER
        if ir_member not in IR_MEMBERS:
            report.problems.append(Problem(name, sample["key"], f"ir_member {ir_member!r} is none of {IR_MEMBERS}"))
            continue
        for member, prefix in zip(sample_members(ir_member), ("ir", "json", "rgb")):
            offset, length = sample[f"{prefix}_offset"], sample[f"{prefix}_size"]
            header = shard.read(offset - BLOCK, BLOCK) if offset >= BLOCK else b""
            problem = check_member_header(header, f"{sample['key']}.{member}", length)
            if problem is None and offset + length > shard.size:
                problem = f"{member} ends at byte {offset + length}, past the end of the shard ({shard.size})"
            if problem:
                report.problems.append(Problem(name, sample["key"], problem))
