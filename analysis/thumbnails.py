"""Thumbnails of the decoded evaluation frames, made on the device while `analysis embed` prepares each batch.

The RGB thumbnail is the decoded frame (uint8, before any normalisation) downscaled with an antialiased bilinear
filter; the IR thumbnail is the frame in degrees C, downscaled the same way and scaled by the frame's own range,
0 = its min, 255 = its max, the range kept beside it. Both are made where the batch is (on CUDA, on the GPU: only
the uint8 thumbnails come back to the host). They are written to :mod:`analysis.thumbstore`'s store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.loader import BatchViews

__all__ = ["make_thumbnails", "Prepared", "EmbedPrepare"]


def make_thumbnails(rgb: torch.Tensor, ir_celsius: torch.Tensor, size: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rgb uint8 N x h x w x 3, ir uint8 N x h x w, ir range float32 N x 2 in degrees C) of decoded frames:
    ``rgb`` float N x 3 x H x W in [0, 1], ``ir_celsius`` float N x H' x W'. A frame with no finite IR pixel gets
    a black IR thumbnail and a NaN range; non-finite pixels of the others show as the frame's min."""
    small = F.interpolate(rgb.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    rgb_u8 = small.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    ir = ir_celsius.float()
    finite = torch.isfinite(ir)
    lo = torch.where(finite, ir, torch.full_like(ir, float("inf"))).amin(dim=(1, 2))
    hi = torch.where(finite, ir, torch.full_like(ir, float("-inf"))).amax(dim=(1, 2))
    has = finite.flatten(1).any(dim=1)
    lo, hi = torch.where(has, lo, torch.zeros_like(lo)), torch.where(has, hi, torch.zeros_like(hi))
    filled = torch.where(finite, ir, lo.view(-1, 1, 1))
    small_ir = F.interpolate(filled.unsqueeze(1), size=size, mode="bilinear", antialias=True,
                             align_corners=False).squeeze(1)
    span = (hi - lo).clamp_min(1e-6).view(-1, 1, 1)
    ir_u8 = ((small_ir - lo.view(-1, 1, 1)) / span).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    ir_u8 = torch.where(has.view(-1, 1, 1), ir_u8, torch.zeros_like(ir_u8))
    nan = torch.full_like(lo, float("nan"))
    ranges = torch.stack([torch.where(has, lo, nan), torch.where(has, hi, nan)], dim=1)
    return rgb_u8, ir_u8, ranges


@dataclass(frozen=True)
class Prepared:
    """One batch on the device: the model's two views (None where its chunk is embedded already) and its thumbnails
    (None where they are stored already). Iterating yields every tensor, which DevicePrefetcher keeps alive on the
    consumer's stream."""

    views: tuple[torch.Tensor, torch.Tensor] | None
    thumbs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self.views or ()
        yield from self.thumbs or ()


class EmbedPrepare:
    """The device side of an embed batch: the views of chunks in ``embed_chunks``, the thumbnails of chunks in
    ``thumb_chunks``, the RGB decoded once for both (nvJPEG's decode is the expensive part on a GPU)."""

    def __init__(self, views: BatchViews, embed_chunks: set[int], thumb_chunks: set[int], size: tuple[int, int]):
        self.views, self.embed_chunks, self.thumb_chunks, self.size = views, embed_chunks, thumb_chunks, tuple(size)

    def __call__(self, batch: dict) -> Prepared:
        chunk = batch["tag"][0]
        if chunk not in self.thumb_chunks:
            return Prepared(self.views(batch), None)
        rgb = self.views.rgb(batch)
        views = self.views(batch, rgb=rgb) if chunk in self.embed_chunks else None
        ir = batch["ir"].to(self.views.device, non_blocking=True)
        return Prepared(views, make_thumbnails(rgb, ir, self.size))
