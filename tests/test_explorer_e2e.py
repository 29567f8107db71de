"""The explorer end to end on a real run, as a user walks it: open the run's report from disk, follow its link to
the explorer, hover a point for its key and thumbnails, lasso some points with the mouse, download keys.csv, and
turn that file (and the page's SQL predicate) into a Selection with the `catalog` CLI: the same samples.

The run is the session's tiny trained run (tests/conftest.py) embedded and mapped by PCA only, the cheapest way a
real run gets an explorer (as in tests/test_explorer_run.py: no t-SNE, no random-init baseline). What the page
should show comes from the run's files (its embedded keys, the explorer's atlases) and from the screen positions of
the points, with the point-in-polygon count computed here; one chromium draws it all, and any console or page
error fails the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.path import Path as Polygon
from PIL import Image

from analysis.explorer import decode_array, read_part
from analysis.pipeline import Analysis
from tests.explorer_page import (MARGIN_PX, VIEWPORT, browser, centre_colour, drag,  # noqa: F401 - browser: a fixture
                                 isolated_point, min_edge_distance, needs_chromium, pixels, save_artifact, screen_xy,
                                 star, wait_selection, walk, watch_errors)
from tests.test_explorer_run import CONFIG

pytestmark = needs_chromium
ROOT = Path(__file__).resolve().parents[1]
BACKGROUND = np.array([0x16, 0x18, 0x1d])  # the plot's background (explorer.js createPlot)
ON_PLOT = "pts => pts.map(([x, y]) => document.elementFromPoint(x, y).id === 'canvas')"
# A thumbnail on screen is its atlas cell scaled up (smoothed): their middles' colours agree to this much.
THUMB_ATOL = 8
LASSOED = 6  # at least this many points in the lasso (and at most half of them)


@pytest.fixture()
def analysed(trained_run_copy) -> Analysis:
    """The run embedded (trained checkpoint only), its PCA, then `analysis report`: the report and the explorer."""
    analysis = Analysis.open(trained_run_copy, CONFIG, progress=False, log=lambda m: None)
    analysis.ensure_embeddings("last")
    analysis.pca("last")
    analysis.report()
    return analysis


def test_report_explorer_lasso_and_catalog_select_agree(browser, analysed, built, tmp_path):
    keys = list(analysed.embeddings("last").keys())
    page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
    errors = watch_errors(page)
    follow_report_link(page, analysed.run.report_dir / "index.html")
    assert Path(page.inner_text("#dataset")) == built  # what the user passes to `catalog select`
    rows = point_rows(page)
    assert sorted(rows) == list(range(len(keys)))  # a point per embedded sample
    xy = check_every_point_drawn(page)
    check_hover(page, xy, rows, keys, analysed.run.report_dir / "explorer")
    inside = lasso_some(page, xy)
    lassoed = sorted(keys[rows[p]] for p in np.flatnonzero(inside))
    csv = download_keys(page, tmp_path)
    assert catalog_select(built, tmp_path / "by-keys.parquet", "--keys", str(csv)) == lassoed
    sql = page.input_value("#sql")
    assert sql == page.evaluate("window.explorer.sqlPredicate()") and sql.startswith("key IN (")
    assert catalog_select(built, tmp_path / "by-sql.parquet", "--where", sql) == lassoed
    save_artifact(page, tmp_path, "explorer-e2e.png")
    page.close()
    assert errors == []


def follow_report_link(page, report: Path) -> None:
    """Opens the report from file:// and clicks its link to the explorer, which must finish loading."""
    page.goto(report.as_uri())
    page.get_by_role("link", name="Open the explorer").click()
    page.wait_for_url("**/report/explorer/index.html")
    page.evaluate("window.explorer.ready")


def point_rows(page) -> list[int]:
    """The sample (row of the run's embeddings) of each point of the page's map."""
    return page.evaluate("Array.from({length: window.explorer.pointCount()}, (_, p) => window.explorer.pointRow(p))")


def check_every_point_drawn(page) -> np.ndarray:
    """The first map (PCA joint): every point inside the plot and coloured on screen (where the legend does not
    cover it); returns the points' screen positions."""
    assert page.evaluate("window.explorer.maps()")[0] == "PCA joint"
    xy = screen_xy(page)
    assert page.inner_text("#status").startswith(f"{len(xy)} points")
    box = page.locator("#canvas").bounding_box()
    assert ((xy >= [box["x"], box["y"]]) & (xy < [box["x"] + box["width"], box["y"] + box["height"]])).all()
    shown = np.array(page.evaluate(ON_PLOT, xy.tolist()))
    assert shown.sum() > len(xy) // 2
    shot = pixels(page.screenshot())
    centres = shot[np.round(xy[shown, 1]).astype(int), np.round(xy[shown, 0]).astype(int)]
    assert (np.abs(centres - BACKGROUND).sum(axis=1) > 60).all()
    return xy


