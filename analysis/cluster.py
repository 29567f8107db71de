"""`analysis cluster`: MiniBatchKMeans on the PCA features of ``rgb``, ``ir`` and ``joint``, crossed with the
catalog's metadata, so a reader sees whether clusters follow sky/ground, day/night, clouds or just the camera.

Per space: k from ``cluster.k``, or with ``cluster.sweep`` every k is fitted and the best mean silhouette kept
(silhouette over ``silhouette_seeds`` random samples of ``silhouette_sample`` rows: O(sample^2), whatever N).
Cluster ids are renumbered by size, largest first, so cluster 0 is the biggest in every space.

Files in ``RUN/analysis/<checkpoint>/`` (each written atomically; ``cluster.json`` removed first, written last, so
a ``cluster.json`` always describes the files beside it):

- ``clusters.parquet``: key, cluster_rgb, cluster_ir, cluster_joint (int32), in the embeddings' row order;
- ``cluster_tables.parquet``: tidy rows (space, column, cluster, value, count, share) of cluster x metadata,
  computed in DuckDB; a missing value is the string ``'null'``; share is within the cluster;
- ``clusters_<space>.png`` (heat map of those shares), ``cluster_examples_<space>.png`` (RGB and IR of example
  pairs per cluster, the whole frame as training's evaluation view sees it), ``cluster_sweep.png`` (when swept);
- ``cluster.json``: k, silhouette, sizes, NMI and purity against each metadata column, the sweep, and the
  agreement (ARI, NMI) between the rgb, ir and joint clusterings.

Features are N x (PCA components) float32 (100k x 50 is 20 MB), so they are loaded whole.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import catalog
from analysis.config import ClusterConfig
from analysis.metadata import sample_metadata
from analysis.pca import open_pca, pca_path
from analysis.results import (Agreement, ClusterResult, ClusterSettings, ClusterSpace, StepSkipped, SweepPoint,
                              result_json, write_result)
from analysis.runs import AnalysisError
from analysis.store import SPACES, Embeddings, pyplot, save_figure, write_parquet
from catalog.query import sql_string
from shards.layout import ir_celsius
from shards.reader import SelectionReader, ShardReadError

__all__ = ["fit_clusters", "silhouette", "run_clusters", "SpaceClusters", "TABLE_COLUMNS", "HEATMAP_COLUMNS"]

# Metadata crossed with the clusters; cloud_class joins them when the dataset has the synthetic truth.
TABLE_COLUMNS = ("vsn", "position", "is_sky", "is_day", "split", "month", "cloud_class")
HEATMAP_COLUMNS = ("is_sky", "is_day", "position", "vsn", "cloud_class")
HEATMAP_VALUES = 12  # values shown per column; the rest are summed into "other" (a network has many nodes)
THUMB_WIDTH = 192  # pixels of an example's RGB thumbnail


@dataclass
class SpaceClusters:
    """The kept clustering of one space."""

    k: int
    labels: np.ndarray  # N int32, 0 = the largest cluster
    silhouette_mean: float
    silhouette_std: float
    sweep: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.k).tolist()


# -- fitting ---------------------------------------------------------------------------------------------

def fit_clusters(features, k: int, seed: int, batch_size: int = 4096) -> np.ndarray:
    """MiniBatchKMeans labels (int32, renumbered by size: 0 = the largest) of a numpy or zarr N x d array."""
    x = np.asarray(features[:], dtype=np.float32)
    model = MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed, batch_size=batch_size)
    # One thread: a mini-batch step is too small to share, and OpenMP's waiting threads made it 2-50x slower
    # (measured: 106 x 50 0.8 s -> 0.02 s; 100k x 50, k=20 1.3-2.2 s -> 0.5 s on 2 busy cores).
    with threadpool_limits(limits=1):
        labels = model.fit_predict(x)
    return _by_size(labels, k)


def _by_size(labels: np.ndarray, k: int) -> np.ndarray:
    # KMeans ids are arbitrary; by size they read the same from run to run and space to space.
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty(k, dtype=np.int32)
    rank[order] = np.arange(k, dtype=np.int32)
    return rank[labels]


def silhouette(features, labels: np.ndarray, sample_size: int, seeds: int, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the silhouette over ``seeds`` random samples of ``sample_size`` rows; NaN when undefined.

    Time and memory are O(sample_size^2) (sklearn computes distances in bounded chunks), whatever N.
    """
    x = np.asarray(features[:], dtype=np.float32)
    labels = np.asarray(labels)
    if sample_size >= len(labels):
        # Every seed would draw every row: one exact value.
        sample, seeds = None, 1
    else:
        sample = sample_size
    scores = []
    for i in range(max(seeds, 1)):
        try:
            scores.append(float(silhouette_score(x, labels, sample_size=sample, random_state=seed + i)))
        except ValueError:
            # The sample holds one cluster only, or as many clusters as rows: no silhouette for it.
            continue
    if not scores:
        return float("nan"), float("nan")
    return float(np.mean(scores)), float(np.std(scores))


