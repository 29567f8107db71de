"""ingest: raw SAGE Mobotix downloads -> paired, validated, cropped samples in WebDataset shards + catalog."""

from ingest.build import BuildError, BuildSummary, build_shards
from ingest.config import CropBox, IngestConfig
from ingest.synth import SynthConfig, synthesize

__all__ = ["build_shards", "BuildSummary", "BuildError", "IngestConfig", "CropBox", "SynthConfig", "synthesize"]
