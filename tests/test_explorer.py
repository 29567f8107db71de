"""write_explorer without a browser: the files it writes, the data decoding back to the arrays given, the column
kinds, the cluster summaries, atomic replacement, and errors that name what was wrong.
(The page itself is tested in a real browser by tests/test_explorer_browser.py.)"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import analysis.explorer as explorer
from analysis.explorer import (MISSING, ExplorerLink, ExplorerMap, Thumbnails, decode_array, read_part,
                               write_explorer)
from tests.explorer_synth import synthetic

N = 120


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("explorer-synth"), N, k=4)


@pytest.fixture(scope="module")
def page(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explorer-out") / "explorer"
    write_explorer(out, synth.keys, synth.columns, synth.maps, synth.links, synth.thumbnails, title="T",
                   dataset="ds")
    return out


def meta_of(page: Path) -> dict:
    return read_part(page / "data" / "meta.js")


def part_of(page: Path, name: str) -> dict:
    return read_part(page / "data" / f"{name}.js")


def column_meta(page: Path, name: str) -> dict:
    return next(c for c in meta_of(page)["columns"] if c["name"] == name)


def test_writes_the_page_assets_and_data(page):
    for name in explorer.STATIC_FILES + ("data/meta.js", "data/keys.js", "data/thumbs.js", "thumbs/atlas-0000.webp"):
        assert (page / name).is_file(), name
    assert not (page / "vendor" / "npm").exists()  # the bundle's build input stays behind
    meta = meta_of(page)
    assert (meta["version"], meta["title"], meta["dataset"], meta["n"]) == (explorer.FORMAT_VERSION, "T", "ds", N)
    assert [m["name"] for m in meta["maps"]] == ["t-SNE joint", "PCA RGB (every other)", "RGB↔IR link"]
    assert [m["kind"] for m in meta["maps"]] == ["map", "map", "link"]
    for spec in meta["maps"] + meta["columns"]:
        assert (page / "data" / f"{spec['part']}.js").is_file()


def test_page_uses_classic_scripts_only(page):
    """From file:// Chromium blocks module scripts and fetch(): the page must use neither."""
    html = (page / "index.html").read_text()
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts and all("type=" not in s and "src=" in s for s in scripts), scripts
    script = (page / "explorer.js").read_text()
    assert "fetch(" not in script and "XMLHttpRequest" not in script and not re.search(r"^\s*import ", script, re.M)


def test_maps_decode_back(page, synth):
    meta = meta_of(page)
    joint = part_of(page, meta["maps"][0]["part"])
    np.testing.assert_array_equal(decode_array(joint["xy"], "<f4").reshape(-1, 2), synth.maps[0].xy)
    assert joint["rows"] is None  # every sample in key order: the page makes 0..n-1 itself
    subset = part_of(page, meta["maps"][1]["part"])
    np.testing.assert_array_equal(decode_array(subset["rows"], "<i4"), synth.maps[1].rows)
    assert meta["maps"][1]["m"] == len(synth.maps[1].rows) == N // 2
    link = part_of(page, meta["maps"][2]["part"])
    np.testing.assert_array_equal(decode_array(link["rgb"], "<f4").reshape(-1, 2), synth.links[0].rgb_xy)
    np.testing.assert_array_equal(decode_array(link["ir"], "<f4").reshape(-1, 2), synth.links[0].ir_xy)


