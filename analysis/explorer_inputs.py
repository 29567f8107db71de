"""The run's side of the explorer: the trained checkpoint's maps, catalog columns and thumbnails, handed to
:func:`analysis.explorer.write_explorer` as ``RUN/report/explorer/``.

Maps: the t-SNE maps (``tsne.parquet``: joint, RGB, IR) and the RGB-IR link map (``tsne_link.parquet``) when t-SNE
is current for the embeddings; the first two principal components of each PCA space (``pca.zarr``), every sample;
and the random-init baseline's joint PCA map when it was embedded from the same samples. Columns: the catalog's
(:func:`analysis.metadata.sample_metadata`: vsn, position, is_sky, is_day, split, month, hour_local, cloud_class where
the data has it) and the cluster labels (``clusters.parquet``). Thumbnails: the run's thumbnail store packed into
atlases along the t-SNE joint map, else the PCA joint map (:mod:`analysis.atlas`). Whatever is missing is left out
and said; only a run with no map at all gets no explorer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import catalog
from analysis.atlas import pack_atlases
from analysis.explorer import ExplorerLink, ExplorerMap, Thumbnails, write_explorer
from analysis.metadata import sample_metadata
from analysis.pca import open_pca
from analysis.results import RESULT_FILES
from analysis.runs import RANDOM, AnalysisError, RunDir
from analysis.store import Embeddings, is_fresh, open_embeddings
from analysis.thumbstore import open_thumbnails, thumbnail_path

__all__ = ["ExplorerInputs", "collect_inputs", "write_run_explorer", "SPACE_NAMES"]

SPACE_NAMES = {"joint": "joint", "rgb": "RGB", "ir": "IR"}  # the order maps appear in the menu
CHECKPOINT = "last"


@dataclass(frozen=True)
class ExplorerInputs:
    keys: np.ndarray  # [n] the trained checkpoint's embedded keys, in row order
    columns: dict[str, object]
    maps: list[ExplorerMap]
    links: list[ExplorerLink]
    thumbnails: Thumbnails | None
    dataset: str
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def write_run_explorer(analysis, log=print) -> Path | None:
    """``RUN/report/explorer/index.html`` for the trained checkpoint, or None (said) when it cannot be written now.

    When it cannot, an explorer written before is removed, so the report never links a page of other samples or
    weights; and a failure here (a map with non-finite points, an unreadable atlas) costs the explorer, not the
    report."""
    out = analysis.run.report_dir / "explorer"
    try:
        page = _write_run_explorer(analysis, out, log)
    except (AnalysisError, ValueError, OSError) as exc:
        log(f"explorer: not written for {analysis.run.root}: {exc}")
        page = None
    if page is None:
        shutil.rmtree(out, ignore_errors=True)
    return page


def _write_run_explorer(analysis, out: Path, log) -> Path | None:
    inputs = collect_inputs(analysis.run, analysis.dataset, analysis.config.knn.cloud_bins, log)
    for note in inputs.notes:
        log(f"explorer: {note}")
    if not inputs.maps:
        log("explorer: not written: no t-SNE or PCA map of the trained checkpoint (run `analysis pca`)")
        return None
    cluster = "cluster_joint" if "cluster_joint" in inputs.columns else None
    return write_explorer(out, list(inputs.keys), inputs.columns, inputs.maps, inputs.links, inputs.thumbnails,
                          title=f"sagepairs explorer: {analysis.run.root.name}", dataset=inputs.dataset,
                          cluster_column=cluster)


def collect_inputs(run: RunDir, dataset: str | None = None, cloud_bins: tuple[float, ...] = (0.25, 0.75),
                   log=print) -> ExplorerInputs:
    """Everything the explorer shows of ``run``'s trained checkpoint; AnalysisError when it is not embedded."""
    emb = open_embeddings(run.embeddings(CHECKPOINT))
    results = run.results(CHECKPOINT)
    notes: list[str] = []
    tsne_maps, links = _tsne_maps(emb, results, notes)
    pca_maps = _pca_maps(emb, results, "", notes)
    maps = tsne_maps + pca_maps + _baseline_maps(run, emb, notes)
    root = catalog.dataset_ref(dataset or emb.attrs["dataset"])
    columns = {**_catalog_columns(root, emb.keys(), cloud_bins, notes), **_cluster_columns(emb, results, notes)}
    order = [(m.rows, m.xy) for m in tsne_maps[:1] + pca_maps[:1]]  # t-SNE joint, then PCA joint
    thumbnails = _thumbnails(run, emb, order, results / "atlas", notes, log)
    return ExplorerInputs(emb.keys(), columns, maps, links, thumbnails, str(root), notes)


