"""Where a node was at capture time, and what that makes of the clock and the sun (pure, vectorised).

- Locations: ``nodes.csv`` (``vsn,node_id,lat,lon,valid_from,valid_to``), several rows per VSN for its moves.
- Time zone: `timezonefinder` (offline polygon lookup of the IANA zone; no network, maintained, and the
  data ships in the wheel), local time by pandas' DST-aware conversion with the IANA database (`tzdata`).
- Sun: NREL's Solar Position Algorithm as implemented in `pvlib.spa` (the reference implementation, vectorised
  with numpy; pvlib is the maintained PV-modelling library). Elevation is topocentric and refraction-corrected;
  day = elevation > 0°.
- Split: a stable hash of (VSN, UTC date), so near-duplicate frames minutes apart land on the same side and
  adding data never moves a sample.
"""

from __future__ import annotations

import csv
import hashlib
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from catalog.schema import NODES

__all__ = [
    "NodesError",
    "load_nodes_csv",
    "nodes_table",
    "timezone_at",
    "sun_elevation_deg",
    "location_columns",
    "split_for",
    "SPLITS",
]

SPLITS = ("train", "val", "test")


class NodesError(ValueError):
    """A nodes.csv that cannot be used; the message names the file, the row and the problem."""


@lru_cache(maxsize=1)
def _finder():
    from timezonefinder import TimezoneFinder

    return TimezoneFinder()


@lru_cache(maxsize=4096)
def timezone_at(lat: float, lon: float) -> str | None:
    """IANA time zone name at a location (offline), or None at sea / outside every zone polygon."""
    return _finder().timezone_at(lng=lon, lat=lat)


def _parse_time(text: str, where: str) -> pd.Timestamp | None:
    text = text.strip()
    if not text:
        return None
    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError):
        raise NodesError(f"{where}: {text!r} is not an ISO 8601 time") from None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def load_nodes_csv(path: str | Path) -> pa.Table:
    """Read and check a nodes.csv; times without a zone are UTC; an empty valid_to means 'still there'."""
    path = Path(path)
    required = ["vsn", "node_id", "lat", "lon", "valid_from", "valid_to"]
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise NodesError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(required)}")
            rows = list(reader)
    except FileNotFoundError:
        raise NodesError(f"{path}: no such file") from None
    records = []
    for number, row in enumerate(rows, start=2):
        where = f"{path}, line {number}"
        vsn = (row["vsn"] or "").strip()
        if not vsn:
            raise NodesError(f"{where}: empty vsn")
        try:
            lat, lon = float(row["lat"]), float(row["lon"])
        except (TypeError, ValueError):
            raise NodesError(f"{where}: lat/lon {row['lat']!r}, {row['lon']!r} are not numbers") from None
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise NodesError(f"{where}: lat/lon {lat}, {lon} out of range")
        valid_from = _parse_time(row["valid_from"] or "", where)
        valid_to = _parse_time(row["valid_to"] or "", where)
        if valid_from is not None and valid_to is not None and valid_to <= valid_from:
            raise NodesError(f"{where}: valid_to {valid_to} is not after valid_from {valid_from}")
        records.append((vsn, (row["node_id"] or "").strip().lower() or None, lat, lon, valid_from, valid_to, where))
    _check_overlaps(records, path)
    return nodes_table([r[:6] for r in records])


def _check_overlaps(records: list[tuple], path: Path) -> None:
    lo, hi = pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC")
    by_vsn: dict[str, list[tuple]] = {}
    for record in records:
        by_vsn.setdefault(record[0], []).append(record)
    for vsn, periods in by_vsn.items():
        periods.sort(key=lambda r: r[4] if r[4] is not None else lo)
        for before, after in zip(periods, periods[1:]):
            end = before[5] if before[5] is not None else hi
            start = after[4] if after[4] is not None else lo
            if start < end:
                raise NodesError(f"{path}: periods of {vsn} overlap ({before[6]} and {after[6]})")


def nodes_table(rows: list[tuple]) -> pa.Table:
    """Nodes table from (vsn, node_id, lat, lon, valid_from, valid_to) rows, with each period's time zone."""
    columns = list(zip(*rows)) if rows else [[] for _ in range(6)]
    tz = [timezone_at(lat, lon) for lat, lon in zip(columns[2], columns[3])]

    def stamps(values):
        return pa.array([None if v is None else pd.Timestamp(v).to_pydatetime() for v in values], type=NODES.field("valid_from").type)

    return pa.table(
        {
            "vsn": pa.array(columns[0], pa.string()),
            "node_id": pa.array(columns[1], pa.string()),
            "lat": pa.array(columns[2], pa.float64()),
            "lon": pa.array(columns[3], pa.float64()),
            "valid_from": stamps(columns[4]),
            "valid_to": stamps(columns[5]),
            "tz": pa.array(tz, pa.string()),
        },
        schema=NODES,
    )


