"""`shards verify`: every committed shard re-hashed against the catalog, every member's place checked.

A member is where the catalog says when the 512-byte USTAR header just before its data names
``<key>.<field>`` and gives its size. Problems are reported per shard and per sample; nothing is repaired.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from shards.layout import BLOCK, MEMBERS

__all__ = ["Problem", "VerifyReport", "verify_shards", "check_member_header"]

_CHUNK = 8 * 1024 * 1024


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(dataset: str | os.PathLike[str], shards: list[dict], samples: list[dict]) -> VerifyReport:
    """Check ``shards`` (catalog rows: name, sha256, bytes, n_samples) and their ``samples`` rows."""
    root = Path(dataset)
    report = VerifyReport()
    by_shard: dict[str, list[dict]] = {}
    for row in samples:
        by_shard.setdefault(row["shard"], []).append(row)
    listed = {row["name"] for row in shards}
    shards_dir = root / "shards"
    if shards_dir.is_dir():
        report.untracked = sorted(p.name for p in shards_dir.iterdir() if p.name.endswith(".tar") and p.name not in listed)
    for row in sorted(shards, key=lambda r: r["name"]):
        name = row["name"]
        path = shards_dir / name
        report.shards_checked += 1
        if not path.is_file():
            report.problems.append(Problem(name, None, "missing (listed in the catalog, not on disk)"))
            continue
        size = path.stat().st_size
        if size != row["bytes"]:
            report.problems.append(Problem(name, None, f"{size} bytes on disk, catalog says {row['bytes']}"))
        digest = _sha256(path)
        report.bytes_hashed += size
        if digest != row["sha256"]:
            report.problems.append(Problem(name, None, f"sha256 {digest[:16]}… does not match the catalog's {row['sha256'][:16]}…"))
        rows = by_shard.get(name, [])
        if len(rows) != row["n_samples"]:
            report.problems.append(Problem(name, None, f"catalog lists {len(rows)} samples, shard record says {row['n_samples']}"))
        with open(path, "rb") as fh:
            for sample in sorted(rows, key=lambda r: r["sample_offset"]):
                report.samples_checked += 1
                for member in MEMBERS:
                    prefix = member.split(".")[0]
                    offset, length = sample[f"{prefix}_offset"], sample[f"{prefix}_size"]
                    header = os.pread(fh.fileno(), BLOCK, offset - BLOCK) if offset >= BLOCK else b""
                    problem = check_member_header(header, f"{sample['key']}.{member}", length)
                    if problem is None and offset + length > size:
                        problem = f"{member} ends at byte {offset + length}, past the end of the shard ({size})"
                    if problem:
                        report.problems.append(Problem(name, sample["key"], problem))
    return report
