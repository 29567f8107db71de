"""Turn one frame into the bytes of a sample, or into a reject (runs in worker processes).

The work per frame is irreducible: read two files, parse the CSV, decode the optical half at the smallest
JPEG scale that still covers the output, crop+resize, encode. Workers take frames a piece (a few consecutive
frames) at a time and append each kept sample's tar bytes to the piece's segment file, so what travels back to
the parent is a few hundred bytes a frame (where the bytes are, the stats, or why it was rejected), never the
images: the parent's work per frame stays small however many workers feed it.
"""

from __future__ import annotations

import ctypes
import json
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ingest.config import IngestConfig
from ingest.frames import FrameTask
from ingest.optical import CorruptJPEGError, crop_optical, encode_jpeg, mean_brightness
from ingest.thermal import ThermalCSVError, check_celsius_values, parse_celsius_csv
from shards.layout import IR_GZ_MEMBER, JSON_MEMBER, RGB_MEMBER, encode_ir, encode_npy
from shards.writer import MemberLocation, sample_bytes

__all__ = [
    "FrameResult", "SegmentSample", "Piece", "process_frame", "process_safely", "process_piece", "encode_npy",
    "encode_ir", "sample_json", "IR_WRITTEN",
]

# The IR member new samples get: the .npy gzip-compressed (shards.layout). ``layout.IR_MEMBER``, the plain .npy, is
# what builds before 2026-12-05 wrote; the tests set this to it to build such a dataset and read it back.
IR_WRITTEN = IR_GZ_MEMBER


@dataclass(frozen=True, slots=True)
class SegmentSample:
    """Where a kept sample's tar bytes are in its piece's segment file."""

    segment: str
    offset: int
    length: int
    members: dict[str, MemberLocation]  # data offsets relative to the sample's first byte


@dataclass(frozen=True, slots=True)
class FrameResult:
    key: str
    members: dict[str, bytes] | None  # None when rejected
    stats: dict[str, float | int] | None
    reason: str | None = None
    detail: str | None = None
    culprit: str | None = None  # the file at fault (relative path)
    placement: SegmentSample | None = None  # set (and members dropped) once the bytes are in a segment

    @property
    def rejected(self) -> bool:
        return self.reason is not None


@dataclass(frozen=True)
class Piece:
    """Consecutive frames one worker turns into samples, appending their bytes to ``segment``."""

    tasks: tuple[FrameTask, ...]
    segment: str


