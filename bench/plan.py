"""Rank 0's serial part of `ingest build-shards` at scale: everything but the decode, per frame.

Under `mpiexec -n R` every rank decodes, but rank 0 alone scans RAW, reads the upload metadata, plans the
frames, and after the decode places the shards and commits the catalog part. That serial part does not shrink
as ranks are added, so it is what limits a multi-node ingest (Amdahl). This bench runs the real
`build_shards` on a RAW of N frames of empty files with their real names and sizes (sparse files; 4 files a
frame, 12 nodes, one uploads.csv of every upload record) with the decode replaced by a stand-in that returns
what workers would (results, placements, assembled shard files), and prints rank 0's seconds a frame:

- a first build of the N frames (every frame new);
- the same RAW again (nothing new), and with 1% new frames: a daily incremental run over a growing RAW.

The figure it chases: rank 0's serial seconds against the decode time of the same frames at a reference rate
of 1,000 frames/s (4 nodes of 16 cores; one lent 16-core node measured 218-229 frames/s), so the share of a
multi-node run that only rank 0 works.

    python bench/plan.py [--frames 50000] [--no-record]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

import ingest.build as build  # noqa: E402
from bench._common import OUT, record  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.process import FrameResult, SegmentSample  # noqa: E402
from ingest.share import AssembledShard, ShareOutcome  # noqa: E402
from ingest.synth import SynthConfig, _metadata_rows, _write_nodes_csv, frame_filenames, plan_frames  # noqa: E402
from shards.writer import MemberLocation  # noqa: E402

REFERENCE_RATE = 1000.0  # frames/s of decoding across the ranks
SAMPLES_PER_SHARD = 150  # about what 64 MB shards of full-size samples hold
_SIZES = {"rgb": 2_100_000, "thermal": 1_900_000, "uint": 600_000, "raw": 169_344, "netcdf": 4096, "plot": 60_000}
_STATS = {"ir_min": -20.0, "ir_mean": 5.0, "ir_max": 30.0, "ir_std": 9.0, "ir_nan_fraction": 0.0, "rgb_mean": 0.4,
          "rgb_width": 672, "rgb_height": 504, "ir_width": 336, "ir_height": 252, "source_width": 6144,
          "source_height": 2048, "decode_scale": 0.375}


def skeleton_raw(raw: Path, frames: int, seed: int) -> int:
    """Write a RAW whose files are empty (sparse) but named, sized and described like a real download."""
    config = SynthConfig(nodes=12, frames=max(1, frames // 12), seed=seed, start="2023-01-01", end="2023-12-31",
                         visit_frames=32)
    metadata = []
    specs = plan_frames(config)
    for spec in specs:
        names = frame_filenames(spec)
        paths = {kind: f"{spec.vsn}/{spec.ts_ns}-{name}" for kind, name in names.items()}
        (raw / spec.vsn).mkdir(parents=True, exist_ok=True)
        for kind, path in paths.items():
            with open(raw / path, "wb") as f:
                f.truncate(_SIZES[kind])
        metadata += _metadata_rows(spec, paths, {})
    (raw / "metadata").mkdir(exist_ok=True)
    frame = pd.DataFrame(metadata)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="ns", utc=True)
    # One file per batch of frames, as a download writes them (the name decides the order they are read in).
    frame.to_csv(raw / "metadata" / f"uploads-{seed:04d}.csv")
    if not (raw / "nodes.csv").exists():  # later batches: the same nodes
        _write_nodes_csv(raw / "nodes.csv", config)
    return len(specs)


def stand_in_write_share(tasks, raw_dir, config, workers, work_dir, tag, progress=True) -> ShareOutcome:
    """What the workers return for ``tasks``, without decoding: every frame a sample, in shards of 150."""
    work_dir.mkdir(parents=True, exist_ok=True)
    members = {"ir.npy": MemberLocation(512, 338_816), "json": MemberLocation(339_840, 700),
               "rgb.jpg": MemberLocation(341_248, 90_000)}
    results, where, shards = [], {}, []
    for i, task in enumerate(tasks):
        results.append(FrameResult(task.key, None, dict(_STATS), placement=SegmentSample("segment", 0, 431_616, members)))
        where[task.key] = (i // SAMPLES_PER_SHARD, (i % SAMPLES_PER_SHARD) * 431_616)
    for first in range(0, len(tasks), SAMPLES_PER_SHARD):
        path = work_dir / f"{tag}-{len(shards):06d}.tar"
        path.touch()
        keys = tuple(t.key for t in tasks[first : first + SAMPLES_PER_SHARD])
        shards.append(AssembledShard(str(path), "0" * 64, 64_000_000, keys))
    return ShareOutcome(results, shards, where, workers=workers)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(raw: Path, dataset: Path, label: str, frames_in_raw: int) -> str:
    start = time.perf_counter()
    summary = build.build_shards(raw, dataset, IngestConfig(workers=1), nodes_csv=raw / "nodes.csv", progress=False)
    wall = time.perf_counter() - start
    serial = summary.plan_seconds + summary.commit_seconds
    decode_at_reference = max(summary.frames_decoded, 1) / REFERENCE_RATE
    share = (f"; the decode of those frames at {REFERENCE_RATE:,.0f} frames/s would take {decode_at_reference:.1f} s, "
             f"so rank 0 alone works {100 * serial / (serial + decode_at_reference):.0f}% of such a run"
             if summary.frames_decoded else "")
    return (
        f"{label}: {summary.files_seen:,} raw files ({frames_in_raw:,} frames), {summary.frames_decoded:,} frames to "
        f"decode, {summary.samples_added:,} samples added: rank 0's plan {summary.plan_seconds:.2f} s + commit "
        f"{summary.commit_seconds:.2f} s = {serial:.2f} s ({1e6 * serial / frames_in_raw:.0f} µs per frame in RAW; "
        f"whole call {wall:.1f} s with the stand-in decode){share}; peak RSS so far {_rss_mb():.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    build.write_share = stand_in_write_share
    root = OUT / f"plan-{args.frames}"
    shutil.rmtree(root, ignore_errors=True)
    raw, dataset = root / "raw", root / "dataset"
    t = time.perf_counter()
    frames = skeleton_raw(raw, args.frames, seed=0)
    print(f"skeleton RAW of {frames:,} frames written in {time.perf_counter() - t:.1f} s", flush=True)
    lines = [f"run: bench/plan.py --frames {args.frames} (RAW of sparse files, 12 nodes; decode replaced by a stand-in)"]
    lines.append(measure(raw, dataset, "first build", frames))
    lines.append(measure(raw, dataset, "the same RAW again", frames))
    frames += skeleton_raw(raw, args.frames // 100, seed=1)
    lines.append(measure(raw, dataset, "with 1% new frames", frames))
    shutil.rmtree(root, ignore_errors=True)
    if args.no_record:
        print("\n".join(lines))
    else:
        record("bench/plan.py", lines)


if __name__ == "__main__":
    main()
