"""The analysis steps of one run, each reading and writing ``RUN/``, and ``all``: every step that is missing or
stale, then the report.

A step's result file records the identity of the embeddings it was computed from (``is_fresh``), so re-running
a step after a new embed recomputes it, and ``all`` after an interrupted run does only what is left. Each step
returns its typed record (:mod:`analysis.results`), read back from the file it wrote.

A step that cannot run on the data (:class:`~analysis.results.StepSkipped`: no test split, fewer samples than k)
makes ``all`` print why, record it in ``RUN/analysis/skipped.json`` for the report, and go on; any other error
stops it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import catalog
from analysis.config import AnalysisConfig, analysis_toml
from analysis.evolution import run_evolution
from analysis.explorer_inputs import write_run_explorer
from analysis.metadata import sample_metadata
from analysis.pca import run_pca
from analysis.report import write_report
from analysis.results import (RESULT_FILES, STEP_RECORDS, AttentionResult, ClusterResult, EvolutionResult,
                              KNNResult, PCAResult, RetrievalResult, SkippedStep, SkippedSteps, StepSkipped,
                              TSNEResult, is_current, read_result, write_result)
from analysis.runs import RANDOM, AnalysisError, RunDir
from analysis.store import Embeddings, is_fresh, open_embeddings

# analysis.embed, knn, cluster, tsne and attention are imported in the steps that use them: they pull in torch,
# scikit-learn and openTSNE, and importing this module with them took 5.5 s against 0.7 s without (best of 5, busy
# 2-core machine), which `analysis report`, `analysis pca` and a bad --config would pay for nothing.

__all__ = ["Analysis"]

T = TypeVar("T")
PER_CHECKPOINT = ("pca", "knn", "retrieval", "cluster")  # what `all` computes for the trained and random models


@dataclass
class Analysis:
    run: RunDir
    config: AnalysisConfig
    dataset: str | None = None
    progress: bool = True
    log: Callable[[str], None] = print
    skipped: list[SkippedStep] = field(default_factory=list)  # what this session could not run, and why

    @classmethod
    def open(cls, run_dir: str | Path, config: AnalysisConfig, dataset: str | None = None, progress: bool = True,
             log=print) -> Analysis:
        return cls(RunDir.open(run_dir), config, dataset, progress, log)

    def write_config(self) -> None:
        self.run.analysis_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run.analysis_dir / "config.toml.tmp"
        tmp.write_text(analysis_toml(self.config))
        tmp.replace(self.run.analysis_dir / "config.toml")

    # -- inputs --
    def embeddings(self, checkpoint: str) -> Embeddings:
        return open_embeddings(self.run.embeddings(checkpoint))

    def dataset_of(self, embeddings: Embeddings) -> Path | str:
        return catalog.dataset_ref(self.dataset or embeddings.attrs["dataset"])

    def metadata(self, embeddings: Embeddings):
        return sample_metadata(self.dataset_of(embeddings), embeddings.keys(), self.config.knn.cloud_bins)

    def ensure_embeddings(self, checkpoint: str) -> Embeddings:
        from analysis.embed import embed  # torch: see the imports

        embed(self.run.root, checkpoint, config=self.config.embed, dataset=self.dataset, progress=self.progress,
              log=self.log)
        return self.embeddings(checkpoint)

    # -- steps: each returns its record --
    def _step(self, checkpoint: str, step: str, force: bool, compute: Callable[[Embeddings, Path], object]):
        """The step's record: the one on disk if it is current, from these embeddings and not ``force``d, else
        ``compute(embeddings, results folder)``'s, read back from the file it wrote."""
        emb = self.embeddings(checkpoint)
        results = self.run.results(checkpoint)
        path, record_type = results / RESULT_FILES[step], STEP_RECORDS[step]
        if not force and is_current(path, record_type) and is_fresh(path, emb.identity):
            return read_result(path, record_type)
        with _dropped_when_skipped(path):
            compute(emb, results)
        return read_result(path, record_type)

    def pca(self, checkpoint: str, force: bool = True) -> PCAResult:
        features = self.run.results(checkpoint) / "pca.zarr"  # what cluster and tsne read
        return self._step(checkpoint, "pca", force or not features.exists(), lambda emb, results: run_pca(
            emb, results, self.config.pca.components, progress=self.progress, log=self.log))

    def knn(self, checkpoint: str, force: bool = True) -> KNNResult:
        from analysis.knn import run_knn  # torch: see the imports

        return self._step(checkpoint, "knn", force, lambda emb, results: run_knn(
            emb, results, self.config.knn, self.metadata(emb), log=self.log))

    def retrieval(self, checkpoint: str, force: bool = True) -> RetrievalResult:
        from analysis.knn import run_retrieval  # torch: see the imports

        return self._step(checkpoint, "retrieval", force, lambda emb, results: run_retrieval(
            emb, results, self.metadata(emb), self.config.knn.test_split, log=self.log))

    def cluster(self, checkpoint: str, force: bool = True, examples: bool = True) -> ClusterResult:
        from analysis.cluster import run_clusters  # scikit-learn: see the imports

        config = self.config.cluster if examples else dataclasses.replace(self.config.cluster, examples=0)

        def compute(emb: Embeddings, results: Path) -> None:
            self.pca(checkpoint, force=False)
            run_clusters(emb, results, config, seed=self.config.seed, dataset=self.dataset, log=self.log,
                         progress=self.progress)

        return self._step(checkpoint, "cluster", force, compute)

    def tsne(self, checkpoint: str, force: bool = True) -> TSNEResult:
        from analysis.tsne import run_tsne  # openTSNE, torch: see the imports

        def compute(emb: Embeddings, results: Path) -> None:
            self.pca(checkpoint, force=False)
            run_tsne(emb, results, self.config.tsne, seed=self.config.seed, dataset=self.dataset, log=self.log,
                     progress=self.progress)

        return self._step(checkpoint, "tsne", force, compute)

    def attention(self, checkpoint: str, keys: list[str] | None = None, where: str | None = None,
                  force: bool = True) -> AttentionResult:
        """Attention maps of ``keys``, else of a draw from ``where`` (default attention.where); not forced, the
        maps already made from this checkpoint's weights."""
        path = self.run.results(checkpoint) / RESULT_FILES["attention"]
        sha = self.run.checkpoint(checkpoint).sha256
        if not force and is_current(path, AttentionResult):
            previous = read_result(path, AttentionResult)
            if previous.checkpoint_sha256 == sha:
                return previous
        drawn_from = (where if where is not None else self.config.attention.where).strip() or "TRUE"
        with _dropped_when_skipped(path):
            if keys is None and self._selects_nothing(drawn_from):
                raise StepSkipped(f"attention.where {drawn_from!r} selects no samples in {self._dataset_root()}")
        from analysis.attention import attention as attention_maps  # torch: see the imports

        attention_maps(self.run.root, checkpoint, keys=keys, where=where, config=self.config.attention,
                       dataset=self.dataset, log=self.log, seed=self.config.seed)
        return read_result(path, AttentionResult)

    def evolution(self, force: bool = False) -> EvolutionResult:
        return run_evolution(self, force=force)

    def report(self) -> Path:
        """The explorer of the trained checkpoint (RUN/report/explorer/, when it has a map), then the report,
        which links it."""
        write_run_explorer(self, log=self.log)
        return write_report(self)

    # -- skipping what the data cannot support --
    def attempt(self, checkpoint: str, step: str, compute: Callable[[], T]) -> T | None:
        """``compute()``, or None when the data cannot support the step: the reason is printed once and recorded."""
        if self.skip_reasons(checkpoint, (step,)):
            return None
        try:
            return compute()
        except StepSkipped as skip:
            self.record_skip(checkpoint, step, str(skip))
            return None

    def record_skip(self, checkpoint: str, step: str, reason: str) -> None:
        """Say (once) that ``step`` could not run for ``checkpoint``, and keep it for skipped.json."""
        if not self.skip_reasons(checkpoint, (step,)):
            self.skipped.append(SkippedStep(checkpoint=checkpoint, step=step, reason=reason))
            self.log(f"analysis: {step} skipped for {checkpoint}: {reason}")

    def skip_reasons(self, checkpoint: str, steps: tuple[str, ...]) -> dict[str, str]:
        """step -> why it was skipped for this checkpoint, in this session."""
        return {s.step: s.reason for s in self.skipped if s.checkpoint == checkpoint and s.step in steps}

    def _dataset_root(self) -> Path | str:
        return catalog.dataset_ref(self.dataset or self.run.training_config().data.dataset)

    def _selects_nothing(self, where: str) -> bool:
        """The catalog holds no sample matching ``where`` (a dataset without a test split, say); a missing dataset
        or a bad ``where`` is left for :func:`analysis.attention.attention` to report."""
        root = self._dataset_root()
        if not root.is_dir():
            return False
        try:
            with catalog.open(root) as cat:
                counted = cat.query(f"SELECT count(*) AS n FROM samples WHERE {where}")
        except catalog.CatalogError:
            return False
        return counted.column("n")[0].as_py() == 0

    # -- everything --
    def checkpoints_for_report(self) -> list[str]:
        names = ["last"]
        if self.config.baseline:
            names.append(RANDOM)
        return names

    def all(self) -> Path:
        """Every step that is missing or stale, skipping (and saying) what the data cannot support; the report."""
        if "last" not in self.run.checkpoint_names():
            raise AnalysisError(f"{self.run.root}: no checkpoints/last.pt (has `training run` saved any?)")
        self.write_config()
        self.skipped.clear()  # skipped.json says what this `all` could not run
        for checkpoint in self.checkpoints_for_report():
            self.ensure_embeddings(checkpoint)
            for step in PER_CHECKPOINT:
                self.attempt(checkpoint, step, functools.partial(getattr(self, step), checkpoint, force=False))
        self.attempt("last", "tsne", functools.partial(self.tsne, "last", force=False))
        self.attempt("last", "attention", functools.partial(self.attention, "last", force=False))
        self.evolution(force=False)
        write_result(self.run.analysis_dir / "skipped.json", SkippedSteps(steps=list(self.skipped)))
        return self.report()


@contextmanager
def _dropped_when_skipped(path: Path) -> Iterator[None]:
    """A step that cannot run on these embeddings leaves no earlier result behind for the report to show."""
    try:
        yield
    except StepSkipped:
        path.unlink(missing_ok=True)
        raise
