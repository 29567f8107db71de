"""Arrow schemas of the catalog tables (DESIGN.md "Catalog"): the single definition writers and readers share."""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "SAMPLES",
    "FILES",
    "SHARDS",
    "RUNS",
    "NODES",
    "LOCATION_COLUMNS",
    "REJECT_REASONS",
    "FILE_STATUSES",
    "FILE_ROLES",
    "TABLES",
]

UTC_TS = pa.timestamp("us", tz="UTC")

# Columns that depend on where a node was at capture time; `catalog set-nodes` recomputes exactly these.
LOCATION_COLUMNS = ("lat", "lon", "tz", "time_local", "utc_offset_min", "sun_elevation_deg", "is_day")

SAMPLES = pa.schema(
    [
        ("key", pa.string()),
        ("vsn", pa.string()),
        ("node_id", pa.string()),
        ("ts_ns", pa.int64()),
        ("time_utc", UTC_TS),
        ("position", pa.int16()),
        ("position_label", pa.string()),
        ("is_sky", pa.bool_()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("sample_offset", pa.int64()),
        ("sample_length", pa.int64()),
        ("ir_member", pa.string()),  # "ir.npy.gz" (gzip of the .npy); "ir.npy" in parts written before 2026-12-05
        ("ir_offset", pa.int64()),
        ("ir_size", pa.int64()),
        ("json_offset", pa.int64()),
        ("json_size", pa.int64()),
        ("rgb_offset", pa.int64()),
        ("rgb_size", pa.int64()),
        ("rgb_width", pa.int32()),
        ("rgb_height", pa.int32()),
        ("ir_width", pa.int32()),
        ("ir_height", pa.int32()),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
        ("decode_scale", pa.float32()),  # the source JPEG was decoded at this fraction of its size (M/8)
        ("ir_min", pa.float32()),
        ("ir_mean", pa.float32()),
        ("ir_max", pa.float32()),
        ("ir_std", pa.float32()),
        ("ir_nan_fraction", pa.float32()),
        ("rgb_mean", pa.float32()),
        ("rgb_file", pa.string()),
        ("thermal_file", pa.string()),
        ("ingest_run", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("tz", pa.string()),
        ("time_local", pa.timestamp("us")),
        ("utc_offset_min", pa.int16()),
        ("sun_elevation_deg", pa.float32()),
        ("is_day", pa.bool_()),
    ]
)

FILES = pa.schema(
    [
        ("path", pa.string()),  # relative to RAW, '/'-separated
        ("bytes", pa.int64()),
        ("vsn", pa.string()),
        ("ts_ns", pa.int64()),
        ("role", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("key", pa.string()),
        ("ingest_run", pa.string()),
    ]
)

SHARDS = pa.schema(
    [
        ("name", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("n_samples", pa.int32()),
        ("first_key", pa.string()),
        ("last_key", pa.string()),
        ("ingest_run", pa.string()),
    ]
)

RUNS = pa.schema(
    [
        ("id", pa.string()),
        ("started", UTC_TS),
        ("finished", UTC_TS),
        ("argv", pa.string()),
        ("version", pa.string()),
        ("git_sha", pa.string()),
        ("raw_dir", pa.string()),
        ("config", pa.string()),
        ("files_seen", pa.int64()),
        ("files_new", pa.int64()),
        ("samples_added", pa.int64()),
        ("files_rejected", pa.int64()),
        ("files_ignored", pa.int64()),
        ("shards_added", pa.int64()),
        ("reason_counts", pa.string()),  # JSON object: reject reason -> number of files
    ]
)

NODES = pa.schema(
    [
        ("vsn", pa.string()),
        ("node_id", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("valid_from", UTC_TS),
        ("valid_to", UTC_TS),
        ("tz", pa.string()),
    ]
)

TABLES = {"samples": SAMPLES, "files": FILES, "shards": SHARDS, "runs": RUNS, "nodes": NODES}

# The fixed vocabulary of reject reasons (DESIGN.md), plus too_many_nan (a sensor that returned mostly NaN).
REJECT_REASONS = (
    "unpaired",
    "position_mismatch",
    "corrupt_jpeg",
    "bad_csv_header",
    "bad_csv_shape",
    "non_numeric",
    "out_of_range",
    "too_many_nan",
    "duplicate",
    "unreadable",
)
FILE_STATUSES = ("sample", "rejected", "ignored")
FILE_ROLES = ("rgb", "thermal", "metadata", "other")
