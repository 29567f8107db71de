"""Training throughput on one GPU: the model-only rate against the end-to-end rate from the shards.

One prepared run for a GPU machine (../shared/notes/gpu-feed.md says how to get the project there):

1. builds a dataset of full-size 6144x2048 frames with `ingest synth` + `ingest build-shards --workers 16`;
2. runs `training run` on it for a fixed number of steps, once with `data.decode = "cpu"` (16 workers) and once
   with `"gpu"` (nvJPEG; workers only read bytes and crop the IR), bf16, ViT-S branches at the default sizes
   (RGB 240x320 patch 16, IR 120x160 patch 8: 300 tokens a branch), and reads the steady-state rate and the
   data-wait share from the run's metrics.jsonl;
3. measures the model-only rate: the same step (`training.train.vicreg_step`) on random tensors already on the GPU.

Target: end-to-end >= 0.9 of the model-only rate. Then `analysis embed` (issue 8) with the trained checkpoint over a
larger quarter-scale dataset (the shards hold the same 672x504 JPEGs whatever the source scale), with
``embed.decode`` = gpu and cpu, against the model-only inference rate (backbones + expanders, no gradients):
target >= 0.8. With ``--dino`` (default) also DINO's (issue 19): the step on random multi-crop tensors, and
`training run` with ``model.objective = "dino"`` (multi-crop loader, CPU decode), target >= 0.9 likewise.
Expanders are 2048-2048-2048 (as in gpu-feed.md's reference
figure, 2,612 pairs/s at 224/112), so the numbers compare with it.

    PYTHONPATH=/tmp/site:$PWD python3 bench/train_gpu.py [--frames 512] [--steps 60] [--summary $OUT/train_gpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import OUT, find_mpiexec, record  # noqa: E402

BATCH = 256
EXPANDER = "[2048, 2048, 2048]"
CHUNK_ROWS = 4096


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, cwd=ROOT, check=True, **kwargs)


def build_dataset(root: Path, frames_per_node: int, workers: int, scale: float = 1.0) -> tuple[Path, list[str]]:
    raw, dataset = root / "raw", root / "dataset"
    lines = []
    if not (dataset / "catalog").exists():
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        run([sys.executable, "-m", "ingest", "synth", str(raw), "--nodes", "2", "--frames", str(frames_per_node),
             "--scale", str(scale), "--workers", str(workers), "--quiet"])
        synth_s = time.perf_counter() - started
        started = time.perf_counter()
        run([sys.executable, "-m", "ingest", "build-shards", str(raw), str(dataset), "--nodes", str(raw / "nodes.csv"),
             "--workers", str(workers), "--quiet"])
        build_s = time.perf_counter() - started
        frames = 2 * frames_per_node
        size = "full-size 6144x2048" if scale == 1.0 else f"{scale:g}-scale"
        lines.append(f"dataset: {frames} {size} frames; synth {synth_s:.0f} s; build-shards --workers "
                     f"{workers}: {build_s:.1f} s = {frames / build_s:.0f} frames/s (whole run, scan and commit included)")
    return dataset, lines


def end_to_end(dataset: Path, decode: str, workers: int, steps: int, run_dir: Path, objective: str = "vicreg") -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = {
        "data.dataset": str(dataset), "data.where": "TRUE", "data.decode": decode, "data.workers": str(workers),
        "data.prefetch": "4", "model.expander": EXPANDER, "train.batch_size": str(BATCH), "train.epochs": "1000",
        "optim.warmup_epochs": "1", "train.max_steps": str(steps), "train.log_every": "1",
        "train.checkpoint_every": "1000", "run.dir": str(run_dir), "model.objective": objective,
    }
    argv = [sys.executable, "-m", "training", "run", "--quiet"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    run(argv)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 4 :]  # past worker start-up and the first compilation of kernels
    return {
        "decode": decode, "workers": workers, "steps": steps,
        "pairs_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "data_wait": statistics.median(r["data_wait"] for r in steady),
        "mean_pairs_per_s": statistics.fmean(r["samples_per_s"] for r in steady),
        "wall_s": wall, "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
    }


def decode_agreement(dataset: Path) -> float:
    """Mean |difference| in [0, 1] between the CPU path's crops and nvJPEG + roi_align's, on one batch of 64."""
    import torch

    import catalog
    from shards.reader import SelectionReader
    from training.config import DataConfig
    from training.loader import BatchViews, PairBatches, StepPlan

    table = catalog.open(dataset).select("TRUE")
    plan = StepPlan(table.num_rows, 64, 1, seed=0, epochs=1)
    crops = []
    for decode in ("cpu", "gpu"):
        data = DataConfig(dataset=str(dataset), decode=decode)
        batch = PairBatches(SelectionReader(table, dataset), plan, 0, data, "rgb-ir", 0, 1, 0.0).batch(0)
        views = BatchViews(data, "rgb-ir", 16, 8, 0.0, 1.0, torch.device("cuda"))
        crops.append(views.rgb(batch))
    return float((crops[0] - crops[1]).abs().mean())


def model_only(steps: int) -> dict:
    import torch

    from training.config import DataConfig, LossConfig, ModelConfig, OptimConfig
    from training.model import VICReg
    from training.optim import build_optimizer
    from training.train import vicreg_step

    device = torch.device("cuda")
    data, model_config = DataConfig(), ModelConfig(expander=(2048, 2048, 2048))
    torch.manual_seed(0)
    model = VICReg(model_config, data.rgb_size, data.ir_size, (3, 1)).to(device)
    optimizer = build_optimizer(model, OptimConfig(), fused=True)
    first = torch.randn(BATCH, 3, *data.rgb_size, device=device)
    second = torch.randn(BATCH, 1, *data.ir_size, device=device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def timed(n: int, train: bool) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(n):
            if train:
                vicreg_step(model, optimizer, first, second, 0.01, LossConfig(), autocast)
            else:
                with torch.no_grad(), autocast():  # what `analysis embed` computes: backbones and expanders
                    model.rgb_expander(model.rgb_backbone(first))
                    model.ir_expander(model.ir_backbone(second))
        torch.cuda.synchronize()
        return n * BATCH / (time.perf_counter() - started)

    timed(5, True)
    train_rate = statistics.median(timed(max(steps // 3, 5), True) for _ in range(3))
    model.eval()
    timed(3, False)
    embed_rate = statistics.median(timed(max(steps // 3, 5), False) for _ in range(3))
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"train_pairs_per_s": train_rate, "embed_pairs_per_s": embed_rate, "peak_gib": peak,
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def dino_model_only(steps: int) -> dict:
    """The DINO step (both directions, 2 global + the default local crops, upstream's 65,536-way heads) on random
    crops already on the GPU: what the DINO loader has to keep up with."""
    import torch

    from training.config import load_training_config
    from training.dino_step import DINOSchedules, build_dino_optimizer, dino_step
    from training.loader import MultiCropPlan
    from training.model import initial_model, model_spec

    config = load_training_config(None, ["model.objective=dino", f"train.batch_size={BATCH}"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = initial_model(config, model_spec(config)).to(device)
    optimizer = build_dino_optimizer(model, config.optim)
    schedules = DINOSchedules.of(config, BATCH, 1000)
    plan = MultiCropPlan.of(config)
    channels = {"rgb": 3, "ir": 1}
    sizes = {"rgb": (config.data.rgb_size, plan.rgb_local_hw), "ir": (config.data.ir_size, plan.ir_local_hw)}
    crops = {m: [torch.randn(plan.n_global * BATCH, channels[m], *sizes[m][0], device=device),
                 torch.randn(plan.n_local * BATCH, channels[m], *sizes[m][1], device=device)] for m in channels}

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(n):
            dino_step(model, model.students, optimizer, crops, list(config.dino.directions), step, 1, schedules,
                      config.dino, autocast)
        torch.cuda.synchronize()
        return n * BATCH / (time.perf_counter() - started)

    timed(3)
    rate = statistics.median(timed(max(steps // 3, 5)) for _ in range(3))
    return {"train_pairs_per_s": rate, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "crops": f"{plan.n_global} global + {plan.n_local} local"}


def analysis_embed(run_dir: Path, dataset: Path, decode: str, workers: int, checkpoint: str = "last") -> dict:
    """`analysis embed` of every sample of ``dataset`` with the run's ``checkpoint``: its steady pairs/s."""
    from analysis.config import EmbedConfig
    from analysis.embed import embed

    shutil.rmtree(run_dir / "embeddings", ignore_errors=True)
    config = EmbedConfig(batch_size=BATCH, workers=workers, decode=decode, chunk_rows=CHUNK_ROWS)
    result = embed(run_dir, checkpoint, where="TRUE", config=config, dataset=str(dataset), progress=False)
    return {"decode": decode, "workers": workers, "rows": result.rows, "seconds": result.seconds,
            "steady": result.steady_pairs_per_s}


def analysis_embed_ranks(run_dir: Path, dataset: Path, ranks: int, workers: int, checkpoint: str = "last",
                         decode: str = "gpu", timeout_s: float = 120.0) -> dict:
    """`mpiexec -n R analysis embed` with every rank on the one GPU: each process has its own Python (GIL),
    so one rank's host work (launching kernels, collecting batches) overlaps the other's GPU work."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        return {"error": "no mpiexec"}
    shutil.rmtree(run_dir / "embeddings", ignore_errors=True)
    toml = OUT / f"embed-{ranks}-ranks.toml"
    toml.write_text(f'[embed]\nbatch_size = {BATCH}\nworkers = {workers}\ndecode = "{decode}"\nchunk_rows = {CHUNK_ROWS}\n')
    argv = [mpiexec, "-n", str(ranks), sys.executable, "-m", "analysis", "embed", str(run_dir), "--checkpoint",
            checkpoint, "--dataset", str(dataset), "--config", str(toml), "--quiet"]
    print("+", " ".join(argv), flush=True)
    started = time.perf_counter()
    # Its own session, so that a hung rank (and its loader workers) can be killed as a group.
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        return {"error": f"did not finish in {timeout_s:.0f} s (killed)"}
    wall = time.perf_counter() - started
    found = re.search(r"(\d+) samples \((\d+) embedded now, (\d+) pairs/s on (\d+) rank\(s\); (\d+) pairs/s after", stderr)
    if process.returncode != 0 or found is None:
        return {"error": f"exit {process.returncode}: {stderr[-400:]}"}
    return {"decode": decode, "ranks": ranks, "workers": workers, "rows": int(found[1]), "rate": float(found[3]),
            "steady": float(found[5]), "wall": wall}


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def feed_only(run_dir: Path, dataset: Path, workers: int, checkpoint: str) -> dict:
    """pairs/s of the embed's input alone, no model: the loader's workers (bytes + IR crops) by themselves, and with
    the device side added (DevicePrefetcher: nvJPEG decode, roi_align crops, normalisation on a side stream)."""
    import dataclasses

    import numpy as np
    import torch

    import catalog
    from analysis.runs import RunDir
    from shards.reader import SelectionReader
    from training.loader import BatchViews, DevicePrefetcher, RowBatches, make_loader

    config = RunDir.open(run_dir).training_config()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: only to try the bench out
    data, m = dataclasses.replace(config.data, decode="gpu" if device.type == "cuda" else "cpu"), config.model
    with catalog.open(dataset) as cat:
        selection = cat.select("TRUE")
    n = selection.num_rows
    batches = [((0, b), np.arange(b, min(b + BATCH, n))) for b in range(0, n, BATCH)]
    rates = {}
    for what in ("loader", "loader+device"):
        loader = make_loader(RowBatches(SelectionReader(selection, dataset), batches, data, m.mode, data.ir_mean),
                             workers, 4, pin_memory=device.type == "cuda")
        if what == "loader":
            stream = ((batch, None) for batch in loader)
            prefetch = None
        else:
            views = BatchViews(data, m.mode, m.rgb_patch, m.ir_patch, data.ir_mean, data.ir_std, device)
            prefetch = stream = DevicePrefetcher(loader, views, device)
        count, warm = 0, None
        for batch, _ in stream:
            count += len(batch["keys"])
            if warm is None:
                _synchronize(device)
                warm = (time.perf_counter(), count)
        _synchronize(device)
        ended = time.perf_counter()
        if prefetch is not None:
            prefetch.close()
        rates[what] = (count - warm[1]) / (ended - warm[0])
    # One batch's device side alone, again and again on the default stream: what it costs the GPU (nvJPEG decode,
    # roi_align crops, normalisation). Embedding pays model + this per batch where the two cannot overlap.
    loader = make_loader(RowBatches(SelectionReader(selection, dataset), batches[:1], data, m.mode, data.ir_mean), 0, 2,
                         pin_memory=False)
    batch = next(iter(loader))
    views = BatchViews(data, m.mode, m.rgb_patch, m.ir_patch, data.ir_mean, data.ir_std, device)
    views(batch)
    _synchronize(device)
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        views(batch)
    _synchronize(device)
    rates["one batch's device side, repeated"] = repeats * len(batch["keys"]) / (time.perf_counter() - started)
    return rates


def embed_run_dir(root: Path, dataset: Path) -> Path:
    """A run directory with only a config (ViT-S pair, expanders as above): `analysis embed --checkpoint random`
    measures the embed path without training anything first."""
    from training.config import DataConfig, ModelConfig, TrainingConfig, config_toml

    run_dir = root / "embed-gpu-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = TrainingConfig(data=DataConfig(dataset=str(dataset), ir_mean=10.0, ir_std=20.0),
                            model=ModelConfig(expander=(2048, 2048, 2048)))
    (run_dir / "config.toml").write_text(config_toml(config))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512, help="full-size frames per node (2 nodes)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per end-to-end run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 16)
    parser.add_argument("--gpu-workers", type=int, default=8, help="loader workers with data.decode = gpu")
    parser.add_argument("--embed-frames", type=int, default=4096,
                        help="frames per node of the (quarter-scale) dataset `analysis embed` reads; 0: skip")
    parser.add_argument("--embed-workers", type=int, default=max((os.cpu_count() or 16) - 2, 1),
                        help="loader workers of `analysis embed` with decode = gpu (they read bytes and crop IR)")
    parser.add_argument("--embed-scale", type=float, default=0.25, help="source scale of the embed dataset")
    parser.add_argument("--only-embed", action="store_true",
                        help="measure only `analysis embed` (random-init weights) against the model-only rate")
    parser.add_argument("--embed-ranks", type=lambda text: [int(r) for r in text.split(",") if r], default=[2],
                        help="also `mpiexec -n R analysis embed` on the one GPU for each R (comma-separated; '' none)")
    parser.add_argument("--dino", action=argparse.BooleanOptionalAction, default=True,
                        help="also DINO's model-only and end-to-end (multi-crop, decode = cpu) rates")
    parser.add_argument("--summary", help="also write the recorded lines here (markdown)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench/train_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    lines: list[str] = []
    summary = Path(args.summary) if args.summary else None

    def say(line: str) -> None:
        # Each figure is printed and kept as soon as it is measured: a lent machine's time can run out mid-way.
        lines.append(line)
        print(f"- {line}", flush=True)
        if summary is not None:
            summary.write_text("\n".join(f"- {x}" for x in lines) + "\n")

    model = model_only(args.steps)
    limit, embed_limit = model["train_pairs_per_s"], model["embed_pairs_per_s"]
    say(f"GPU: {model['gpu']}, torch {model['torch']}, bf16 autocast, batch {BATCH}, ViT-S/16 RGB 240x320 + "
        f"ViT-S/8 IR 120x160 (300 tokens a branch), expanders {EXPANDER}, LARS")
    say(f"model-only (random tensors on the GPU): train {limit:.0f} pairs/s; embed without gradients "
        f"{embed_limit:.0f} pairs/s; peak {model['peak_gib']:.1f} GiB")
    if not args.only_embed:
        dataset, built = build_dataset(OUT / f"train-gpu-{args.frames}", args.frames, args.workers)
        for line in built:
            say(line)
        agreement = decode_agreement(dataset)
        say(f"data.decode = gpu (nvJPEG + roi_align) vs cpu (Pillow draft + resize) crops of one batch: mean "
            f"|difference| {agreement:.4f} of full scale (target < 0.03)")
        for decode, workers, name in (("cpu", args.workers, "cpu"), ("gpu", args.gpu_workers, "gpu")):
            r = end_to_end(dataset, decode, workers, args.steps, OUT / f"train-gpu-run-{name}")
            say(f"end-to-end from the shards, data.decode = {r['decode']} ({r['workers']} workers): {r['pairs_per_s']:.0f} "
                f"pairs/s (median over steps; mean {r['mean_pairs_per_s']:.0f}) = {r['pairs_per_s'] / limit:.2f} of the "
                f"model-only rate (target >= 0.9); data wait {100 * r['data_wait']:.1f}% of step time; loss "
                f"{r['loss_first']:.2f} -> {r['loss_last']:.2f} over {r['steps']} steps")
    if args.dino:
        dino = dino_model_only(args.steps)
        say(f"DINO model-only (both directions, {dino['crops']} crops a modality, 65,536-way heads, AdamW, bf16, "
            f"batch {BATCH}): {dino['train_pairs_per_s']:.0f} pairs/s; peak {dino['peak_gib']:.1f} GiB")
        if not args.only_embed:
            r = end_to_end(dataset, "cpu", args.workers, args.steps, OUT / "train-gpu-run-dino", objective="dino")
            say(f"DINO end-to-end from the shards (multi-crop loader, data.decode = cpu, {r['workers']} workers): "
                f"{r['pairs_per_s']:.0f} pairs/s (median; mean {r['mean_pairs_per_s']:.0f}) = "
                f"{r['pairs_per_s'] / dino['train_pairs_per_s']:.2f} of the DINO model-only rate (target >= 0.9); data "
                f"wait {100 * r['data_wait']:.1f}% of step time; loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}")
    if args.embed_frames:
        embed_dataset, built = build_dataset(OUT / f"embed-gpu-{args.embed_frames}-{args.embed_scale:g}",
                                             args.embed_frames, args.workers, scale=args.embed_scale)
        for line in built:
            say(line)
        if args.only_embed:
            run_dir, checkpoint = embed_run_dir(OUT, embed_dataset), "random"
        else:
            run_dir, checkpoint = OUT / "train-gpu-run-gpu", "last"
        feed = feed_only(run_dir, embed_dataset, args.embed_workers, checkpoint)
        say("the embed's input alone, no model: " + "; ".join(
            f"{what} {rate:.0f} pairs/s ({rate / embed_limit:.2f} x the model-only embed rate)" for what, rate in feed.items()))
        device_side = feed["one batch's device side, repeated"]
        serial = 1 / (1 / embed_limit + 1 / device_side)
        say(f"model and device side one after the other on the GPU (no overlap): {serial:.0f} pairs/s = "
            f"{serial / embed_limit:.2f} of the model-only embed rate: what embed gets if the GPU, not the host, is full")
        for decode, workers in (("gpu", args.embed_workers), ("gpu", args.embed_workers), ("cpu", args.workers)):
            e = analysis_embed(run_dir, embed_dataset, decode, workers, checkpoint)
            steady = e["steady"] or float("nan")
            say(f"`analysis embed` (ViT-S pair + expanders, bf16, batch {BATCH}), embed.decode = {e['decode']} "
                f"({e['workers']} workers), {e['rows']} samples: {steady:.0f} pairs/s after the first batch "
                f"({e['rows'] / e['seconds']:.0f} with worker start-up) = **{steady / embed_limit:.2f} of the "
                f"model-only embed rate** (target >= 0.8)")
        for ranks in args.embed_ranks:
            e = analysis_embed_ranks(run_dir, embed_dataset, ranks, max(args.embed_workers // ranks, 1), checkpoint)
            if "error" in e:
                say(f"`mpiexec -n {ranks} analysis embed` on one GPU FAILED: {e['error']}")
                continue
            say(f"`mpiexec -n {e['ranks']} analysis embed` on the one GPU, embed.decode = {e['decode']} "
                f"({e['workers']} workers a rank), {e['rows']} samples: {e['steady']:.0f} pairs/s after each rank's first batch ({e['rate']:.0f} "
                f"with start-up; command {e['wall']:.1f} s) = **{e['steady'] / embed_limit:.2f} of the model-only embed "
                f"rate**")
    record("bench/train_gpu.py", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
