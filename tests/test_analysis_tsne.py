"""t-SNE: planted blobs stay apart, tiny inputs work, the files `run_tsne` writes, sampling above max_points, and the
RGB-IR link map (identical rgb_z and ir_z give pairs far closer than random pairs). Small data: a store whose keys
are the session's synthetic dataset (`built`), so the catalog metadata joins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import catalog
import analysis.tsne as tsne_module
from analysis.config import TSNEConfig
from analysis.pca import run_pca
from analysis.runs import AnalysisError
from analysis.store import create_embedding_store, open_embeddings
from analysis.tsne import link_distances, run_tsne, tsne_embed

QUIET = {"progress": False, "log": lambda message: None}


def blobs(n_per: int, centres: int, dim: int, seed: int = 0, spread: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)) * spread
    labels = np.repeat(np.arange(centres), n_per)
    return (means[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def knn_accuracy(xy: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    votes = labels[np.argsort(d, axis=1)[:, :k]]
    predicted = np.array([np.bincount(row).argmax() for row in votes])
    return float((predicted == labels).mean())


# -- tsne_embed --------------------------------------------------------------------------------------------------

def test_planted_blobs_stay_apart_and_a_seed_repeats():
    x, labels = blobs(80, 4, 20)
    xy = tsne_embed(x, perplexity=30, n_jobs=1, seed=0)
    assert xy.shape == (len(x), 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    assert knn_accuracy(xy, labels) > 0.9
    # Each blob's 2-D centre is farther from the other centres than its points are from it.
    centres = np.stack([xy[labels == c].mean(axis=0) for c in range(4)])
    spread = max(np.linalg.norm(xy[labels == c] - centres[c], axis=1).mean() for c in range(4))
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(4, 1)]
    assert gaps.min() > 2 * spread
    np.testing.assert_allclose(tsne_embed(x, perplexity=30, n_jobs=1, seed=0), xy)


def test_the_maps_neighbours_are_the_exact_knn():
    x, labels = blobs(60, 10, 20, seed=2)
    xy, details = tsne_module._embed(x, 10, 1, 0)
    assert details["knn_method"] == "all pairs" and details["k"] == 30
    assert knn_accuracy(xy, labels) > 0.9
    indices, distances, _ = tsne_module._neighbours(x, 30, 1)
    full = np.linalg.norm(x[:, None].astype(np.float64) - x[None], axis=2)
    np.fill_diagonal(full, np.inf)
    assert not (indices == np.arange(len(x))[:, None]).any()
    # The same neighbours but for float32 near-ties: their true distances are the 30 smallest.
    nearest = np.sort(full, axis=1)[:, :30]
    np.testing.assert_allclose(np.take_along_axis(full, indices, axis=1), nearest, atol=1e-3)
    assert distances.dtype == np.float64
    np.testing.assert_allclose(distances, nearest, atol=1e-2)


@pytest.mark.parametrize("n", [100, 12, 3, 1, 0])
def test_small_inputs_clip_the_perplexity(n):
    x, _ = blobs(max(n, 1), 1, 8)
    xy = tsne_embed(x[:n], perplexity=30, n_jobs=0, seed=1)
    assert xy.shape == (n, 2) and np.isfinite(xy).all()
    if n >= 12:
        assert np.ptp(xy, axis=0).min() > 0


def test_large_maps_run_the_shorter_early_exaggeration(monkeypatch):
    x, labels = blobs(60, 10, 20, seed=3)
    _, small = tsne_module._embed(x, 10, 1, 0)
    assert small["early_exaggeration_iter"] == tsne_module.EARLY_EXAGGERATION_ITER == 250
    assert small["n_iter"] == tsne_module.N_ITER == 500
    # The same rule at a threshold this test can reach: openTSNE gets the shorter early phase, and the blobs still
    # come apart.
    monkeypatch.setattr(tsne_module, "FFT_EARLY_ITER_FROM", len(x))
    xy, large = tsne_module._embed(x, 10, 1, 0)
    assert large["early_exaggeration_iter"] == tsne_module.FFT_EARLY_ITER < 250
    assert knn_accuracy(xy, labels) > 0.9
    assert large["kl_divergence"] is not None and np.isfinite(large["kl_divergence"])


@pytest.mark.parametrize("n_jobs", [2, 3])
def test_the_overlapped_objective_is_opentsnes(n_jobs):
    import scipy.sparse as sparse
    from openTSNE.tsne import kl_divergence_fft

    rng = np.random.default_rng(4)
    n, k = 2_000, 15
    embedding = rng.normal(scale=20, size=(n, 2))
    p = sparse.csr_matrix((rng.random(n * k), (np.repeat(np.arange(n), k), rng.integers(0, n, n * k))), shape=(n, n))
    p /= p.sum()
    fft_params = {"n_interpolation_points": 3, "min_num_intervals": 50, "ints_in_interval": 1}
    objective = tsne_module.OverlappedFFTGradient(n_jobs)
    try:
        for evaluate in (True, False):
            kl, gradient = objective(embedding, p, 1, fft_params, should_eval_error=evaluate)
            expected_kl, expected = kl_divergence_fft(embedding, p, 1, fft_params, should_eval_error=evaluate, n_jobs=1)
            np.testing.assert_allclose(gradient, expected, rtol=1e-12, atol=1e-15)
            assert kl == pytest.approx(expected_kl, rel=1e-12)
        # A 1-D map goes to openTSNE's own objective.
        line = np.ascontiguousarray(embedding[:, :1])
        np.testing.assert_array_equal(objective(line, p, 1, fft_params)[1],
                                      kl_divergence_fft(line, p, 1, fft_params, n_jobs=n_jobs)[1])
        with pytest.raises(ValueError, match="makes maps"):  # adding points to a map: a clear error, not a crash
            objective(embedding[:10], p[:10], 1, fft_params, reference_embedding=embedding)
    finally:
        objective.close()


def test_large_maps_on_two_threads_overlap_the_gradient(monkeypatch):
    x, labels = blobs(60, 10, 20, seed=5)
    # Fewer iterations: the FFT objective on 600 points costs ~25 ms an iteration (its grid has 50 intervals or more).
    monkeypatch.setattr(tsne_module, "N_ITER", 150)
    monkeypatch.setattr(tsne_module, "FFT_EARLY_ITER_FROM", len(x))
    monkeypatch.setattr(tsne_module, "FFT_EARLY_ITER", 50)
    _, serial = tsne_module._embed(x, 10, 2, 0)
    assert serial["overlapped_gradient"] is False  # below SERIAL_BELOW: one thread, openTSNE's own objective
    monkeypatch.setattr(tsne_module, "SERIAL_BELOW", len(x))
    xy, overlapped = tsne_module._embed(x, 10, 2, 0)
    assert overlapped["overlapped_gradient"] is True
    assert knn_accuracy(xy, labels) > 0.9 and np.isfinite(overlapped["kl_divergence"])
    np.testing.assert_allclose(tsne_module._embed(x, 10, 2, 0)[0], xy)  # still repeatable


def test_link_distances_of_pairs_and_non_pairs():
    first = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    second = first + [[1.0, 0.0]]
    summary = link_distances(first, second)
    assert summary["pair_distance"] == pytest.approx(1.0) and summary["pair_nearest"] == 1.0
    non_pairs = [np.linalg.norm(first[i] - second[j]) for i in range(3) for j in range(3) if i != j]
    assert summary["random_distance"] == pytest.approx(np.mean(non_pairs))
    assert summary["ratio"] == pytest.approx(1.0 / np.mean(non_pairs))


# -- run_tsne ----------------------------------------------------------------------------------------------------

def make_store(root: Path, dataset: Path, projections: str = "independent", name: str = "last.zarr") -> Path:
    """Embeddings of every catalog sample: rgb/ir separate sky from ground, so the maps have structure;
    rgb_z/ir_z are independent noise, identical, or absent."""
    with catalog.open(dataset) as cat:
        table = cat.query("SELECT key, coalesce(is_sky, false) AS sky FROM samples ORDER BY key")
    keys, sky = table.column("key").to_pylist(), np.asarray(table.column("sky").to_pylist(), dtype=bool)
    n = len(keys)
    rng = np.random.default_rng(0)
    dims = {"rgb": (12, "float32"), "ir": (10, "float32")}
    if projections != "none":
        dims.update({"rgb_z": (16, "float16"), "ir_z": (16, "float16")})
    path = root / name
    create_embedding_store(path, keys, dims, chunk_rows=16,
                           attrs={"identity": f"test-{projections}", "checkpoint": "last", "dataset": str(dataset)})
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group["rgb"][:] = (rng.normal(size=(n, 12)) + 6 * sky[:, None]).astype(np.float32)
    group["ir"][:] = (rng.normal(size=(n, 10)) - 6 * sky[:, None]).astype(np.float32)
    if projections != "none":
        z = rng.normal(size=(n, 16)).astype(np.float16)
        group["rgb_z"][:] = z
        group["ir_z"][:] = z if projections == "identical" else rng.normal(size=(n, 16)).astype(np.float16)
    group["done"][:] = 1
    group.attrs.update({"complete": True})
    return path


@pytest.fixture(scope="module")
def synthetic_run(built, tmp_path_factory) -> tuple[Path, Path]:
    """(embeddings with identical rgb_z and ir_z, the results directory with its pca.zarr)."""
    root = tmp_path_factory.mktemp("tsne")
    store = make_store(root, built, "identical")
    results = root / "analysis" / "last"
    run_pca(open_embeddings(store), results, components=6, **QUIET)
    return store, results


def test_run_tsne_writes_maps_plots_and_json_last(synthetic_run, built):
    store, results = synthetic_run
    embeddings = open_embeddings(store)
    n = embeddings.n
    summary = run_tsne(embeddings, results, TSNEConfig(perplexity=10, n_jobs=0, link_pairs=40), seed=0,
                       dataset=built, **QUIET)
    on_disk = json.loads((results / "tsne.json").read_text())
    assert on_disk["embeddings"] == embeddings.identity and on_disk["checkpoint"] == "last"
    assert list(on_disk["spaces"]) == ["joint", "rgb", "ir"]
    for item in on_disk["spaces"].values():
        assert item["points"] == n and item["sampled"] is False and item["seconds"] >= 0
    assert on_disk["pngs"] == ["tsne_joint.png", "tsne_rgb.png", "tsne_ir.png", "tsne_link.png"]
    for png in on_disk["pngs"]:
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"is_sky", "is_day", "vsn", "position", "split", "month", "hour_local"} <= set(on_disk["columns"])
    assert not list(results.glob("*.tmp*"))

    table = pq.read_table(results / "tsne.parquet").to_pandas()
    assert len(table) == 3 * n and {"key", "space", "x", "y", "row"} <= set(table.columns)
    keys = embeddings.keys()
    for space in ("joint", "rgb", "ir"):
        part = table[table["space"] == space]
        assert list(part["key"]) == list(keys) and list(part["row"]) == list(range(n))
        assert np.isfinite(part[["x", "y"]].to_numpy()).all()
    # The planted sky/ground split survives into the joint map.
    joint = table[table["space"] == "joint"]
    with catalog.open(built) as cat:
        rows = cat.query("SELECT key, coalesce(is_sky, false) AS sky FROM samples").to_pylist()
    sky = {row["key"]: row["sky"] for row in rows}
    labels = np.array([sky[k] for k in joint["key"]], dtype=int)
    assert knn_accuracy(joint[["x", "y"]].to_numpy(), labels) > 0.9

    # Identical rgb_z and ir_z: each sample's two points sit together, far closer than random pairs.
    link = summary["link"]
    assert link == on_disk["link"] and link["pairs"] == 40
    assert link["ratio"] < 0.2 and link["pair_distance"] < 0.2 * link["random_distance"]
    assert link["pair_nearest"] > 0.8


def test_sampling_above_max_points_records_the_rows(synthetic_run, tmp_path):
    store, results = synthetic_run
    embeddings = open_embeddings(store)
    target = tmp_path / "results"
    target.mkdir()
    import shutil

    shutil.copytree(results / "pca.zarr", target / "pca.zarr")
    cap = embeddings.n // 2
    config = TSNEConfig(max_points=cap, perplexity=5, n_jobs=1, link_pairs=0)
    summary = run_tsne(embeddings, target, config, seed=3, dataset=Path("/nonexistent"), **QUIET)
    assert all(item["points"] == cap and item["sampled"] is True for item in summary["spaces"].values())
    assert summary["link"] is None and summary["link_skipped"] and summary["columns"] == []
    assert not (target / "tsne_link.png").exists()
    table = pq.read_table(target / "tsne.parquet").to_pandas()
    rows = {space: list(part["row"]) for space, part in table.groupby("space", observed=True)}
    assert len(rows) == 3 and rows["joint"] == rows["rgb"] == rows["ir"]
    assert len(rows["joint"]) == cap and rows["joint"] == sorted(set(rows["joint"]))
    keys = embeddings.keys()
    part = table[table["space"] == "ir"]
    assert list(part["key"]) == list(keys[np.asarray(rows["ir"])])
    # The sample is a function of the seed.
    again = run_tsne(embeddings, target, config, seed=3, dataset=Path("/nonexistent"), **QUIET)
    assert again["spaces"]["joint"]["points"] == cap
    assert list(pq.read_table(target / "tsne.parquet").to_pandas().query("space == 'ir'")["row"]) == rows["ir"]


def test_without_projections_the_link_map_is_skipped_and_said(built, tmp_path):
    store = make_store(tmp_path, built, "none")
    embeddings = open_embeddings(store)
    results = tmp_path / "results"
    run_pca(embeddings, results, components=4, spaces=("rgb",), **QUIET)
    summary = run_tsne(embeddings, results, TSNEConfig(perplexity=5, n_jobs=1), dataset=built, **QUIET)
    assert list(summary["spaces"]) == ["rgb"]
    assert summary["link"] is None and "rgb_z" in summary["link_skipped"]
    assert json.loads((results / "tsne.json").read_text())["pngs"] == ["tsne_rgb.png"]


def test_pca_of_other_embeddings_is_refused(synthetic_run, built, tmp_path):
    _, results = synthetic_run
    other = open_embeddings(make_store(tmp_path, built, "independent"))
    with pytest.raises(AnalysisError, match="run `analysis pca` again"):
        run_tsne(other, results, TSNEConfig(), **QUIET)


def test_independent_projections_are_no_closer_than_random(built, tmp_path):
    store = make_store(tmp_path, built, "independent")
    embeddings = open_embeddings(store)
    results = tmp_path / "results"
    run_pca(embeddings, results, components=4, spaces=("ir",), **QUIET)
    link = run_tsne(embeddings, results, TSNEConfig(perplexity=10, n_jobs=1, link_pairs=60), dataset=built,
                    **QUIET)["link"]
    assert link["ratio"] > 0.6


# -- openTSNE internals ------------------------------------------------------------------------------------------
# OverlappedFFTGradient calls openTSNE internals (openTSNE._tsne, openTSNE.tsne): these pin exactly what it relies
# on, so an openTSNE upgrade that changes them fails here, saying what changed, instead of drawing other maps.

def _small_problem(n: int = 60, seed: int = 0):
    """A 2-D map and a symmetric, normalised sparse P (zero diagonal), as openTSNE's optimiser hands them over."""
    import scipy.sparse as sparse

    rng = np.random.default_rng(seed)
    embedding = rng.normal(scale=3, size=(n, 2))
    rows, cols = np.repeat(np.arange(n), 5), rng.integers(0, n, n * 5)
    p = sparse.csr_matrix((rng.random(n * 5), (rows, cols)), shape=(n, n))
    p.setdiag(0)
    p.eliminate_zeros()
    p = p + p.T
    return embedding, sparse.csr_matrix(p / p.sum())


