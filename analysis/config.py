"""Analysis configuration: frozen dataclasses, defaults that suit 100k embeddings on a laptop, TOML in and out.

`analysis ... --config analysis.toml` overrides any key (unknown keys are an error naming the file); the
resolved config is written to ``RUN/analysis/config.toml`` by every command that writes results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from catalog.runinfo import dump_config, load_config

__all__ = ["EmbedConfig", "PCAConfig", "ClusterConfig", "TSNEConfig", "KNNConfig", "AttentionConfig",
           "AnalysisConfig", "load_analysis_config", "analysis_toml", "LABELS"]

# Catalog columns k-NN predicts and cluster tables cross; `cloud_class` comes from RAW/truth.parquet when present.
LABELS = ("is_sky", "is_day", "vsn", "position")


@dataclass(frozen=True)
class EmbedConfig:
    where: str = "TRUE"  # SQL over `samples`: which samples to embed (k-NN needs both train and test splits)
    batch_size: int = 64
    # DataLoader workers per rank; -1: this node's cores / its ranks, less one for the rank's own threads. A GPU
    # embeds several thousand pairs/s, so the workers (reading bytes, cropping IR) must be many.
    workers: int = -1
    chunk_rows: int = 4096  # rows per Zarr chunk: 4096 x 384 float32 = 6 MB; each rank writes whole chunks
    decode: str = "auto"  # 'cpu', 'gpu' (nvJPEG), or 'auto': gpu when the device is CUDA
    projections: bool = True  # also store the expander outputs (the space VICReg aligns; retrieval uses it)
    # Small RGB and IR thumbnails of every sample (the explorer's images), made while the frames are decoded anyway,
    # stored once per run and selection in RUN/embeddings/thumbnails-<selection>.zarr, reused by every checkpoint.
    thumbnails: bool = True
    thumb_size: tuple[int, int] = (48, 64)  # [H, W] of each modality's thumbnail (the sensors' 4:3)
    # Above this many samples, a random subset of this many gets thumbnails, drawn by t-SNE's rule with seed 0: with
    # the analysis seed 0 and tsne.max_points equal to it, every t-SNE point has one; 12 kB a sample before compression.
    max_thumbs: int = 100_000

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < -1 or self.chunk_rows < 1:
            raise ValueError("embed.batch_size and embed.chunk_rows must be >= 1, embed.workers >= -1 (-1: auto)")
        if min(self.thumb_size) < 1 or len(self.thumb_size) != 2 or self.max_thumbs < 1:
            raise ValueError("embed.thumb_size must be [H, W] >= 1 and embed.max_thumbs >= 1")
        if self.decode not in ("auto", "cpu", "gpu"):
            raise ValueError(f"embed.decode must be 'auto', 'cpu' or 'gpu', got {self.decode!r}")

    def worker_count(self, ranks_on_node: int) -> int:
        if self.workers >= 0:
            return self.workers
        return max(1, (os.cpu_count() or 1) // max(ranks_on_node, 1) - 1)


@dataclass(frozen=True)
class PCAConfig:
    components: int = 50

    def __post_init__(self) -> None:
        if self.components < 2:
            raise ValueError("pca.components must be >= 2")


@dataclass(frozen=True)
class ClusterConfig:
    k: int = 10
    sweep: tuple[int, ...] = ()  # e.g. [5, 10, 20, 50]: fit each, keep the best silhouette (k is then ignored)
    silhouette_sample: int = 10_000
    silhouette_seeds: int = 5
    examples: int = 6  # example pairs shown per cluster

    def __post_init__(self) -> None:
        if self.k < 2 or any(k < 2 for k in self.sweep):
            raise ValueError("cluster.k and every cluster.sweep value must be >= 2")


@dataclass(frozen=True)
class TSNEConfig:
    max_points: int = 100_000  # all points up to this many, else a fixed random sample of this many
    perplexity: float = 30.0
    n_jobs: int = 0  # 0: every core
    link_pairs: int = 500  # pairs drawn in the plot that links a sample's RGB and IR points


@dataclass(frozen=True)
class KNNConfig:
    k: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    train_split: str = "train"
    test_split: str = "test"
    query_chunk: int = 2048  # test rows per similarity block: memory is query_chunk x train rows x 4 bytes
    cloud_bins: tuple[float, ...] = (0.25, 0.75)  # cloud fraction class edges for the synthetic truth

    def __post_init__(self) -> None:
        if not self.k or min(self.k) < 1 or self.temperature <= 0 or self.query_chunk < 1:
            raise ValueError("knn.k must be non-empty and >= 1, knn.temperature > 0, knn.query_chunk >= 1")


@dataclass(frozen=True)
class AttentionConfig:
    where: str = "split = 'test'"  # samples drawn when no --keys are given
    count: int = 6
    threshold: float = 0.6  # DINO's mask: the smallest set of patches holding this share of the attention


@dataclass(frozen=True)
class AnalysisConfig:
    seed: int = 0
    baseline: bool = True  # also analyse a random-init model of the same architecture
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tsne: TSNEConfig = field(default_factory=TSNEConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


def load_analysis_config(path: str | None) -> AnalysisConfig:
    return load_config(AnalysisConfig, path)


def analysis_toml(config: AnalysisConfig) -> str:
    return dump_config(config)
