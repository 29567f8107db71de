"""The one place that says how a sample sits in a shard (DESIGN.md "Sample in a shard").

A key is ``<VSN>_<ts_ns>``: no dots, so stock webdataset, DALI and Ray split ``<key>.<field>`` right. The
members of a sample are adjacent and in the fixed order of ``MEMBERS`` (also sorted order, as webdataset's
own writer would write them).
"""

from __future__ import annotations

import re

__all__ = [
    "MEMBERS",
    "IR_MEMBER",
    "JSON_MEMBER",
    "RGB_MEMBER",
    "KEY_RE",
    "sample_key",
    "shard_name",
    "shard_index",
    "BLOCK",
    "member_span",
]

IR_MEMBER = "ir.npy"
JSON_MEMBER = "json"
RGB_MEMBER = "rgb.jpg"
MEMBERS = (IR_MEMBER, JSON_MEMBER, RGB_MEMBER)

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SHARD_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_-]+)-(?P<index>\d{6})\.tar$")
BLOCK = 512  # tar block size; a USTAR member is one 512-byte header then its data padded to whole blocks


def sample_key(vsn: str, ts_ns: int) -> str:
    key = f"{vsn}_{ts_ns}"
    if not KEY_RE.match(key):
        raise ValueError(f"VSN {vsn!r} makes an invalid sample key {key!r}")
    return key


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_index(name: str) -> int | None:
    """The number of a shard file name ``<prefix>-NNNNNN.tar``, or None for any other name."""
    match = _SHARD_RE.match(name)
    return int(match.group("index")) if match else None


def member_span(size: int) -> int:
    """Bytes one member of ``size`` data bytes takes in a USTAR archive (header + padded data)."""
    return BLOCK + -(-size // BLOCK) * BLOCK
