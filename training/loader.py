"""Training batches from a catalog Selection: a step plan that every rank agrees on, workers that build whole
batches in uint8, and the device-side step that turns them into the two views a mode needs.

Order: epoch ``e``'s global order is the Selection reader's order for (seed, e) (a function of seed, epoch and
selection only). Global step ``g`` of an epoch takes the next ``batch_size x world_size`` samples of that order;
rank ``r`` takes its contiguous ``batch_size`` of them. The incomplete last global batch is dropped, so every
rank runs exactly ``steps_per_epoch`` steps, and the samples a global step sees do not depend on the number of
ranks. Workers: worker ``w`` of ``W`` builds the batches of steps ``start + w, start + w + W, ...``, which is the
order a DataLoader takes them back in, so the number of workers changes nothing either.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import multiprocessing.context
import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from catalog.storage import is_remote
from shards.cache import ShardCache, check_limit, parse_size
from shards.layout import ir_celsius
from shards.reader import SelectionReader, epoch_order
from training.config import DataConfig, TrainingConfig
from training.dino import draw_multicrop, frame_reference_c, ir3_relative, local_crop_hw
from training.transforms import (
    Augment,
    crop_ir,
    decode_rgb_crop,
    decode_rgb_crops,
    draw_augment,
    draw_photometric,
    fit_to_grid,
    ir_bands,
    jitter_grey,
    jitter_rgb,
    luma,
    normalise_ir,
    rgb_to_float,
    sample_rng,
    tiled_size,
)

__all__ = ["StepPlan", "MultiCropPlan", "build_multicrop_batch", "PairBatches", "RowBatches", "EVAL_AUGMENT", "build_batch", "DevicePrefetcher", "BatchViews", "make_loader", "selection_fingerprint", "shard_cache"]


def selection_fingerprint(table: pa.Table) -> str:
    """sha256 of the Selection's keys in order: a resumed run must read the same samples."""
    digest = hashlib.sha256()
    for key in table.column("key").to_pylist():
        digest.update(key.encode() + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class StepPlan:
    """Which samples each (global step, rank) reads."""

    n_samples: int
    batch_size: int  # per rank
    world_size: int
    seed: int
    epochs: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // self.global_batch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a plan is small and lives as long as its loader
    def order(self, epoch: int) -> np.ndarray:
        # Exactly SelectionReader.order() with shuffle on, so `read_selection(..., shuffle=True, seed, epoch)`
        # and training agree on what an epoch is.
        return epoch_order(self.n_samples, self.seed, epoch)

    def global_rows(self, step: int) -> np.ndarray:
        """Selection rows of global step ``step`` (counted from the start of training), all ranks together."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self.order(epoch)[start : start + self.global_batch]

    def rows(self, step: int, rank: int) -> np.ndarray:
        return self.global_rows(step)[rank * self.batch_size : (rank + 1) * self.batch_size]


@dataclass(frozen=True)
class MultiCropPlan:
    """DINO's crops of every sample: ``n_global`` at the run's input sizes, ``n_local`` at the local sizes."""

    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    n_local: int
    rgb_local_hw: tuple[int, int]
    ir_local_hw: tuple[int, int]
    n_global: int = 2

    @classmethod
    def of(cls, config: TrainingConfig) -> MultiCropPlan:
        d, m, dino = config.data, config.model, config.dino
        rgb_hw, ir_hw = tiled_size(d.rgb_size, m.rgb_patch, d.fit), tiled_size(d.ir_size, m.ir_patch, d.fit)
        return cls(dino.global_crops_scale, dino.local_crops_scale, dino.local_crops_number,
                   local_crop_hw(rgb_hw, m.rgb_patch, dino.local_crop_fraction),
                   local_crop_hw(ir_hw, m.ir_patch, dino.local_crop_fraction))


class PairBatches(IterableDataset):
    """Whole batches for one rank, steps ``[start_step, stop_step)``: built in DataLoader workers.

    A batch is a dict: ``step``, ``epoch``, ``keys``; ``rgb`` uint8 N x H x W x 3 (``decode='cpu'``) or the
    batch's JPEG bytes as one uint8 tensor with ``jpeg_offsets``, ``boxes`` and ``flip`` (``decode='gpu'``);
    ``ir`` float32 N x h x w in degrees C (cropped, jittered); ``rgb_jitter`` N x 3, ``grey_jitter`` N x 2; in mode
    ir3 with ``data.ir3_reference = 'frame'``, ``ir_reference_c`` float32 N, each frame's reference (before any crop
    or jitter, so the crop decides nothing about it).
    With ``crops`` (DINO) a batch is ``build_multicrop_batch``'s instead.
    """

    def __init__(self, reader: SelectionReader, plan: StepPlan, rank: int, data: DataConfig, mode: str,
                 start_step: int, stop_step: int, ir_fill_c: float, crops: MultiCropPlan | None = None) -> None:
        super().__init__()
        self.reader, self.plan, self.rank, self.data, self.mode = reader, plan, rank, data, mode
        self.start_step, self.stop_step, self.ir_fill_c, self.crops = start_step, stop_step, ir_fill_c, crops

    def __len__(self) -> int:
        return max(self.stop_step - self.start_step, 0)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        steps = range(self.start_step + worker, self.stop_step, workers)
        for i, step in enumerate(steps):
            if i + 1 < len(steps):  # a published dataset's next batch comes while this one is decoded
                self.reader.prefetch(self.plan.rows(steps[i + 1], self.rank))
            yield self.batch(step)

    def batch(self, step: int) -> dict:
        epoch = step // self.plan.steps_per_epoch
        seed, data = self.plan.seed, self.data
        rows = self.plan.rows(step, self.rank)
        if self.crops is not None:
            batch = build_multicrop_batch(self.reader, rows, data, self.mode, self.ir_fill_c,
                                          lambda key: sample_rng(seed, epoch, key), self.crops, data.ir_noise_c)
            batch.update(step=step, epoch=epoch)
            return batch
        batch = build_batch(self.reader, rows, data, self.mode, self.ir_fill_c,
                            lambda key: draw_augment(sample_rng(seed, epoch, key), data), data.ir_noise_c)
        batch.update(step=step, epoch=epoch)
        return batch


# The evaluation view of a pair: the whole frame, unflipped, no photometric jitter and no IR noise.
EVAL_AUGMENT = Augment(box=(0.0, 0.0, 1.0, 1.0), flip=False, rgb_jitter=(1.0, 1.0, 1.0), grey_jitter=(1.0, 1.0),
                       ir_gain=1.0, ir_offset_c=0.0, noise_seed=0)


class RowBatches(IterableDataset):
    """Evaluation batches (``EVAL_AUGMENT``) of given Selection rows, in the given order, built in DataLoader workers.

    ``batches`` is a list of (tag, rows); each yielded batch carries its ``tag`` (e.g. which output chunk it fills).
    Worker ``w`` of ``W`` builds batches ``w, w + W, ...``, the order a DataLoader hands them back in.
    """

    def __init__(self, reader: SelectionReader, batches: list[tuple[object, np.ndarray]], data: DataConfig, mode: str,
                 ir_fill_c: float) -> None:
        super().__init__()
        self.reader, self.batches, self.data, self.mode, self.ir_fill_c = reader, batches, data, mode, ir_fill_c

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.batches[worker::workers]
        for i, (tag, rows) in enumerate(mine):
            if i + 1 < len(mine):  # a published dataset's next batch comes while this one is decoded
                self.reader.prefetch(mine[i + 1][1])
            batch = build_batch(self.reader, rows, self.data, self.mode, self.ir_fill_c, lambda key: EVAL_AUGMENT, 0.0)
            batch["tag"] = tag
            yield batch


def build_batch(reader: SelectionReader, rows: np.ndarray, data: DataConfig, mode: str, ir_fill_c: float,
                augment_of: Callable[[str], Augment], ir_noise_c: float) -> dict:
    """One batch of the samples at ``rows``, each cropped and jittered by ``augment_of(key)`` (see PairBatches)."""
    rgb_hw, ir_hw = data.rgb_size, data.ir_size
    n = len(rows)
    keys: list[str] = []
    rgb_tensor = _batch_buffer((n, *rgb_hw, 3), torch.uint8) if data.decode == "cpu" else None
    rgb = rgb_tensor.numpy() if rgb_tensor is not None else None
    jpegs: list[bytes] = []
    boxes = np.empty((n, 4), dtype=np.float32)
    flips = np.empty(n, dtype=bool)
    need_ir = mode != "rgb-grey"
    ir_tensor = _batch_buffer((n, *ir_hw), torch.float32)
    ir = ir_tensor.numpy()
    ir.fill(0)
    rgb_jitter = np.empty((n, 3), dtype=np.float32)
    grey_jitter = np.empty((n, 2), dtype=np.float32)
    references = np.zeros(n, dtype=np.float32) if frame_referenced(data, mode) else None
    for i, sample in enumerate(reader.iter_rows(rows)):
        key = sample["__key__"]
        aug = augment_of(key)
        keys.append(key)
        boxes[i], flips[i] = aug.box, aug.flip
        rgb_jitter[i], grey_jitter[i] = aug.rgb_jitter, aug.grey_jitter
        if rgb is not None:
            rgb[i] = decode_rgb_crop(sample["rgb.jpg"], aug.box, rgb_hw, aug.flip)
        else:
            jpegs.append(sample["rgb.jpg"])
        if need_ir:
            celsius = ir_celsius(sample)
            if references is not None:
                references[i] = frame_reference_c(celsius, fallback_c=ir_fill_c)
            ir[i] = crop_ir(celsius, aug.box, ir_hw, aug.flip, ir_fill_c, aug.ir_gain, aug.ir_offset_c,
                            ir_noise_c, aug.noise_seed)
    batch = {
        "keys": keys,
        "ir": ir_tensor,
        "rgb_jitter": torch.from_numpy(rgb_jitter),
        "grey_jitter": torch.from_numpy(grey_jitter),
    }
    if references is not None:
        batch["ir_reference_c"] = torch.from_numpy(references)
    if rgb_tensor is not None:
        batch["rgb"] = rgb_tensor
    else:
        # One tensor for the whole batch: one shared-memory block instead of N small ones.
        sizes = np.fromiter((len(j) for j in jpegs), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        packed = np.empty(int(offsets[-1]), dtype=np.uint8)
        for i, jpeg in enumerate(jpegs):
            packed[offsets[i] : offsets[i + 1]] = np.frombuffer(jpeg, dtype=np.uint8)
        batch["jpeg"] = torch.from_numpy(packed)
        batch["jpeg_offsets"] = torch.from_numpy(offsets)
        batch["boxes"] = torch.from_numpy(boxes)
        batch["flip"] = torch.from_numpy(flips)
    return batch


def build_multicrop_batch(reader: SelectionReader, rows: np.ndarray, data: DataConfig, mode: str, ir_fill_c: float,
                          rng_of: Callable[[str], np.random.Generator], crops: MultiCropPlan,
                          ir_noise_c: float) -> dict:
    """DINO's batch: every sample's crops (``draw_multicrop`` from ``rng_of(key)``, then each crop's photometric
    jitter from the same generator), the same relative box cut from RGB and IR, each JPEG decoded once.

    Crop-major rows, as DINOLoss chunks them: ``rgb_global`` uint8 (n_global x N) x H x W x 3 (row c x N + i is
    crop c of sample i), ``rgb_local`` likewise at the local size, ``ir_global``/``ir_local`` float32 degrees C,
    ``rgb_jitter`` ((n_global + n_local) x N) x 3 and ``grey_jitter`` x 2 (globals' rows first); ``ir_reference_c``
    float32 N (one per sample, every crop shares it) as in ``build_batch``.
    """
    n, n_crops = len(rows), crops.n_global + crops.n_local
    ir_local_hw = crops.ir_local_hw
    sizes = [(data.rgb_size, data.ir_size)] * crops.n_global + [(crops.rgb_local_hw, ir_local_hw)] * crops.n_local
    out = {
        "rgb_global": _batch_buffer((crops.n_global * n, *data.rgb_size, 3), torch.uint8),
        "rgb_local": _batch_buffer((crops.n_local * n, *crops.rgb_local_hw, 3), torch.uint8),
        "ir_global": _batch_buffer((crops.n_global * n, *data.ir_size), torch.float32),
        "ir_local": _batch_buffer((crops.n_local * n, *ir_local_hw), torch.float32),
    }
    for name in ("ir_global", "ir_local"):
        out[name].numpy().fill(0)
    rgb_jitter = np.empty((n_crops * n, 3), dtype=np.float32)
    grey_jitter = np.empty((n_crops * n, 2), dtype=np.float32)
    keys: list[str] = []
    references = np.zeros(n, dtype=np.float32) if frame_referenced(data, mode) else None
    for i, sample in enumerate(reader.iter_rows(rows)):
        key = sample["__key__"]
        keys.append(key)
        rng = rng_of(key)
        multicrop = draw_multicrop(rng, crops.global_scale, crops.local_scale, crops.n_global, crops.n_local,
                                   data.crop_ratio, data.hflip)
        augments = [draw_photometric(rng, data, box, flip) for box, flip in zip(multicrop.boxes, multicrop.flips)]
        rgbs = decode_rgb_crops(sample["rgb.jpg"], list(multicrop.boxes), [rgb for rgb, _ in sizes],
                                list(multicrop.flips))
        celsius = ir_celsius(sample) if mode != "rgb-grey" else None
        if references is not None:
            references[i] = frame_reference_c(celsius, fallback_c=ir_fill_c)
        for c, (aug, rgb) in enumerate(zip(augments, rgbs)):
            scope, row = ("global", c * n + i) if c < crops.n_global else ("local", (c - crops.n_global) * n + i)
            out[f"rgb_{scope}"].numpy()[row] = rgb
            rgb_jitter[c * n + i], grey_jitter[c * n + i] = aug.rgb_jitter, aug.grey_jitter
            if celsius is not None:
                out[f"ir_{scope}"].numpy()[row] = crop_ir(celsius, aug.box, sizes[c][1], aug.flip, ir_fill_c,
                                                          aug.ir_gain, aug.ir_offset_c, ir_noise_c, aug.noise_seed)
    out.update(keys=keys, rgb_jitter=torch.from_numpy(rgb_jitter), grey_jitter=torch.from_numpy(grey_jitter))
    if references is not None:
        out["ir_reference_c"] = torch.from_numpy(references)
    return out


def frame_referenced(data: DataConfig, mode: str) -> bool:
    """Whether the views need each sample's IR reference (``frame_reference_c`` of its whole, uncropped frame)."""
    return mode == "ir3" and data.ir3_reference == "frame"


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory inside a DataLoader worker (as default_collate allocates its output),
    so handing the batch to the training process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    # A batch system's SIGTERM goes to every process of the job. The training process saves a checkpoint and
    # shuts its workers down; a worker that died of the signal first would make the DataLoader raise instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Whole shards one reader may hold at once: the window it reads and the one it prefetches.
SHARDS_IN_FLIGHT = 2


def shard_cache(data: DataConfig, selection: pa.Table, readers: int) -> ShardCache | None:
    """The cache of whole shards ``data.cache`` names (None for a local dataset or no cache); raises ValueError
    in one line when ``data.cache_limit`` cannot hold what ``readers`` processes may have in flight."""
    if not data.cache or not is_remote(data.dataset):
        return None
    limit = parse_size(data.cache_limit)
    largest = pc.max(selection.column("shard_bytes")).as_py() or 0
    check_limit(limit, largest, readers, SHARDS_IN_FLIGHT)
    return ShardCache(Path(data.cache), limit)


def worker_context(dataset: object) -> multiprocessing.context.BaseContext | None:
    """How DataLoader workers start: forked, except for a published dataset, whose object-store client cannot
    work in a process forked from one that used it; those start from a fork server that never has."""
    if not is_remote(str(dataset)):
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["training.loader"])
    return context


