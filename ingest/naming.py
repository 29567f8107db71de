"""What a raw SAGE file is, from its name alone (pure functions; sage-format.md §1 and DESIGN.md "Raw input").

Canonical layout: ``RAW/<VSN>/<ts_ns>-<filename>``; ``RAW/metadata/`` holds sage_data_client query results.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = [
    "DIRECTION_PRESETS",
    "RawName",
    "classify_name",
    "parse_raw_path",
    "position_from_label",
    "is_sky_position",
]

# The scan plugin's direction table (MobotixScan.py calculate_pt): 8 azimuths x 4 tilts (S, H, B, G).
_AZIMUTHS = ("S", "SW", "W", "NW", "N", "NE", "E", "SE")
_TILTS = ("S", "H", "B", "G")
DIRECTION_PRESETS: dict[str, int] = {
    az + tilt: 4 * i + j + 1 for i, az in enumerate(_AZIMUTHS) for j, tilt in enumerate(_TILTS)
}

_RGB_RE = re.compile(r"^(?P<w>\d+)x(?P<h>\d+)(?:_position(?P<pos>\w+?))?\.jpg$")
_CELSIUS_RE = re.compile(r"thermal\.celsius(?:_position(?P<pos>\w+))?\.csv$")
_POSITION_RE = re.compile(r"_position(?P<pos>\w+?)(?=\.|_plot|$)")
_RAW_NAME_RE = re.compile(r"^(?P<ts>\d{15,20})-(?P<filename>.+)$")
_VSN_RE = re.compile(r"^[A-Za-z0-9]{2,8}$")

# Roles of a file in a frame, and the reason an unused file is ignored.
ROLE_RGB = "rgb"
ROLE_THERMAL = "thermal"
ROLE_METADATA = "metadata"
ROLE_OTHER = "other"


def position_from_label(label: str | None) -> int | None:
    """Integer preset (0-32) for a position label: digits as they are, direction labels through the table.

    Returns None for no label, raises ValueError for a label that is neither.
    """
    if label is None or label == "":
        return None
    if label.isdigit():
        return int(label)
    try:
        return DIRECTION_PRESETS[label.upper()]
    except KeyError:
        raise ValueError(f"unknown position label {label!r}") from None


def is_sky_position(position: int | None) -> bool | None:
    """Presets 1, 5, ..., 29 look at the sky; None where the position is unknown or 0 (a fixed camera)."""
    if position is None or position == 0:
        return None
    return position % 4 == 1


@dataclass(frozen=True)
class RawName:
    """What a file name says: its role, the position label and the size written in the name (if any)."""

    role: str  # rgb, thermal or other
    kind: str  # for "other": uint_csv, thermal_raw, netcdf, plot, partial_download, unrecognised
    position_label: str | None
    name_size: tuple[int, int] | None  # (width, height) as written in an RGB name; never trusted for pixels


@functools.lru_cache(maxsize=65536)  # a node uploads the same few dozen names (per position and kind) every scan
def classify_name(filename: str) -> RawName:
    """Role of a raw file from its uploaded name (``meta.filename``, without the ts prefix)."""
    if filename.endswith(".part"):
        return RawName(ROLE_OTHER, "partial_download", None, None)
    position = _POSITION_RE.search(filename)
    label = position.group("pos") if position else None
    if filename.endswith(".jpg") and "_plot" in filename:  # matplotlib plots of later plugin versions
        return RawName(ROLE_OTHER, "plot", label, None)
    rgb = _RGB_RE.match(filename)
    if rgb:
        return RawName(ROLE_RGB, "rgb", rgb.group("pos"), (int(rgb.group("w")), int(rgb.group("h"))))
    celsius = _CELSIUS_RE.search(filename)
    if celsius:
        return RawName(ROLE_THERMAL, "thermal", celsius.group("pos"), None)
    if "thermal.uint" in filename and filename.endswith(".csv"):
        return RawName(ROLE_OTHER, "uint_csv", label, None)
    if filename.endswith(".raw"):
        return RawName(ROLE_OTHER, "thermal_raw", label, None)
    if filename.endswith(".nc"):
        return RawName(ROLE_OTHER, "netcdf", label, None)
    return RawName(ROLE_OTHER, "unrecognised", label, None)


@dataclass(frozen=True, slots=True)
class RawPath:
    """A file's place in the canonical layout: VSN directory, capture timestamp and uploaded name."""

    vsn: str
    ts_ns: int
    filename: str


def parse_raw_path(relpath: str) -> RawPath | None:
    """``<VSN>/<ts_ns>-<filename>`` relative to RAW, or None when the path is outside that layout."""
    parts = relpath.split("/")  # scan_raw's paths are normalised; pathlib would cost 3x this whole function
    if len(parts) != 2 or parts[0] == "metadata" or not _is_vsn(parts[0]):
        return None
    name = parts[1]
    if "\n" in name:  # the regex's own rules for line ends
        match = _RAW_NAME_RE.match(name)
        return RawPath(parts[0], int(match.group("ts")), match.group("filename")) if match else None
    # str.partition instead of that regex: this runs for every raw file, millions in a year of uploads.
    ts, dash, filename = name.partition("-")
    if not dash or not filename or not 15 <= len(ts) <= 20 or not ts.isdecimal():
        return None
    return RawPath(parts[0], int(ts), filename)


@functools.lru_cache(maxsize=4096)  # a RAW has a few VSN directories and millions of files in them
def _is_vsn(name: str) -> bool:
    return _VSN_RE.match(name) is not None
