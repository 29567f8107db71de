"""The IR member gzip-compressed (``ir.npy.gz``) against the plain ``.npy`` (``ir.npy``, datasets before 2026-12-05).

Dataset: the same synthetic RAW (2 nodes, seed 3, small sources: the shard members are full size, 672x504 JPEG +
336x252 float32, as bench/selection.py's) built twice by the real pipeline, once as ingest writes it now and once
the old way. Figures: bytes per sample of each (the catalog's sample_length, and shard bytes over samples) and
their ratio (target <= 0.5x); the IR decode time per sample, in memory, of each (``np.load`` of the ``.npy``
against ``shards.layout.ir_celsius`` of the ``.npy.gz``) and its encode time (what ingest pays per frame); and, on
the same frames, the zlib levels and strategies that picked ``IR_GZIP_LEVEL``.

    python bench/ir_encoding.py [--frames 300] [--workers 1] [--no-record]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ingest.process  # noqa: E402
from bench._common import OUT, record  # noqa: E402
from catalog.query import Catalog  # noqa: E402
from ingest.build import build_shards  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.synth import SynthConfig, synthesize  # noqa: E402
from shards.layout import (  # noqa: E402
    IR_GZ_MEMBER,
    IR_GZIP_LEVEL,
    IR_MEMBER,
    encode_ir,
    encode_npy,
    ir_celsius,
    member_span,
)
from shards.reader import SelectionReader  # noqa: E402

TARGET = 0.5  # bytes per sample, new over old
STRATEGIES = {"default": zlib.Z_DEFAULT_STRATEGY, "filtered": zlib.Z_FILTERED, "rle": zlib.Z_RLE,
              "huffman-only": zlib.Z_HUFFMAN_ONLY}
SWEEP = [("default", level) for level in (1, 2, 3, 4, 5, 6, 9)] + [("filtered", 4), ("filtered", 6), ("rle", 4),
                                                                   ("huffman-only", 4)]


def build(raw: Path, dataset: Path, ir_member: str, workers: int) -> Path:
    """``raw`` built into ``dataset`` (afresh) with IR member ``ir_member``."""
    shutil.rmtree(dataset, ignore_errors=True)
    written = ingest.process.IR_WRITTEN
    ingest.process.IR_WRITTEN = ir_member  # the workers are forked after this, so they write it too
    try:
        build_shards(raw, dataset, IngestConfig(workers=workers), nodes_csv=raw / "nodes.csv", progress=False,
                     log=lambda message: None)
    finally:
        ingest.process.IR_WRITTEN = written
    return dataset


def sizes(dataset: Path) -> tuple[int, float, float, float]:
    """(samples, mean sample_length, shard bytes per sample, mean IR member bytes)."""
    with Catalog(dataset) as catalog:
        row = catalog.query(
            "SELECT count(*) AS n, avg(sample_length) AS length, avg(ir_size) AS ir FROM samples").to_pylist()[0]
        shard_bytes = int(catalog.query("SELECT sum(bytes) AS b FROM shards").to_pylist()[0]["b"])
    return row["n"], row["length"], shard_bytes / row["n"], row["ir"]


def samples(dataset: Path) -> list[dict]:
    with Catalog(dataset) as catalog:
        selection = catalog.select()
    return list(SelectionReader(selection, dataset).iter_rows(np.arange(selection.num_rows)))


def per_item_ms(fn, items: list, repeats: int = 5) -> float:
    """Median over ``repeats`` passes of the mean ms per item (CPU time: the machine is shared)."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        for item in items:
            fn(item)
        times.append((time.process_time() - started) / len(items) * 1000)
    return statistics.median(times)


