"""Training: loss, ranks, data order, resume, signals, bad input — on tiny ViTs over the synthetic dataset."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import catalog
from shards.layout import ir_celsius
from shards.reader import SelectionReader, read_selection
from training.config import (
    DataConfig,
    OptimConfig,
    TrainingConfig,
    default_config_toml,
    load_training_config,
    parse_set,
)
from training.dino import frame_reference_c, ir3_band_index, ir3_relative
from training.loader import BatchViews, PairBatches, StepPlan, make_loader
from training.model import vicreg_loss
from training.optim import LARS, build_optimizer, lr_schedule
from training.train import TrainingError, preflight
from training.transforms import (
    crop_ir,
    decode_rgb_crop,
    draw_augment,
    ir_bands,
    luma,
    random_resized_box,
    sample_rng,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"

TINY = """
[data]
dataset = "{dataset}"
ir_size = [32, 48]
workers = 1
[model]
rgb_arch = "vit_tiny_patch16_224"
ir_arch = "vit_tiny_patch16_224"
depth = 1
expander = [64, 64]
[optim]
warmup_epochs = 1
[train]
epochs = 3
batch_size = 8
log_every = 1
precision = "fp32"
[run]
dir = "{run}"
record_keys = true
"""


@pytest.fixture()
def tiny_config(built, tmp_path) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(TINY.format(dataset=built, run=tmp_path / "run"))
    return path


def run_cli(config: Path, *sets: str, ranks: int = 1, extra: tuple[str, ...] = (), timeout: float = 300):
    argv = [sys.executable, "-m", "training", "run", "--config", str(config), "--quiet", *extra]
    for item in sets:
        argv += ["--set", item]
    if ranks > 1:
        argv = [str(MPIEXEC), "-n", str(ranks), *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def keys_by_step(run: Path) -> dict[int, list[str]]:
    rows = [json.loads(line) for line in (run / "keys.jsonl").read_text().splitlines()]
    return {row["step"]: row["keys"] for row in rows}


# -- config ------------------------------------------------------------------------------------------------

def test_init_config_is_complete_commented_and_loads_to_the_defaults(tmp_path):
    text = default_config_toml()
    path = tmp_path / "t.toml"
    path.write_text(text)
    assert load_training_config(str(path)) == TrainingConfig()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), f"key without a comment: {line}"
    for key in ("dataset", "where", "ir_size", "workers", "decode", "mode", "rgb_arch", "ir_arch", "rgb_patch",
                "ir_patch", "epochs", "batch_size", "seed", "checkpoint_every", "log_every", "dir"):
        assert any(line.startswith(f"{key} =") or line.startswith(f"# {key} =") for line in lines), key


def test_set_values_are_toml_and_bare_words_are_strings():
    assert parse_set("data.ir_size=[64, 80]") == (["data", "ir_size"], [64, 80])
    assert parse_set("optim.base_lr=0.3") == (["optim", "base_lr"], 0.3)
    assert parse_set("model.mode=rgb-grey") == (["model", "mode"], "rgb-grey")
    assert parse_set("data.where=split = 'val'") == (["data", "where"], "split = 'val'")
    config = load_training_config(None, ["train.epochs=20", "optim.warmup_epochs=2", "model.mode=ir3"])
    assert (config.train.epochs, config.optim.warmup_epochs, config.model.mode) == (20, 2.0, "ir3")


def test_warmup_as_long_as_the_run_is_refused():
    # The 2023 code's 10-epoch warm-up in a 10-epoch run never reached the cosine.
    with pytest.raises(ValueError, match="never decays"):
        load_training_config(None, ["train.epochs=10", "optim.warmup_epochs=10"])


# -- loss and optimiser ------------------------------------------------------------------------------------

def upstream_off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def upstream_vicreg(x, y, batch_size, num_features, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """facebookresearch/vicreg main_vicreg.py VICReg.forward after the projector, single process (verbatim)."""
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = upstream_off_diagonal(cov_x).pow_(2).sum().div(num_features) + upstream_off_diagonal(
        cov_y).pow_(2).sum().div(num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def test_vicreg_loss_equals_the_upstream_formula():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 32, generator=generator), torch.randn(16, 32, generator=generator) * 0.5
    loss, terms = vicreg_loss(x, y)
    assert torch.allclose(loss, upstream_vicreg(x, y, 16, 32), rtol=1e-6)
    assert torch.allclose(loss, 25 * terms["sim"] + 25 * terms["std"] + terms["cov"], rtol=1e-6)
    # Collapsed embeddings pay the full variance hinge.
    flat, _ = vicreg_loss(torch.zeros(8, 4), torch.zeros(8, 4))
    assert flat.item() == pytest.approx(25 * (1 - math.sqrt(1e-4)), rel=1e-5)


@pytest.mark.mpi
def test_two_gloo_ranks_give_the_single_process_loss_and_gradients(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import mpi_vicreg_grads as check

    out = tmp_path / "grads.pt"
    result = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(ROOT / "tests" / "mpi_vicreg_grads.py"),
                             str(out)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert two["world_size"] == 2

    net = check.model()
    first, second = check.inputs()
    z_a, z_b, _, _ = net(first, second)
    loss, _ = vicreg_loss(z_a, z_b)
    loss.backward()
    assert two["loss"] == pytest.approx(loss.item(), rel=1e-5)
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    assert set(grads) == set(two["grads"])
    total = torch.cat([g.flatten() for g in grads.values()]).norm()
    for name, grad in grads.items():
        # float32 sums in another order differ by ~1e-6 of the gradient, a missing reduction by ~1. Some gradients
        # are zero up to rounding (a bias the expander's BatchNorm cancels), hence the floor from the total norm.
        error = (two["grads"][name] - grad).norm()
        assert error <= 1e-4 * grad.norm() + 1e-6 * total, f"{name}: gradient error {error:.2e} of {grad.norm():.2e}"


def upstream_lars_step(params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001, state=None):
    """facebookresearch/vicreg LARS.step for one group, per parameter (1-D parameters excluded)."""
    for p in params:
        dp = p.grad
        if p.ndim != 1:
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, (eta * param_norm / update_norm), one), one)
            dp = dp.mul(q)
        mu = state.setdefault(p, torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def test_lars_matches_upstream_and_skips_biases_and_norms():
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    theirs.load_state_dict(ours.state_dict())
    optimizer = build_optimizer(ours, OptimConfig(name="lars", weight_decay=1e-6))
    assert isinstance(optimizer, LARS)
    state: dict = {}
    x = torch.randn(4, 6)
    for lr in (0.1, 0.2, 0.05):
        for net in (ours, theirs):
            net.zero_grad()
            net(x).pow(2).sum().backward()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        with torch.no_grad():
            upstream_lars_step(list(theirs.parameters()), lr, state=state)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    optim = OptimConfig(base_lr=0.2, warmup_epochs=2, final_lr_ratio=0.001)
    lrs = lr_schedule(optim, global_batch=512, steps_per_epoch=10, epochs=10)
    peak = 0.2 * 512 / 256
    assert len(lrs) == 100 and lrs[0] == pytest.approx(peak / 20)
    assert np.all(np.diff(lrs[:20]) > 0) and lrs[19] == pytest.approx(peak)
    assert np.all(np.diff(lrs[20:]) < 0) and lrs[-1] == pytest.approx(peak * 0.001)


# -- data order and augmentation ---------------------------------------------------------------------------

def test_every_rank_gets_the_same_number_of_batches_on_an_uneven_selection():
    for n, world in ((50, 3), (49, 2), (17, 4)):
        plan = StepPlan(n_samples=n, batch_size=4, world_size=world, seed=3, epochs=2)
        for step in range(plan.total_steps):
            parts = [plan.rows(step, rank) for rank in range(world)]
            assert all(len(p) == 4 for p in parts)
            together = np.concatenate(parts)
            assert len(set(together.tolist())) == len(together)  # no sample twice within a step
            assert np.array_equal(together, plan.global_rows(step))
        # Each epoch uses each sample at most once, and drops fewer than one global batch.
        epoch0 = np.concatenate([plan.global_rows(s) for s in range(plan.steps_per_epoch)])
        assert len(set(epoch0.tolist())) == len(epoch0) and n - len(epoch0) < plan.global_batch


def test_a_global_step_sees_the_same_samples_whatever_the_number_of_ranks():
    one = StepPlan(n_samples=40, batch_size=8, world_size=1, seed=7, epochs=3)
    two = StepPlan(n_samples=40, batch_size=4, world_size=2, seed=7, epochs=3)
    for step in range(one.total_steps):
        assert np.array_equal(one.rows(step, 0), np.concatenate([two.rows(step, 0), two.rows(step, 1)]))
    assert not np.array_equal(one.global_rows(0), one.global_rows(one.steps_per_epoch))  # epochs differ


def _batches(built, workers: int, decode: str = "cpu", mode: str = "rgb-ir", steps: int = 4, **data_fields):
    table = catalog.open(built).select("TRUE")
    data = DataConfig(dataset=str(built), ir_size=(32, 48), workers=workers, decode=decode, **data_fields)
    plan = StepPlan(table.num_rows, 4, 1, seed=5, epochs=2)
    batches = PairBatches(SelectionReader(table, built), plan, 0, data, mode, 1, 1 + steps, ir_fill_c=5.0)
    return list(make_loader(batches, workers, 2, pin_memory=False)), data


def test_batches_do_not_depend_on_the_number_of_workers(built):
    serial, _ = _batches(built, workers=0)
    parallel, _ = _batches(built, workers=2)
    assert [b["step"] for b in parallel] == [1, 2, 3, 4]
    for a, b in zip(serial, parallel):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["ir"], b["ir"])
        assert torch.equal(a["rgb_jitter"], b["rgb_jitter"])
    assert serial[0]["rgb"].dtype == torch.uint8 and serial[0]["rgb"].shape == (4, 64, 96, 3)
    assert serial[0]["ir"].shape == (4, 32, 48) and torch.isfinite(serial[0]["ir"]).all()


LOADER_THEN_ERROR = """
import sys
import catalog, torch
from shards.reader import SelectionReader
from training.config import DataConfig
from training.loader import DevicePrefetcher, PairBatches, StepPlan, make_loader
dataset = sys.argv[1]
table = catalog.open(dataset).select("TRUE")
data = DataConfig(dataset=dataset, ir_size=(32, 48), workers=2)
batches = PairBatches(SelectionReader(table, dataset), StepPlan(table.num_rows, 4, 1, seed=5, epochs=50), 0, data,
                      "rgb-ir", 0, 100, ir_fill_c=5.0)
