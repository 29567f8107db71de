"""`training run`: VICReg over MPI ranks, streamed from a catalog Selection, resumable to the exact step.

The flow: rank 0 checks everything a user can get wrong (dataset, SQL, models, sizes, the resume guard) and
broadcasts the verdict, so a bad config gives one line and no rank starts work. Then every rank builds the same
model from the same seed, reads its share of each global step, and steps; rank 0 alone prints and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import catalog
from catalog.runinfo import config_to_dict, provenance
from shards.reader import SelectionReader
from training.checkpoint import (
    CheckpointError,
    config_differences,
    load_checkpoint,
    model_differences,
    save_atomic,
    schedule_differences,
)
from training.config import TrainingConfig, config_toml
from training.dino_step import (
    DINOSchedules,
    active_directions,
    build_dino_optimizer,
    dino_lr_per_256,
    dino_step,
    step_metrics,
)
from training.distributed import (
    Dist,
    abort,
    all_mean,
    bcast,
    failure_line,
    init_distributed,
    is_distributed,
    leave_process_group,
    mpi_world,
    watch_ranks,
)
from training.loader import (
    BatchViews,
    DevicePrefetcher,
    MultiCropPlan,
    PairBatches,
    StepPlan,
    make_loader,
    shard_cache,
    selection_fingerprint,
)
from training.model import ModelError, check_arch, embedding_std, initial_model, model_spec, vicreg_loss
from training.optim import build_optimizer, lr_schedule
from training.plots import plot_loss, read_jsonl

__all__ = ["TrainingError", "RunPaths", "Plan", "preflight", "run_training", "vicreg_step", "Trainer", "DINOTrainer",
           "EXIT_SIGNAL_BASE"]

FORMAT = "sagepairs-vicreg-1"
DINO_FORMAT = "sagepairs-dino-1"
FORMATS = {"vicreg": FORMAT, "dino": DINO_FORMAT}
EXIT_SIGNAL_BASE = 128  # SIGTERM -> 143, SIGINT -> 130, as a shell reports a signalled process
EXIT_NONFINITE = 3


class TrainingError(ValueError):
    """Something the user can fix; the message is one line naming the key or file."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def keys(self) -> Path:
        return self.root / "keys.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def loss_png(self) -> Path:
        return self.root / "loss.png"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"


@dataclass
class Plan:
    """Everything rank 0 resolved before training: broadcast to every rank."""

    config: TrainingConfig
    selection: pa.Table
    world_size: int
    start_step: int
    resume_from: str | None  # checkpoint path, or None for a fresh run
    schedule: dict[str, Any]
    model_spec: dict[str, Any]

    @property
    def step_plan(self) -> StepPlan:
        t = self.config.train
        return StepPlan(self.selection.num_rows, t.batch_size, self.world_size, t.seed, t.epochs)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _schedule(config: TrainingConfig, world_size: int, selection: pa.Table) -> dict[str, Any]:
    o, t = config.optim, config.train
    dino = config.model.objective == "dino"
    return {
        "epochs": t.epochs, "global_batch": t.batch_size * world_size,
        "base_lr": dino_lr_per_256(o) if dino else o.lr_per_256, "warmup_epochs": o.warmup_epochs,
        "final_lr_ratio": o.final_lr_ratio, "optimizer": "adamw" if dino else o.name, "seed": t.seed,
        "n_samples": selection.num_rows, "selection_sha256": selection_fingerprint(selection),
        "ir_mean": config.data.ir_mean, "ir_std": config.data.ir_std,
    }


def _check_sizes(config: TrainingConfig) -> None:
    d, m = config.data, config.model
    for name, size, patch in (("RGB", d.rgb_size, m.rgb_patch), ("IR", d.ir_size, m.ir_patch)):
        if d.fit == "error" and (size[0] % patch or size[1] % patch):
            raise TrainingError(
                f"model: patch {patch} does not tile the {name} input {size[0]}x{size[1]} (data.ir_size "
                f"{list(d.ir_size)}, rgb_scale {d.rgb_scale}); choose a multiple of {patch} or set data.fit = 'crop' or 'pad'"
            )


