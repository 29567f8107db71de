"""Result records: every kind round-trips through its file, a renamed or unknown field is refused naming the file
and the field, the writer cannot write what the reader refuses, and the report is built from records alone (so
it cannot read a field a record does not define). The end-to-end skip of steps a dataset cannot support is here
too: a dataset without a test split still gets every other step and a report that says what was skipped."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import pytest

from analysis.config import AnalysisConfig
from analysis.pipeline import Analysis
from analysis.report import knn_against_baseline, summary_rows, write_report
from analysis.results import (RECORDS, Agreement, AttentionResult, ClusterResult, ClusterSettings, ClusterSpace,
                              EvolutionPoint, EvolutionResult, EvolutionRetrieval, KNNLabel, KNNResult, KNNScore,
                              PCAResult, PCASpace, RetrievalResult, SkippedStep, SkippedSteps, SweepPoint,
                              TSNELink, TSNEResult, TSNESettings, TSNESpace, load_checkpoint_results, read_result,
                              result_json, write_result)
from analysis.runs import AnalysisError, RunDir
from analysis.store import is_fresh
from tests.conftest import TINY_RUN
from tests.test_analysis import analysis_cli, small_chunk_config

# -- examples --------------------------------------------------------------------------------------------------


def example(hint, name: str = "x"):
    """A value of every field of ``hint`` filled, nested records and optional fields included."""
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{f.name: example(hints[f.name], f.name) for f in dataclasses.fields(hint)})
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if args and type(None) in args:
        return example(next(a for a in args if a is not type(None)), name)
    if origin is dict:
        return {"a": example(args[1], name), "b": example(args[1], name)}
    if origin is list:
        return [example(args[0], name)]
    return {str: f"{name}-text", int: 7, float: 0.25, bool: True}[hint]


def realistic(identity: str = "emb-1", checkpoint: str = "last", top1: float = 0.875) -> dict[str, object]:
    """A checkpoint's records as the steps write them (k as text, spaces rgb/ir/joint)."""
    scores = {"20": KNNScore(top1=top1, top5=None), "5": KNNScore(top1=0.5, top5=None)}
    spaces = ("rgb", "ir", "joint")
    return {
        "pca": PCAResult(embeddings=identity, checkpoint=checkpoint, png="pca.png", spaces={
            s: PCASpace(n=100, dim=192, components=50, explained_variance_ratio=[0.5, 0.25],
                        explained_by_components=0.93, components_for_90pct=31) for s in spaces}),
        "knn": KNNResult(embeddings=identity, checkpoint=checkpoint, k=[5, 20], temperature=0.07, train=80, test=20,
                         labels={"is_sky": KNNLabel(classes=2, majority_baseline=0.6,
                                                    spaces={s: scores for s in spaces})},
                         skipped_labels={"cloud_class": "0 labelled training samples, 0 test"}),
        "retrieval": RetrievalResult(embeddings=identity, checkpoint=checkpoint, split="test", n=20, k=[1, 5],
                                     rgb_to_ir={"1": 0.45, "5": 0.8}, ir_to_rgb={"1": 0.4, "5": 0.75},
                                     chance={"1": 0.05, "5": 0.25}),
        "cluster": ClusterResult(
            embeddings=identity, checkpoint=checkpoint, n=100, seed=0, tables="cluster_tables.parquet",
            clusters="clusters.parquet", pngs=["clusters_rgb.png"],
            config=ClusterSettings(k=4, sweep=[], silhouette_sample=40, silhouette_seeds=3, examples=2),
            spaces={s: ClusterSpace(k=4, silhouette_mean=0.321, silhouette_std=0.012, sizes=[40, 30, 20, 10],
                                    nmi={"is_sky": 0.654, "vsn": None}, purity={"is_sky": 0.9, "vsn": None},
                                    sweep=[SweepPoint(k=4, silhouette_mean=0.321, silhouette_std=None)])
                    for s in spaces},
            agreement={"rgb~ir": Agreement(ari=0.111, nmi=0.222)}),
        "tsne": TSNEResult(
            embeddings=identity, checkpoint=checkpoint, seed=0, n=100, sampled=False, parquet="tsne.parquet",
            config=TSNESettings(max_points=1000, perplexity=30.0, n_jobs=0, link_pairs=20), columns=["is_sky"],
            spaces={"joint": TSNESpace.of(points=100, sampled=False, seconds=1.5, features=50, details={
                "perplexity": 30.0, "k": 90, "knn": "exact", "knn_method": "all pairs", "early_exaggeration_iter": 250,
                "n_iter": 500, "overlapped_gradient": False, "knn_seconds": 0.1, "affinity_seconds": 0.1,
                "optimise_seconds": 1.0, "kl_divergence": 1.25})},
            link=TSNELink(pairs=20, pair_distance=0.123, random_distance=4.567, ratio=0.0269, pair_nearest=0.9,
                          pair_nearest_chance=0.05, pca_components=10, perplexity=6.0, seconds=0.5,
                          png="tsne_link.png"),
            link_skipped=None, pngs=["tsne_joint.png", "tsne_link.png"]),
        "attention": AttentionResult(
            checkpoint=checkpoint, checkpoint_sha256="abc", checkpoint_epoch=2.0, where="TRUE", keys=["k1"],
            pngs=["attention/k1.png"], npz="attention/attention.npz", grid_rgb=[4, 6], grid_ir=[4, 6],
            heads={"rgb": 3, "ir": 3}, threshold=0.6, mode="rgb-ir", dataset="/data", preprocessing="eval view"),
    }


