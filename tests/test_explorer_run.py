"""The run side of the explorer: `analysis report` writes RUN/report/explorer/ from what the run has (here PCA
only: no t-SNE, no clusters), with every embedded key, the catalog columns and the thumbnails, and the report links
it; keys exported from it select exactly those samples. The whole `analysis all` is checked in
tests/test_analysis.py::test_all_writes_a_complete_report."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq

from analysis.config import AnalysisConfig, EmbedConfig, PCAConfig
from analysis.explorer import decode_array, read_part
from analysis.explorer_inputs import collect_inputs
from analysis.pipeline import Analysis
from analysis.runs import RANDOM
from catalog.cli import main as catalog_main

CONFIG = AnalysisConfig(embed=EmbedConfig(chunk_rows=16, batch_size=8, workers=0, thumb_size=(12, 16)),
                        pca=PCAConfig(components=4))


def explorer_part(index, name: str) -> dict:
    return read_part(index.parent / "data" / f"{name}.js")


def test_a_run_without_tsne_gets_pca_maps_every_key_and_thumbnails(trained_run_copy, built, tmp_path):
    messages = []
    analysis = Analysis.open(trained_run_copy, CONFIG, progress=False, log=messages.append)
    for checkpoint in ("last", RANDOM):
        analysis.ensure_embeddings(checkpoint)
        analysis.pca(checkpoint)
    report = analysis.report()
    index = trained_run_copy / "report" / "explorer" / "index.html"
    assert index.exists() and "href='explorer/index.html'" in report.read_text()
    assert any("PCA maps only" in m for m in messages), messages
    keys = analysis.embeddings("last").keys()
    meta = read_part(index.parent / "data" / "meta.js")
    assert explorer_part(index, meta["keysPart"])["keys"].split("\n") == list(keys)
    names = [m["name"] for m in meta["maps"]]
    assert names == ["PCA joint", "PCA RGB", "PCA IR", "PCA joint (random init)"], names
    columns = {c["name"] for c in meta["columns"]}
    assert {"vsn", "position", "is_sky", "is_day", "split", "month", "hour_local"} <= columns
    thumbs = explorer_part(index, meta["thumbs"]["part"])
    atlas = decode_array(thumbs["atlas"], "<i4")
    assert len(atlas) == len(keys) and (atlas >= 0).all()
    assert meta["thumbs"]["cell"] == [16, 12] and (index.parent / "thumbs" / meta["thumbs"]["atlases"][0]["file"]).exists()
    # A second report reuses the atlases.
    inputs = collect_inputs(analysis.run, log=lambda m: None)
    np.testing.assert_array_equal(inputs.thumbnails.atlas, atlas)
    # What the page exports (a keys.csv) selects exactly those samples.
    chosen = list(keys[::5])
    csv = tmp_path / "keys.csv"
    csv.write_text("key\n" + "".join(f"{k}\n" for k in chosen))
    assert catalog_main(["select", str(built), "--keys", str(csv), "--out", str(tmp_path / "sel.parquet")]) == 0
    assert sorted(pq.read_table(tmp_path / "sel.parquet").column("key").to_pylist()) == sorted(chosen)
    # An explorer that cannot be rewritten (the trained checkpoint's embeddings gone, e.g. re-embedding from another
    # --where) is removed, not left linked from the new report.
    shutil.rmtree(analysis.run.embeddings("last"))
    report = analysis.report()
    assert not index.parent.exists() and "explorer/index.html" not in report.read_text()
    assert any("explorer: not written" in m for m in messages), messages