prefetch = DevicePrefetcher(make_loader(batches, 2, 2, pin_memory=False), lambda b: (b["rgb"], b["ir"]),
                        torch.device("cpu"))
try:
    next(prefetch)
    raise RuntimeError("a read failed mid-run")
finally:
    prefetch.close()
"""


def test_an_error_with_loader_workers_alive_still_exits(built):
    # Workers ignore SIGTERM (so a batch system's signal does not kill them mid-batch); multiprocessing's exit
    # handler would then wait for them for ever unless closing the prefetcher stops them.
    out = subprocess.run([sys.executable, "-c", LOADER_THEN_ERROR, str(built)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 1 and "a read failed mid-run" in out.stderr, out.stderr[-2000:]


def test_gpu_decode_path_matches_the_cpu_path(built):
    # data.decode = "gpu" runs torchvision's decode_jpeg + roi_align; on a CPU-only machine it runs on the CPU.
    cpu, data = _batches(built, workers=0, steps=1)
    gpu, _ = _batches(built, workers=0, decode="gpu", steps=1)
    assert "jpeg" in gpu[0] and "rgb" not in gpu[0]
    views = BatchViews(data, "rgb-ir", 16, 8, 5.0, 10.0, torch.device("cpu"))
    rgb_cpu, rgb_gpu = views.rgb(cpu[0]), views.rgb(gpu[0])
    assert rgb_cpu.shape == rgb_gpu.shape == (4, 3, 64, 96)
    assert (rgb_cpu - rgb_gpu).abs().mean() < 0.03  # two resamplers of the same crop
    assert torch.equal(cpu[0]["ir"], gpu[0]["ir"])


def test_random_resized_box_stays_inside_and_covers_the_asked_area():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        x0, y0, x1, y1 = random_resized_box(rng, (0.35, 1.0), (0.75, 1.3333))
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        areas.append((x1 - x0) * (y1 - y0))
    assert 0.34 <= min(areas) and max(areas) <= 1.0


def test_augmentation_is_a_function_of_seed_epoch_and_key():
    data = DataConfig()
    a = draw_augment(sample_rng(0, 1, "W056_1"), data)
    assert a == draw_augment(sample_rng(0, 1, "W056_1"), data)
    assert a != draw_augment(sample_rng(0, 2, "W056_1"), data)
    assert a != draw_augment(sample_rng(0, 1, "W056_2"), data)


def test_rgb_and_ir_are_cropped_and_flipped_together():
    # A scene whose left third is bright and hot: after any crop and flip both views must agree on the side.
    rgb = np.zeros((504, 672, 3), dtype=np.uint8)
    rgb[:, :224] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    celsius = np.full((252, 336), -40.0, dtype=np.float32)
    celsius[:, :112] = 30.0
    box = (0.1, 0.2, 0.6, 0.9)
    for flip in (False, True):
        out_rgb = decode_rgb_crop(buffer.getvalue(), box, (60, 80), flip).mean(axis=(0, 2))
        out_ir = crop_ir(celsius, box, (30, 40), flip, fill_c=0.0).mean(axis=0)
        bright_left = out_rgb[:20].mean() > out_rgb[-20:].mean()
        hot_left = out_ir[:10].mean() > out_ir[-10:].mean()
        assert bright_left == hot_left == (not flip)


def test_draft_decode_equals_a_full_decode_crop_and_resize():
    rng = np.random.default_rng(1)
    coarse = Image.fromarray(rng.integers(0, 255, (21, 28, 3)).astype(np.uint8))
    buffer = io.BytesIO()
    coarse.resize((672, 504), Image.BICUBIC).save(buffer, format="JPEG", quality=95)
    box = (0.0, 0.0, 1.0, 1.0)  # whole image to 240x320: a 1/2-scale DCT decode is enough
    fast = decode_rgb_crop(buffer.getvalue(), box, (240, 320), False).astype(float)
    full = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((320, 240), Image.BILINEAR))
    assert np.abs(fast - full).mean() < 2


def test_crop_ir_keeps_degrees_and_fills_nan_with_the_mean():
    celsius = np.full((252, 336), 12.5, dtype=np.float32)
    celsius[10, 10] = np.nan
    out = crop_ir(celsius, (0, 0, 1, 1), (120, 160), False, fill_c=12.5)
    assert np.isfinite(out).all() and np.allclose(out, 12.5)


def test_greyscale_control_comes_from_the_rgb_image_never_the_thermal_one(built):
    batches, data = _batches(built, workers=0, mode="rgb-grey", steps=1)
    batch = dict(batches[0])
    views = BatchViews(data, "rgb-grey", 16, 8, 5.0, 10.0, torch.device("cpu"))
    first, second = views(batch)
    batch["ir"] = torch.randn_like(batch["ir"]) * 100  # thermal junk must change nothing
    _, second_again = views(batch)
    assert torch.equal(second, second_again) and second.shape == (4, 1, 32, 48)
    # It is the luma of the RGB crop, resized to the IR grid.
    grey = luma(views.rgb(batch))
    small = F.interpolate(grey, size=(32, 48), mode="bilinear", antialias=True)
    assert torch.corrcoef(torch.stack([small.flatten(), second.flatten()]))[0, 1] > 0.95
    # And grey-ir's first view is the luma of RGB at the RGB size, one channel.
    views = BatchViews(data, "grey-ir", 16, 8, 5.0, 10.0, torch.device("cpu"))
    first, second = views(batch)
    assert first.shape == (4, 1, 64, 96) and second.shape == (4, 1, 32, 48)


def test_ir3_bands_and_patch_fitting(built):
    batches, _ = _batches(built, workers=0, mode="ir3", steps=1)
    data = DataConfig(dataset=str(built), ir_size=(32, 48), fit="pad")
    views = BatchViews(data, "ir3", 16, 10, 5.0, 10.0, torch.device("cpu"))
    first, second = views(batches[0])
    assert second.shape == (4, 3, 40, 50)  # padded up to a multiple of the patch
    celsius = batches[0]["ir"]
    lower, upper = data.ir3_bounds
    top, left = (40 - 32) // 2, (50 - 48) // 2  # centred, zeros around
    assert torch.allclose(second[:, 0, top : top + 32, left : left + 48] * 10 + 5, celsius.clamp(max=lower), atol=1e-4)
    assert torch.all(second[:, :, :top] == 0)


def test_ir3_fixed_is_the_fixed_bands_bit_for_bit_and_carries_no_reference(built):
    (batch,), data = _batches(built, workers=0, mode="ir3", steps=1)
    assert data.ir3_reference == "fixed"
    assert set(batch) == {"keys", "ir", "rgb", "rgb_jitter", "grey_jitter", "step", "epoch"}
    _, second = BatchViews(data, "ir3", 16, 8, 5.0, 10.0, torch.device("cpu"))(batch)
    assert torch.equal(second, ir_bands(batch["ir"], data.ir3_bounds, 5.0, 10.0))


def test_ir3_relative_to_the_frame_takes_each_whole_frame_reference(built):
    (fixed,), _ = _batches(built, workers=0, mode="ir3", steps=1)
    (batch,), data = _batches(built, workers=0, mode="ir3", steps=1, ir3_reference="frame", ir3_offsets_c=(-30.0, -5.0))
    table = catalog.open(built).select("TRUE")
    samples = {s["__key__"]: s for s in SelectionReader(table, built).iter_rows(np.arange(table.num_rows))}
    # The reference is the whole frame's (before crop and jitter): the crops themselves are those of 'fixed'.
    expected = [frame_reference_c(ir_celsius(samples[key]), fallback_c=5.0) for key in batch["keys"]]
    assert batch["ir_reference_c"].dtype == torch.float32 and batch["ir_reference_c"].shape == (4,)
    assert batch["ir_reference_c"].tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(batch["ir"], fixed["ir"])
    views = BatchViews(data, "ir3", 16, 8, 5.0, 10.0, torch.device("cpu"))
    _, second = views(batch)
    assert torch.equal(second, ir3_relative(batch["ir"], batch["ir_reference_c"], (-30.0, -5.0)))
    # Each pixel's value lies in its own band's channel: below ref - 30 in the first, above ref - 5 in the last.
    band = ir3_band_index(batch["ir"], batch["ir_reference_c"], (-30.0, -5.0))
    assert set(band.unique().tolist()) == {0, 1, 2}
    assert torch.all((second[:, 0] < -1) == (band == 0)) and torch.all((second[:, 2] > 1) == (band == 2))
    batch["ir"][0, :5] = float("nan")  # a hole the fill missed still gives finite inputs
    assert torch.isfinite(views(batch)[1]).all()
    with pytest.raises(ValueError, match="ir_reference_c"):
        views({k: v for k, v in batch.items() if k != "ir_reference_c"})


@pytest.mark.parametrize(("field", "value"), [("ir3_reference", "air"), ("ir3_offsets_c", (-2.0, -45.0))])
def test_bad_ir3_reference_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_read_selection_composes_like_webdataset(built):
    table = catalog.open(built).select("is_sky")
    pipeline = read_selection(table).decode("rgb8").to_tuple("__key__", "rgb.jpg", "ir.npy.gz;ir.npy").batched(3)
    first = next(iter(pipeline))
    keys, rgb, ir = first
    assert len(keys) == 3 and rgb.shape[0] == 3 and ir.shape[0] == 3
    mapped = read_selection(table).map(lambda s: s["__key__"])
    assert list(mapped) == table.column("key").to_pylist()


# -- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["data.dataset=/does/not/exist"], "data.dataset: /does/not/exist does not exist"),
        (["data.where=no_such_column > 1"], "is not valid SQL over `samples`"),
        (["data.where=vsn = 'NOPE'"], "selects no samples"),
        (["model.ir_arch=vit_does_not_exist"], "model.ir_arch = 'vit_does_not_exist' is not a timm model name"),
        (["data.ir_size=[30, 40]"], "patch 16 does not tile the RGB input 60x80"),
        (["train.batch_size=4000"], "fewer than one global batch of 4000"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tiny_config, sets, expected):
    config = load_training_config(str(tiny_config), sets)
    with pytest.raises(TrainingError) as error:
        preflight(config, world_size=1)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not Path(config.run.dir).exists()


@pytest.mark.mpi
def test_bad_input_from_the_cli_under_two_ranks_prints_one_line(tiny_config):
    result = run_cli(tiny_config, "data.where=no_such_column > 1", ranks=2)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("training run: data.where"), result.stderr


# -- runs from the command line ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.mpi
def test_one_rank_batch_8_equals_two_ranks_batch_4(tiny_config, tmp_path):
    one = run_cli(tiny_config, f"run.dir={tmp_path / 'one'}", "train.max_steps=2")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(tiny_config, f"run.dir={tmp_path / 'two'}", "train.batch_size=4", "train.max_steps=2", ranks=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert a[0]["step"] == b[0]["step"] == 0
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-4)
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=1e-4)  # after one optimiser step too
    assert keys_by_step(tmp_path / "one") == keys_by_step(tmp_path / "two")
    config = (tmp_path / "two" / "config.toml").read_text()
    assert "world_size = 2" in config and "git_sha" in config and "ir_mean" in config
    state = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2
    assert any(k.startswith("rgb_backbone.") for k in state["model"]) and any(k.startswith("ir_expander.") for k in state["model"])


@pytest.mark.slow
def test_sigterm_saves_and_a_rerun_resumes_with_the_uninterrupted_order(tiny_config, tmp_path):
    straight = run_cli(tiny_config, f"run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "straight" / "checkpoints" / "epoch_0003.pt").exists()

    run = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "training", "run", "--config", str(tiny_config), "--quiet", "--set", f"run.dir={run}"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _wait_for_rows(run, 3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < saved["step"] < 18
    assert "SIGTERM at step" in stderr, stdout + stderr

    resumed = run_cli(tiny_config, f"run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert keys_by_step(run) == keys_by_step(tmp_path / "straight")
    losses = {r["step"]: r["loss"] for r in metrics(run)}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in metrics(tmp_path / "straight")}, rel=1e-5)


@pytest.mark.slow
def test_a_changed_schedule_is_refused_unless_asked_for(tiny_config, tmp_path):
    run = tmp_path / "run"
    first = run_cli(tiny_config, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    refused = run_cli(tiny_config, "train.epochs=5", "optim.base_lr=0.3")
    assert refused.returncode == 2
    assert "epochs 3 -> 5" in refused.stderr and "base_lr 0.2 -> 0.3" in refused.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    accepted = run_cli(tiny_config, "train.epochs=5", "optim.base_lr=0.3", "train.max_steps=3", extra=("--new-schedule",))
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["schedule"]["epochs"] == 5
    # A different model cannot continue these weights at all.
    other = run_cli(tiny_config, "model.expander=[32, 32]", extra=("--new-schedule",))
    assert other.returncode == 2 and "different model" in other.stderr


@pytest.mark.slow
def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    run = tmp_path / "run"
    assert run_cli(tiny_config, "train.max_steps=1").returncode == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    # An absurd IR scale overflows float32 inside the IR branch.
    # A save is due after every step, so only the guard keeps the bad step's weights out of last.pt.
    result = run_cli(tiny_config, "data.ir_std=1e-38", "train.checkpoint_minutes=1e-9", extra=("--new-schedule",))
    assert result.returncode == 3
    assert "not finite" in result.stderr and "last good checkpoint" in result.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
@pytest.mark.mpi
def test_a_dead_rank_ends_the_run_instead_of_hanging(tiny_config, tmp_path):
    run = tmp_path / "run"
    # -disable-auto-cleanup: Hydra must not kill the survivor for us; it has to notice and end by itself.
    argv = [str(MPIEXEC), "-disable-auto-cleanup", "-n", "2", sys.executable, "-m", "training", "run", "--config",
            str(tiny_config), "--quiet", "--set", f"run.dir={run}", "--set", "train.epochs=200", "--set",
            "train.batch_size=4", "--set", "train.timeout_s=30"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _wait_for_rows(run, 2)
    killed_at = time.monotonic()
    victim = max(_rank_pids(run))
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode != 0
    assert time.monotonic() - killed_at < 15
    # The survivor names the dead rank, unless Hydra ended it first (then Hydra's line says a rank was killed).
    ours = [line for line in stderr.splitlines() if line.startswith("training run:")]
    if ours:
        assert re.fullmatch(rf"training run: rank \d \(pid {victim}\) of 2 died .*ends every rank", ours[-1]), ours
    else:
        assert "Killed (signal 9)" in stdout + stderr, stdout[-2000:] + stderr[-3000:]


def _rank_pids(run: Path) -> list[int]:
    """The training processes of the ranks (not mpiexec, not their DataLoader workers)."""
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"run.dir={run}"], capture_output=True,
                                           text=True).stdout.split()]
    ranks = [p for p in pids if not _parent_name(p).startswith("python")
             and "python" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode()]
    assert len(ranks) == 2, pids
    return ranks


def _wait_for_rows(run: Path, rows: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {rows} metrics rows after {timeout} s")


@pytest.mark.slow
@pytest.mark.mpi
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tiny_config, tmp_path):
    run = tmp_path / "run"
    argv = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "training", "run", "--config", str(tiny_config), "--quiet",
            "--set", f"run.dir={run}", "--set", "train.epochs=200", "--set", "train.batch_size=4"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _wait_for_rows(run, 3)
    os.kill(max(_rank_pids(run)), signal.SIGTERM)  # rank 1 only: the flag is reduced over the ranks
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert f"SIGTERM at step {state['step']} " in stderr
    assert state["step"] > 0 and state["step"] == max(r["step"] for r in metrics(run)) + 1


@pytest.mark.slow
@pytest.mark.mpi
def test_disagreeing_clocks_and_a_sigterm_on_one_rank_stop_both_at_the_same_step(tiny_config, tmp_path):
    """Rank 0's clock says a save is due at step 2 and rank 0 alone gets a SIGTERM there: both ranks stop together."""
    run = tmp_path / "run"
    argv = [str(MPIEXEC), "-n", "2", sys.executable, str(ROOT / "tests" / "mpi_clock_sigterm.py"), str(tiny_config),
            "2", "--set", f"run.dir={run}", "--set", "train.epochs=200", "--set", "train.batch_size=4"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=150, cwd=ROOT)
    # Hydra forwards each rank's output in chunks, not lines: find the reports anywhere in it.
    reports = dict(re.findall(r"rank (\d): (exit \d+ at step \d+)", result.stdout))
    assert set(reports) == {"0", "1"}, result.stdout + result.stderr[-3000:]
    assert reports["0"] == reports["1"], reports
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    code, stopped = map(int, re.findall(r"\d+", reports["0"]))
    assert code == 128 + signal.SIGTERM and stopped > 2
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == stopped
    seconds = float(re.search(r"rank 0: .* after ([\d.]+) s", result.stdout).group(1))
    assert seconds < 30, result.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_resume_on_another_number_of_ranks_continues_the_same_run(tiny_config, tmp_path):
    straight = run_cli(tiny_config, f"run.dir={tmp_path / 'straight'}", "train.max_steps=4")
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = tmp_path / "elastic"
    first = run_cli(tiny_config, f"run.dir={run}", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(tiny_config, f"run.dir={run}", "train.max_steps=4", "train.batch_size=4", ranks=2)
    assert second.returncode == 0, second.stderr[-2000:]
    assert keys_by_step(run) == keys_by_step(tmp_path / "straight")
    losses = {r["step"]: r["loss"] for r in metrics(run)}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in metrics(tmp_path / "straight")}, rel=1e-4)


def _parent_name(pid: int) -> str:
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return Path(f"/proc/{ppid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return ""


def test_device_prefetcher_keeps_order_passes_errors_and_closes_while_blocked():
    from training.loader import DevicePrefetcher

    def prepare(batch):
        return (torch.full((2,), float(batch["i"])),)

    threaded = DevicePrefetcher(({"i": i} for i in range(20)), prepare, torch.device("cpu"), threaded=True)
    assert [(b["i"], int(t[0])) for b, (t,) in threaded] == [(i, i) for i in range(20)]

    def broken():
        yield {"i": 0}
        raise OSError("shard gone")

    failing = DevicePrefetcher(broken(), prepare, torch.device("cpu"), threaded=True)
    next(failing)
    with pytest.raises(OSError, match="shard gone"):
        next(failing)
    endless = DevicePrefetcher(({"i": i} for i in range(10**9)), prepare, torch.device("cpu"), depth=1, threaded=True)
    next(endless)
    started = time.monotonic()
    endless.close()  # its thread is blocked on the full queue
    assert not endless.thread.is_alive() and time.monotonic() - started < 5
