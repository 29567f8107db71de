"""`analysis evolution`: every kept checkpoint (and the random-init start) embedded and measured, so a reader sees
k-NN accuracy, cross-modal retrieval and cluster quality change over the epochs. A checkpoint whose file equals
one already measured (``last.pt`` is the final ``epoch_NNNN.pt``) is measured once. A measure the data cannot
support (no test split: no k-NN) is left out of the point, with the reason, and the other measures still drawn."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analysis.results import (ClusterResult, EvolutionPoint, EvolutionResult, EvolutionRetrieval, KNNResult,
                              RetrievalResult, is_current, read_result, write_result)
from analysis.runs import RANDOM, Checkpoint
from analysis.store import SPACES, pyplot, save_figure

if TYPE_CHECKING:  # annotations only: the pipeline imports this module
    from analysis.pipeline import Analysis

__all__ = ["run_evolution", "plot_evolution"]

MEASURES = {"knn": "knn.json", "retrieval": "retrieval.json", "cluster": "cluster.json"}  # step -> its result


def run_evolution(analysis: Analysis, force: bool = False) -> EvolutionResult:
    """Measure every checkpoint not measured yet (all of them with ``force``), write evolution.json and .png."""
    run = analysis.run
    path = run.analysis_dir / "evolution.json"
    names = ([RANDOM] if analysis.config.baseline else []) + run.checkpoint_names()
    checkpoints = {name: run.checkpoint(name) for name in names}
    # `last` first: it is usually embedded already and is the same file as the final epoch_NNNN.
    names.sort(key=lambda name: name != "last")
    previous = {} if force else _previous_points(path)
    measured: dict[str, EvolutionPoint] = {}  # checkpoint sha256 -> its point
    points = []
    for name in names:
        checkpoint = checkpoints[name]
        point = measured.get(checkpoint.sha256)  # the same file under another name: measured once
        if point is None:
            earlier = _reusable(previous, checkpoint, run.results(name))
            point = (_said_again(analysis, name, earlier) if earlier is not None
                     else _measure(analysis, name, checkpoint))
        measured.setdefault(checkpoint.sha256, point)
        points.append(dataclasses.replace(point, checkpoint=name, epoch=checkpoint.epoch, step=checkpoint.step))
    points.sort(key=lambda p: (p.epoch if p.epoch is not None else np.inf, p.checkpoint != "last"))
    record = EvolutionResult(points=points, png="evolution.png")
    plot_evolution(points, run.analysis_dir / record.png)
    write_result(path, record)
    return record


def _previous_points(path: Path) -> dict[str, EvolutionPoint]:
    """checkpoint sha256 -> the point an earlier run measured (none from a file of an older layout)."""
    if not is_current(path, EvolutionResult):
        return {}
    return {point.checkpoint_sha256: point for point in read_result(path, EvolutionResult).points}


def _reusable(previous: dict[str, EvolutionPoint], checkpoint: Checkpoint, results: Path) -> EvolutionPoint | None:
    """The earlier point of this checkpoint file, if the results it was read from are still there."""
    point = previous.get(checkpoint.sha256)
    if point is None:
        return None
    needed = [name for step, name in MEASURES.items() if step not in point.skipped]
    return point if all((results / name).exists() for name in needed) else None


def _said_again(analysis: Analysis, name: str, point: EvolutionPoint) -> EvolutionPoint:
    """A reused point's skipped measures, recorded again: skipped.json says what every `all` could not run."""
    for step, reason in point.skipped.items():
        analysis.record_skip(name, step, reason)
    return point


def _measure(analysis: Analysis, name: str, checkpoint: Checkpoint) -> EvolutionPoint:
    analysis.log(f"evolution: {name}")
    analysis.ensure_embeddings(name)
    examples = name in analysis.checkpoints_for_report()
    knn = analysis.attempt(name, "knn", lambda: analysis.knn(name, force=False))
    retrieval = analysis.attempt(name, "retrieval", lambda: analysis.retrieval(name, force=False))
    cluster = analysis.attempt(name, "cluster", lambda: analysis.cluster(name, force=False, examples=examples))
    return EvolutionPoint(
        checkpoint=name, checkpoint_sha256=checkpoint.sha256, epoch=checkpoint.epoch, step=checkpoint.step,
        knn_k=knn.headline_k if knn is not None else "", knn=_knn_top1(knn), retrieval=_retrieval_top1(retrieval),
        silhouette=_silhouettes(cluster), skipped=analysis.skip_reasons(name, tuple(MEASURES)))


def _knn_top1(knn: KNNResult | None) -> dict[str, dict[str, float]]:
    """label -> space -> top-1 at the headline k."""
    if knn is None:
        return {}
    k = knn.headline_k
    return {label: {space: scores[k].top1 for space, scores in entry.spaces.items()}
            for label, entry in knn.labels.items()}


def _retrieval_top1(retrieval: RetrievalResult | None) -> EvolutionRetrieval | None:
    if retrieval is None:
        return None
    return EvolutionRetrieval(rgb_to_ir=retrieval.rgb_to_ir["1"], ir_to_rgb=retrieval.ir_to_rgb["1"],
                              chance=retrieval.chance["1"])


def _silhouettes(cluster: ClusterResult | None) -> dict[str, float | None]:
    return {} if cluster is None else {space: item.silhouette_mean for space, item in cluster.spaces.items()}


# -- the figure --------------------------------------------------------------------------------------------

def plot_evolution(points: list[EvolutionPoint], out: Path) -> Path:
    """k-NN top-1 (joint space), retrieval top-1 and silhouette against the epoch; a missing measure is a gap."""
    plt = pyplot()
    unique = _distinct_files(points)
    epochs = [p.epoch if p.epoch is not None else np.nan for p in unique]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for label in sorted({label for p in unique for label in p.knn}):
        axes[0].plot(epochs, [p.knn[label]["joint"] if label in p.knn else np.nan for p in unique], marker="o",
                     label=label)
    k = next((p.knn_k for p in unique if p.knn_k), "?")
    axes[0].set(xlabel="epoch", ylabel=f"top-1 accuracy (k={k}, joint)", title="k-NN on the test split", ylim=(0, 1.02))
    for key, name in (("rgb_to_ir", "RGB -> IR"), ("ir_to_rgb", "IR -> RGB"), ("chance", "chance")):
        axes[1].plot(epochs, [getattr(p.retrieval, key) if p.retrieval is not None else np.nan for p in unique],
                     marker="o" if key != "chance" else None, ls="--" if key == "chance" else "-", label=name)
    axes[1].set(xlabel="epoch", ylabel="top-1", title="cross-modal retrieval (test)", ylim=(0, 1.02))
    for space in SPACES:
        axes[2].plot(epochs, [_or_nan(p.silhouette[space]) if space in p.silhouette else np.nan for p in unique],
                     marker="o", label=space)
    axes[2].set(xlabel="epoch", ylabel="silhouette (k-means on PCA)", title="cluster separation")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def _distinct_files(points: list[EvolutionPoint]) -> list[EvolutionPoint]:
    """Each checkpoint file once: ``last`` only where no epoch_NNNN is the same file."""
    return [p for p in points if p.checkpoint != "last" or not any(
        q.checkpoint != "last" and q.checkpoint_sha256 == p.checkpoint_sha256 for q in points)]


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value
