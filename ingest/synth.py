"""`ingest synth RAW`: a seeded synthetic SAGE download in the exact raw format (sage-format.md).

Writes ``RAW/<VSN>/<ts_ns>-<filename>`` for every file the plugins upload (optical JPEG with the false-colour
thermal half, celsius CSV byte for byte in the plugin's layout, uint CSV, ``.raw``, and in the direction era
``.nc`` and ``_plot.jpg`` decoys), ``RAW/metadata/uploads.csv`` as ``sage_data_client``'s DataFrame
``.to_csv()`` writes it, ``RAW/nodes.csv`` and ``RAW/truth.parquet`` (what was drawn, per frame, and what
ingest must decide about it). ``faults=True`` plants one of each bad case.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from catalog.location import sun_elevation_deg
from ingest.config import KONZA_CROP
from ingest.naming import DIRECTION_PRESETS
from ingest.scene import SceneSpec, false_colour, render_optical, render_thermal
from shards.layout import sample_key

__all__ = ["SynthConfig", "synthesize", "NODE_SITES", "FAULTS", "celsius_csv_bytes", "write_frame_files"]

FULL_SIZE = (6144, 2048)
THERMAL_SIZE = (336, 252)
SAMPLER_END = pd.Timestamp("2023-03-10T00:00:00Z")  # scan plugin appends _position from here (commit 2e77350)
DIRECTION_START = pd.Timestamp("2023-09-15T00:00:00Z")  # direction labels and .nc/_plot decoys from about here
SCAN_ORDER = [i for j in range(4) for i in range(j + 1, 33, 4)]  # the scan plugin's default preset order
LABELS = {number: label for label, number in DIRECTION_PRESETS.items()}
SAMPLER_PLUGIN = "registry.sagecontinuum.org/bhupendraraut/mobotix-sampler:1.22.4.13"
SCAN_PLUGIN = "registry.sagecontinuum.org/bhupendraraut/mobotix-scan:0.23.4.24"

# (vsn, [(lat, lon, valid_from, valid_to)], pan-tilt?) W056 moved from Argonne to San Diego around 2023-05-20.
NODE_SITES = [
    ("W056", [(41.7183, -87.9826, "", "2023-05-20T00:00:00Z"), (32.8850, -117.2400, "2023-05-20T00:00:00Z", "")], True),
    ("W057", [(39.1020, -96.6100, "", "")], True),
    ("V017", [(41.8781, -87.6298, "", "")], False),
]

# fault -> expected (status, reason) of the frame's optical and thermal files
FAULTS = {
    "missing_thermal": ("rejected", "unpaired"),
    "missing_optical": ("rejected", "unpaired"),
    "name_position_race": ("rejected", "position_mismatch"),
    "metadata_position_race": ("rejected", "position_mismatch"),
    "truncated_jpeg": ("rejected", "corrupt_jpeg"),
    "empty_jpeg": ("rejected", "corrupt_jpeg"),
    "html_instead_of_jpeg": ("rejected", "corrupt_jpeg"),
    "csv_wrong_unit": ("rejected", "bad_csv_header"),
    "csv_short_row": ("rejected", "bad_csv_shape"),
    "csv_missing_rows": ("rejected", "bad_csv_shape"),
    "csv_non_numeric": ("rejected", "non_numeric"),
    "csv_out_of_range": ("rejected", "out_of_range"),
    "csv_all_nan": ("rejected", "too_many_nan"),
    "second_optical_jpeg": ("rejected", "duplicate"),
    "few_nan_pixels": ("sample", None),
}


@dataclass(frozen=True)
class SynthConfig:
    nodes: int = 2
    frames: int = 200  # per node
    seed: int = 0
    scale: float = 1.0  # size of the optical JPEG relative to 6144x2048 (its name says the true size)
    faults: bool = False
    start: str = "2023-03-01"
    end: str = "2023-10-31"
    workers: int = 0  # 0: all cores
    jpeg_quality: int = 90
    visit_frames: int = 8  # consecutive presets per visit; shorter visits: more independent times and weather

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.frames < 1:
            raise ValueError("need at least 1 node and 1 frame per node")
        if not 1 <= self.visit_frames <= 32:
            raise ValueError(f"visit_frames must be in 1..32, got {self.visit_frames}")
        if not 0.05 <= self.scale <= 1.0:
            raise ValueError(f"scale must be in [0.05, 1], got {self.scale}")
        if pd.Timestamp(self.end, tz="UTC") <= pd.Timestamp(self.start, tz="UTC"):
            raise ValueError("end must be after start")


@dataclass(frozen=True)
class FrameSpec:
    vsn: str
    node_id: str
    ts_ns: int
    era: str  # sampler, scan, direction
    position: int | None  # preset actually pointed at (None: the sampler era names none)
    tilt: int
    azimuth: int
    lat: float
    lon: float
    loop_num: int
    cloud_fraction: float
    air_celsius: float
    seed: int
    image_size: tuple[int, int] = FULL_SIZE  # (width, height) of the optical JPEG; its name says this size


def image_size(scale: float) -> tuple[int, int]:
    """JPEG size at ``scale`` (even width, so the optical and thermal halves are equal)."""
    return round(FULL_SIZE[0] * scale) // 2 * 2, round(FULL_SIZE[1] * scale)


def _node_list(count: int, seed: int):
    sites = list(NODE_SITES)
    rng = np.random.default_rng(seed + 1000)
    for i in range(len(sites), count):
        lat, lon = rng.uniform(30.0, 47.0), rng.uniform(-120.0, -75.0)
        sites.append((f"W0{0xA0 + i:02X}", [(round(lat, 4), round(lon, 4), "", "")], True))
    return sites[:count]


def _node_id(vsn: str, seed: int) -> str:
    return "0000" + hashlib.sha256(f"{vsn}/{seed}".encode()).hexdigest()[:12]


def _location_at(periods, ts: pd.Timestamp) -> tuple[float, float]:
    for lat, lon, start, end in periods:
        if (not start or ts >= pd.Timestamp(start)) and (not end or ts < pd.Timestamp(end)):
            return lat, lon
    return periods[-1][0], periods[-1][1]


def air_celsius(ts: pd.Timestamp, lon: float) -> float:
    """Air temperature without weather: a seasonal cycle (coldest late January) and a daily one.

    The daily cycle peaks at 15:00 local solar time (air lags the sun); its range, 12 degrees C, is a mid-latitude
    continental one. Without it the sky's thermal image would not change between day and night at all.
    """
    seasonal = 12.0 - 14.0 * np.cos(2 * np.pi * (ts.day_of_year - 20) / 365.25)
    solar_hour = (ts.hour + ts.minute / 60.0 + lon / 15.0) % 24.0
    return float(seasonal + 6.0 * np.cos(2 * np.pi * (solar_hour - 15.0) / 24.0))


def plan_frames(config: SynthConfig) -> list[FrameSpec]:
    """Capture schedule: per node, visits of up to ``visit_frames`` consecutive presets 20 s apart at random times."""
    rng = np.random.default_rng(config.seed)
    start, end = pd.Timestamp(config.start, tz="UTC"), pd.Timestamp(config.end, tz="UTC")
    span_ns = end.value - start.value
    specs: list[FrameSpec] = []
    for vsn, periods, pan_tilt in _node_list(config.nodes, config.seed):
        node_id = _node_id(vsn, config.seed)
        n_visits = -(-config.frames // config.visit_frames)
        visit_starts = np.sort(rng.integers(0, span_ns, n_visits)) + start.value
        # Make sure the eras the format knows about all appear when the range covers them.
        if start < SAMPLER_END < end:
            visit_starts[0] = start.value + rng.integers(0, SAMPLER_END.value - start.value)
        if start < DIRECTION_START < end and n_visits > 2:
            visit_starts[-1] = DIRECTION_START.value + rng.integers(0, end.value - DIRECTION_START.value)
        visit_starts = np.sort(visit_starts)
        made = 0
        for loop, visit_ns in enumerate(visit_starts):
            first = int(rng.integers(0, 32))
            for i in range(min(config.visit_frames, config.frames - made)):
                ts_ns = int(visit_ns) + i * 20_000_000_000 + int(rng.integers(0, 999_999_999))
                ts = pd.Timestamp(ts_ns, unit="ns", tz="UTC")
                era = "sampler" if ts < SAMPLER_END else ("direction" if ts >= DIRECTION_START else "scan")
                preset = SCAN_ORDER[(first + i) % 32] if pan_tilt else 0
                tilt = (preset - 1) % 4 if preset else 1
                azimuth = (preset - 1) // 4 if preset else 0
                if era == "sampler":
                    tilt, azimuth = 1, int(rng.integers(0, 8))
                lat, lon = _location_at(periods, ts)
                air = air_celsius(ts, lon) + rng.normal(0, 3)
                specs.append(
                    FrameSpec(
                        vsn=vsn, node_id=node_id, ts_ns=ts_ns, era=era,
                        position=None if era == "sampler" else preset, tilt=tilt, azimuth=azimuth,
                        lat=lat, lon=lon, loop_num=loop, cloud_fraction=float(rng.beta(0.7, 0.7)),
                        air_celsius=float(air), seed=int(rng.integers(0, 2**31)), image_size=image_size(config.scale),
                    )
                )
                made += 1
    return specs


def _label(spec: FrameSpec) -> str | None:
    if spec.era == "sampler":
        return None
    if spec.era == "direction" and spec.position:
        return LABELS[spec.position]
    return str(spec.position)


def frame_filenames(spec: FrameSpec, position_label: str | None = None) -> dict[str, str]:
    """Uploaded names (``meta.filename``) of every file of a frame, by kind."""
    label = position_label if position_label is not None else _label(spec)
    suffix = "" if label is None else f"_position{label}"
    stem = "right_336x252_14bit.thermal"
    width, height = spec.image_size
    names = {
        "rgb": f"{width}x{height}{suffix}.jpg",  # the true size, as the capture binary names its frames
        "thermal": f"{stem}.celsius{suffix}.csv",
        "uint": f"{stem}.uint{suffix}.csv",
        "raw": f"{stem}{suffix}.raw",
    }
    if spec.era == "direction":
        names["netcdf"] = f"{stem}.celsius{suffix}.nc"
        names["plot"] = f"{stem}.celsius_plot{suffix}.jpg"
    return names


def _header(unit: str, width: int = THERMAL_SIZE[0], height: int = THERMAL_SIZE[1]) -> str:
    return (
        f"sensor;right\nbit depth;14 bit\nwidth;{width}\nheight;{height}\nresolution;high\n"
        f"advanced radiometry support;yes\nunit;{unit}\n\n"
    )


def celsius_csv_bytes(celsius: np.ndarray) -> bytes:
    """The plugin's celsius CSV: 8 header lines, then rows of ``%g``-style values (std::ostream << float)."""
    fmt = "{:.6g}".format
    body = "".join(";".join(map(fmt, row)) + "\n" for row in celsius.astype(np.float32).tolist())
    return (_header("degrees Celsius", celsius.shape[1], celsius.shape[0]) + body).encode()


