import io
import math

import numpy as np
import pytest
from PIL import Image

from ingest.config import KONZA_CROP, CropBox, IngestConfig
from ingest.naming import (
    DIRECTION_PRESETS,
    classify_name,
    is_sky_position,
    parse_raw_path,
    position_from_label,
)
from ingest.optical import CorruptJPEGError, crop_optical, crop_optical_pillow, decode_eighths, optical_crop_box
from tests.conftest import fixtures_dir


@pytest.mark.parametrize(
    "name, role, label",
    [
        ("6144x2048.jpg", "rgb", None),
        ("6144x2048_position5.jpg", "rgb", "5"),
        ("6144x2048_positionSES.jpg", "rgb", "SES"),
        ("right_336x252_14bit.thermal.celsius.csv", "thermal", None),
        ("right_336x252_14bit.thermal.celsius_position12.csv", "thermal", "12"),
        ("right_336x252_14bit.thermal.celsius_positionNEG.csv", "thermal", "NEG"),
        ("right_336x252_14bit.thermal.uint_position0.csv", "other", "0"),
        ("right_336x252_14bit.thermal_position0.raw", "other", "0"),
        ("right_336x252_14bit.thermal.celsius_positionSES.nc", "other", "SES"),
        ("right_336x252_14bit.thermal.celsius_plot.jpg", "other", None),
        ("right_336x252_14bit.thermal.celsius_plot_positionSES.jpg", "other", "SES"),
        ("6144x2048_2024-08-19T120000_Pt1-SS-S10xD100ms_Img0.jpg", "other", None),
    ],
)
def test_classify_name(name, role, label):
    result = classify_name(name)
    assert result.role == role
    if role != "other":
        assert result.position_label == label


def test_real_upload_names_from_the_v017_metadata():
    import pandas as pd

    names = pd.read_csv(fixtures_dir() / "konza-notebook_V017_mobotix-scan_upload_meta_EXTRACTED.csv")["meta.filename"]
    roles = [classify_name(n).role for n in names]
    assert roles.count("rgb") == 12 and roles.count("thermal") == 12 and roles.count("other") == 24


def test_direction_table_and_sky():
    assert DIRECTION_PRESETS["SS"] == 1 and DIRECTION_PRESETS["SWS"] == 5 and DIRECTION_PRESETS["SES"] == 29
    assert DIRECTION_PRESETS["SEG"] == 32 and DIRECTION_PRESETS["NEG"] == 24 and len(DIRECTION_PRESETS) == 32
    assert position_from_label("17") == 17 and position_from_label("ses") == 29 and position_from_label(None) is None
    with pytest.raises(ValueError):
        position_from_label("XYZ")
    assert [is_sky_position(p) for p in (1, 5, 29, 2, 32, 0, None)] == [True, True, True, False, False, None, None]


def test_parse_raw_path():
    parsed = parse_raw_path("W056/1685708796600423152-6144x2048_position5.jpg")
    assert (parsed.vsn, parsed.ts_ns, parsed.filename) == ("W056", 1685708796600423152, "6144x2048_position5.jpg")
    assert parse_raw_path("metadata/uploads.csv") is None
    assert parse_raw_path("W056/notes.txt") is None
    assert parse_raw_path("nodes.csv") is None
    assert parse_raw_path("W056/sub/1685708796600423152-x.jpg") is None


def test_crop_geometry():
    assert optical_crop_box(6144, 2048, KONZA_CROP) == pytest.approx((685, 215, 3072 - 445, 2048 - 240))
    # 1942x1593 box -> 672x504 output: 3/8-scale decoding is enough (728x597), 2/8 is not
    assert decode_eighths(1942, 1593, 672, 504) == 3
    assert decode_eighths(1942, 1593, 200, 150) == 1
    assert decode_eighths(300, 200, 672, 504) == 8
    assert IngestConfig().rgb_output_size(336, 252) == (672, 504)
    with pytest.raises(ValueError):
        CropBox(left=0.6, right=0.5)