def test_keys_and_thumbnails_decode_back(page, synth):
    assert part_of(page, "keys")["keys"].split("\n") == synth.keys
    thumbs = part_of(page, "thumbs")
    np.testing.assert_array_equal(decode_array(thumbs["atlas"], "<i4"), synth.thumbnails.atlas)
    np.testing.assert_array_equal(decode_array(thumbs["slot"], "<i4"), synth.thumbnails.slot)
    np.testing.assert_array_equal(decode_array(thumbs["irRange"], "<f4").reshape(-1, 2),
                                  synth.thumbnails.ir_range_c)
    spec = meta_of(page)["thumbs"]
    assert spec["cell"] == list(synth.thumbnails.cell) and spec["perRow"] == synth.thumbnails.per_row
    assert spec["atlases"] == [{"file": "atlas-0000.webp", "width": 2 * 32 * 8, "height": 24 * N // 8}]
    # hard-linked, not copied, on the same file system
    assert (page / "thumbs" / "atlas-0000.webp").stat().st_ino == synth.thumbnails.atlases[0].stat().st_ino


def decoded_column(page: Path, name: str) -> tuple[dict, np.ndarray]:
    spec = column_meta(page, name)
    raw = part_of(page, spec["part"])
    return spec, decode_array(raw["codes"] if spec["kind"] == "categorical" else raw["values"], spec["dtype"])


def test_column_kinds_and_values_decode_back(page, synth):
    node, codes = decoded_column(page, "node")
    assert node["kind"] == "categorical" and node["labels"] == sorted(set(synth.columns["node"]))
    assert list(np.array(node["labels"])[codes]) == list(synth.columns["node"])
    assert node["counts"] == np.bincount(codes).tolist()
    is_day, codes = decoded_column(page, "is_day")
    assert is_day["labels"] == ["false", "true"]
    np.testing.assert_array_equal(codes == 1, synth.columns["is_day"])
    month, codes = decoded_column(page, "month")  # few distinct integers: categories
    assert month["kind"] == "categorical" and month["labels"] == ["4", "5", "6"]
    hour, values = decoded_column(page, "local_hour")  # 24 distinct: a numeric scale
    assert (hour["kind"], hour["min"], hour["max"], hour["missing"]) == ("numeric", 0, 23, 0)
    np.testing.assert_array_equal(values, synth.columns["local_hour"])
    ir, values = decoded_column(page, "ir_mean_c")
    np.testing.assert_array_equal(values, synth.columns["ir_mean_c"])  # NaN where missing
    assert ir["missing"] == int(np.isnan(synth.columns["ir_mean_c"]).sum()) > 0
    cluster, _ = decoded_column(page, "cluster")  # a cluster column is categorical however many clusters
    assert cluster["kind"] == "categorical" and cluster["labels"] == ["0", "1", "2", "3"]


def test_missing_values_get_their_own_label(tmp_path, synth):
    values = {"obj": np.array(["b", None, "a", float("nan")], dtype=object),
              "arrow": pa.array(["x", None, "y", "x"]), "flt": np.array([1.0, np.nan, 2.0, 1.0]),
              "dates": np.array(["2024-01-01", "NaT", "2024-01-02", "2024-01-01"], dtype="datetime64[D]")}
    keys = ["a", "b", "c", "d"]
    out = write_explorer(tmp_path / "e", keys, values, [ExplorerMap("m", np.zeros((4, 2), np.float32),
                                                                    np.arange(4))]).parent
    expected = {"obj": ["b", MISSING, "a", MISSING], "arrow": ["x", MISSING, "y", "x"],
                "flt": ["1", MISSING, "2", "1"], "dates": ["2024-01-01", MISSING, "2024-01-02", "2024-01-01"]}
    for name, labels in expected.items():
        spec, codes = decoded_column(out, name)
        assert [spec["labels"][c] for c in codes] == labels, name
        assert spec["labels"][-1] == MISSING


def test_cluster_summaries(page, synth):
    meta = meta_of(page)
    assert meta["clusterColumn"] == "cluster"
    clusters = meta["clusters"]["cluster"]
    assert [c["size"] for c in clusters] == np.bincount(synth.blob).tolist()
    for cluster in clusters:
        members = np.flatnonzero(synth.blob == cluster["code"])
        assert set(cluster["examples"]) <= set(members.tolist()) and len(cluster["examples"]) == 12
        column, value, share, overall = cluster["top"][0]
        # blob b holds node NODES[b % 4]: every sample of a cluster has one node, a quarter of all samples do
        assert (column, share, overall) == ("node", 1.0, 0.25)
        assert value == synth.columns["node"][members[0]]


def test_rewrite_replaces_atomically(tmp_path, synth):
    out = tmp_path / "explorer"
    write_explorer(out, synth.keys, synth.columns, synth.maps, title="first")
    (out / "stale.txt").write_text("from the first page")
    write_explorer(out, synth.keys, synth.columns, synth.maps[:1], title="second")
    assert meta_of(out)["title"] == "second" and len(meta_of(out)["maps"]) == 1
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explorer"]  # no temp or old dirs left
    # What a writer killed mid-way left (SIGKILL runs no cleanup) goes with the next write.
    for leftover in (".explorer.tmp-deadbeef", ".explorer.old-deadbeef"):
        (tmp_path / leftover / "data").mkdir(parents=True)
    write_explorer(out, synth.keys, synth.columns, synth.maps[:1], title="third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explorer"]


def test_failed_write_leaves_the_old_page(tmp_path, synth, monkeypatch):
    out = tmp_path / "explorer"
    write_explorer(out, synth.keys, synth.columns, synth.maps, title="old")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(explorer, "_write_thumbnails", broken)
    with pytest.raises(OSError, match="disk full"):
        write_explorer(out, synth.keys, synth.columns, synth.maps, thumbnails=synth.thumbnails, title="new")
    assert meta_of(out)["title"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explorer"]


def one_map(n: int = 4) -> list[ExplorerMap]:
    return [ExplorerMap("m", np.zeros((n, 2), np.float32), np.arange(n))]


@pytest.mark.parametrize("change, message", [
    (dict(keys=["a", "b\nc", "d", "e"]), r"key 'b\\nc' holds a line break"),
    (dict(columns={"x": [1, 2, 3]}), r"column 'x' has shape \(3,\), keys has 4"),
    (dict(maps=[ExplorerMap("m", np.zeros((4, 2), np.float32), np.array([0, 1, 2, 4]))]),
     r"map 'm'.rows holds 0..4, outside 0..3"),
    (dict(maps=[ExplorerMap("m", np.array([[0, 0], [np.nan, 1], [0, 0], [1, 1]], np.float32), np.arange(4))]),
     r"map 'm' xy holds 1 points that are not finite"),
    (dict(maps=one_map() + one_map()), r"map names must be unique"),
    (dict(maps=[], links=[ExplorerLink("l", np.zeros((4, 2), np.float32), np.zeros((3, 2), np.float32),
                                       np.arange(4))]), r"link 'l' has 4 RGB points but 3 IR points"),
    (dict(maps=[]), r"no maps and no links"),
    (dict(cluster_column="nope"), r"cluster_column 'nope' is not among the columns"),
    (dict(thumbnails=Thumbnails([], (8, 6), 4, np.array([0, -1, -1, -1]), np.zeros(4), np.zeros((4, 2)))),
     r"thumbnails.atlas holds -1..0 but there are 0 atlases"),
    (dict(thumbnails=Thumbnails([Path("/nonexistent/a.webp")], (8, 6), 4, np.zeros(4), np.zeros(4),
                                np.zeros((4, 2)))), r"thumbnail atlas /nonexistent/a.webp does not exist"),
])
def test_bad_input_is_named(tmp_path, change, message):
    args = dict(keys=["a", "b", "c", "d"], columns={"x": [1, 2, 3, 4]}, maps=one_map()) | change
    with pytest.raises(ValueError, match=message):
        write_explorer(tmp_path / "e", **args)
    assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == []


def test_committed_bundle_matches_build_md():
    """vendor/BUILD.md names the sha256 of the committed bundle; a rebuilt or edited bundle must update it."""
    vendor = explorer.ASSETS / "vendor"
    documented = re.search(r"sha256 \| `([0-9a-f]{64})`", (vendor / "BUILD.md").read_text()).group(1)
    assert hashlib.sha256((vendor / "regl-scatterplot.min.js").read_bytes()).hexdigest() == documented
    assert "window.createScatterplot" in (vendor / "npm" / "entry.js").read_text()
