"""`analysis attention`: DINO-style attention maps of both branches, per head, for a few samples.

The maps are the last block's CLS -> patch attention (DINO ``visualize_attention.py``). timm computes attention
with ``F.scaled_dot_product_attention`` by default, which never materialises the attention matrix, so a hook on
``attn_drop`` sees nothing; ``cls_attention`` switches the last block to the explicit softmax path for one
forward and restores it afterwards.

Preprocessing is the evaluation view that ``analysis embed`` uses (``training.loader.RowBatches`` with
``EVAL_AUGMENT`` through ``BatchViews``): the 2023 attention script resized and normalised differently from
training, so its maps showed a model fed inputs it was never trained on.

Writes ``RUN/analysis/<checkpoint>/attention/``: ``<key>.png`` per sample (rows: RGB and IR branch; columns: the
input, each head's map over it with its threshold-mask contour, the mean over heads), ``attention.npz``
(``keys``, ``rgb``, ``ir``: N x heads x gh x gw; ``rgb_mask``, ``ir_mask``: the threshold masks) and, last,
``attention.json``, which lists the files (paths relative to ``RUN/analysis/<checkpoint>/``): a reader that finds
the json finds every file it names complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.config import AttentionConfig
from analysis.embed import selection_for
from analysis.results import AttentionResult, result_json, write_result
from analysis.runs import AnalysisError, RunDir
from catalog.query import sql_string
from shards.reader import SelectionReader
from training.loader import BatchViews, RowBatches
from training.transforms import GREY_MEAN, GREY_STD, RGB_MEAN, RGB_STD, fit_to_grid

__all__ = ["cls_attention", "threshold_mask", "attention", "ATTENTION_DIR"]

ATTENTION_DIR = "attention"
_BATCH = 16  # samples per forward: attention is for a handful of figures, not throughput
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# -- maps --------------------------------------------------------------------------------------------------

def cls_attention(backbone, images):
    """Last-block CLS -> patch attention of a timm ViT: float32 N x heads x gh x gw, (gh, gw) the patch grid.

    Each row is the softmax over all tokens, so a head's patch values sum to 1 minus what CLS pays to the prefix
    tokens (itself, registers). The model's ``fused_attn`` setting is restored even if the forward fails.
    """
    if getattr(backbone, "cls_token", None) is None or not getattr(backbone, "num_prefix_tokens", 0):
        raise AnalysisError(f"{type(backbone).__name__}: no CLS token, so there is no CLS attention to map")
    attn = backbone.blocks[-1].attn
    prefix = int(backbone.num_prefix_tokens)
    ph, pw = backbone.patch_embed.patch_size
    gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
    captured: list[torch.Tensor] = []

    def keep_softmax(module, inputs) -> None:
        captured.append(inputs[0].detach())

    fused = getattr(attn, "fused_attn", None)
    handle = attn.attn_drop.register_forward_pre_hook(keep_softmax)
    try:
        if fused is not None:
            attn.fused_attn = False  # only the explicit path computes the softmax that attn_drop receives
        with torch.no_grad():
            backbone.forward_features(images)
    finally:
        handle.remove()
        if fused is not None:
            attn.fused_attn = fused
    if len(captured) != 1:
        raise AnalysisError(f"{type(backbone).__name__}: captured {len(captured)} attention matrices from the last "
                            "block, expected 1 (an attention module timm does not route through attn_drop?)")
    weights = captured[0]  # N x heads x tokens x tokens
    if weights.shape[-1] != prefix + gh * gw:
        raise AnalysisError(f"{type(backbone).__name__}: {weights.shape[-1]} tokens for a {gh}x{gw} patch grid "
                            f"and {prefix} prefix token(s)")
    return weights[:, :, 0, prefix:].float().reshape(weights.shape[0], weights.shape[1], gh, gw)


def threshold_mask(maps, keep: float = 0.6):
    """DINO's mask: per map (the last two axes), the smallest set of patches holding ``keep`` of its mass.

    Sort ascending, normalise, keep the patches where the cumulative sum exceeds ``1 - keep``, un-sort. Takes and
    returns a numpy array or a torch tensor (bool, the shape of ``maps``).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"attention.threshold must be in (0, 1], got {keep}")
    as_torch = not isinstance(maps, np.ndarray)
    values = (maps.detach().cpu().numpy() if as_torch else maps).astype(np.float64)
    flat = values.reshape(-1, values.shape[-2] * values.shape[-1])
    order = np.argsort(flat, axis=1, kind="stable")
    ranked = np.take_along_axis(flat, order, axis=1)
    total = ranked.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(ranked / np.where(total > 0, total, 1.0), axis=1)
    kept_ranked = cumulative > 1.0 - keep
    mask = np.empty_like(kept_ranked)
    np.put_along_axis(mask, order, kept_ranked, axis=1)
    mask = mask.reshape(values.shape)
    if as_torch:
        return torch.from_numpy(mask)
    return mask