def _fit_space(features: np.ndarray, ks: Sequence[int], config: ClusterConfig, seed: int,
               tick: Callable[[], None]) -> SpaceClusters:
    best: SpaceClusters | None = None
    sweep = []
    for k in ks:
        labels = fit_clusters(features, k, seed)
        mean, std = silhouette(features, labels, config.silhouette_sample, config.silhouette_seeds, seed)
        sweep.append({"k": int(k), "silhouette_mean": _num(mean), "silhouette_std": _num(std)})
        # NaN never wins (comparisons with NaN are false), so an undefined silhouette is kept only if all are.
        if best is None or (not np.isnan(mean) and (np.isnan(best.silhouette_mean) or mean > best.silhouette_mean)):
            best = SpaceClusters(int(k), labels, mean, std)
        tick()
    assert best is not None
    best.sweep = sweep if config.sweep else []
    return best


# -- inputs ----------------------------------------------------------------------------------------------

def _pca_features(embeddings: Embeddings, results: Path) -> dict[str, Any]:
    """space -> the zarr features array of pca.zarr, checked to belong to these embeddings."""
    group = open_pca(results)
    path = pca_path(results)
    if group.attrs.get("embeddings") != embeddings.identity:
        raise AnalysisError(f"{path}: computed from other embeddings than {embeddings.path}; run `analysis pca` again")
    present = set(group.group_keys())
    spaces = {space: group[space]["features"] for space in SPACES if space in present}
    if not spaces:
        raise AnalysisError(f"{path}: holds no PCA features of {', '.join(SPACES)}; run `analysis pca` again")
    for space, features in spaces.items():
        if features.shape[0] != embeddings.n:
            raise AnalysisError(f"{path}: {space} has {features.shape[0]} rows, the embeddings {embeddings.n}; "
                                "run `analysis pca` again")
    return spaces


def _check_ks(embeddings: Embeddings, config: ClusterConfig) -> tuple[int, ...]:
    ks = tuple(int(k) for k in config.sweep) or (int(config.k),)
    too_big = [k for k in ks if k > embeddings.n]
    if too_big:
        name = "cluster.sweep" if config.sweep else "cluster.k"
        where = embeddings.attrs.get("where", "TRUE")
        raise StepSkipped(f"{embeddings.path}: --where {where!r} selects {embeddings.n} samples, fewer than "
                          f"{name} = {max(too_big)}")
    return ks


def _metadata(embeddings: Embeddings, dataset: str | Path | None):
    root = dataset or embeddings.attrs.get("dataset")
    if not root or not Path(root).is_dir():
        raise AnalysisError(f"{embeddings.path}: dataset {root!r} does not exist here (pass --dataset)")
    try:
        frame = sample_metadata(Path(root), embeddings.keys())
    except catalog.CatalogError as exc:
        raise AnalysisError(exc.reason) from None
    # Camera positions are whole numbers stored as float (NaN for fixed cameras): show 17, not 17.0.
    for column in frame.columns:
        values = frame[column]
        if values.dtype.kind == "f" and np.all(np.mod(values.dropna(), 1) == 0):
            frame[column] = values.astype("Int64")
    return Path(root), frame


# -- tables ----------------------------------------------------------------------------------------------

