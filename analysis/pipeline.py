"""The analysis steps of one run, each reading and writing ``RUN/``, and ``all``: every step that is missing or
stale, then the report.

A step's result file records the identity of the embeddings it was computed from (``is_fresh``), so re-running
a step after a new embed recomputes it, and ``all`` after an interrupted run does only what is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analysis.config import AnalysisConfig, analysis_toml
from analysis.runs import RANDOM, AnalysisError, RunDir
from analysis.store import Embeddings, is_fresh, open_embeddings

__all__ = ["Analysis"]


@dataclass
class Analysis:
    run: RunDir
    config: AnalysisConfig
    dataset: str | None = None
    progress: bool = True
    log: object = print

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

    def dataset_of(self, embeddings: Embeddings) -> Path:
        return Path(self.dataset or embeddings.attrs["dataset"])

    def metadata(self, embeddings: Embeddings):
        from analysis.metadata import sample_metadata

        return sample_metadata(self.dataset_of(embeddings), embeddings.keys(), self.config.knn.cloud_bins)

    def ensure_embeddings(self, checkpoint: str) -> Embeddings:
        from analysis.embed import embed

        embed(self.run.root, checkpoint, config=self.config.embed, dataset=self.dataset, progress=self.progress,
              log=self.log)
        return self.embeddings(checkpoint)

    # -- steps: each returns its result dict --
    def _cached(self, checkpoint: str, step: str, force: bool) -> tuple[Embeddings, Path, dict | None]:
        """(embeddings, the checkpoint's results folder, the step's result if it is fresh and not forced)."""
        emb = self.embeddings(checkpoint)
        results = self.run.results(checkpoint)
        fresh = not force and is_fresh(results / f"{step}.json", emb.identity)
        return emb, results, _read(results / f"{step}.json") if fresh else None

    def pca(self, checkpoint: str, force: bool = True) -> dict:
        from analysis.pca import run_pca

        emb, results, cached = self._cached(checkpoint, "pca", force)
        if cached is not None and (results / "pca.zarr").exists():
            return cached
        run_pca(emb, results, self.config.pca.components, progress=self.progress, log=self.log)
        return _read(results / "pca.json")

    def knn(self, checkpoint: str, force: bool = True) -> dict:
        from analysis.knn import run_knn

        emb, results, cached = self._cached(checkpoint, "knn", force)
        return cached or run_knn(emb, results, self.config.knn, self.metadata(emb), log=self.log)

    def retrieval(self, checkpoint: str, force: bool = True) -> dict:
        from analysis.knn import run_retrieval

        emb, results, cached = self._cached(checkpoint, "retrieval", force)
        return cached or run_retrieval(emb, results, self.metadata(emb), self.config.knn.test_split, log=self.log)

    def cluster(self, checkpoint: str, force: bool = True, examples: bool = True) -> dict:
        import dataclasses

        from analysis.cluster import run_clusters

        emb, results, cached = self._cached(checkpoint, "cluster", force)
        if cached is not None:
            return cached
        self.pca(checkpoint, force=False)
        config = self.config.cluster if examples else dataclasses.replace(self.config.cluster, examples=0)
        return run_clusters(emb, results, config, seed=self.config.seed, dataset=self.dataset, log=self.log,
                            progress=self.progress)

    def tsne(self, checkpoint: str, force: bool = True) -> dict:
        from analysis.tsne import run_tsne

        emb, results, cached = self._cached(checkpoint, "tsne", force)
        if cached is not None:
            return cached
        self.pca(checkpoint, force=False)
        return run_tsne(emb, results, self.config.tsne, seed=self.config.seed, dataset=self.dataset, log=self.log,
                        progress=self.progress)

    def attention(self, checkpoint: str, keys: list[str] | None = None, where: str | None = None,
                  force: bool = True) -> dict:
        from analysis.attention import attention

        path = self.run.results(checkpoint) / "attention" / "attention.json"
        sha = self.run.checkpoint(checkpoint).sha256
        previous = _read(path) if path.exists() else None
        if not force and previous is not None and previous.get("checkpoint_sha256") == sha:
            return previous
        return attention(self.run.root, checkpoint, keys=keys, where=where, config=self.config.attention,
                         dataset=self.dataset, log=self.log, seed=self.config.seed)

    def evolution(self, force: bool = False) -> dict:
        from analysis.evolution import run_evolution

        return run_evolution(self, force=force)

    def report(self) -> Path:
        from analysis.report import write_report

        return write_report(self)

    # -- everything --
    def checkpoints_for_report(self) -> list[str]:
        names = ["last"]
        if self.config.baseline:
            names.append(RANDOM)
        return names

    def all(self) -> Path:
        if "last" not in self.run.checkpoint_names():
            raise AnalysisError(f"{self.run.root}: no checkpoints/last.pt (has `training run` saved any?)")
        self.write_config()
        for checkpoint in self.checkpoints_for_report():
            self.ensure_embeddings(checkpoint)
            self.pca(checkpoint, force=False)
            self.knn(checkpoint, force=False)
            self.retrieval(checkpoint, force=False)
            self.cluster(checkpoint, force=False)
        self.tsne("last", force=False)
        self.attention("last", force=False)
        self.evolution(force=False)
        return self.report()


def _read(path: Path) -> dict:
    from analysis.store import read_json

    data = read_json(path)
    if data is None:
        raise AnalysisError(f"{path}: missing or unreadable")
    return data