def sample_json(task: FrameTask, header: dict[str, str], source_size, box, rgb_size, ir_size, config: IngestConfig) -> bytes:
    """The ``.json`` member: where the sample came from and how it was cut (deterministic bytes)."""
    record = {
        **task.provenance(),
        "source_size": list(source_size),
        "crop_box_px": [round(v, 3) for v in box],
        "crop_box_fraction": [config.crop.left, config.crop.top, config.crop.right, config.crop.bottom],
        "rgb_size": list(rgb_size),
        "ir_size": list(ir_size),
        "thermal_header": header,
        "units": {"ir": "degrees Celsius, float32, row 0 = top"},
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def process_frame(task: FrameTask, raw_dir: str, config: IngestConfig) -> FrameResult:
    root = Path(raw_dir)
    try:
        thermal_bytes = (root / task.thermal_path).read_bytes()
    except OSError as exc:
        return FrameResult(task.key, None, None, "unreadable", f"{task.thermal_path}: {exc.strerror}", task.thermal_path)
    try:
        rgb_bytes = (root / task.rgb_path).read_bytes()
    except OSError as exc:
        return FrameResult(task.key, None, None, "unreadable", f"{task.rgb_path}: {exc.strerror}", task.rgb_path)

    try:
        thermal = parse_celsius_csv(thermal_bytes)
        problem = check_celsius_values(thermal.celsius, config.min_celsius, config.max_celsius, config.max_nan_fraction)
        if problem is not None:
            raise problem
    except ThermalCSVError as exc:
        return FrameResult(task.key, None, None, exc.reason, f"{task.thermal_path}: {exc.detail}", task.thermal_path)

    celsius = thermal.celsius
    ir_width, ir_height = thermal.sensor_size
    out_size = config.rgb_output_size(ir_width, ir_height)
    try:
        optical = crop_optical(rgb_bytes, config.crop, out_size, config.resample)
    except CorruptJPEGError as exc:
        return FrameResult(task.key, None, None, "corrupt_jpeg", f"{task.rgb_path}: {exc}", task.rgb_path)

    rgb_jpeg = encode_jpeg(optical.image, config.jpeg_quality)
    nan_count = int(np.count_nonzero(np.isnan(celsius)))
    finite = celsius[np.isfinite(celsius)] if nan_count else celsius
    stats = {
        "ir_min": float(finite.min()) if finite.size else float("nan"),
        "ir_mean": float(finite.mean(dtype=np.float64)) if finite.size else float("nan"),
        "ir_max": float(finite.max()) if finite.size else float("nan"),
        "ir_std": float(finite.std(dtype=np.float64)) if finite.size else float("nan"),
        "ir_nan_fraction": nan_count / celsius.size,
        "rgb_mean": mean_brightness(optical.image),
        "rgb_width": out_size[0],
        "rgb_height": out_size[1],
        "ir_width": ir_width,
        "ir_height": ir_height,
        "source_width": optical.source_size[0],
        "source_height": optical.source_size[1],
        "decode_scale": optical.decode_scale,
    }
    members = {
        IR_WRITTEN: encode_ir(celsius, IR_WRITTEN),
        JSON_MEMBER: sample_json(task, thermal.header, optical.source_size, optical.box, out_size, (ir_width, ir_height), config),
        RGB_MEMBER: rgb_jpeg,
    }
    return FrameResult(task.key, members, stats)


_MEMORY_KEPT = False


def keep_freed_memory() -> None:
    """Let this process reuse the memory it frees instead of handing it back to the kernel at once (once per process).

    A worker allocates the same few large blocks frame after frame: the read JPEG and CSV, the decoded frame, the
    crop and the resize's passes, the IR array. By default each comes fresh from the kernel (glibc maps large blocks
    anew; Pillow frees its image blocks), so every frame pays its page faults again; kept, the blocks are reused
    (bench/RESULTS.md has the measured saving). Pillow: its documented PILLOW_BLOCKS_MAX; glibc: mallopt's
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (other C libraries keep their defaults).
    """
    global _MEMORY_KEPT
    if _MEMORY_KEPT:
        return
    _MEMORY_KEPT = True
    Image.core.set_blocks_max(max(Image.core.get_blocks_max(), 8))
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 << 20)  # blocks up to 64 MB from the heap, reused when freed
        libc.mallopt(m_trim_threshold, 128 << 20)  # the heap's free top returned to the kernel above 128 MB only


def process_piece(piece: Piece, raw_dir: str, config: IngestConfig) -> list[FrameResult]:
    """Every frame of the piece, in order; kept samples' bytes go to the segment file (not fsynced: a shard is
    assembled from it and fsynced before anything trusts those bytes)."""
    keep_freed_memory()
    results = []
    position = 0
    with open(piece.segment, "wb") as segment:
        for task in piece.tasks:
            result = process_safely(task, raw_dir, config)
            if result.members is not None:
                data, members = sample_bytes(task.key, result.members, mtime=task.ts_ns // 1_000_000_000)
                segment.write(data)
                placement = SegmentSample(piece.segment, position, len(data), members)
                result = replace(result, members=None, placement=placement)
                position += len(data)
            results.append(result)
    return results


def process_safely(task: FrameTask, raw_dir: str, config: IngestConfig) -> FrameResult:
    try:
        return process_frame(task, raw_dir, config)
    except Exception as exc:  # one bad frame never stops the run: an unforeseen failure is a reject too
        return FrameResult(
            task.key, None, None, "unreadable",
            f"{task.rgb_path} + {task.thermal_path}: unexpected {type(exc).__name__}: {exc}", task.rgb_path,
        )