RESULT_PATHS = {"pca": "pca.json", "knn": "knn.json", "retrieval": "retrieval.json", "cluster": "cluster.json",
                "tsne": "tsne.json", "attention": "attention/attention.json"}


# -- round trips -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("record_type", RECORDS, ids=lambda t: t.__name__)
def test_every_record_round_trips_with_every_field(record_type, tmp_path):
    record = example(record_type)
    path = tmp_path / f"{record_type.KIND}.json"
    write_result(path, record)
    on_disk = json.loads(path.read_text())
    assert (on_disk["kind"], on_disk["version"]) == (record_type.KIND, record_type.VERSION)
    assert set(on_disk) == {"kind", "version"} | {f.name for f in dataclasses.fields(record_type)}
    assert read_result(path, record_type) == record
    assert not list(tmp_path.glob("*.tmp"))


def test_the_records_the_steps_write_round_trip(tmp_path):
    for step, record in realistic().items():
        path = tmp_path / RESULT_PATHS[step]
        write_result(path, record)
        assert read_result(path, type(record)) == record
    assert load_checkpoint_results(tmp_path).knn == realistic()["knn"]


def test_freshness_reads_the_identity_a_record_carries(tmp_path):
    path = tmp_path / "knn.json"
    write_result(path, realistic(identity="emb-1")["knn"])
    assert is_fresh(path, "emb-1") and not is_fresh(path, "emb-2")


# -- what is refused ---------------------------------------------------------------------------------------------

def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_renamed_field_is_refused_naming_the_file_and_the_field(tmp_path):
    path = tmp_path / "knn.json"
    write_result(path, realistic()["knn"])
    def rename(data: dict) -> None:
        label = data["labels"]["is_sky"]
        label["majority"] = label.pop("majority_baseline")

    _rewrite(path, rename)
    with pytest.raises(AnalysisError) as refused:
        read_result(path, KNNResult)
    message = str(refused.value)
    assert str(path) in message
    assert "missing field 'labels.is_sky.majority_baseline'" in message
    assert "unknown field 'labels.is_sky.majority'" in message
    assert "\n" not in message


