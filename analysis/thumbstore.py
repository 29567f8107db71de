"""The thumbnail store: ``RUN/embeddings/thumbnails-<selection>.zarr``, one per run and selection, shared by every
checkpoint.

`analysis embed` makes a small RGB and IR thumbnail of each sample while it decodes the frames anyway (see
:mod:`analysis.thumbnails`); the explorer's atlases are packed from here (:mod:`analysis.atlas`). Nothing in it
depends on the weights, so the first embed of a run (any checkpoint) writes it and every later one reuses it.

Layout (Zarr v3). The store follows the embeddings' chunks: store chunk ``c`` holds the thumbnailed rows of
embedding chunk ``c`` (``chunk_rows`` rows), so the rank that embeds a chunk writes its thumbnails too and ranks never
share a chunk file. With at most ``max_thumbs`` of ``n`` rows thumbnailed (a seeded subset, :func:`seeded_rows`),
each store chunk has ``cap`` rows (the most any embedding chunk has), padded at its end:

- ``row`` [n_chunks x cap] int64: the embedding row of each store row, -1 for padding;
- ``key`` [n_chunks x cap] str: that row's sample key ("" for padding);
- ``rgb`` [n_chunks x cap, h, w, 3] uint8: the RGB thumbnail (the decoded evaluation frame, downscaled);
- ``ir`` [n_chunks x cap, h, w] uint8: the IR thumbnail, scaled per frame: 0 = the frame's min, 255 = its max;
- ``ir_range_c`` [n_chunks x cap, 2] float32: that (min, max) in degrees C (NaN when the frame has no finite pixel);
- ``done`` [n_chunks] uint8: chunk c is written (set after its rows, as in the embedding store).

``attrs["identity"]`` is what the pixels depend on: the selection's fingerprint, the thumbnail settings, the chunk
layout and the data settings that change the decoded frame (:func:`thumbnail_identity`); ``attrs["complete"]`` is
set last by rank 0. No torch here: the report reads the store without it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from analysis.store import CompleteStore, open_complete_group, seeded_rows

__all__ = ["ThumbLayout", "ThumbnailStore", "thumb_layout", "thumbnail_identity", "create_thumbnail_store",
           "open_thumbnails", "thumbnail_path", "THUMBS_VERSION"]

# Bumped when what the pixels are made of changes (the scaling, the downscale), so older stores are made anew.
THUMBS_VERSION = 1


def thumbnail_path(run_root: Path, selection_sha: str) -> Path:
    """The store of one selection (named by its fingerprint): embedding another --where makes its own store beside
    this one instead of replacing it."""
    return Path(run_root) / "embeddings" / f"thumbnails-{selection_sha[:16]}.zarr"


@dataclass(frozen=True)
class ThumbLayout:
    """Which embedding rows have thumbnails and where each sits: store chunk c, rows [c x cap, c x cap + count)."""

    n: int  # embedding rows
    chunk_rows: int  # the embeddings' rows per chunk
    cap: int  # store rows per chunk
    rows: np.ndarray  # [n_chunks x cap] int64: embedding row of each store row, -1 = padding

    @property
    def n_chunks(self) -> int:
        return len(self.rows) // self.cap if self.cap else 0

    def chunk_rows_of(self, chunk: int) -> np.ndarray:
        """The embedding rows chunk ``chunk`` thumbnails, in order (its padding left out)."""
        part = self.rows[chunk * self.cap : (chunk + 1) * self.cap]
        return part[part >= 0]


def thumb_layout(n: int, chunk_rows: int, max_thumbs: int) -> ThumbLayout:
    """The layout of ``n`` rows in chunks of ``chunk_rows`` (the embeddings'), at most ``max_thumbs`` thumbnailed."""
    chosen, _ = seeded_rows(n, max_thumbs, 0)
    chunk_rows = max(min(chunk_rows, n), 1)
    n_chunks = -(-n // chunk_rows) if n else 0
    counts = np.bincount(chosen // chunk_rows, minlength=n_chunks) if n_chunks else np.zeros(0, dtype=np.int64)
    cap = max(int(counts.max()) if len(counts) else 0, 1)
    rows = np.full(n_chunks * cap, -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for c in range(n_chunks):
        rows[c * cap : c * cap + counts[c]] = chosen[starts[c] : starts[c + 1]]
    return ThumbLayout(n, chunk_rows, cap, rows)


def thumbnail_identity(selection_sha: str, chunk_rows: int, thumb_size: tuple[int, int], max_thumbs: int,
                       rgb_size: tuple[int, int], ir_size: tuple[int, int], ir_fill_c: float | None) -> str:
    """What the thumbnails depend on: the samples, the layout, the thumbnail settings, and the decoded frame (the
    evaluation view at the run's input sizes, NaN IR pixels filled with ``ir_fill_c``). The weights are not in it.
    Where the RGB was decoded (nvJPEG or the CPU) is not either: a pixel or so of difference in a thumbnail."""
    what = {"selection": selection_sha, "chunk_rows": chunk_rows, "thumb_size": list(thumb_size),
            "max_thumbs": max_thumbs, "rgb_size": list(rgb_size), "ir_size": list(ir_size), "ir_fill_c": ir_fill_c,
            "version": THUMBS_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def create_thumbnail_store(path: Path, keys: list[str], layout: ThumbLayout, thumb_size: tuple[int, int],
                           attrs: dict[str, Any]) -> None:
    """A fresh, incomplete store (an old one at ``path`` is replaced); rows, keys and layout written now."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = thumb_size
    total, cap = len(layout.rows), layout.cap
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("rgb", shape=(total, h, w, 3), dtype="uint8", chunks=(cap, h, w, 3), fill_value=0)
    group.create_array("ir", shape=(total, h, w), dtype="uint8", chunks=(cap, h, w), fill_value=0)
    group.create_array("ir_range_c", shape=(total, 2), dtype="float32", chunks=(cap, 2), fill_value=np.nan)
    group.create_array("row", shape=(total,), dtype="int64", chunks=(cap,), fill_value=-1)
    key_array = group.create_array("key", shape=(total,), dtype=str, chunks=(cap,))
    if total:
        group["row"][:] = layout.rows
        names = np.asarray(keys, dtype=object)
        key_array[:] = np.where(layout.rows >= 0, names[np.maximum(layout.rows, 0)] if len(names) else "", "")
    group.create_array("done", shape=(max(layout.n_chunks, 1),), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs.update({**attrs, "complete": False, "n": layout.n, "chunk_rows": layout.chunk_rows, "cap": cap,
                        "n_chunks": layout.n_chunks, "thumbnailed": int((layout.rows >= 0).sum()),
                        "thumb_size": list(thumb_size),
                        "ir_scaling": "per frame: 0 = the frame's min, 255 = its max (ir_range_c, degrees C)"})


def write_thumbnail_chunk(group, chunk: int, rgb: np.ndarray, ir: np.ndarray, ir_range_c: np.ndarray) -> None:
    """Chunk ``chunk``'s thumbnails (its rows in order, padding left out), then its done flag."""
    cap = int(group.attrs["cap"])
    rows = len(rgb)
    start = chunk * cap
    padded = [np.zeros((cap, *a.shape[1:]), dtype=a.dtype) for a in (rgb, ir)]
    ranges = np.full((cap, 2), np.nan, dtype=np.float32)
    padded[0][:rows], padded[1][:rows], ranges[:rows] = rgb, ir, ir_range_c
    group["rgb"][start : start + cap] = padded[0]
    group["ir"][start : start + cap] = padded[1]
    group["ir_range_c"][start : start + cap] = ranges
    group["done"][chunk] = 1  # after the rows: a chunk marked done is complete on disk


def layout_of(group) -> ThumbLayout:
    attrs = group.attrs
    return ThumbLayout(int(attrs["n"]), int(attrs["chunk_rows"]), int(attrs["cap"]), np.asarray(group["row"][:]))


@dataclass
class ThumbnailStore(CompleteStore):
    """A complete thumbnail store, read chunk by chunk."""

    @property
    def thumb_size(self) -> tuple[int, int]:
        h, w = self.group.attrs["thumb_size"]
        return int(h), int(w)

    def layout(self) -> ThumbLayout:
        return layout_of(self.group)

    def chunks(self):
        """(embedding rows, rgb [m, h, w, 3], ir [m, h, w], ir_range_c [m, 2]) of each chunk, padding left out."""
        layout = self.layout()
        for c in range(layout.n_chunks):
            rows = layout.chunk_rows_of(c)
            start = c * layout.cap
            stop = start + len(rows)
            yield rows, self.group["rgb"][start:stop], self.group["ir"][start:stop], self.group["ir_range_c"][start:stop]


def open_thumbnails(path: Path) -> ThumbnailStore:
    """A complete store; an absent, unreadable or unfinished one is an AnalysisError naming it."""
    return ThumbnailStore(path, open_complete_group(path, "thumbnails", "`analysis embed` with embed.thumbnails = true"))
