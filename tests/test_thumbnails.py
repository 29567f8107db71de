"""Thumbnails made by `analysis embed` (the decoded evaluation frame, downscaled; IR scaled by its frame's range),
stored once per run and reused, resumable without MPI; the atlases packed along a map."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

import catalog
from analysis import thumbnails as thumbnails_module
from analysis.atlas import PER_ROW, ROWS, atlas_order, hilbert_index, pack_atlases
from analysis.config import EmbedConfig
from analysis.embed import embed
from analysis.runs import AnalysisError, RunDir
from analysis.store import seeded_rows
from analysis.thumbnails import make_thumbnails
from analysis.thumbstore import (create_thumbnail_store, open_thumbnails, thumb_layout, thumbnail_path,
                                 write_thumbnail_chunk)
from shards.reader import SelectionReader
from training.loader import EVAL_AUGMENT, build_batch

SMALL = EmbedConfig(chunk_rows=16, batch_size=8, workers=0, thumb_size=(12, 16))
QUIET = {"progress": False, "log": lambda m: None}


def store_arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ("rgb", "ir", "ir_range_c", "row", "key")}


def decoded_frames(run_dir, rows: np.ndarray) -> dict:
    """The batch `analysis embed` decodes for ``rows`` (the evaluation view, before normalisation)."""
    config = RunDir.open(run_dir).training_config()
    with catalog.open(config.data.dataset) as cat:
        selection = cat.select("TRUE")
    reader = SelectionReader(selection, catalog.dataset_ref(config.data.dataset))
    return build_batch(reader, rows, config.data, config.model.mode, config.data.ir_mean, lambda key: EVAL_AUGMENT, 0.0)


def test_thumbnails_are_the_decoded_frame_downscaled_and_every_checkpoint_reuses_them(trained_run_copy):
    result = embed(trained_run_copy, "last", config=SMALL, **QUIET)
    selection_sha = zarr.open_group(str(result.path), mode="r").attrs["selection_sha256"]
    assert result.thumbnails == thumbnail_path(trained_run_copy, selection_sha)
    store = open_thumbnails(result.thumbnails)
    stored = store_arrays(result.thumbnails)
    n = result.rows
    assert store.attrs["thumbnailed"] == n and sorted(stored["row"][stored["row"] >= 0]) == list(range(n))
    rows = np.array([0, 5, n - 1])
    batch = decoded_frames(trained_run_copy, rows)
    where = {int(r): i for i, r in enumerate(stored["row"]) if r >= 0}
    for i, row in enumerate(rows):
        at = where[int(row)]
        assert stored["key"][at] == batch["keys"][i]
        frame = batch["rgb"][i].permute(2, 0, 1)[None].float() / 255
        expected = F.interpolate(frame, size=(12, 16), mode="bilinear", antialias=True)[0].permute(1, 2, 0) * 255
        assert np.abs(stored["rgb"][at].astype(float) - expected.numpy()).max() <= 1.0
        ir = batch["ir"][i]
        lo, hi = float(ir.min()), float(ir.max())
        assert stored["ir_range_c"][at].tolist() == pytest.approx([lo, hi], abs=1e-4)
        small = F.interpolate(ir[None, None], size=(12, 16), mode="bilinear", antialias=True)[0, 0]
        assert np.abs(stored["ir"][at].astype(float) - ((small - lo) / (hi - lo) * 255).numpy()).max() <= 1.0
    # The random-init baseline embeds the same samples: the store is reused, not written again.
    stamps = {p: p.stat().st_mtime_ns for p in result.thumbnails.rglob("*") if p.is_file()}
    messages = []
    again = embed(trained_run_copy, "random", config=SMALL, progress=False, log=messages.append)
    assert again.thumbnails == result.thumbnails and again.computed_rows == n
    assert stamps == {p: p.stat().st_mtime_ns for p in result.thumbnails.rglob("*") if p.is_file()}
    assert not any("thumbnails-" in m for m in messages), messages


def test_an_ir_frame_without_finite_pixels_has_no_range_and_nan_pixels_are_left_out():
    ir = torch.tensor(np.stack([np.full((6, 8), np.nan), np.linspace(-10, 30, 48).reshape(6, 8)]), dtype=torch.float32)
    ir[1, 0, 0] = float("nan")
    rgb, small, ranges = make_thumbnails(torch.rand(2, 3, 12, 16), ir, (3, 4))
    assert rgb.shape == (2, 3, 4, 3) and rgb.dtype == torch.uint8 and small.shape == (2, 3, 4)
    assert torch.isnan(ranges[0]).all() and (small[0] == 0).all()
    assert ranges[1].tolist() == pytest.approx([float(np.linspace(-10, 30, 48)[1]), 30.0])
    assert small[1][0, 0] < 40 and small[1][-1, -1] > 215  # the frame's cold corner dark, its warm one bright


def test_thumbnails_missing_beside_current_embeddings_are_made_alone_and_resume(trained_run_copy, monkeypatch):
    first = embed(trained_run_copy, "last", config=SMALL, **QUIET)
    reference = store_arrays(first.thumbnails)
    path = first.thumbnails
    shutil.rmtree(path)
    original, calls = thumbnails_module.make_thumbnails, {"n": 0}

    def dies_on_the_fourth_batch(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return original(*args)

    monkeypatch.setattr(thumbnails_module, "make_thumbnails", dies_on_the_fourth_batch)
    messages = []
    with pytest.raises(KeyboardInterrupt):
        embed(trained_run_copy, "last", config=SMALL, progress=False, log=messages.append)
    assert any("thumbnails missing, making them (decode only)" in m for m in messages), messages
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["complete"] is False and group["done"][:].sum() == 1  # chunk 0 (batches 1, 2) only
    with pytest.raises(AnalysisError, match="incomplete"):
        open_thumbnails(path)
    monkeypatch.setattr(thumbnails_module, "make_thumbnails", original)
    resumed = embed(trained_run_copy, "last", config=SMALL, **QUIET)
    assert resumed.computed_rows == 0  # the embeddings were current: nothing embedded again
    after = store_arrays(path)
    for name in ("rgb", "ir", "row", "key"):
        np.testing.assert_array_equal(after[name], reference[name])
    np.testing.assert_array_equal(after["ir_range_c"], reference["ir_range_c"])


def test_a_capped_run_thumbnails_the_seeded_subset_chunk_by_chunk(trained_run_copy):
    result = embed(trained_run_copy, "last", config=EmbedConfig(chunk_rows=16, batch_size=8, workers=0,
                                                                thumb_size=(6, 8), max_thumbs=20), **QUIET)
    store = open_thumbnails(result.thumbnails)
    layout = store.layout()
    chosen, sampled = seeded_rows(result.rows, 20, 0)
    assert sampled and sorted(layout.rows[layout.rows >= 0]) == list(chosen)
    for c in range(layout.n_chunks):
        assert all(c * 16 <= r < (c + 1) * 16 for r in layout.chunk_rows_of(c))
    stored = store_arrays(result.thumbnails)
    assert (stored["rgb"][stored["row"] >= 0].reshape(20, -1).max(axis=1) > 0).all()
    assert np.isnan(stored["ir_range_c"][stored["row"] < 0]).all()


def test_the_layout_covers_every_row_once_in_its_own_chunk():
    for n, chunk_rows, cap in ((100, 16, 1000), (100, 16, 30), (5, 16, 3), (1, 4, 1)):
        layout = thumb_layout(n, chunk_rows, cap)
        kept = layout.rows[layout.rows >= 0]
        assert list(kept) == list(seeded_rows(n, cap, 0)[0])
        assert len(layout.rows) == layout.n_chunks * layout.cap
        for c in range(layout.n_chunks):
            assert ((layout.chunk_rows_of(c) // layout.chunk_rows) == c).all()


# -- atlases ------------------------------------------------------------------------------------------------------

def test_the_hilbert_order_keeps_neighbours_together():
    side = 32
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), axis=-1).reshape(-1, 2).astype(float)
    order = np.argsort(hilbert_index(grid))
    steps = np.abs(np.diff(grid[order], axis=0)).sum(axis=1)
    assert (steps == 1).all()  # a Hilbert curve moves one cell at a time
    assert len(set(hilbert_index(grid).tolist())) == side * side
    assert hilbert_index(np.array([[np.nan, 0.0], [0.0, 0.0]]))[0] > hilbert_index(np.array([[0.0, 0.0]]))[0]


def test_atlas_order_takes_the_first_map_then_the_next():
    rows = np.array([0, 1, 2, 3, 4])
    first = (np.array([4, 2]), np.array([[1.0, 1.0], [0.0, 0.0]]))
    second = (np.arange(5), np.array([[0.0, 0.0], [9.0, 9.0], [5.0, 5.0], [1.0, 0.0], [3.0, 3.0]]))
    order = atlas_order(rows, [first, second])
    assert sorted(order[:2]) == [2, 4] and sorted(order) == [0, 1, 2, 3, 4]
    assert list(atlas_order(rows, [])) == [0, 1, 2, 3, 4]


def synthetic_store(path, n: int, size=(6, 8), max_thumbs: int | None = None):
    """A complete store whose sample i is one flat colour and one flat IR level, both a function of i."""
    layout = thumb_layout(n, 64, max_thumbs or n)
    keys = [f"k{i}" for i in range(n)]
    create_thumbnail_store(path, keys, layout, size, {"identity": "test", "selection_sha256": "s"})
    group = zarr.open_group(str(path), mode="r+")
    colours = np.random.default_rng(0).integers(0, 256, size=(n, 3), dtype=np.uint8)
    for c in range(layout.n_chunks):
        rows = layout.chunk_rows_of(c)
        rgb = np.broadcast_to(colours[rows][:, None, None, :], (len(rows), *size, 3)).copy()
        ir = np.broadcast_to((rows % 256).astype(np.uint8)[:, None, None], (len(rows), *size)).copy()
        write_thumbnail_chunk(group, c, rgb, ir, np.stack([rows, rows + 1], axis=1).astype(np.float32))
    group.attrs["complete"] = True
    return open_thumbnails(path), colours


def test_the_cell_of_sample_i_holds_sample_is_thumbnail_and_a_rerun_reuses_the_atlases(tmp_path):
    n = 300  # two atlases
    store, colours = synthetic_store(tmp_path / "thumbs.zarr", n)
    xy = np.random.default_rng(1).normal(size=(n, 2))
    out = tmp_path / "atlas"
    thumbs = pack_atlases(store, n, [(np.arange(n), xy)], out, log=lambda m: None)
    assert len(thumbs.atlases) == 2 and thumbs.cell == (8, 6) and thumbs.per_row == PER_ROW
    assert sorted(zip(thumbs.atlas, thumbs.slot)) == sorted({(a, s) for a, s in zip(thumbs.atlas, thumbs.slot)})
    images = [np.asarray(Image.open(path).convert("RGB"), dtype=float) for path in thumbs.atlases]
    w, h = thumbs.cell
    for i in range(n):
        y, x = divmod(int(thumbs.slot[i]), PER_ROW)
        cell = images[thumbs.atlas[i]][y * h : (y + 1) * h, x * 2 * w : (x + 1) * 2 * w]
        mean = cell[1:-1, 1 : w - 1].reshape(-1, 3).mean(axis=0)
        assert np.argmin(np.abs(colours.astype(float) - mean).sum(axis=1)) == i or \
            np.abs(colours[i] - mean).max() < 12, i
    np.testing.assert_array_equal(thumbs.ir_range_c[:, 0], np.arange(n, dtype=np.float32))
    # Hilbert order along the map: the first atlas holds one region of it, not a scatter.
    first = thumbs.atlas == 0
    assert first.sum() == PER_ROW * ROWS
    # Nothing changed: the cached atlases come back, not rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = pack_atlases(store, n, [(np.arange(n), xy)], out, log=lambda m: pytest.fail(m))
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    np.testing.assert_array_equal(again.slot, thumbs.slot)
    # Another map order: made anew.
    moved = pack_atlases(store, n, [(np.arange(n), -xy[:, ::-1])], out, log=lambda m: None)
    assert json.loads((out / "atlas.json").read_text())["identity"] != "" and not np.array_equal(moved.slot, thumbs.slot)


def test_samples_beyond_max_thumbs_have_no_cell(tmp_path):
    store, _ = synthetic_store(tmp_path / "thumbs.zarr", 100, max_thumbs=30)
    thumbs = pack_atlases(store, 100, [], tmp_path / "atlas", log=lambda m: None)
    chosen = seeded_rows(100, 30, 0)[0]
    assert set(np.flatnonzero(thumbs.atlas >= 0)) == set(chosen)
    assert (thumbs.slot[thumbs.atlas < 0] == -1).all() and np.isnan(thumbs.ir_range_c[thumbs.atlas < 0]).all()
