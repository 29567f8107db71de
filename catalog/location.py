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
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from timezonefinder import TimezoneFinder

from catalog.schema import NODES

__all__ = [
    "NodesError",
    "load_nodes_csv",
    "nodes_table",
    "timezone_at",
    "sun_elevation_deg",
    "location_columns",
    "node_periods",
    "split_for",
    "SPLITS",
]

SPLITS = ("train", "val", "test")


class NodesError(ValueError):
    """A nodes.csv that cannot be used; the message names the file, the row and the problem."""


@lru_cache(maxsize=1)
def _finder():
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


@lru_cache(maxsize=1)
def _spa():
    """pvlib's NREL SPA module. pvlib's package __init__ imports all of pvlib (scipy included); spa.py itself needs
    only numpy, so load that one module from the installed pvlib."""
    if "pvlib.spa" in sys.modules:
        return sys.modules["pvlib.spa"]
    spec = importlib.util.find_spec("pvlib")
    origin = Path(spec.origin).parent / "spa.py" if spec and spec.origin else None
    if origin is None or not origin.exists():
        # The whole of pvlib (~0.5 s a process, measured 2026-12-04), only where its spa.py cannot be loaded alone.
        from pvlib import spa

        return spa
    module_spec = importlib.util.spec_from_file_location("pvlib_spa_standalone", origin)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _time_terms(spa, unixtime: np.ndarray) -> tuple[np.ndarray, ...]:
    """SPA's time-only terms: earth radius vector R, sun right ascension and declination, nutation of sidereal time."""
    stamps = pd.to_datetime(unixtime, unit="s")
    delta_t = spa.calculate_deltat(stamps.year.to_numpy(), stamps.month.to_numpy())
    jd = spa.julian_day(unixtime)
    jde = spa.julian_ephemeris_day(jd, delta_t)
    jce = spa.julian_ephemeris_century(jde)
    jme = spa.julian_ephemeris_millennium(jce)
    radius = spa.heliocentric_radius_vector(jme)
    theta = spa.geocentric_longitude(spa.heliocentric_longitude(jme))
    beta = spa.geocentric_latitude(spa.heliocentric_latitude(jme))
    x = [f(jce) for f in (spa.mean_elongation, spa.mean_anomaly_sun, spa.mean_anomaly_moon,
                          spa.moon_argument_latitude, spa.moon_ascending_longitude)]
    nutation = np.empty((2, len(jce)))
    spa.longitude_obliquity_nutation(jce, *x, nutation)
    delta_psi, delta_epsilon = nutation
    epsilon = spa.true_ecliptic_obliquity(spa.mean_ecliptic_obliquity(jme), delta_epsilon)
    lamd = spa.apparent_sun_longitude(theta, delta_psi, spa.aberration_correction(radius))
    alpha = spa.geocentric_sun_right_ascension(lamd, epsilon, beta)
    delta = spa.geocentric_sun_declination(lamd, epsilon, beta)
    sidereal_nutation = spa.apparent_sidereal_time(0.0, delta_psi, epsilon)
    return radius, alpha, delta, sidereal_nutation


_GRID_S = 3600.0  # time-only SPA terms are evaluated hourly and interpolated (error < 1e-5 degree, tested)


