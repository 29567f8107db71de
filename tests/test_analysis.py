"""Analysis: embeddings in Zarr from any number of ranks, resumable; exact streamed PCA; k-NN; retrieval; the
report; bad input. Small data made by the project's own generator (the session's `trained_run`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import catalog
from analysis.config import EmbedConfig, KNNConfig
from analysis.embed import embed
from analysis.explorer import read_part
from analysis.knn import retrieval_accuracy, weighted_knn
from analysis.neighbours import l2_normalise, topk_neighbours
from analysis.pca import run_pca, streamed_pca
from analysis.runs import AnalysisError, RunDir
from analysis.store import create_embedding_store, open_embeddings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL_CHUNKS = EmbedConfig(chunk_rows=16, batch_size=8, workers=0)


def analysis_cli(*args: str, ranks: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "analysis", *args]
    if ranks > 1:
        argv = [str(BIN / "mpiexec"), "-n", str(ranks), *argv]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def small_chunk_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "analysis.toml"
    path.write_text(f"[embed]\nchunk_rows = 16\nbatch_size = 8\nworkers = 0\n[knn]\nk = [3, 5]\n{extra}")
    return path


def arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ("rgb", "ir", "rgb_z", "ir_z", "key")}


# -- embed ---------------------------------------------------------------------------------------------------

def test_embed_writes_zarr_v3_arrays_in_catalog_order(trained_run_copy, built):
    result = embed(trained_run_copy, "last", config=SMALL_CHUNKS, progress=False, log=lambda m: None)
    group = zarr.open_group(str(result.path), mode="r")
    assert group.metadata.zarr_format == 3
    with catalog.open(built) as cat:
        expected_keys = cat.select("TRUE").column("key").to_pylist()
    n = len(expected_keys)
    assert list(group["key"][:]) == expected_keys
    assert group["rgb"].shape == (n, 192) and group["ir"].shape == (n, 192)
    assert group["rgb"].dtype == np.float32 and group["rgb_z"].shape == (n, 64)
    assert group["rgb"].chunks == (16, 192)
    assert np.isfinite(group["rgb"][:]).all() and np.abs(group["ir"][:]).sum(axis=1).min() > 0
    attrs = dict(group.attrs)
    assert attrs["complete"] is True and attrs["where"] == "TRUE"
    assert attrs["checkpoint_sha256"] == RunDir.open(trained_run_copy).checkpoint("last").sha256
    assert attrs["training_config"]["model"]["depth"] == 1
    # Idempotent: the same command again recomputes nothing and rewrites nothing.
    before = {p: p.stat().st_mtime_ns for p in result.path.rglob("*") if p.is_file()}
    again = embed(trained_run_copy, "last", config=SMALL_CHUNKS, progress=False, log=lambda m: None)
    assert again.skipped and again.computed_rows == 0
    assert before == {p: p.stat().st_mtime_ns for p in result.path.rglob("*") if p.is_file()}


@pytest.mark.mpi
def test_two_ranks_embed_what_one_rank_embeds(trained_run_copy, tmp_path):
    config = small_chunk_config(tmp_path)
    one = embed(trained_run_copy, "last", config=SMALL_CHUNKS, progress=False, log=lambda m: None)
    reference = arrays(one.path)
    thumbs = zarr.open_group(str(one.thumbnails), mode="r")
    thumbs_reference = {name: thumbs[name][:] for name in ("rgb", "ir", "ir_range_c", "row")}
    os.rename(one.path, tmp_path / "one.zarr")
    os.rename(one.thumbnails, tmp_path / "thumbnails-one.zarr")  # the two ranks make the thumbnails too
    done = analysis_cli("embed", str(trained_run_copy), "--config", str(config), "--quiet", ranks=2)
    assert done.returncode == 0, done.stderr
    two = arrays(trained_run_copy / "embeddings" / "last.zarr")
    assert zarr.open_group(str(trained_run_copy / "embeddings" / "last.zarr"), mode="r").attrs["world_size"] == 2
    assert list(two["key"]) == list(reference["key"])
    for name in ("rgb", "ir", "rgb_z", "ir_z"):
        np.testing.assert_allclose(two[name], reference[name], atol=1e-5, rtol=1e-4)
    thumbs_two = zarr.open_group(str(one.thumbnails), mode="r")
    assert thumbs_two.attrs["complete"] is True and thumbs_two.attrs["world_size"] == 2
    for name, values in thumbs_reference.items():
        np.testing.assert_array_equal(thumbs_two[name][:], values)


def test_an_interrupted_embed_resumes_to_the_same_arrays(trained_run_copy, monkeypatch):
    reference = arrays(embed(trained_run_copy, "last", config=SMALL_CHUNKS, progress=False, log=lambda m: None).path)
    path = trained_run_copy / "embeddings" / "last.zarr"
    import shutil

    shutil.rmtree(path)
    from training import loader

    calls = {"n": 0}
    original = loader.BatchViews.__call__

    def dies_on_the_fifth_batch(self, batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(loader.BatchViews, "__call__", dies_on_the_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        embed(trained_run_copy, "last", config=SMALL_CHUNKS, progress=False, log=lambda m: None)
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["complete"] is False and group["done"][:].sum() == 2  # 2 chunks of 2 batches each
    with pytest.raises(AnalysisError, match="incomplete"):
        open_embeddings(path)
    monkeypatch.setattr(loader.BatchViews, "__call__", original)
    resumed = embed(trained_run_copy, "last", config=SMALL_CHUNKS, progress=False, log=lambda m: None)
    assert 0 < resumed.computed_rows == resumed.rows - 32
    after = arrays(path)
    for name in ("rgb", "ir", "rgb_z", "ir_z"):
        np.testing.assert_array_equal(after[name], reference[name])


def test_random_baseline_is_the_runs_initial_weights(trained_run_copy):
    run = RunDir.open(trained_run_copy)
    random_model, _, _ = run.load_model(run.checkpoint("random"))
    trained_model, _, _ = run.load_model(run.checkpoint("last"))
    again, _, _ = run.load_model(run.checkpoint("random"))
    w = "rgb_backbone.patch_embed.proj.weight"
    assert np.array_equal(random_model.state_dict()[w].numpy(), again.state_dict()[w].numpy())
    assert not np.array_equal(random_model.state_dict()[w].numpy(), trained_model.state_dict()[w].numpy())


# -- bad input: one line each, nothing written -----------------------------------------------------------------

def test_bad_input_is_one_clear_line(trained_run_copy, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.toml").write_text((trained_run_copy / "config.toml").read_text())
    cases = [
        (("embed", str(empty)), "no checkpoints"),
        (("embed", str(trained_run_copy), "--checkpoint", "epoch_0099"), "no checkpoint 'epoch_0099'"),
        (("embed", str(trained_run_copy), "--where", "no_such_column = 1"), "not valid SQL"),
        (("embed", str(trained_run_copy), "--where", "split = 'nothing'"), "selects no samples"),
        (("knn", str(trained_run_copy)), "run `analysis embed` first"),
        (("embed", str(tmp_path / "missing")), "no such run directory"),
    ]
    for args, expected in cases:
        done = analysis_cli(*args, "--quiet")
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, done.stderr)
    assert not (trained_run_copy / "embeddings").exists()
    # A checkpoint of another architecture than the run's config.
    text = (trained_run_copy / "config.toml").read_text().replace("depth = 1", "depth = 2")
    (trained_run_copy / "config.toml").write_text(text)
    done = analysis_cli("embed", str(trained_run_copy), "--quiet")
    assert done.returncode == 2 and "another architecture" in done.stderr and "depth 2 -> 1" in done.stderr.replace(
        "depth 1 -> 2", "depth 2 -> 1"), done.stderr
    assert not (trained_run_copy / "embeddings").exists()


def test_fewer_samples_than_k_is_refused(trained_run_copy):
    embeddings = open_embeddings(embed(trained_run_copy, "last", config=SMALL_CHUNKS, progress=False,
                                       log=lambda m: None).path)
    from analysis.knn import run_knn
    from analysis.metadata import sample_metadata

    metadata = sample_metadata(Path(embeddings.attrs["dataset"]), embeddings.keys())
    with pytest.raises(AnalysisError, match="fewer than k = 200"):
        run_knn(embeddings, trained_run_copy / "analysis" / "last", KNNConfig(), metadata)
    assert not (trained_run_copy / "analysis" / "last" / "knn.json").exists()


# -- PCA -------------------------------------------------------------------------------------------------------

def synthetic_store(path: Path, n: int = 1000, dims: tuple[int, int] = (24, 16), chunk_rows: int = 128,
                    seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(8, sum(dims)))
    data = rng.normal(size=(n, 8)) @ mixing * 3 + rng.normal(size=(n, sum(dims))) * 0.1 + 50.0  # big mean
    keys = [f"k{i:06d}" for i in range(n)]
    create_embedding_store(path, keys, {"rgb": (dims[0], "float32"), "ir": (dims[1], "float32")}, chunk_rows,
                           {"identity": "test", "checkpoint": "last", "dataset": "none"})
    group = zarr.open_group(str(path), mode="r+")
    group["rgb"][:] = data[:, : dims[0]]
    group["ir"][:] = data[:, dims[0] :]
    group["done"][:] = 1
    group.attrs["complete"] = True


def test_streamed_pca_equals_in_memory_pca(tmp_path):
    from sklearn.decomposition import PCA

    path = tmp_path / "e.zarr"
    synthetic_store(path, n=1000, chunk_rows=128)  # 1000 is not a multiple of 128
    embeddings = open_embeddings(path)
    for space in ("rgb", "ir", "joint"):
        x = embeddings.block(space, 0, embeddings.n).astype(np.float64)
        reference = PCA(n_components=10).fit(x)
        fit = streamed_pca(embeddings, space, 10)
        np.testing.assert_allclose(fit.explained_variance_ratio, reference.explained_variance_ratio_, atol=1e-4)
        np.testing.assert_allclose(fit.explained_variance, reference.explained_variance_, rtol=1e-4)
        np.testing.assert_allclose(fit.components[:8], reference.components_[:8], atol=1e-4)  # the 8 real axes
        np.testing.assert_allclose(fit.transform(x[:50].astype(np.float32))[:, :8], reference.transform(x[:50])[:, :8],
                                   atol=1e-3)
    summary = run_pca(embeddings, tmp_path / "results", 10, progress=False, log=lambda m: None)
    assert summary["joint"]["explained_by_components"] > 0.99
    features = zarr.open_group(str(tmp_path / "results" / "pca.zarr"), mode="r")["rgb"]["features"][:]
    assert features.shape == (1000, 10)
    np.testing.assert_allclose(features[:, :8], PCA(10).fit_transform(embeddings.block("rgb", 0, 1000).astype(np.float64))[:, :8],
                               atol=1e-3)
    assert (tmp_path / "results" / "pca.png").stat().st_size > 0


@pytest.mark.mpi
def test_pca_under_two_ranks_equals_one_rank(tmp_path):
    path = tmp_path / "e.zarr"
    synthetic_store(path, n=700, chunk_rows=64)
    script = (
        "import sys, json; from pathlib import Path; from analysis.store import open_embeddings; "
        "from analysis.pca import run_pca; "
        "run_pca(open_embeddings(Path(sys.argv[1])), Path(sys.argv[2]), 6, progress=False, log=lambda m: None)"
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for ranks, out in ((1, "one"), (2, "two")):
        argv = [sys.executable, "-c", script, str(path), str(tmp_path / out)]
        if ranks > 1:
            argv = [str(BIN / "mpiexec"), "-n", "2", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr
    one = zarr.open_group(str(tmp_path / "one" / "pca.zarr"), mode="r")
    two = zarr.open_group(str(tmp_path / "two" / "pca.zarr"), mode="r")
    for space in ("rgb", "ir", "joint"):
        np.testing.assert_allclose(two[space]["features"][:], one[space]["features"][:], atol=1e-4)
        np.testing.assert_allclose(two[space]["explained_variance"][:], one[space]["explained_variance"][:], rtol=1e-9)


# -- k-NN and retrieval ---------------------------------------------------------------------------------------

def test_weighted_knn_finds_planted_labels_and_not_random_ones():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 4
    train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 100)
    train_x = l2_normalise(centres[train_y] + rng.normal(size=(400, 32)))
    test_x = l2_normalise(centres[test_y] + rng.normal(size=(100, 32)))
    planted = weighted_knn(train_x, train_y, test_x, test_y, (1, 5, 20), 0.07, 4, query_chunk=33)
    assert all(scores["top1"] == 1.0 for scores in planted.values())
    shuffled = weighted_knn(train_x, rng.permutation(train_y), test_x, test_y, (20,), 0.07, 4)
    assert shuffled[20]["top1"] < 0.5


def test_blocked_neighbours_equal_brute_force():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(300, 12)).astype(np.float32)
    distances, index = topk_neighbours(base, base, 4, "euclidean", query_chunk=37, exclude_self=True)
    full = np.linalg.norm(base[:, None] - base[None], axis=2)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(index, np.argsort(full, axis=1)[:, :4])
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :4], atol=1e-4)


def test_retrieval_finds_partners_and_is_chance_without_them():
    rng = np.random.default_rng(2)
    rgb = l2_normalise(rng.normal(size=(200, 16)))
    ir = l2_normalise(rgb + rng.normal(size=(200, 16)) * 0.05)
    assert retrieval_accuracy(rgb, ir, (1, 5)) == {1: 1.0, 5: 1.0}
    unrelated = retrieval_accuracy(rgb, l2_normalise(rng.normal(size=(200, 16))), (1, 5))
    assert unrelated[5] < 0.15


# -- the whole command ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_all_writes_a_complete_report(trained_run_copy, tmp_path):
    config = small_chunk_config(tmp_path, "[tsne]\nlink_pairs = 20\n[attention]\ncount = 2\nwhere = 'TRUE'\n")
    done = analysis_cli("all", str(trained_run_copy), "--config", str(config), "--quiet", timeout=600)
    assert done.returncode == 0, done.stderr
    index = Path(done.stdout.strip().splitlines()[-1])
    assert index == trained_run_copy / "report" / "index.html"
    text = index.read_text()
    import re

    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) >= 8
    # The terminal shows the trained model's k-NN against the random-init model's, label by label.
    assert "k-NN on the test split, trained vs random init:" in done.stderr
    assert re.search(r"is_sky top-1 \(k=\d+, joint\): trained \d+\.\d%, random init \d+\.\d%", done.stderr)
    for src in sources:
        assert (index.parent / src).stat().st_size > 0, src
    for expected in ("Trained vs random init", "k-NN is_sky", "retrieval RGB -&gt; IR", "silhouette", "attention"):
        assert expected in text, expected
    for checkpoint in ("last", "random"):
        for name in ("pca.json", "knn.json", "retrieval.json", "cluster.json"):
            assert (trained_run_copy / "analysis" / checkpoint / name).exists()
    # The explorer, linked from the report: every map the run has, every embedded key, the clusters, thumbnails.
    explorer = index.parent / "explorer"
    assert (explorer / "index.html").exists() and "href='explorer/index.html'" in text
    meta = read_part(explorer / "data" / "meta.js")
    assert {"t-SNE joint", "t-SNE RGB", "t-SNE IR", "PCA joint", "PCA joint (random init)",
            "t-SNE RGB-IR link"} <= {m["name"] for m in meta["maps"]}
    keys = read_part(explorer / "data" / f"{meta['keysPart']}.js")["keys"].split("\n")
    assert keys == list(open_embeddings(trained_run_copy / "embeddings" / "last.zarr").keys())
    assert {"cluster_joint", "vsn", "is_sky"} <= {c["name"] for c in meta["columns"]} and meta["thumbs"]["atlases"]
    assert (trained_run_copy / "analysis" / "evolution.png").exists()
    # Everything is fresh now: a second `all` recomputes nothing.
    stamp = (trained_run_copy / "analysis" / "last" / "knn.json").stat().st_mtime_ns
    again = analysis_cli("all", str(trained_run_copy), "--config", str(config), "--quiet", timeout=600)
    assert again.returncode == 0, again.stderr
    assert (trained_run_copy / "analysis" / "last" / "knn.json").stat().st_mtime_ns == stamp
    compare = analysis_cli("compare", str(trained_run_copy), str(trained_run_copy), "--out", str(tmp_path / "cmp"))
    assert compare.returncode == 0, compare.stderr
    assert "k-NN is_sky" in compare.stdout and (tmp_path / "cmp" / "compare.html").exists()
    header = compare.stdout.splitlines()[0]
    assert "(vicreg, rgb-ir) random init |" in header, header  # each run's random-init model beside it


@pytest.mark.slow
def test_a_trained_model_retrieves_its_own_ir_partner_well_above_chance(built, tmp_path):
    """VICReg's invariance term aligns the two branches: after a short training, a sample's RGB embedding finds
    its own IR partner far more often than chance, and far more often than the random-init model's does."""
    from analysis.knn import run_retrieval
    from analysis.metadata import sample_metadata
    from training.config import load_training_config
    from training.train import run_training

    config_path = tmp_path / "train.toml"
    config_path.write_text(
        f'[data]\ndataset = "{built}"\nwhere = "TRUE"\nir_size = [32, 48]\nworkers = 0\n'
        '[model]\nrgb_arch = "vit_tiny_patch16_224"\nir_arch = "vit_tiny_patch16_224"\ndepth = 1\nexpander = [128, 128]\n'
        '[optim]\nname = "adamw"\nbase_lr = 0.002\nwarmup_epochs = 1\n'
        f'[train]\nepochs = 40\nbatch_size = 16\ncheckpoint_every = 40\nlog_every = 10\nprecision = "fp32"\n'
        f'[run]\ndir = "{tmp_path / "run"}"\n')
    assert run_training(load_training_config(str(config_path)), progress=False, log=lambda m: None) == 0
    scores = {}
    for checkpoint in ("last", "random"):
        embeddings = open_embeddings(embed(tmp_path / "run", checkpoint, config=SMALL_CHUNKS, progress=False,
                                           log=lambda m: None).path)
        metadata = sample_metadata(built, embeddings.keys())
        metadata["split"] = "all"  # every pair takes part: a harder test than the few test-split pairs
        scores[checkpoint] = run_retrieval(embeddings, tmp_path / checkpoint, metadata, split="all",
                                           log=lambda m: None)
    trained, baseline = scores["last"], scores["random"]
    chance = trained["chance"]["5"]
    assert trained["n"] >= 50
    assert trained["rgb_to_ir"]["5"] > 3 * chance and trained["ir_to_rgb"]["5"] > 3 * chance, trained
    assert trained["rgb_to_ir"]["5"] > 2 * baseline["rgb_to_ir"]["5"], (trained, baseline)
