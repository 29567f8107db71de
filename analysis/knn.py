"""`analysis knn` and `analysis retrieval`: what the embeddings know, measured without training anything.

k-NN is DINO's weighted k-NN (``eval_knn.py``): L2-normalised features, cosine similarity, the k most similar
training rows each vote ``exp(similarity / T)`` for their label; top-1 (and top-5 where there are more than 5
classes) accuracy on the test split, for every k from one top-k search. Labels are catalog columns (sky or
ground, day or night, node, pointing position) and, for synthetic data, the generator's cloud-fraction class.
The neighbours are exact (:func:`knn_neighbours`): cluster-pruned where that pays, else every pair, with the same
accuracies either way (timings: bench/RESULTS.md, "2026-12-04 docstring figures moved here (analysis)").

Retrieval asks whether the two branches agree on a sample: for each test RGB embedding, is its own IR partner
among the top 1 / top 5 of all test IR embeddings (and the reverse), against chance (k / n). It is measured in
the expander space (``rgb_z``, ``ir_z``): the space the VICReg invariance term aligns; the two backbones'
outputs live in unrelated coordinates. A DINO run aligns distributions over K prototypes instead, so its candidates
are ranked by the DINO loss itself (:func:`dino_retrieval_rows`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from analysis.config import LABELS, KNNConfig
from analysis.neighbours import l2_normalise, pruned_neighbours, topk_neighbours
from analysis.results import (KNNLabel, KNNResult, KNNScore, RetrievalResult, StepSkipped, result_json,
                              write_result)
from analysis.runs import AnalysisError
from analysis.store import Embeddings

__all__ = ["weighted_knn", "neighbour_votes", "knn_neighbours", "run_knn", "retrieval_accuracy", "dino_retrieval_rows", "run_retrieval", "space_matrix"]

PRUNE_FROM = 20_000  # training rows from which the cluster-pruned search is tried first


def space_matrix(embeddings: Embeddings, space: str, rows: np.ndarray) -> np.ndarray:
    """L2-normalised features of ``rows`` (sorted); joint = both branches normalised, side by side, renormalised,
    so each branch counts equally whatever its scale."""
    if space == "joint":
        both = np.concatenate([l2_normalise(embeddings.rows("rgb", rows)), l2_normalise(embeddings.rows("ir", rows))],
                              axis=1)
        return l2_normalise(both)
    return l2_normalise(embeddings.rows(space, rows))


def knn_neighbours(test_x: np.ndarray, train_x: np.ndarray, k: int, query_chunk: int = 2048,
                   prune: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(cosine similarities, training row indices, details), n_test x k, most similar first; exact either way.

    From ``PRUNE_FROM`` training rows (and ``prune``), :func:`analysis.neighbours.pruned_neighbours` reads only
    the pairs that can be neighbours; where that would still read more than a quarter of them, or ``prune`` is
    False, every pair (:func:`analysis.neighbours.topk_neighbours`).
    """
    if prune and len(train_x) >= PRUNE_FROM:
        found = pruned_neighbours(test_x, train_x, k, "cosine", query_chunk=query_chunk)
        if found is not None:
            return found
    similarity, index = topk_neighbours(test_x, train_x, k, "cosine", query_chunk)
    return similarity, index, {"knn_method": "all pairs"}


def weighted_knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, ks: tuple[int, ...],
                 temperature: float, n_classes: int, query_chunk: int = 2048, prune: bool = True,
                 details: dict | None = None) -> dict[int, dict[str, float]]:
    """{k: {"top1": accuracy, "top5": accuracy or None}} of DINO's weighted k-NN (inputs L2-normalised), on the
    exact neighbours of :func:`knn_neighbours` (``prune`` False: every pair); ``details``, when given, receives
    how they were found."""
    k_max = max(ks)
    if len(train_x) < k_max:
        raise AnalysisError(f"k-NN needs at least k = {k_max} training samples, the selection has {len(train_x)}")
    similarity, index, found = knn_neighbours(test_x, train_x, k_max, query_chunk, prune)
    if details is not None:
        details.update(found)
    return neighbour_votes(similarity, index, train_y, test_y, ks, temperature, n_classes)


