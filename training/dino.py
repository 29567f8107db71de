"""The self-contained core of cross-modal DINO (issue 19): head, loss, schedules, EMA teacher, multi-crop boxes, ir3.

Everything here follows facebookresearch/dino (``main_dino.py``, ``utils.py``, ``vision_transformer.py``) to the
operation, so ``tests/test_dino.py`` can check it against verbatim copies of upstream's code. Two additions:

* cross-modal directions (``teacher>student``, e.g. ``rgb>ir``): the teacher of one modality teaches the student of
  the other. There the same crop seen by the other modality is a positive pair, so ``DINOLoss`` keeps v == iq
  (``same_view_positive``); within one modality upstream's v != iq holds.
* crops are relative boxes drawn once per sample from (seed, epoch, key), so RGB and IR crop the same patch of sky.

``ir3_relative`` splits IR into three bands whose edges sit relative to a reference temperature (see
``ir_references``) instead of the fixed degrees C of ``transforms.ir_bands``, so clouds land in one band whatever
the air temperature. ``training.train`` wires it into ``training run`` (``model.objective = 'dino'``).
``DINOConfig`` and ``parse_direction`` live in ``training.config`` (which imports no torch) and are re-exported here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from training.config import MODALITIES, DINOConfig, parse_direction
from training.transforms import random_resized_box

__all__ = [
    "DINOConfig",
    "MODALITIES",
    "parse_direction",
    "DINOHead",
    "trunc_normal_",
    "to_upstream_names",
    "MultiCropWrapper",
    "DINOLoss",
    "cosine_schedule",
    "teacher_temp_schedule",
    "momentum_schedule",
    "weight_decay_schedule",
    "learning_rate_schedule",
    "apply_schedules",
    "make_teacher",
    "ema_update",
    "clip_gradients",
    "cancel_last_layer_gradients",
    "param_groups",
    "MultiCrop",
    "draw_multicrop",
    "local_crop_hw",
    "IR3_OFFSETS_C",
    "IR3_QUANTILE",
    "frame_reference_c",
    "ir_references",
    "ir3_band_index",
    "ir3_relative",
]

# -- the head -------------------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """Upstream's projection head: MLP in_dim -> hidden -> ... -> bottleneck, L2-normalise, weight-normalised Linear.

    Same constructor, initialisation order (so the same RNG draws) and forward as upstream. The weight norm is
    ``torch.nn.utils.parametrizations.weight_norm``, not upstream's deprecated ``nn.utils.weight_norm``: both
    compute ``torch._weight_norm(v, g, 0)``, so outputs are bit-identical, and this one deep-copies (the EMA
    teacher is a copy of the student). Its state_dict names g and v ``last_layer.parametrizations.weight.original0``
    and ``...original1``; a state_dict in upstream's names (``last_layer.weight_g``, ``weight_v``) loads as it is
    (torch's compatibility hook renames them), and ``to_upstream_names`` converts the other way.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = _head_mlp(in_dim, max(nlayers, 1), hidden_dim, bottleneck_dim, use_bn)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1)
        if norm_last_layer:
            g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """Upstream's ``utils.trunc_normal_`` (inverse-CDF sampling; a and b in absolute units, not in stds).

    Not ``nn.init.trunc_normal_``: from torch 2.14 that one samples by rejection, the same distribution from
    other draws, so a seeded head would no longer start from upstream's weights.
    """
    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
    tensor.uniform_(2 * low - 1, 2 * high - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    tensor.add_(mean)
    return tensor.clamp_(min=a, max=b)


def _head_mlp(in_dim: int, nlayers: int, hidden_dim: int, bottleneck_dim: int, use_bn: bool) -> nn.Module:
    """Upstream's MLP, modules built in its order: Linear [BN] GELU, (Linear [BN] GELU) x (nlayers - 2), Linear."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


_PARAMETRIZED = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def to_upstream_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict with upstream's weight-norm names (``weight_g``, ``weight_v``), e.g. for DINO's eval scripts."""
    out = {}
    for key, value in state_dict.items():
        for ours, theirs in _PARAMETRIZED.items():
            if key.endswith(ours):
                key = key[: -len(ours)] + theirs
        out[key] = value
    return out


class MultiCropWrapper(nn.Module):
    """Backbone once per run of consecutive same-size crops, outputs concatenated in crop order, head once.

    Upstream's forward; it groups by the last dimension only, this by (H, W), which is the same wherever upstream
    works (crops of one width have one height there) and does not fail on rectangular crops.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        crops = x if isinstance(x, list) else [x]
        outputs, start = [], 0
        for end in _run_ends([tuple(c.shape[-2:]) for c in crops]):
            out = self.backbone(torch.cat(crops[start:end]))
            outputs.append(out[0] if isinstance(out, tuple) else out)
            start = end
        features = torch.cat(outputs)
        self.last_features = features.detach()  # the backbone's output, for monitoring (training.dino_step)
        return self.head(features)


def _run_ends(sizes: list[tuple[int, ...]]) -> list[int]:
    """End index of every run of equal consecutive ``sizes`` (upstream: cumsum of unique_consecutive's counts)."""
    ends = [i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]]
    return ends + [len(sizes)]


# -- the loss -------------------------------------------------------------------------------------------------

class DINOLoss(nn.Module):
    """Upstream's DINO loss: cross-entropy of the sharpened, centred teacher against the student, over crop pairs.

    ``student_output``: ``ncrops`` chunks of B rows (the globals first); ``teacher_output``: ``n_global`` chunks.
    Upstream skips the pairs v == iq (the student's crop iq is the teacher's crop iq: nothing to learn within one
    modality). ``same_view_positive=True`` keeps them: across modalities the same crop is the most informative
    positive. The centre is a buffer, so it is saved and restored with the module's state_dict.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, same_view_positive: bool = False, n_global: int = 2) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.n_global = n_global
        self.same_view_positive = same_view_positive
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, nepochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(self.n_global)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq and not self.same_view_positive:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """c <- m c + (1 - m) * (sum of every rank's teacher rows) / (rows per rank x ranks), as upstream."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# -- schedules (numpy arrays, one value per iteration or per epoch) ------------------------------------------

def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """Upstream's ``utils.cosine_scheduler``: linear warm-up, then a cosine from base_value to final_value.

    The last value is not exactly final_value (upstream divides by the number of iterations, not by it less one).
    """
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    if len(schedule) != epochs * niter_per_ep:
        raise ValueError(f"schedule of {len(schedule)} values for {epochs} x {niter_per_ep} iterations")
    return schedule


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """Teacher temperature per epoch: linear warm-up, then constant (too hot a teacher early is unstable)."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


def momentum_schedule(momentum_teacher: float, epochs: int, niter_per_ep: int) -> np.ndarray:
    """EMA momentum per iteration: cosine from momentum_teacher up to 1 (the teacher freezes as training ends)."""
    return cosine_schedule(momentum_teacher, 1, epochs, niter_per_ep)


def weight_decay_schedule(weight_decay: float, weight_decay_end: float, epochs: int, niter_per_ep: int) -> np.ndarray:
    """Weight decay per iteration, cosine 0.04 -> 0.4 by default: ViTs like little decay early and more later."""
    return cosine_schedule(weight_decay, weight_decay_end, epochs, niter_per_ep)


def learning_rate_schedule(lr_per_256: float, min_lr: float, global_batch: int, epochs: int, niter_per_ep: int,
                           warmup_epochs: int) -> np.ndarray:
    """Learning rate per iteration: linear scaling by global_batch / 256, warm-up from 0, cosine to min_lr."""
    return cosine_schedule(lr_per_256 * global_batch / 256.0, min_lr, epochs, niter_per_ep,
                           warmup_epochs=warmup_epochs)


def apply_schedules(optimizer: torch.optim.Optimizer, it: int, lrs: np.ndarray, wds: np.ndarray) -> None:
    """Upstream's per-iteration update: every group's lr; the weight decay of the first (regularised) group only.

    Python floats, not numpy scalars: the optimiser's state_dict must load with ``weights_only=True``.
    """
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(lrs[it])
        if i == 0:
            group["weight_decay"] = float(wds[it])


# -- teacher, gradients, parameter groups --------------------------------------------------------------------

def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of the student without gradients and without drop path (upstream builds it with drop_path_rate 0)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):  # timm's DropPath reads it on every forward
            module.drop_prob = 0.0
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for every parameter, upstream's exact arithmetic.

    ``student`` is the bare module (a DDP wrapper's ``.module``): parameters are matched by name and a mismatch
    raises, so a wrapper or a different architecture cannot silently pair the wrong tensors.
    """
    pairs = list(zip(student.named_parameters(), teacher.named_parameters(), strict=True))
    for (name_q, param_q), (name_k, param_k) in pairs:
        if name_q != name_k:
            raise ValueError(f"ema_update: student parameter {name_q!r} meets teacher parameter {name_k!r}")
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """Scale each parameter's gradient to norm <= clip (per tensor, not global); returns the norms before it.

    Upstream's arithmetic (coefficient clip / (norm + 1e-6), applied where below 1), with one host sync for all
    norms instead of one per parameter.
    """
    grads = [p.grad.data for _, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch.stack([g.norm(2) for g in grads])
    coefs = clip / (norms + 1e-6)
    for g, coef, below in zip(grads, coefs, (coefs < 1).tolist()):
        if below:
            g.mul_(coef)
    return norms.tolist()


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the gradients of every parameter named ``*last_layer*`` during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Upstream's groups: [regularised, not regularised (biases and 1-D tensors, weight_decay 0)]; frozen skipped.

    Unlike training.optim's groups, a ViT's cls_token and pos_embed are regularised, as upstream DINO does.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


# -- synchronised multi-crop ---------------------------------------------------------------------------------

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class MultiCrop:
    """One sample's crops as relative boxes (left, top, right, bottom) in [0, 1], globals first, and their flips.

    Relative, so the same box cuts the same part of the scene from the RGB frame and the IR frame.
    """

    boxes: tuple[Box, ...]
    flips: tuple[bool, ...]
    n_global: int

    @property
    def global_boxes(self) -> tuple[Box, ...]:
        return self.boxes[: self.n_global]

    @property
    def local_boxes(self) -> tuple[Box, ...]:
        return self.boxes[self.n_global :]


def draw_multicrop(rng: np.random.Generator, global_scale: tuple[float, float] = (0.4, 1.0),
                   local_scale: tuple[float, float] = (0.05, 0.4), n_global: int = 2, n_local: int = 8,
                   ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> MultiCrop:
    """Every crop of one sample, drawn in a fixed order (per crop: box, then flip) from its own generator.

    ``rng`` is ``transforms.sample_rng(seed, epoch, key)``, so a sample's crops depend on nothing else. Boxes are
    ``transforms.random_resized_box`` (torchvision's RandomResizedCrop rule on relative coordinates).
    """
    boxes: list[Box] = []
    flips: list[bool] = []
    for i in range(n_global + n_local):
        scale = global_scale if i < n_global else local_scale
        boxes.append(random_resized_box(rng, scale, ratio))
        flips.append(bool(rng.uniform() < hflip))
    return MultiCrop(tuple(boxes), tuple(flips), n_global)


def local_crop_hw(global_hw: tuple[int, int], patch: int, fraction: float = 96 / 224) -> tuple[int, int]:
    """Local crop (H, W): ``fraction`` of the global size, rounded to a multiple of ``patch`` (at least one).

    With RGB at 2x the IR size and RGB patch 2x the IR patch, both modalities keep the same token grid.
    """
    return tuple(max(patch, round(side * fraction / patch) * patch) for side in global_hw)  # type: ignore[return-value]


# -- ir3 with bands relative to a reference temperature ------------------------------------------------------

# Band edges relative to the reference (the 95th percentile of a frame with ground in view, see ir_references).
# In the synthetic generator (ingest/scene.py) an opaque cloud is air - 16 + 8 x field (air -15.5 .. -8 degrees C),
# clear sky more than 30 degrees above the horizon air -55 .. -51, ground air - 5 .. air + 21 (sunlit); the
# reference is air - 5 .. air + 30 (sun-warmed ground, and buildings the generator keeps at 18 .. 24 degrees C).
# Over 960 frames of two generated plans the opaque clouds lay between ref - 42.8 and ref - 2.0: inside the middle
# band at any air temperature. The margins are thin because the reference's error against the air is 35 degrees
# wide; with the air temperature itself as the reference, (-30, -5) separates clear sky, cloud and ground exactly.
IR3_OFFSETS_C = (-45.0, -2.0)
IR3_QUANTILE = 95.0


def frame_reference_c(celsius: np.ndarray, q: float = IR3_QUANTILE, fallback_c: float = 0.0) -> float:
    """The ``q``-th percentile of a frame's finite pixels (degrees C); ``fallback_c`` when it has none."""
    finite = np.asarray(celsius, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.percentile(finite, q)) if finite.size else float(fallback_c)


def ir_references(frames: Sequence[np.ndarray], is_sky: Sequence[bool | None], visits: Sequence[Hashable],
                  q: float = IR3_QUANTILE, fallback_c: float = 0.0) -> np.ndarray:
    """Reference temperature of each frame: its own ``q``-th percentile, except for a sky view.

    A sky-only frame cannot tell overcast (all cloud) from clear (all cold sky) by itself, so a sky view
    (``is_sky`` True) takes the percentile of the pooled finite pixels of its visit's other views (same ``visits``
    value, e.g. node and loop); with none in its visit it falls back to its own percentile. ``is_sky`` None (the
    catalog's unknown) counts as not sky.
    """
    pooled: dict[Hashable, list[np.ndarray]] = {}
    for frame, sky, visit in zip(frames, is_sky, visits, strict=True):
        if not sky:
            values = np.asarray(frame, dtype=np.float32).ravel()
            pooled.setdefault(visit, []).append(values[np.isfinite(values)])
    visit_ref = {visit: frame_reference_c(np.concatenate(parts), q, fallback_c)
                 for visit, parts in pooled.items() if sum(part.size for part in parts)}
    return np.array([visit_ref[visit] if sky and visit in visit_ref else frame_reference_c(frame, q, fallback_c)
                     for frame, sky, visit in zip(frames, is_sky, visits)], dtype=np.float64)


def _edges(reference_c: torch.Tensor | float, offsets_c: tuple[float, float], like: torch.Tensor):
    reference = torch.as_tensor(reference_c, dtype=torch.float32, device=like.device)
    reference = reference.reshape(-1, *([1] * (like.dim() - 1)))  # per frame (N,) or one for all (scalar)
    return reference, reference + offsets_c[0], reference + offsets_c[1]


def ir3_band_index(celsius: torch.Tensor, reference_c: torch.Tensor | float,
                   offsets_c: tuple[float, float] = IR3_OFFSETS_C) -> torch.Tensor:
    """Band of each pixel (int64, N x H x W): 0 at or below ref + lower, 1 up to ref + upper, 2 above; NaN: 1."""
    _, lower, upper = _edges(reference_c, offsets_c, celsius)
    celsius = celsius.float()
    band = (celsius > lower).long() + (celsius > upper).long()
    return torch.where(torch.isnan(celsius), torch.ones_like(band), band)


def ir3_relative(celsius: torch.Tensor, reference_c: torch.Tensor | float,
                 offsets_c: tuple[float, float] = IR3_OFFSETS_C) -> torch.Tensor:
    """N x H x W degrees C -> N x 3 x H x W: the three bands of ``ir_bands``, edges at reference + offsets_c.

    Values are temperatures relative to the reference, scaled so the middle band spans [-1, 1]: the same cloud
    gives the same input at any air temperature. NaN pixels sit at the middle band's centre (0, every channel
    finite), as the dataset-mean fill makes them 0 in the other modes.
    """
    _, lower, upper = _edges(reference_c, offsets_c, celsius)
    celsius = celsius.float()
    middle = (lower + upper) / 2
    celsius = torch.where(torch.isnan(celsius), middle.expand_as(celsius), celsius)
    bands = torch.stack([torch.minimum(celsius, lower), torch.maximum(torch.minimum(celsius, upper), lower),
                         torch.maximum(celsius, upper)], dim=1)
    half_width = (offsets_c[1] - offsets_c[0]) / 2
    return (bands - middle.unsqueeze(1)) / half_width
