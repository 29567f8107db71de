"""Catalog: node-aware local time and daylight, set-nodes, SQL errors, output formats, describe."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import catalog
from catalog.cli import main as catalog_main
from catalog.location import NodesError, load_nodes_csv, location_columns, split_for, splits, sun_elevation_deg

NODES_CSV = """vsn,node_id,lat,lon,valid_from,valid_to
W056,000048b02d15bc7c,41.7183,-87.9826,,2023-05-20T00:00:00Z
W056,000048b02d15bc7c,32.8850,-117.2400,2023-05-20T00:00:00Z,
W057,000048b02d15c31f,39.1020,-96.6100,2022-01-01,
"""


@pytest.fixture()
def nodes(tmp_path):
    path = tmp_path / "nodes.csv"
    path.write_text(NODES_CSV)
    return load_nodes_csv(path)


def ns(text: str) -> int:
    return pd.Timestamp(text).value


def test_a_moved_node_is_day_in_chicago_and_night_in_san_diego_at_the_same_utc_hour(nodes):
    times = np.array([ns("2023-05-10T12:30:00Z"), ns("2023-06-15T12:30:00Z")])
    cols = location_columns(np.array(["W056", "W056"], dtype=object), times, nodes)
    assert list(cols["tz"]) == ["America/Chicago", "America/Los_Angeles"]
    assert list(cols["is_day"]) == [True, False]
    assert cols["sun_elevation_deg"][0] > 5 and cols["sun_elevation_deg"][1] < 0
    assert str(cols["time_local"][0]) == "2023-05-10T07:30:00.000000"
    assert str(cols["time_local"][1]) == "2023-06-15T05:30:00.000000"
    assert list(cols["lat"]) == [41.7183, 32.885]


def test_dst_switch_in_chicago(nodes):
    times = np.array([ns("2023-03-12T07:59:00Z"), ns("2023-03-12T08:00:00Z"), ns("2023-11-05T06:59:00Z"),
                      ns("2023-11-05T07:00:00Z")])
    cols = location_columns(np.array(["W057"] * 4, dtype=object), times, nodes)
    assert [str(t)[11:16] for t in cols["time_local"]] == ["01:59", "03:00", "01:59", "01:00"]
    assert list(cols["utc_offset_min"]) == [-360, -300, -300, -360]


def test_unknown_vsn_and_time_before_a_period_give_nulls(nodes):
    cols = location_columns(np.array(["V999", "W057"], dtype=object),
                            np.array([ns("2023-06-01T12:00:00Z"), ns("2021-06-01T12:00:00Z")]), nodes)
    assert list(cols["tz"]) == [None, None] and list(cols["is_day"]) == [None, None]
    assert np.isnan(cols["lat"]).all() and np.isnat(cols["time_local"]).all()


def test_sun_elevation_matches_nrel_spa_reference():
    # NREL SPA report (Reda & Andreas 2008) example: 2003-10-17 12:30:30 local (-7 h), 39.742476 N, 105.1786 W:
    # topocentric zenith 50.11162 deg.
    elevation = sun_elevation_deg(np.array([ns("2003-10-17T19:30:30Z")]), 39.742476, -105.1786)[0]
    assert abs(elevation - (90 - 50.11162)) < 0.1


def test_nodes_csv_errors(tmp_path):
    path = tmp_path / "nodes.csv"
    path.write_text("vsn,node_id,lat,lon,valid_from,valid_to\nW056,x,91,0,,\n")
    with pytest.raises(NodesError, match="line 2.*out of range"):
        load_nodes_csv(path)
    path.write_text("vsn,node_id,lat,lon,valid_from,valid_to\nW056,x,1,1,,2023-06-01\nW056,x,2,2,2023-05-01,\n")
    with pytest.raises(NodesError, match="overlap"):
        load_nodes_csv(path)
    path.write_text("vsn,node_id,lat,lon,valid_from,valid_to\nW056,x,1,1,yesterday,\n")
    with pytest.raises(NodesError, match="ISO 8601"):
        load_nodes_csv(path)


def test_split_is_stable_and_by_node_day():
    assert split_for("W056", "2023-06-01") == split_for("W056", "2023-06-01")
    vsn = np.array(["W056"] * 3 + ["W057"], dtype=object)
    times = np.array([ns("2023-06-01T00:01:00Z"), ns("2023-06-01T23:59:00Z"), ns("2023-06-02T00:01:00Z"),
                      ns("2023-06-01T00:01:00Z")])
    labels = splits(vsn, times, (0.8, 0.1, 0.1))
    assert labels[0] == labels[1] == split_for("W056", "2023-06-01")
    assert labels[2] == split_for("W056", "2023-06-02") and labels[3] == split_for("W057", "2023-06-01")
    # The fractions hold over many node-days.
    many = [split_for("W056", f"2023-{m:02d}-{d:02d}") for m in range(1, 13) for d in range(1, 29)]
    assert 0.7 < many.count("train") / len(many) < 0.9


def test_set_nodes_recomputes_without_touching_shards(built_copy, tmp_path, capsys):
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (built_copy / "shards").glob("*.tar")}
    with catalog.open(built_copy) as cat:
        before = cat.query("SELECT key, shard, sample_offset, split, tz FROM samples ORDER BY key").to_pylist()
    moved = tmp_path / "nodes.csv"
    moved.write_text("vsn,node_id,lat,lon,valid_from,valid_to\nW056,,41.7183,-87.9826,,\nW057,,-33.87,151.21,,\n")
    assert catalog_main(["set-nodes", str(built_copy), str(moved)]) == 0
    with catalog.open(built_copy) as cat:
        after = cat.query("SELECT key, shard, sample_offset, split, tz, vsn, is_day FROM samples ORDER BY key").to_pylist()
        assert cat.query("SELECT count(*) AS n FROM nodes").to_pylist()[0]["n"] == 2
    assert [(r["key"], r["shard"], r["sample_offset"], r["split"]) for r in after] == [
        (r["key"], r["shard"], r["sample_offset"], r["split"]) for r in before]
    assert {r["tz"] for r in after if r["vsn"] == "W057"} == {"Australia/Sydney"}
    assert {r["tz"] for r in after if r["vsn"] == "W056"} == {"America/Chicago"}
    assert {r["tz"] for r in after if r["vsn"] == "V017"} == {None}
    assert {r["is_day"] for r in after if r["vsn"] == "V017"} == {None}
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (built_copy / "shards").glob("*.tar")}


def test_bad_sql_gives_duckdb_message_and_the_views(built, tmp_path, capsys):
    out = tmp_path / "result.csv"
    assert catalog_main(["query", str(built), "SELECT nope FROM samples", "--format", "csv", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "views:" in err and "samples: key VARCHAR" in err and "rejects:" in err
    assert not out.exists()


def test_query_formats(built, tmp_path, capsys):
    sql = "SELECT vsn, count(*) AS n FROM samples GROUP BY vsn ORDER BY vsn"
    assert catalog_main(["query", str(built), sql, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["vsn"] for r in rows] == ["V017", "W056", "W057"]
    assert catalog_main(["query", str(built), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == '"vsn","n"'
    target = tmp_path / "out.parquet"
    assert catalog_main(["query", str(built), sql, "--format", "parquet", "--out", str(target)]) == 0
    assert pq.read_table(target).num_rows == 3
    assert catalog_main(["query", str(built), sql]) == 0
    assert "(3 rows)" in capsys.readouterr().out


def test_python_api_and_describe(built, capsys):
    with catalog.open(built) as cat:
        table = cat.query("SELECT count(*) AS n FROM samples WHERE is_sky")
        assert table.column("n")[0].as_py() > 0
        selection = cat.select("is_sky AND is_day", split="train")
        assert set(selection.column("split").to_pylist()) <= {"train"}
        assert selection.schema.metadata[b"sagepairs.where"] == b"is_sky AND is_day"
        views = cat.describe_views()
        for view in ("samples", "files", "rejects", "shards", "nodes", "runs"):
            assert views[view]
        for column in ("time_local", "tz", "sun_elevation_deg", "is_day", "split", "ir_offset", "ir_nan_fraction"):
            assert column in dict(views["samples"])
    assert catalog_main(["describe", str(built)]) == 0
    out = capsys.readouterr().out
    for section in ("samples per node", "day / night", "splits", "rejects per reason", "runs"):
        assert f"== {section}" in out


def test_interpolated_sun_elevation_equals_direct_spa():
    from catalog.location import _spa

    spa = _spa()
    rng = np.random.default_rng(1)
    n = 120_000  # enough rows for the hourly-grid path
    ts = rng.integers(ns("2022-01-01"), ns("2023-06-01"), n)
    lat, lon = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    fast = sun_elevation_deg(ts, lat, lon)
    stamps = pd.to_datetime(ts / 1e9, unit="s")
    delta_t = spa.calculate_deltat(stamps.year.to_numpy(), stamps.month.to_numpy())
    direct = spa.solar_position_numpy(ts / 1e9, lat, lon, 0.0, 1013.25, 12.0, delta_t, 0.5667, 1)[2]
    assert np.abs(fast - direct).max() < 1e-4


def test_build_with_changed_nodes_recomputes_existing_samples(built_copy, synth_raw, tmp_path):
    from ingest.build import build_shards
    from tests.conftest import INGEST

    moved = tmp_path / "nodes.csv"
    moved.write_text(synth_raw.joinpath("nodes.csv").read_text().replace("39.102,-96.61", "-33.87,151.21"))
    summary = build_shards(synth_raw, built_copy, INGEST, nodes_csv=moved, progress=False, log=lambda m: None)
    assert summary.samples_added == 0
    with catalog.open(built_copy) as cat:
        zones = cat.query("SELECT DISTINCT tz FROM samples WHERE vsn = 'W057'").column("tz").to_pylist()
        stored = cat.query("SELECT count(*) AS n FROM nodes WHERE lat < 0").to_pylist()[0]["n"]
    assert zones == ["Australia/Sydney"] and stored == 1


def test_parts_from_before_decode_scale_read_as_decode_scale(built_copy):
    """Catalog parts written before 2026-11-28 have draft_factor (decoded at 1/n); the view gives decode_scale."""
    import shutil

    import pyarrow as pa

    runs = sorted((built_copy / "catalog" / "runs").iterdir())
    new_part = runs[-1] / "samples.parquet"
    table = pq.read_table(new_part)
    (scale,) = set(table.column("decode_scale").to_pylist())  # the test's small frames decode at full size
    assert scale == 1.0
    older = table.drop(["decode_scale"]).append_column("draft_factor", pa.array([2] * table.num_rows, pa.int8()))
    with catalog.open(built_copy) as cat:
        before = cat.query("SELECT count(*) AS n FROM samples").to_pylist()[0]["n"]
    pq.write_table(older, new_part)
    with catalog.open(built_copy) as cat:
        rows = cat.query("SELECT * FROM samples").to_pylist()
    assert len(rows) == before and "draft_factor" not in rows[0] and {r["decode_scale"] for r in rows} == {0.5}
    # One older part and one newer: each row keeps its own scale.
    second = runs[-1].with_name(f"run-{int(runs[-1].name.split('-')[1]) + 1:06d}")
    shutil.copytree(runs[-1], second)
    pq.write_table(table, second / "samples.parquet")
    with catalog.open(built_copy) as cat:
        counts = {r["decode_scale"]: r["n"] for r in cat.query("SELECT decode_scale, count(*) AS n FROM samples GROUP BY 1").to_pylist()}
    assert counts == {0.5: before, scale: before}
