"""The explorer page in a real browser: Debian's chromium, driven by playwright, opened from file:// and over HTTP.

Every page a test opens must raise no console error and no page error. The data is synthetic
(tests/explorer_synth.py): blobs of points, columns, and atlases whose every thumbnail has a known solid colour, so
the tests check what is shown by its pixels. Positions of points on screen come from the page's hook
(window.explorer.pointScreenXY, the library's own projection); the hover, lasso and box are real mouse input.
"""

from __future__ import annotations

import functools
import http.server
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as Polygon

from analysis.explorer import write_explorer
from tests.explorer_page import (MARGIN_PX, VIEWPORT, browser, centre_colour, drag,  # noqa: F401 - browser: a fixture
                                 isolated_point, min_edge_distance, needs_chromium, pixels, save_artifact, screen_xy,
                                 star, wait_selection, walk, watch_errors)
from tests.explorer_synth import NODES, ir_greys, rgb_colours, synthetic

pytestmark = needs_chromium
N = 300
K = 5  # blobs (= clusters) of 60 samples
HOVER_LINK = (255, 204, 0)  # explorer.js HOVER_LINK_COLOUR
# RGBA of the link overlay canvas (#links) in the 3x3 CSS pixels around a client point.
LINK_PIXELS = """([x, y]) => {
  const canvas = document.getElementById('links'), rect = canvas.getBoundingClientRect();
  const dpr = canvas.width / rect.width, out = [];
  const data = canvas.getContext('2d').getImageData(Math.round((x - rect.left) * dpr) - 1,
                                                   Math.round((y - rect.top) * dpr) - 1, 3, 3).data;
  for (let i = 0; i < data.length; i += 4) out.push(Array.from(data.slice(i, i + 4)));
  return out;
}"""


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("explorer-browser"), N, k=K, spread=1.2)


@pytest.fixture(scope="module")
def index(synth) -> Path:
    out = synth.thumbnails.atlases[0].parents[1] / "explorer"
    return write_explorer(out, synth.keys, synth.columns, synth.maps, synth.links, synth.thumbnails,
                          title="Explorer test", dataset="synthetic")


