"""Exact nearest neighbours: the grouped top-k equals torch.topk (ties, -inf, columns left over), and the
cluster-pruned search finds what every pair finds (stray points, duplicates, cosine queries apart from the base),
gives up on structureless data, and feeds the k-NN the same neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import analysis.knn as knn_module
from analysis.knn import knn_neighbours, weighted_knn
from analysis.neighbours import l2_normalise, pruned_neighbours, top_k, topk_neighbours


def blobs(n_per: int, centres: int, dim: int, seed: int = 0, spread: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)) * spread
    labels = np.repeat(np.arange(centres), n_per)
    return (means[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


# -- top_k ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, n, k", [(7, 16 * 400, 1), (5, 16 * 400 + 13, 100), (9, 3000, 40), (4, 50, 50),
                                        (3, 20_000, 200)])
def test_top_k_equals_torch_topk(rows, n, k):
    scores = torch.from_numpy(np.random.default_rng(n + k).normal(size=(rows, n)).astype(np.float32))
    values, indices = top_k(scores, k)
    expected_values, expected_indices = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected_values)  # continuous values: no ties, so the indices are the same too
    assert torch.equal(indices, expected_indices)


def test_top_k_when_each_best_score_has_a_group_of_its_own():
    k, n = 50, 16 * 1000
    scores = torch.rand(3, n)
    scores[:, :k] += torch.arange(k, 0, -1) + 1.0  # columns 0..k-1: one per group (group j: j, j + m, j + 2m, ...)
    values, indices = top_k(scores, k)
    assert torch.equal(values, torch.topk(scores, k, dim=1).values)
    assert torch.equal(indices, torch.arange(k).expand(3, k))


def test_top_k_with_ties_and_minus_infinity():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 4, size=(6, 16 * 300 + 5)).astype(np.float32))
    scores[0] = -torch.inf  # a row of nothing but -inf
    scores[1, ::2] = -torch.inf
    scores[2, -5:] = 10.0  # the best scores all in the columns left over after the groups
    scores[3, 7] = 99.0  # one best score, in a group of equals
    k = 64
    values, indices = top_k(scores, k)
    expected, _ = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected)
    assert torch.equal(torch.gather(scores, 1, indices), values)  # ties may come in another order, not other values
    assert all(len(set(row.tolist())) == k for row in indices)
    assert set(indices[2, :5].tolist()) == set(range(scores.shape[1] - 5, scores.shape[1]))
    assert indices[3, 0] == 7


# -- pruned search -------------------------------------------------------------------------------------------------

def same_neighbours(found: np.ndarray, truth: np.ndarray, distance: np.ndarray) -> None:
    """The found neighbours' true distances are the smallest ones (sets may differ only between equal distances)."""
    np.testing.assert_allclose(np.sort(np.take_along_axis(distance, found, axis=1), axis=1),
                               np.sort(np.take_along_axis(distance, truth, axis=1), axis=1), atol=1e-4)


def pairwise(queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    return np.linalg.norm(queries[:, None].astype(np.float64) - base[None], axis=2)


@pytest.mark.parametrize("k", [1, 30])
def test_pruned_euclidean_self_neighbours_are_exact_with_stray_points(k):
    x, _ = blobs(120, 12, 16, seed=1)
    strays = np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32) * 20  # wide noise around the blobs
    x = np.concatenate([x, strays])
    distances, indices, details = pruned_neighbours(x, x, k, "euclidean", exclude_self=True, max_scanned=1.0)
    ref_distances, ref_indices = topk_neighbours(x, x, k, "euclidean", exclude_self=True)
    assert indices.shape == (len(x), k) and not (indices == np.arange(len(x))[:, None]).any()
    full = pairwise(x, x)
    same_neighbours(indices, ref_indices, full)
    np.testing.assert_allclose(distances, ref_distances, atol=1e-3)
    assert details["knn_method"] == "cluster-pruned" and 0 < details["knn_loose"] < 0.1
    assert details["knn_scanned"] < 0.3  # pruning pays: strays are read by all, not by widening every cell