def _uint_csv_bytes(raw: np.ndarray) -> bytes:
    body = "".join(";".join(map(str, row)) + "\n" for row in raw.tolist())
    return (_header("raw uint16") + body).encode()


def _raw_counts(celsius: np.ndarray) -> np.ndarray:
    kelvin = np.nan_to_num(celsius, nan=-273.15) + 273.15
    return np.clip(np.round((kelvin - 173.15) * 20.0), 0, 16383).astype("<u2")


_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _sensor_noise(height: int, width: int, seed: int) -> np.ndarray:
    """Per-pixel sensor noise, so JPEG sizes and decode costs are like a real camera's, not a cartoon's."""
    tile = _NOISE.get((height, width))
    if tile is None:
        tile = np.random.default_rng(12345).integers(-7, 8, (height, width * 2, 3), dtype=np.int8)
        _NOISE.clear()
        _NOISE[(height, width)] = tile
    shift = seed % width
    return tile[:, shift : shift + width]


def render_frame(spec: FrameSpec, jpeg_quality: int = 90) -> tuple[bytes, np.ndarray]:
    """Optical JPEG bytes (``spec.image_size``) and thermal °C array of a frame."""
    width, height = spec.image_size
    half = width // 2
    scene = SceneSpec(
        vsn=spec.vsn, azimuth=spec.azimuth, tilt=spec.tilt,
        sun_elevation_deg=float(sun_elevation_deg(np.array([spec.ts_ns]), spec.lat, spec.lon)[0]),
        cloud_fraction=spec.cloud_fraction, air_celsius=spec.air_celsius, seed=spec.seed,
    )
    render_h = min(height, 256)  # the scene is smooth; sensor noise is added at full size
    render_w = round(render_h * half / height)
    optical = Image.fromarray(render_optical(scene, (render_h, render_w))).resize((half, height), Image.Resampling.BILINEAR)
    box = (KONZA_CROP.left, KONZA_CROP.top, KONZA_CROP.right, KONZA_CROP.bottom)
    celsius = render_thermal(scene, (THERMAL_SIZE[1], THERMAL_SIZE[0]), box)
    right = Image.fromarray(false_colour(celsius)).resize((width - half, height), Image.Resampling.BILINEAR)
    frame = np.concatenate([np.asarray(optical), np.asarray(right)], axis=1).astype(np.int16)
    frame += _sensor_noise(height, width, spec.seed)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue(), celsius


