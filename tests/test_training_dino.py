"""`training run` with model.objective = 'dino' (issue 19): the CLI run, ranks, resume, teacher, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import catalog
from analysis.runs import RunDir
from shards.layout import ir_celsius
from shards.reader import SelectionReader
from training import transforms
from training.config import load_training_config
from training.dino import cosine_schedule, draw_multicrop, frame_reference_c, ir3_relative
from training.dino_step import DINOSchedules, active_directions, build_dino_optimizer, dino_step
from training.loader import BatchViews, MultiCropPlan, PairBatches, StepPlan, make_loader
from training.model import initial_model, view_channels
from training.transforms import crop_ir, decode_rgb_crop, draw_photometric, sample_rng

from tests.test_analysis import analysis_cli, small_chunk_config
from tests.test_training import ROOT, TINY, _wait_for_rows, keys_by_step, metrics, run_cli

DINO_TINY = TINY.replace("[model]\n", '[model]\nobjective = "dino"\n') + """
[dino]
out_dim = 128
hidden_dim = 64
bottleneck_dim = 32
local_crops_number = 2
"""
DINO = "model.objective=dino"


@pytest.fixture()
def dino_config(built, tmp_path) -> Path:
    path = tmp_path / "dino.toml"
    path.write_text(DINO_TINY.format(dataset=built, run=tmp_path / "run"))
    return path


@pytest.mark.slow
def test_a_dino_run_from_the_cli_logs_metrics_and_writes_weights_only_checkpoints(dino_config, tmp_path):
    result = run_cli(dino_config, "train.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("loss", "loss_rgb>ir", "loss_ir>rgb", "teacher_entropy_rgb>ir", "kl_ir>rgb", "center_norm_rgb>ir",
                "teacher_temp", "momentum", "weight_decay", "lr", "rgb_student_embedding_std",
                "ir_teacher_embedding_std"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["loss"] == pytest.approx((rows[0]["loss_rgb>ir"] + rows[0]["loss_ir>rgb"]) / 2, rel=1e-6)
    assert rows[0]["kl_rgb>ir"] == pytest.approx(rows[0]["loss_rgb>ir"] - rows[0]["teacher_entropy_rgb>ir"], rel=1e-6)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "sagepairs-dino-1" and state["step"] == 3
    assert state["model_spec"]["objective"] == "dino"
    assert {"losses.rgb>ir.center", "losses.ir>rgb.center"} <= set(state["model"])
    assert any(k.startswith("teachers.ir.backbone.") for k in state["model"])
    # Schedules are upstream's formulas, indexed by the global step (3 epochs x steps_per_epoch).
    steps = state["schedule"]["n_samples"] // state["schedule"]["global_batch"]
    momentum = cosine_schedule(0.996, 1, 3, steps)
    assert [r["momentum"] for r in rows] == pytest.approx(momentum[:3].tolist(), rel=1e-12)
    lr = cosine_schedule(5e-4 * 8 / 256, 1e-6, 3, steps, warmup_epochs=1)
    assert [r["lr"] for r in rows] == pytest.approx(lr[:3].tolist(), rel=1e-12)


# -- teacher, EMA and the last layer, in process ----------------------------------------------------------------

def _tiny_model(*sets: str):
    config = load_training_config(None, [DINO, "model.rgb_arch=vit_tiny_patch16_224", "model.ir_arch=vit_tiny_patch16_224",
                                         "model.depth=1", "data.ir_size=[32, 48]", "dino.out_dim=64",
                                         "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops_number=2",
                                         "train.epochs=3", "optim.warmup_epochs=1", *sets])
    model = initial_model(config)
    return config, model, build_dino_optimizer(model, config.optim), DINOSchedules.of(config, 8, 4)


def _crops(batch: int = 4) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {"rgb": [torch.randn(2 * batch, 3, 64, 96, generator=generator),
                    torch.randn(2 * batch, 3, 32, 48, generator=generator)],
            "ir": [torch.randn(2 * batch, 1, 32, 48, generator=generator),
                   torch.randn(2 * batch, 1, 16, 24, generator=generator)]}


def test_teacher_starts_as_the_student_has_no_gradient_and_is_not_optimised():
    _, model, optimizer, _ = _tiny_model()
    for modality in ("rgb", "ir"):
        student, teacher = model.students[modality].state_dict(), model.teachers[modality].state_dict()
        assert student.keys() == teacher.keys() and all(torch.equal(student[k], teacher[k]) for k in student)
        assert not any(p.requires_grad for p in model.teachers[modality].parameters())
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.teachers.parameters()}
    assert optimised == {id(p) for p in model.students.parameters() if p.requires_grad}


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_step_updates_the_teacher_by_exact_ema_and_freezes_the_last_layer_in_epoch_0(epoch):
    config, model, optimizer, schedules = _tiny_model()
    step = epoch * 4 + 1
    teacher_before = {k: v.clone() for k, v in model.teachers.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.students.state_dict().items()}
    result = dino_step(model, model.students, optimizer, _crops(), list(config.dino.directions), step, epoch,
                       schedules, config.dino)
    assert torch.isfinite(result.loss)
    m = float(schedules.momentum[step])
    student_after = model.students.state_dict()
    for name, param in model.teachers.named_parameters():
        expected = teacher_before[name].clone().mul_(m).add_((1 - m) * student_after[name])
        assert torch.equal(param, expected), name
    last = [k for k in student_after if "last_layer" in k and k.endswith("original1")]
    assert last and all(torch.equal(student_after[k], student_before[k]) == (epoch == 0) for k in last)
    assert not torch.equal(student_after["rgb.backbone.cls_token"], student_before["rgb.backbone.cls_token"])
    assert optimizer.param_groups[0]["weight_decay"] == schedules.weight_decay[step]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_alternate_takes_one_direction_per_step_in_turn():
    config = load_training_config(None, [DINO, "dino.alternate=true"])
    assert [active_directions(config.dino, s) for s in range(3)] == [["rgb>ir"], ["ir>rgb"], ["rgb>ir"]]
    config = load_training_config(None, [DINO])
    assert active_directions(config.dino, 5) == ["rgb>ir", "ir>rgb"]


# -- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["dino.warmup_teacher_temp_epochs=5"], "dino.warmup_teacher_temp_epochs (5) is longer than the run"),
        (["dino.directions=['rgb>uv']"], "dino direction 'rgb>uv' is not teacher>student"),
        (["dino.directions=['rgb>ir']"], "the rgb teacher is the EMA of a student no direction trains"),
        (["data.decode=gpu"], "data.decode = 'gpu' is not available with model.objective = 'dino'"),
    ],
)
def test_bad_dino_input_is_one_line_before_any_work(dino_config, sets, expected):
    result = run_cli(dino_config, *sets)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (dino_config.parent / "run").exists()


@pytest.mark.slow
def test_a_vicreg_checkpoint_is_not_resumed_as_dino_nor_the_reverse(dino_config, tmp_path):
    vicreg = run_cli(dino_config, "model.objective=vicreg", "train.max_steps=1")
    assert vicreg.returncode == 0, vicreg.stderr[-2000:]
    refused = run_cli(dino_config, "train.max_steps=2")
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is a vicreg checkpoint; model.objective = 'dino' cannot resume it" in lines[0]
    dino = run_cli(dino_config, f"run.dir={tmp_path / 'dino'}", "train.max_steps=1")
    assert dino.returncode == 0, dino.stderr[-2000:]
    back = run_cli(dino_config, f"run.dir={tmp_path / 'dino'}", "model.objective=vicreg", "train.max_steps=2")
    assert back.returncode == 2 and "is a dino checkpoint; model.objective = 'vicreg' cannot resume it" in back.stderr


# -- ranks and resume from the command line --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("variant", [(), ("dino.use_bn_in_head=true", "dino.alternate=true")],
                         ids=["plain", "bn-alternate"])
def test_dino_one_rank_batch_8_equals_two_ranks_batch_4(dino_config, tmp_path, variant):
    one = run_cli(dino_config, f"run.dir={tmp_path / 'one'}", "train.max_steps=2", *variant)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(dino_config, f"run.dir={tmp_path / 'two'}", "train.batch_size=4", "train.max_steps=2", *variant,
                  ranks=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert a[0]["step"] == b[0]["step"] == 0
    for key in ("loss", "loss_rgb>ir", "teacher_entropy_rgb>ir", "center_norm_rgb>ir"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-4), key
    for key in ("loss", "loss_ir>rgb", "teacher_entropy_ir>rgb", "center_norm_ir>rgb"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-4), key  # after one optimiser and EMA step too
    assert keys_by_step(tmp_path / "one") == keys_by_step(tmp_path / "two")
    # Students, teachers and centres after two steps (gradients averaged over the ranks, centres over every row).
    one_state = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)["model"]
    two_state = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)["model"]
    # With BatchNorm in the head, what feeds it has a bias BN subtracts again: zero gradient up to rounding (see below).
    cancelled = ("backbone.norm.bias", "head.mlp.0.bias", "head.mlp.3.bias") if variant else ()
    for name, value in one_state.items():
        if name.endswith(cancelled):
            continue
        mine, theirs = _without_key_bias(name, value.float()), _without_key_bias(name, two_state[name].float())
        error = (theirs - mine).norm()
        assert error <= 1e-4 * mine.norm() + 1e-6, f"{name}: {error:.2e} of {mine.norm():.2e}"


def _without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """A ViT's qkv bias without its key third: softmax ignores the key bias, so its gradient is zero up to rounding
    and AdamW's first steps move it by +-lr in the sign of that rounding, which differs with the number of ranks."""
    if not name.endswith("attn.qkv.bias"):
        return value
    third = len(value) // 3
    return torch.cat([value[:third], value[2 * third :]])