def test_opentsne_internals_exist_with_the_signatures_used():
    import inspect

    import openTSNE
    from openTSNE import _tsne
    from openTSNE import tsne as opentsne_tsne

    version = openTSNE.__version__
    # Parameter names in order: OverlappedFFTGradient passes the leading ones by position, the rest by keyword.
    expected = {
        _tsne.estimate_negative_gradient_fft_2d: ["embedding", "gradient", "n_interpolation_points",
                                                  "min_num_intervals", "ints_in_interval", "dof"],
        _tsne.estimate_positive_gradient_nn: ["indices", "indptr", "P_data", "embedding", "reference_embedding",
                                              "gradient", "dof", "num_threads", "should_eval_error"],
        opentsne_tsne.kl_divergence_fft: ["embedding", "P", "dof", "fft_params", "reference_embedding",
                                          "should_eval_error", "n_jobs"],
    }
    for function, names in expected.items():
        got = list(inspect.signature(function).parameters)
        assert got[: len(names)] == names, f"openTSNE {version}: {function.__name__}{inspect.signature(function)}"
    assert 0 < opentsne_tsne.EPSILON < 1e-12, f"openTSNE {version}: tsne.EPSILON = {opentsne_tsne.EPSILON!r}"
    # The module's own import-time check agrees and finds the same objects.
    found = tsne_module._opentsne_internals()
    assert found["_tsne.estimate_positive_gradient_nn"] is _tsne.estimate_positive_gradient_nn
    assert set(found) == set(tsne_module.OPENTSNE_INTERNALS)


