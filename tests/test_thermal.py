import numpy as np
import pytest

from ingest.synth import celsius_csv_bytes
from ingest.thermal import ThermalCSVError, check_celsius_values, parse_celsius_csv


def reference_parse(data: bytes) -> np.ndarray:
    """What the CSV says, value by value, as np.float32(text): the definition of 'exact'."""
    rows = data.decode().split("\n")[8:]
    return np.array([[np.float32(v) for v in row.split(";")] for row in rows if row], dtype=np.float32)


@pytest.fixture()
def celsius():
    rng = np.random.default_rng(0)
    values = rng.normal(5, 30, (252, 336)).astype(np.float32)
    values[0, 0] = 21.0  # integral values print as "21"
    values[1, 1] = 3.0517578125e-05  # exponent form
    values[2, 2] = -43.95
    values[3, 3] = np.nan
    return values


def test_exact_values_and_layout(celsius):
    data = celsius_csv_bytes(celsius)
    lines = data.split(b"\n")
    assert lines[:8] == [b"sensor;right", b"bit depth;14 bit", b"width;336", b"height;252", b"resolution;high",
                         b"advanced radiometry support;yes", b"unit;degrees Celsius", b""]
    assert lines[8].split(b";")[0] == b"21" and b"3.05176e-05" in lines[9] and b"-43.95" in lines[10]
    frame = parse_celsius_csv(data)
    assert frame.celsius.dtype == np.float32 and frame.celsius.shape == (252, 336)
    np.testing.assert_array_equal(frame.celsius, reference_parse(data))
    assert np.isnan(frame.celsius[3, 3])
    assert frame.header["unit"] == "degrees Celsius"


def test_crlf_and_missing_final_newline(celsius):
    data = celsius_csv_bytes(celsius)
    np.testing.assert_array_equal(parse_celsius_csv(data.replace(b"\n", b"\r\n")).celsius, reference_parse(data))
    np.testing.assert_array_equal(parse_celsius_csv(data.rstrip(b"\n")).celsius, reference_parse(data))


def test_shape_comes_from_the_header():
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert parse_celsius_csv(celsius_csv_bytes(small)).celsius.shape == (3, 4)


@pytest.mark.parametrize(
    "mutate, reason, where",
    [
        (lambda b: b"", "bad_csv_header", "empty file"),
        (lambda b: b.replace(b"unit;degrees Celsius", b"unit;raw uint16"), "bad_csv_header", "unit"),
        (lambda b: b.replace(b"sensor;right\n", b""), "bad_csv_header", "line 1"),
        (lambda b: b.replace(b"width;336", b"width;abc"), "bad_csv_header", "not integers"),
        (lambda b: b"\n".join(b.split(b"\n")[:-6]) + b"\n", "bad_csv_shape", "data rows"),
        (lambda b: _edit_row(b, 17, lambda r: r.rsplit(b";", 1)[0]), "bad_csv_shape", "row 17 has 335"),
        (lambda b: _edit_row(b, 3, lambda r: r + b";"), "bad_csv_shape", "row 3 has 337"),
        (lambda b: _edit_row(b, 5, lambda r: b"n/a" + r[r.index(b";"):]), "non_numeric", "row 5, column 0"),
        (lambda b: _edit_row(b, 9, lambda r: r.replace(b";", b"; ", 1)), "non_numeric", "row 9"),
    ],
)
def test_bad_files_say_why_and_where(celsius, mutate, reason, where):
    with pytest.raises(ThermalCSVError) as info:
        parse_celsius_csv(mutate(celsius_csv_bytes(celsius)))
    assert info.value.reason == reason
    assert where in info.value.detail


def _edit_row(data: bytes, row: int, edit) -> bytes:
    lines = data.split(b"\n")
    lines[8 + row] = edit(lines[8 + row])
    return b"\n".join(lines)


def test_value_checks():
    values = np.zeros((4, 4), dtype=np.float32)
    assert check_celsius_values(values, -100, 700, 0.5) is None
    values[2, 1] = 812.5
    problem = check_celsius_values(values, -100, 700, 0.5)
    assert problem.reason == "out_of_range" and "row 2, column 1" in problem.detail and "812.5" in problem.detail
    values[2, 1] = -np.inf
    assert check_celsius_values(values, -100, 700, 0.5).reason == "out_of_range"
    values[:] = np.nan
    values[0, 0] = 1
    assert check_celsius_values(values, -100, 700, 0.5).reason == "too_many_nan"
    values[:3] = 0.0  # 3 NaN rows of 4 ... now 4 of 16 NaN: kept
    assert check_celsius_values(values, -100, 700, 0.5) is None
