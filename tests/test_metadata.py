import pandas as pd

from ingest.metadata import read_metadata_frame, upload_records
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
