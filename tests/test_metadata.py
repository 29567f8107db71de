import numpy as np
import pandas as pd
import pytest

from ingest.metadata import UPLOAD_COLUMNS, MetadataError, read_metadata_frame, read_upload_records, upload_records
from tests.conftest import fixtures_dir


def test_real_v017_upload_table():
    frame = read_metadata_frame(fixtures_dir() / "konza-notebook_V017_mobotix-scan_upload_meta_EXTRACTED.csv")
    records = upload_records(frame, "v017.csv")
    assert len(records) == 48
    first = records[0]
    assert (first.vsn, first.ts_ns, first.filename, first.position_label, first.node_id) == (
        "V017", 1685708796600423152, "6144x2048_position0.jpg", "0", "00004cd98fb54735")


def test_real_api_responses_load_and_hold_no_uploads():
    for name in ("sage-data-client_examples_data.ndjson", "sage-data-client_test-data.ndjson.gz"):
        frame = read_metadata_frame(fixtures_dir() / name)
        assert len(frame) > 400 and upload_records(frame, name) == []


def test_to_csv_with_index_and_whole_second_stamps(tmp_path):
    # pandas 3 parses whole-second stamps at microsecond resolution; the join key must still be nanoseconds.
    frame = pd.DataFrame({
        "timestamp": pd.to_datetime([1685708796000000000, 1685708796000000001], unit="ns", utc=True),
        "name": ["upload", "upload"], "value": ["u1", "u2"],
        "meta.filename": ["6144x2048_positionSES.jpg", "x.csv"], "meta.vsn": ["W056", "W056"],
    })
    path = tmp_path / "uploads.csv"
    frame.iloc[:1].to_csv(path)
    records = upload_records(read_metadata_frame(path), "uploads.csv")
    assert [(r.ts_ns, r.position_label, r.node_id) for r in records] == [(1685708796000000000, None, None)]
    frame.to_parquet(tmp_path / "uploads.parquet")
    records = upload_records(read_metadata_frame(tmp_path / "uploads.parquet"), "uploads.parquet")
    assert [r.ts_ns for r in records] == [1685708796000000000, 1685708796000000001]


def test_records_of_the_frames_planned_only():
    frame = read_metadata_frame(fixtures_dir() / "konza-notebook_V017_mobotix-scan_upload_meta_EXTRACTED.csv")
    every = upload_records(frame, "v017.csv")
    wanted_ts = sorted({r.ts_ns for r in every})[:2]
    records, count = read_upload_records(frame, "v017.csv", np.array(wanted_ts, np.int64),
                                         keep_name=lambda name: name.endswith(".jpg"))
    assert count == len(every) == 48  # the file's own count does not depend on what is asked for
    assert records == [r for r in every if r.ts_ns in wanted_ts and r.filename.endswith(".jpg")] and records


def test_blank_and_missing_cells_are_none():
    frame = pd.DataFrame({
        "timestamp": ["2023-06-02T12:26:36Z"] * 4, "name": ["upload"] * 4,
        "meta.vsn": ["W056", None, " W057 ", ""], "meta.filename": ["a.jpg", "b.jpg", " c.jpg", "d.jpg"],
        "meta.position": [5, None, "  ", " 7 "], "meta.node": ["ABCD", None, "", "x"],
    })
    records, count = read_upload_records(frame, "f")
    assert count == 2  # rows without a VSN are not uploads of a frame
    assert [(r.vsn, r.filename, r.position_label, r.node_id) for r in records] == [
        ("W056", "a.jpg", "5", "abcd"), ("W057", "c.jpg", None, None)]


def test_a_quote_left_open_rejects_the_file(tmp_path):
    # A truncated download can end inside a quoted value; reading on to the end of the file would turn the next
    # rows into one record's position.
    path = tmp_path / "uploads.csv"
    path.write_text(
        ",timestamp,name,value,meta.vsn,meta.filename,meta.position\n"
        '0,2023-06-02T12:26:36Z,upload,u,W056,1685708796600423152-640x480.jpg,"5\n'
        "1,2023-06-02T12:26:56Z,upload,u,W056,1685708816600423152-640x480.jpg,7\n"
    )
    with pytest.raises(MetadataError, match="uploads.csv"):
        read_metadata_frame(path)
    with pytest.raises(MetadataError, match="uploads.csv"):  # also when the damaged column is not asked for
        read_metadata_frame(path, ("timestamp", "name", "meta.vsn", "meta.filename"))


def test_a_row_with_a_field_too_many_rejects_the_file(tmp_path):
    # An unquoted comma in a URL (or two lines glued together) would shift the row's fields into the wrong columns.
    path = tmp_path / "uploads.csv"
    stamp = "2023-06-02 12:26:36+00:00"
    path.write_text("timestamp,name,value,meta.filename,meta.vsn,meta.node,meta.position,meta.plugin\n"
                    f"{stamp},upload,http://x/a,a.jpg,W056,ABC,1,p\n"
                    f"{stamp},upload,http://x/b?q=1,2,b.jpg,W056,ABC,2,p\n")
    for columns in (None, UPLOAD_COLUMNS):
        with pytest.raises(MetadataError, match="uploads.csv.*Expected 8 fields in line 3, saw 9"):
            read_metadata_frame(path, columns)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_only_the_columns_asked_for(tmp_path, suffix):
    frame = read_metadata_frame(fixtures_dir() / "konza-notebook_V017_mobotix-scan_upload_meta_EXTRACTED.csv")
    path = tmp_path / f"uploads{suffix}"
    frame.to_csv(path) if suffix == ".csv" else frame.to_parquet(path)
    narrow = read_metadata_frame(path, UPLOAD_COLUMNS + ("meta.not_in_the_file",))
    assert list(narrow.columns) == [c for c in frame.columns if c in UPLOAD_COLUMNS] and "value" in frame.columns
    assert upload_records(narrow, "f") == upload_records(frame, "f") and len(upload_records(frame, "f")) == 48


def test_numbers_and_booleans_keep_their_own_text():
    # A hash takes 1, 1.0 and True (and 0.0 and -0.0) as one value; each cell keeps the text it was written as.
    frame = pd.DataFrame({
        "timestamp": ["2023-06-02T12:26:36Z"] * 6, "name": ["upload"] * 6, "meta.vsn": ["W056"] * 6,
        "meta.filename": [f"{i}.jpg" for i in range(6)],
        "meta.position": pd.array([1, 1.0, True, 0.0, -0.0, None], dtype=object),
        "meta.plugin": pd.array([1, 2, None, 4, 5, 6], dtype="Int64"),
    })
    records, _ = read_upload_records(frame, "f")
    assert [r.position_label for r in records] == ["1", "1.0", "True", "0.0", "-0.0", None]
    assert [r.plugin for r in records] == ["1", "2", None, "4", "5", "6"]
