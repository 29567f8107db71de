"""The one place that says how a sample sits in a shard (DESIGN.md "Sample in a shard").

A key is ``<VSN>_<ts_ns>``: no dots, so stock webdataset, DALI and Ray split ``<key>.<field>`` right. The
members of a sample are adjacent and in the fixed order of ``MEMBERS`` (also sorted order, as webdataset's
own writer would write them).

The IR member: ingest writes ``<key>.ir.npy.gz``, the float32 ``.npy`` bytes gzip-compressed, losslessly (bytes are
the rate over a network; bench/ir_encoding.py measures the saving). Stock
``webdataset.WebDataset(urls).decode()`` gunzips ``.gz`` and then loads ``.npy``, so it yields the array under
``"ir.npy.gz"``. Datasets built before 2026-12-05 hold the plain ``<key>.ir.npy``; both read through
:func:`ir_celsius`, and the catalog's ``ir_member`` column says which one a sample has.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Mapping

import numpy as np

__all__ = [
    "MEMBERS",
    "IR_MEMBER",
    "IR_GZ_MEMBER",
    "IR_MEMBERS",
    "IR_GZIP_LEVEL",
    "sample_members",
    "encode_npy",
    "encode_ir",
    "ir_member_of",
    "decode_ir",
    "ir_celsius",
    "JSON_MEMBER",
    "RGB_MEMBER",
    "KEY_RE",
    "sample_key",
    "shard_name",
    "shard_index",
    "BLOCK",
    "member_span",
]

IR_MEMBER = "ir.npy"  # float32 .npy, uncompressed: the IR member of datasets built before 2026-12-05
IR_GZ_MEMBER = "ir.npy.gz"  # the same .npy bytes, gzip-compressed: what ingest writes now
IR_MEMBERS = (IR_MEMBER, IR_GZ_MEMBER)
JSON_MEMBER = "json"
RGB_MEMBER = "rgb.jpg"
MEMBERS = (IR_GZ_MEMBER, JSON_MEMBER, RGB_MEMBER)  # a new sample's members, in order
# zlib level 4, default strategy: the fastest level that halves a sample (bench/ir_encoding.py; figures in
# bench/RESULTS.md).
IR_GZIP_LEVEL = 4

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


def sample_members(ir_member: str = IR_GZ_MEMBER) -> tuple[str, str, str]:
    """The members of a sample whose IR member is ``ir_member``, in their order in the shard."""
    if ir_member not in IR_MEMBERS:
        raise ValueError(f"IR member must be one of {IR_MEMBERS}, got {ir_member!r}")
    return (ir_member, JSON_MEMBER, RGB_MEMBER)


def encode_npy(array: np.ndarray) -> bytes:
    """The ``.npy`` bytes of ``array`` (the ``ir.npy`` member; inside the gzip of ``ir.npy.gz``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_ir(array: np.ndarray, member: str = IR_GZ_MEMBER) -> bytes:
    """The bytes of IR member ``member`` holding ``array``: its ``.npy``, gzip-compressed for ``ir.npy.gz``.

    The gzip stream is deterministic: zlib writes a header with mtime 0, no file name and this platform's OS
    byte, and the same zlib gives the same deflate bytes for the same input, level and settings, so rebuilding
    the same input gives byte-identical shards (a different zlib build, zlib-ng say, may compress differently;
    what it writes still decodes to the same array).
    """
    npy = encode_npy(array)
    if member == IR_MEMBER:
        return npy
    if member != IR_GZ_MEMBER:
        raise ValueError(f"IR member must be one of {IR_MEMBERS}, got {member!r}")
    compressor = zlib.compressobj(IR_GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    return compressor.compress(npy) + compressor.flush()


def ir_member_of(sample: Mapping) -> str:
    """Which IR member a sample dict holds (``ir.npy.gz`` or ``ir.npy``)."""
    for member in (IR_GZ_MEMBER, IR_MEMBER):
        if member in sample:
            return member
    key = sample.get("__key__", "?") if hasattr(sample, "get") else "?"
    raise KeyError(f"sample {key} has no IR member (neither {IR_GZ_MEMBER!r} nor {IR_MEMBER!r})")


def decode_ir(data: bytes | bytearray | memoryview, member: str) -> np.ndarray:
    """The float32 °C array (H x W) of the bytes of IR member ``member``."""
    if member == IR_GZ_MEMBER:
        data = zlib.decompress(data, 31)
    elif member != IR_MEMBER:
        raise ValueError(f"IR member must be one of {IR_MEMBERS}, got {member!r}")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.float32 or array.ndim != 2:
        raise ValueError(f"{member} holds a {array.dtype} array of shape {array.shape}, not float32 H x W")
    return array


def ir_celsius(sample: Mapping) -> np.ndarray:
    """The IR frame (float32 °C, H x W, row 0 = top) of a sample dict as a reader yields it, whichever IR member
    it holds: ``ir.npy.gz`` (gzip of the .npy) or ``ir.npy`` (datasets built before 2026-12-05). The member may
    be bytes, or already an array where a webdataset ``.decode()`` stage ran first."""
    member = ir_member_of(sample)
    value = sample[member]
    if isinstance(value, np.ndarray):
        if value.dtype != np.float32 or value.ndim != 2:
            raise ValueError(f"{member} holds a {value.dtype} array of shape {value.shape}, not float32 H x W")
        return value
    return decode_ir(value, member)


def member_span(size: int) -> int:
    """Bytes one member of ``size`` data bytes takes in a USTAR archive (header + padded data)."""
    return BLOCK + -(-size // BLOCK) * BLOCK
