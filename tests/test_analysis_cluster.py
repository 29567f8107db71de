"""Clustering: planted Gaussian blobs over the real keys of the session's synthetic dataset (no training needed),
so the clusters, the sweep and the metadata crossings have known answers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from sklearn.metrics import adjusted_rand_score

import catalog
from analysis.cluster import fit_clusters, run_clusters, silhouette
from analysis.config import ClusterConfig
from analysis.metadata import sample_metadata
from analysis.pca import run_pca
from analysis.runs import AnalysisError
from analysis.store import create_embedding_store, open_embeddings

SWEEP = ClusterConfig(k=4, sweep=(2, 3, 4, 5), silhouette_sample=40, silhouette_seeds=3, examples=2)


def _codes(values) -> np.ndarray:
    return np.unique(np.asarray(values).astype(str), return_inverse=True)[1]


def _blobs(codes: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """One tight blob per code, centres far apart: the clustering a working k-means must find."""
    centres = rng.normal(size=(codes.max() + 1, dim)) * 8.0
    return (centres[codes] + rng.normal(size=(len(codes), dim)) * 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def planted(built, tmp_path_factory):
    """(embeddings, results dir, metadata): rgb blobs follow the camera (vsn), ir blobs follow day/night."""
    with catalog.open(built) as cat:
        keys = cat.query("SELECT key FROM samples ORDER BY key").column("key").to_pylist()
    meta = sample_metadata(built, np.asarray(keys, dtype=object))
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cluster")
    path = root / "embeddings" / "last.zarr"
    create_embedding_store(path, keys, {"rgb": (16, "float32"), "ir": (8, "float32")}, 16,
                           {"identity": "planted", "checkpoint": "last", "dataset": str(built), "where": "TRUE"})
    group = zarr.open_group(str(path), mode="r+")
    group["rgb"][:] = _blobs(_codes(meta["vsn"]), 16, rng)
    group["ir"][:] = _blobs(_codes(meta["is_day"]), 8, rng)
    group["done"][:] = 1
    group.attrs["complete"] = True
    embeddings = open_embeddings(path)
    results = root / "analysis" / "last"
    run_pca(embeddings, results, 6, progress=False, log=lambda m: None)
    return embeddings, results, meta


@pytest.fixture(scope="module")
def swept(planted):
    embeddings, results, meta = planted
    data = run_clusters(embeddings, results, SWEEP, seed=0, log=lambda m: None, progress=False)
    return data, embeddings, results, meta


def test_sweep_keeps_the_planted_k_and_clusters_follow_the_planted_columns(swept):
    data, _, results, meta = swept
    spaces = data["spaces"]
    assert (spaces["rgb"]["k"], spaces["ir"]["k"]) == (3, 2)
    assert [row["k"] for row in spaces["rgb"]["sweep"]] == [2, 3, 4, 5]
    best = max(spaces["rgb"]["sweep"], key=lambda row: row["silhouette_mean"])
    assert best["k"] == 3 and spaces["rgb"]["silhouette_mean"] == best["silhouette_mean"] > 0.8
    assert spaces["rgb"]["nmi"]["vsn"] > 0.95 and spaces["rgb"]["purity"]["vsn"] > 0.95
    assert spaces["ir"]["nmi"]["is_day"] > 0.95
    assert spaces["rgb"]["nmi"]["is_day"] < 0.5  # the rgb blobs know nothing of day/night
    labels = pq.read_table(results / "clusters.parquet").to_pandas()
    assert adjusted_rand_score(_codes(meta["vsn"]), labels["cluster_rgb"]) > 0.9
    assert adjusted_rand_score(_codes(meta["is_day"]), labels["cluster_ir"]) > 0.9
    assert set(data["agreement"]) == {"rgb~ir", "rgb~joint", "ir~joint"}
    assert all(-1 <= item["ari"] <= 1 and 0 <= item["nmi"] <= 1 for item in data["agreement"].values())
    assert spaces["rgb"]["sizes"] == sorted(spaces["rgb"]["sizes"], reverse=True)  # cluster 0 is the largest


def test_every_file_is_written_and_the_tables_add_up(swept):
    data, embeddings, results, meta = swept
    assert json.loads((results / "cluster.json").read_text()) == json.loads(json.dumps(data))
    assert data["embeddings"] == "planted" and data["checkpoint"] == "last"
    expected = {f"{kind}_{space}.png" for kind in ("clusters", "cluster_examples") for space in ("rgb", "ir", "joint")}
    assert set(data["pngs"]) == expected | {"cluster_sweep.png"}
    for name in data["pngs"]:
        assert (results / name).stat().st_size > 1000, name
    assert not list(results.glob("*.tmp*"))

    labels = pq.read_table(results / "clusters.parquet")
    assert labels.column_names == ["key", "cluster_rgb", "cluster_ir", "cluster_joint"]
    assert labels.column("key").to_pylist() == list(embeddings.keys())
    assert str(labels.schema.field("cluster_rgb").type) == "int32"

    tables = pq.read_table(results / data["tables"]).to_pandas()
    assert list(tables.columns) == ["space", "column", "cluster", "value", "count", "share"]
    assert set(tables["column"]) == {"vsn", "position", "is_sky", "is_day", "split", "month", "cloud_class"} & set(meta)
    per_cluster = tables.groupby(["space", "column", "cluster"])
    np.testing.assert_allclose(per_cluster["share"].sum(), 1.0)
    sizes = tables[(tables["space"] == "rgb") & (tables["column"] == "vsn")].groupby("cluster")["count"].sum()
    assert sizes.tolist() == data["spaces"]["rgb"]["sizes"]
    assert "null" in set(tables.loc[tables["column"] == "is_sky", "value"])  # fixed cameras have no is_sky


def test_a_fixed_k_is_reproducible_and_drops_a_stale_sweep_plot(planted, tmp_path):
    embeddings, results, _ = planted
    import shutil

    target = tmp_path / "last"
    shutil.copytree(results, target)
    (target / "cluster_sweep.png").write_bytes(b"stale")
    config = ClusterConfig(k=3, silhouette_sample=40, silhouette_seeds=2, examples=0)
    first = run_clusters(embeddings, target, config, seed=1, log=lambda m: None, progress=False)
    assert not (target / "cluster_sweep.png").exists()
    assert all(item["k"] == 3 and item["sweep"] == [] for item in first["spaces"].values())
    assert not any(name.startswith("cluster_examples") for name in first["pngs"])
    features = zarr.open_group(str(target / "pca.zarr"), mode="r")["rgb"]["features"]
    again = fit_clusters(features, 3, seed=1)
    np.testing.assert_array_equal(again, pq.read_table(target / "clusters.parquet").column("cluster_rgb").to_numpy())


def test_silhouette_is_sampled_and_exact_when_the_sample_covers_everything():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 10]).astype(np.float32)
    labels = np.repeat([0, 1], 300)
    mean, std = silhouette(x, labels, sample_size=100, seeds=4)
    assert 0.8 < mean < 1 and 0 < std < 0.05
    whole = silhouette(x, labels, sample_size=10_000, seeds=4)
    assert whole[1] == 0.0 and abs(whole[0] - mean) < 0.05
    assert np.isnan(silhouette(x, np.zeros(600, dtype=int), 100, 2)[0])  # one cluster: undefined, not an error


def test_k_larger_than_the_samples_and_a_missing_pca_are_one_line(planted, tmp_path):
    embeddings, results, _ = planted
    with pytest.raises(AnalysisError, match=rf"selects {embeddings.n} samples, fewer than cluster.k = 500"):
        run_clusters(embeddings, results, ClusterConfig(k=500), log=lambda m: None, progress=False)
    with pytest.raises(AnalysisError, match=r"fewer than cluster.sweep = 999"):
        run_clusters(embeddings, results, ClusterConfig(sweep=(3, 999)), log=lambda m: None, progress=False)
    with pytest.raises(AnalysisError, match=r"pca.zarr: no PCA"):
        run_clusters(embeddings, tmp_path / "nothing", ClusterConfig(), log=lambda m: None, progress=False)
    assert not (tmp_path / "nothing").exists()
