"""Parse the Mobotix ``*.thermal.celsius*.csv`` (sage-format.md §2) into float32 °C, strictly and fast.

The layout is 7 ``key;value`` header lines, one empty line, then ``height`` rows of ``width`` values
separated by ``;`` (row 0 = top of the image). Values are parsed as float64 and cast to float32, which is
exactly what ``np.float32(text)`` gives for each value. Parsing goes through Arrow's string-to-double cast, the
fastest of the parsers compared (bench/RESULTS.md); only a file that fails is walked value by value, to say where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ThermalCSVError", "ThermalFrame", "parse_celsius_csv", "check_celsius_values", "HEADER_KEYS"]

HEADER_KEYS = ("sensor", "bit depth", "width", "height", "resolution", "advanced radiometry support", "unit")
_CELSIUS_UNIT = "degrees Celsius"
_NUMBER_RE = re.compile(r"^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)$", re.IGNORECASE)


class ThermalCSVError(ValueError):
    """A celsius CSV that cannot be used; ``reason`` is a catalog reject reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ThermalFrame:
    header: dict[str, str]
    celsius: np.ndarray  # float32, shape (height, width), row 0 = top

    @property
    def sensor_size(self) -> tuple[int, int]:
        """(width, height) of the thermal grid."""
        return self.celsius.shape[1], self.celsius.shape[0]


def _parse_header(lines: list[bytes]) -> tuple[dict[str, str], int, int]:
    header: dict[str, str] = {}
    for number, (line, key) in enumerate(zip(lines, HEADER_KEYS), start=1):
        text = line.decode("utf-8", errors="replace")
        found_key, sep, value = text.partition(";")
        if not sep or found_key != key:
            raise ThermalCSVError("bad_csv_header", f"line {number} is {text[:60]!r}, expected '{key};...'")
        header[key] = value
    if len(lines) < len(HEADER_KEYS) + 1:
        raise ThermalCSVError("bad_csv_header", f"only {len(lines)} lines, expected 8 header lines and data")
    if lines[7].strip():
        raise ThermalCSVError("bad_csv_header", f"line 8 is {lines[7][:60]!r}, expected an empty line")
    if header["unit"] != _CELSIUS_UNIT:
        raise ThermalCSVError("bad_csv_header", f"unit is {header['unit']!r}, expected {_CELSIUS_UNIT!r}")
    try:
        width, height = int(header["width"]), int(header["height"])
    except ValueError:
        raise ThermalCSVError(
            "bad_csv_header", f"width/height {header['width']!r}x{header['height']!r} are not integers"
        ) from None
    if width <= 0 or height <= 0:
        raise ThermalCSVError("bad_csv_header", f"width/height {width}x{height} must be positive")
    return header, width, height


def _locate_non_numeric(rows: list[bytes]) -> str:
    for row_index, row in enumerate(rows):
        for col_index, token in enumerate(row.split(b";")):
            text = token.decode("utf-8", errors="replace")
            if not _NUMBER_RE.match(text):
                return f"row {row_index}, column {col_index}: {text[:40]!r} is not a number"
    return "a value could not be parsed as a number"


def parse_celsius_csv(data: bytes) -> ThermalFrame:
    """Parse a celsius CSV; raises ThermalCSVError(reason in bad_csv_header, bad_csv_shape, non_numeric)."""
    if not data.strip():
        raise ThermalCSVError("bad_csv_header", "empty file")
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    lines = data.split(b"\n", 8)
    header, width, height = _parse_header(lines[:8])
    body = lines[8] if len(lines) > 8 else b""
    rows = body.split(b"\n")
    if rows and rows[-1] == b"":
        rows.pop()
    if len(rows) != height:
        raise ThermalCSVError("bad_csv_shape", f"{len(rows)} data rows, header says height {height}")
    separators = width - 1
    for row_index, row in enumerate(rows):
        if row.count(b";") != separators:
            raise ThermalCSVError(
                "bad_csv_shape", f"row {row_index} has {row.count(b';') + 1} values, header says width {width}"
            )
    joined = b";".join(rows)
    try:
        text = joined.decode("ascii")
        tokens = pc.split_pattern(pa.array([text], type=pa.string()), ";").flatten()
        values = pc.cast(tokens, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        raise ThermalCSVError("non_numeric", _locate_non_numeric(rows)) from None
    celsius = values.astype(np.float32).reshape(height, width)
    return ThermalFrame(header=header, celsius=celsius)


def check_celsius_values(
    celsius: np.ndarray, min_celsius: float, max_celsius: float, max_nan_fraction: float
) -> ThermalCSVError | None:
    """The value checks of a parsed frame: out_of_range (finite or infinite) and too_many_nan."""
    nan_mask = np.isnan(celsius)
    nan_fraction = float(nan_mask.mean())
    if nan_fraction > max_nan_fraction:
        return ThermalCSVError(
            "too_many_nan", f"{nan_fraction:.1%} of pixels are NaN (limit {max_nan_fraction:.1%})"
        )
    with np.errstate(invalid="ignore"):
        bad = ~nan_mask & ((celsius < min_celsius) | (celsius > max_celsius))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        return ThermalCSVError(
            "out_of_range",
            f"{int(bad.sum())} value(s) outside [{min_celsius:g}, {max_celsius:g}] °C, "
            f"first {float(celsius[row, col]):g} at row {row}, column {col}",
        )
    return None
