"""`analysis tsne`: 2-D openTSNE maps of the PCA features, coloured by catalog metadata, and a map that links each
sample's RGB and IR expander outputs.

openTSNE (FFT gradients, PCA initialisation, 500 normal iterations: its defaults; early exaggeration stops after
``FFT_EARLY_ITER`` iterations from ``FFT_EARLY_ITER_FROM`` points up, openTSNE's 250 below) runs on ``pca.zarr``'s
``<space>/features``, for ``joint``, ``rgb`` and ``ir``: every row up to ``tsne.max_points``, else one seeded random
sample of that many rows (the same rows for every space, so the maps are comparable). The k nearest neighbours
(k = 3 x perplexity, openTSNE's own rule) are exact, over every pair (:func:`analysis.neighbours.topk_neighbours`;
:func:`_neighbours` says why not pruned), and handed to openTSNE as ``PrecomputedNeighbors``: exact, and faster than
openTSNE's own Annoy index.

Most of an iteration is two terms: the repulsive FFT term, which openTSNE runs on one thread whatever n_jobs, and
the attractive term over P's nonzeros. Both release the GIL for most of their run, so
:class:`OverlappedFFTGradient` runs them at once. It calls openTSNE internals (``OPENTSNE_INTERNALS``), checked
when this module is imported and pinned by tests. Timings, and the settings measured and not kept:
bench/RESULTS.md, "2026-12-04 docstring figures moved here (analysis)".

Writes into the checkpoint's results directory:

- ``tsne.parquet``: key, space, row (index into the embeddings), x, y; one row per embedded sample and space.
- ``tsne_<space>.png``: one panel per metadata column (is_sky, is_day, vsn, position, split, month, cloud_class when
  the synthetic truth exists, hour_local).
- ``tsne_link.png``: up to ``tsne.link_pairs`` samples' L2-normalised ``rgb_z`` and ``ir_z`` rows stacked, PCA'd and
  embedded into one map; a thin line joins each sample's two points.
- ``tsne_link.parquet``: that map's coordinates (key, row, rgb_x, rgb_y, ir_x, ir_y), for the explorer.
- ``tsne.json`` (last, atomically): what was computed, from which embeddings, and how long it took.
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openTSNE
import pandas as pd
import pyarrow as pa
import torch
from matplotlib.collections import LineCollection
from openTSNE import TSNE
from openTSNE.affinity import PerplexityBasedNN
from openTSNE.nearest_neighbors import PrecomputedNeighbors
from sklearn.decomposition import PCA
from tqdm import tqdm

from analysis.config import TSNEConfig
from analysis.metadata import sample_metadata
from analysis.neighbours import l2_normalise, topk_neighbours
from analysis.pca import open_pca
from analysis.results import TSNELink, TSNEResult, TSNESettings, TSNESpace, result_json, write_result
from analysis.runs import AnalysisError
from analysis.store import Embeddings, pyplot, save_figure, seeded_rows, write_parquet

__all__ = ["tsne_embed", "run_tsne", "link_distances", "plot_space", "TSNE_SPACES", "PANEL_COLUMNS"]

TSNE_SPACES = ("joint", "rgb", "ir")  # the order maps are made in
PANEL_COLUMNS = ("is_sky", "is_day", "vsn", "position", "split", "month", "cloud_class", "hour_local")
EARLY_EXAGGERATION_ITER = 250  # openTSNE's defaults
N_ITER = 500
# From FFT_EARLY_ITER_FROM points up, early exaggeration stops after FFT_EARLY_ITER iterations instead of 250: on the
# bench's 100k blobs the KL divergence after the 500 normal iterations was the same (2.2775 against 2.2773 after 250;
# 2.2806 after 75) and so was the map's nearest-point figure (96.8%), while an early iteration costs ~0.15 s there
# (mostly the attractive, sparse-P term; the map is small, so is the FFT grid): 125 fewer saved 20 s. The automatic
# learning rate N / 12 is what lets the early phase be this short (Belkina et al. 2019, Nature Communications;
# openTSNE uses it).
FFT_EARLY_ITER, FFT_EARLY_ITER_FROM = 125, 10_000
MAX_LEGEND = 20  # categories named in a legend; the rest are drawn but summarised as "+N more"
# Below this many points openTSNE runs on one thread whatever n_jobs says: an iteration is then a few ms of work, and
# two threads that must meet at every iteration's barrier were measured 2-50x slower on a loaded 2-core machine
# (106 points: 0.7 s on one thread, 8-33 s on two).
SERIAL_BELOW = 10_000


# -- openTSNE internals ---------------------------------------------------------------------------------------

# What OverlappedFFTGradient calls that is not openTSNE's public API (written against openTSNE 1.0.x): name under
# ``openTSNE.`` -> (parameters it passes by position, in this order; parameters it passes by keyword), or None for a
# constant. Checked when this module is imported, and their results pinned by tests/test_analysis_tsne.py.
OPENTSNE_INTERNALS: dict[str, tuple[tuple[str, ...], tuple[str, ...]] | None] = {
    "_tsne.estimate_negative_gradient_fft_2d": (
        ("embedding", "gradient"), ("n_interpolation_points", "min_num_intervals", "ints_in_interval", "dof")),
    "_tsne.estimate_positive_gradient_nn": (
        ("indices", "indptr", "P_data", "embedding", "reference_embedding", "gradient", "dof"),
        ("num_threads", "should_eval_error")),
    "tsne.kl_divergence_fft": (
        ("embedding", "P", "dof", "fft_params", "reference_embedding", "should_eval_error"), ("n_jobs",)),
    "tsne.EPSILON": None,
}


def _opentsne_internals() -> dict:
    """name -> object of every ``OPENTSNE_INTERNALS`` entry; ImportError naming openTSNE's version when one is
    missing or does not take the parameters OverlappedFFTGradient passes."""
    found, problems = {}, []
    for name, params in OPENTSNE_INTERNALS.items():
        module, attribute = name.rsplit(".", 1)
        try:
            found[name] = value = getattr(importlib.import_module(f"openTSNE.{module}"), attribute)
        except (ImportError, AttributeError):
            problems.append(f"openTSNE.{name} is missing")
            continue
        if params is None:
            continue
        positional, keywords = params
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError):
            problems.append(f"openTSNE.{name} has no signature to check")
            continue
        names = list(signature.parameters)
        if names[: len(positional)] != list(positional) or not set(keywords) <= set(names):
            problems.append(f"openTSNE.{name}{signature} does not take ({', '.join(positional)}, ..., "
                            f"{'=, '.join(keywords)}=)")
    if problems:
        raise ImportError(f"analysis.tsne: openTSNE {getattr(openTSNE, '__version__', '(version unknown)')} is not "
                          f"the openTSNE 1.0.x whose internals OverlappedFFTGradient calls: {'; '.join(problems)}. "
                          "Install openTSNE 1.0.x, or update OverlappedFFTGradient and OPENTSNE_INTERNALS to it.")
    return found


_INTERNALS = _opentsne_internals()
_negative_gradient_fft_2d = _INTERNALS["_tsne.estimate_negative_gradient_fft_2d"]
_positive_gradient_nn = _INTERNALS["_tsne.estimate_positive_gradient_nn"]
_kl_divergence_fft = _INTERNALS["tsne.kl_divergence_fft"]
_EPSILON = _INTERNALS["tsne.EPSILON"]


# -- t-SNE -----------------------------------------------------------------------------------------------------

def _openmp_jobs(n_jobs: int) -> int:
    """The project's n_jobs (0 = every core) as openTSNE's (-1 = every core)."""
    return -1 if n_jobs <= 0 else int(n_jobs)


class OverlappedFFTGradient:
    """openTSNE's FFT objective (``kl_divergence_fft``) with its two halves at once: the repulsive term, which openTSNE
    runs on one thread whatever n_jobs, on a second Python thread, while the attractive term over P's nonzeros uses
    the other ``n_jobs - 1`` threads. openTSNE runs them one after the other, so on 2 cores one core idles through
    the repulsive term. The attractive term releases the GIL; the repulsive one holds it for about half its run,
    which the attractive term does not need.

    A callable objective is openTSNE's own extension point (``negative_gradient_method``); this one computes the same
    gradient and KL divergence, summed in another order (the tests compare it with openTSNE's to 1e-12). It makes
    maps only: adding points to a map (``transform``) needs the interpolation grid openTSNE prepares for its own
    objective alone, so that raises here.
    """

    def __init__(self, n_jobs: int):
        self.n_jobs = max(int(n_jobs), 1)
        self.attractive_threads = max(self.n_jobs - 1, 1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsne-repulsive")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __call__(self, embedding, P, dof, fft_params, reference_embedding=None, should_eval_error=False, **_):
        if reference_embedding is not None:
            raise ValueError("OverlappedFFTGradient makes maps; add points to one with openTSNE's own 'fft' objective")
        if embedding.ndim != 2 or embedding.shape[1] != 2:  # not a 2-D map: openTSNE's own, in sequence
            return _kl_divergence_fft(embedding, P, dof, fft_params, None, should_eval_error, n_jobs=self.n_jobs)
        repulsive = np.zeros_like(embedding, dtype=np.float64, order="C")
        attractive = np.zeros_like(embedding, dtype=np.float64, order="C")
        sum_q = self._pool.submit(_negative_gradient_fft_2d, embedding, repulsive, **fft_params, dof=dof)
        sum_p, kl_divergence = _positive_gradient_nn(
            P.indices, P.indptr, P.data, embedding, embedding, attractive, dof,
            num_threads=self.attractive_threads, should_eval_error=should_eval_error)
        sum_q = sum_q.result()
        if should_eval_error:
            kl_divergence += sum_p * np.log(sum_q + _EPSILON)
        repulsive += attractive
        return kl_divergence, repulsive


def _neighbours(x: np.ndarray, k: int, n_jobs: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact euclidean kNN of every row among the others: (indices, distances float64, details), n x k, nearest
    first: :func:`analysis.neighbours.topk_neighbours` over every pair.

    Every pair, not :func:`analysis.neighbours.pruned_neighbours`: in 50-d PCA features nearby clusters are within
    reach of each other, so pruning still reads a large share of the pairs, is slower than every pair, and where it
    gives up its probe is time lost.
    """
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n_jobs if n_jobs > 0 else threads)
        distances, indices = topk_neighbours(x, x, k, metric="euclidean", exclude_self=True,
                                             query_chunk=int(np.clip((1 << 26) // max(len(x), 1), 64, 4096)))
    finally:
        torch.set_num_threads(threads)
    return indices, distances.astype(np.float64), {"knn_method": "all pairs"}


def _embed(features: np.ndarray, perplexity: float, n_jobs: int, seed: int, progress: str | None = None,
           knn: str = "exact") -> tuple[np.ndarray, dict]:
    """(n x 2 map, details: effective perplexity, k, seconds per stage, final KL divergence)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D, got shape {x.shape}")
    if perplexity <= 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity}")
    if n < 4:  # nothing to lay out: a line, so a caller never special-cases a tiny selection
        return np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)]), {
            "perplexity": None, "k": 0, "early_exaggeration_iter": 0, "n_iter": 0, "knn_seconds": 0.0,
            "affinity_seconds": 0.0, "optimise_seconds": 0.0, "kl_divergence": None}
    # openTSNE's rule, k = 3 x perplexity, clipped so that a small n keeps k < n and perplexity <= k / 3.
    k = max(min(n - 1, int(3 * perplexity)), 1)
    perplexity = min(float(perplexity), k / 3)
    if n < SERIAL_BELOW:
        n_jobs = 1
    jobs = _openmp_jobs(n_jobs)
    early_iter = FFT_EARLY_ITER if n >= FFT_EARLY_ITER_FROM else EARLY_EXAGGERATION_ITER
    bar, overlapped = None, None
    if progress:
        bar = tqdm(total=early_iter + N_ITER, desc=progress, unit="it", dynamic_ncols=True)
        bar.set_postfix_str(f"{k}-NN of {n}")
    try:
        t0 = time.perf_counter()
        knn_details = {}
        if knn == "exact":
            indices, distances, knn_details = _neighbours(x, k, n_jobs)
            t1 = time.perf_counter()
            affinities = PerplexityBasedNN(perplexity=perplexity, n_jobs=jobs, random_state=seed,
                                           knn_index=PrecomputedNeighbors(indices, distances))
        elif knn == "annoy":  # openTSNE's own approximate index (kept for comparisons)
            affinities = PerplexityBasedNN(x, perplexity=perplexity, method="annoy", k_neighbors=k, n_jobs=jobs,
                                           random_state=seed)
            t1 = time.perf_counter()  # index and affinities are one call here: all counted as kNN
        else:
            raise ValueError(f"knn must be 'exact' or 'annoy', got {knn!r}")
        t2 = time.perf_counter()
        if bar is not None:
            bar.set_postfix_str("optimising")
        callbacks, every = None, 50
        if bar is not None:
            def tick(iteration, error, embedding):  # noqa: ARG001 - openTSNE's callback signature
                bar.update(min(every, bar.total - bar.n))
                return False

            callbacks = [tick]
        # With two threads or more (so from SERIAL_BELOW points up, where openTSNE picks its FFT objective), that
        # objective with its halves overlapped.
        threads = n_jobs if n_jobs > 0 else os.cpu_count() or 1
        overlapped = OverlappedFFTGradient(threads) if threads > 1 else None
        tsne = TSNE(n_components=2, perplexity=perplexity, early_exaggeration_iter=early_iter,
                    n_iter=N_ITER, initialization="pca", n_jobs=jobs, random_state=seed, callbacks=callbacks,
                    callbacks_every_iters=every, verbose=False,
                    negative_gradient_method=overlapped if overlapped is not None else "auto")
        embedding = tsne.fit(x, affinities=affinities)
        t3 = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
        if overlapped is not None:
            overlapped.close()
    details = {"perplexity": perplexity, "k": k, "knn": knn, **knn_details, "early_exaggeration_iter": early_iter,
               "n_iter": N_ITER, "overlapped_gradient": overlapped is not None, "knn_seconds": round(t1 - t0, 2),
               "affinity_seconds": round(t2 - t1, 2), "optimise_seconds": round(t3 - t2, 2),
               "kl_divergence": float(embedding.kl_divergence) if embedding.kl_divergence is not None else None}
    return np.asarray(embedding, dtype=np.float32), details


def tsne_embed(features: np.ndarray, perplexity: float = 30.0, n_jobs: int = 0, seed: int = 0, *,
               progress: str | None = None) -> np.ndarray:
    """openTSNE map of ``features`` (n x d), n x 2 float32.

    openTSNE's defaults (FFT or Barnes-Hut by size, 250 + 500 iterations, PCA initialisation; 125 early iterations
    from ``FFT_EARLY_ITER_FROM`` points up) on exact k = 3 x perplexity neighbours; the perplexity is lowered to
    (n - 1) / 3 for small n. ``n_jobs`` 0: every core. ``progress``: a tqdm bar with this description.
    """
    return _embed(features, perplexity, n_jobs, seed, progress)[0]


# -- the link map ----------------------------------------------------------------------------------------------

def link_distances(first: np.ndarray, second: np.ndarray, chunk: int = 1024) -> dict:
    """Pair i is (first[i], second[i]) in one 2-D map: mean pair distance against the mean over every non-pair
    (first[i], second[j]), j != i; and how often first[i]'s nearest point of ``second`` is its own partner."""
    m = len(first)
    if m < 2:
        raise ValueError("need at least two pairs")
    pair = np.linalg.norm(first - second, axis=1)
    total, nearest = 0.0, 0
    for start in range(0, m, chunk):
        block = np.linalg.norm(first[start : start + chunk, None, :] - second[None, :, :], axis=2)
        total += float(block.sum()) - float(pair[start : start + chunk].sum())
        nearest += int((block.argmin(axis=1) == np.arange(start, start + len(block))).sum())
    random = total / (m * (m - 1))
    return {"pairs": m, "pair_distance": float(pair.mean()), "random_distance": random,
            "ratio": float(pair.mean()) / random if random > 0 else None,
            "pair_nearest": nearest / m, "pair_nearest_chance": 1 / m}


def _link_map(embeddings: Embeddings, config: TSNEConfig, seed: int, n_jobs: int, out: Path,
              progress: bool) -> tuple[dict | None, str | None]:
    """(summary, None), or (None, why the plot was skipped)."""
    missing = [name for name in ("rgb_z", "ir_z") if not embeddings.has(name)]
    if missing:
        return None, (f"no {' or '.join(missing)} in the embeddings (embedded with embed.projections = false): "
                      "no link map")
    if embeddings.n < 2 or config.link_pairs < 2:
        return None, "fewer than two pairs: no link map"
    m = min(config.link_pairs, embeddings.n)
    rows = np.sort(np.random.default_rng([seed, 1]).choice(embeddings.n, m, replace=False))
    rgb = l2_normalise(embeddings.rows("rgb_z", rows))
    ir = l2_normalise(embeddings.rows("ir_z", rows))
    if rgb.shape[1] != ir.shape[1]:
        return None, f"rgb_z has {rgb.shape[1]} dims and ir_z {ir.shape[1]}: not one space, no link map"
    stacked = np.concatenate([rgb, ir])
    components = min(50, stacked.shape[1], len(stacked) - 1)
    reduced = PCA(n_components=components, random_state=seed).fit_transform(stacked).astype(np.float32)
    t0 = time.perf_counter()
    mapped, details = _embed(reduced, config.perplexity, n_jobs, seed, "tsne link" if progress else None)
    summary = link_distances(mapped[:m], mapped[m:])
    summary.update({"pca_components": components, "perplexity": details["perplexity"],
                    "seconds": round(time.perf_counter() - t0, 2), "png": out.name})
    _plot_link(mapped[:m], mapped[m:], summary, out)
    coordinates = {f"{side}_{axis}": pa.array(np.ascontiguousarray(part[:, i]), type=pa.float32())
                   for side, part in (("rgb", mapped[:m]), ("ir", mapped[m:])) for i, axis in enumerate("xy")}
    write_parquet(pa.table({"key": pa.array(list(embeddings.keys()[rows]), type=pa.string()),
                            "row": pa.array(rows, type=pa.int64()), **coordinates}), out.with_suffix(".parquet"))
    return summary, None


# -- plots -----------------------------------------------------------------------------------------------------

def _marker_size(n: int) -> float:
    return float(np.clip(3000.0 / max(n, 1), 0.3, 12.0))


def _categories(values) -> tuple[list, np.ndarray]:
    """(category labels, most frequent first but months/booleans in their natural order; codes, -1 = missing)."""
    series = pd.Series(values, dtype=object)
    present = series.notna() & series.map(lambda v: not (isinstance(v, float) and np.isnan(v)))
    labels = series[present].map(_label)
    counts = labels.value_counts()
    uniques = list(counts.index)
    numeric = series[present].map(lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
    if len(uniques) and numeric.all():
        uniques = sorted(uniques, key=float)
    elif set(uniques) <= {"True", "False"}:
        uniques = [u for u in ("True", "False") if u in uniques]
    elif all(len(u) == 7 and u[4] == "-" for u in uniques):  # YYYY-MM: in time order
        uniques = sorted(uniques)
    lookup = {u: i for i, u in enumerate(uniques)}
    codes = np.full(len(series), -1, dtype=np.int64)
    codes[present.to_numpy()] = labels.map(lookup).to_numpy()
    return uniques, codes


def _label(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _category_colours(labels: list) -> list:
    plt = pyplot()
    if len(labels) <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i) for i in range(len(labels))]
    if len(labels) <= 20:
        cmap = plt.get_cmap("tab20")
        return [cmap(i) for i in range(len(labels))]
    cmap = plt.get_cmap("turbo")
    return [cmap(v) for v in np.linspace(0.05, 0.95, len(labels))]


def _panel(ax, xy: np.ndarray, values, column: str, order: np.ndarray, size: float) -> None:
    plt = pyplot()
    ax.set_title(column, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if column == "hour_local":
        hours = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
        missing = np.isnan(hours)
        if missing.any():
            ax.scatter(xy[missing, 0], xy[missing, 1], s=size, c="lightgrey", linewidths=0, rasterized=True)
        keep = order[~missing[order]]
        points = ax.scatter(xy[keep, 0], xy[keep, 1], s=size, c=hours[keep], cmap="twilight", vmin=0, vmax=24,
                            linewidths=0, rasterized=True)  # cyclic: 23 h sits next to 0 h
        bar = plt.colorbar(points, ax=ax, fraction=0.046, pad=0.02, ticks=[0, 6, 12, 18, 24])
        bar.ax.tick_params(labelsize=7)
        return
    labels, codes = _categories(values)
    colours = np.array(_category_colours(labels) + [(0.83, 0.83, 0.83, 1.0)])  # last: missing
    drawn = order  # shuffled, so that no category is always painted over the others
    ax.scatter(xy[drawn, 0], xy[drawn, 1], s=size, c=colours[codes[drawn]], linewidths=0, rasterized=True)
    handles = [plt.Line2D([], [], ls="", marker="o", ms=5, color=colours[i], label=str(label))
               for i, label in enumerate(labels[:MAX_LEGEND])]
    if (codes < 0).any():
        handles.append(plt.Line2D([], [], ls="", marker="o", ms=5, color=colours[-1], label="n/a"))
    if len(labels) > MAX_LEGEND:
        handles.append(plt.Line2D([], [], ls="", label=f"+{len(labels) - MAX_LEGEND} more"))
    ax.legend(handles=handles, fontsize=6, markerscale=0.8, loc="best", framealpha=0.7, borderpad=0.3,
              labelspacing=0.2, handletextpad=0.2, ncol=2 if len(handles) > 10 else 1)


def plot_space(xy: np.ndarray, metadata, space: str, out: Path, seed: int = 0, title: str = "") -> Path:
    """One panel per metadata column present (all points uncoloured when there is no metadata)."""
    plt = pyplot()
    columns = [c for c in PANEL_COLUMNS if metadata is not None and c in metadata.columns]
    n = len(xy)
    order = np.random.default_rng(seed).permutation(n)
    size = _marker_size(n)
    if not columns:
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.scatter(xy[order, 0], xy[order, 1], s=size, c="tab:blue", linewidths=0, rasterized=True)
        ax.set(xticks=[], yticks=[], title=f"t-SNE {space} (no catalog metadata)")
        fig.tight_layout()
        save_figure(fig, out, dpi=120)
        return out
    cols = 4 if len(columns) > 4 else len(columns)
    rows = -(-len(columns) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 4.2 * rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        _panel(ax, xy, metadata[column].tolist(), column, order, size)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle(title or f"t-SNE of the {space} PCA features ({n:,} samples)", fontsize=12)
    fig.tight_layout()
    save_figure(fig, out, dpi=120)
    return out


def _plot_link(rgb: np.ndarray, ir: np.ndarray, summary: dict, out: Path) -> Path:
    plt = pyplot()
    m = len(rgb)
    size = float(np.clip(2 * _marker_size(2 * m), 1.0, 14.0))
    fig, ax = plt.subplots(figsize=(7.5, 7.5))
    ax.add_collection(LineCollection(np.stack([rgb, ir], axis=1), colors="grey", linewidths=0.3,
                                     alpha=0.5 if m <= 1000 else 0.25, rasterized=True, zorder=1))
    ax.scatter(rgb[:, 0], rgb[:, 1], s=size, c="tab:red", linewidths=0, label="RGB", rasterized=True, zorder=2)
    ax.scatter(ir[:, 0], ir[:, 1], s=size, c="tab:blue", linewidths=0, label="IR", rasterized=True, zorder=2)
    ax.set(xticks=[], yticks=[])
    ax.set_title(f"RGB and IR expander outputs of {m} samples in one t-SNE map\n"
                 f"pair distance / random pair distance = {summary['ratio']:.3f}; "
                 f"IR partner is the nearest IR point for {100 * summary['pair_nearest']:.1f}% "
                 f"(chance {100 * summary['pair_nearest_chance']:.1f}%)", fontsize=9)
    ax.legend(loc="best", markerscale=2)
    ax.autoscale()
    fig.tight_layout()
    save_figure(fig, out, dpi=120)
    return out


# -- the command -----------------------------------------------------------------------------------------------

def _metadata(dataset, embeddings: Embeddings, keys: np.ndarray, log):
    """Catalog metadata of ``keys`` (None, said once, when the dataset is not here)."""
    root = dataset if dataset is not None else embeddings.attrs.get("dataset")
    if root is None or not Path(root).exists():
        log(f"tsne: dataset {root!r} not found here: maps are drawn without metadata colours (pass --dataset)")
        return None
    return sample_metadata(Path(root), keys)


def _sample(n: int, max_points: int, seed: int) -> tuple[np.ndarray, bool]:
    if max_points < 1:
        raise AnalysisError(f"tsne.max_points must be >= 1, got {max_points}")
    return seeded_rows(n, max_points, seed)


def _write_maps(frames: list[dict], out: Path) -> None:
    table = pa.concat_tables([pa.table({
        "key": pa.array(f["key"], type=pa.string()),
        "space": pa.array([f["space"]] * len(f["key"]), type=pa.string()).dictionary_encode(),
        "row": pa.array(f["row"], type=pa.int64()),
        "x": pa.array(f["xy"][:, 0], type=pa.float32()),
        "y": pa.array(f["xy"][:, 1], type=pa.float32()),
    }) for f in frames]) if frames else pa.table({"key": pa.array([], pa.string())})
    write_parquet(table, out)


def run_tsne(embeddings: Embeddings, results_dir: Path, config: TSNEConfig, seed: int = 0, dataset=None,
             log=print, progress: bool = True) -> dict:
    """t-SNE maps of every PCA space ("joint", then "rgb", "ir") and the RGB-IR link map; returns tsne.json."""
    results_dir = Path(results_dir)
    group = open_pca(results_dir)
    if group.attrs.get("embeddings") != embeddings.identity:
        raise AnalysisError(f"{results_dir / 'pca.zarr'}: made from other embeddings than {embeddings.path}; "
                            "run `analysis pca` again")
    present = set(group.group_keys())
    spaces = [s for s in TSNE_SPACES if s in present]
    if not spaces:
        raise AnalysisError(f"{results_dir / 'pca.zarr'}: no PCA features of {', '.join(TSNE_SPACES)}")
    n = embeddings.n
    rows, sampled = _sample(n, config.max_points, seed)
    keys = embeddings.keys()[rows]
    if sampled:
        log(f"tsne: {n:,} samples, more than tsne.max_points = {config.max_points:,}: "
            f"a seeded random {len(rows):,} of them")
    metadata = _metadata(dataset, embeddings, keys, log)
    frames, report, pngs = [], {}, []
    for space in spaces:
        features = group[space]["features"]
        if features.shape[0] != n:
            raise AnalysisError(f"{results_dir / 'pca.zarr'}: {space} has {features.shape[0]} rows, the embeddings "
                                f"{n}; run `analysis pca` again")
        x = np.asarray(features[:] if not sampled else features.oindex[rows, :], dtype=np.float32)
        t0 = time.perf_counter()
        xy, details = _embed(x, config.perplexity, config.n_jobs, seed, f"tsne {space}" if progress else None)
        seconds = time.perf_counter() - t0
        frames.append({"space": space, "key": list(keys), "row": rows, "xy": xy})
        png = results_dir / f"tsne_{space}.png"
        plot_space(xy, metadata, space, png, seed)
        pngs.append(png.name)
        report[space] = TSNESpace.of(points=int(len(rows)), sampled=sampled, seconds=round(seconds, 2),
                                     features=int(x.shape[1]), details=details)
        log(f"tsne {space}: {len(rows):,} points in {seconds:.0f} s (kNN {details['knn_seconds']:.0f} s, "
            f"optimisation {details['optimise_seconds']:.0f} s)")
    _write_maps(frames, results_dir / "tsne.parquet")
    link, skipped = _link_map(embeddings, config, seed, config.n_jobs, results_dir / "tsne_link.png", progress)
    if link is not None:
        pngs.append(link["png"])
        log(f"tsne link: {link['pairs']} RGB-IR pairs, mean pair distance {link['pair_distance']:.2f} against "
            f"{link['random_distance']:.2f} for random pairs (ratio {link['ratio']:.3f})")
    else:
        (results_dir / "tsne_link.parquet").unlink(missing_ok=True)  # an earlier link map's, not this one's
        log(f"tsne link: {skipped}")
    record = TSNEResult(
        embeddings=embeddings.identity, checkpoint=embeddings.checkpoint, seed=seed,
        config=TSNESettings(max_points=config.max_points, perplexity=config.perplexity, n_jobs=config.n_jobs,
                            link_pairs=config.link_pairs),
        n=n, sampled=sampled, spaces=report, parquet="tsne.parquet",
        columns=[c for c in PANEL_COLUMNS if metadata is not None and c in metadata.columns],
        link=TSNELink(**link) if link is not None else None, link_skipped=skipped, pngs=pngs)
    write_result(results_dir / "tsne.json", record)
    return result_json(record)