def _ir_statistics(cat, where: str) -> tuple[float, float]:
    table = cat.query(
        f"SELECT avg(ir_mean) AS m, avg(ir_std * ir_std + ir_mean * ir_mean) AS m2 FROM samples WHERE ({where}) "
        "AND ir_mean IS NOT NULL AND NOT isnan(ir_mean)"
    )
    mean, second = table.column("m")[0].as_py(), table.column("m2")[0].as_py()
    if mean is None or second is None:
        raise TrainingError("the selection has no IR statistics in the catalog; set data.ir_mean and data.ir_std")
    std = math.sqrt(max(second - mean * mean, 0.0))
    return float(mean), float(max(std, 1e-3))


def preflight(config: TrainingConfig, world_size: int, new_schedule: bool = False) -> Plan:
    """Resolve and check a run before any rank starts: raises TrainingError with one line on anything wrong."""
    d = config.data
    if not d.dataset:
        raise TrainingError("data.dataset is not set (--set data.dataset=DATASET)")
    if not catalog.dataset_exists(d.dataset):
        raise TrainingError(f"data.dataset: {d.dataset} does not exist")
    try:
        cat = catalog.open(d.dataset)
    except catalog.CatalogError as exc:
        raise TrainingError(f"data.dataset: {exc.reason}") from None
    where = d.where.strip() or "TRUE"
    try:
        selection = cat.select(where)
    except catalog.CatalogError as exc:
        raise TrainingError(f"data.where {where!r} is not valid SQL over `samples`: {exc.reason}") from None
    global_batch = config.train.batch_size * world_size
    if selection.num_rows == 0:
        raise TrainingError(f"data.where {where!r} selects no samples in {d.dataset}")
    if selection.num_rows < global_batch:
        raise TrainingError(
            f"data.where {where!r} selects {selection.num_rows} samples, fewer than one global batch of {global_batch} "
            f"(train.batch_size {config.train.batch_size} x {world_size} ranks)"
        )
    try:
        check_arch(config.model.rgb_arch, "model.rgb_arch")
        check_arch(config.model.ir_arch, "model.ir_arch")
    except ModelError as exc:
        raise TrainingError(str(exc)) from None
    _check_sizes(config)
    if config.model.objective == "dino" and d.decode != "cpu":
        raise TrainingError("data.decode = 'gpu' is not available with model.objective = 'dino' (use 'cpu')")
    try:
        shard_cache(config.data, selection, max(config.data.workers, 1))
    except ValueError as exc:
        raise TrainingError(f"data.cache_limit: {exc}") from None

    paths = RunPaths(Path(config.run.dir))
    resume_from, start_step, checkpoint = None, 0, None
    if paths.last.exists():
        try:
            checkpoint = torch.load(paths.last, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001
            raise TrainingError(f"{paths.last}: cannot be read ({type(exc).__name__}); move it away to start afresh") from None
        _check_checkpoint(checkpoint, paths.last, config.model.objective)
        resume_from, start_step = str(paths.last), int(checkpoint["step"])
        saved = checkpoint["config"]["data"]
        if d.ir_mean is None and d.ir_std is None:
            config = config.with_ir_stats(saved["ir_mean"], saved["ir_std"])
    if config.data.ir_mean is None or config.data.ir_std is None:
        mean, std = _ir_statistics(cat, where)
        config = config.with_ir_stats(config.data.ir_mean if config.data.ir_mean is not None else mean,
                                      config.data.ir_std if config.data.ir_std is not None else std)
    cat.close()
    spec = model_spec(config)
    schedule = _schedule(config, world_size, selection)
    if checkpoint is not None:
        changed_model = model_differences(checkpoint["model_spec"], spec)
        if changed_model:
            raise TrainingError(
                f"{paths.last} was trained with a different model ({'; '.join(changed_model)}); use another run.dir"
            )
        changed = schedule_differences(checkpoint["schedule"], schedule)
        changed += config_differences(checkpoint["config"], config_to_dict(config))
        changed = list(dict.fromkeys(changed))
        if changed and not new_schedule:
            raise TrainingError(
                f"{paths.last} (step {start_step}) has another schedule: {'; '.join(changed)}. Restore the config, "
                "or pass --new-schedule to continue these weights under the new one"
            )
        if changed:
            # Same samples consumed so far in this epoch, counted in the new global batch.
            old, new = checkpoint["schedule"], schedule
            old_spe = max(old["n_samples"] // old["global_batch"], 1)
            epoch, within = divmod(start_step, old_spe)
            new_spe = max(new["n_samples"] // new["global_batch"], 1)
            start_step = epoch * new_spe + min(within * old["global_batch"] // new["global_batch"], new_spe)
        del checkpoint
    return Plan(config, selection, world_size, start_step, resume_from, schedule, spec)


def _check_checkpoint(checkpoint: Any, path: Path, objective: str) -> None:
    """A complete checkpoint of this objective, or TrainingError in one line."""
    formats = {fmt: name for name, fmt in FORMATS.items()}
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in formats or not all(
            key in checkpoint for key in ("step", "config", "schedule", "model_spec", "model", "optimizer")):
        raise TrainingError(f"{path}: not a complete sagepairs training checkpoint; move it away to start afresh")
    saved = formats[checkpoint["format"]]
    if saved != objective:
        raise TrainingError(f"{path} is a {saved} checkpoint; model.objective = {objective!r} cannot resume it "
                            "(use another run.dir, or set model.objective back)")


# -- the run -----------------------------------------------------------------------------------------------

class StopFlag:
    """SIGTERM / SIGINT: remember it; the loop saves at the end of the current step and exits non-zero."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        self.signum = max(self.signum, signum)
        if signum == signal.SIGINT:
            # A second Ctrl-C acts at once. A repeated SIGTERM does not: a batch system and a launcher may both
            # send one, and the checkpoint must still be written.
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _autocast(config: TrainingConfig, device: torch.device):
    precision = config.train.precision
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = precision == "bf16"
    if not use_bf16:
        return contextlib.nullcontext, "fp32"
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16"


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint: they are about to be run again."""
    if not path.exists():
        return
    kept = [json.dumps(row) for row in read_jsonl(path) if row.get("step", start_step) < start_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


@dataclass(frozen=True)
class Verdict:
    """What the ranks decided together about the steps settled so far (every field reduced over the ranks)."""

    signum: int = 0  # a stop signal any rank received
    bad_step: int | None = None  # a step whose loss was not finite on any rank
    save_due: bool = False  # a time-based save fell due on any rank's clock
    settled_through: int = -1  # the last step whose flags are in

    def merge(self, later: Verdict) -> Verdict:
        return Verdict(max(self.signum, later.signum), self.bad_step if self.bad_step is not None else later.bad_step,
                       self.save_due or later.save_due, max(self.settled_through, later.settled_through))

    def saved(self) -> Verdict:
        return Verdict(self.signum, self.bad_step, False, self.settled_through)


class _RateWindow:
    """Pairs per second and the share of time spent waiting for data, since the last log line."""

    def __init__(self) -> None:
        self.started, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def add_step(self) -> None:
        self.steps += 1

    def rates(self, global_batch: int) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.started
        return self.steps * global_batch / elapsed, self.wait / elapsed


class Trainer:
    """VICReg's run; DINOTrainer overrides the model, the step and the metrics."""

    clock = staticmethod(time.monotonic)  # the time-based save's clock; each rank's own (see _flags)
    format = FORMAT
    crops: MultiCropPlan | None = None  # DINO's multi-crop batches; None: one pair of views per sample

    def __init__(self, plan: Plan, dist_info: Dist, argv: list[str] | None, progress: bool) -> None:
        self.plan, self.dist, self.argv, self.progress = plan, dist_info, argv, progress
        self.config = plan.config
        self.paths = RunPaths(Path(self.config.run.dir))
        self.steps = plan.step_plan
        self.stop = StopFlag()
        self.autocast, self.precision = _autocast(self.config, dist_info.device)
        self.step = plan.start_step

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

    # -- set-up --
    def build(self) -> None:
        """The model (resumed where the plan says), its optimiser, then what the objective steps with."""
        model = initial_model(self.config, self.plan.model_spec).to(self.dist.device)
        self.optimizer = self._optimizer_of(model)
        if self.plan.resume_from:
            state = load_checkpoint(Path(self.plan.resume_from))
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            del state
        self.model = model
        self._build_step()
        self._share_cores()

    def _optimizer_of(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.config.optim, fused=self.dist.device.type == "cuda")

    def _build_step(self) -> None:
        c, device = self.config, self.dist.device
        self.ddp = (DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)
                    if is_distributed() else self.model)
        self.lrs = lr_schedule(c.optim, self.steps.global_batch, self.steps.steps_per_epoch, c.train.epochs)
        self._build_views()

    def _build_views(self) -> None:
        c = self.config
        self.views = BatchViews(c.data, c.model.mode, c.model.rgb_patch, c.model.ir_patch, c.data.ir_mean,
                                c.data.ir_std, self.dist.device)
        self.prepare = self.views

    def _share_cores(self) -> None:
        if self.dist.device.type == "cpu" and self.dist.world_size > 1:
            # Ranks on one node share its cores; oversubscribed BLAS threads cost more than they give.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.dist.local_size))

    def write_run_files(self) -> None:
        if not self.dist.is_main:
            return
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        extra = provenance(self.argv, packages=("torch", "torchvision", "timm", "webdataset", "mpi4py"))
        extra.update(world_size=self.dist.world_size, backend=self.dist.backend or "none", device=str(self.dist.device),
                     precision=self.precision, started_at_step=self.plan.start_step,
                     steps_per_epoch=self.steps.steps_per_epoch, total_steps=self.steps.total_steps,
                     selection_samples=self.plan.selection.num_rows,
                     selection_sha256=self.plan.schedule["selection_sha256"])
        extra["versions"] = json.dumps(extra["versions"])
        if self.paths.config.exists() and self.plan.start_step > 0:
            # A resumed leg may run other code or on other ranks: keep the previous leg's record beside it.
            with contextlib.suppress(OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
                previous = tomllib.loads(self.paths.config.read_text())["provenance"]["started_at_step"]
                self.paths.config.replace(self.paths.root / f"config.from-step-{int(previous):06d}.toml")
        tmp = self.paths.config.with_name("config.toml.tmp")
        tmp.write_text(config_toml(self.config, extra))
        tmp.replace(self.paths.config)
        _truncate_jsonl(self.paths.metrics, self.plan.start_step)
        _truncate_jsonl(self.paths.keys, self.plan.start_step)

    # -- checkpoints --
    def state(self, step: int) -> dict[str, Any]:
        return {
            "format": self.format,
            "step": step,
            "epoch": step / self.steps.steps_per_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.plan.schedule,
            "model_spec": self.plan.model_spec,
            "config": config_to_dict(self.config),
            "world_size": self.dist.world_size,
        }

    def save(self, step: int, epoch_end: int | None = None, final: bool = False) -> None:
        self.last_save = self.clock()  # every rank restarts its clock at the same, collective, save
        if not self.dist.is_main:
            return
        save_atomic(self.state(step), self.paths.last)
        kept = epoch_end is not None and (epoch_end % self.config.train.checkpoint_every == 0
                                          or epoch_end == self.config.train.epochs)
        if kept:
            target = self.paths.epoch_checkpoint(epoch_end)
            tmp = target.with_name(target.name + ".tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(self.paths.last, tmp)  # last.pt is replaced, never rewritten, so a hard link is a snapshot
            except OSError:  # a file system without hard links
                shutil.copyfile(self.paths.last, tmp)
            tmp.replace(target)
        if kept or final:
            plot_loss(self.paths.metrics, self.paths.loss_png)

    # -- the loop --
    def run(self) -> int:
        """Train from the plan's start step to its stop step; returns the exit code (the same on every rank)."""
        start, stop_at = self.plan.start_step, self._stop_at()
        self.write_run_files()
        if start >= stop_at:
            self.log(f"{self.paths.root}: nothing to do (step {start} of {self.steps.total_steps} already done)")
            return 0
        loader = self._open_loader(start, stop_at)
        self._announce(start)
        prefetch = DevicePrefetcher(iter(loader), self.prepare, self.dist.device)
        bar = self._progress_bar(start, stop_at)
        try:
            code = self._loop(prefetch, start, stop_at, bar)
        finally:
            self._close_loader(prefetch, bar)
        return self._finish() if code is None else code

    def _stop_at(self) -> int:
        total, max_steps = self.steps.total_steps, self.config.train.max_steps
        return min(total, max_steps) if max_steps else total

    def _open_loader(self, start: int, stop_at: int):
        c = self.config
        cache = shard_cache(c.data, self.plan.selection, max(c.data.workers, 1) * self.dist.local_size)
        reader = SelectionReader(self.plan.selection, catalog.dataset_ref(c.data.dataset), cache=cache)
        batches = PairBatches(reader, self.steps, self.dist.rank, c.data, c.model.mode, start, stop_at, c.data.ir_mean,
                              crops=self.crops)
        self.stop.install()  # before the workers fork, so they inherit it and are not killed mid-batch
        return make_loader(batches, c.data.workers, c.data.prefetch, pin_memory=self.dist.device.type == "cuda")

    def _announce(self, start: int) -> None:
        c, steps = self.config, self.steps
        self.log(
            f"training {c.model.mode}{' (DINO)' if c.model.objective == 'dino' else ''}: {self.plan.selection.num_rows} samples, {steps.steps_per_epoch} steps/epoch x "
            f"{c.train.epochs} epochs, global batch {steps.global_batch} on {self.dist.world_size} rank(s) "
            f"({self.dist.backend or 'single process'}, {self.dist.device}, {self.precision})"
            + (f"; resuming at step {start}" if start else "")
        )

    def _progress_bar(self, start: int, stop_at: int):
        if not (self.dist.is_main and self.progress):
            return None
        return tqdm(total=stop_at, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _close_loader(self, prefetch, bar) -> None:  # noqa: ANN001
        if bar is not None:
            bar.close()
        prefetch.close()  # and the loader's workers, which ignore SIGTERM (see make_loader)
        self.stop.restore()

    def _loop(self, prefetch, start: int, stop_at: int, bar) -> int | None:  # noqa: ANN001
        """The steps; an exit code when the run must stop early (signal, non-finite loss), else None.

        Every branch that changes control flow reads `Verdict`s, values reduced over the ranks in the same step,
        never this rank's own clock or signal, so all ranks take the same branch at the same step.
        """
        self.last_save = self.clock()
        self.window = _RateWindow()
        step, pending, verdict = start, None, Verdict()
        while step < stop_at:
            batch, views = next(prefetch)
            if batch["step"] != step:
                raise RuntimeError(f"loader gave step {batch['step']}, expected {step}")
            self.window.add_wait(prefetch.last_wait)  # the loader and the nvJPEG decode, not the other views
            loss, outputs = self._optimise(step, views)
            # Read the previous step's verdict only now, so the GPU already has this step queued.
            previous, pending = pending, self._flags(step, loss)
            verdict = verdict.merge(self._settle(previous))
            if verdict.bad_step is not None:
                return self._nonfinite(verdict.bad_step)
            if self.config.run.record_keys:
                self._record_keys(step, batch["keys"])
            self._maybe_log(step, start, stop_at, loss, outputs, bar)
            step += 1
            self.step = step
            if bar is not None:
                bar.update(1)
            code, verdict = self._end_of_step(step, stop_at, pending, verdict)
            if code is not None:
                return code
            pending = None if verdict.settled_through >= step - 1 else pending
        return None

    def _seed_step(self, step: int) -> None:
        # Model randomness (drop path) from (seed, step, rank): a resumed step draws what it would have.
        torch.manual_seed((self.config.train.seed * 1_000_003 + step) * 4099 + self.dist.rank)

    def _optimise(self, step: int, views: tuple[torch.Tensor, ...]):
        """(loss, what _log_metrics needs besides it)."""
        self._seed_step(step)
        first, second = views
        loss, terms, h_rgb, h_ir = vicreg_step(self.ddp, self.optimizer, first, second, float(self.lrs[step]),
                                               self.config.loss, self.autocast)
        return loss, (terms, h_rgb, h_ir)

    def _maybe_log(self, step, start, stop_at, loss, outputs, bar) -> None:  # noqa: ANN001
        self.window.add_step()
        if not (step == start or (step + 1) % self.config.train.log_every == 0 or step + 1 == stop_at):
            return
        rate, wait_share = self.window.rates(self.steps.global_batch)
        self._log_metrics(step, loss, outputs, float(self.lrs[step]), rate, wait_share)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", pairs_s=f"{rate:.0f}", wait=f"{100 * wait_share:.0f}%")
        self.window = _RateWindow()

    def _end_of_step(self, step: int, stop_at: int, pending, verdict: Verdict) -> tuple[int | None, Verdict]:  # noqa: ANN001
        """Save when an epoch ends, a save is due or a signal came (all collective); stop on a signal."""
        epoch_end = step % self.steps.steps_per_epoch == 0
        if not (epoch_end or verdict.save_due or verdict.signum or step == stop_at):
            return None, verdict
        # Never save weights that a non-finite step has touched: settle this step first.
        verdict = verdict.merge(self._settle(pending))
        if verdict.bad_step is not None:
            return self._nonfinite(verdict.bad_step), verdict
        if epoch_end or verdict.save_due or verdict.signum:
            self.save(step, epoch_end=step // self.steps.steps_per_epoch if epoch_end else None,
                      final=bool(verdict.signum) or step == stop_at)
            verdict = verdict.saved()
        if verdict.signum:
            name = signal.Signals(verdict.signum).name
            self.warn(f"training: {name} at step {step} of {self.steps.total_steps}: saved {self.paths.last}; "
                      "run the same command again to resume")
            return EXIT_SIGNAL_BASE + verdict.signum, verdict
        return None, verdict

    def _finish(self) -> int:
        step, steps = self.step, self.steps
        if step % steps.steps_per_epoch:
            self.save(step, final=True)
        if step < steps.total_steps:
            self.log(f"training: stopped at step {step} of {steps.total_steps} (train.max_steps); saved {self.paths.last}")
        else:
            self.log(f"training: done, {steps.total_steps} steps ({self.config.train.epochs} epochs)")
        self.log(f"run directory: {self.paths.root}\nloss curve: {self.paths.loss_png}")
        return 0

    def _flags(self, step: int, loss: torch.Tensor):
        """(step, [signal, non-finite, save due] reduced over ranks with MAX, in flight).

        A save falls due by this rank's clock; reduced with MAX it is due on every rank as soon as on any.
        """
        due = self.clock() - self.last_save > 60 * self.config.train.checkpoint_minutes
        local = torch.tensor([float(self.stop.signum), 0.0, float(due)])
        flags = local.to(self.dist.device, non_blocking=True)
        flags[1] = (~torch.isfinite(loss.detach())).float()
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True) if is_distributed() else None
        return step, flags, work

    @staticmethod
    def _settle(pending) -> Verdict:  # noqa: ANN001
        """Wait for a step's reduced flags (an empty verdict for none)."""
        if pending is None:
            return Verdict()
        step, flags, work = pending
        if work is not None:
            work.wait()
        signum, nonfinite, due = flags.tolist()
        return Verdict(int(signum), step if nonfinite else None, bool(due), step)

    def _nonfinite(self, step: int) -> int:
        where = f"{self.paths.last} (step {self._saved_step()})" if self.paths.last.exists() else "none was written"
        self.warn(f"training: step {step}: the loss is not finite; stopping. The last good checkpoint is kept: {where}")
        return EXIT_NONFINITE

    def _saved_step(self) -> int:
        return int(torch.load(self.paths.last, map_location="cpu", weights_only=True, mmap=True)["step"])

    def _record_keys(self, step: int, keys: list[str]) -> None:
        if is_distributed():
            gathered: list[list[str]] = [[] for _ in range(self.dist.world_size)]
            dist.all_gather_object(gathered, keys)
            keys = [k for part in gathered for k in part]
        if self.dist.is_main:
            with open(self.paths.keys, "a") as fh:
                fh.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def _log_metrics(self, step, loss, outputs, lr, pairs_per_s, wait_share) -> None:  # noqa: ANN001
        terms, h_rgb, h_ir = outputs
        values = torch.stack([loss.detach().float(), terms["sim"], terms["std"], terms["cov"],
                              embedding_std(h_rgb), embedding_std(h_ir)]).to(self.dist.device)
        values = all_mean(values).tolist()
        if not self.dist.is_main:
            return
        c = self.config.loss
        row = {
            "step": step, "epoch": step // self.steps.steps_per_epoch, "loss": values[0],
            "sim": values[1], "std": values[2], "cov": values[3],
            "sim_weighted": c.sim * values[1], "std_weighted": c.std * values[2], "cov_weighted": c.cov * values[3],
            "rgb_embedding_std": values[4], "ir_embedding_std": values[5], "lr": lr,
            "samples_per_s": round(pairs_per_s, 2), "data_wait": round(wait_share, 4), "time": time.time(),
        }
        self._write_row(row)

    def _write_row(self, row: dict[str, Any]) -> None:
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}  # JSON has no NaN
        with open(self.paths.metrics, "a") as fh:
            fh.write(json.dumps(row) + "\n")


class DINOTrainer(Trainer):
    """Cross-modal DINO: each student in its own DDP wrapper, teachers and centres outside it, AdamW, schedules
    indexed by the global step (so a resumed step uses the values it would have)."""

    format = DINO_FORMAT

    def _optimizer_of(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_dino_optimizer(model, self.config.optim)

    def _build_step(self) -> None:
        c, device = self.config, self.dist.device
        self.students = {name: (DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
                                if is_distributed() else student) for name, student in self.model.students.items()}
        self.schedules = DINOSchedules.of(c, self.steps.global_batch, self.steps.steps_per_epoch)
        self.lrs = self.schedules.lr
        self.crops = MultiCropPlan.of(c)
        self._build_views()
        self.prepare = self.views.multicrop

    def _optimise(self, step: int, views: tuple[torch.Tensor, ...]):
        self._seed_step(step)
        rgb_global, rgb_local, ir_global, ir_local = views
        crops = {"rgb": [rgb_global, rgb_local] if len(rgb_local) else [rgb_global],
                 "ir": [ir_global, ir_local] if len(ir_local) else [ir_global]}
        directions = active_directions(self.config.dino, step)
        result = dino_step(self.model, self.students, self.optimizer, crops, directions, step,
                           step // self.steps.steps_per_epoch, self.schedules, self.config.dino, self.autocast)
        return result.loss, result

    def _log_metrics(self, step, loss, outputs, lr, pairs_per_s, wait_share) -> None:  # noqa: ANN001
        named = step_metrics(self.model, outputs)
        values = all_mean(torch.stack(list(named.values())).to(self.dist.device)).tolist()
        if not self.dist.is_main:
            return
        epoch = step // self.steps.steps_per_epoch
        any_loss = next(iter(self.model.losses.values()))
        row = {"step": step, "epoch": epoch, **dict(zip(named, values)),
               "teacher_temp": float(any_loss.teacher_temp_schedule[epoch]),
               "momentum": float(self.schedules.momentum[step]), "weight_decay": float(self.schedules.weight_decay[step]),
               "lr": lr, "samples_per_s": round(pairs_per_s, 2), "data_wait": round(wait_share, 4), "time": time.time()}
        self._write_row(row)


def vicreg_step(model, optimizer, first: torch.Tensor, second: torch.Tensor, lr: float, loss_config,
                autocast=contextlib.nullcontext):
    """One optimisation step on one rank's views: (loss, its terms, both backbones' embeddings)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast():
        z_rgb, z_ir, h_rgb, h_ir = model(first, second)
    loss, terms = vicreg_loss(z_rgb, z_ir, loss_config.sim, loss_config.std, loss_config.cov)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, terms, h_rgb, h_ir


def run_training(config: TrainingConfig, new_schedule: bool = False, argv: list[str] | None = None,
                 progress: bool = True, log=print) -> int:
    """The whole of `training run` on this rank; returns the exit code. Errors end every rank."""
    rank, world_size, _, _ = mpi_world()
    verdict = bcast(_preflight_verdict(config, world_size, new_schedule) if rank == 0 else None)
    if verdict[0] == "error":
        if rank == 0:
            log(f"training run: {verdict[1]}")
        return 2
    plan: Plan = verdict[1]
    dist_info = None
    try:
        dist_info = init_distributed(plan.config.train.timeout_s)
        with watch_ranks("training run", rank, dist_info.peers):
            code = _train(plan, dist_info, argv, progress, log)
    except BaseException as exc:
        if world_size > 1:
            # Whatever happens while reporting (a DataLoader's SIGCHLD handler can raise again), end every rank.
            try:
                sys.stderr.write(f"[rank {rank}] training failed:\n{traceback.format_exc()}")
                peers = dist_info.peers if dist_info is not None else ()
                sys.stderr.write(failure_line("training run", rank, world_size, exc, peers) + "\n")
            finally:
                abort(1)
        raise
    leave_process_group()
    return code


def _preflight_verdict(config: TrainingConfig, world_size: int, new_schedule: bool) -> tuple[str, Any]:
    """Rank 0's ("ok", Plan) or ("error", one line): every rank must receive one, whatever went wrong."""
    try:
        return "ok", preflight(config, world_size, new_schedule)
    except (TrainingError, CheckpointError) as exc:
        return "error", str(exc)
    except Exception as exc:  # noqa: BLE001 - the other ranks wait for a verdict: they must get one
        if world_size == 1:
            raise
        traceback.print_exc()
        return "error", f"{type(exc).__name__}: {_first_line(str(exc))}"


def _train(plan: Plan, dist_info: Dist, argv: list[str] | None, progress: bool, log) -> int:  # noqa: ANN001
    trainer = (DINOTrainer if plan.config.model.objective == "dino" else Trainer)(plan, dist_info, argv, progress)
    try:
        trainer.build()
    except ModelError as exc:
        # Every rank builds the same model from the same config: they all fail here alike.
        if dist_info.is_main:
            log(f"training run: {exc}")
        return 2
    return trainer.run()