def test_the_private_gradients_are_the_exact_tsne_gradient():
    from openTSNE import _tsne

    embedding, p = _small_problem()
    diff = embedding[:, None] - embedding[None]
    w = 1 / (1 + (diff**2).sum(axis=2))  # Student-t kernel, dof = 1
    np.fill_diagonal(w, 0)
    z = w.sum()
    dense = p.toarray()
    # Repulsive: -sum_j w_ij^2 (y_i - y_j) / Z, and Z, interpolated on the FFT grid (approximate).
    repulsive = np.zeros_like(embedding)
    sum_q = _tsne.estimate_negative_gradient_fft_2d(embedding, repulsive, n_interpolation_points=3,
                                                    min_num_intervals=50, ints_in_interval=1, dof=1)
    assert sum_q == pytest.approx(z, rel=1e-3)
    exact = -((w**2)[:, :, None] * diff).sum(axis=1) / z
    np.testing.assert_allclose(repulsive, exact, rtol=0, atol=5e-3 * np.abs(exact).max())  # measured: 1.3e-3
    # Attractive: sum_j p_ij w_ij (y_i - y_j), exact; sum P and sum p log(p / w), which with log Z is KL(P || Q).
    attractive = np.zeros_like(embedding)
    sum_p, kl = _tsne.estimate_positive_gradient_nn(p.indices, p.indptr, p.data, embedding, embedding, attractive, 1,
                                                    num_threads=1, should_eval_error=True)
    np.testing.assert_allclose(attractive, ((dense * w)[:, :, None] * diff).sum(axis=1), rtol=1e-10, atol=1e-15)
    assert sum_p == pytest.approx(1.0, rel=1e-12)
    nz = dense > 0
    exact_kl = float((dense[nz] * np.log(dense[nz] / (w[nz] / z))).sum())
    assert kl + sum_p * np.log(sum_q + tsne_module._EPSILON) == pytest.approx(exact_kl, rel=1e-3)
    # Without should_eval_error no KL is computed (OverlappedFFTGradient relies on it being 0 then, not garbage).
    again = np.zeros_like(embedding)
    assert _tsne.estimate_positive_gradient_nn(p.indices, p.indptr, p.data, embedding, embedding, again, 1,
                                               num_threads=1, should_eval_error=False)[1] == 0
    np.testing.assert_array_equal(again, attractive)


