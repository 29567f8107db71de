"""Configuration of `ingest build-shards` (TOML file `--config ingest.toml`, then command-line flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CropBox", "SplitFractions", "IngestConfig", "KONZA_CROP"]


@dataclass(frozen=True)
class CropBox:
    """The thermal field of view inside the optical half, as fractions of that half's width and height.

    Defaults: the Konza alignment (sage-format.md): crop top 215, bottom 240, left 685, right 445 px of the
    3072x2048 optical half.
    """

    left: float = 685 / 3072
    top: float = 215 / 2048
    right: float = 1 - 445 / 3072
    bottom: float = 1 - 240 / 2048

    def __post_init__(self) -> None:
        if not (0 <= self.left < self.right <= 1 and 0 <= self.top < self.bottom <= 1):
            raise ValueError(f"crop box must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1, got {self}")


KONZA_CROP = CropBox()


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of (VSN, UTC date) groups that fall into each split; they must sum to 1."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        if min(self.train, self.val, self.test) < 0 or abs(self.train + self.val + self.test - 1) > 1e-9:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self}")


@dataclass(frozen=True)
class IngestConfig:
    """Everything that decides what `ingest build-shards` writes.

    Changing any field changes the shards written from then on; committed shards are never rewritten.
    """

    crop: CropBox = field(default_factory=CropBox)
    rgb_scale: int = 2  # RGB output = rgb_scale x the thermal grid (2: a patch-16 RGB ViT sees the patch-8 IR token grid)
    rgb_size: tuple[int, int] | None = None  # explicit (width, height) of the RGB output; overrides rgb_scale
    jpeg_quality: int = 90
    resample: str = "bicubic"  # PIL filter for the antialiased resize: bilinear, bicubic or lanczos
    min_celsius: float = -100.0  # values outside [min_celsius, max_celsius] reject the frame as out_of_range
    max_celsius: float = 700.0
    max_nan_fraction: float = 0.5  # more NaN pixels than this rejects the frame as too_many_nan
    shard_prefix: str = "sage"
    shard_target_mb: float = 64.0  # a shard is closed before a sample would take it past this size
    workers: int = 0  # 0: all cores
    split: SplitFractions = field(default_factory=SplitFractions)

    def __post_init__(self) -> None:
        if self.rgb_scale < 1:
            raise ValueError(f"rgb_scale must be >= 1, got {self.rgb_scale}")
        if self.rgb_size is not None and min(self.rgb_size) < 8:
            raise ValueError(f"rgb_size must be at least 8x8, got {self.rgb_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.resample not in ("bilinear", "bicubic", "lanczos"):
            raise ValueError(f"resample must be bilinear, bicubic or lanczos, got {self.resample!r}")
        if not self.min_celsius < self.max_celsius:
            raise ValueError("min_celsius must be below max_celsius")
        if not 0 <= self.max_nan_fraction <= 1:
            raise ValueError(f"max_nan_fraction must be in [0, 1], got {self.max_nan_fraction}")
        if not self.shard_prefix or not self.shard_prefix.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"shard_prefix must be letters, digits, - or _, got {self.shard_prefix!r}")
        if self.shard_target_mb <= 0:
            raise ValueError("shard_target_mb must be > 0")
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 = all cores)")

    def rgb_output_size(self, thermal_width: int, thermal_height: int) -> tuple[int, int]:
        """(width, height) of the RGB member for a thermal grid of the given size."""
        if self.rgb_size is not None:
            return self.rgb_size
        return thermal_width * self.rgb_scale, thermal_height * self.rgb_scale
