"""`training run` with model.objective = 'dino' (issue 19): the CLI run, ranks, resume, teacher, bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import load_training_config
from training.dino import cosine_schedule
from training.train import TrainingError, preflight

from tests.test_training import MPIEXEC, ROOT, TINY, _wait_for_rows, keys_by_step, metrics, run_cli

DINO_TINY = TINY + """
[dino]
out_dim = 128
hidden_dim = 64
bottleneck_dim = 32
local_crops_number = 2
"""
DINO = "model.objective=dino"


@pytest.fixture()
def dino_config(built, tmp_path) -> Path:
    path = tmp_path / "dino.toml"
    path.write_text(DINO_TINY.format(dataset=built, run=tmp_path / "run").replace('[model]\n', '[model]\nobjective = "dino"\n'))
    return path


@pytest.mark.slow
def test_a_dino_run_from_the_cli_logs_metrics_and_writes_weights_only_checkpoints(dino_config, tmp_path):
    result = run_cli(dino_config, "train.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("loss", "loss_rgb>ir", "loss_ir>rgb", "teacher_entropy_rgb>ir", "kl_ir>rgb", "center_norm_rgb>ir",
                "teacher_temp", "momentum", "weight_decay", "lr", "rgb_student_embedding_std",
                "ir_teacher_embedding_std"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["loss"] == pytest.approx((rows[0]["loss_rgb>ir"] + rows[0]["loss_ir>rgb"]) / 2, rel=1e-6)
    assert rows[0]["kl_rgb>ir"] == pytest.approx(rows[0]["loss_rgb>ir"] - rows[0]["teacher_entropy_rgb>ir"], rel=1e-6)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "sagepairs-dino-1" and state["step"] == 3
    assert state["model_spec"]["objective"] == "dino"
    assert {"losses.rgb>ir.center", "losses.ir>rgb.center"} <= set(state["model"])
    assert any(k.startswith("teachers.ir.backbone.") for k in state["model"])
    # Schedules are upstream's formulas, indexed by the global step (3 epochs x steps_per_epoch).
    steps = state["schedule"]["n_samples"] // state["schedule"]["global_batch"]
    momentum = cosine_schedule(0.996, 1, 3, steps)
    assert [r["momentum"] for r in rows] == pytest.approx(momentum[:3].tolist(), rel=1e-12)
    lr = cosine_schedule(5e-4 * 8 / 256, 1e-6, 3, steps, warmup_epochs=1)
    assert [r["lr"] for r in rows] == pytest.approx(lr[:3].tolist(), rel=1e-12)