def make_loader(batches: PairBatches | RowBatches, workers: int, prefetch: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        batches,
        batch_size=None,  # the dataset yields whole batches
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        # One iterator covers every remaining step of the run (epochs included), so the workers persist for the
        # whole run and there is no epoch boundary at which they restart.
        persistent_workers=False,
        worker_init_fn=_worker_ignores_stop_signals if workers else None,
        multiprocessing_context=worker_context(batches.reader.dataset) if workers else None,
    )


class BatchViews:
    """Device side of a batch: uint8 -> float, jitter, normalisation, the mode's two views, fitted to the patch grid."""

    def __init__(self, data: DataConfig, mode: str, rgb_patch: int, ir_patch: int, ir_mean_c: float, ir_std_c: float,
                 device: torch.device) -> None:
        self.data, self.mode, self.device = data, mode, device
        self.ir_mean_c, self.ir_std_c = ir_mean_c, ir_std_c
        self.first_hw = tiled_size(data.rgb_size, rgb_patch, data.fit)
        self.second_hw = tiled_size(data.ir_size, ir_patch, data.fit)

    def rgb(self, batch: dict) -> torch.Tensor:
        """The batch's RGB crops on the device as float N x 3 x H x W in [0, 1]."""
        if "rgb" in batch:
            return rgb_to_float(batch["rgb"].to(self.device, non_blocking=True))
        return decode_crop_on_device(batch, self.data.rgb_size, self.device)

    def __call__(self, batch: dict, rgb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mode's two views of a batch; ``rgb``: its ``self.rgb(batch)`` when the caller decoded it already."""
        first, second = self._views(self.rgb(batch) if rgb is None else rgb, batch["ir"], batch["rgb_jitter"], batch["grey_jitter"],
                                    self.data.ir_size, batch.get("ir_reference_c"))
        return fit_to_grid(first, self.first_hw), fit_to_grid(second, self.second_hw)

    def multicrop(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``build_multicrop_batch`` batch's (first global, first local, second global, second local) views."""
        n_global, n_local = len(batch["rgb_global"]), len(batch["rgb_local"])
        rgb_jitter, grey_jitter = batch["rgb_jitter"], batch["grey_jitter"]
        reference = batch.get("ir_reference_c")
        first_global, second_global = self._views(
            rgb_to_float(batch["rgb_global"].to(self.device, non_blocking=True)), batch["ir_global"],
            rgb_jitter[:n_global], grey_jitter[:n_global], self.data.ir_size, _per_crop(reference, n_global))
        first_local, second_local = self._views(
            rgb_to_float(batch["rgb_local"].to(self.device, non_blocking=True)), batch["ir_local"],
            rgb_jitter[n_global:], grey_jitter[n_global:], tuple(batch["ir_local"].shape[-2:]),
            _per_crop(reference, n_local))
        return (fit_to_grid(first_global, self.first_hw), first_local, fit_to_grid(second_global, self.second_hw),
                second_local)

    def _views(self, rgb: torch.Tensor, ir_celsius: torch.Tensor, rgb_jitter: torch.Tensor, grey_jitter: torch.Tensor,
               ir_hw: tuple[int, int], reference_c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mode's two views of float RGB crops and their IR crops (degrees C); ``ir_hw``: rgb-grey's IR size;
        ``reference_c``: each crop's frame reference (``ir_reference_c``), for ir3 relative to the frame."""
        rgb_jitter = rgb_jitter.to(self.device, non_blocking=True)
        grey_jitter = grey_jitter.to(self.device, non_blocking=True)
        if self.mode == "grey-ir":
            first = jitter_grey(luma(rgb), grey_jitter)
        else:
            first = jitter_rgb(rgb, rgb_jitter)
        if self.mode == "rgb-grey":
            # The control's second view comes from the RGB image itself, never from the thermal one.
            small = F.interpolate(luma(rgb), size=ir_hw, mode="bilinear", antialias=True, align_corners=False)
            return first, jitter_grey(small, grey_jitter)
        celsius = ir_celsius.to(self.device, non_blocking=True)
        if self.mode == "ir3":
            return first, self._ir3(celsius, reference_c)
        return first, normalise_ir(celsius, self.ir_mean_c, self.ir_std_c)

    def _ir3(self, celsius: torch.Tensor, reference_c: torch.Tensor | None) -> torch.Tensor:
        """Mode ir3's view: bands at fixed degrees (standardised), or relative to each frame's reference."""
        if self.data.ir3_reference == "fixed":
            return ir_bands(celsius, self.data.ir3_bounds, self.ir_mean_c, self.ir_std_c)
        if reference_c is None:
            raise ValueError("data.ir3_reference = 'frame' needs the batch's ir_reference_c (build_batch makes it)")
        return ir3_relative(celsius, reference_c.to(self.device, non_blocking=True), self.data.ir3_offsets_c)


def _per_crop(reference_c: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Each sample's reference for crop-major rows (row c x N + i is sample i), as ``build_multicrop_batch`` lays them."""
    return None if reference_c is None else reference_c.repeat(rows // len(reference_c))


def decode_crop_on_device(batch: dict, out_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Decode a batch's JPEGs with torchvision (nvJPEG on CUDA), crop each box and resize: float N x 3 x H x W in [0, 1].

    The crop+resize is one ``roi_align`` per image size (2 x 2 samples per output pixel, a cheap antialias).
    """
    # torchvision only for decode = "gpu": about 1.5 s of import that the CPU decode path never needs.
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.ops import roi_align

    data, offsets = batch["jpeg"], batch["jpeg_offsets"].tolist()
    encoded = [data[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    if device.type == "cuda":
        # nvJPEG's hardware decoder may be handed memory that kernels still queued on this stream read
        # (pytorch/vision#9606); the decode waits on the host anyway, so waiting first costs nothing.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 announces a move of its codecs to TorchCodec; decode_jpeg is still the nvJPEG path.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    boxes = batch["boxes"]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(decoded):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    parts = []
    for (height, width), index in by_size.items():
        # float32, not half: RoI coordinates above 512 px need more than fp16's precision.
        images = torch.stack([decoded[i] for i in index]).float()
        rois = torch.cat([torch.arange(len(index), dtype=torch.float32).unsqueeze(1),
                          boxes[index] * torch.tensor([width, height, width, height], dtype=torch.float32)], dim=1)
        crops = roi_align(images, rois.to(device, non_blocking=True), output_size=out_hw, spatial_scale=1.0,
                          sampling_ratio=2, aligned=True)
        parts.append((index, crops))
    if len(parts) == 1:  # the usual case: every frame of a dataset has the same size
        out = parts[0][1]
    else:
        out = torch.empty((len(decoded), 3, *out_hw), dtype=torch.float32, device=device)
        for index, crops in parts:
            out[torch.tensor(index, device=device)] = crops
    flip = batch["flip"].to(device, non_blocking=True)
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return out.float().div_(255.0)


class DevicePrefetcher:
    """Yields ``(batch, prepare(batch))``, preparing the next batches' device tensors while the current step runs.

    On CUDA a background thread runs ``prepare`` (host-to-device copy, nvJPEG decode and crop, normalisation) on
    its own stream, up to ``depth`` batches ahead, and the consumer's stream waits on an event instead of the host
    waiting: preparation overlaps the model's kernels instead of queueing behind them. (nvJPEG's decode returns
    to the host before its output is used, so on the training stream it drained the GPU's queue every step.)
    Elsewhere, or with ``threaded=False``, ``prepare`` runs inline.
    """

    _END = object()

    def __init__(self, batches, prepare: Callable[[dict], tuple[torch.Tensor, ...]], device: torch.device,
                 depth: int = 2, threaded: bool | None = None) -> None:
        self.batches, self.prepare, self.device = iter(batches), prepare, device
        self.threaded = device.type == "cuda" if threaded is None else threaded
        self.closed = False
        self.last_wait = 0.0  # seconds the last __next__ waited for data (decoding JPEGs counts as data)
        if self.threaded:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._work, name="device-prefetch", daemon=True)
            self.thread.start()

    def _work(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            if cuda:
                torch.cuda.set_device(self.device)
            for batch in self.batches:
                if self.stop.is_set():
                    return
                if cuda:
                    with torch.cuda.stream(stream):
                        prepared = self.prepare(batch)
                        ready = torch.cuda.Event()
                        ready.record(stream)
                else:
                    prepared, ready = self.prepare(batch), None
                self._put((batch, prepared, ready))
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(exc)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        if not self.threaded:
            batch = next(self.batches)
            self.last_wait = time.perf_counter() - started
            prepared = self.prepare(batch)
            if "jpeg" in batch:
                self.last_wait = time.perf_counter() - started
            return batch, prepared
        item = self.queue.get()
        self.last_wait = time.perf_counter() - started
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, prepared, ready = item
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in prepared:
                # Made on the prefetch stream, used on this one: the allocator must not reuse the memory early.
                tensor.record_stream(current)
        return batch, prepared

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the thread (it may be blocked on a full queue or on the loader), then the loader's workers;
        idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.threaded:
            self.stop.set()
            deadline = time.monotonic() + timeout_s  # a loader that never yields again must not hang the exit
            while self.thread.is_alive() and time.monotonic() < deadline:
                try:
                    self.queue.get(timeout=0.1)
                except queue.Empty:
                    pass
                self.thread.join(timeout=0.1)
        # Workers ignore SIGTERM (see make_loader): multiprocessing's exit handler would wait for them for ever
        # after an exception, so they are told to stop here.
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
