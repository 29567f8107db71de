"""The optical half of a Mobotix frame: crop it to the thermal field of view and resize it (pure functions; only a
reused decode buffer is kept between calls).

The 6144x2048 JPEG holds the optical image in its left half and a false-colour thermal render in its right
half. Decoding all 12.6 MP is the main cost of ingest, so libjpeg-turbo's DCT scaling (through simplejpeg)
decodes at the smallest M/8 of full size that still leaves at least the output resolution inside the crop box:
3/8 for the default 1942x1593 box and 672x504 output, where Pillow's ``draft`` offers only 1/2, 1/4 and 1/8
(bench/ingest.py compares the scales; bench/RESULTS.md has the figures). A JPEG that libjpeg-turbo will not decode
strictly (a recoverable warning, a CMYK scan) is decoded by Pillow instead, so what is accepted and rejected does
not depend on the decoder. Sizes come from the JPEG itself, never from the file name.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageStat

from ingest.config import CropBox

__all__ = [
    "CorruptJPEGError",
    "OpticalCrop",
    "optical_crop_box",
    "decode_eighths",
    "crop_optical",
    "crop_optical_pillow",
    "encode_jpeg",
    "mean_brightness",
]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}  # Pillow's filter supports, in output pixels


_buffers = threading.local()


def _decode_buffer(size: int) -> np.ndarray:
    """This thread's decode output, reused: a fresh array of a decoded frame's size is page faults on every frame,
    which cost more with every core faulting at once (see ingest.process.keep_freed_memory for the rest of a
    worker's memory)."""
    buffer = getattr(_buffers, "array", None)
    if buffer is None or buffer.size < size:
        buffer = _buffers.array = np.empty(size, np.uint8)
    return buffer


class CorruptJPEGError(ValueError):
    """The optical file is empty, not a JPEG, or cannot be decoded (e.g. truncated)."""


@dataclass(frozen=True)
class OpticalCrop:
    image: Image.Image  # RGB, the requested output size
    source_size: tuple[int, int]  # (width, height) of the whole JPEG as decoded from its header
    box: tuple[float, float, float, float]  # crop box in source pixels: left, top, right, bottom
    decode_scale: float  # the JPEG was decoded at this fraction of its size (M/8)


def optical_crop_box(image_width: int, image_height: int, crop: CropBox) -> tuple[float, float, float, float]:
    """The crop box in pixels of the whole image; the optical half is the left ``image_width // 2`` columns."""
    half = image_width // 2
    return (crop.left * half, crop.top * image_height, crop.right * half, crop.bottom * image_height)


def decode_eighths(box_width: float, box_height: float, out_width: int, out_height: int) -> int:
    """Smallest M in 1..8 such that decoding at M/8 keeps the crop box at least as large as the output."""
    for eighths in range(1, 8):
        if box_width * eighths / 8 >= out_width and box_height * eighths / 8 >= out_height:
            return eighths
    return 8


def _box_in_decoded(box: tuple[float, float, float, float], source_size: tuple[int, int],
                    decoded_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` (source pixels) in the pixels of the image decoded at ``decoded_size``, kept inside it."""
    (width, height), (decoded_width, decoded_height) = source_size, decoded_size
    return (min(box[0] * decoded_width / width, decoded_width), min(box[1] * decoded_height / height, decoded_height),
            min(box[2] * decoded_width / width, decoded_width), min(box[3] * decoded_height / height, decoded_height))


def _check_header(data: bytes) -> None:
    if not data:
        raise CorruptJPEGError("empty file")
    if not data.startswith(b"\xff\xd8"):
        raise CorruptJPEGError(f"not a JPEG (starts with {data[:16]!r})")


def _check_size(width: int, height: int) -> None:
    if width < 4 or height < 2:
        raise CorruptJPEGError(f"image is only {width}x{height} pixels")


def crop_optical(data: bytes, crop: CropBox, out_size: tuple[int, int], resample: str = "bicubic",
                 eighths: int | None = None) -> OpticalCrop:
    """Decode the optical half of a Mobotix JPEG at the smallest M/8 scale that covers ``out_size`` (or at
    ``eighths``/8, which must cover it: bench/ingest.py compares scales), crop it to ``crop`` and resize to
    ``out_size`` with antialiasing."""
    _check_header(data)
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # Pillow decides what is wrong with it (see below)
        return crop_optical_pillow(data, crop, out_size, resample)
    _check_size(width, height)
    box = optical_crop_box(width, height, crop)
    smallest = decode_eighths(box[2] - box[0], box[3] - box[1], *out_size)
    if eighths is not None and not smallest <= eighths <= 8:
        raise ValueError(f"decoding at {eighths}/8 does not cover {out_size[0]}x{out_size[1]}; at least {smallest}/8")
    eighths = eighths or smallest
    decoded_width, decoded_height = math.ceil(width * eighths / 8), math.ceil(height * eighths / 8)
    try:
        # simplejpeg decodes at the smallest of libjpeg-turbo's M/8 scales that gives at least this size.
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=decoded_width, min_height=decoded_height,
                                        strict=True, buffer=_decode_buffer(decoded_width * decoded_height * 3))
    except ValueError:
        # Not decodable by libjpeg-turbo as it stands (truncated, a warning, an unsupported colour space):
        # Pillow decides, so that a file is accepted or rejected whichever decoder ran.
        return crop_optical_pillow(data, crop, out_size, resample)
    decoded_height, decoded_width = pixels.shape[:2]
    left, top, right, bottom = _box_in_decoded(box, (width, height), (decoded_width, decoded_height))
    # Only the box and what the filter reads around it become a PIL image (the false-colour half is never
    # copied): the same pixels as resizing from the whole decoded frame.
    reach = _SUPPORT[resample] * max((right - left) / out_size[0], (bottom - top) / out_size[1], 1.0)
    margin = math.ceil(reach) + 2
    x0, y0 = max(0, math.floor(left) - margin), max(0, math.floor(top) - margin)
    x1, y1 = min(decoded_width, math.ceil(right) + margin), min(decoded_height, math.ceil(bottom) + margin)
    row = pixels.strides[0]
    image = Image.frombuffer("RGB", (x1 - x0, y1 - y0), memoryview(pixels.reshape(-1))[y0 * row + x0 * 3 :], "raw",
                             "RGB", row, 1)
    resized = image.resize(out_size, _RESAMPLE[resample], box=(left - x0, top - y0, right - x0, bottom - y0))
    return OpticalCrop(image=resized, source_size=(width, height), box=box, decode_scale=eighths / 8)


def crop_optical_pillow(data: bytes, crop: CropBox, out_size: tuple[int, int], resample: str = "bicubic") -> OpticalCrop:
    """The same crop through Pillow, whose ``draft`` decodes at 1/1, 1/2, 1/4 or 1/8 only."""
    _check_header(data)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG":
            raise CorruptJPEGError(f"not a JPEG ({image.format} image)")
        width, height = image.size
        _check_size(width, height)
        box = optical_crop_box(width, height, crop)
        eighths = decode_eighths(box[2] - box[0], box[3] - box[1], *out_size)
        factor = next(f for f in (8, 4, 2, 1) if eighths * f <= 8)  # largest power-of-two reduction allowed
        if factor > 1:
            image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        image.load()
    except CorruptJPEGError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        raise CorruptJPEGError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize(out_size, _RESAMPLE[resample], box=_box_in_decoded(box, (width, height), image.size))
    return OpticalCrop(image=resized, source_size=(width, height), box=box, decode_scale=1 / factor)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes; the same pixels and quality always give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def mean_brightness(image: Image.Image) -> float:
    """Mean of all RGB values in [0, 1] (from PIL's histogram: no copy of the pixels)."""
    return float(sum(ImageStat.Stat(image).mean) / (3 * 255.0))
