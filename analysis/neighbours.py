"""Exact nearest neighbours in blocks: one matrix product and one top-k per block of queries, so memory is
``query_chunk x n_base`` floats whatever the number of queries (100k x 100k runs in a few hundred MB)."""

from __future__ import annotations

import numpy as np

__all__ = ["l2_normalise", "topk_neighbours"]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def topk_neighbours(queries: np.ndarray, base: np.ndarray, k: int, metric: str = "cosine", query_chunk: int = 2048,
                    exclude_self: bool = False, progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each n_queries x k, best first.

    ``cosine``: inputs must already be L2-normalised; scores are similarities. ``euclidean``: scores are
    distances (ascending). ``exclude_self``: queries are the base itself and a row is not its own neighbour.
    """
    import torch

    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be cosine or euclidean, got {metric!r}")
    base_t = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
    k_eff = min(k + (1 if exclude_self else 0), base_t.shape[0])
    base_sq = (base_t * base_t).sum(1) if metric == "euclidean" else None
    n = len(queries)
    scores = np.empty((n, k_eff - (1 if exclude_self else 0)), dtype=np.float32)
    indices = np.empty(scores.shape, dtype=np.int64)
    starts = range(0, n, query_chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="block", dynamic_ncols=True, leave=False)
    with torch.inference_mode():
        for start in starts:
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + query_chunk], dtype=np.float32))
            sim = q @ base_t.T
            if metric == "euclidean":
                # -|q - b|^2 up to the per-query constant |q|^2, which does not change the ranking.
                sim.mul_(2).sub_(base_sq)
            if exclude_self:
                rows = torch.arange(len(q))
                sim[rows, rows + start] = -torch.inf
            top, idx = torch.topk(sim, k_eff, dim=1)
            if exclude_self:
                top, idx = top[:, :-1], idx[:, :-1]
            if metric == "euclidean":
                q_sq = (q * q).sum(1, keepdim=True)
                top = torch.sqrt(torch.clamp(q_sq - top, min=0))
            scores[start : start + len(q)] = top.numpy()
            indices[start : start + len(q)] = idx.numpy()
    return scores, indices
