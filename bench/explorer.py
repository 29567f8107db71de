"""The embedding explorer at size: time to first paint, hover latency and lasso time in headless Chromium.

Data: synthetic (tests/explorer_synth.py's generators): 100,000 and 1,000,000 points (and 1,000, for what any
page costs here) in 30 Gaussian blobs, the catalog-like columns (node, split, is_day, local_hour, month,
ir_mean_c, cluster) and thumbnails: 100,000 distinct 64x48 RGB | IR cells with a gradient and noise, packed as
analysis/atlas.py packs a run's (16 x 16 cells a 2048 x 768 atlas, WebP q80: 391 atlases); the 1M samples share
those cells (sample i shows cell i mod 100,000), so every size reads the same atlas files. ``write_explorer``
writes the pages under bench/out/explorer/ (gitignored; the atlases are made once and reused).

Measured in Debian's chromium, headless, with software WebGL (SwiftShader): the figures are upper bounds for the
desktop GPU the targets are set for. 1280x800 viewport, pages opened from file://, one page at a time; this VM may
be shared, so the last line says how much CPU other processes took meanwhile.

1. first paint: window.explorer.timings.firstPaint (ms from navigation start until the first map is drawn and a
   frame has passed), median of --repeats fresh pages; and `ready` (all columns, keys and thumbnail indices
   loaded). Targets: 100k <= 1 s, 1M <= 3 s on a desktop GPU.
2. hover: the mouse moves (page.mouse) onto 20 points in turn, leaving the plot between them; the page times
   each from the mousemove event to the frame after the tooltip shows the sample's key and its thumbnail atlas is
   decoded (window.explorer.lastHover().ms), with its parts: until the plot's pointover event (.eventMs: the
   plot draws the hover highlight first), the page's handler (.handlerMs) and until the atlas is decoded
   (.domMs). First = the first hover on an atlas (its decode counts). Target <= 100 ms. Next to it, one frame of
   the plot (window.explorer.measureFrame(): a redraw of every point, which in software WebGL dominates hover and
   selection times).
3. lasso: a mouse lasso (lasso mode, an octagon) around sample 0's blob and its neighbours; the page times it from
   the mouseup event to the frame after the selection panel (count, thumbnail grid) is drawn
   (window.explorer.lastSelection().ms), and its own handler (.handlerMs). Target <= 200 ms at 100k.

    python bench/explorer.py [--sizes 1000,100000,1000000] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first, so that `analysis` is the package and not bench/analysis.py

from playwright.sync_api import sync_playwright  # noqa: E402

from analysis.explorer import ExplorerMap, Thumbnails, write_explorer  # noqa: E402
from bench._common import OUT, record  # noqa: E402
from bench.train import Neighbours  # noqa: E402
from tests.explorer_synth import blobs, columns, write_atlases  # noqa: E402

DIR = OUT / "explorer"
CELLS = 100_000
CELL = (64, 48)
PER_ROW, PER_ATLAS, QUALITY = 16, 256, 80  # as analysis/atlas.py (PER_ROW, ROWS = 16, 16; QUALITY)
BLOBS = 30
HOVERS = 20
VIEWPORT = {"width": 1280, "height": 800}
TARGETS = {"paint": {100_000: 1.0, 1_000_000: 3.0}, "hover_ms": 100, "lasso_ms": {100_000: 200}}
# 1,000 points: no target; what a page costs whatever its size here (WebGL set-up in software), next to the others.


def atlases() -> Thumbnails:
    """The 100k thumbnail cells, made once (about a minute) and reused."""
    folder = DIR / "atlases"
    done = folder / "done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        thumbs = write_atlases(folder, CELLS, cell=CELL, per_row=PER_ROW, per_atlas=PER_ATLAS, textured=True,
                               quality=QUALITY)
        done.write_text(str(len(thumbs.atlases)))
    paths = sorted(folder.glob("atlas-*.webp"))
    return Thumbnails(atlases=paths, cell=CELL, per_row=PER_ROW, atlas=np.zeros(0, np.int32),
                      slot=np.zeros(0, np.int32), ir_range_c=np.zeros((0, 2), np.float32))


def thumbnails_for(n: int, cells: Thumbnails) -> Thumbnails:
    cell = np.arange(n) % CELLS
    ir_range = np.stack([10 + cell % 7, 25 + cell % 5], axis=1).astype(np.float32)
    return Thumbnails(atlases=cells.atlases, cell=CELL, per_row=PER_ROW, atlas=(cell // PER_ATLAS).astype(np.int32),
                      slot=(cell % PER_ATLAS).astype(np.int32), ir_range_c=ir_range)


def page_for(n: int, cells: Thumbnails) -> tuple[Path, float]:
    """bench/out/explorer/<n>/index.html (written now, timed) for n points."""
    xy, blob, _ = blobs(n, BLOBS, seed=0, spread=0.9)
    keys = [f"W{b % 40:03d}-2024-{1 + i % 12:02d}-{i:07d}" for i, b in enumerate(blob)]
    started = time.perf_counter()
    index = write_explorer(DIR / str(n), keys, columns(n, blob, seed=0), [ExplorerMap("t-SNE joint", xy, np.arange(n))],
                           thumbnails=thumbnails_for(n, cells), title=f"bench {n:,}", dataset="synthetic")
    return index, time.perf_counter() - started


def open_page(browser, index: Path):
    page = browser.new_page(viewport=VIEWPORT)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(index.as_uri(), timeout=120_000)
    page.wait_for_function("() => window.explorer && window.explorer.timings.ready", timeout=120_000, polling=50)
    return page, errors


def first_paint(browser, index: Path, repeats: int) -> tuple[list[float], list[float]]:
    paints, readies = [], []
    for _ in range(repeats):
        page, errors = open_page(browser, index)
        timings = page.evaluate("window.explorer.timings")
        paints.append(timings["firstPaint"] / 1000)
        readies.append(timings["ready"] / 1000)
        page.close()
        if errors:
            raise RuntimeError(f"{index}: the page logged errors: {errors[:3]}")
    return paints, readies


def hovers(page, n: int) -> tuple[list[dict], list[dict]]:
    """(cold, warm) window.explorer.lastHover() records: cold = the first hover on its atlas."""
    rng = np.random.default_rng(1)
    cold, warm, seen = [], [], set()
    for p in rng.choice(n, HOVERS, replace=False):
        x, y = page.evaluate("p => window.explorer.pointScreenXY(p)", int(p))
        page.mouse.move(640, 10)  # off the plot (the header): the tooltip goes
        page.wait_for_selector("#tooltip", state="hidden")
        before = page.evaluate("() => (window.explorer.lastHover() || {at: 0}).at")
        page.mouse.move(x, y)
        page.wait_for_function("b => (window.explorer.lastHover() || {at: 0}).at > b", arg=before, polling=10)
        hover = page.evaluate("window.explorer.lastHover()")
        atlas = page.evaluate("() => document.querySelector('#tooltip .thumb')?.style.backgroundImage")
        (warm if atlas in seen else cold).append(hover)
        seen.add(atlas)
    return cold, warm


def lasso(page) -> dict:
    """A mouse lasso (an octagon) around sample 0's blob and its neighbours; window.explorer.lastSelection()."""
    page.click(".modes button[data-mode=lasso]")
    plot = page.locator("#plot").bounding_box()
    radius = 0.2 * plot["height"]
    low = np.array([plot["x"], plot["y"]]) + radius + 5
    high = np.array([plot["x"] + plot["width"], plot["y"] + plot["height"]]) - radius - 5
    centre = np.clip(page.evaluate("window.explorer.pointScreenXY(0)"), low, high)  # all of it over the plot
    angles = np.linspace(0, 2 * np.pi, 9)
    path = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    page.mouse.move(*path[0])
    page.mouse.down()
    for b in path[1:]:
        page.mouse.move(*b, steps=8)
    page.mouse.move(*(path[-1] + [0, 12]))
    page.wait_for_timeout(50)
    page.mouse.up()
    page.wait_for_function("() => window.explorer.lastSelection() && window.explorer.lastSelection().points > 0",
                           polling=10, timeout=60_000)
    return page.evaluate("window.explorer.lastSelection()")