def _cluster_tables(labels: pa.Table, meta, spaces: Sequence[str], columns: Sequence[str]) -> pa.Table:
    """Tidy cluster x metadata counts and within-cluster shares, one DuckDB query per (space, column)."""
    con = duckdb.connect()
    try:
        con.register("clusters", labels)
        con.register("meta", meta)
        parts = []
        for space in spaces:
            for column in columns:
                parts.append(
                    f"SELECT '{space}' AS space, '{column}' AS \"column\", c.cluster_{space} AS cluster, "
                    f"coalesce(CAST(m.\"{column}\" AS VARCHAR), 'null') AS value, count(*) AS count "
                    f"FROM clusters c JOIN meta m ON m.key = c.key GROUP BY ALL")
        sql = (f"SELECT space, \"column\", cluster, value, count, "
               f"count / sum(count) OVER (PARTITION BY space, \"column\", cluster) AS share "
               f"FROM ({' UNION ALL '.join(parts)}) ORDER BY space, \"column\", cluster, count DESC, value")
        table = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    schema = pa.schema([("space", pa.string()), ("column", pa.string()), ("cluster", pa.int32()),
                        ("value", pa.string()), ("count", pa.int64()), ("share", pa.float64())])
    return table.cast(schema)


def _against_metadata(labels: np.ndarray, meta, columns: Sequence[str]) -> tuple[dict, dict]:
    """(NMI, purity) of the clusters against each column, over the rows where the column is known.

    Unknown values (is_sky of a fixed camera, say) are left out rather than made a class of their own: a
    'null' class would mostly measure which cameras are fixed, not whether clusters follow the column.
    """
    nmi, purity = {}, {}
    for column in columns:
        known = meta[column].notna().to_numpy()
        if known.sum() < 2:
            nmi[column] = purity[column] = None
            continue
        values = meta.loc[known, column].astype(str).to_numpy()
        clusters = labels[known]
        nmi[column] = round(float(normalized_mutual_info_score(values, clusters)), 6)
        _, codes = np.unique(values, return_inverse=True)
        counts = np.zeros((clusters.max() + 1, codes.max() + 1), dtype=np.int64)
        np.add.at(counts, (clusters, codes), 1)
        purity[column] = round(float(counts.max(axis=1).sum() / known.sum()), 6)
    return nmi, purity


def _agreement(fits: dict[str, SpaceClusters]) -> dict[str, dict[str, float]]:
    """ARI and NMI between the clusterings of every pair of spaces: separate vs joint fits."""
    out = {}
    names = list(fits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = fits[first].labels, fits[second].labels
            out[f"{first}~{second}"] = {"ari": round(float(adjusted_rand_score(a, b)), 6),
                                        "nmi": round(float(normalized_mutual_info_score(a, b)), 6)}
    return out


# -- files -----------------------------------------------------------------------------------------------


def plot_heatmap(tables: pa.Table, space: str, fit: SpaceClusters, columns: Sequence[str], out: Path) -> Path:
    """Cluster x value shares of the main metadata columns, one panel per column."""
    plt = pyplot()
    frame = tables.filter(pc.equal(tables["space"], space)).to_pandas()
    panels = []
    for column in columns:
        part = frame[frame["column"] == column]
        if part.empty:
            continue
        grid = part.pivot_table(index="cluster", columns="value", values="count", aggfunc="sum", fill_value=0)
        grid = grid.reindex(range(fit.k), fill_value=0)
        order = list(grid.sum(axis=0).sort_values(ascending=False).index)
        kept = sorted(order if len(order) <= HEATMAP_VALUES else order[: HEATMAP_VALUES - 1], key=_value_order)
        grid = grid[kept].assign(other=grid.drop(columns=kept).sum(axis=1)) if len(kept) < len(order) else grid[kept]
        shares = grid.to_numpy(dtype=float) / np.maximum(grid.to_numpy().sum(axis=1, keepdims=True), 1)
        panels.append((column, [str(v) for v in grid.columns], shares))
    widths = [max(len(values), 2) for _, values, _ in panels] or [1]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(1.6 + 0.45 * sum(widths) + 0.6 * len(widths),
                                                              2.4 + 0.32 * fit.k),
                             gridspec_kw={"width_ratios": widths}, squeeze=False, layout="constrained")
    image = None
    for ax, (column, values, shares) in zip(axes[0], panels):
        image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(values)), values, rotation=60, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.set_yticks([])
        if fit.k <= 30:  # numbers stay legible up to about this many rows
            for (row, col), share in np.ndenumerate(shares):
                ax.text(col, row, f"{100 * share:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if share < 0.6 else "black")
    axes[0][0].set_yticks(range(fit.k), [f"{c} (n={n})" for c, n in enumerate(fit.sizes)], fontsize=7)
    axes[0][0].set_ylabel("cluster")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.01, label="share of the cluster (cells: %)")
    fig.suptitle(f"{space}: k={fit.k}, silhouette {fit.silhouette_mean:.3f}", fontsize=10)
    save_figure(fig, out)
    return out


