"""The optical half of a Mobotix frame: crop it to the thermal field of view and resize it (pure functions).

The 6144x2048 JPEG holds the optical image in its left half and a false-colour thermal render in its right
half. Decoding all 12.6 MP is the main cost of ingest, so the decoder's DCT scaling (``Image.draft``) decodes
at 1/2, 1/4 or 1/8 size whenever that still leaves at least the output resolution inside the crop box.
Sizes come from the JPEG itself, never from the file name.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageStat

from ingest.config import CropBox

__all__ = ["CorruptJPEGError", "OpticalCrop", "optical_crop_box", "draft_factor", "crop_optical", "encode_jpeg", "mean_brightness"]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


class CorruptJPEGError(ValueError):
    """The optical file is empty, not a JPEG, or cannot be decoded (e.g. truncated)."""


@dataclass(frozen=True)
class OpticalCrop:
    image: Image.Image  # RGB, the requested output size
    source_size: tuple[int, int]  # (width, height) of the whole JPEG as decoded from its header
    box: tuple[float, float, float, float]  # crop box in source pixels: left, top, right, bottom
    draft_factor: int  # the JPEG was decoded at 1/draft_factor size


def optical_crop_box(image_width: int, image_height: int, crop: CropBox) -> tuple[float, float, float, float]:
    """The crop box in pixels of the whole image; the optical half is the left ``image_width // 2`` columns."""
    half = image_width // 2
    return (crop.left * half, crop.top * image_height, crop.right * half, crop.bottom * image_height)


def draft_factor(box_width: float, box_height: float, out_width: int, out_height: int) -> int:
    """Largest JPEG DCT scaling (8, 4, 2 or 1) that keeps the crop box at least as large as the output."""
    for factor in (8, 4, 2):
        if box_width / factor >= out_width and box_height / factor >= out_height:
            return factor
    return 1


def crop_optical(data: bytes, crop: CropBox, out_size: tuple[int, int], resample: str = "bicubic") -> OpticalCrop:
    """Decode the optical half of a Mobotix JPEG, crop it to ``crop`` and resize to ``out_size`` with antialiasing."""
    if not data:
        raise CorruptJPEGError("empty file")
    if not data.startswith(b"\xff\xd8"):
        raise CorruptJPEGError(f"not a JPEG (starts with {data[:16]!r})")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG":
            raise CorruptJPEGError(f"not a JPEG ({image.format} image)")
        width, height = image.size
        if width < 4 or height < 2:
            raise CorruptJPEGError(f"image is only {width}x{height} pixels")
        box = optical_crop_box(width, height, crop)
        factor = draft_factor(box[2] - box[0], box[3] - box[1], *out_size)
        if factor > 1:
            image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        image.load()
    except CorruptJPEGError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        raise CorruptJPEGError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    scale_x, scale_y = width / image.size[0], height / image.size[1]
    scaled_box = (box[0] / scale_x, box[1] / scale_y, box[2] / scale_x, box[3] / scale_y)
    resized = image.resize(out_size, _RESAMPLE[resample], box=scaled_box)
    return OpticalCrop(image=resized, source_size=(width, height), box=box, draft_factor=factor)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes; the same pixels and quality always give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def mean_brightness(image: Image.Image) -> float:
    """Mean of all RGB values in [0, 1] (from PIL's histogram: no copy of the pixels)."""
    return float(sum(ImageStat.Stat(image).mean) / (3 * 255.0))