def sun_elevation_deg(ts_ns: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Apparent (refraction-corrected) topocentric solar elevation in degrees, NREL SPA via pvlib.

    Sea level, 1013.25 hPa, 12 °C, ΔT from pvlib's polynomial for each time. NaN where lat/lon is NaN.
    """
    from pvlib import spa

    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    lat = np.broadcast_to(np.asarray(lat, dtype=np.float64), ts_ns.shape)
    lon = np.broadcast_to(np.asarray(lon, dtype=np.float64), ts_ns.shape)
    out = np.full(ts_ns.shape, np.nan)
    known = np.isfinite(lat) & np.isfinite(lon)
    if not known.any():
        return out
    unixtime = ts_ns[known] / 1e9
    stamps = pd.to_datetime(ts_ns[known], unit="ns")
    delta_t = spa.calculate_deltat(stamps.year.to_numpy(), stamps.month.to_numpy())
    _, _, apparent_elevation, *_ = spa.solar_position_numpy(
        unixtime, lat[known], lon[known], 0.0, 1013.25, 12.0, delta_t, 0.5667, 1
    )
    out[known] = apparent_elevation
    return out


def split_for(vsn: str, utc_date: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """train/val/test from sha256 of ``"<vsn>/<YYYY-MM-DD>"``: stable across runs, machines and versions."""
    digest = hashlib.sha256(f"{vsn}/{utc_date}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return SPLITS[0]
    if u < fractions[0] + fractions[1]:
        return SPLITS[1]
    return SPLITS[2]


def splits(vsn: np.ndarray, ts_ns: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Vectorised split_for: hash each distinct (vsn, date) once."""
    dates = pd.to_datetime(np.asarray(ts_ns, dtype=np.int64), unit="ns").strftime("%Y-%m-%d").to_numpy()
    pairs = pd.DataFrame({"vsn": np.asarray(vsn, dtype=object), "date": dates})
    codes, uniques = pd.factorize(pairs["vsn"] + "/" + pairs["date"])
    labels = np.array([split_for(*u.split("/"), fractions) for u in uniques], dtype=object)
    return labels[codes] if len(codes) else np.array([], dtype=object)


def location_columns(vsn: np.ndarray, ts_ns: np.ndarray, nodes: pa.Table) -> dict[str, np.ndarray]:
    """The LOCATION_COLUMNS for each (vsn, ts_ns), from the node period valid at that instant.

    Returns arrays: lat, lon (NaN if unknown), tz (object, None if unknown), time_local (datetime64[us],
    NaT if unknown), utc_offset_min (float, NaN if unknown), sun_elevation_deg, is_day (object: True/False/None),
    node_id (object, None if nodes.csv has none for the period).
    """
    vsn = np.asarray(vsn, dtype=object)
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    n = len(ts_ns)
    lat = np.full(n, np.nan)
    lon = np.full(n, np.nan)
    tz = np.full(n, None, dtype=object)
    node_id = np.full(n, None, dtype=object)
    matched = np.zeros(n, dtype=bool)
    node_rows = nodes.to_pylist()
    for row in node_rows:
        start = -(2**63) if row["valid_from"] is None else int(pd.Timestamp(row["valid_from"]).value)
        end = 2**63 - 1 if row["valid_to"] is None else int(pd.Timestamp(row["valid_to"]).value)
        mask = (vsn == row["vsn"]) & (ts_ns >= start) & (ts_ns < end) & ~matched
        if not mask.any():
            continue
        matched |= mask
        lat[mask], lon[mask] = row["lat"], row["lon"]
        tz[mask] = row["tz"]
        node_id[mask] = row["node_id"]
    time_local = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")
    offset = np.full(n, np.nan)
    for zone in {z for z in tz if z is not None}:
        mask = tz == zone
        utc = pd.to_datetime(ts_ns[mask], unit="ns", utc=True)
        local = utc.tz_convert(zone).tz_localize(None)
        time_local[mask] = local.to_numpy().astype("datetime64[us]")
        offset[mask] = (local - utc.tz_localize(None)).total_seconds().to_numpy() / 60.0
    elevation = sun_elevation_deg(ts_ns, lat, lon)
    is_day = np.full(n, None, dtype=object)
    known = np.isfinite(elevation)
    is_day[known] = elevation[known] > 0
    return {
        "lat": lat,
        "lon": lon,
        "tz": tz,
        "time_local": time_local,
        "utc_offset_min": offset,
        "sun_elevation_deg": elevation,
        "is_day": is_day,
        "node_id": node_id,
    }


def empty_nodes() -> pa.Table:
    return NODES.empty_table()


def _finite_or_none(values: np.ndarray) -> list:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in values]
