"""Ingest throughput on full-size (6144x2048) frames against the limit of the irreducible work.

Limit: one core's time per frame for the work no ingest can skip, measured here in one process: parse the
celsius CSV, decode the JPEG at the scale used (DCT-scaled 1/2 for the default 672x504 output), crop+resize,
encode the output JPEG and the .npy. Limit with W workers = W / that time. Figure: frames/s of a whole
`build_shards` run (scan, metadata join, decode, shards, catalog commit) with 1 and 2 workers.
Target: >= 0.9 x limit.

Because a VM's cores need not scale (two vCPUs may share one physical core, one busy core may turbo), the
same irreducible work is also run in W processes at once; that "concurrent limit" is what W workers could do
on this machine at best, and the ratio against it is the ingest's own overhead.

    python bench/ingest.py [--frames 96]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import OUT, record  # noqa: E402
from ingest.build import build_shards  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.optical import crop_optical, encode_jpeg  # noqa: E402
from ingest.process import encode_npy  # noqa: E402
from ingest.synth import SynthConfig, synthesize  # noqa: E402
from ingest.thermal import parse_celsius_csv  # noqa: E402


def raw_frames(frames: int) -> Path:
    raw = OUT / f"ingest-raw-{frames}"
    if not (raw / "truth.parquet").exists():
        shutil.rmtree(raw, ignore_errors=True)
        synthesize(raw, SynthConfig(nodes=1, frames=frames, seed=1, scale=1.0, start="2023-04-01", end="2023-08-31"))
    return raw


def irreducible_seconds(raw: Path, config: IngestConfig) -> tuple[float, dict[str, float]]:
    jpegs = sorted(raw.glob("*/*-6144x2048*.jpg"))
    parts: dict[str, list[float]] = {"csv": [], "decode+crop+resize": [], "encode": []}
    for jpeg in jpegs:
        csv = next(jpeg.parent.glob(jpeg.name.split("-")[0] + "-*celsius*.csv"))
        rgb_bytes, csv_bytes = jpeg.read_bytes(), csv.read_bytes()
        t0 = time.perf_counter()
        thermal = parse_celsius_csv(csv_bytes)
        t1 = time.perf_counter()
        optical = crop_optical(rgb_bytes, config.crop, config.rgb_output_size(*thermal.sensor_size), config.resample)
        t2 = time.perf_counter()
        encode_jpeg(optical.image, config.jpeg_quality)
        encode_npy(thermal.celsius)
        t3 = time.perf_counter()
        parts["csv"].append(t1 - t0)
        parts["decode+crop+resize"].append(t2 - t1)
        parts["encode"].append(t3 - t2)
    medians = {k: statistics.median(v) for k, v in parts.items()}
    return sum(medians.values()), medians


def _cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the build's workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _irreducible_rate(job: tuple[str, int]) -> float:
    raw, _ = job
    seconds, _ = irreducible_seconds(Path(raw), IngestConfig())
    return 1.0 / seconds


def concurrent_limit(raw: Path, workers: int) -> float:
    """frames/s of the irreducible work alone in ``workers`` processes running at the same time."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return sum(pool.map(_irreducible_rate, [(str(raw), i) for i in range(workers)]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="builds per worker count (the faster one counts)")
    args = parser.parse_args()
    raw = raw_frames(args.frames)
    config = IngestConfig()
    # This VM's speed drifts (turbo, neighbours) by up to 30% between minutes, so the limit is measured right
    # before and after every build, and each build is compared with the median of the measurements around it.
    lines = []
    for workers in (1, 2):
        limits, runs, together = [irreducible_seconds(raw, config)], [], [concurrent_limit(raw, workers)]
        for _ in range(args.repeats):
            dataset = OUT / f"ingest-dataset-w{workers}"
            shutil.rmtree(dataset, ignore_errors=True)
            started, cpu_before = time.perf_counter(), _cpu_seconds()
            summary = build_shards(raw, dataset, IngestConfig(workers=workers), progress=False, log=lambda m: None)
            seconds = time.perf_counter() - started
            cpu_per_frame = (_cpu_seconds() - cpu_before) / summary.frames_decoded
            runs.append((summary.frames_decoded / seconds, seconds, summary.frames_per_second, cpu_per_frame))
            shutil.rmtree(dataset, ignore_errors=True)
            limits.append(irreducible_seconds(raw, config))
            together.append(concurrent_limit(raw, workers))
        per_frame, parts = sorted(limits)[len(limits) // 2]
        spread = ", ".join(f"{t * 1000:.0f}" for t, _ in limits)
        rate, seconds, steady, cpu_per_frame = max(runs)
        limit = workers / per_frame
        lines.append(
            f"{workers} worker(s): irreducible work per frame on one core {per_frame * 1000:.1f} ms ("
            + ", ".join(f"{k} {v * 1000:.1f}" for k, v in parts.items())
            + f"; measured {spread} ms around the builds) -> limit {limit:.2f} frames/s"
        )
        concurrent = sorted(together)[len(together) // 2]
        lines.append(
            f"{workers} worker(s): the same work in {workers} process(es) at once: {concurrent:.2f} frames/s "
            f"(measured {', '.join(f'{x:.1f}' for x in together)}) = {concurrent / limit:.2f} x the one-core limit"
        )
        lines.append(
            f"{workers} worker(s): build-shards on {args.frames} full-size 6144x2048 frames: {rate:.2f} frames/s "
            f"(whole run {seconds:.1f} s, best of {args.repeats}) = {rate / limit:.2f} of the limit (target >= 0.90), "
            f"{rate / concurrent:.2f} of the concurrent limit; while decoding (no scan, plan or commit) "
            f"{steady:.2f} frames/s = {steady / limit:.2f} of the limit, {steady / concurrent:.2f} of the concurrent limit"
        )
        lines.append(
            f"{workers} worker(s): CPU time per frame over all processes {cpu_per_frame * 1000:.1f} ms vs "
            f"{per_frame * 1000:.1f} ms irreducible: {per_frame / cpu_per_frame:.2f} of the CPU goes to the irreducible work"
        )
    record("bench/ingest.py", lines)


if __name__ == "__main__":
    main()