def write_frame_files(raw_dir: Path, spec: FrameSpec, jpeg_quality: int = 90) -> dict[str, str]:
    """Render a frame and write all its files; returns kind -> path relative to RAW."""
    jpeg, celsius = render_frame(spec, jpeg_quality)
    names = frame_filenames(spec)
    folder = raw_dir / spec.vsn
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: f"{spec.vsn}/{spec.ts_ns}-{name}" for kind, name in names.items()}
    counts = _raw_counts(celsius)
    contents = {
        "rgb": jpeg,
        "thermal": celsius_csv_bytes(celsius),
        "uint": _uint_csv_bytes(counts),
        "raw": counts.tobytes(),
    }
    if "netcdf" in names:
        contents["netcdf"] = b"CDF\x01" + counts[:4].tobytes()  # a decoy: ingest must ignore it, not parse it
        plot = io.BytesIO()
        Image.fromarray(false_colour(celsius)).resize((640, 480)).save(plot, format="JPEG", quality=75)
        contents["plot"] = plot.getvalue()
    for kind, data in contents.items():
        (raw_dir / paths[kind]).write_bytes(data)
    return paths


def _write_job(job: tuple[str, FrameSpec, int]) -> dict[str, str]:
    raw_dir, spec, quality = job
    return write_frame_files(Path(raw_dir), spec, quality)