@pytest.mark.parametrize("change, named", [
    (lambda d: d.pop("test"), "missing field 'test'"),
    (lambda d: d.__setitem__("extra", 1), "unknown field 'extra'"),
    (lambda d: d["labels"]["is_sky"]["spaces"]["joint"]["20"].pop("top5"),
     "missing field 'labels.is_sky.spaces.joint.20.top5'"),
    (lambda d: d.__setitem__("train", "80"), "field 'train' should be an integer"),
    (lambda d: d.__setitem__("version", 0), "version 1"),
    (lambda d: d.__setitem__("kind", "retrieval"), "not a knn result"),
])
def test_a_file_unlike_its_record_is_one_line_naming_what_is_wrong(tmp_path, change, named):
    path = tmp_path / "knn.json"
    write_result(path, realistic()["knn"])
    _rewrite(path, change)
    with pytest.raises(AnalysisError, match=re.escape(named)) as refused:
        read_result(path, KNNResult)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(AnalysisError, match="missing or unreadable"):
        read_result(tmp_path / "knn.json", KNNResult)
    (tmp_path / "knn.json").write_text("{")
    with pytest.raises(AnalysisError, match="knn.json: not JSON"):
        read_result(tmp_path / "knn.json", KNNResult)


def test_the_writer_cannot_write_what_the_reader_refuses(tmp_path):
    bad = dataclasses.replace(realistic()["retrieval"], k=["1"])  # k must be integers
    with pytest.raises(AnalysisError, match=r"field 'k\[0\]' should be an integer"):
        write_result(tmp_path / "retrieval.json", bad)
    assert not list(tmp_path.iterdir())


def test_a_tsne_detail_the_record_does_not_define_is_refused():
    with pytest.raises(TypeError, match="no field 'knn_probe'"):
        TSNESpace.of(points=1, sampled=False, seconds=0.0, features=2, details={"knn_probe": 1.0})


# -- the report, from records only ---------------------------------------------------------------------------

