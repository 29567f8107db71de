"""LARS (upstream VICReg) and AdamW, and the learning-rate schedule computed as one array up front."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from training.config import OptimConfig

__all__ = ["LARS", "build_optimizer", "lr_schedule", "peak_lr"]


class LARS(torch.optim.Optimizer):
    """Upstream VICReg's LARS, vectorised with foreach ops (one kernel per op, not one per parameter).

    Groups flagged ``lars_exclude`` (biases and norms) get neither weight decay nor the trust ratio.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars_exclude"]:
                updates = grads
            else:
                updates = (torch._foreach_add(grads, params, alpha=group["weight_decay"]) if group["weight_decay"]
                           else [g.clone() for g in grads])
                param_norms = torch.stack(torch._foreach_norm(params))
                update_norms = torch.stack(torch._foreach_norm(updates))
                one = torch.ones_like(param_norms)
                trust = torch.where(param_norms > 0,
                                    torch.where(update_norms > 0, group["eta"] * param_norms / update_norms, one), one)
                torch._foreach_mul_(updates, list(trust.unbind(0)))
            momenta = []
            for p, update in zip(params, updates):
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                momenta.append(state["mu"])
            torch._foreach_mul_(momenta, group["momentum"])
            torch._foreach_add_(momenta, updates)
            torch._foreach_add_(params, momenta, alpha=-group["lr"])


def _excluded_names(model: nn.Module) -> set[str]:
    """Parameters a module asks to keep free of weight decay (timm ViTs: cls_token, pos_embed)."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay") and callable(module.no_weight_decay):
            names |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    return names


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Biases and norm weights (1-D) are excluded from weight decay and LARS adaptation, as upstream; so are the
    # ViT's tokens and position embedding: LARS would cap a 1e-6-initialised cls_token's steps at about eta x 1e-6.
    excluded = _excluded_names(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in named if p.ndim > 1 and name not in excluded]
    plain = [p for name, p in named if p.ndim <= 1 or name in excluded]
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": plain, "weight_decay": 0.0, "lars_exclude": True}]


def build_optimizer(model: nn.Module, optim: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    groups = _param_groups(model, optim.weight_decay)
    if optim.name == "lars":
        return LARS(groups, lr=0.0, weight_decay=optim.weight_decay, momentum=optim.momentum, eta=optim.eta)
    for group in groups:
        group.pop("lars_exclude")
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, weight_decay=optim.weight_decay, fused=fused or None)


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    return optim.lr_per_256 * global_batch / 256


def lr_schedule(optim: OptimConfig, global_batch: int, steps_per_epoch: int, epochs: int) -> np.ndarray:
    """Learning rate of every step: linear warm-up, then cosine to ``final_lr_ratio`` of the peak."""
    total = steps_per_epoch * epochs
    warmup = min(int(round(optim.warmup_epochs * steps_per_epoch)), total - 1)
    peak = peak_lr(optim, global_batch)
    end = peak * optim.final_lr_ratio
    steps = np.arange(total, dtype=np.float64)
    lrs = np.empty(total, dtype=np.float64)
    if warmup:
        lrs[:warmup] = peak * (steps[:warmup] + 1) / warmup
    decay = steps[warmup:] - warmup
    span = max(total - warmup - 1, 1)
    q = 0.5 * (1 + np.cos(math.pi * decay / span))
    lrs[warmup:] = end + (peak - end) * q
    return lrs
