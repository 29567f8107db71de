"""Pure transforms of training pairs: augmentation parameters, crop+resize of each modality, device-side views.

Randomness is a function of (seed, epoch, sample key) only (``sample_rng``), so a sample gets the same crop,
flip and jitter whatever the number of ranks and DataLoader workers. Both views use the same relative crop
box and the same flip, so RGB and IR keep pointing at the same patch of sky.

CPU side (in DataLoader workers, numpy/Pillow, uint8 where it can be): ``draw_augment``, ``decode_rgb_crop``,
``crop_ir``. Device side (torch, after the host-to-device copy): ``rgb_to_float``, ``jitter_rgb``, ``luma``,
``normalise_ir``, ``ir_bands``, ``fit_to_grid``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "RGB_MEAN",
    "RGB_STD",
    "GREY_MEAN",
    "GREY_STD",
    "LUMA",
    "Augment",
    "key_hash",
    "sample_rng",
    "random_resized_box",
    "draw_augment",
    "draw_photometric",
    "decode_rgb_crop",
    "decode_rgb_crops",
    "crop_ir",
    "rgb_to_float",
    "jitter_rgb",
    "jitter_grey",
    "luma",
    "normalise_ir",
    "ir_bands",
    "fit_to_grid",
    "tiled_size",
]

RGB_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: RGB frames are ordinary camera images
RGB_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = 0.449, 0.226
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what torchvision's Grayscale uses


@dataclass(frozen=True)
class Augment:
    """One sample's augmentation: a relative box (x0, y0, x1, y1) in [0, 1], a flip, and photometric factors."""

    box: tuple[float, float, float, float]
    flip: bool
    rgb_jitter: tuple[float, float, float]  # brightness, contrast, saturation factors
    grey_jitter: tuple[float, float]  # brightness, contrast of a greyscale view
    ir_gain: float
    ir_offset_c: float
    noise_seed: int


def key_hash(key: str) -> int:
    """A stable 63-bit integer of a sample key (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, key_hash(key)])


def random_resized_box(
    rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float], attempts: int = 10
) -> tuple[float, float, float, float]:
    """A box covering a random area fraction in ``scale`` with aspect (relative to the image's) in ``ratio``.

    Relative coordinates, so the same box crops RGB and IR of different pixel sizes alike. Like torchvision's
    RandomResizedCrop: after ``attempts`` misses it falls back to the whole image.
    """
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        area = rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= 1 and h <= 1:
            x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            return (x0, y0, x0 + w, y0 + h)
    return (0.0, 0.0, 1.0, 1.0)


def draw_augment(rng: np.random.Generator, data) -> Augment:
    """All random choices for one sample, drawn in a fixed order from its own generator (``data``: DataConfig)."""
    box = random_resized_box(rng, data.crop_scale, data.crop_ratio)
    flip = bool(rng.uniform() < data.hflip)
    return draw_photometric(rng, data, box, flip)


def draw_photometric(rng: np.random.Generator, data, box: tuple[float, float, float, float], flip: bool) -> Augment:
    """The photometric draws of ``draw_augment`` (after its box and flip), in its order, for a given box and flip."""
    rgb = tuple(float(1 + rng.uniform(-a, a)) for a in (data.rgb_brightness, data.rgb_contrast, data.rgb_saturation))
    grey = tuple(float(1 + rng.uniform(-a, a)) for a in (data.rgb_brightness, data.rgb_contrast))
    gain = float(1 + rng.uniform(-data.ir_gain, data.ir_gain))
    offset = float(rng.normal(0.0, data.ir_offset_c)) if data.ir_offset_c > 0 else 0.0
    noise_seed = int(rng.integers(0, 2**63 - 1))
    return Augment(box, flip, rgb, grey, gain, offset, noise_seed)  # type: ignore[arg-type]


def decode_rgb_crop(jpeg: bytes, box: tuple[float, float, float, float], out_hw: tuple[int, int], flip: bool) -> np.ndarray:
    """Crop ``box`` of a JPEG and resize it to ``out_hw`` (H, W): uint8 H x W x 3.

    The JPEG is decoded at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) that still has at least the output's
    resolution inside the box (``Image.draft``), then cropped and resized in one antialiased step.
    """
    return decode_rgb_crops(jpeg, [box], [out_hw], [flip])[0]


def decode_rgb_crops(jpeg: bytes, boxes: list[tuple[float, float, float, float]], out_hws: list[tuple[int, int]],
                     flips: list[bool]) -> list[np.ndarray]:
    """Every ``boxes[i]`` of one JPEG resized to ``out_hws[i]`` (and flipped): the JPEG is decoded once.

    The DCT scale is the smallest that has every crop's output resolution inside its box (see decode_rgb_crop).
    """
    with Image.open(io.BytesIO(jpeg)) as image:
        width, height = image.size
        need_w = max(math.ceil(out_w / (x1 - x0)) for (x0, _, x1, _), (_, out_w) in zip(boxes, out_hws))
        need_h = max(math.ceil(out_h / (y1 - y0)) for (_, y0, _, y1), (out_h, _) in zip(boxes, out_hws))
        image.draft("RGB", (need_w, need_h))
        sx, sy = image.size[0] / width, image.size[1] / height
        pixels = image.convert("RGB") if image.mode != "RGB" else image
        pixels.load()
        return [_resize_box(pixels, box, out_hw, flip, (width, height), (sx, sy))
                for box, out_hw, flip in zip(boxes, out_hws, flips, strict=True)]


def _resize_box(pixels: Image.Image, box: tuple[float, float, float, float], out_hw: tuple[int, int], flip: bool,
                size: tuple[int, int], draft_scale: tuple[float, float]) -> np.ndarray:
    """One crop of a decoded (possibly DCT-downscaled by ``draft_scale``) image of original ``size`` (W, H)."""
    (x0, y0, x1, y1), (width, height), (sx, sy) = box, size, draft_scale
    out_h, out_w = out_hw
    px_box = (x0 * width * sx, y0 * height * sy, x1 * width * sx, y1 * height * sy)
    out = pixels.resize((out_w, out_h), Image.Resampling.BILINEAR, box=px_box, reducing_gap=None)
    if flip:  # in Pillow: numpy's copy of a reversed 3-byte-pixel view costs more than the resize
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def crop_ir(
    celsius: np.ndarray,
    box: tuple[float, float, float, float],
    out_hw: tuple[int, int],
    flip: bool,
    fill_c: float,
    gain: float = 1.0,
    offset_c: float = 0.0,
    noise_c: float = 0.0,
    noise_seed: int = 0,
) -> np.ndarray:
    """Crop ``box`` of an IR frame (degrees C) and resize it to ``out_hw``: float32 H x W, still in degrees C.

    NaN pixels (a few are kept by ingest) become ``fill_c`` (the dataset mean, so 0 after normalisation) before
    the resize spreads them. Photometric jitter: gain about the crop's mean, an offset, per-pixel noise.
    """
    celsius = np.asarray(celsius, dtype=np.float32)
    if np.isnan(celsius).any():
        celsius = np.where(np.isnan(celsius), np.float32(fill_c), celsius)
    height, width = celsius.shape
    x0, y0, x1, y1 = box
    out_h, out_w = out_hw
    image = Image.fromarray(celsius, mode="F")
    px_box = (x0 * width, y0 * height, x1 * width, y1 * height)
    out = np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=px_box), dtype=np.float32)
    if flip:
        out = out[:, ::-1]
    if gain != 1.0 or offset_c != 0.0:
        mean = out.mean(dtype=np.float64)
        out = (out - mean) * gain + mean + offset_c
    if noise_c > 0:
        out = out + np.random.default_rng(noise_seed).standard_normal(out.shape, dtype=np.float32) * np.float32(noise_c)
    return np.ascontiguousarray(out, dtype=np.float32)


# -- device side (torch; runs wherever the batch is) ---------------------------------------------------

@functools.lru_cache(maxsize=32)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made once per device: building a CUDA tensor from a Python list every step makes the host wait for the GPU.
    return torch.tensor(values, dtype=dtype).view(1, len(values), 1, 1).to(device)


def rgb_to_float(rgb_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1]."""
    return rgb_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in [0, 1] -> N x 1 x H x W."""
    return (rgb * _constant(LUMA, rgb.dtype, rgb.device)).sum(1, keepdim=True)


def jitter_rgb(rgb: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation factors (N x 3) on N x 3 x H x W in [0, 1], then ImageNet-normalised."""
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1).to(rgb.dtype) for i in range(3))
    out = rgb * brightness
    mean = luma(out).mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    grey = luma(out)
    out = ((out - grey) * saturation + grey).clamp_(0, 1)
    return (out - _constant(RGB_MEAN, rgb.dtype, rgb.device)) / _constant(RGB_STD, rgb.dtype, rgb.device)


