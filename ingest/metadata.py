"""Upload records from sage_data_client query results (RAW/metadata/*.csv | *.ndjson[.gz] | *.parquet).

The same DataFrame in three forms: ``df.to_csv()`` (with or without its unnamed index column), the data
API's NDJSON response (read with ``sage_data_client.load``), or Parquet (what ``ingest download`` writes).
Only ``name == "upload"`` rows with a ``meta.filename`` describe files; other measurements are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import sage_data_client

__all__ = ["UploadRecord", "MetadataError", "read_metadata_frame", "upload_records", "read_upload_records", "METADATA_SUFFIXES", "QUERY_RECORD_SUFFIX", "UPLOAD_COLUMNS", "text_or_none", "column_values"]

METADATA_SUFFIXES = (".csv", ".ndjson", ".ndjson.gz", ".json", ".json.gz", ".parquet")
# The columns upload records are made of (see read_upload_records).
UPLOAD_COLUMNS = ("timestamp", "name", "meta.vsn", "meta.filename", "meta.position", "meta.node", "meta.plugin")
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


def read_metadata_frame(path: Path, columns: Collection[str] | None = None) -> pd.DataFrame:
    """The sage_data_client DataFrame stored at ``path``; raises MetadataError naming the file.

    ``columns``: the columns the caller needs (``UPLOAD_COLUMNS`` for upload records); the others are left out,
    above all ``value``, a long URL a row that records never use. Parquet files are read for those columns only; a
    CSV is parsed whole, so that a damaged row still rejects the file.
    """
    name = path.name.lower()
    wanted = None if columns is None else set(columns)
    try:
        if name.endswith((".ndjson", ".ndjson.gz", ".json", ".json.gz")):
            frame = sage_data_client.load(path)
        elif name.endswith(".parquet"):
            if wanted is not None:
                columns = [c for c in pq.read_schema(path).names if c in wanted]
            frame = pd.read_parquet(path, columns=columns)
        elif name.endswith(".csv"):
            # pandas' own reader, not Arrow's (4x faster): Arrow takes a quote left open by a truncated download
            # as a value running to the end of the file, where this reader fails and the file is rejected. Every
            # column, not ``usecols``: with it, pandas stops checking that no row has more fields than the header
            # (an unquoted comma in a URL, two lines glued together), and such a row would be read shifted.
            # dtype object, not str: pandas 3 turns str columns into Arrow strings cell by cell (on bench/plan.py's
            # 457k-row CSV: 1.2 s and a peak of 470 MB as object, 3.2 s and 650 MB as str).
            frame = pd.read_csv(path, dtype=object, keep_default_na=False)
            first = frame.columns[0] if len(frame.columns) else ""
            if _index_column(first):
                frame = frame.drop(columns=first)  # the index column df.to_csv() writes
            if wanted is not None:
                frame = frame[[c for c in frame.columns if c in wanted]]
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


def _index_column(name: object) -> bool:
    """The unnamed index column ``df.to_csv()`` writes first, as pandas names it when it reads the file back."""
    return name == "" or str(name).startswith("Unnamed")


def text_or_none(value: object) -> str | None:
    """A metadata cell as stripped text, or None for NaN, None and empty cells."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None


def column_values(frame: pd.DataFrame, name: str) -> list:
    """A column as a list, or Nones when the query result has no such column (meta keys vary by plugin)."""
    return frame[name].tolist() if name in frame.columns else [None] * len(frame)


def _texts(frame: pd.DataFrame, name: str, rows: np.ndarray, lower: bool = False) -> np.ndarray:
    """A column's cells at ``rows`` as stripped text (None for NaN, None and empty cells, as :func:`text_or_none`;
    lower-cased with ``lower``), as an object array.

    Each distinct value becomes one Python string, shared by every row that holds it: a year of uploads repeats a
    dozen VSNs, node ids and plugins and a few dozen file names hundreds of thousands of times, and a string a cell
    would raise rank 0's peak memory with every record.
    """
    if name not in frame.columns:
        return np.full(len(rows), None, dtype=object)
    codes, distinct = pd.factorize(frame[name], use_na_sentinel=True)
    if all(isinstance(value, str) for value in distinct):
        texts, codes = [text_or_none(value) for value in distinct], codes[rows]
    else:  # numbers or booleans, which a hash takes as one value (1, 1.0 and True; 0.0 and -0.0): cell by cell
        missing = codes[rows] == -1  # NaN, None, pd.NA, NaT
        cells = frame[name].to_numpy(dtype=object)[rows]
        texts = [None if gap else text_or_none(value) for value, gap in zip(cells, missing)]
        codes = np.arange(len(rows))
    if lower:
        texts = [text.lower() if text is not None else None for text in texts]
    values = np.empty(len(texts) + 1, dtype=object)
    values[:-1] = texts  # the last stays None: the code of a missing cell is -1
    return values[codes]


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
    uploads = np.flatnonzero((frame["name"].astype(str) == "upload").to_numpy())
    if len(uploads) == 0:
        return [], 0
    try:
        stamps = pd.to_datetime(frame["timestamp"].iloc[uploads], utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise MetadataError(f"{source}: unreadable timestamps: {exc}") from None
    # pandas 3 parses whole-second stamps to datetime64[us]; the join key is integer nanoseconds.
    ts_ns = stamps.dt.as_unit("ns").astype("int64").to_numpy()
    vsn, filename = _texts(frame, "meta.vsn", uploads), _texts(frame, "meta.filename", uploads)
    present = (vsn != None) & (filename != None)  # noqa: E711 - elementwise on object arrays
    wanted = present if timestamps is None else present & np.isin(ts_ns, timestamps)
    rows = np.flatnonzero(wanted)
    if keep_name is not None:
        rows = rows[np.fromiter((keep_name(name) for name in filename[rows]), bool, len(rows))]
    position, plugin = _texts(frame, "meta.position", uploads), _texts(frame, "meta.plugin", uploads)
    node = _texts(frame, "meta.node", uploads, lower=True)
    records = [
        UploadRecord(vsn=vsn[i], ts_ns=int(ts_ns[i]), filename=filename[i], position_label=position[i],
                     node_id=node[i], plugin=plugin[i], source=source)
        for i in rows
    ]
    return records, int(present.sum())
