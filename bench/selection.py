"""Reading a SQL-selected subset by byte ranges, against stock webdataset scanning every shard.

Dataset: ~1,200 samples built by the real pipeline (synth at small source size: the shard members are
the same size as from full frames: 672x504 JPEG + 336x252 float32). Page cache warm for both readers
(each is run once before timing). Figures: a 10% SQL subset (target >= 8x faster than a stock scan that
filters keys), and a full read (target >= 1.5x faster than stock webdataset), in one run.

    python bench/selection.py [--frames 600]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import median_time, record, synthetic_dataset  # noqa: E402
from catalog.query import Catalog  # noqa: E402
from shards.layout import ir_member_of  # noqa: E402
from shards.reader import read_selection  # noqa: E402


def dataset(frames_per_node: int) -> Path:
    return synthetic_dataset(f"selection-{frames_per_node}", frames_per_node, seed=3)


def drain(iterable) -> int:
    count = 0
    for sample in iterable:
        count += len(sample[ir_member_of(sample)]) > 0
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=600, help="frames per node (2 nodes)")
    args = parser.parse_args()
    root = dataset(args.frames)
    urls = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    with Catalog(root) as catalog:
        subset = catalog.select("hash(key) % 10 = 0")
        everything = catalog.select()
    keys = set(subset.column("key").to_pylist())
    total_mb = sum(Path(u).stat().st_size for u in urls) / 1e6

    def stock_filtered() -> int:
        return drain(wds.WebDataset(urls, shardshuffle=False).select(lambda s: s["__key__"] in keys))

    def stock_all() -> int:
        return drain(wds.WebDataset(urls, shardshuffle=False))

    results = {}
    for name, fn in {
        "subset by byte ranges": lambda: drain(read_selection(subset)),
        "subset by stock scan + key filter": stock_filtered,
        "full read by selection": lambda: drain(read_selection(everything)),
        "full read by stock webdataset": stock_all,
    }.items():
        count = fn()  # warm the page cache and check the count
        results[name] = (median_time(fn, repeats=3), count)
    sub_fast, n_sub = results["subset by byte ranges"]
    sub_slow, n_sub_stock = results["subset by stock scan + key filter"]
    full_fast, n_all = results["full read by selection"]
    full_slow, n_all_stock = results["full read by stock webdataset"]
    assert n_sub == n_sub_stock == len(keys) and n_all == n_all_stock == everything.num_rows
    lines = [
        f"dataset: {everything.num_rows} samples in {len(urls)} shards, {total_mb:.0f} MB (page cache warm)",
        f"10% SQL subset ({n_sub} samples): byte ranges {sub_fast * 1000:.0f} ms vs stock scan + filter "
        f"{sub_slow * 1000:.0f} ms = {sub_slow / sub_fast:.1f}x (target >= 8x)",
        f"full read: selection {full_fast * 1000:.0f} ms ({n_all / full_fast:.0f} samples/s, {total_mb / full_fast:.0f} MB/s) "
        f"vs stock webdataset {full_slow * 1000:.0f} ms ({n_all / full_slow:.0f} samples/s) = "
        f"{full_slow / full_fast:.1f}x (target >= 1.5x)",
    ]
    record("bench/selection.py", lines)


if __name__ == "__main__":
    main()