def gzip_bytes(npy: bytes, level: int, strategy: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31, 8, strategy)
    return compressor.compress(npy) + compressor.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=300, help="frames per node (2 nodes)")
    parser.add_argument("--workers", type=int, default=1, help="ingest workers for the two builds")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()

    root = OUT / f"ir-encoding-{args.frames}"
    raw = root / "raw"
    if not (raw / "truth.parquet").exists():
        shutil.rmtree(raw, ignore_errors=True)
        synthesize(raw, SynthConfig(nodes=2, frames=args.frames, seed=3, scale=0.1), progress=False)
    old_dataset = build(raw, root / "dataset-npy", IR_MEMBER, args.workers)
    new_dataset = build(raw, root / "dataset-npy-gz", IR_GZ_MEMBER, args.workers)

    n_old, length_old, shard_old, ir_old = sizes(old_dataset)
    n_new, length_new, shard_new, ir_new = sizes(new_dataset)
    assert n_old == n_new > 0

    old, new = samples(old_dataset), samples(new_dataset)
    assert all(IR_MEMBER in s for s in old) and all(IR_GZ_MEMBER in s for s in new)
    frames = [ir_celsius(s) for s in old]
    for a, b in zip(frames, new):
        assert np.array_equal(a, ir_celsius(b), equal_nan=True)  # lossless

    npy_load = per_item_ms(lambda s: np.load(io.BytesIO(s[IR_MEMBER]), allow_pickle=False), old)
    gz_decode = per_item_ms(ir_celsius, new)
    npy_encode = per_item_ms(encode_npy, frames)
    gz_encode = per_item_ms(encode_ir, frames)

    # The levels and strategies, on the same frames: IR bytes, and a whole sample with that IR member.
    npys = [encode_npy(f) for f in frames]
    npy_total = sum(map(len, npys))
    rest = length_old - member_span(int(ir_old))  # a sample's bytes other than its IR member (header + data)
    sweep = []
    for name, level in SWEEP:
        started = time.process_time()
        packed = [gzip_bytes(b, level, STRATEGIES[name]) for b in npys]
        ms = (time.process_time() - started) / len(npys) * 1000
        ratio = sum(map(len, packed)) / npy_total
        sample_ratio = (rest + statistics.fmean(member_span(len(p)) for p in packed)) / length_old
        chosen = " (chosen)" if (name, level) == ("default", IR_GZIP_LEVEL) else ""
        sweep.append(f"{name} {level}{chosen}: IR {ratio:.3f}, sample {sample_ratio:.3f}, {ms:.1f} ms")

    ratio = length_new / length_old
    lines = [
        f"dataset: {n_new} samples (2 nodes x {args.frames} frames, synth scale 0.1: 672x504 JPEG q90 + 336x252 "
        "float32 IR), built twice from the same RAW",
        f"bytes per sample: {length_old / 1e3:.1f} kB with ir.npy -> {length_new / 1e3:.1f} kB with ir.npy.gz "
        f"(gzip level {IR_GZIP_LEVEL}) = {ratio:.3f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'});"
        " "
        f"shard bytes per sample {shard_old / 1e3:.1f} -> {shard_new / 1e3:.1f} kB = {shard_new / shard_old:.3f}x; "
        f"IR member {ir_old / 1e3:.1f} -> {ir_new / 1e3:.1f} kB = {ir_new / ir_old:.3f}x",
        f"IR decode per sample (in memory, CPU time): np.load of ir.npy {npy_load:.2f} ms, ir_celsius of ir.npy.gz "
        f"{gz_decode:.2f} ms (+{gz_decode - npy_load:.2f} ms); values identical",
        f"IR encode per sample (ingest's cost): .npy {npy_encode:.2f} ms, .npy.gz {gz_encode:.2f} ms "
        f"(+{gz_encode - npy_encode:.2f} ms a frame)",
        "zlib (wbits 31, memLevel 8) on these frames, IR bytes / .npy bytes, sample bytes / old sample, encode ms: "
        + "; ".join(sweep),
    ]
    if args.no_record:
        print("\n".join(lines))
    else:
        record("bench/ir_encoding.py", lines)


if __name__ == "__main__":
    main()