@pytest.fixture(scope="module")
def http_url(index):
    """The page's folder served by http.server on 127.0.0.1 (a free port), for the life of the module."""
    handler = functools.partial(QuietHandler, directory=str(index.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture()
def open_page(browser, index):
    """Opens the page (file:// unless given a URL), waits for window.explorer.ready; at the end, fails the test on
    any console error or page error."""
    logs, pages = [], []

    def opener(url: str | None = None):
        page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
        logs.append(watch_errors(page))
        pages.append(page)
        page.goto(url or index.as_uri())
        page.evaluate("window.explorer.ready")
        return page

    yield opener
    for page in pages:
        page.close()
    assert sum(logs, []) == []


@pytest.mark.parametrize("over", ["file", "http"])
def test_opens_without_errors_and_draws_every_point(open_page, http_url, over, tmp_path):
    page = open_page(http_url if over == "http" else None)
    assert page.evaluate("window.explorer.maps()") == ["t-SNE joint", "PCA RGB (every other)", "RGB↔IR link"]
    assert page.evaluate("window.explorer.pointCount()") == N
    assert page.inner_text("#status").startswith(f"{N} points")
    shot = pixels(Path(save_artifact(page, tmp_path, f"explorer-{over}.png")).read_bytes())
    plot = page.locator("#plot").bounding_box()
    region = shot[int(plot["y"]): int(plot["y"] + plot["height"]), int(plot["x"]): int(plot["x"] + plot["width"])]
    background = np.array([0x16, 0x18, 0x1d])
    assert (np.abs(region - background).sum(axis=2) > 60).sum() > N * 10  # the blobs are on the canvas


@pytest.mark.parametrize("map_name", ["t-SNE joint", "PCA RGB (every other)"])
def test_hover_shows_the_samples_key_and_both_thumbnails(open_page, synth, map_name):
    page = open_page()
    page.evaluate("name => window.explorer.setMap(name)", map_name)
    xy = screen_xy(page)
    p = isolated_point(page, xy)
    row = page.evaluate("p => window.explorer.pointRow(p)", p)
    assert row == synth.maps[[m.name for m in synth.maps].index(map_name)].rows[p]
    page.mouse.move(*xy[p])
    page.wait_for_function("k => document.querySelector('#tooltip .key')?.textContent === k", arg=synth.keys[row])
    assert page.is_visible("#tooltip")
    np.testing.assert_allclose(centre_colour(page, "#tooltip .thumb.rgb"), rgb_colours([row])[0], atol=4)
    np.testing.assert_allclose(centre_colour(page, "#tooltip .thumb.ir"), [ir_greys([row])[0]] * 3, atol=4)
    lo, hi = synth.thumbnails.ir_range_c[row]
    assert f"IR {lo:.1f} to {hi:.1f} °C" in page.inner_text("#tooltip")
    assert f"node\t{synth.columns['node'][row]}" in page.inner_text("#tooltip .meta")
    page.mouse.move(5, 5)  # off the plot: the tooltip goes
    page.wait_for_selector("#tooltip", state="hidden")


def legend(page) -> tuple[str, list[str]]:
    return page.inner_text("#legend .title"), page.locator("#legend .entry .label").all_inner_texts()


def test_colouring_by_a_column_changes_the_legend(open_page, synth):
    page = open_page()
    assert legend(page) == ("cluster", [str(c) for c in range(K)])
    before = page.locator("#canvas").screenshot()
    page.select_option("#colour-select", "node")
    page.wait_for_function("() => document.querySelector('#legend .title').textContent === 'node'")
    assert legend(page)[1] == sorted(set(NODES[b % len(NODES)] for b in range(K)))
    assert page.locator("#canvas").screenshot() != before  # the points were recoloured
    page.select_option("#colour-select", "local_hour")  # numeric: a gradient from min to max
    page.wait_for_function("() => document.querySelector('#legend .title').textContent === 'local_hour'")
    assert page.locator("#legend .gradient").count() == 1
    assert page.locator("#legend .range").inner_text().split() == ["0", "23"]
    page.select_option("#colour-select", "ir_mean_c")  # numeric with missing values
    page.wait_for_function("() => document.querySelector('#legend .title').textContent === 'ir_mean_c'")
    assert legend(page)[1] == ["(missing)"]


def cutting_lasso(xy: np.ndarray, members: np.ndarray) -> np.ndarray:
    """A star over part of a blob (some of its points in, some out) with no point within MARGIN_PX of an edge."""
    centre = xy[members].mean(axis=0)
    shifts = range(-12, 13, 4)
    for dx, dy, radius, turn in itertools.product(shifts, shifts, [30, 36, 42], [0, .2, .4, .6]):
        vertices = star(centre + [dx, dy], radius, turn)
        inside = Polygon(vertices).contains_points(xy[members]).sum()
        if 0 < inside < members.sum() and min_edge_distance(vertices, xy) >= MARGIN_PX:
            return vertices
    raise AssertionError("no star cuts the blob with a clear margin")


def test_lasso_drawn_with_the_mouse_selects_the_points_inside(open_page, synth, tmp_path):
    page = open_page()
    xy = screen_xy(page)
    page.click(".modes button[data-mode=lasso]")
    members = synth.blob == 1
    path = walk(cutting_lasso(xy, members))
    inside = Polygon(path).contains_points(xy)
    assert 0 < inside.sum() < members.sum()  # a real cut: some of the blob in, some out
    drag(page, path)
    count = wait_selection(page, "0")
    assert count == inside.sum()
    assert sorted(page.evaluate("window.explorer.selectedPoints()")) == np.flatnonzero(inside).tolist()
    expected = [synth.keys[i] for i in np.flatnonzero(inside)]
    assert page.evaluate("window.explorer.selectedKeys()") == expected
    assert page.locator("#selection-grid .pair").count() == count
    save_artifact(page, tmp_path, "explorer-lasso.png")


def test_a_lasso_started_on_a_hovered_point_hides_its_tooltip(open_page, synth):
    """While a lasso is drawn the plot reports no hover, so the tooltip must go when the lasso starts, not stay
    over the lasso being drawn."""
    page = open_page()
    xy = screen_xy(page)
    p = isolated_point(page, xy)
    page.keyboard.down("Shift")  # shift+drag: the lasso without the mode button
    page.mouse.move(*xy[p])
    key = synth.keys[page.evaluate("p => window.explorer.pointRow(p)", p)]
    page.wait_for_function("k => document.querySelector('#tooltip .key')?.textContent === k", arg=key)
    page.mouse.down()
    for step in range(1, 15):
        page.mouse.move(xy[p][0] + 4 * step, xy[p][1] + 3 * step)
    page.wait_for_function("() => document.querySelector('#tooltip').hidden")
    page.mouse.up()
    page.keyboard.up("Shift")


def test_box_selection_and_the_exports(open_page, synth, tmp_path):
    page = open_page()
    xy = screen_xy(page)
    page.click(".modes button[data-mode=box]")
    centre = np.round(xy[synth.blob == 3].mean(axis=0))
    for half in range(20, 80):
        corner0, corner1 = centre - half, centre + [half, half // 2]
        box = np.array([corner0, [corner1[0], corner0[1]], corner1, [corner0[0], corner1[1]]])
        if min_edge_distance(box, xy) >= MARGIN_PX and Polygon(box).contains_points(xy).sum() > 5:
            break
    inside = Polygon(box).contains_points(xy)
    page.mouse.move(*(corner0 - 1))
    page.mouse.down()
    page.mouse.move(*corner0)  # the box starts at the first move
    page.mouse.move(*corner1, steps=10)
    page.wait_for_timeout(50)
    page.mouse.up()
    count = wait_selection(page, "0")
    assert count == inside.sum() > 5
    keys = [synth.keys[i] for i in np.flatnonzero(inside)]
    with page.expect_download() as download:
        page.click("#download-keys")
    assert download.value.suggested_filename == "keys.csv"
    assert Path(download.value.path()).read_text() == "key\n" + "".join(k + "\n" for k in keys)
    sql = "key IN (" + ", ".join(f"'{k}'" for k in keys) + ")"
    assert page.input_value("#sql") == sql
    page.click("#copy-sql")
    assert page.evaluate("window.explorer.sqlPredicate()") == sql
    page.click("#clear-selection")
    assert wait_selection(page, str(count)) == 0


def test_link_map_joins_a_known_pair(open_page, synth, tmp_path):
    page = open_page()
    page.select_option("#map-select", label="RGB↔IR link")
    page.wait_for_function(f"() => window.explorer.pointCount() === {2 * N}")
    xy = screen_xy(page)
    rgb, ir = xy[:N], xy[N:]
    p = isolated_point(page, xy, among=np.arange(N))
    page.mouse.move(*rgb[p])
    page.wait_for_function("k => document.querySelector('#tooltip .key')?.textContent === k", arg=synth.keys[p])
    assert "RGB point" in page.inner_text("#tooltip")

    def colour_at(point: np.ndarray) -> np.ndarray:
        """The link overlay's colour nearest HOVER_LINK within a pixel of `point` (the line is 2.5 px wide)."""
        near = np.array(page.evaluate(LINK_PIXELS, point.tolist()))
        return near[np.abs(near - (HOVER_LINK + (255,))).sum(axis=1).argmin()]

    for t in (0.25, 0.5, 0.75):  # along the line from p's RGB point to p's IR point: the hover colour
        np.testing.assert_allclose(colour_at(rgb[p] + t * (ir[p] - rgb[p])), HOVER_LINK + (255,), atol=8)
    # and not towards another sample's IR point (one whose midpoint is well away from p's line)
    away = [q for q in range(N) if min_edge_distance(np.array([rgb[p], ir[p]]), ((rgb[p] + ir[q]) / 2)[None]) > 8]
    q = away[0]
    assert np.abs(colour_at((rgb[p] + ir[q]) / 2) - (HOVER_LINK + (255,))).sum() > 120
    save_artifact(page, tmp_path, "explorer-link.png")


def test_clicking_a_cluster_selects_it(open_page, synth):
    page = open_page()
    assert page.locator("#clusters .cluster").count() == K
    first = page.locator("#clusters .cluster").first  # in view: its examples are drawn
    first.locator(".pair >> nth=11").wait_for()
    assert first.locator(".pair").count() == 12
    assert first.locator(".top").inner_text().startswith("node = ")
    page.click("#clusters .cluster[data-code='2'] .head")
    assert wait_selection(page, "0") == (synth.blob == 2).sum()
    assert page.evaluate("window.explorer.selectedKeys()") == [synth.keys[i] for i in np.flatnonzero(synth.blob == 2)]


def test_clicking_a_point_shows_it_in_the_sample_panel(open_page, synth):
    page = open_page()
    xy = screen_xy(page)
    p = isolated_point(page, xy)
    # As a user does: onto the point (its tooltip shows), then click. A click within one frame of a fast move can
    # reach the plot's camera as a drag from where the mouse was before, which pans the map instead of selecting.
    page.mouse.move(*xy[p])
    page.wait_for_function("k => document.querySelector('#tooltip .key')?.textContent === k", arg=synth.keys[p])
    page.mouse.down()
    page.mouse.up()
    assert wait_selection(page, "0") == 1
    assert page.inner_text("#sample .key") == synth.keys[p]
    np.testing.assert_allclose(centre_colour(page, "#sample .thumb.rgb"), rgb_colours([p])[0], atol=4)