@pytest.fixture()
def recorded_run(tmp_path) -> Analysis:
    """A run directory holding records and no embeddings: what the report reads, and nothing else."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.toml").write_text("")
    run = RunDir.open(root)
    for checkpoint, top1 in (("last", 0.875), ("random", 0.5)):
        for step, record in realistic(checkpoint=checkpoint, top1=top1).items():
            if checkpoint == "random" and step == "attention":
                continue  # skipped below
            write_result(run.results(checkpoint) / RESULT_PATHS[step], record)
    write_result(run.analysis_dir / "skipped.json", SkippedSteps(steps=[
        SkippedStep(checkpoint="random", step="attention", reason="attention.where 'x' selects no samples in /d"),
        SkippedStep(checkpoint="last", step="knn", reason="made good later: not shown")]))
    write_result(run.analysis_dir / "evolution.json", EvolutionResult(png="evolution.png", points=[
        EvolutionPoint(checkpoint="last", checkpoint_sha256="abc", epoch=2.0, step=10, knn_k="20",
                       knn={"is_sky": {"joint": 0.875}}, retrieval=EvolutionRetrieval(0.45, 0.4, 0.05),
                       silhouette={"joint": 0.321}, skipped={})]))
    return Analysis(run, AnalysisConfig(), progress=False, log=lambda m: None)


def test_the_report_is_built_from_records(recorded_run):
    index = write_report(recorded_run)
    text = index.read_text()
    for expected in ("k-NN is_sky top-1 (k=20, joint)", "87.5%", "50.0%", "k-NN is_sky: majority class", "60.0%",
                     "retrieval RGB -&gt; IR top-1", "45.0%", "retrieval chance top-5", "25.0%",
                     "silhouette (joint)", "0.321 ± 0.012", "0.654", "rgb~ir", "0.111", "0.222",
                     "T = 0.07", "trained on 80 samples", "93.0%", "components for 90%", "31",
                     "ratio 0.027", "Over the checkpoints", "Skipped steps",
                     "attention.where &#x27;x&#x27; selects no samples in /d"):
        assert expected in text, expected
    assert "made good later" not in text  # last's knn.json exists: that skip was made good
    assert "class='better'" in text or 'class="better"' in text
    assert knn_against_baseline(recorded_run)[0] == "is_sky top-1 (k=20, rgb): trained 87.5%, random init 50.0%  better"


def test_compare_style_json_reads_through_the_records(recorded_run):
    results = recorded_run.run.results("last")
    loaded = {name: json.loads((results / f"{name}.json").read_text()) for name in ("knn", "retrieval", "cluster")}
    typed = {"last": load_checkpoint_results(results)}
    assert summary_rows({"last": loaded}) == summary_rows(typed)
    loaded["knn"]["labels"]["is_sky"]["top_1"] = loaded["knn"]["labels"]["is_sky"].pop("spaces")
    with pytest.raises(AnalysisError, match="'labels.is_sky.spaces'"):
        summary_rows({"last": loaded})


def test_result_json_is_what_is_on_disk(tmp_path):
    record = realistic()["cluster"]
    write_result(tmp_path / "cluster.json", record)
    assert json.loads((tmp_path / "cluster.json").read_text()) == result_json(record)


# -- a dataset without a test split -------------------------------------------------------------------------

@pytest.mark.slow
def test_all_without_a_test_split_runs_the_rest_and_reports_what_it_skipped(synth_raw, tmp_path):
    from ingest.build import build_shards
    from ingest.config import IngestConfig, SplitFractions
    from training.config import load_training_config
    from training.train import run_training

    dataset = tmp_path / "dataset"
    build_shards(synth_raw, dataset, IngestConfig(workers=2, shard_target_mb=8.0, split=SplitFractions(0.9, 0.1, 0.0)),
                 nodes_csv=synth_raw / "nodes.csv", progress=False, log=lambda m: None)
    (tmp_path / "train.toml").write_text(TINY_RUN.format(dataset=dataset, run=tmp_path / "run"))
    assert run_training(load_training_config(str(tmp_path / "train.toml")), progress=False, log=lambda m: None) == 0
    run = tmp_path / "run"
    config = small_chunk_config(tmp_path, "[tsne]\nlink_pairs = 20\n[cluster]\nk = 3\nexamples = 1\n")
    done = analysis_cli("all", str(run), "--config", str(config), "--quiet", timeout=600)
    assert done.returncode == 0, done.stderr
    said = done.stderr
    assert re.search(r"knn skipped for last: .*no 'test' samples among the embedded ones", said), said
    assert re.search(r"retrieval skipped for last: .*no 'test' samples", said), said
    assert re.search(r"attention skipped for last: attention.where \"split = 'test'\" selects no samples", said), said
    index = Path(done.stdout.strip().splitlines()[-1])
    text = index.read_text()
    assert "Skipped steps" in text and "no &#x27;test&#x27; samples among the embedded ones" in text
    for checkpoint in ("last", "random"):  # the rest was done
        for name in ("pca.json", "cluster.json"):
            assert (run / "analysis" / checkpoint / name).exists(), (checkpoint, name)
        assert not (run / "analysis" / checkpoint / "knn.json").exists()
    assert (run / "analysis" / "last" / "tsne.json").exists() and (run / "analysis" / "evolution.png").exists()
    skipped = read_result(run / "analysis" / "skipped.json", SkippedSteps)
    assert {(s.checkpoint, s.step) for s in skipped.steps} >= {("last", "knn"), ("last", "retrieval"),
                                                                 ("random", "knn"), ("last", "attention")}
    # A second `all` skips the same steps again and still exits 0.
    again = analysis_cli("all", str(run), "--config", str(config), "--quiet", timeout=600)
    assert again.returncode == 0 and "knn skipped for last" in again.stderr, again.stderr
    shutil.rmtree(run / "report")
    assert analysis_cli("report", str(run)).returncode == 0
    assert "Skipped steps" in (run / "report" / "index.html").read_text()