def jitter_grey(grey: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness and contrast factors (N x 2) on N x 1 x H x W in [0, 1], then normalised."""
    brightness, contrast = (factors[:, i].view(-1, 1, 1, 1).to(grey.dtype) for i in range(2))
    out = grey * brightness
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean).clamp_(0, 1)
    return (out - GREY_MEAN) / GREY_STD


def normalise_ir(celsius: torch.Tensor, mean_c: float, std_c: float) -> torch.Tensor:
    """N x H x W degrees C -> N x 1 x H x W standardised by the dataset's statistics."""
    return ((celsius.float() - mean_c) / std_c).unsqueeze(1)


def ir_bands(celsius: torch.Tensor, bounds: tuple[float, float], mean_c: float, std_c: float) -> torch.Tensor:
    """N x H x W degrees C -> N x 3 x H x W: at or below ``lower``, between, above ``upper``, each clamped to its band.

    (The 2023 code's ``expand_dim`` idea, with explicit thresholds; e.g. clear sky / cloud / ground.)
    """
    lower, upper = bounds
    celsius = celsius.float()
    bands = torch.stack([celsius.clamp(max=lower), celsius.clamp(lower, upper), celsius.clamp(min=upper)], dim=1)
    return (bands - mean_c) / std_c


def tiled_size(size: tuple[int, int], patch: int, fit: str) -> tuple[int, int]:
    """(H, W) that ``patch`` tiles: ``size`` itself, or the multiple below ('crop') or above ('pad')."""
    if fit == "crop":
        return (size[0] // patch * patch, size[1] // patch * patch)
    if fit == "pad":
        return (-(-size[0] // patch) * patch, -(-size[1] // patch) * patch)
    return size


def fit_to_grid(images: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """Centre-crop or zero-pad N x C x H x W to ``target_hw`` (zero = the mean, after normalisation)."""
    height, width = images.shape[-2:]
    th, tw = target_hw
    if (height, width) == (th, tw):
        return images
    if th <= height and tw <= width:
        top, left = (height - th) // 2, (width - tw) // 2
        return images[..., top : top + th, left : left + tw]
    pad_h, pad_w = max(th - height, 0), max(tw - width, 0)
    padded = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return fit_to_grid(padded, target_hw)
