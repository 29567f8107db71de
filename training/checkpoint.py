"""Checkpoints: written atomically, read with ``weights_only=True``, and the schedule guard for resuming.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it
and no pickled code ever runs on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_atomic", "load_checkpoint", "schedule_differences", "model_differences",
           "config_differences", "SCHEDULE_KEYS", "MODEL_KEYS", "OPERATIONAL_KEYS"]

# Derived from the config and the selection: the rest of what a schedule is, the config keys themselves, is
# compared by config_differences. base_lr is the resolved one (an unset optim.base_lr depends on the optimiser).
SCHEDULE_KEYS = ("global_batch", "base_lr", "n_samples", "selection_sha256")
# What decides the weights' shapes and meaning: a checkpoint cannot continue under a different one.
MODEL_KEYS = ("objective", "head", "modalities", "directions", "mode", "rgb_arch", "ir_arch", "rgb_patch", "ir_patch", "depth", "expander", "first_hw", "second_hw")


# Config keys that change how a run executes, not what it computes: free to differ on resume. (The dataset path
# may move; the selection's fingerprint in the schedule says whether it still holds the same samples. The
# learning rate is compared resolved, and the per-rank batch as the global batch, in SCHEDULE_KEYS: a run may
# resume on another number of ranks with the same global batch.)
OPERATIONAL_KEYS = ("optim.base_lr", "train.batch_size", "data.dataset", "data.workers", "data.prefetch", "data.decode", "train.max_steps",
                    "train.timeout_s", "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
                    "train.precision", "run.dir", "run.record_keys")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the file and the difference."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to ``path.tmp``, fsync, rename: a reader never sees a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise CheckpointError(f"{path}: not a readable sagepairs checkpoint ({type(exc).__name__}: {exc})") from None


def _differences(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a) if a is not None else None, list(b) if b is not None else None
        if a != b:
            shown_a = a[:12] + "..." if isinstance(a, str) and len(a) > 16 else a
            shown_b = b[:12] + "..." if isinstance(b, str) and len(b) > 16 else b
            out.append(f"{key} {shown_a} -> {shown_b}")
    return out


def schedule_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return _differences(old, new, SCHEDULE_KEYS)


def model_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return _differences({"objective": "vicreg", **old}, {"objective": "vicreg", **new}, MODEL_KEYS)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _without_unused_dino(config: dict[str, Any]) -> dict[str, Any]:
    """A VICReg config without the [dino] section it ignores (and a config from before model.objective existed
    reads as VICReg), so a VICReg run resumes whatever the [dino] defaults are."""
    model = config.get("model", {})
    if model.get("objective", "vicreg") != "vicreg":
        return config
    return {**{k: v for k, v in config.items() if k != "dino"}, "model": {**model, "objective": "vicreg"}}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every changed key of two resolved configs that changes what training computes (data, model, loss, optim)."""
    a, b = _flatten(_without_unused_dino(old)), _flatten(_without_unused_dino(new))
    keys = sorted((set(a) | set(b)) - set(OPERATIONAL_KEYS))
    return _differences(a, b, tuple(keys))