def _jpeg(width: int, height: int) -> bytes:
    # Left half red, right half blue: a crop that leaks the false-colour half would show blue.
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2, 0] = 200
    array[:, width // 2 :, 2] = 200
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_crop_reads_size_from_the_image_and_stays_in_the_optical_half():
    for width, height in ((6144, 2048), (1228, 410), (768, 256)):
        result = crop_optical(_jpeg(width, height), KONZA_CROP, (672, 504))
        assert result.source_size == (width, height) and result.image.size == (672, 504)
        pixels = np.asarray(result.image)
        assert pixels[..., 0].mean() > 180 and pixels[..., 2].max() < 40
    assert crop_optical(_jpeg(6144, 2048), KONZA_CROP, (672, 504)).decode_scale == 0.375
    assert crop_optical_pillow(_jpeg(6144, 2048), KONZA_CROP, (672, 504)).decode_scale == 0.5


def _noise_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """Smooth random blotches (a picture's frequencies, not pixel noise, which DCT scaling rightly changes)."""
    coarse = (np.random.default_rng(seed).random((height // 16, width // 16, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("resample", ["bicubic", "lanczos", "bilinear"])
@pytest.mark.parametrize("out_size", [(672, 504), (128, 96), (40, 30)])
def test_crop_from_the_box_and_its_margin_equals_a_resize_of_the_whole_decoded_frame(resample, out_size):
    import simplejpeg

    from ingest.optical import _RESAMPLE

    data = _noise_jpeg(3072, 1024)
    result = crop_optical(data, KONZA_CROP, out_size, resample)
    eighths = round(result.decode_scale * 8)
    whole = simplejpeg.decode_jpeg(data, min_width=math.ceil(3072 * eighths / 8), min_height=math.ceil(1024 * eighths / 8))
    sx, sy = whole.shape[1] / 3072, whole.shape[0] / 1024
    left, top, right, bottom = result.box
    expected = Image.fromarray(whole).resize(out_size, _RESAMPLE[resample], box=(left * sx, top * sy, right * sx, bottom * sy))
    assert np.array_equal(np.asarray(result.image), np.asarray(expected))
    # and close to Pillow's decode at the power of two above it (DCT scaling differs, the picture does not)
    pillow = crop_optical_pillow(data, KONZA_CROP, out_size, resample)
    assert pillow.decode_scale >= result.decode_scale
    assert np.abs(np.asarray(pillow.image, np.int16) - np.asarray(result.image, np.int16)).mean() < 4


def test_a_chosen_decode_scale_must_cover_the_output():
    data = _noise_jpeg(1228, 410)
    assert crop_optical(data, KONZA_CROP, (128, 96), eighths=4).decode_scale == 0.5
    with pytest.raises(ValueError, match="does not cover"):
        crop_optical(data, KONZA_CROP, (128, 96), eighths=2)


def test_jpeg_that_libjpeg_turbo_rejects_strictly_is_decoded_by_pillow():
    # A restart marker in the middle of the scan: libjpeg-turbo warns ("premature end of data segment"), which
    # simplejpeg's strict mode raises; Pillow decodes it as it always did, so the file is still a sample.
    data = _noise_jpeg(1228, 410)
    damaged = data[: len(data) // 2] + b"\xff\xd0" + data[len(data) // 2 :]
    result = crop_optical(damaged, KONZA_CROP, (128, 96))
    assert result.decode_scale == 0.5 and result.image.size == (128, 96)  # Pillow's 1/2, not 3/8


@pytest.mark.parametrize(
    "data, message",
    [(b"", "empty"), (b"<html>403</html>", "not a JPEG"), (b"\x89PNG\r\n\x1a\n", "not a JPEG")],
)
def test_corrupt_jpegs(data, message):
    with pytest.raises(CorruptJPEGError, match=message):
        crop_optical(data, KONZA_CROP, (672, 504))


def test_truncated_jpeg():
    data = _jpeg(1228, 410)
    with pytest.raises(CorruptJPEGError, match="truncated|cannot decode"):
        crop_optical(data[: len(data) // 3], KONZA_CROP, (64, 48))


def test_real_mobotix_jpeg_crops():
    data = (fixtures_dir() / "plugin-mobotix-sampler_ecr-icon_M16TB-R.jpg").read_bytes()
    result = crop_optical(data, KONZA_CROP, (64, 48))
    assert result.source_size == (350, 305) and result.image.size == (64, 48)


def test_workers_keep_the_memory_they_free():
    """A fresh process: Pillow's default frees image blocks at once; a worker keeps 8 for reuse."""
    import subprocess
    import sys

    code = ("from PIL import Image; from ingest.process import keep_freed_memory; "
            "before = Image.core.get_blocks_max(); keep_freed_memory(); keep_freed_memory(); "
            "print(before, Image.core.get_blocks_max())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "8"]
