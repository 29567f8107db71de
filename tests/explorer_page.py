"""Driving the explorer page in Debian's chromium with playwright: what tests/test_explorer_browser.py (synthetic
data) and tests/test_explorer_e2e.py (a real run) share.

Positions of points on screen come from the page's hook (window.explorer.pointsScreenXY, the library's own
projection); hovers, lassos and boxes are real mouse input.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs "
                                                             "it: apt-get install -y chromium)")
VIEWPORT = {"width": 1280, "height": 800}
# No point this close to a lasso's edge: the page's lasso is the polygon of the whole-pixel mouse positions the
# test sends, so which side a point is on depends only on float rounding in the projection.
MARGIN_PX = 0.5


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module (launching one takes seconds)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def watch_errors(page) -> list[str]:
    """The page's console errors and page errors from now on, collected in the list returned (it grows)."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return errors


def screen_xy(page) -> np.ndarray:
    return np.array(page.evaluate("window.explorer.pointsScreenXY()"))


def isolated_point(page, xy: np.ndarray, among: np.ndarray | None = None) -> int:
    """A point at least 12 px from every other and over the plot (not under the legend): the mouse finds it."""
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    candidates = np.arange(len(xy)) if among is None else among
    for p in candidates[np.argsort(-d[candidates].min(axis=1), kind="stable")]:
        hit = page.evaluate("([x, y]) => document.elementFromPoint(x, y).id", xy[p].tolist())
        if d[p].min() >= 12 and hit == "canvas":
            return int(p)
    raise AssertionError("no isolated point in view")


def wait_selection(page, before: str) -> int:
    """The selected count once it is no longer `before` (a page that never selected has no count yet: "0")."""
    page.wait_for_function("b => (document.querySelector('#selection-count').dataset.count ?? '0') !== b",
                           arg=before)
    return int(page.get_attribute("#selection-count", "data-count"))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def centre_colour(page, selector: str) -> np.ndarray:
    """The median colour of the middle of an element, as the screen shows it."""
    image = pixels(page.locator(selector).screenshot())
    h, w, _ = image.shape
    return np.median(image[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3), axis=0)


def save_artifact(page, tmp_path: Path, name: str) -> Path:
    """A screenshot under the test's tmp dir, copied to $SAGEPAIRS_TEST_ARTIFACTS when that is set."""
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("SAGEPAIRS_TEST_ARTIFACTS"):
        target = Path(os.environ["SAGEPAIRS_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / name)
    return path


def star(centre: np.ndarray, radius: float, turn: float) -> np.ndarray:
    """A 5-pointed star (concave, so a box or hull around it would hold other points), at whole pixels."""
    angles = np.linspace(0, 2 * np.pi, 10, endpoint=False) + turn
    r = radius * np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
    return np.round(centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * r[:, None])


def min_edge_distance(vertices: np.ndarray, xy: np.ndarray) -> float:
    """The distance from the closest of xy to the closed polygon's edges."""
    a, b = vertices, np.roll(vertices, -1, axis=0)
    ab = b - a
    t = np.clip(((xy[:, None] - a[None]) * ab[None]).sum(axis=2) / (ab ** 2).sum(axis=1)[None], 0, 1)
    return float(np.linalg.norm(xy[:, None] - (a[None] + t[..., None] * ab[None]), axis=2).min())


def drag(page, path: np.ndarray) -> None:
    """Mouse down at path[0], then through every point of path, then up: a lasso drawn by hand. The points are
    whole pixels at most 6 px apart, so the lasso the page records is the polygon the test computes with."""
    page.mouse.move(*path[0])
    page.mouse.down()
    for x, y in path[1:]:
        page.mouse.move(x, y)
    page.wait_for_timeout(50)  # the lasso's last (debounced) extension
    page.mouse.up()


def walk(vertices: np.ndarray, step_px: float = 6.0) -> np.ndarray:
    """Whole-pixel points along the closed polygon from vertices[0] round to half-way along the closing edge (a
    lasso that ended where it began would count as a click too)."""
    points = [vertices[0]]
    corners = np.vstack([vertices, (vertices[-1] + vertices[0]) / 2])
    for a, b in zip(corners[:-1], corners[1:]):
        steps = max(1, int(np.ceil(np.linalg.norm(b - a) / step_px)))
        points += [np.round(a + (b - a) * i / steps) for i in range(1, steps + 1)]
    return np.array(points)
