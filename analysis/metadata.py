"""Catalog metadata of embedded samples, joined through DuckDB on the sample key, in the embeddings' row order.

Columns: key, vsn, position, is_sky, is_day, split, month (UTC, YYYY-MM), hour_local; and ``cloud_class`` when
the dataset's RAW directory (from the catalog's ``runs`` view) holds the synthetic generator's ``truth.parquet``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

import catalog
from analysis.runs import AnalysisError

__all__ = ["sample_metadata", "truth_path", "CLOUD_CLASSES"]

CLOUD_CLASSES = ("clear", "partly cloudy", "overcast")


def truth_path(dataset: Path | str) -> Path | None:
    """RAW/truth.parquet of the dataset's most recent ingest run, if it exists here (a published dataset has none)."""
    if catalog.is_remote(dataset):
        return None
    with catalog.open(dataset) as cat:
        rows = cat.query("SELECT raw_dir FROM runs ORDER BY id DESC").column("raw_dir").to_pylist()
    for raw in rows:
        if not raw:
            continue
        for candidate in (Path(raw), dataset.parent / Path(raw).name):
            if (candidate / "truth.parquet").exists():
                return candidate / "truth.parquet"
    return None


def sample_metadata(dataset: Path, keys: np.ndarray, cloud_bins: tuple[float, ...] = (0.25, 0.75)):
    """A pandas DataFrame, one row per key in ``keys`` order; a key missing from the catalog is an error."""
    order = pa.table({"i": np.arange(len(keys), dtype=np.int64), "key": pa.array(list(keys), type=pa.string())})
    truth = truth_path(dataset)
    with catalog.open(dataset) as cat:
        cat.con.register("embedded_keys", order)
        cloud = ", t.cloud_fraction" if truth is not None else ""
        join = f" LEFT JOIN read_parquet('{truth}') t ON t.key = k.key" if truth is not None else ""
        table = cat.query(
            "SELECT k.key, s.key IS NOT NULL AS known, s.vsn, s.position, s.is_sky, s.is_day, s.split, "
            "strftime(s.time_utc AT TIME ZONE 'UTC', '%Y-%m') AS month, hour(s.time_local) AS hour_local"
            f"{cloud} FROM embedded_keys k LEFT JOIN samples s ON s.key = k.key{join} ORDER BY k.i"
        )
        cat.con.unregister("embedded_keys")
    frame = table.to_pandas()
    missing = frame.loc[~frame["known"], "key"].tolist()
    if missing:
        raise AnalysisError(f"{dataset}: {len(missing)} embedded key(s) are not in the catalog (e.g. {missing[0]}); "
                            "embed again")
    frame = frame.drop(columns="known")
    if truth is not None:
        fraction = frame.pop("cloud_fraction").to_numpy(dtype=float)
        labels = np.digitize(fraction, cloud_bins)
        names = CLOUD_CLASSES if len(cloud_bins) == 2 else tuple(f"class {i}" for i in range(len(cloud_bins) + 1))
        frame["cloud_class"] = [names[i] if not np.isnan(f) else None for i, f in zip(labels, fraction)]
    return frame