def _value_order(value: str) -> tuple:
    # Numbers numerically (position 5 before 17), then words, 'null' last: the same order in every space.
    try:
        return (value == "null", 0, float(value), "")
    except ValueError:
        return (value == "null", 1, 0.0, value)


def _pick_examples(fit: SpaceClusters, keys: np.ndarray, count: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    picks = []
    for cluster in range(fit.k):
        members = np.flatnonzero(fit.labels == cluster)
        chosen = np.sort(rng.choice(members, size=min(count, len(members)), replace=False)) if count else []
        picks.append([str(keys[i]) for i in chosen])
    return picks


def _rgb_thumbnail(jpeg: bytes) -> np.ndarray:
    """The whole frame, as the evaluation view sees it (no crop, no flip), decoded at a reduced DCT scale."""
    with Image.open(io.BytesIO(jpeg)) as image:
        width, height = image.size
        size = (THUMB_WIDTH, max(round(THUMB_WIDTH * height / width), 1))
        image.draft("RGB", size)
        return np.asarray(image.convert("RGB").resize(size))


def read_pairs(dataset: Path, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (RGB thumbnail uint8 H x W x 3, IR frame in degrees C) read from the shards via a Selection."""
    if not keys:
        return {}
    where = f"key IN ({', '.join(sql_string(k) for k in keys)})"
    with catalog.open(dataset) as cat:
        selection = cat.select(where)
    pairs = {}
    try:
        for sample in SelectionReader(selection, dataset).iter_rows(np.arange(selection.num_rows)):
            ir = ir_celsius(sample)
            pairs[sample["__key__"]] = (_rgb_thumbnail(sample["rgb.jpg"]), ir)
    except ShardReadError as exc:
        raise AnalysisError(str(exc).strip().splitlines()[0]) from None
    return pairs


def plot_examples(space: str, fit: SpaceClusters, picks: list[list[str]],
                  pairs: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """One row per cluster; each example is its RGB frame and its IR frame side by side."""
    plt = pyplot()
    per_row = max(max((len(p) for p in picks), default=1), 1)
    fig, axes = plt.subplots(fit.k, 2 * per_row, figsize=(1.7 * 2 * per_row, 1.45 * fit.k + 0.4), squeeze=False)
    for cluster, keys in enumerate(picks):
        for slot in range(per_row):
            rgb_ax, ir_ax = axes[cluster][2 * slot], axes[cluster][2 * slot + 1]
            for ax in (rgb_ax, ir_ax):
                ax.set_xticks([])
                ax.set_yticks([])
            if slot >= len(keys) or keys[slot] not in pairs:
                rgb_ax.axis("off")
                ir_ax.axis("off")
                continue
            rgb, ir = pairs[keys[slot]]
            rgb_ax.imshow(rgb)
            # A robust range per frame, so one hot pixel does not flatten the picture; NaN pixels stay blank.
            finite = ir[np.isfinite(ir)]
            low, high = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
            ir_ax.imshow(np.ma.masked_invalid(ir), cmap="inferno", vmin=low, vmax=max(high, low + 1e-3))
            rgb_ax.set_xlabel(keys[slot], fontsize=5)
            ir_ax.set_xlabel(f"{low:.0f}..{high:.0f} °C", fontsize=5)
            if cluster == 0:
                rgb_ax.set_title("RGB", fontsize=7)
                ir_ax.set_title("IR", fontsize=7)
        axes[cluster][0].axis("on")
        axes[cluster][0].set_ylabel(f"cluster {cluster}\nn={fit.sizes[cluster]}", fontsize=7)
    fig.suptitle(f"{space} clusters: example pairs", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, dpi=90)
    return out


def plot_sweep(fits: dict[str, SpaceClusters], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for space, fit in fits.items():
        ks = [row["k"] for row in fit.sweep]
        means = [np.nan if row["silhouette_mean"] is None else row["silhouette_mean"] for row in fit.sweep]
        stds = [0.0 if row["silhouette_std"] is None else row["silhouette_std"] for row in fit.sweep]
        line = ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=f"{space} (k={fit.k})")
        ax.plot([fit.k], [fit.silhouette_mean], marker="*", markersize=14, color=line[0].get_color())
    ax.set(xlabel="k", ylabel="silhouette (mean ± std over samples)", title="cluster sweep (★ kept)")
    ax.set_xticks(sorted({row["k"] for fit in fits.values() for row in fit.sweep}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out)
    return out


# -- the step --------------------------------------------------------------------------------------------

def run_clusters(embeddings: Embeddings, results_dir: Path, config: ClusterConfig, seed: int = 0,
                 dataset: str | Path | None = None, log=print, progress: bool = True) -> dict:
    """Cluster every space of pca.zarr, cross with metadata, write the files above; returns cluster.json's dict."""
    results = Path(results_dir)
    spaces = _pca_features(embeddings, results)
    ks = _check_ks(embeddings, config)
    root, meta = _metadata(embeddings, dataset)
    columns = [c for c in TABLE_COLUMNS if c in meta.columns]
    keys = embeddings.keys()
    (results / "cluster.json").unlink(missing_ok=True)

    bar = _bar(len(spaces) * len(ks), progress)
    fits: dict[str, SpaceClusters] = {}
    try:
        for space, array in spaces.items():
            if bar is not None:
                bar.set_postfix_str(space)
            fits[space] = _fit_space(np.asarray(array[:], dtype=np.float32), ks, config, seed,
                                     bar.update if bar is not None else lambda: None)
    finally:
        if bar is not None:
            bar.close()

    labels = pa.table({"key": pa.array(list(keys), type=pa.string()),
                       **{f"cluster_{space}": pa.array(fit.labels, type=pa.int32()) for space, fit in fits.items()}})
    write_parquet(labels, results / "clusters.parquet")
    tables = _cluster_tables(labels, meta, list(fits), columns)
    write_parquet(tables, results / "cluster_tables.parquet")

    pngs = []
    heat_columns = [c for c in HEATMAP_COLUMNS if c in columns]
    picks = {space: _pick_examples(fit, keys, config.examples, seed) for space, fit in fits.items()}
    pairs = read_pairs(root, sorted({k for p in picks.values() for keys_ in p for k in keys_}))
    summary: dict[str, ClusterSpace] = {}
    for space, fit in fits.items():
        pngs.append(plot_heatmap(tables, space, fit, heat_columns, results / f"clusters_{space}.png").name)
        examples_png = results / f"cluster_examples_{space}.png"
        if config.examples:
            pngs.append(plot_examples(space, fit, picks[space], pairs, examples_png).name)
        else:
            examples_png.unlink(missing_ok=True)  # an earlier run's examples show other clusters
        nmi, purity = _against_metadata(fit.labels, meta, columns)
        summary[space] = ClusterSpace(k=fit.k, silhouette_mean=_num(fit.silhouette_mean),
                                      silhouette_std=_num(fit.silhouette_std), sizes=fit.sizes, nmi=nmi,
                                      purity=purity, sweep=[SweepPoint(**row) for row in fit.sweep])
    sweep_png = results / "cluster_sweep.png"
    if config.sweep:
        pngs.append(plot_sweep(fits, sweep_png).name)
    else:
        sweep_png.unlink(missing_ok=True)  # a previous sweep's plot would not describe these clusters
    agreement = _agreement(fits)

    settings = ClusterSettings(k=config.k, sweep=list(config.sweep), silhouette_sample=config.silhouette_sample,
                               silhouette_seeds=config.silhouette_seeds, examples=config.examples)
    record = ClusterResult(embeddings=embeddings.identity, checkpoint=embeddings.checkpoint, n=embeddings.n,
                           seed=seed, config=settings, spaces=summary,
                           agreement={pair: Agreement(**item) for pair, item in agreement.items()}, pngs=pngs,
                           tables="cluster_tables.parquet", clusters="clusters.parquet")
    write_result(results / "cluster.json", record)
    for space, item in summary.items():
        follows = ", ".join(f"{c} {v:.2f}" for c, v in item.nmi.items() if v is not None)
        log(f"cluster {space}: k={item.k}, silhouette {_fmt(item.silhouette_mean)}; NMI {follows}")
    for pair, item in record.agreement.items():
        log(f"cluster agreement {pair}: ARI {item.ari:.2f}, NMI {item.nmi:.2f}")
    return result_json(record)


def _bar(total: int, show: bool):
    if not show:
        return None
    return tqdm(total=total, desc="cluster", unit="fit", dynamic_ncols=True, file=sys.stderr)


def _num(value: float) -> float | None:
    """JSON has no NaN: an undefined silhouette is null."""
    return None if value is None or np.isnan(value) else round(float(value), 6)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"