def median_ms(records: list[dict], field: str) -> str:
    return f"{statistics.median(r[field] for r in records):.0f}" if records else "-"


def verdict(value: float, target: float | None) -> str:
    """The issue's targets are for a desktop GPU; here WebGL is software, so a miss here is not a miss there."""
    if target is None:
        return "no target"
    return f"target <= {target:g} on a desktop GPU; {'met' if value <= target else 'NOT met'} here, in software"


def bench_size(browser, n: int, cells: Thumbnails, repeats: int) -> list[str]:
    index, write_s = page_for(n, cells)
    data_mb = sum(f.stat().st_size for f in (index.parent / "data").iterdir()) / 1e6
    paints, readies = first_paint(browser, index, repeats)
    page, errors = open_page(browser, index)
    frame = statistics.median(page.evaluate("window.explorer.measureFrame()") for _ in range(5))
    cold, warm = hovers(page, n)
    selection = lasso(page)
    page.close()
    if errors:
        raise RuntimeError(f"{index}: the page logged errors: {errors[:3]}")
    paint = statistics.median(paints)
    hover = cold + warm
    hover_ms = statistics.median(r["ms"] for r in hover)
    lasso_target = TARGETS["lasso_ms"].get(n)
    return [
        f"{n:,} points: write_explorer {write_s:.1f} s, data/ {data_mb:.1f} MB (keys, 7 columns, one map, thumbnail "
        f"indices; {len(cells.atlases)} atlases hard-linked)",
        f"{n:,} points: first paint {paint:.2f} s (median of {repeats}: {', '.join(f'{v:.2f}' for v in paints)}; "
        f"{verdict(paint, TARGETS['paint'].get(n))}); everything loaded {statistics.median(readies):.2f} s; one frame "
        f"of the plot (software WebGL) {frame:.0f} ms (median of 5 redraws)",
        f"{n:,} points: hover to tooltip with both thumbnails, {HOVERS} hovers: median {hover_ms:.0f} ms, max "
        f"{max(r['ms'] for r in hover):.0f} ms ({verdict(hover_ms, TARGETS['hover_ms'])}); of which mousemove to the "
        f"plot's pointover event {median_ms(hover, 'eventMs')} ms (a frame of the hover highlight comes first), the "
        f"page's handler {median_ms(hover, 'handlerMs')} ms, until the atlas is decoded {median_ms(hover, 'domMs')} "
        f"ms; {len(cold)} first hovers on an atlas median {median_ms(cold, 'ms')} ms, {len(warm)} on one seen before "
        f"{median_ms(warm, 'ms')} ms",
        f"{n:,} points: mouse lasso over {selection['points']:,} points: mouseup to the frame after the selection "
        f"panel {selection['ms']:.0f} ms ({verdict(selection['ms'], lasso_target)}); the page's handler (count, "
        f"{min(200, selection['rows'])} thumbnails) {selection['handlerMs']:.0f} ms",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("bench/explorer.py: Debian's chromium is not installed (apt-get install -y chromium)")
    started = time.perf_counter()
    cells = atlases()
    lines = []
    neighbours = Neighbours()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        version = browser.version
        for n in (int(s) for s in args.sizes.split(",")):
            lines += bench_size(browser, n, cells, args.repeats)
            print("\n".join(lines[-4:]), flush=True)
        browser.close()
    lines.insert(0, f"headless Chromium {version} (Debian), software WebGL (SwiftShader), viewport 1280x800, "
                    "file://; a desktop GPU paints faster: these are upper bounds")
    lines.append(f"while the pages ran, {neighbours.summary()}; bench wall time {time.perf_counter() - started:.0f} s")
    if args.no_record:
        print("\n".join(lines))
    else:
        record("bench/explorer.py", lines)


if __name__ == "__main__":
    main()