def check_hover(page, xy: np.ndarray, rows: list[int], keys: list[str], explorer: Path) -> None:
    """The mouse on an isolated point: the tooltip shows its sample's key and RGB and IR thumbnails (their colours
    those of the sample's atlas cell); off the plot, the tooltip goes."""
    p = isolated_point(page, xy)
    page.mouse.move(*xy[p])
    page.wait_for_function("k => document.querySelector('#tooltip .key')?.textContent === k", arg=keys[rows[p]])
    page.wait_for_function("p => window.explorer.lastHover()?.point === p", arg=p)  # the atlas is decoded
    rgb, ir = atlas_cell(explorer, rows[p])
    for selector, cell in (("#tooltip .thumb.rgb", rgb), ("#tooltip .thumb.ir", ir)):
        assert page.is_visible(selector)
        h, w, _ = cell.shape
        expected = np.median(cell[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3), axis=0)
        np.testing.assert_allclose(centre_colour(page, selector), expected, atol=THUMB_ATOL)
    page.mouse.move(5, 5)
    page.wait_for_selector("#tooltip", state="hidden")


def atlas_cell(explorer: Path, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample `row`'s RGB and IR thumbnails as the explorer's files hold them (docs/explorer-contract.md)."""
    meta = read_part(explorer / "data" / "meta.js")
    thumbs = meta["thumbs"]
    part = read_part(explorer / "data" / f"{thumbs['part']}.js")
    a, slot = (int(decode_array(part[name], "<i4")[row]) for name in ("atlas", "slot"))
    assert a >= 0, f"sample {row} has no thumbnail"
    (w, h), per_row = thumbs["cell"], thumbs["perRow"]
    image = np.asarray(Image.open(explorer / "thumbs" / thumbs["atlases"][a]["file"]).convert("RGB")).astype(int)
    x, y = (slot % per_row) * 2 * w, (slot // per_row) * h
    return image[y: y + h, x: x + w], image[y: y + h, x + w: x + 2 * w]


def lasso_some(page, xy: np.ndarray) -> np.ndarray:
    """Draws a lasso with the mouse round some of the points; the page selects exactly those inside it (computed
    here from the screen positions). Returns which points are inside."""
    path = lasso_around_some(page, xy)
    inside = Polygon(path).contains_points(xy)
    page.click(".modes button[data-mode=lasso]")
    drag(page, path)
    assert wait_selection(page, "0") == inside.sum()
    assert sorted(page.evaluate("window.explorer.selectedPoints()")) == np.flatnonzero(inside).tolist()
    return inside


def lasso_around_some(page, xy: np.ndarray) -> np.ndarray:
    """The mouse's path along a star round LASSOED points or more (at most half of them), centred on a crowded
    spot, over the plot alone (not the legend), with no point within MARGIN_PX of its edges."""
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    for p in np.argsort(-(d < 40).sum(axis=1), kind="stable"):
        for radius in range(24, 120, 8):
            for turn in (0, .2, .4, .6):
                path = walk(star(xy[p], radius, turn))
                inside = Polygon(path).contains_points(xy).sum()
                if (LASSOED <= inside <= len(xy) // 2 and min_edge_distance(path, xy) >= MARGIN_PX
                        and all(page.evaluate(ON_PLOT, path.tolist()))):
                    return path
    raise AssertionError(f"no lasso round {LASSOED} or more points (and at most half) fits on the plot")


def download_keys(page, tmp_path: Path) -> Path:
    """Clicks "Download keys.csv" and saves what the browser downloads."""
    with page.expect_download() as download:
        page.click("#download-keys")
    assert download.value.suggested_filename == "keys.csv"
    path = tmp_path / "keys.csv"
    download.value.save_as(path)
    return path


def catalog_select(dataset: Path, out: Path, *args: str) -> list[str]:
    """`catalog select DATASET ARGS --out OUT` run as a user runs it; the Selection's keys, sorted."""
    command = [sys.executable, "-m", "catalog", "select", str(dataset), *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return sorted(pq.read_table(out).column("key").to_pylist())
