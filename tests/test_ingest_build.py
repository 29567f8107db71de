"""ingest build-shards: every reject reason, accounting, stock readers, rebuilds, incremental runs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import catalog
from catalog.schema import REJECT_REASONS
from ingest.build import build_shards, scan_raw
from ingest.config import IngestConfig
from ingest.synth import FAULTS
from shards.layout import IR_GZ_MEMBER, KEY_RE, MEMBERS
from tests.conftest import INGEST
from tests.test_thermal import reference_parse

QUIET = {"progress": False, "log": lambda message: None}


def q(dataset, sql):
    with catalog.open(dataset) as cat:
        return cat.query(sql).to_pylist()


def shard_digests(dataset: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((dataset / "shards").glob("*.tar"))}


def test_every_planted_fault_gets_its_reason(built, truth, synth_raw):
    files = {r["path"]: r for r in q(built, "SELECT * FROM files")}
    faults = [t for t in truth if t["fault"]]
    assert {t["fault"] for t in faults} == set(FAULTS)
    for frame in faults:
        expected_status, expected_reason = FAULTS[frame["fault"]]
        for path in (frame["rgb_file"], frame["thermal_file"]):
            if path is None:
                continue  # the file this fault deleted
            row = files[path]
            assert (row["status"], row["reason"]) == (expected_status, expected_reason), (frame["fault"], row)
            if expected_status == "rejected":
                assert row["detail"], row
    # the position-race frame names the file it was renamed to; find it by key
    race = next(t for t in truth if t["fault"] == "name_position_race")
    rows = [r for r in files.values() if r["key"] == race["key"] and r["role"] == "thermal"]
    assert [r["reason"] for r in rows] == ["position_mismatch"]
    reasons = {r["reason"] for r in files.values() if r["status"] == "rejected"}
    assert reasons <= set(REJECT_REASONS)
    assert reasons == {reason for _, reason in FAULTS.values() if reason}


def test_samples_match_truth(built, truth):
    samples = {r["key"]: r for r in q(built, "SELECT * FROM samples")}
    expected = {t["key"] for t in truth if t["expected_status"] == "sample"}
    assert set(samples) == expected
    for t in truth:
        if t["key"] not in samples:
            continue
        s = samples[t["key"]]
        assert s["position"] == t["position"] and s["position_label"] == t["position_label"]
        assert s["is_sky"] == (None if not t["position"] else t["position"] % 4 == 1)
        assert s["node_id"] == t["node_id"]
        assert s["lat"] == pytest.approx(t["lat"]) and s["is_day"] == t["is_day"]
        # synth names a scaled frame by its true size, and ingest reads the size from the pixels
        name_size = s["rgb_file"].split("-", 1)[1].split("_")[0].split(".")[0]
        assert name_size == f"{s['source_width']}x{s['source_height']}" == "1228x410"
    few_nan = next(t for t in truth if t["fault"] == "few_nan_pixels")
    assert samples[few_nan["key"]]["ir_nan_fraction"] == pytest.approx(3 / (336 * 252), abs=1e-9)


def test_accounting_every_raw_file_exactly_once(built, synth_raw):
    raw_paths = {f.path for f in scan_raw(synth_raw)}
    rows = q(built, "SELECT path, status, role, reason FROM files")
    assert len(rows) == len({r["path"] for r in rows})
    assert {r["path"] for r in rows} == raw_paths
    counts = Counter(r["status"] for r in rows)
    assert counts["sample"] + counts["rejected"] + counts["ignored"] == len(raw_paths)
    n_samples = q(built, "SELECT count(*) AS n FROM samples")[0]["n"]
    assert counts["sample"] == 2 * n_samples
    ignored = Counter(r["reason"] for r in rows if r["status"] == "ignored")
    for kind in ("uint_csv", "thermal_raw", "netcdf", "plot", "metadata", "outside_layout"):
        assert ignored[kind] > 0, kind
    assert q(built, "SELECT count(*) AS n FROM rejects")[0]["n"] == counts["rejected"]


def test_stock_webdataset_and_tar_read_the_shards(built, synth_raw):
    urls = sorted(str(p) for p in (built / "shards").glob("*.tar"))
    assert len(urls) >= 2  # the session build uses small shards, so rollover is exercised
    listing = subprocess.run(["tar", "tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == [listing[0].split(".")[0] + "." + m for m in MEMBERS]
    with tarfile.open(urls[0]) as tar:
        member = tar.getmembers()[0]
        assert tar.format == tarfile.USTAR_FORMAT or member.uid == 0
        assert (member.uid, member.gid, member.mode) == (0, 0, 0o444)
    assert MEMBERS[0] == IR_GZ_MEMBER == "ir.npy.gz"
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        assert KEY_RE.match(sample["__key__"])
        meta = sample["json"]
        ir = sample["ir.npy.gz"]  # webdataset's default pre-handler gunzips, then its .npy handler loads
        assert ir.dtype == np.float32 and ir.shape == (252, 336)
        assert np.array_equal(ir, reference_parse((synth_raw / meta["thermal_file"]).read_bytes()), equal_nan=True)
        assert sample["rgb.jpg"].shape == (504, 672, 3)
        assert meta["key"] == sample["__key__"] and meta["crop_box_px"][0] > 0
        seen += 1
    assert seen == q(built, "SELECT count(*) AS n FROM samples")[0]["n"]


def test_catalog_offsets_point_at_members(built):
    rows = q(built, "SELECT key, shard, ir_member, ir_offset, ir_size, rgb_offset, rgb_size FROM samples "
                    "ORDER BY shard, ir_offset")
    assert {row["ir_member"] for row in rows} == {"ir.npy.gz"}
    for row in rows[:20]:
        data = (built / "shards" / row["shard"]).read_bytes()
        ir = data[row["ir_offset"] : row["ir_offset"] + row["ir_size"]]
        # gzip, no file name, mtime 0 (rebuilds give the same bytes), holding the .npy
        assert ir[:8] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00"
        assert zlib.decompress(ir, 31).startswith(b"\x93NUMPY")
        assert data[row["rgb_offset"] : row["rgb_offset"] + 2] == b"\xff\xd8"
        assert data[row["rgb_offset"] + row["rgb_size"] - 2 : row["rgb_offset"] + row["rgb_size"]] == b"\xff\xd9"


def test_rebuild_is_byte_identical(built, synth_raw, tmp_path):
    again = tmp_path / "again"
    build_shards(synth_raw, again, IngestConfig(workers=1, shard_target_mb=8.0), nodes_csv=synth_raw / "nodes.csv", **QUIET)
    assert shard_digests(again) == shard_digests(built)
    assert q(again, "SELECT name, sha256 FROM shards ORDER BY name") == q(built, "SELECT name, sha256 FROM shards ORDER BY name")


def test_incremental_runs(raw_copy, tmp_path, truth):
    dataset = tmp_path / "dataset"
    # Hold back W057's later frames, and the optical partner of the 'missing_optical' frame; then let them arrive.
    cutoff = sorted(t["ts_ns"] for t in truth if t["vsn"] == "W057")[-9]
    late_keys = {t["key"] for t in truth if t["vsn"] == "W057" and t["ts_ns"] >= cutoff}
    late = [p for p in raw_copy.glob("W057/*") if f"W057_{p.name.split('-')[0]}" in late_keys]
    parked = tmp_path / "parked"
    parked.mkdir()
    for p in late:
        shutil.move(p, parked / p.name)
    first = build_shards(raw_copy, dataset, INGEST, nodes_csv=raw_copy / "nodes.csv", **QUIET)
    digests = shard_digests(dataset)
    files_before = q(dataset, "SELECT * EXCLUDE (ingest_run) FROM files ORDER BY path")

    # The same RAW again adds nothing.
    second = build_shards(raw_copy, dataset, INGEST, nodes_csv=raw_copy / "nodes.csv", **QUIET)
    assert (second.samples_added, second.shards_added, second.frames_decoded) == (0, 0, 0)
    assert shard_digests(dataset) == digests
    assert q(dataset, "SELECT * EXCLUDE (ingest_run) FROM files ORDER BY path") == files_before
    # Files with a standing decision are counted, not planned again, and the counts say so.
    assert second.status_counts == first.status_counts and (first.files_new, second.files_new) == (first.files_seen, 0)

    # New files add new shards only, and an unpaired frame whose partner arrives becomes a sample.
    for p in late:
        shutil.move(parked / p.name, p)
    orphan = next(t for t in truth if t["fault"] == "missing_optical")
    assert q(dataset, f"SELECT reason FROM rejects WHERE key = '{orphan['key']}'") == [{"reason": "unpaired"}]
    donor = next(p for p in raw_copy.glob(f"{orphan['vsn']}/*_position*.jpg") if "_plot" not in p.name)
    size = donor.name.split("-", 1)[1].split("_")[0]  # synth names frames by their true size, e.g. 1228x410
    shutil.copyfile(donor, raw_copy / orphan["vsn"] / f"{orphan['ts_ns']}-{size}_position{orphan['position_label']}.jpg")
    # An ignored sibling that changed size is decided again and recorded with its new size.
    sibling = next(raw_copy.glob("W056/*.thermal.uint*.csv"))
    with open(sibling, "ab") as grown:
        grown.write(b"\n")
    sibling_path = f"W056/{sibling.name}"
    third = build_shards(raw_copy, dataset, INGEST, nodes_csv=raw_copy / "nodes.csv", **QUIET)
    assert q(dataset, f"SELECT bytes, status FROM files WHERE path = '{sibling_path}'") == [
        {"bytes": sibling.stat().st_size, "status": "ignored"}]
    expected = sum(1 for t in truth if t["key"] in late_keys and t["expected_status"] == "sample") + 1
    assert third.samples_added == expected and third.shards_added >= 1
    after = shard_digests(dataset)
    assert {name: after[name] for name in digests} == digests
    assert {r["status"] for r in q(dataset, f"SELECT status FROM files WHERE key = '{orphan['key']}' AND role IN ('rgb', 'thermal')")} == {"sample"}
    assert not q(dataset, f"SELECT * FROM rejects WHERE key = '{orphan['key']}'")
    assert first.run_id < second.run_id < third.run_id
    per_node = q(dataset, "SELECT vsn, count(*) AS n FROM samples GROUP BY vsn ORDER BY vsn")
    assert third.samples_per_node == {r["vsn"]: r["n"] for r in per_node}
    assert len(q(dataset, "SELECT * FROM runs")) == 3
    total = len(scan_raw(raw_copy))
    assert q(dataset, "SELECT count(*) AS n, count(DISTINCT path) AS d FROM files")[0] == {"n": total, "d": total}


def test_an_emptied_raw_commits_an_empty_run(built_copy, tmp_path):
    # An unmounted or emptied RAW: nothing to plan, nothing lost from the catalog.
    before = q(built_copy, "SELECT count(*) AS n FROM samples")
    (tmp_path / "empty").mkdir()
    summary = build_shards(tmp_path / "empty", built_copy, INGEST, **QUIET)
    assert (summary.files_seen, summary.files_new, summary.samples_added) == (0, 0, 0)
    assert q(built_copy, "SELECT count(*) AS n FROM samples") == before


def test_real_v017_metadata_and_fixture_files(tmp_path):
    """The real V017 upload table drives positions and node ids; the real NDJSON responses load as metadata."""
    from tests.conftest import fixtures_dir
    import pandas as pd

    from ingest.synth import celsius_csv_bytes

    fixtures = fixtures_dir()
    raw = tmp_path / "raw"
    (raw / "metadata").mkdir(parents=True)
    meta_csv = fixtures / "konza-notebook_V017_mobotix-scan_upload_meta_EXTRACTED.csv"
    shutil.copy(meta_csv, raw / "metadata")
    shutil.copy(fixtures / "sage-data-client_test-data.ndjson.gz", raw / "metadata")
    shutil.copy(fixtures / "sage-data-client_examples_data.ndjson", raw / "metadata")
    table = pd.read_csv(meta_csv)
    real_jpeg = (fixtures / "plugin-mobotix-sampler_ecr-icon_M16TB-R.jpg").read_bytes()
    rng = np.random.default_rng(0)
    for stamp, filename in zip(table["timestamp"], table["meta.filename"]):
        ts_ns = pd.Timestamp(stamp).value
        path = raw / "V017" / f"{ts_ns}-{filename}"
        path.parent.mkdir(exist_ok=True)
        if filename.endswith(".jpg"):
            path.write_bytes(real_jpeg)  # a real Mobotix JPEG, 350x305 whatever the name says
        elif "celsius" in filename:
            path.write_bytes(celsius_csv_bytes(rng.normal(6.2, 0.1, (252, 336)).astype(np.float32)))
        else:
            path.write_bytes(b"\x00" * 16)
    dataset = tmp_path / "dataset"
    summary = build_shards(raw, dataset, IngestConfig(workers=1), **QUIET)
    assert summary.samples_added == 12
    rows = q(dataset, "SELECT DISTINCT node_id, position, is_sky, source_width, source_height, lat FROM samples")
    assert rows == [{"node_id": "00004cd98fb54735", "position": 0, "is_sky": None, "source_width": 350,
                     "source_height": 305, "lat": None}]
    assert summary.unlocated_vsns == ["V017"]
    metadata = q(dataset, "SELECT path, status, reason, detail FROM files WHERE role = 'metadata' ORDER BY path")
    assert [m["status"] for m in metadata] == ["ignored"] * 3
    assert [m["detail"] for m in metadata] == ["48 upload records", "0 upload records", "0 upload records"]


def test_unreadable_metadata_is_rejected_not_fatal(raw_copy, tmp_path):
    (raw_copy / "metadata" / "broken.parquet").write_bytes(b"not parquet at all")
    dataset = tmp_path / "dataset"
    summary = build_shards(raw_copy, dataset, INGEST, **QUIET)
    row = q(dataset, "SELECT status, reason, detail FROM files WHERE path = 'metadata/broken.parquet'")[0]
    assert row["status"] == "rejected" and row["reason"] == "unreadable" and "broken.parquet" in row["detail"]
    assert summary.samples_added > 0


def test_bad_paths_fail_before_writing(tmp_path, synth_raw):
    from ingest.build import BuildError

    with pytest.raises(BuildError, match="does not exist"):
        build_shards(tmp_path / "nope", tmp_path / "ds", INGEST, **QUIET)
    with pytest.raises(BuildError, match="must not contain"):
        build_shards(synth_raw, synth_raw / "dataset", INGEST, **QUIET)
    bad_nodes = tmp_path / "nodes.csv"
    bad_nodes.write_text("vsn,lat\nW056,1\n")
    with pytest.raises(BuildError, match="missing column"):
        build_shards(synth_raw, tmp_path / "ds", INGEST, nodes_csv=bad_nodes, **QUIET)
    assert not (tmp_path / "ds").exists()


def test_sample_json_member(built):
    row = q(built, "SELECT key, shard, json_offset, json_size FROM samples LIMIT 1")[0]
    with open(built / "shards" / row["shard"], "rb") as fh:
        fh.seek(row["json_offset"])
        meta = json.loads(fh.read(row["json_size"]))
    for field in ("vsn", "node_id", "ts_ns", "position", "rgb_file", "thermal_file", "crop_box_px", "source_size"):
        assert field in meta


def test_an_unforeseen_failure_is_a_reject_not_a_crash(monkeypatch, tmp_path):
    import ingest.process as process
    from ingest.frames import FrameTask

    def explode(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(process, "process_frame", explode)
    task = FrameTask("W056_1", "W056", 1, "W056/1-a.jpg", 1, "W056/1-b.csv", 1, 5, "5", None)
    result = process.process_safely(task, str(tmp_path), IngestConfig())
    assert result.members is None and result.reason == "unreadable" and "MemoryError" in result.detail


def _collector_state(queue) -> None:
    import gc

    queue.put((gc.isenabled(), gc.get_freeze_count() > 0))


def test_the_collector_is_paused_while_planning_and_on_in_the_workers(synth_raw, tmp_path):
    import gc
    import multiprocessing

    from ingest.build import _collector_for_workers, _collector_paused

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with _collector_paused():
        assert not gc.isenabled()
        with _collector_for_workers():
            # The plan's objects are frozen; a worker forked now starts with the collector on.
            assert gc.isenabled() and gc.get_freeze_count() > 0
            worker = context.Process(target=_collector_state, args=(queue,))
            worker.start()
            worker.join()
            assert queue.get(timeout=10) == (True, True)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.isenabled()
    # What a caller froze stays frozen.
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with _collector_paused(), _collector_for_workers():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
    # A build leaves the collector as it found it, disabled or not.
    for enabled in (False, True):
        (gc.enable if enabled else gc.disable)()
        try:
            build_shards(synth_raw, tmp_path / f"dataset-{enabled}", INGEST, progress=False, log=lambda message: None)
            assert gc.isenabled() is enabled and gc.get_freeze_count() == 0
        finally:
            gc.enable()
