"""`analysis evolution`: every kept checkpoint (and the random-init start) embedded and measured, so a reader sees
k-NN accuracy, cross-modal retrieval and cluster quality change over the epochs. A checkpoint whose file equals
one already measured (``last.pt`` is the final ``epoch_NNNN.pt``) is measured once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.runs import RANDOM
from analysis.store import pyplot, read_json, save_figure, write_json

__all__ = ["run_evolution", "plot_evolution"]


def _headline_k(knn: dict) -> str:
    ks = [int(k) for k in knn.get("k", [])]
    return str(20 if 20 in ks else ks[0]) if ks else "20"


def run_evolution(analysis, force: bool = False) -> dict:
    run = analysis.run
    path = run.analysis_dir / "evolution.json"
    names = ([RANDOM] if analysis.config.baseline else []) + run.checkpoint_names()
    checkpoints = {name: run.checkpoint(name) for name in names}
    # `last` first: it is usually embedded already and is the same file as the final epoch_NNNN.
    names.sort(key=lambda name: name != "last")
    seen: dict[str, dict] = {}
    points = []
    previous = read_json(path) or {}
    for name in names:
        checkpoint = checkpoints[name]
        if checkpoint.sha256 in seen:
            points.append({**seen[checkpoint.sha256], "checkpoint": name})
            continue
        cached = next((p for p in previous.get("points", []) if p.get("checkpoint_sha256") == checkpoint.sha256), None)
        if cached is not None and not force and _results_exist(run.results(name)):
            point = cached
        else:
            analysis.log(f"evolution: {name}")
            analysis.ensure_embeddings(name)
            knn = analysis.knn(name, force=False)
            retrieval = analysis.retrieval(name, force=False)
            cluster = analysis.cluster(name, force=False, examples=name in analysis.checkpoints_for_report())
            point = {"checkpoint_sha256": checkpoint.sha256, "epoch": checkpoint.epoch, "step": checkpoint.step,
                     "knn_k": _headline_k(knn), "knn": {}, "retrieval": {}, "silhouette": {}}
            for label, entry in knn["labels"].items():
                if "spaces" in entry:
                    point["knn"][label] = {space: scores[point["knn_k"]]["top1"]
                                           for space, scores in entry["spaces"].items()}
            if "rgb_to_ir" in retrieval:
                point["retrieval"] = {"rgb_to_ir": retrieval["rgb_to_ir"]["1"], "ir_to_rgb": retrieval["ir_to_rgb"]["1"],
                                      "chance": retrieval["chance"]["1"]}
            point["silhouette"] = {space: item.get("silhouette_mean") for space, item in cluster.get("spaces", {}).items()}
        point = {**point, "checkpoint": name, "epoch": checkpoint.epoch, "step": checkpoint.step}
        seen[checkpoint.sha256] = point
        points.append(point)
    points.sort(key=lambda p: (p["epoch"] if p["epoch"] is not None else np.inf, p["checkpoint"] != "last"))
    out = {"points": points, "png": "evolution.png"}
    plot_evolution(points, run.analysis_dir / "evolution.png")
    write_json(path, out)
    return out


def _results_exist(results: Path) -> bool:
    return all((results / name).exists() for name in ("knn.json", "retrieval.json", "cluster.json"))


def plot_evolution(points: list[dict], out: Path) -> Path:
    plt = pyplot()

    unique = [p for p in points if p["checkpoint"] != "last" or not any(
        q["checkpoint"] != "last" and q["checkpoint_sha256"] == p["checkpoint_sha256"] for q in points)]
    epochs = [p["epoch"] if p["epoch"] is not None else np.nan for p in unique]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    labels = sorted({label for p in unique for label in p["knn"]})
    for label in labels:
        axes[0].plot(epochs, [p["knn"].get(label, {}).get("joint", np.nan) for p in unique], marker="o", label=label)
    k = unique[0]["knn_k"] if unique else "20"
    axes[0].set(xlabel="epoch", ylabel=f"top-1 accuracy (k={k}, joint)", title="k-NN on the test split", ylim=(0, 1.02))
    for key, name in (("rgb_to_ir", "RGB -> IR"), ("ir_to_rgb", "IR -> RGB"), ("chance", "chance")):
        axes[1].plot(epochs, [p["retrieval"].get(key, np.nan) for p in unique], marker="o" if key != "chance" else None,
                     ls="--" if key == "chance" else "-", label=name)
    axes[1].set(xlabel="epoch", ylabel="top-1", title="cross-modal retrieval (test)", ylim=(0, 1.02))
    for space in ("rgb", "ir", "joint"):
        axes[2].plot(epochs, [p["silhouette"].get(space, np.nan) for p in unique], marker="o", label=space)
    axes[2].set(xlabel="epoch", ylabel="silhouette (k-means on PCA)", title="cluster separation")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)
