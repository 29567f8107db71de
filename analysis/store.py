"""Embeddings in Zarr v3, and the small result files every analysis step writes.

``RUN/embeddings/<checkpoint>.zarr`` is a group with arrays ``rgb`` and ``ir`` [N, D] float32 (backbone output),
``rgb_z`` and ``ir_z`` [N, E] (optional: VICReg's expander output, float16; a DINO run's teacher-head bottleneck,
L2-normalised, float32, with its ``rgb_prototypes`` / ``ir_prototypes`` [K, E] and ``centre_<a>_to_<b>`` [K] per
direction for :func:`analysis.knn.dino_retrieval_rows`), ``key`` [N] in catalog order, and ``done``
[number of chunks] uint8 (chunk c's rows are written). Arrays are chunked by ``chunk_rows`` rows, and a rank only
ever writes whole chunks of its own, so ranks never share a chunk file. ``attrs["complete"]`` is set last, by
rank 0, after every rank has finished: readers refuse a store without it.

This module imports no torch: PCA of a million rows runs in processes without it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import zarr

from analysis.runs import AnalysisError

__all__ = ["Embeddings", "open_embeddings", "create_embedding_store", "SPACES", "write_json", "read_json",
           "is_fresh", "write_parquet", "pyplot", "save_figure", "seeded_rows"]

SPACES = ("rgb", "ir", "joint")  # joint: the two backbone embeddings side by side


def create_embedding_store(path: Path, keys: list[str], dims: dict[str, tuple[int, str]], chunk_rows: int,
                           attrs: dict[str, Any], whole: dict[str, np.ndarray] | None = None) -> None:
    """A fresh, incomplete store (an old one at ``path`` is replaced). ``whole``: arrays that are not per sample
    (a DINO run's prototypes and centres), written here at once."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(keys)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    rows = max(min(chunk_rows, n), 1)
    for name, (dim, dtype) in dims.items():
        group.create_array(name, shape=(n, dim), dtype=dtype, chunks=(rows, dim), fill_value=0,
                           dimension_names=("sample", "feature"))
    key_array = group.create_array("key", shape=(n,), dtype=str, chunks=(rows,), dimension_names=("sample",))
    if n:
        key_array[:] = np.asarray(keys, dtype=str)
    for name, values in (whole or {}).items():
        group.create_array(name, data=np.ascontiguousarray(values))
    n_chunks = -(-n // rows) if n else 0
    group.create_array("done", shape=(max(n_chunks, 1),), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs.update({**attrs, "complete": False, "chunk_rows": rows, "n": n, "n_chunks": n_chunks})


@dataclass
class CompleteStore:
    """A complete Zarr store written chunk by chunk by any number of ranks (embeddings, thumbnails)."""

    path: Path
    group: Any

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def identity(self) -> str:
        return str(self.group.attrs["identity"])


def open_complete_group(path: Path, what: str, made_by: str):
    """The Zarr group at ``path`` when it is there and marked complete, else an AnalysisError naming it (``what``:
    "embeddings", ...; ``made_by``: the command that writes it)."""
    if not path.exists():
        raise AnalysisError(f"{path}: no {what} (run {made_by} first)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001
        raise AnalysisError(f"{path}: not a Zarr {what} store ({type(exc).__name__}: {exc})") from None
    if not group.attrs.get("complete"):
        raise AnalysisError(f"{path}: incomplete (an embed was interrupted); run `analysis embed` again to finish it")
    return group


@dataclass
class Embeddings(CompleteStore):
    """A complete embedding store, read chunk by chunk."""

    @property
    def n(self) -> int:
        return int(self.group.attrs["n"])

    @property
    def chunk_rows(self) -> int:
        return int(self.group.attrs["chunk_rows"])

    @property
    def checkpoint(self) -> str:
        return str(self.group.attrs["checkpoint"])

    def has(self, name: str) -> bool:
        return name in self.group.array_keys()

    def keys(self) -> np.ndarray:
        return np.asarray(self.group["key"][:], dtype=object)

    def dim(self, space: str) -> int:
        if space == "joint":
            return self.dim("rgb") + self.dim("ir")
        return int(self.group[space].shape[1])

    def chunk_starts(self) -> range:
        return range(0, self.n, self.chunk_rows)

    def block(self, space: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a space as float32 (joint: rgb and ir side by side)."""
        if space == "joint":
            return np.concatenate([self.block("rgb", start, stop), self.block("ir", start, stop)], axis=1)
        if not self.has(space):
            raise AnalysisError(f"{self.path}: has no {space!r} array (embedded with embed.projections = false?)")
        return np.asarray(self.group[space][start:stop], dtype=np.float32)

    def chunks(self, space: str, starts: range | list[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for start in self.chunk_starts() if starts is None else starts:
            yield start, self.block(space, start, min(start + self.chunk_rows, self.n))

    def rows(self, space: str, index: np.ndarray) -> np.ndarray:
        """The rows at sorted indices ``index``, read chunk by chunk (memory: the rows asked for plus one chunk)."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.dim(space)), dtype=np.float32)
        if not len(index):
            return out
        chunk = self.chunk_rows
        bounds = np.searchsorted(index, np.arange(0, self.n + chunk, chunk))
        for c in range(len(bounds) - 1):
            lo, hi = bounds[c], bounds[c + 1]
            if lo == hi:
                continue
            start = c * chunk
            block = self.block(space, start, min(start + chunk, self.n))
            out[lo:hi] = block[index[lo:hi] - start]
        return out


def open_embeddings(path: Path) -> Embeddings:
    return Embeddings(path, open_complete_group(path, "embeddings", "`analysis embed`"))


def seeded_rows(n: int, m: int, seed: int) -> tuple[np.ndarray, bool]:
    """(sorted int64 rows, sampled): every row of ``n`` up to ``m``, else a seeded random ``m`` of them. t-SNE's
    points and the thumbnailed samples are both drawn by it, so with the same seed and cap they are the same rows."""
    if n <= m:
        return np.arange(n, dtype=np.int64), False
    return np.sort(np.random.default_rng([seed, 0]).choice(n, m, replace=False)).astype(np.int64), True


# -- result files ----------------------------------------------------------------------------------------

def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_plain) + "\n")
    os.replace(tmp, path)


def write_parquet(table, path: Path) -> None:
    """A pyarrow table to Parquet, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    # matplotlib here, at the first figure, not when analysis.store is imported: choosing the backend is a
    # process-wide setting that must come before pyplot's import (an interactive session that imports analysis keeps
    # its own until it draws through us), and pyplot costs 0.5-0.7 s of start-up that embed, and PCA's ranks but
    # rank 0, do not need: they draw nothing.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Save a figure atomically (a reader never sees half a PNG) and close it."""
    tmp = path.with_name(path.stem + ".tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_fresh(path: Path, identity: str) -> bool:
    """A result file exists and was computed from the embeddings with this identity."""
    data = read_json(path)
    return data is not None and data.get("embeddings") == identity


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