@pytest.mark.slow
def test_dino_sigterm_then_resume_equals_an_uninterrupted_run(dino_config, tmp_path):
    straight = run_cli(dino_config, f"run.dir={tmp_path / 'straight'}", "train.epochs=2")
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "training", "run", "--config", str(dino_config), "--quiet", "--set", f"run.dir={run}",
            "--set", "train.epochs=2"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _wait_for_rows(run, 3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    total = max(r["step"] for r in metrics(tmp_path / "straight")) + 1
    assert 0 < saved["step"] < total and "SIGTERM at step" in stderr, stdout + stderr
    resumed = run_cli(dino_config, f"run.dir={run}", "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert keys_by_step(run) == keys_by_step(tmp_path / "straight")
    ours, theirs = metrics(run), metrics(tmp_path / "straight")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for key in ("loss", "loss_rgb>ir", "center_norm_ir>rgb", "rgb_teacher_embedding_std", "lr", "momentum"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-5), key
    end_a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    end_b = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, value in end_b.items():
        torch.testing.assert_close(end_a[name], value, rtol=1e-5, atol=1e-6)


# -- analysis -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_analysis_embed_on_a_dino_run_embeds_the_teacher_backbones_and_heads_for_retrieval(dino_config, tmp_path):
    run = tmp_path / "run"
    trained = run_cli(dino_config, "train.max_steps=2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = str(small_chunk_config(tmp_path))
    done = analysis_cli("embed", str(run), "--config", config, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    group = zarr.open_group(str(RunDir(run).embeddings("last")), mode="r")
    assert set(group.array_keys()) >= {"rgb", "ir", "rgb_z", "ir_z", "rgb_prototypes", "ir_prototypes",
                                       "centre_rgb_to_ir", "centre_ir_to_rgb"}
    model, _, _ = RunDir(run).load_model(RunDir(run).checkpoint("last"))
    assert model.rgb_backbone is model.teachers["rgb"].backbone and model.ir_backbone is model.teachers["ir"].backbone
    rgb = np.asarray(group["rgb"][:])
    assert rgb.shape[1] == model.rgb_backbone.num_features and np.isfinite(rgb).all()
    # The stored projection is the RGB teacher head's normalised bottleneck of the stored backbone output.
    with torch.no_grad():
        expected = model.projection("rgb", torch.from_numpy(rgb[:4])).numpy()
    np.testing.assert_allclose(np.asarray(group["rgb_z"][:4]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(group["centre_rgb_to_ir"][:]),
                                  model.losses["rgb>ir"].center.numpy().reshape(-1))
    scored = analysis_cli("retrieval", str(run), "--config", config)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "RGB->IR top-1" in scored.stdout + scored.stderr
    result = json.loads((RunDir(run).results("last") / "retrieval.json").read_text())
    assert 0 <= result["rgb_to_ir"]["1"] <= 1 and 0 <= result["ir_to_rgb"]["1"] <= 1


# -- multi-crop batches ----------------------------------------------------------------------------------------------

def _multicrop_batches(built, workers: int, steps: int = 2, mode: str = "rgb-ir",
                       sets: tuple[str, ...] = ()) -> tuple[list[dict], object, object]:
    table = catalog.open(built).select("TRUE")
    config = load_training_config(None, [DINO, f"data.dataset={built}", "data.ir_size=[32, 48]", "dino.local_crops_number=2",
                                         *sets])
    plan = StepPlan(table.num_rows, 4, 1, seed=5, epochs=2)
    crops = MultiCropPlan.of(config)
    batches = PairBatches(SelectionReader(table, built), plan, 0, config.data, mode, 1, 1 + steps, ir_fill_c=5.0,
                          crops=crops)
    return list(make_loader(batches, workers, 2, pin_memory=False)), config, crops


def test_multicrop_batches_cut_one_box_from_both_modalities_and_decode_each_jpeg_once(built, monkeypatch):
    opened = []
    real_open = transforms.Image.open
    monkeypatch.setattr(transforms.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    serial, config, crops = _multicrop_batches(built, workers=0)
    monkeypatch.undo()
    assert len(opened) == sum(len(b["keys"]) for b in serial)  # one decode per sample, not per crop
    parallel, _, _ = _multicrop_batches(built, workers=2)
    for a, b in zip(serial, parallel):
        assert a["keys"] == b["keys"]
        assert all(torch.equal(a[k], b[k]) for k in ("rgb_global", "rgb_local", "ir_global", "ir_local", "rgb_jitter"))
    batch = serial[0]
    n = len(batch["keys"])
    assert batch["rgb_global"].shape == (2 * n, 64, 96, 3) and batch["rgb_local"].shape == (2 * n, *crops.rgb_local_hw, 3)
    assert batch["ir_global"].shape == (2 * n, 32, 48) and batch["ir_local"].shape == (2 * n, *crops.ir_local_hw)
    # Row c x n + i is crop c of sample i, from the sample's own generator: the same box and flip for both modalities.
    table = catalog.open(built).select("TRUE")
    samples = {s["__key__"]: s for s in SelectionReader(table, built).iter_rows(np.arange(table.num_rows))}
    data = config.data
    for i, key in enumerate(batch["keys"]):
        rng = sample_rng(5, 0, key)
        multicrop = draw_multicrop(rng, crops.global_scale, crops.local_scale, 2, 2, data.crop_ratio, data.hflip)
        augments = [draw_photometric(rng, data, box, flip) for box, flip in zip(multicrop.boxes, multicrop.flips)]
        celsius = ir_celsius(samples[key])
        for c, aug in enumerate(augments):
            scope, row = ("global", c * n + i) if c < 2 else ("local", (c - 2) * n + i)
            ir_hw = data.ir_size if c < 2 else crops.ir_local_hw
            rgb_hw = data.rgb_size if c < 2 else crops.rgb_local_hw
            expected_ir = crop_ir(celsius, aug.box, ir_hw, aug.flip, 5.0, aug.ir_gain, aug.ir_offset_c,
                                  data.ir_noise_c, aug.noise_seed)
            assert np.array_equal(batch[f"ir_{scope}"][row].numpy(), expected_ir)
            expected_rgb = decode_rgb_crop(samples[key]["rgb.jpg"], aug.box, rgb_hw, aug.flip).astype(float)
            assert np.abs(batch[f"rgb_{scope}"][row].numpy() - expected_rgb).mean() < 3  # another DCT scale at most
            assert batch["rgb_jitter"][c * n + i].tolist() == pytest.approx(aug.rgb_jitter)


@pytest.mark.parametrize("mode", ["rgb-ir", "rgb-grey", "grey-ir", "ir3"])
def test_multicrop_views_of_every_mode_fit_their_branches(built, mode):
    batches, config, crops = _multicrop_batches(built, workers=0, steps=1)
    views = BatchViews(config.data, mode, 16, 8, 5.0, 10.0, torch.device("cpu"))
    first_global, first_local, second_global, second_local = views.multicrop(batches[0])
    first_ch, second_ch = view_channels(mode)
    n = len(batches[0]["keys"])
    assert first_global.shape == (2 * n, first_ch, 64, 96) and first_local.shape == (2 * n, first_ch, *crops.rgb_local_hw)
    assert second_global.shape == (2 * n, second_ch, 32, 48)
    assert second_local.shape == (2 * n, second_ch, *crops.ir_local_hw)
    assert all(torch.isfinite(t).all() for t in (first_global, first_local, second_global, second_local))


def test_multicrop_ir3_relative_to_the_frame_gives_every_crop_its_sample_reference(built):
    (batch,), config, crops = _multicrop_batches(built, workers=0, steps=1, mode="ir3",
                                                 sets=("data.ir3_reference=frame",))
    (fixed,), _, _ = _multicrop_batches(built, workers=0, steps=1, mode="ir3")
    assert "ir_reference_c" not in fixed and torch.equal(batch["ir_global"], fixed["ir_global"])
    table = catalog.open(built).select("TRUE")
    samples = {s["__key__"]: s for s in SelectionReader(table, built).iter_rows(np.arange(table.num_rows))}
    expected = [frame_reference_c(ir_celsius(samples[key]), fallback_c=5.0) for key in batch["keys"]]
    assert batch["ir_reference_c"].tolist() == pytest.approx(expected, rel=1e-6)
    views = BatchViews(config.data, "ir3", 16, 8, 5.0, 10.0, torch.device("cpu"))
    _, _, second_global, second_local = views.multicrop(batch)
    reference = batch["ir_reference_c"].repeat(2)  # crop-major rows: crop c of sample i is row c x N + i
    offsets = config.data.ir3_offsets_c
    assert torch.equal(second_global, ir3_relative(batch["ir_global"], reference, offsets))
    assert torch.equal(second_local, ir3_relative(batch["ir_local"], reference, offsets))
    assert torch.isfinite(second_global).all() and torch.isfinite(second_local).all()


@pytest.mark.parametrize("objective", ["dino", "vicreg"])
def test_a_run_in_ir3_relative_to_the_frame_trains_and_records_it(dino_config, tmp_path, objective):
    result = run_cli(dino_config, f"model.objective={objective}", "model.mode=ir3", "data.ir3_reference=frame",
                     "data.ir3_offsets_c=[-40.0, -3.0]", "train.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.isfinite(metrics(tmp_path / "run")[0]["loss"])
    recorded = load_training_config(str(tmp_path / "run" / "config.toml"))
    assert (recorded.data.ir3_reference, recorded.data.ir3_offsets_c) == ("frame", (-40.0, -3.0))


@pytest.mark.slow
def test_a_non_finite_dino_loss_stops_and_keeps_the_last_good_checkpoint(dino_config, tmp_path):
    run = tmp_path / "run"
    assert run_cli(dino_config, "train.max_steps=1").returncode == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    result = run_cli(dino_config, "data.ir_std=1e-38", "train.checkpoint_minutes=1e-9", extra=("--new-schedule",))
    assert result.returncode == 3, result.stderr[-2000:]
    assert "not finite" in result.stderr and "last good checkpoint" in result.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