def _apply_fault(raw_dir: Path, fault: str, spec: FrameSpec, paths: dict[str, str], rng: np.random.Generator) -> dict:
    """Break one frame the way real downloads break; returns overrides for its metadata rows and paths."""
    rgb, thermal = raw_dir / paths["rgb"], raw_dir / paths["thermal"]
    meta: dict = {}
    if fault == "missing_thermal":
        thermal.unlink()
    elif fault == "missing_optical":
        rgb.unlink()
    elif fault == "name_position_race":
        other = SCAN_ORDER[(SCAN_ORDER.index(spec.position) + 1) % 32]
        renamed = frame_filenames(spec, str(other))["thermal"]
        new_path = f"{spec.vsn}/{spec.ts_ns}-{renamed}"
        thermal.rename(raw_dir / new_path)
        paths["thermal"] = new_path
        meta["thermal_filename"] = renamed
    elif fault == "metadata_position_race":
        meta["rgb_meta_position"] = str(SCAN_ORDER[(SCAN_ORDER.index(spec.position) + 1) % 32])
    elif fault == "truncated_jpeg":
        data = rgb.read_bytes()
        rgb.write_bytes(data[: len(data) * 2 // 5])
    elif fault == "empty_jpeg":
        rgb.write_bytes(b"")
    elif fault == "html_instead_of_jpeg":
        rgb.write_bytes(b"<html><head><title>403 Forbidden</title></head><body>403 Forbidden</body></html>\n")
    else:
        lines = thermal.read_bytes().split(b"\n")
        if fault == "csv_wrong_unit":
            lines[6] = b"unit;raw uint16"
        elif fault == "csv_short_row":
            lines[8 + 17] = lines[8 + 17].rsplit(b";", 1)[0]
        elif fault == "csv_missing_rows":
            lines = lines[:-11] + [b""]
        elif fault in ("csv_non_numeric", "csv_out_of_range", "few_nan_pixels", "csv_all_nan"):
            if fault == "csv_all_nan":
                width = int(lines[2].split(b";")[1])
                lines = lines[:8] + [b";".join([b"nan"] * width) for _ in lines[8:-1]] + [b""]
            else:
                hits = {"csv_non_numeric": 1, "csv_out_of_range": 1, "few_nan_pixels": 3}[fault]
                token = {"csv_non_numeric": b"n/a", "csv_out_of_range": b"-273.15", "few_nan_pixels": b"nan"}[fault]
                for _ in range(hits):
                    row = 8 + int(rng.integers(0, THERMAL_SIZE[1]))
                    values = lines[row].split(b";")
                    values[int(rng.integers(0, len(values)))] = token
                    lines[row] = b";".join(values)
        elif fault == "second_optical_jpeg":
            other = SCAN_ORDER[(SCAN_ORDER.index(spec.position) + 4) % 32]
            extra_name = frame_filenames(spec, str(other))["rgb"]
            shutil.copyfile(rgb, raw_dir / spec.vsn / f"{spec.ts_ns}-{extra_name}")
            paths["rgb_extra"] = f"{spec.vsn}/{spec.ts_ns}-{extra_name}"
            meta["extra_rgb_filename"] = extra_name
        thermal.write_bytes(b"\n".join(lines))
    return meta


def _metadata_rows(spec: FrameSpec, paths: dict[str, str], overrides: dict) -> list[dict]:
    names = frame_filenames(spec)
    if "thermal_filename" in overrides:
        names["thermal"] = overrides["thermal_filename"]
    if "extra_rgb_filename" in overrides:
        names["rgb_extra"] = overrides["extra_rgb_filename"]
    rows = []
    host = f"{spec.node_id}.ws-nxcore"
    for kind, filename in names.items():
        row = {
            "timestamp": spec.ts_ns,
            "name": "upload",
            "value": f"https://storage.sagecontinuum.org/api/v1/data/sage/sage-mobotix-scan-0.23.4.24/"
            f"{spec.node_id}/{spec.ts_ns}-{filename}",
            "meta.filename": filename,
            "meta.host": host,
            "meta.job": "sage",
            "meta.loop_num": None if spec.era == "sampler" else str(spec.loop_num),
            "meta.node": spec.node_id,
            "meta.plugin": SAMPLER_PLUGIN if spec.era == "sampler" else SCAN_PLUGIN,
            "meta.position": None if spec.era == "sampler" else _label(spec),
            "meta.task": "mobotix-sampler" if spec.era == "sampler" else (
                "mobotix-scan-direction" if spec.era == "direction" else "mobotix-scan"),
            "meta.vsn": spec.vsn,
            "meta.zone": "core",
        }
        if kind == "rgb" and "rgb_meta_position" in overrides:
            row["meta.position"] = overrides["rgb_meta_position"]
        rows.append(row)
    return rows


def synthesize(raw_dir: str | os.PathLike[str], config: SynthConfig = SynthConfig(), progress: bool = True) -> pa.Table:
    """Write the synthetic download into ``raw_dir``; returns the truth table (also RAW/truth.parquet)."""
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    specs = plan_frames(config)
    workers = config.workers or os.cpu_count() or 1
    jobs = [(str(raw), spec, config.jpeg_quality) for spec in specs]
    bar = tqdm(total=len(jobs), unit="frame", desc="synth", disable=not progress)
    if workers <= 1 or len(jobs) < 8:
        all_paths = []
        for job in jobs:
            all_paths.append(_write_job(job))
            bar.update(1)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            all_paths = []
            for paths in pool.imap(_write_job, jobs, chunksize=2):
                all_paths.append(paths)
                bar.update(1)
    bar.close()

    faults: dict[int, str] = {}
    if config.faults:
        eligible = [i for i, s in enumerate(specs) if s.era == "scan" and s.position]
        if len(eligible) < len(FAULTS):
            raise ValueError(
                f"--faults needs at least {len(FAULTS)} scan-era frames with a position; this plan has "
                f"{len(eligible)} (use more --frames or a wider --start/--end)"
            )
        rng = np.random.default_rng(config.seed + 7)
        chosen = rng.choice(eligible, size=len(FAULTS), replace=False)
        faults = {int(i): name for i, name in zip(chosen, FAULTS)}

    rng = np.random.default_rng(config.seed + 8)
    metadata, truth = [], []
    for i, (spec, paths) in enumerate(zip(specs, all_paths)):
        fault = faults.get(i)
        overrides = _apply_fault(raw, fault, spec, paths, rng) if fault else {}
        metadata += _metadata_rows(spec, paths, overrides)
        status, reason = FAULTS[fault] if fault else ("sample", None)
        elevation = float(sun_elevation_deg(np.array([spec.ts_ns]), spec.lat, spec.lon)[0])
        truth.append(
            {
                "key": sample_key(spec.vsn, spec.ts_ns), "vsn": spec.vsn, "node_id": spec.node_id, "ts_ns": spec.ts_ns,
                "era": spec.era, "position": spec.position, "position_label": _label(spec),
                "scene": ("sky", "horizon", "below", "ground")[spec.tilt], "azimuth": spec.azimuth,
                "cloud_fraction": spec.cloud_fraction, "air_celsius": spec.air_celsius, "lat": spec.lat, "lon": spec.lon,
                "sun_elevation_deg": elevation, "is_day": elevation > 0, "fault": fault,
                "expected_status": status, "expected_reason": reason,
                "rgb_file": paths["rgb"] if (raw / paths["rgb"]).exists() else None,
                "thermal_file": paths["thermal"] if (raw / paths["thermal"]).exists() else None,
            }
        )
    (raw / "metadata").mkdir(exist_ok=True)
    frame = pd.DataFrame(metadata)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="ns", utc=True)
    frame.sort_values(["timestamp", "meta.filename"], kind="stable").reset_index(drop=True).to_csv(
        raw / "metadata" / "uploads.csv"
    )
    if config.faults:
        (raw / specs[0].vsn / "README.txt").write_text("notes a user left beside the downloads\n")
    _write_nodes_csv(raw / "nodes.csv", config)
    table = pa.Table.from_pylist(truth)
    table = table.replace_schema_metadata({b"sagepairs.synth": repr(asdict(config)).encode()})
    pq.write_table(table, raw / "truth.parquet")
    return table


def _write_nodes_csv(path: Path, config: SynthConfig) -> None:
    lines = ["vsn,node_id,lat,lon,valid_from,valid_to"]
    for vsn, periods, _ in _node_list(config.nodes, config.seed):
        for lat, lon, start, end in periods:
            lines.append(f"{vsn},{_node_id(vsn, config.seed)},{lat},{lon},{start},{end}")
    path.write_text("\n".join(lines) + "\n")
