"""A training run directory as analysis sees it: its config, its checkpoints, and the model each one holds.

A checkpoint is named ``last``, ``epoch_NNNN`` or ``random``: the last one is a random-init model of the run's
architecture (seeded by ``train.seed``), the baseline that shows what training bought.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from catalog.runinfo import ConfigError
from training.config import TrainingConfig, load_training_config

__all__ = ["AnalysisError", "RunDir", "Checkpoint", "RANDOM"]

RANDOM = "random"
_EPOCH = re.compile(r"^epoch_(\d{4,})$")


class AnalysisError(ValueError):
    """Analysis cannot do what was asked; the message is one line naming the file or the argument."""


@dataclass(frozen=True)
class Checkpoint:
    name: str  # last, epoch_NNNN, random
    path: Path | None  # None for random
    sha256: str
    epoch: float | None  # training epochs behind these weights (0 for random)
    step: int | None


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        root = Path(path)
        if not root.is_dir():
            raise AnalysisError(f"{root}: no such run directory")
        if not (root / "config.toml").exists():
            raise AnalysisError(f"{root}: not a training run (no config.toml; make one with `training run`)")
        return cls(root)

    # -- layout --
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def embeddings(self, checkpoint: str) -> Path:
        return self.root / "embeddings" / f"{checkpoint}.zarr"

    def results(self, checkpoint: str) -> Path:
        return self.root / "analysis" / checkpoint

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    # -- what the run holds --
    def training_config(self) -> TrainingConfig:
        """The run's config.toml, parsed once per version of the file: one embed asks for it three times (the
        random checkpoint's hash, the selection, the model), and `all` and `evolution` many more."""
        path = self.root / "config.toml"
        try:
            try:
                stat = path.stat()
            except OSError:
                return load_training_config(str(path))  # missing or unreadable: the loader says why
            return _training_config_of(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except (ConfigError, ValueError) as exc:
            raise AnalysisError(f"{path}: {exc}") from None

    def checkpoint_names(self) -> list[str]:
        """Kept checkpoints, oldest first: epoch_NNNN in epoch order, then last."""
        if not self.checkpoints_dir.is_dir():
            return []
        epochs = sorted((p.stem for p in self.checkpoints_dir.glob("epoch_*.pt") if _EPOCH.match(p.stem)),
                        key=lambda name: int(_EPOCH.match(name).group(1)))
        return epochs + (["last"] if (self.checkpoints_dir / "last.pt").exists() else [])

    def checkpoint(self, name: str) -> Checkpoint:
        """Resolve a checkpoint name; a run without checkpoints or an unknown name is one clear line."""
        if name == RANDOM:
            config = self.training_config()
            spec = json.dumps({"model": _model_dict(config), "seed": config.train.seed}, sort_keys=True)
            return Checkpoint(RANDOM, None, hashlib.sha256(f"random-init:{spec}".encode()).hexdigest(), 0.0, 0)
        names = self.checkpoint_names()
        if not names:
            raise AnalysisError(f"{self.root}: no checkpoints in {self.checkpoints_dir} (has `training run` saved any?)")
        if name not in names:
            raise AnalysisError(f"{self.root}: no checkpoint {name!r}; it has {', '.join(names)} (and 'random')")
        path = self.checkpoints_dir / f"{name}.pt"
        # torch here, not at the top: analysis.runs is imported by every analysis module for AnalysisError and the
        # run layout, among them store, pca, report and compare, which need no torch (nor do PCA's ranks); importing
        # torch costs 1.6-2.0 s of start-up (`python -X importtime`, 2-core machine).
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step = int(state.get("step", 0)) if isinstance(state, dict) else None
        spe = None
        if isinstance(state, dict) and "schedule" in state:
            schedule = state["schedule"]
            spe = max(schedule["n_samples"] // schedule["global_batch"], 1)
        epoch = step / spe if step is not None and spe else None
        return Checkpoint(name, path, _sha256(path), epoch, step)

    def load_model(self, checkpoint: Checkpoint, device=None):
        """(VICReg model in eval mode, TrainingConfig, model spec) with the checkpoint's weights."""
        # torch (both modules import it): kept out of analysis.runs' own imports, see checkpoint().
        from training.checkpoint import CheckpointError, load_checkpoint, model_differences
        from training.model import initial_model, model_spec

        config = self.training_config()
        spec = model_spec(config)
        model = initial_model(config, spec)  # the random baseline: exactly the weights training started from
        if checkpoint.path is not None:
            try:
                state = load_checkpoint(checkpoint.path)
            except CheckpointError as exc:
                raise AnalysisError(str(exc)) from None
            if not isinstance(state, dict) or "model" not in state:
                raise AnalysisError(f"{checkpoint.path}: not a sagepairs training checkpoint (no model weights)")
            changed = model_differences(state.get("model_spec", {}), spec)
            if changed:
                raise AnalysisError(f"{checkpoint.path}: trained with another architecture than {self.root / 'config.toml'} "
                                    f"says ({'; '.join(changed)})")
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()
                raise AnalysisError(f"{checkpoint.path}: weights do not fit the run's architecture "
                                    f"({first[1].strip() if len(first) > 1 else first[0]})") from None
            if state.get("config", {}).get("data", {}).get("ir_mean") is not None and config.data.ir_mean is None:
                data = state["config"]["data"]
                config = config.with_ir_stats(data["ir_mean"], data["ir_std"])
        model.eval()
        if device is not None:
            model.to(device)
        return model, config, spec


def _model_dict(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config.model).items()}


@functools.lru_cache(maxsize=16)
def _training_config_of(path: str, inode: int, size: int, mtime_ns: int) -> TrainingConfig:
    # Keyed by inode, size and mtime too: training rewrites config.toml (a new file renamed over it) when it resumes,
    # and a rewritten file is parsed anew. An error is not cached (lru_cache keeps results only).
    return load_training_config(path)


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: `all` and `evolution` resolve the same checkpoints many times, and hashing a
    # checkpoint (hundreds of MB with its optimiser state) each time is wasted; a rewritten file is hashed anew.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
