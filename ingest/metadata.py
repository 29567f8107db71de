"""Upload records from sage_data_client query results (RAW/metadata/*.csv | *.ndjson[.gz] | *.parquet).

The same DataFrame in three forms: ``df.to_csv()`` (with or without its unnamed index column), the data
API's NDJSON response (read with ``sage_data_client.load``), or Parquet (what ``ingest download`` writes).
Only ``name == "upload"`` rows with a ``meta.filename`` describe files; other measurements are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["UploadRecord", "MetadataError", "read_metadata_frame", "upload_records", "read_upload_records", "METADATA_SUFFIXES", "QUERY_RECORD_SUFFIX", "text_or_none", "column_values"]

METADATA_SUFFIXES = (".csv", ".ndjson", ".ndjson.gz", ".json", ".json.gz", ".parquet")
# What `ingest download` writes beside its Parquet: the query that produced it (not a query result).
QUERY_RECORD_SUFFIX = ".query.json"


class MetadataError(ValueError):
    """A metadata file that cannot be read as a sage_data_client result."""


@dataclass(frozen=True, slots=True)  # one per upload a RAW has ever had: no __dict__ each
class UploadRecord:
    vsn: str
    ts_ns: int
    filename: str
    position_label: str | None  # meta.position as published (a number or a direction label), None if absent
    node_id: str | None
    plugin: str | None
    source: str  # metadata file it came from (relative to RAW)


def read_metadata_frame(path: Path) -> pd.DataFrame:
    """The sage_data_client DataFrame stored at ``path``; raises MetadataError naming the file."""
    name = path.name.lower()
    try:
        if name.endswith((".ndjson", ".ndjson.gz", ".json", ".json.gz")):
            import sage_data_client

            frame = sage_data_client.load(path)
        elif name.endswith(".parquet"):
            frame = pd.read_parquet(path)
        elif name.endswith(".csv"):
            # pandas' own reader, not Arrow's (4x faster): Arrow takes a quote left open by a truncated download
            # as a value running to the end of the file, where this reader fails and the file is rejected.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            first = frame.columns[0] if len(frame.columns) else ""
            if first == "" or str(first).startswith("Unnamed"):
                frame = frame.drop(columns=first)  # the index column df.to_csv() writes
        else:
            raise MetadataError(f"{path}: not a metadata file (expected one of {', '.join(METADATA_SUFFIXES)})")
    except MetadataError:
        raise
    except Exception as exc:  # pandas/json raise many types for a damaged file; all mean the same here
        raise MetadataError(f"{path}: cannot read as a sage_data_client result: {exc}") from None
    missing = [c for c in ("timestamp", "name") if c not in frame.columns]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {', '.join(missing)}; columns are {list(frame.columns)}")
    return frame


def text_or_none(value: object) -> str | None:
    """A metadata cell as stripped text, or None for NaN, None and empty cells."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None


def column_values(frame: pd.DataFrame, name: str) -> list:
    """A column as a list, or Nones when the query result has no such column (meta keys vary by plugin)."""
    return frame[name].tolist() if name in frame.columns else [None] * len(frame)


def _texts(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A column as stripped text (None for NaN, None and empty cells, as :func:`text_or_none`), all rows at once."""
    if name not in frame.columns:
        return np.full(len(frame), None, dtype=object)
    text = frame[name].astype("string").str.strip()
    return text.where(text != "").to_numpy(dtype=object, na_value=None)


def upload_records(frame: pd.DataFrame, source: str) -> list[UploadRecord]:
    """Upload rows of a metadata frame as records; rows without a VSN or file name are skipped."""
    return read_upload_records(frame, source)[0]


def read_upload_records(
    frame: pd.DataFrame, source: str, timestamps: np.ndarray | None = None, keep_name: Callable[[str], bool] | None = None,
) -> tuple[list[UploadRecord], int]:
    """(records, how many the frame holds): records only of uploads at ``timestamps`` (int64 ns) and with a file
    name ``keep_name`` accepts, when given, so a run that plans a few new frames does not build an object for every
    upload a RAW has ever had."""
    if "meta.filename" not in frame.columns or len(frame) == 0:
        return [], 0
    uploads = frame[frame["name"].astype(str) == "upload"]
    if len(uploads) == 0:
        return [], 0
    try:
        stamps = pd.to_datetime(uploads["timestamp"], utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise MetadataError(f"{source}: unreadable timestamps: {exc}") from None
    # pandas 3 parses whole-second stamps to datetime64[us]; the join key is integer nanoseconds.
    ts_ns = stamps.dt.as_unit("ns").astype("int64").to_numpy()
    vsn, filename = _texts(uploads, "meta.vsn"), _texts(uploads, "meta.filename")
    present = (vsn != None) & (filename != None)  # noqa: E711 - elementwise on object arrays
    wanted = present if timestamps is None else present & np.isin(ts_ns, timestamps)
    rows = np.flatnonzero(wanted)
    if keep_name is not None:
        rows = rows[np.fromiter((keep_name(name) for name in filename[rows]), bool, len(rows))]
    position, node, plugin = (_texts(uploads, c) for c in ("meta.position", "meta.node", "meta.plugin"))
    records = [
        UploadRecord(
            vsn=vsn[i], ts_ns=int(ts_ns[i]), filename=filename[i], position_label=position[i],
            node_id=node[i].lower() if node[i] else None, plugin=plugin[i], source=source,
        )
        for i in rows
    ]
    return records, int(present.sum())