def test_pruned_neighbours_of_duplicates_exclude_only_self():
    x, _ = blobs(60, 12, 16, seed=3)
    x = np.concatenate([x, x])  # distance-0 ties, and cells whose members coincide
    distances, indices, _ = pruned_neighbours(x, x, 30, "euclidean", exclude_self=True, max_scanned=1.0)
    assert not (indices == np.arange(len(x))[:, None]).any()
    twin = (np.arange(len(x)) + len(x) // 2) % len(x)
    assert (indices == twin[:, None]).any(axis=1).all() and np.allclose(distances[:, 0], 0, atol=0.05)
    same_neighbours(indices, topk_neighbours(x, x, 30, "euclidean", exclude_self=True)[1], pairwise(x, x))


def test_pruned_cosine_queries_apart_from_the_base():
    base, _ = blobs(150, 10, 24, seed=4)
    queries, _ = blobs(40, 10, 24, seed=4)
    queries = queries + np.random.default_rng(5).normal(size=queries.shape).astype(np.float32)
    base, queries = l2_normalise(base), l2_normalise(queries)
    similarity, indices, details = pruned_neighbours(queries, base, 25, "cosine", max_scanned=1.0)
    ref_similarity, ref_indices = topk_neighbours(queries, base, 25, "cosine")
    np.testing.assert_allclose(similarity, ref_similarity, atol=1e-6)
    same_neighbours(indices, ref_indices, pairwise(queries, base))
    assert details["knn_scanned"] < 0.5


def test_pruned_neighbours_of_queries_far_from_every_cell():
    base, _ = blobs(100, 10, 8, seed=8)
    queries = np.random.default_rng(9).normal(size=(30, 8)).astype(np.float32) * 200  # every one a loose query
    distances, indices, _ = pruned_neighbours(queries, base, 5, "euclidean", max_scanned=1.0)
    same_neighbours(indices, topk_neighbours(queries, base, 5, "euclidean")[1], pairwise(queries, base))
    np.testing.assert_allclose(distances, np.sort(pairwise(queries, base), axis=1)[:, :5], rtol=1e-4)


def test_pruning_gives_up_on_structureless_data_and_when_told():
    x = np.random.default_rng(0).normal(size=(1500, 40)).astype(np.float32)
    assert pruned_neighbours(x, x, 30, "euclidean", exclude_self=True) is None
    y, _ = blobs(120, 12, 16, seed=1)
    assert pruned_neighbours(y, y, 30, "euclidean", exclude_self=True, max_scanned=0.0) is None
    assert pruned_neighbours(y[:50], y[:50], 30, "euclidean", exclude_self=True) is None  # too few rows to cut


def test_two_search_threads_give_the_one_thread_answer():
    x, _ = blobs(100, 15, 16, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pruned_neighbours(x, x, 20, "euclidean", exclude_self=True, max_scanned=1.0)
        torch.set_num_threads(2)
        two = pruned_neighbours(x, x, 20, "euclidean", exclude_self=True, max_scanned=1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    # The same answer; products of other shapes may round the last float32 bit otherwise.
    same_neighbours(two[1], one[1], pairwise(x, x))
    np.testing.assert_allclose(two[0], one[0], atol=1e-3)


def test_knn_uses_the_pruned_search_from_prune_from_rows(monkeypatch):
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(8, 32)) * 4
    train_y, test_y = rng.integers(0, 8, 2000), rng.integers(0, 8, 300)
    train_x = l2_normalise(centres[train_y] + rng.normal(size=(2000, 32)))
    test_x = l2_normalise(centres[test_y] + rng.normal(size=(300, 32)))
    monkeypatch.setattr(knn_module, "PRUNE_FROM", 1000)
    pruned, every = {}, {}
    scores = weighted_knn(train_x, train_y, test_x, test_y, (1, 20), 0.07, 8, details=pruned)
    reference = weighted_knn(train_x, train_y, test_x, test_y, (1, 20), 0.07, 8, prune=False, details=every)
    assert pruned["knn_method"] == "cluster-pruned" and every["knn_method"] == "all pairs"
    assert scores == reference and scores[20]["top1"] > 0.9
    similarity, index, _ = knn_neighbours(test_x, train_x, 20)
    ref_similarity, ref_index, _ = knn_neighbours(test_x, train_x, 20, prune=False)
    np.testing.assert_allclose(similarity, ref_similarity, atol=1e-6)
    same_neighbours(index, ref_index, pairwise(test_x, train_x))
