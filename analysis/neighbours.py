"""Exact nearest neighbours on CPU, two ways, with the same answer (float32 scores; equal scores in any order).

:func:`topk_neighbours` reads every pair in blocks: one matrix product and one top-k per block of queries, so
memory is ``query_chunk x n_base`` floats whatever the number of queries. Two things make the blocks cheap:

- one score buffer for every block, written in place (``out=``): a fresh product per block pays page faults on
  top of the arithmetic;
- :func:`top_k`: the exact top-k of each row through group maxima, which hands torch.topk (whose cost follows the
  number of scores it reads, whatever k) about 1/16 of the scores.

The matrix products are then most of the time: every pair in float32 is bounded by the CPU's product rate.

:func:`pruned_neighbours` reads only the pairs that can be neighbours (k-means cells, a lower bound from the
nearest cells and an upper bound per cell), and gives up after a probe when that would still read more than a
quarter of them. It pays where the rows fall into well-separated clusters (the k-NN's 384-d embeddings); where
nearby clusters are within reach of each other (the t-SNE's 50-d PCA features) it reads too many pairs, and every
pair is faster.

Both are exact, so a k-NN accuracy measures the embeddings, not the search. The figures behind these choices, and
the approaches measured and not kept: bench/RESULTS.md, "2026-12-04 docstring figures moved here (analysis)".
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

__all__ = ["l2_normalise", "topk_neighbours", "top_k", "pruned_neighbours"]

GROUPS = 16  # columns per group in top_k: 1/16 of the row is ranked, then k x 16 candidates
# Rows per top_k call: at 100k columns its temporaries then stay below glibc's 32 MB mmap threshold and are reused,
# not page-faulted anew (2048 x 100k, k = 200: 195 ms in four calls, 233 ms in one).
TOPK_ROWS = 512


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def top_k(scores, k: int, groups: int = GROUPS):
    """``torch.topk(scores, k, dim=1)`` of a 2-D tensor, largest first: the same values, exactly, and the same
    indices up to the order of equal values; reads each score once instead of ranking it.

    The columns of the first ``groups x m`` (m = n // groups) are cut into m groups of ``groups`` (columns j, j + m,
    j + 2m, ...), so each group's maximum is an elementwise maximum of ``groups`` contiguous slabs. The k groups with
    the largest maxima hold a row's top k: each holds a score >= the k-th largest maximum t, so the row's k-th score
    is >= t, and any score > t sits in a group whose maximum > t, which is among them. So the top k of those k
    groups' columns, plus the (< ``groups``) columns left over, is the row's top k.
    """
    rows, n = scores.shape
    m = n // groups
    if m < 4 * k or groups < 2:  # few columns per selected group: ranking them all is as cheap
        return torch.topk(scores, k, dim=1)
    maxima = scores[:, : groups * m].view(rows, groups, m).amax(dim=1)
    _, group = torch.topk(maxima, k, dim=1, sorted=False)
    columns = (group[:, :, None] + torch.arange(0, groups * m, m)).reshape(rows, k * groups)
    if n > groups * m:
        columns = torch.cat([columns, torch.arange(groups * m, n).expand(rows, -1)], dim=1)
    values, where = torch.topk(torch.gather(scores, 1, columns), k, dim=1)
    return values, torch.gather(columns, 1, where)


def topk_neighbours(queries: np.ndarray, base: np.ndarray, k: int, metric: str = "cosine", query_chunk: int = 2048,
                    exclude_self: bool = False, progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each n_queries x k, best first.

    ``cosine``: inputs must already be L2-normalised; scores are similarities. ``euclidean``: scores are
    distances (ascending). ``exclude_self``: queries are the base itself and a row is not its own neighbour.
    Exact (float32 products; equal scores in any order).
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be cosine or euclidean, got {metric!r}")
    # Euclidean scores 2 q.b - |b|^2 = |q|^2 - |q - b|^2 (|q|^2 does not change a query's ranking) come out of
    # one product of _score_rows' [2q, 1] and [b, -|b|^2]: no second pass over the scores.
    base_t = torch.from_numpy(_score_rows(base, metric, "base"))
    k_eff = min(k + (1 if exclude_self else 0), base_t.shape[0])
    n = len(queries)
    scores = np.empty((n, k_eff - (1 if exclude_self else 0)), dtype=np.float32)
    indices = np.empty(scores.shape, dtype=np.int64)
    starts = range(0, n, query_chunk)
    if progress:
        starts = tqdm(starts, desc=progress, unit="block", dynamic_ncols=True, leave=False)
    with torch.inference_mode():
        block = torch.empty((min(query_chunk, n), base_t.shape[0]), dtype=torch.float32)
        for start in starts:
            chunk = np.ascontiguousarray(queries[start : start + query_chunk], dtype=np.float32)
            q = torch.from_numpy(_score_rows(chunk, metric, "query"))
            sim = torch.matmul(q, base_t.T, out=block[: len(q)])
            if exclude_self:
                rows = torch.arange(len(q))
                sim[rows, rows + start] = -torch.inf
            top, idx = (torch.cat(parts) for parts in zip(*(top_k(sim[lo : lo + TOPK_ROWS], k_eff)
                                                            for lo in range(0, len(sim), TOPK_ROWS))))
            if exclude_self:
                top, idx = top[:, :-1], idx[:, :-1]
            if metric == "euclidean":
                q_sq = torch.from_numpy(np.einsum("ij,ij->i", chunk, chunk))[:, None]
                top = torch.sqrt(torch.clamp(q_sq - top, min=0))
            scores[start : start + len(q)] = top.numpy()
            indices[start : start + len(q)] = idx.numpy()
    return scores, indices


# -- pruned search -----------------------------------------------------------------------------------------------

PRUNE_CELLS = 2.0  # cells per sqrt(n base rows): 632 at 100k
LOOSE_FACTOR = 1.5  # a member farther than this x its cell's median distance from the centre is scanned by all
PRUNE_MAX_SCANNED = 0.25  # give up (return None) when pruning would still read more of the pairs than this


def _kmeans_pp_centres(x: np.ndarray, cells: int, rng: np.random.Generator, sample: int = 12) -> np.ndarray:
    """``cells`` k-means++ seeds (D^2 sampling, one trial each) from ``sample`` x cells random rows, refined by
    two Lloyd steps on those rows: far cheaper than a full k-means (sklearn's MiniBatchKMeans), and D^2 seeding puts
    a centre in nearly every cluster, which random seeds miss."""
    rows = x[rng.choice(len(x), min(len(x), sample * cells), replace=False)].astype(np.float32)
    cells = min(cells, len(rows))
    t = torch.from_numpy(rows)
    sq = (t * t).sum(1)
    chosen = [int(rng.integers(len(rows)))]
    nearest = torch.clamp(sq - 2 * t @ t[chosen[0]] + sq[chosen[0]], min=0)
    draws = rng.random(cells)
    for i in range(1, cells):
        cumulative = torch.cumsum(nearest.double(), 0)
        pick = int(torch.searchsorted(cumulative, float(draws[i]) * float(cumulative[-1])).clamp(max=len(rows) - 1))
        chosen.append(pick)
        nearest = torch.minimum(nearest, torch.clamp(sq - 2 * t @ t[pick] + sq[pick], min=0))
    centres = t[chosen].clone()
    for _ in range(2):
        label = _nearest_centre(rows, centres.numpy())
        sums = torch.zeros_like(centres).index_add_(0, torch.from_numpy(label), t)
        counts = torch.bincount(torch.from_numpy(label), minlength=len(centres))
        keep = counts > 0
        centres = sums[keep] / counts[keep, None]
    return centres.numpy()


def _nearest_centre(x: np.ndarray, centres: np.ndarray, chunk: int = 16384) -> np.ndarray:
    c = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32))
    c_sq = (c * c).sum(1)
    label = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), chunk):
        block = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk], dtype=np.float32))
        label[start : start + chunk] = torch.argmin(c_sq - 2 * block @ c.T, dim=1).numpy()
    return label


class _Cells:
    """The base rows grouped by nearest centre (core members in cell order) plus the loose rows, far from their
    centre, that every query scans; exact float64 centres and core radii."""

    def __init__(self, base: np.ndarray, cells: int, seed: int):
        rng = np.random.default_rng([seed, 2])
        label = _nearest_centre(base, _kmeans_pp_centres(base, cells, rng))
        used = np.unique(label)
        label = np.searchsorted(used, label)  # cells numbered 0.. without the empty ones
        by_cell = np.argsort(label, kind="stable")
        counts = np.bincount(label, minlength=len(used))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = torch.zeros((len(used), base.shape[1])).index_add_(0, torch.from_numpy(label), torch.from_numpy(base))
        centre = (sums / torch.from_numpy(counts)[:, None]).numpy()
        distance = np.linalg.norm(base - centre[label], axis=1)
        median = np.array([np.median(d) for d in np.split(distance[by_cell], starts[1:])])
        loose = distance > LOOSE_FACTOR * median[label]
        self.centre32, self.median = centre, median  # every cell's, for telling loose queries
        self.loose = np.flatnonzero(loose)
        core = np.flatnonzero(~loose)
        core = core[np.argsort(label[core], kind="stable")]
        self.order = core  # base row of each core position
        self.bounds = np.searchsorted(label[core], np.arange(len(used) + 1))
        sizes = np.diff(self.bounds)
        self.live = np.flatnonzero(sizes > 0)
        self.size = sizes[self.live]
        self.centre = np.stack([base[core[self.bounds[c] : self.bounds[c + 1]]].mean(axis=0, dtype=np.float64)
                                for c in self.live])
        self.radius = np.array([np.linalg.norm(base[core[self.bounds[c] : self.bounds[c + 1]]] - self.centre[i],
                                               axis=1).max() for i, c in enumerate(self.live)])
        sq = np.einsum("ij,ij->i", self.centre, self.centre)
        self.between = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * self.centre @ self.centre.T, 0))

    def assign(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nearest cell of each query, whether the query is loose: as far from that centre as a loose member would
        be). A loose query reaches far, so it is searched apart from its cell's other queries."""
        centre, median = self.centre32[self.live], self.median[self.live]
        cell = _nearest_centre(queries, centre)
        return cell, np.linalg.norm(queries - centre[cell], axis=1) > LOOSE_FACTOR * median[cell]

    def columns(self, cells: np.ndarray) -> np.ndarray:
        """Core positions of ``cells`` (indices into self.live), in cell order."""
        ranges = [np.arange(self.bounds[self.live[c]], self.bounds[self.live[c] + 1]) for c in np.sort(cells)]
        return np.concatenate([np.empty(0, np.int64), *ranges])


def _score_bounds(q: np.ndarray, cells: _Cells, metric: str) -> np.ndarray:
    """Upper bound, per query and cell, on the score of any core member (float64): cosine q.b <= q.c + |q| R;
    euclidean 2 q.b - |b|^2 = |q|^2 - |q - b|^2 with |q - b| >= |q - c| - R."""
    q = q.astype(np.float64)
    q_sq = np.einsum("ij,ij->i", q, q)
    inner = q @ cells.centre.T
    if metric == "cosine":
        return inner + np.sqrt(q_sq)[:, None] * cells.radius[None]
    c_sq = np.einsum("ij,ij->i", cells.centre, cells.centre)
    gap = np.maximum(np.sqrt(np.maximum(q_sq[:, None] - 2 * inner + c_sq[None], 0)) - cells.radius[None], 0)
    return q_sq[:, None] - gap * gap


def _score_rows(x: np.ndarray, metric: str, side: str) -> np.ndarray:
    """Rows whose products are the scores: cosine q.b as is; euclidean [2q, 1] . [b, -|b|^2] = 2 q.b - |b|^2."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        return x
    extra = np.ones((len(x), 1), np.float32) if side == "query" else -np.einsum("ij,ij->i", x, x)[:, None]
    return np.concatenate([2 * x if side == "query" else x, extra], axis=1)


def _in_threads(func, items: list, workers: int | None = None):
    """``func`` over ``items`` (results in order, as they come) in as many Python threads as torch has
    intra-op threads, each running torch and BLAS on one thread: the pruned search is many small products and
    top-ks, which two intra-op threads meeting at each op's barrier ran no faster than one, while two chunks side by
    side keep both cores busy."""
    threads = torch.get_num_threads()
    workers = workers or threads
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            if workers <= 1 or len(items) <= 1:
                yield from map(func, items)
                return
            with ThreadPoolExecutor(workers) as pool:
                yield from pool.map(func, items)
    finally:
        torch.set_num_threads(threads)


def _reach_groups(reach: np.ndarray, sizes: np.ndarray, least: int = 16) -> list[np.ndarray]:
    """Rows of ``reach`` (queries x cells that may hold a neighbour) cut into groups that each read the union of
    their cells: the queries sorted by how many rows they reach, split where that saves the most (recursively,
    down to ``least`` queries), so that a few far-reaching queries do not make their whole chunk read far."""
    order = np.argsort(reach @ sizes, kind="stable")

    def cost(rows: np.ndarray) -> int:
        return len(rows) * int(sizes[reach[rows].any(axis=0)].sum())

    def split(rows: np.ndarray) -> list[np.ndarray]:
        whole = cost(rows)
        if len(rows) < 2 * least:
            return [rows]
        best, at = whole, None
        for cut in np.unique(np.clip((np.array([0.25, 0.5, 0.75, 0.9]) * len(rows)).astype(int), least,
                                     len(rows) - least)):
            parts = cost(rows[:cut]) + cost(rows[cut:])
            if parts < 0.9 * best:
                best, at = parts, cut
        return [rows] if at is None else split(rows[:at]) + split(rows[at:])

    return split(order)


def _query_chunks(cell: np.ndarray, loose: np.ndarray, chunk: int) -> list[tuple[int, np.ndarray]]:
    """(cell, query rows) to search together, at most ``chunk`` rows each: each cell's queries, then the loose
    queries (sorted by cell, so that a chunk's first cell is still near most of its queries)."""
    tight, far = (np.flatnonzero(which) for which in (~loose, loose))
    tight, far = (rows[np.argsort(cell[rows], kind="stable")] for rows in (tight, far))
    out = []
    for group in np.split(tight, np.flatnonzero(np.diff(cell[tight])) + 1):
        out += [(int(cell[group[0]]), group[lo : lo + chunk]) for lo in range(0, len(group), chunk)]
    return out + [(int(cell[far[lo]]), far[lo : lo + chunk]) for lo in range(0, len(far), chunk)]


def pruned_neighbours(queries: np.ndarray, base: np.ndarray, k: int, metric: str = "cosine",
                      exclude_self: bool = False, seed: int = 0, query_chunk: int = 2048, probe: int = 16,
                      max_scanned: float = PRUNE_MAX_SCANNED) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """:func:`topk_neighbours`'s exact answer (scores, indices, details), reading only the pairs that can be
    neighbours; None, after probing ``probe`` query chunks, when it would read more than ``max_scanned`` of them.

    The base rows are grouped around 2 x sqrt(n) k-means++ centres; a member farther than 1.5 x its cell's median
    distance from the centre is "loose" and every query reads it, so stray points (noise, outliers) do not inflate
    the radius R of a cell. The queries of one cell read their own and the nearest cells first: the k-th best score
    s_k found there is a lower bound on the true k-th best, and a cell can only hold a better row if its upper bound
    (cosine: q.c + |q| R; euclidean: from |q - b| >= |q - c| - R) reaches s_k. Those cells are read too, and the top
    k of everything read is the answer: the same as every pair, but for the order of equal scores and float32
    rounding. The queries of a chunk are split into groups by how far they reach (:func:`_reach_groups`), and the
    chunks run in two Python threads (:func:`_in_threads`).
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be cosine or euclidean, got {metric!r}")
    base = np.ascontiguousarray(base, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(base)
    if n <= 2 * (k + 1) or len(queries) == 0:
        return None
    cells = _Cells(base, int(np.clip(round(PRUNE_CELLS * np.sqrt(n)), 2, 4096)), seed)
    base_rows = _score_rows(base, metric, "base")
    core = torch.from_numpy(np.ascontiguousarray(base_rows[cells.order]))
    loose = torch.from_numpy(np.ascontiguousarray(base_rows[cells.loose]))
    loose_ids = torch.from_numpy(cells.loose)
    order = torch.from_numpy(cells.order)
    tolerance = 1e-5 * (float(np.einsum("ij,ij->i", base, base).max()) + 1.0)
    tolerance += 1e-5 * float(np.max(np.einsum("ij,ij->i", queries, queries)))
    chunks = _query_chunks(*cells.assign(queries), int(np.clip((1 << 26) // n, 64, query_chunk)))

    def scores(q: torch.Tensor, columns: torch.Tensor, ids: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        sim = q @ columns.T
        if exclude_self:
            sim[ids[None, :] == torch.from_numpy(rows)[:, None]] = -torch.inf
        return sim

    def search(cell: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(top scores, base indices, pairs read) of the queries ``rows``, all nearest to ``cell``."""
        near, total = [], 0
        for other in np.argsort(cells.between[cell], kind="stable"):
            near.append(other)
            total += cells.size[other]
            if total > k + 1:
                break
        q = torch.from_numpy(_score_rows(queries[rows], metric, "query"))
        first = torch.from_numpy(cells.columns(np.asarray(near)))
        ids = torch.cat([order[first], loose_ids])
        sim = scores(q, torch.cat([core[first], loose]), ids, rows)
        kth = torch.topk(sim, k, dim=1, sorted=False).values.amin(dim=1).double().numpy()
        reach = _score_bounds(queries[rows], cells, metric) + tolerance >= kth[:, None]
        reach[:, near] = False
        top = torch.empty((len(rows), k))
        found = torch.empty((len(rows), k), dtype=torch.int64)
        read = 0
        for group in _reach_groups(reach, cells.size):
            g = torch.from_numpy(group)
            more = torch.from_numpy(cells.columns(np.flatnonzero(reach[group].any(axis=0))))
            both = torch.cat([sim[g], scores(q[g], core[more], order[more], rows[group])], dim=1)
            top[g], where = top_k(both, k)
            found[g] = torch.cat([ids, order[more]])[where]
            read += len(group) * both.shape[1]
        return top, found, read

    def search_chunk(i: int) -> tuple[int, tuple[torch.Tensor, torch.Tensor, int]]:
        with torch.inference_mode():  # thread-local
            return i, search(*chunks[i])

    # Probe: the share of pairs read, estimated from the chunks of ``probe`` random queries.
    picked = np.random.default_rng([seed, 3]).choice(len(queries), min(probe, len(queries)), replace=False)
    position = np.empty(len(queries), dtype=np.int64)
    for i, (_, rows) in enumerate(chunks):
        position[rows] = i
    probed = dict(_in_threads(search_chunk, sorted({int(i) for i in position[picked]})))
    if np.mean([probed[i][2] / len(chunks[i][1]) / n for i in position[picked]]) > max_scanned:
        return None
    top = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    read = 0
    rest = [i for i in range(len(chunks)) if i not in probed]
    for i, found in itertools.chain(probed.items(), _in_threads(search_chunk, rest)):
        rows = chunks[i][1]
        top[rows], indices[rows] = found[0].numpy(), found[1].numpy()
        read += found[2]
    if metric == "euclidean":
        top = np.sqrt(np.maximum(np.einsum("ij,ij->i", queries, queries)[:, None] - top, 0))
    return top, indices, {"knn_method": "cluster-pruned", "knn_cells": int(len(cells.live)),
                          "knn_loose": round(len(cells.loose) / n, 4), "knn_scanned": round(read / len(queries) / n, 4)}