def sun_elevation_deg(ts_ns: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Apparent (refraction-corrected) topocentric solar elevation in degrees: NREL SPA, pvlib's implementation.

    Sea level, 1013.25 hPa, 12 °C, pvlib's ΔT for each month. NaN where lat/lon is NaN. The expensive,
    location-free part of SPA (the heliocentric series and nutation, about 90% of the work) changes slowly, so
    for large inputs it is evaluated on an hourly grid and interpolated; sidereal time and everything that
    depends on the location are computed exactly for every row.
    """
    spa = _spa()
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    lat = np.broadcast_to(np.asarray(lat, dtype=np.float64), ts_ns.shape)
    lon = np.broadcast_to(np.asarray(lon, dtype=np.float64), ts_ns.shape)
    out = np.full(ts_ns.shape, np.nan)
    known = np.isfinite(lat) & np.isfinite(lon)
    if not known.any():
        return out
    unixtime = ts_ns[known] / 1e9
    lat_k, lon_k = lat[known], lon[known]
    first, last = np.floor(unixtime.min() / _GRID_S) * _GRID_S, unixtime.max() + _GRID_S
    grid = np.arange(first, last + _GRID_S, _GRID_S)
    if len(grid) * 4 < len(unixtime):
        radius_g, alpha_g, delta_g, nut_g = _time_terms(spa, grid)
        alpha_g = np.degrees(np.unwrap(np.radians(alpha_g)))  # continuous through 360 -> 0
        radius, delta, nut = (np.interp(unixtime, grid, g) for g in (radius_g, delta_g, nut_g))
        alpha = np.interp(unixtime, grid, alpha_g) % 360.0
    else:
        radius, alpha, delta, nut = _time_terms(spa, unixtime)
    jd = spa.julian_day(unixtime)
    v = spa.mean_sidereal_time(jd, spa.julian_century(jd)) + nut
    hour_angle = spa.local_hour_angle(v, lon_k, alpha)
    xi = spa.equatorial_horizontal_parallax(radius)
    u = spa.uterm(lat_k)
    x, y = spa.xterm(u, lat_k, 0.0), spa.yterm(u, lat_k, 0.0)
    delta_alpha = spa.parallax_sun_right_ascension(x, xi, hour_angle, delta)
    delta_prime = spa.topocentric_sun_declination(delta, x, y, xi, delta_alpha, hour_angle)
    h_prime = spa.topocentric_local_hour_angle(hour_angle, delta_alpha)
    e0 = spa.topocentric_elevation_angle_without_atmosphere(lat_k, delta_prime, h_prime)
    out[known] = spa.topocentric_elevation_angle(e0, spa.atmospheric_refraction_correction(1013.25, 12.0, e0, 0.5667))
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


def node_periods(vsn: np.ndarray, ts_ns: np.ndarray, nodes: pa.Table) -> np.ndarray:
    """Row of ``nodes`` valid for each (vsn, ts_ns), or -1 where the node's location is unknown then."""
    vsn = np.asarray(vsn, dtype=object)
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    codes, names = pd.factorize(pd.Series(vsn, dtype=object))
    code_of = {name: i for i, name in enumerate(names)}
    period = np.full(len(ts_ns), -1, dtype=np.int64)
    for index, row in enumerate(nodes.to_pylist()):
        code = code_of.get(row["vsn"])
        if code is None:
            continue
        start = -(2**63) if row["valid_from"] is None else int(pd.Timestamp(row["valid_from"]).value)
        end = 2**63 - 1 if row["valid_to"] is None else int(pd.Timestamp(row["valid_to"]).value)
        period[(codes == code) & (ts_ns >= start) & (ts_ns < end) & (period < 0)] = index
    return period


def location_columns(vsn: np.ndarray, ts_ns: np.ndarray, nodes: pa.Table) -> dict[str, np.ndarray]:
    """The LOCATION_COLUMNS for each (vsn, ts_ns), from the node period valid at that instant.

    Returns arrays: lat, lon (NaN if unknown), tz (object, None if unknown), time_local (datetime64[us],
    NaT if unknown), utc_offset_min (float, NaN if unknown), sun_elevation_deg (NaN if unknown), is_day
    (object: True/False/None), node_id (object, None where nodes.csv has none for the period).
    """
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    n = len(ts_ns)
    rows = nodes.to_pylist()
    period = node_periods(vsn, ts_ns, nodes)
    # One extra "unknown" period at the end, so that period -1 indexes NaN/None.
    lat = np.array([r["lat"] for r in rows] + [np.nan], dtype=np.float64)[period]
    lon = np.array([r["lon"] for r in rows] + [np.nan], dtype=np.float64)[period]
    tz = np.array([r["tz"] for r in rows] + [None], dtype=object)[period]
    node_id = np.array([r["node_id"] for r in rows] + [None], dtype=object)[period]
    time_local = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")
    offset = np.full(n, np.nan)
    zones = {r["tz"] for r in rows if r["tz"]}
    for zone in zones:
        in_zone = np.isin(period, [i for i, r in enumerate(rows) if r["tz"] == zone])
        if not in_zone.any():
            continue
        utc = pd.to_datetime(ts_ns[in_zone], unit="ns", utc=True)
        local = utc.tz_convert(zone).tz_localize(None)
        time_local[in_zone] = local.to_numpy().astype("datetime64[us]")
        offset[in_zone] = (local - utc.tz_localize(None)).total_seconds().to_numpy() / 60.0
    elevation = sun_elevation_deg(ts_ns, lat, lon)
    is_day = np.where(np.isfinite(elevation), elevation > 0, None)
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