def _tsne_maps(emb: Embeddings, results: Path, notes: list[str]) -> tuple[list[ExplorerMap], list[ExplorerLink]]:
    """t-SNE's maps and its link map, when tsne.json was computed from these embeddings."""
    if not is_fresh(results / RESULT_FILES["tsne"], emb.identity):
        notes.append("no current t-SNE of the trained checkpoint: PCA maps only (run `analysis tsne`)")
        return [], []
    table = pq.read_table(results / "tsne.parquet").to_pandas()
    maps = [ExplorerMap(f"t-SNE {label}", part[["x", "y"]].to_numpy(np.float32), part["row"].to_numpy(np.int64))
            for space, label in SPACE_NAMES.items() if len(part := table[table["space"] == space])]
    links = []
    if (results / "tsne_link.parquet").exists():
        link = pq.read_table(results / "tsne_link.parquet").to_pandas()
        links.append(ExplorerLink("t-SNE RGB-IR link", link[["rgb_x", "rgb_y"]].to_numpy(np.float32),
                                  link[["ir_x", "ir_y"]].to_numpy(np.float32), link["row"].to_numpy(np.int64)))
    return maps, links


def _pca_maps(emb: Embeddings, results: Path, suffix: str, notes: list[str]) -> list[ExplorerMap]:
    """The first two principal components of each PCA space made from these embeddings, every sample."""
    try:
        group = open_pca(results)
    except AnalysisError as exc:
        notes.append(f"no PCA maps{suffix}: {exc}")
        return []
    if group.attrs.get("embeddings") != emb.identity:
        notes.append(f"no PCA maps{suffix}: {results / 'pca.zarr'} is of other embeddings (run `analysis pca`)")
        return []
    present = set(group.group_keys())
    rows = np.arange(emb.n, dtype=np.int64)
    return [ExplorerMap(f"PCA {label}{suffix}", np.asarray(group[space]["features"][:, :2], dtype=np.float32), rows)
            for space, label in SPACE_NAMES.items() if space in present and group[space]["features"].shape[1] >= 2]


def _baseline_maps(run: RunDir, emb: Embeddings, notes: list[str]) -> list[ExplorerMap]:
    """The random-init model's joint PCA map, when it embedded the same samples in the same order."""
    try:
        baseline = open_embeddings(run.embeddings(RANDOM))
    except AnalysisError:
        return []
    if baseline.attrs.get("selection_sha256") != emb.attrs.get("selection_sha256"):
        notes.append("the random-init baseline embedded other samples: its PCA map is left out")
        return []
    return [m for m in _pca_maps(baseline, run.results(RANDOM), " (random init)", notes) if m.name.startswith("PCA joint")]


def _catalog_columns(root, keys: np.ndarray, cloud_bins: tuple[float, ...], notes: list[str]) -> dict[str, object]:
    """The catalog's metadata of ``keys`` by column, in row order; none (said) when the dataset is not here."""
    try:
        frame = sample_metadata(root, keys, cloud_bins)
    except catalog.CatalogError as exc:
        notes.append(f"no catalog columns: {exc.reason} (pass --dataset)")
        return {}
    return {name: frame[name].to_numpy() for name in frame.columns if name != "key"}


def _cluster_columns(emb: Embeddings, results: Path, notes: list[str]) -> dict[str, object]:
    """cluster_joint, cluster_rgb, cluster_ir from clusters.parquet, when clustering is current."""
    path = results / "clusters.parquet"
    if not is_fresh(results / RESULT_FILES["cluster"], emb.identity) or not path.exists():
        notes.append("no current clustering of the trained checkpoint: no cluster columns (run `analysis cluster`)")
        return {}
    table = pq.read_table(path)
    if table.column("key").to_pylist() != list(emb.keys()):
        notes.append(f"{path}: rows are not the embeddings' keys: no cluster columns (run `analysis cluster`)")
        return {}
    return {name: table.column(name).to_numpy() for name in table.column_names if name.startswith("cluster_")}


def _thumbnails(run: RunDir, emb: Embeddings, order: list, out_dir: Path, notes: list[str], log) -> Thumbnails | None:
    """The run's thumbnails packed into atlases along ``order``'s maps; None (said) when there are none for these
    samples."""
    try:
        store = open_thumbnails(thumbnail_path(run.root, str(emb.attrs.get("selection_sha256", ""))))
    except AnalysisError as exc:
        notes.append(f"no thumbnails: {exc}")
        return None
    missing = emb.n - int(store.attrs.get("thumbnailed", emb.n))
    if missing:
        notes.append(f"{missing:,} of {emb.n:,} samples have no thumbnail (embed.max_thumbs)")
    return pack_atlases(store, emb.n, order, out_dir, log=log)
