"""Catalog at scale: derived columns for 1,000,000 samples, and typical DuckDB queries over them.

Rows only (no images): a synthetic 1M-row samples table for 40 nodes over three years, some of which move.
Figures: seconds to compute the location columns (target: seconds, not minutes), to commit and compact the
catalog, to recompute it with `set-nodes`; and each typical filter + group-by query (target < 0.1 s).

    python bench/catalog.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import OUT, median_time, record  # noqa: E402
from catalog.location import nodes_table, splits  # noqa: E402
from catalog.maintain import location_table, set_nodes_locked, write_snapshot  # noqa: E402
from catalog.query import Catalog  # noqa: E402
from catalog.schema import LOCATION_COLUMNS, SAMPLES, SHARDS  # noqa: E402
from catalog.store import DatasetLayout, write_parts  # noqa: E402

QUERIES = {
    "sky frames by node and day/night": "SELECT vsn, is_day, count(*) AS n FROM samples WHERE is_sky GROUP BY ALL",
    "daytime positions 1 and 5 since 2024-03, mean IR by node": (
        "SELECT vsn, position, count(*) AS n, avg(ir_mean) AS ir FROM samples "
        "WHERE is_day AND time_utc >= TIMESTAMP '2024-03-01' AND position IN (1, 5) GROUP BY ALL"),
    "daily counts of one node in local time": (
        "SELECT date_trunc('day', time_local) AS day, count(*) AS n FROM samples WHERE vsn = 'W010' GROUP BY day"),
    "split sizes": "SELECT split, count(*) AS n FROM samples GROUP BY split",
    "night sky, cold IR, train split (selection-like)": (
        "SELECT key, shard, sample_offset FROM samples WHERE is_sky AND NOT is_day AND ir_mean < -20 AND split = 'train'"),
}


def node_rows(rng: np.random.Generator, count: int) -> list[tuple]:
    rows = []
    for i in range(count):
        vsn = f"W{i:03d}"
        lat, lon = float(rng.uniform(25, 48)), float(rng.uniform(-123, -70))
        if i % 8 == 0:  # every eighth node moves once
            move = pd.Timestamp("2023-06-01T00:00:00Z")
            rows.append((vsn, None, lat, lon, None, move))
            rows.append((vsn, None, float(rng.uniform(25, 48)), float(rng.uniform(-123, -70)), move, None))
        else:
            rows.append((vsn, None, lat, lon, None, None))
    return rows


def samples_table(n: int, rng: np.random.Generator) -> pa.Table:
    vsn = np.array([f"W{i:03d}" for i in rng.integers(0, 40, n)], dtype=object)
    start, end = np.datetime64("2022-01-01", "ns").astype(np.int64), np.datetime64("2025-01-01", "ns").astype(np.int64)
    ts = np.sort(rng.integers(start, end, n))
    position = rng.integers(1, 33, n).astype(np.int16)
    keys = np.char.add(np.char.add(vsn.astype(str), "_"), ts.astype(str))
    offsets = (np.arange(n) % 150) * 440_000
    columns = {
        "key": keys, "vsn": vsn, "node_id": None, "ts_ns": ts,
        "time_utc": pa.array(ts // 1000, pa.int64()).cast(pa.timestamp("us")).cast(SAMPLES.field("time_utc").type),
        "position": position, "position_label": position.astype(str), "is_sky": position % 4 == 1,
        "shard": np.array([f"sage-{i:06d}.tar" for i in np.arange(n) // 150], dtype=object),
        "sample_offset": offsets, "sample_length": np.full(n, 440_000), "ir_member": np.full(n, "ir.npy", dtype=object),
        "ir_offset": offsets + 512,
        "ir_size": np.full(n, 338_816), "json_offset": offsets + 339_840, "json_size": np.full(n, 700),
        "rgb_offset": offsets + 341_504, "rgb_size": np.full(n, 90_000), "rgb_width": np.full(n, 672),
        "rgb_height": np.full(n, 504), "ir_width": np.full(n, 336), "ir_height": np.full(n, 252),
        "source_width": np.full(n, 6144), "source_height": np.full(n, 2048), "decode_scale": np.full(n, 0.375),
        "ir_min": rng.normal(-30, 10, n), "ir_mean": rng.normal(-5, 15, n), "ir_max": rng.normal(20, 10, n),
        "ir_std": rng.uniform(1, 20, n), "ir_nan_fraction": np.zeros(n), "rgb_mean": rng.uniform(0, 1, n),
        "rgb_file": None, "thermal_file": None, "ingest_run": np.full(n, "run-000001", dtype=object),
    }
    arrays = {}
    for field in SAMPLES:
        if field.name in LOCATION_COLUMNS or field.name == "split":
            continue
        value = columns[field.name]
        arrays[field.name] = pa.nulls(n, field.type) if value is None else pa.array(value).cast(field.type) \
            if not isinstance(value, (pa.Array, pa.ChunkedArray)) else value
    return pa.table(arrays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    nodes = nodes_table(node_rows(rng, 40))
    base = samples_table(args.rows, rng)
    vsn = base.column("vsn").to_numpy(zero_copy_only=False)
    ts = base.column("ts_ns").to_numpy()

    started = time.perf_counter()
    location = location_table(base.column("key"), vsn, ts, nodes)
    split = splits(vsn, ts, (0.8, 0.1, 0.1))
    derive_s = time.perf_counter() - started
    table = base.append_column("split", pa.array(split.tolist(), pa.string()))
    for name in LOCATION_COLUMNS:
        table = table.append_column(name, location.column(name))
    table = table.select(SAMPLES.names).cast(SAMPLES)

    dataset = OUT / "catalog-1m"
    shutil.rmtree(dataset, ignore_errors=True)
    layout = DatasetLayout(dataset)
    shard_names = sorted(set(table.column("shard").to_pylist()))
    shards = pa.table({"name": shard_names, "sha256": ["0" * 64] * len(shard_names), "bytes": [66_000_000] * len(shard_names),
                       "n_samples": [150] * len(shard_names), "first_key": [""] * len(shard_names),
                       "last_key": [""] * len(shard_names), "ingest_run": ["run-000001"] * len(shard_names)}, schema=SHARDS)
    started = time.perf_counter()
    write_parts(layout.runs_dir / "run-000001", {"samples": table, "shards": shards, "nodes": nodes})
    write_snapshot(layout)
    commit_s = time.perf_counter() - started
    started = time.perf_counter()
    set_nodes_locked(layout, nodes)
    set_nodes_s = time.perf_counter() - started

    lines = [
        f"location columns (tz, local time, NREL SPA sun elevation, day) + split for {args.rows:,} rows: "
        f"{derive_s:.1f} s (target: seconds, not minutes; limit of interest < 60 s)",
        f"commit the run part + compact the catalog: {commit_s:.1f} s; `set-nodes` recompute of every row: {set_nodes_s:.1f} s",
    ]
    with Catalog(dataset) as catalog:
        for name, sql in QUERIES.items():
            catalog.query(sql)  # warm: the first query reads the Parquet footer
            seconds = median_time(lambda sql=sql: catalog.query(sql), repeats=5)
            lines.append(f"query '{name}': {seconds * 1000:.0f} ms (target < 100 ms)")
        seconds = median_time(lambda: catalog.select("is_sky AND is_day", split="train"), repeats=5)
        rows = catalog.select("is_sky AND is_day", split="train").num_rows
        lines.append(f"catalog select 'is_sky AND is_day' --split train ({rows:,} rows, with shard join): "
                     f"{seconds * 1000:.0f} ms (target < 100 ms)")
    record("bench/catalog.py", lines)
    shutil.rmtree(dataset, ignore_errors=True)


if __name__ == "__main__":
    main()
