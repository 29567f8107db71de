"""Synthetic input for the embedding explorer (tests/test_explorer*.py and bench/explorer.py): blobs of points,
catalog-like columns and thumbnail atlases whose every cell has a known colour, so a test can check that the page
shows the right sample's thumbnails by their pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.explorer import ExplorerLink, ExplorerMap, Thumbnails

NODES = ("W01A", "W02B", "W07C", "W0A9")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Synthetic:
    """What write_explorer takes, plus the truth the tests check against."""

    keys: list[str]
    columns: dict[str, np.ndarray]
    maps: list[ExplorerMap]
    links: list[ExplorerLink]
    thumbnails: Thumbnails
    blob: np.ndarray  # [n] which blob of the maps each sample is in
    centres: np.ndarray  # [k, 2] the blobs' centres


def rgb_colours(rows: np.ndarray) -> np.ndarray:
    """[len(rows), 3] uint8: the solid colour of each sample's RGB thumbnail (distinct for nearby rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    return np.stack([(rows * 37) % 200 + 40, (rows * 91) % 200 + 40, (rows * 53 + 100) % 200 + 40],
                    axis=1).astype(np.uint8)


def ir_greys(rows: np.ndarray) -> np.ndarray:
    """[len(rows)] uint8: the grey of each sample's IR thumbnail."""
    return ((np.asarray(rows, dtype=np.int64) * 29) % 180 + 40).astype(np.uint8)


def write_atlases(out_dir: Path, n: int, cell: tuple[int, int] = (32, 24), per_row: int = 8,
                  per_atlas: int = 4096, textured: bool = False, quality: int | None = None,
                  cells: int | None = None) -> Thumbnails:
    """Atlases of `cells` (default n) cells: RGB thumb solid rgb_colours(i) | IR thumb solid ir_greys(i); textured
    adds a gradient and noise (for realistic WebP sizes and decode times). Samples beyond `cells` share cell
    i % cells. quality None = lossless WebP (exact colours)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = n if cells is None else cells
    w, h = cell
    paths = []
    for first in range(0, cells, per_atlas):
        rows = np.arange(first, min(cells, first + per_atlas))
        path = out_dir / f"atlas-{len(paths):04d}.webp"
        image = _atlas_image(rows, cell, per_row, textured, seed=len(paths))
        image.save(path, lossless=quality is None, quality=quality or 100, method=0 if textured else 4)
        paths.append(path)
    sample_cell = np.arange(n) % cells
    ir_range = np.stack([10 + (np.arange(n) % 7), 25 + (np.arange(n) % 5)], axis=1).astype(np.float32)
    return Thumbnails(atlases=paths, cell=cell, per_row=per_row, atlas=(sample_cell // per_atlas).astype(np.int32),
                      slot=(sample_cell % per_atlas).astype(np.int32), ir_range_c=ir_range)


def _atlas_image(rows: np.ndarray, cell: tuple[int, int], per_row: int, textured: bool, seed: int) -> Image.Image:
    w, h = cell
    lines = math.ceil(len(rows) / per_row)
    grid = np.zeros((lines * per_row, h, 2 * w, 3), dtype=np.uint8)
    grid[: len(rows), :, :w] = rgb_colours(rows)[:, None, None, :]
    grid[: len(rows), :, w:] = ir_greys(rows)[:, None, None, None]
    if textured:
        rng = np.random.default_rng(seed)
        ramp = np.linspace(-40, 40, h, dtype=np.float32)[None, :, None, None]
        grid = np.clip(grid + ramp + rng.normal(0, 6, grid.shape).astype(np.float32), 0, 255).astype(np.uint8)
    image = grid.reshape(lines, per_row, h, 2 * w, 3).transpose(0, 2, 1, 3, 4).reshape(lines * h, per_row * 2 * w, 3)
    return Image.fromarray(image)


def blobs(n: int, k: int, seed: int, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n points in k round blobs on a circle of radius 10 (far apart), blob i holding samples i, i+k, ...:
    (xy [n, 2] float32, blob [n], centres [k, 2])."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(k) / k
    centres = 10 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    blob = np.arange(n) % k
    xy = centres[blob] + rng.normal(0, spread, (n, 2))
    return xy.astype(np.float32), blob, centres


def columns(n: int, blob: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Catalog-like columns: strings, a bool, a numeric hour, a few-valued month, a cluster id (= blob), a float
    with missing values."""
    rng = np.random.default_rng(seed)
    hour = (np.arange(n) * 7) % 24
    ir_mean = rng.normal(15, 8, n).astype(np.float32)
    ir_mean[::17] = np.nan
    return {
        "node": np.array(NODES, dtype=object)[blob % len(NODES)],
        "split": np.array(SPLITS, dtype=object)[np.arange(n) % len(SPLITS)],
        "is_day": (hour >= 7) & (hour < 19),
        "local_hour": hour.astype(np.int64),
        "month": (np.arange(n) % 3 + 4).astype(np.int64),
        "ir_mean_c": ir_mean,
        "cluster": blob.astype(np.int64),
    }


def synthetic(out_dir: Path, n: int, k: int = 5, seed: int = 0, spread: float = 0.6, **atlas_options) -> Synthetic:
    """n samples in k blobs: a joint map (every sample), a subset map (every other sample, other blob layout), a
    link map (RGB points in blobs, IR points shifted right), atlases under out_dir."""
    xy, blob, centres = blobs(n, k, seed, spread)
    keys = [f"W0{blob[i] % 4}-2024-0{1 + i % 9}-{i:07d}" for i in range(n)]
    subset = np.arange(0, n, 2)
    sub_xy, _, _ = blobs(len(subset), 3, seed + 1)
    maps = [ExplorerMap("t-SNE joint", xy, np.arange(n)), ExplorerMap("PCA RGB (every other)", sub_xy, subset)]
    links = [ExplorerLink("RGB↔IR link", xy, (xy + np.float32([25, 0])).astype(np.float32), np.arange(n))]
    thumbnails = write_atlases(out_dir / "atlases", n, **atlas_options)
    return Synthetic(keys, columns(n, blob, seed), maps, links, thumbnails, blob, centres)