def test_opentsne_calls_a_callable_objective_the_way_it_is_written_for():
    from openTSNE import TSNE

    x, _ = blobs(60, 3, 8, seed=6)
    calls = []
    objective = tsne_module.OverlappedFFTGradient(2)

    def recording(*args, **kwargs):
        calls.append((len(args), sorted(kwargs), sorted(kwargs.get("fft_params", {}))))
        return objective(*args, **kwargs)

    try:
        TSNE(perplexity=10, early_exaggeration_iter=5, n_iter=5, n_jobs=1, random_state=0, verbose=False,
             negative_gradient_method=recording).fit(x)
    finally:
        objective.close()
    assert calls, "openTSNE no longer calls a callable negative_gradient_method"
    positional, keywords, fft = calls[0]
    # (embedding, P) by position; the rest by keyword, fft_params with the three keys passed on to the FFT term.
    assert positional == 2 and {"dof", "fft_params", "reference_embedding", "should_eval_error"} <= set(keywords)
    assert fft == ["ints_in_interval", "min_num_intervals", "n_interpolation_points"]


def test_the_overlapped_map_is_opentsnes_public_fft_map():
    from openTSNE import TSNE

    x, _ = blobs(100, 3, 10, seed=7)
    settings = dict(perplexity=10, early_exaggeration_iter=20, n_iter=30, initialization="pca", n_jobs=1,
                    random_state=0, verbose=False)
    public = TSNE(negative_gradient_method="fft", **settings).fit(x)
    objective = tsne_module.OverlappedFFTGradient(2)
    try:
        ours = TSNE(negative_gradient_method=objective, **settings).fit(x)
    finally:
        objective.close()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(public), rtol=0, atol=1e-8 * np.abs(public).max())
    assert ours.kl_divergence == pytest.approx(public.kl_divergence, rel=1e-10)


def test_a_changed_internal_is_a_clear_import_error(monkeypatch):
    import openTSNE

    monkeypatch.setitem(tsne_module.OPENTSNE_INTERNALS, "_tsne.estimate_negative_gradient_fft_3d", None)
    with pytest.raises(ImportError, match=f"openTSNE {openTSNE.__version__}.*_tsne.estimate_negative_gradient_fft_3d "
                                          "is missing"):
        tsne_module._opentsne_internals()
    monkeypatch.delitem(tsne_module.OPENTSNE_INTERNALS, "_tsne.estimate_negative_gradient_fft_3d")
    monkeypatch.setitem(tsne_module.OPENTSNE_INTERNALS, "tsne.kl_divergence_fft",
                        (("embedding", "P", "degrees_of_freedom"), ()))
    with pytest.raises(ImportError, match=r"kl_divergence_fft\(.*does not take \(embedding, P, degrees_of_freedom"):
        tsne_module._opentsne_internals()
