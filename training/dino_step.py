"""One cross-modal DINO step over the modules of ``training.model.DINOModel``, and its schedules and metrics.

Upstream main_dino.py's ``train_one_epoch`` per iteration: set lr and weight decay, teachers on the global crops,
students on every crop, loss, backward, clip, cancel the last layer's gradients, optimiser step, EMA. Across
modalities: each active direction ``teacher>student`` compares teacher ``teacher``'s global crops with student
``student``'s crops of the same sample; the step's loss is the mean over the active directions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import DINOConfig, OptimConfig, TrainingConfig, parse_direction
from training.dino import (
    apply_schedules,
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    learning_rate_schedule,
    momentum_schedule,
    param_groups,
    weight_decay_schedule,
)
from training.model import DINOModel, embedding_std

__all__ = ["DINO_LR_PER_256", "dino_lr_per_256", "DINOSchedules", "build_dino_optimizer", "active_directions",
           "DINOStepResult", "dino_step", "teacher_entropy", "step_metrics"]

DINO_LR_PER_256 = 5e-4  # upstream main_dino.py's --lr default


def dino_lr_per_256(optim: OptimConfig) -> float:
    """optim.base_lr, upstream's lr per 256 samples; unset: upstream's default."""
    return optim.base_lr if optim.base_lr is not None else DINO_LR_PER_256


@dataclass(frozen=True)
class DINOSchedules:
    """Per global step: learning rate, weight decay (regularised group) and teacher momentum, upstream's formulas."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    @classmethod
    def of(cls, config: TrainingConfig, global_batch: int, steps_per_epoch: int) -> DINOSchedules:
        d, epochs = config.dino, config.train.epochs
        lr = learning_rate_schedule(dino_lr_per_256(config.optim), d.min_lr, global_batch, epochs, steps_per_epoch,
                                    int(config.optim.warmup_epochs))
        return cls(lr, weight_decay_schedule(d.weight_decay, d.weight_decay_end, epochs, steps_per_epoch),
                   momentum_schedule(d.momentum_teacher, epochs, steps_per_epoch))


def build_dino_optimizer(model: DINOModel, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the students' parameters only (upstream's groups); the teachers are never in it."""
    return torch.optim.AdamW(param_groups(model.students), lr=0.0, betas=optim.betas)


def active_directions(dino: DINOConfig, step: int) -> list[str]:
    """Every direction, or with ``dino.alternate`` one per step in turn (a function of the step: every rank agrees)."""
    directions = list(dino.directions)
    return [directions[step % len(directions)]] if dino.alternate else directions


@dataclass(frozen=True)
class DINOStepResult:
    loss: torch.Tensor
    direction_losses: dict[str, torch.Tensor]
    entropies: dict[str, torch.Tensor]  # teacher's mean row entropy (centred, sharpened), before the centre update
    student_features: dict[str, torch.Tensor]  # backbone outputs of the global crops
    teacher_features: dict[str, torch.Tensor]


def teacher_entropy(teacher_output: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    with torch.no_grad():
        logits = (teacher_output - center) / temp
        return -(F.softmax(logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def dino_step(model: DINOModel, students: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
              crops: Mapping[str, Sequence[torch.Tensor]], directions: Sequence[str], step: int, epoch: int,
              schedules: DINOSchedules, dino: DINOConfig,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> DINOStepResult:
    """One step. ``students``: the modules to run (DDP wrappers or ``model.students``); ``crops[modality]``:
    [global crops (n_global x B rows, crop-major), local crops (optional)]. EMA against ``model.students``."""
    apply_schedules(optimizer, step, schedules.lr, schedules.weight_decay)
    pairs = [parse_direction(d) for d in directions]
    teacher_out, student_out = {}, {}
    with torch.no_grad(), autocast():
        for teacher in dict.fromkeys(t for t, _ in pairs):
            teacher_out[teacher] = model.teachers[teacher]([crops[teacher][0]]).float()
    with autocast():
        for student in dict.fromkeys(s for _, s in pairs):
            student_out[student] = students[student](list(crops[student])).float()
    losses, entropies = {}, {}
    for direction, (teacher, student) in zip(directions, pairs):
        loss_fn = model.losses[direction]
        entropies[direction] = teacher_entropy(teacher_out[teacher], loss_fn.center,
                                               float(loss_fn.teacher_temp_schedule[epoch]))
        losses[direction] = loss_fn(student_out[student], teacher_out[teacher], epoch)
    loss = torch.stack(list(losses.values())).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dino.clip_grad:
        clip_gradients(model.students, dino.clip_grad)
    cancel_last_layer_gradients(model.students, epoch, dino.freeze_last_layer)
    optimizer.step()
    for modality, teacher in model.teachers.items():
        ema_update(teacher, model.students[modality], float(schedules.momentum[step]))
    return DINOStepResult(loss, {d: v.detach() for d, v in losses.items()}, entropies,
                          {m: model.students[m].last_features[: len(crops[m][0])] for m in student_out},
                          {m: model.teachers[m].last_features for m in teacher_out})


def step_metrics(model: DINOModel, result: DINOStepResult) -> dict[str, torch.Tensor]:
    """This rank's metrics of a step, by name (the caller averages them over the ranks)."""
    out: dict[str, torch.Tensor] = {"loss": result.loss.detach().float()}
    for direction, loss in result.direction_losses.items():
        out[f"loss_{direction}"] = loss.float()
        out[f"teacher_entropy_{direction}"] = result.entropies[direction].float()
        out[f"kl_{direction}"] = (loss - result.entropies[direction]).float()
        out[f"center_norm_{direction}"] = model.losses[direction].center.norm().float()
    for modality, features in result.student_features.items():
        out[f"{modality}_student_embedding_std"] = embedding_std(features)
    for modality, features in result.teacher_features.items():
        out[f"{modality}_teacher_embedding_std"] = embedding_std(features)
    return out