def neighbour_votes(similarity: np.ndarray, index: np.ndarray, train_y: np.ndarray, test_y: np.ndarray,
                    ks: tuple[int, ...], temperature: float, n_classes: int) -> dict[int, dict[str, float]]:
    """The votes of :func:`weighted_knn` from neighbours already found (n_test x max(ks), most similar first)."""
    weights = np.exp(similarity / temperature)
    neighbour_labels = train_y[index]
    out: dict[int, dict[str, float]] = {}
    n_test = len(test_y)
    flat_rows = np.arange(n_test, dtype=np.int64)[:, None] * n_classes
    for k in ks:
        # One bincount over (row, label) pairs: np.add.at does the same ~20x slower.
        cells = (flat_rows + neighbour_labels[:, :k]).ravel()
        votes = np.bincount(cells, weights=weights[:, :k].ravel(), minlength=n_test * n_classes)
        votes = votes.reshape(n_test, n_classes)
        ranked = np.argsort(-votes, axis=1, kind="stable")
        top1 = float((ranked[:, 0] == test_y).mean())
        top5 = float((ranked[:, :5] == test_y[:, None]).any(axis=1).mean()) if n_classes > 5 else None
        out[k] = {"top1": top1, "top5": top5}
    return out


def run_knn(embeddings: Embeddings, results: Path, config: KNNConfig, metadata, log=print) -> dict:
    """k-NN for every label and space; knn.json; returns its content."""
    split = metadata["split"].to_numpy()
    train_rows = np.flatnonzero(split == config.train_split)
    test_rows = np.flatnonzero(split == config.test_split)
    if len(test_rows) == 0:
        raise StepSkipped(f"{embeddings.path}: no {config.test_split!r} samples among the embedded ones")
    if len(train_rows) < max(config.k):
        raise StepSkipped(f"{embeddings.path}: {len(train_rows)} {config.train_split!r} samples embedded, fewer than "
                            f"k = {max(config.k)} (set knn.k in --config, or embed more samples)")
    labels = [c for c in (*LABELS, "cloud_class") if c in metadata.columns]
    spaces = [s for s in ("rgb", "ir", "joint") if s == "joint" or embeddings.has(s)]
    measured: dict[str, KNNLabel] = {}
    skipped: dict[str, str] = {}
    matrices = {s: (space_matrix(embeddings, s, train_rows), space_matrix(embeddings, s, test_rows)) for s in spaces}
    found: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def neighbours(space: str, known_train: np.ndarray, known_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Labels known for the same samples share one search (usually all of them: one search per space).
        key = (space, known_train.tobytes(), known_test.tobytes())
        if key not in found:
            train_x, test_x = matrices[space]
            similarity, index, _ = knn_neighbours(test_x[known_test], train_x[known_train], max(config.k),
                                                  config.query_chunk)
            found[key] = similarity, index
        return found[key]

    for label in labels:
        values = metadata[label].astype("object").to_numpy()
        known_train = np.array([v is not None and v == v for v in values[train_rows]])
        known_test = np.array([v is not None and v == v for v in values[test_rows]])
        if known_train.sum() < max(config.k) or known_test.sum() == 0:
            skipped[label] = f"{int(known_train.sum())} labelled training samples, {int(known_test.sum())} test"
            continue
        classes, codes = np.unique(np.array([str(v) for v in values[np.concatenate([train_rows, test_rows])]]),
                                   return_inverse=True)
        train_codes, test_codes = codes[: len(train_rows)], codes[len(train_rows) :]
        majority = np.bincount(train_codes[known_train], minlength=len(classes)).argmax()
        by_space = {}
        for space in matrices:
            similarity, index = neighbours(space, known_train, known_test)
            scores = neighbour_votes(similarity, index, train_codes[known_train], test_codes[known_test], config.k,
                                     config.temperature, len(classes))
            by_space[space] = {str(k): KNNScore(v["top1"], v["top5"]) for k, v in scores.items()}
        entry = measured[label] = KNNLabel(classes=len(classes), spaces=by_space,
                                           majority_baseline=float((test_codes[known_test] == majority).mean()))
        headline = 20 if 20 in config.k else config.k[0]
        log(f"knn {label}: " + ", ".join(f"{s} {100 * entry.spaces[s][str(headline)].top1:.1f}%" for s in spaces)
            + f" top-1 at k={headline} (majority class {100 * entry.majority_baseline:.1f}%)")
    record = KNNResult(embeddings=embeddings.identity, checkpoint=embeddings.checkpoint, k=list(config.k),
                       temperature=config.temperature, train=int(len(train_rows)), test=int(len(test_rows)),
                       labels=measured, skipped_labels=skipped)
    write_result(results / "knn.json", record)
    return result_json(record)


def retrieval_accuracy(queries: np.ndarray, base: np.ndarray, ks: tuple[int, ...] = (1, 5),
                       query_chunk: int = 2048) -> dict[int, float]:
    """Share of rows i whose partner base[i] is among the top k of base for queries[i], scored by their products
    (L2-normalised rows: cosine similarity)."""
    k_max = min(max(ks), len(base))
    _, index = topk_neighbours(queries, base, k_max, "cosine", query_chunk)
    hit = index == np.arange(len(queries))[:, None]
    return {k: float(hit[:, :k].any(axis=1).mean()) for k in ks}


def dino_retrieval_rows(embeddings: Embeddings, rows: np.ndarray, query: str, candidate: str,
                        chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, candidate rows) whose products rank candidates by the DINO loss of direction query>candidate.

    score(i, j) = sum_k P_ik log Q_jk, with P_i = softmax((z_i W_q^T - c) / teacher_temp) the query teacher's
    centred distribution (c: that direction's centre, zero when the run did not train it) and
    Q_j = softmax(z_j W_c^T / student_temp) the candidate's. Since P_i sums to 1 this is
    (P_i W_c) . z_j / student_temp - logsumexp_k(z_j W_c^T / student_temp): D numbers a row, not K, and exact.
    """
    scoring = embeddings.attrs["dino_scoring"]
    group = embeddings.group
    w_query = torch.from_numpy(np.asarray(group[f"{query}_prototypes"][:], dtype=np.float32))
    w_cand = torch.from_numpy(np.asarray(group[f"{candidate}_prototypes"][:], dtype=np.float32))
    centre_name = f"centre_{query}_to_{candidate}"
    centre = (torch.from_numpy(np.asarray(group[centre_name][:], dtype=np.float32)) if centre_name in group.array_keys()
              else torch.zeros(w_query.shape[0]))
    t_temp, s_temp = scoring["teacher_temp"], scoring["student_temp"]
    z_query = torch.from_numpy(embeddings.rows(f"{query}_z", rows))
    z_cand = torch.from_numpy(embeddings.rows(f"{candidate}_z", rows))
    queries, lse = [], []
    with torch.inference_mode():
        for start in range(0, len(rows), chunk):
            p = torch.softmax((z_query[start : start + chunk] @ w_query.T - centre) / t_temp, dim=1)
            queries.append(p @ w_cand / s_temp)
            lse.append(torch.logsumexp(z_cand[start : start + chunk] @ w_cand.T / s_temp, dim=1))
        q = torch.cat(queries)
        base = torch.cat([z_cand, -torch.cat(lse)[:, None]], dim=1)
        q = torch.cat([q, torch.ones(len(q), 1)], dim=1)
    return q.numpy(), base.numpy()


def run_retrieval(embeddings: Embeddings, results: Path, metadata, split: str = "test", ks: tuple[int, ...] = (1, 5),
                  log=print) -> dict:
    rows = np.flatnonzero(metadata["split"].to_numpy() == split)
    usable = tuple(k for k in ks if k < len(rows))  # top-k of k >= n pairs is always a hit
    if not embeddings.has("rgb_z"):
        raise StepSkipped(f"{embeddings.path}: no expander outputs in the embeddings (embed.projections = false)")
    if not len(rows):
        raise StepSkipped(f"{embeddings.path}: no {split!r} samples among the embedded ones")
    if not usable:
        raise StepSkipped(f"retrieval needs more than {min(ks)} {split!r} samples, the embeddings hold {len(rows)}")
    if embeddings.has("rgb_prototypes"):
        rgb_to_ir = retrieval_accuracy(*dino_retrieval_rows(embeddings, rows, "rgb", "ir"), usable)
        ir_to_rgb = retrieval_accuracy(*dino_retrieval_rows(embeddings, rows, "ir", "rgb"), usable)
    else:
        rgb = l2_normalise(embeddings.rows("rgb_z", rows))
        ir = l2_normalise(embeddings.rows("ir_z", rows))
        rgb_to_ir, ir_to_rgb = retrieval_accuracy(rgb, ir, usable), retrieval_accuracy(ir, rgb, usable)
    record = RetrievalResult(
        embeddings=embeddings.identity, checkpoint=embeddings.checkpoint, split=split, n=int(len(rows)),
        k=list(usable), rgb_to_ir={str(k): v for k, v in rgb_to_ir.items()},
        ir_to_rgb={str(k): v for k, v in ir_to_rgb.items()},
        chance={str(k): min(k / len(rows), 1.0) for k in usable})
    first = str(usable[0])
    log(f"retrieval ({len(rows)} {split} pairs): RGB->IR top-1 {100 * record.rgb_to_ir[first]:.1f}%, "
        f"IR->RGB top-1 {100 * record.ir_to_rgb[first]:.1f}% (chance {100 * record.chance[first]:.1f}%)")
    write_result(results / "retrieval.json", record)
    return result_json(record)