# -- samples -----------------------------------------------------------------------------------------------

def _pick_keys(run: RunDir, keys: Sequence[str], dataset: str | None):
    """(Selection, dataset root, training config, rows in the order of ``keys``); unknown keys are named."""
    wanted = list(dict.fromkeys(keys))  # a key asked for twice is drawn once
    if not wanted:
        raise AnalysisError("--keys is empty")
    where = f"key IN ({', '.join(sql_string(k) for k in wanted)})"
    # An empty selection is not refused there: none of the keys existing is said below, naming them.
    selection, root, config = selection_for(run, where, dataset, allow_empty=True)
    index = {key: row for row, key in enumerate(selection.column("key").to_pylist())}
    missing = [k for k in wanted if k not in index]
    if missing:
        raise AnalysisError(f"{root}: no sample with key {', '.join(missing)} in the catalog")
    return selection, root, config, np.asarray([index[k] for k in wanted], dtype=np.int64)


def _pick_where(run: RunDir, where: str, count: int, seed: int, dataset: str | None):
    """(Selection, dataset root, training config, rows): the first ``count`` of a seeded random order."""
    if count < 1:
        raise AnalysisError(f"attention.count must be >= 1, got {count}")
    selection, root, config = selection_for(run, where, dataset)
    # A random draw, not the catalog's first rows: those are one node's first minutes (shard order).
    rows = np.random.default_rng(seed).permutation(selection.num_rows)[:count]
    return selection, root, config, rows.astype(np.int64)


# -- figures -----------------------------------------------------------------------------------------------

