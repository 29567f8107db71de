"""Attention maps: the CLS row of the last block's softmax, DINO's threshold mask, and `attention()` on a tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import analysis.attention as attention_module
import catalog
from analysis.attention import attention, cls_attention, threshold_mask
from analysis.config import AttentionConfig
from analysis.runs import AnalysisError, RunDir
from shards.reader import SelectionReader
from training.loader import BatchViews, RowBatches


# conftest's trained_run: depth-1 vit_tiny branches, 32 x 48 IR (patch 8) and 64 x 96 RGB (patch 16), so both
# grids are 4 x 6 (not square: a transposed grid would show).
@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """The session's tiny trained run (conftest), copied: these tests write under its analysis/."""
    target = tmp_path_factory.mktemp("attention") / "run"
    shutil.copytree(trained_run, target)
    return target


@pytest.fixture(scope="module")
def catalog_keys(built) -> list[str]:
    with catalog.open(built) as cat:
        return cat.select("TRUE").column("key").to_pylist()


def vit(reg_tokens: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(32, 48), patch_size=8,
                             in_chans=1, depth=2, reg_tokens=reg_tokens).eval()


def hand_attention(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of the last block, from its qkv weights and the input its attention gets."""
    block = backbone.blocks[-1]
    seen: list[torch.Tensor] = []
    handle = block.norm1.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        backbone.forward_features(images)
    handle.remove()
    x = seen[0].double()
    n, tokens, dim = x.shape
    heads = block.attn.num_heads
    qkv = x @ block.attn.qkv.weight.double().T + block.attn.qkv.bias.double()
    q, k, _ = qkv.reshape(n, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)


# -- cls_attention ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_cls_attention_is_the_hand_computed_cls_row_on_the_patch_grid(reg_tokens):
    backbone = vit(reg_tokens)
    attn = backbone.blocks[-1].attn
    assert attn.fused_attn, "timm's default is the fused path; the test must exercise switching it off"
    images = torch.randn(3, 1, 32, 48)
    maps = cls_attention(backbone, images)
    heads = attn.num_heads
    assert maps.shape == (3, heads, *backbone.patch_embed.grid_size) == (3, heads, 4, 6)
    reference = hand_attention(backbone, images)
    prefix = backbone.num_prefix_tokens
    assert prefix == 1 + reg_tokens
    torch.testing.assert_close(maps.double(), reference[:, :, 0, prefix:].reshape(3, heads, 4, 6), atol=1e-6, rtol=1e-5)
    # Not the silently empty capture of the fused path: the patches hold what the prefix tokens do not.
    patch_mass = maps.double().sum(dim=(-2, -1))
    assert (patch_mass > 0.1).all()
    torch.testing.assert_close(patch_mass + reference[:, :, 0, :prefix].sum(-1), torch.ones_like(patch_mass),
                               atol=1e-5, rtol=0)
    assert attn.fused_attn is True  # restored
    assert not attn.attn_drop._forward_pre_hooks  # hook removed


def test_cls_attention_restores_fused_attn_when_the_forward_fails():
    backbone = vit()
    with pytest.raises(RuntimeError):
        cls_attention(backbone, torch.randn(1, 3, 32, 48))  # 3 channels into a 1-channel patch embedding
    assert backbone.blocks[-1].attn.fused_attn is True
    assert not backbone.blocks[-1].attn.attn_drop._forward_pre_hooks


def test_cls_attention_refuses_a_vit_without_cls_token():
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(32, 48),
                                 patch_size=8, in_chans=1, depth=1, class_token=False, global_pool="avg")
    with pytest.raises(AnalysisError, match="no CLS token"):
        cls_attention(backbone, torch.randn(1, 1, 32, 48))


# -- threshold_mask --------------------------------------------------------------------------------------

def dino_mask(maps: torch.Tensor, keep: float) -> torch.Tensor:
    """facebookresearch/dino visualize_attention.py, per head on a flattened map."""
    val, idx = torch.sort(maps)
    val = val / torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - keep)
    idx2 = torch.argsort(idx)
    return torch.stack([th_attn[h][idx2[h]] for h in range(maps.shape[0])])


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_threshold_mask_keeps_the_smallest_set_holding_the_share(keep):
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(24, 0.5), size=(2, 3)).reshape(2, 3, 4, 6)
    mask = threshold_mask(maps, keep)
    assert mask.shape == maps.shape and mask.dtype == bool
    for m, k in zip(maps.reshape(-1, 24), mask.reshape(-1, 24)):
        share = m / m.sum()
        assert share[k].sum() >= keep - 1e-12
        assert share[k].min() >= share[~k].max()  # the largest patches
        assert share[k].sum() - share[k].min() < keep  # minimal: without its smallest patch it holds too little
    expected = dino_mask(torch.from_numpy(maps.reshape(6, 24)), keep).reshape(2, 3, 4, 6).numpy()
    np.testing.assert_array_equal(mask, expected)


def test_threshold_mask_takes_torch_and_checks_keep():
    maps = torch.rand(3, 4, 6)
    mask = threshold_mask(maps, 1.0)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.all()
    with pytest.raises(ValueError, match="threshold"):
        threshold_mask(maps, 0.0)


# -- attention() -----------------------------------------------------------------------------------------

def test_attention_writes_figures_arrays_and_json(run):
    result = attention(run, "last", where="TRUE", config=AttentionConfig(count=2), device="cpu", log=lambda m: None)
    out = RunDir.open(run).results("last") / "attention"
    assert json.loads((out / "attention.json").read_text()) == json.loads(json.dumps(result))
    assert result["checkpoint"] == "last" and len(result["keys"]) == 2
    assert result["grid_rgb"] == [4, 6] and result["grid_ir"] == [4, 6]
    assert result["heads"] == {"rgb": 3, "ir": 3}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [Path(p).name for p in result["pngs"]] + ["attention.json", "attention.npz"])  # no .tmp left
    for key, png in zip(result["keys"], result["pngs"]):
        assert png == f"attention/{key}.png"
        with Image.open(out.parent / png) as image:
            assert image.format == "PNG" and image.width > image.height > 100
    with np.load(out / "attention.npz") as npz:
        assert list(npz["keys"]) == result["keys"]
        assert npz["rgb"].shape == npz["ir"].shape == (2, 3, 4, 6)
        assert np.isfinite(npz["rgb"]).all() and (npz["rgb"].sum(axis=(2, 3)) > 0.1).all()
        assert npz["rgb_mask"].shape == (2, 3, 4, 6) and npz["rgb_mask"].any()
    # The same draw again: a seeded order, so the same samples.
    again = attention(run, "last", where="TRUE", config=AttentionConfig(count=2), device="cpu", log=lambda m: None)
    assert again["keys"] == result["keys"]


def test_attention_sees_exactly_the_evaluation_view(run, catalog_keys, monkeypatch):
    """What the backbones get is what `analysis embed` feeds them: RowBatches (EVAL_AUGMENT) through BatchViews."""
    keys = [catalog_keys[5], catalog_keys[1]]
    fed: list[torch.Tensor] = []

    def recording(backbone, images):
        fed.append(images.clone())
        return cls_attention(backbone, images)

    monkeypatch.setattr(attention_module, "cls_attention", recording)
    result = attention(run, "last", keys=keys, device="cpu", log=lambda m: None)
    assert result["keys"] == keys  # in the order asked for, not catalog order

    r = RunDir.open(run)
    model, config, _ = r.load_model(r.checkpoint("last"))
    with catalog.open(config.data.dataset) as cat:
        selection = cat.select("TRUE")
    index = {k: i for i, k in enumerate(selection.column("key").to_pylist())}
    rows = np.asarray([index[k] for k in keys])
    d, m = config.data, config.model
    batch = next(iter(RowBatches(SelectionReader(selection, Path(d.dataset)), [(0, rows)], d, m.mode, d.ir_mean)))
    first, second = BatchViews(d, m.mode, m.rgb_patch, m.ir_patch, d.ir_mean, d.ir_std, torch.device("cpu"))(batch)
    torch.testing.assert_close(fed[0], first, atol=0, rtol=0)
    torch.testing.assert_close(fed[1], second, atol=0, rtol=0)
    with np.load(r.results("last") / "attention" / "attention.npz") as npz:
        np.testing.assert_allclose(npz["rgb"], cls_attention(model.rgb_backbone, first).numpy(), atol=1e-6)


def test_unknown_keys_are_one_error_naming_them(run, catalog_keys):
    with pytest.raises(AnalysisError, match="NOPE_1") as info:
        attention(run, "last", keys=[catalog_keys[0], "NOPE_1"], device="cpu", log=lambda m: None)
    assert catalog_keys[0] not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AnalysisError, match="NOPE_1, NO'PE_2"):
        attention(run, "last", keys=["NOPE_1", "NO'PE_2"], device="cpu", log=lambda m: None)


def test_a_selection_of_nothing_is_one_line(run):
    with pytest.raises(AnalysisError, match="selects no samples") as info:
        attention(run, "last", where="vsn = 'NOBODY'", device="cpu", log=lambda m: None)
    assert "\n" not in str(info.value)
    with pytest.raises(AnalysisError, match="attention.threshold"):
        attention(run, "last", config=AttentionConfig(threshold=1.5), device="cpu", log=lambda m: None)


def test_random_checkpoint_and_a_smaller_redraw_drops_stale_figures(run, catalog_keys):
    first = attention(run, "random", keys=catalog_keys[:2], device="cpu", log=lambda m: None)
    second = attention(run, "random", keys=catalog_keys[2:3], device="cpu", log=lambda m: None)
    out = RunDir.open(run).results("random") / "attention"
    assert first["checkpoint"] == "random" and second["keys"] == catalog_keys[2:3]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{catalog_keys[2]}.png"]
