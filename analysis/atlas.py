"""The explorer's thumbnail atlases: the run's thumbnails packed into WebP images, in the order of a map.

Each atlas is a grid of ``PER_ROW`` x ``ROWS`` cells; a cell is a sample's RGB thumbnail and its IR thumbnail side by
side (IR false-coloured with matplotlib's ``inferno``: black = the frame's min, pale yellow = its max, the range in
``ir_range_c``). Samples go into cells in the Hilbert order of a 2-D map (the t-SNE joint map, else the PCA joint
map, :func:`atlas_order`), so points near each other on the map mostly share an atlas and a zoomed view loads few.

Atlases are cached in ``RUN/analysis/<checkpoint>/atlas/`` beside ``atlas.json``, which records what they were made
from (the thumbnail store's identity, the order, the settings); a report with nothing changed reuses them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.explorer import Thumbnails, replace_dir
from analysis.thumbstore import ThumbnailStore

__all__ = ["hilbert_index", "atlas_order", "pack_atlases", "ATLAS_VERSION", "PER_ROW", "ROWS"]

ATLAS_VERSION = 1  # bumped when the packing changes, so cached atlases are made anew
PER_ROW, ROWS = 16, 16  # cells per atlas row, rows per atlas: 256 cells, 2048 x 768 px at 64 x 48 thumbnails
QUALITY = 80  # WebP quality
HILBERT_BITS = 16


def hilbert_index(xy: np.ndarray, bits: int = HILBERT_BITS) -> np.ndarray:
    """Each point's distance along a Hilbert curve over the points' bounding square (int64; both axes scaled
    alike): points close on the curve are close on the map. Non-finite points come last."""
    xy = np.asarray(xy, dtype=np.float64)
    finite = np.isfinite(xy).all(axis=1)
    side = 1 << bits
    out = np.full(len(xy), side * side, dtype=np.int64)
    if not finite.any():
        return out
    points = xy[finite]
    low = points.min(axis=0)
    span = float((points.max(axis=0) - low).max()) or 1.0
    q = np.clip(np.rint((points - low) / span * (side - 1)), 0, side - 1).astype(np.int64)
    x, y = q[:, 0].copy(), q[:, 1].copy()
    d = np.zeros(len(q), dtype=np.int64)
    s = side >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        flip = ~ry & rx
        x = np.where(flip, side - 1 - x, x)
        y = np.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    out[finite] = d
    return out


def atlas_order(rows: np.ndarray, maps: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``rows`` (the thumbnailed samples, any order) in atlas order: those on the first map (its rows, its xy) in its Hilbert
    order, then those only on the next map in its, and so on; rows on no map last, in row order."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    placed = np.zeros(len(rows), dtype=bool)
    parts = []
    for map_rows, xy in maps:
        map_rows = np.asarray(map_rows, dtype=np.int64)
        index = np.minimum(np.searchsorted(rows, map_rows), max(len(rows) - 1, 0))
        keep = (rows[index] == map_rows) & ~placed[index] if len(rows) else np.zeros(len(map_rows), dtype=bool)
        index, curve = index[keep], hilbert_index(np.asarray(xy)[keep])
        index = index[np.argsort(curve, kind="stable")]
        placed[index] = True
        parts.append(rows[index])
    parts.append(rows[~placed])
    return np.concatenate(parts) if parts else rows


def pack_atlases(store: ThumbnailStore, n: int, maps: Sequence[tuple[np.ndarray, np.ndarray]], out_dir: Path,
                 log=print) -> Thumbnails:
    """The explorer's Thumbnails for ``n`` samples (the embeddings' rows) from a complete thumbnail store, packed in
    the order of ``maps`` (:func:`atlas_order`) into ``out_dir``, or the atlases already there when made from the
    same store, order and settings."""
    layout = store.layout()
    if layout.n != n:
        raise ValueError(f"{store.path}: thumbnails of {layout.n} samples, the embeddings have {n}")
    order = atlas_order(np.sort(layout.rows[layout.rows >= 0]), maps)
    h, w = store.thumb_size
    identity = _identity(store.identity, order, (h, w))
    manifest = out_dir / "atlas.json"
    cached = _cached(manifest, identity, out_dir)
    if cached is not None:
        return cached
    per_atlas = PER_ROW * ROWS
    position = np.full(n, -1, dtype=np.int64)
    position[order] = np.arange(len(order))
    atlas = np.where(position >= 0, position // per_atlas, -1).astype(np.int32)
    slot = np.where(position >= 0, position % per_atlas, -1).astype(np.int32)
    ranges = np.full((n, 2), np.nan, dtype=np.float32)
    count = -(-len(order) // per_atlas)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The atlases' pixels on disk, not in memory: 100k samples are 1.8 GB of cells, filled chunk by chunk of the
    # store in whatever atlas each sample lands in, then encoded one atlas at a time.
    canvas = np.lib.format.open_memmap(tmp / "canvas.npy", mode="w+", dtype=np.uint8,
                                       shape=(max(count, 1), ROWS * h, PER_ROW * 2 * w, 3))
    lut = _inferno()
    for rows, rgb, ir, ir_range in store.chunks():
        ranges[rows] = ir_range
        for row, rgb_thumb, ir_thumb in zip(rows, rgb, ir):
            y, x = divmod(int(slot[row]), PER_ROW)
            cell = canvas[atlas[row], y * h : (y + 1) * h, x * 2 * w : (x + 1) * 2 * w]
            cell[:, :w] = rgb_thumb
            cell[:, w:] = lut[ir_thumb]
    names = []
    for a in range(count):
        used_rows = -(-min(per_atlas, len(order) - a * per_atlas) // PER_ROW)
        name = f"atlas_{a:05d}.webp"
        Image.fromarray(np.asarray(canvas[a, : used_rows * h])).save(tmp / name, "WEBP", quality=QUALITY, method=4)
        names.append(name)
    del canvas
    (tmp / "canvas.npy").unlink()
    np.savez(tmp / "index.npz", atlas=atlas, slot=slot, ir_range_c=ranges)
    (tmp / "atlas.json").write_text(json.dumps({"identity": identity, "atlases": names, "cell": [w, h],
                                                "per_row": PER_ROW, "version": ATLAS_VERSION}) + "\n")
    replace_dir(tmp, out_dir)
    size = sum((out_dir / name).stat().st_size for name in names)
    log(f"atlas: {len(order):,} thumbnails in {count} atlas(es) of {per_atlas} cells, {size / 1e6:.1f} MB "
        f"({size / max(len(order), 1) / 1e3:.1f} kB a sample) in {out_dir}")
    return _thumbnails(out_dir, names, (w, h), atlas, slot, ranges)


def _identity(store_identity: str, order: np.ndarray, size: tuple[int, int]) -> str:
    digest = hashlib.sha256(json.dumps({"store": store_identity, "size": list(size), "per_row": PER_ROW,
                                        "rows": ROWS, "quality": QUALITY, "version": ATLAS_VERSION}).encode())
    digest.update(np.ascontiguousarray(order, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _cached(manifest: Path, identity: str, out_dir: Path) -> Thumbnails | None:
    """The atlases in ``out_dir`` when ``atlas.json`` says they were made with this identity and all are there."""
    try:
        record = json.loads(manifest.read_text())
        if record.get("identity") != identity or not all((out_dir / name).exists() for name in record["atlases"]):
            return None
        with np.load(out_dir / "index.npz") as index:
            return _thumbnails(out_dir, record["atlases"], tuple(record["cell"]), index["atlas"], index["slot"],
                               index["ir_range_c"])
    except (OSError, ValueError, KeyError):
        return None


def _thumbnails(out_dir: Path, names: list[str], cell: tuple[int, int], atlas, slot, ranges) -> Thumbnails:
    return Thumbnails(atlases=[out_dir / name for name in names], cell=(int(cell[0]), int(cell[1])), per_row=PER_ROW,
                      atlas=np.asarray(atlas, dtype=np.int32), slot=np.asarray(slot, dtype=np.int32),
                      ir_range_c=np.asarray(ranges, dtype=np.float32))


def _inferno() -> np.ndarray:
    """matplotlib's inferno as a 256 x 3 uint8 lookup table."""
    # matplotlib here, only when atlases are made: importing it costs 0.4 s (`python -X importtime`) that a report
    # whose atlases are cached does not need.
    from matplotlib import colormaps

    return (colormaps["inferno"](np.arange(256))[:, :3] * 255).round().astype(np.uint8)