def _first_display(first: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The first view (C x H x W, normalised) back to what a person sees: RGB in [0, 1], or grey."""
    if first.shape[0] == 3:
        image = first * np.asarray(RGB_STD)[:, None, None] + np.asarray(RGB_MEAN)[:, None, None]
        return np.clip(image.transpose(1, 2, 0), 0.0, 1.0), None
    return np.clip(first[0] * GREY_STD + GREY_MEAN, 0.0, 1.0), "gray"


def _second_display(second: np.ndarray, celsius: np.ndarray | None, data, mode: str) -> tuple[np.ndarray, str, str]:
    """The second view as (image, colour map, label): degrees C for the thermal modes, grey for the control."""
    if mode == "rgb-grey":
        return np.clip(second[0] * GREY_STD + GREY_MEAN, 0.0, 1.0), "gray", "grey (from RGB) branch input"
    if mode == "ir3":
        # The three bands are not one image; show the degrees the bands were cut from, fitted like the view.
        return celsius, "inferno", "IR branch input (°C)"
    return second[0] * data.ir_std + data.ir_mean, "inferno", "IR branch input (°C)"


def _upsample(grid: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a gh x gw grid to the image (a patch is a block of pixels, as DINO shows it)."""
    gh, gw = grid.shape
    return np.repeat(np.repeat(grid, hw[0] // gh, axis=0), hw[1] // gw, axis=1)


def _draw_row(axes, image: np.ndarray, cmap: str | None, label: str, maps: np.ndarray, masks: np.ndarray,
              mean_mask: np.ndarray, keep: float) -> None:
    hw = image.shape[:2]
    limits = {}
    if cmap == "inferno":  # degrees: a robust range, so one hot pixel does not flatten the picture
        limits = dict(vmin=float(np.nanpercentile(image, 1)), vmax=float(np.nanpercentile(image, 99)))
    axes[0].imshow(image, cmap=cmap, **limits)
    axes[0].set_title(label, fontsize=8)
    backdrop = image.mean(axis=2) if image.ndim == 3 else image
    panels = [(maps[h], masks[h], f"head {h}") for h in range(len(maps))]
    panels.append((maps.mean(axis=0), mean_mask, "mean of heads"))
    for ax, (grid, mask, title) in zip(axes[1:], panels):
        ax.imshow(backdrop, cmap="gray")
        ax.imshow(_upsample(grid, hw), cmap="jet", alpha=0.5)
        if 0 < mask.sum() < mask.size:
            ax.contour(_upsample(mask.astype(np.float32), hw), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(f"{title} ({keep:.0%} mask)" if title == "mean of heads" else title, fontsize=8)
    for ax in axes:
        ax.set_axis_off()


def _figure(key: str, rows: list[dict[str, Any]], keep: float):
    columns = 2 + max(len(row["maps"]) for row in rows)
    height, width = rows[0]["image"].shape[:2]
    panel = 2.4
    fig = Figure(figsize=(panel * columns, (panel * height / width + 0.3) * len(rows) + 0.3), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever backend pyplot would pick: this runs on batch nodes without a display
    grid = fig.subplots(len(rows), columns, squeeze=False)
    for axes, row in zip(grid, rows):
        used = 2 + len(row["maps"])
        _draw_row(axes[:used], row["image"], row["cmap"], row["label"], row["maps"], row["masks"],
                  row["mean_mask"], keep)
        for ax in axes[used:]:
            ax.set_axis_off()
    fig.suptitle(key, fontsize=9)
    return fig


def _replace_into(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def _png_name(key: str) -> str:
    return _UNSAFE.sub("_", key) + ".png"


# -- the command -------------------------------------------------------------------------------------------

def _device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def attention(run_dir: str | Path, checkpoint: str = "last", keys: Sequence[str] | None = None,
              where: str | None = None, config: AttentionConfig = AttentionConfig(), dataset: str | None = None,
              device=None, log=print, seed: int = 0) -> dict[str, Any]:
    """Attention maps of both branches for ``keys`` (else ``config.count`` random samples of ``where``)."""
    if not 0.0 < config.threshold <= 1.0:  # before any model is loaded
        raise AnalysisError(f"attention.threshold must be in (0, 1], got {config.threshold}")
    run = RunDir.open(run_dir)
    ckpt = run.checkpoint(checkpoint)
    if keys is not None:
        selection, root, _, rows = _pick_keys(run, keys, dataset)
        where_used = None
    else:
        where_used = (where if where is not None else config.where).strip() or "TRUE"
        selection, root, _, rows = _pick_where(run, where_used, config.count, seed, dataset)
    dev = _device(device)
    model, train_config, _ = run.load_model(ckpt, dev)
    m = train_config.model
    # Workers decode on the CPU: a few samples do not need nvJPEG, and this keeps the figures machine-independent.
    data = dataclasses.replace(train_config.data, decode="cpu")
    if m.mode != "rgb-grey" and (data.ir_mean is None or data.ir_std is None):
        raise AnalysisError(f"{run.root / 'config.toml'}: data.ir_mean/ir_std are not recorded (was the run trained?)")
    views = BatchViews(data, m.mode, m.rgb_patch, m.ir_patch, data.ir_mean, data.ir_std, dev)
    batches = [(start, rows[start : start + _BATCH]) for start in range(0, len(rows), _BATCH)]
    reader = SelectionReader(selection, root)
    keys_out: list[str] = []
    firsts, seconds, celsius, rgb_maps, ir_maps = [], [], [], [], []
    with torch.inference_mode():
        for batch in RowBatches(reader, batches, data, m.mode, data.ir_mean):
            first, second = views(batch)
            keys_out += list(batch["keys"])
            rgb_maps.append(cls_attention(model.rgb_backbone, first.float()).cpu().numpy())
            ir_maps.append(cls_attention(model.ir_backbone, second.float()).cpu().numpy())
            firsts.append(first.float().cpu().numpy())
            seconds.append(second.float().cpu().numpy())
            celsius.append(fit_to_grid(batch["ir"].unsqueeze(1), views.second_hw)[:, 0].numpy())
    rgb, ir = np.concatenate(rgb_maps), np.concatenate(ir_maps)
    keep = config.threshold
    rgb_mask, ir_mask = threshold_mask(rgb, keep), threshold_mask(ir, keep)
    rgb_mean_mask, ir_mean_mask = threshold_mask(rgb.mean(axis=1), keep), threshold_mask(ir.mean(axis=1), keep)

    out = run.results(ckpt.name) / ATTENTION_DIR
    out.mkdir(parents=True, exist_ok=True)
    first_all, second_all, celsius_all = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(celsius)
    pngs: list[str] = []
    for i, key in enumerate(keys_out):
        image, cmap = _first_display(first_all[i])
        second_image, second_cmap, second_label = _second_display(second_all[i], celsius_all[i], data, m.mode)
        fig = _figure(key, [
            {"image": image, "cmap": cmap, "label": "RGB branch input" if m.mode != "grey-ir" else "grey branch input",
             "maps": rgb[i], "masks": rgb_mask[i], "mean_mask": rgb_mean_mask[i]},
            {"image": second_image, "cmap": second_cmap, "label": second_label,
             "maps": ir[i], "masks": ir_mask[i], "mean_mask": ir_mean_mask[i]},
        ], keep)
        name = _png_name(key)
        _replace_into(out / name, lambda fh, fig=fig: fig.savefig(fh, format="png"))
        pngs.append(f"{ATTENTION_DIR}/{name}")
    _replace_into(out / "attention.npz", lambda fh: np.savez_compressed(
        fh, keys=np.asarray(keys_out, dtype=str), rgb=rgb.astype(np.float32), ir=ir.astype(np.float32),
        rgb_mask=rgb_mask, ir_mask=ir_mask))
    record = AttentionResult(
        checkpoint=ckpt.name, checkpoint_sha256=ckpt.sha256, checkpoint_epoch=ckpt.epoch,
        where=where_used, keys=keys_out, pngs=pngs, npz=f"{ATTENTION_DIR}/attention.npz",
        grid_rgb=[int(v) for v in rgb.shape[-2:]], grid_ir=[int(v) for v in ir.shape[-2:]],
        heads={"rgb": int(rgb.shape[1]), "ir": int(ir.shape[1])}, threshold=keep, mode=m.mode,
        dataset=str(root),
        preprocessing="training.loader.EVAL_AUGMENT: whole frame, no flip, no jitter, no IR noise; BatchViews",
    )
    write_result(out / "attention.json", record)  # last: it names only files that are complete
    listed = {Path(p).name for p in pngs}
    for stale in out.glob("*.png"):  # figures of an earlier draw, no longer listed
        if stale.name not in listed:
            stale.unlink(missing_ok=True)
    log(f"{out}: attention maps of {len(keys_out)} sample(s), checkpoint {ckpt.name} "
        f"(RGB grid {rgb.shape[-2]}x{rgb.shape[-1]}, IR grid {ir.shape[-2]}x{ir.shape[-1]})")
    return result_json(record)
