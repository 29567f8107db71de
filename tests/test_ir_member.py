"""The IR member: ``ir.npy.gz`` (gzip of the float32 .npy) in new datasets, ``ir.npy`` in datasets built before
2026-12-05; stock webdataset decodes the new one, and old, new and mixed datasets all read the same values."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

import catalog
import ingest.process
from catalog.maintain import write_snapshot
from catalog.store import DatasetLayout
from ingest.build import build_shards
from shards.cli import main as shards_main
from shards.layout import (
    IR_GZ_MEMBER,
    IR_MEMBER,
    MEMBERS,
    decode_ir,
    encode_ir,
    encode_npy,
    ir_celsius,
    ir_member_of,
    sample_members,
)
from shards.reader import SelectionReader, read_selection
from shards.writer import sample_bytes
from tests.conftest import INGEST
from tests.test_thermal import reference_parse
from training.config import DataConfig
from training.loader import EVAL_AUGMENT, build_batch

QUIET = {"progress": False, "log": lambda message: None}


def build_old_format(raw: Path, dataset: Path) -> None:
    """Build (or add a run to) ``dataset`` as ingest did before 2026-12-05: plain ``ir.npy`` members, and samples
    parts without the ``ir_member`` column (every samples part in the dataset so far is made so)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ingest.process, "IR_WRITTEN", IR_MEMBER)
        build_shards(raw, dataset, INGEST, nodes_csv=raw / "nodes.csv", **QUIET)
    for part in (dataset / "catalog" / "runs").glob("*/samples.parquet"):
        table = pq.read_table(part)
        if "ir_member" in table.column_names:
            assert set(table.column("ir_member").to_pylist()) == {IR_MEMBER}
            pq.write_table(table.drop_columns(["ir_member"]), part)


@pytest.fixture(scope="session")
def old_built(synth_raw, tmp_path_factory) -> Path:
    """synth_raw built the old way (tests must not modify it)."""
    dataset = tmp_path_factory.mktemp("old_built") / "dataset"
    build_old_format(synth_raw, dataset)
    return dataset


def csv_celsius(raw: Path, sample: dict) -> np.ndarray:
    meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
    return reference_parse((raw / meta["thermal_file"]).read_bytes())


def selection_samples(dataset: Path, selection: pa.Table | None = None) -> dict[str, dict]:
    if selection is None:
        with catalog.open(dataset) as cat:
            selection = cat.select()
    return {s["__key__"]: s for s in read_selection(selection, dataset)}


def loader_ir(dataset: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """key -> the IR the training loader's batch builder makes (whole frame, no jitter, 32 x 48)."""
    with catalog.open(dataset) as cat:
        table = cat.select()
    data = DataConfig(dataset=str(dataset), ir_size=(32, 48))
    batch = build_batch(SelectionReader(table, dataset), np.arange(table.num_rows), data, "rgb-ir", 5.0,
                        lambda key: EVAL_AUGMENT, 0.0)
    return dict(zip(batch["keys"], batch["ir"]))


# -- the encoding --------------------------------------------------------------------------------------------

def test_encode_ir_is_a_deterministic_lossless_gzip_of_the_npy():
    rng = np.random.default_rng(0)
    celsius = rng.normal(10, 20, (252, 336)).astype(np.float32)
    celsius[3, :7] = np.nan
    celsius[4, 0] = -0.0
    data = encode_ir(celsius)
    assert data == encode_ir(celsius.copy())  # same input, same bytes
    # gzip magic, deflate, no flags (no file name), mtime 0
    assert data[:8] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00"
    assert gzip.decompress(data) == encode_npy(celsius) == encode_ir(celsius, IR_MEMBER)
    assert len(data) < len(encode_npy(celsius))
    for sample in ({IR_GZ_MEMBER: data}, {IR_MEMBER: encode_npy(celsius)}):
        back = ir_celsius(sample)
        assert back.dtype == np.float32 and np.array_equal(back, celsius, equal_nan=True)
        assert np.signbit(back[4, 0])
    decoded = ir_celsius({IR_GZ_MEMBER: celsius})  # already decoded by a webdataset .decode() stage
    assert decoded is celsius
    assert ir_member_of({"json": b"", IR_GZ_MEMBER: data}) == IR_GZ_MEMBER
    with pytest.raises(KeyError, match="no IR member"):
        ir_celsius({"__key__": "W056_1", "json": b"{}"})
    with pytest.raises(ValueError, match="float64"):
        decode_ir(encode_ir(celsius.astype(np.float64)), IR_GZ_MEMBER)
    with pytest.raises(ValueError, match="IR member"):
        encode_ir(celsius, "ir.npz")


def test_member_order_and_the_writer_takes_either_ir_member():
    assert MEMBERS == sample_members() == ("ir.npy.gz", "json", "rgb.jpg") == tuple(sorted(MEMBERS))
    assert sample_members(IR_MEMBER) == tuple(sorted(sample_members(IR_MEMBER)))
    for ir in (IR_GZ_MEMBER, IR_MEMBER):
        _, where = sample_bytes("W056_1", {ir: b"x" * 600, "json": b"{}", "rgb.jpg": b"y"}, mtime=0)
        assert list(where) == [ir, "json", "rgb.jpg"]
    for wrong in ({"json": b"{}", IR_GZ_MEMBER: b"x", "rgb.jpg": b"y"},
                  {"ir.npz": b"x", "json": b"{}", "rgb.jpg": b"y"},
                  {IR_GZ_MEMBER: b"x", IR_MEMBER: b"x", "json": b"{}", "rgb.jpg": b"y"}):
        with pytest.raises(ValueError, match="members must be exactly"):
            sample_bytes("W056_1", wrong, mtime=0)


def test_stock_webdataset_decode_gives_the_csv_values(built, synth_raw):
    urls = sorted(str(p) for p in (built / "shards").glob("*.tar"))
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        assert IR_MEMBER not in sample
        ir = sample[IR_GZ_MEMBER]
        assert isinstance(ir, np.ndarray) and ir.dtype == np.float32 and ir.shape == (252, 336)
        assert np.array_equal(ir, csv_celsius(synth_raw, sample), equal_nan=True)
        seen += 1
    with catalog.open(built) as cat:
        assert seen == cat.query("SELECT count(*) AS n FROM samples").to_pylist()[0]["n"] > 0


# -- old datasets, new ones, and both in one --------------------------------------------------------------------

def test_an_old_dataset_reads_like_a_new_one(built, old_built, synth_raw):
    assert "ir_member" not in pq.read_schema(next((old_built / "catalog" / "runs").glob("*/samples.parquet"))).names
    with catalog.open(old_built) as cat:
        old_rows = cat.query("SELECT key, ir_member, ir_size, sample_length FROM samples ORDER BY key").to_pylist()
        old_selection = cat.select()
    with catalog.open(built) as cat:
        new_rows = cat.query("SELECT key, ir_member, ir_size, sample_length FROM samples ORDER BY key").to_pylist()
    assert [r["key"] for r in old_rows] == [r["key"] for r in new_rows]
    assert {r["ir_member"] for r in old_rows} == {IR_MEMBER} and {r["ir_size"] for r in old_rows} == {338_816}
    assert {r["ir_member"] for r in new_rows} == {IR_GZ_MEMBER}
    assert old_selection.column("ir_member").to_pylist() == [IR_MEMBER] * old_selection.num_rows
    # Bytes per sample: the IR member under half its .npy size, a whole sample about half (bench/ir_encoding.py).
    assert sum(r["ir_size"] for r in new_rows) < 0.45 * sum(r["ir_size"] for r in old_rows)
    assert sum(r["sample_length"] for r in new_rows) < 0.55 * sum(r["sample_length"] for r in old_rows)
    assert shards_main(["verify", str(old_built)]) == 0

    old, new = selection_samples(old_built), selection_samples(built)
    # A Selection made before 2026-12-05 has no ir_member column: its samples are read as ir.npy.
    older_selection = old_selection.drop_columns(["ir_member"])
    assert [s["__key__"] for s in read_selection(older_selection, old_built)] == list(old)
    assert all(IR_MEMBER in s for s in read_selection(older_selection, old_built))
    assert old.keys() == new.keys()
    for key, sample in old.items():
        assert IR_MEMBER in sample and IR_GZ_MEMBER not in sample
        assert IR_GZ_MEMBER in new[key] and IR_MEMBER not in new[key]
        assert sample["json"] == new[key]["json"] and sample["rgb.jpg"] == new[key]["rgb.jpg"]
        celsius = ir_celsius(sample)
        assert celsius.dtype == np.float32 and np.array_equal(celsius, ir_celsius(new[key]), equal_nan=True)
        assert np.array_equal(celsius, csv_celsius(synth_raw, sample), equal_nan=True)

    # The training loader's decode path gives the same IR from either.
    old_ir, new_ir = loader_ir(old_built), loader_ir(built)
    assert old_ir.keys() == new_ir.keys() == old.keys()
    for key in old_ir:
        assert torch.equal(old_ir[key], new_ir[key])


def test_a_dataset_with_an_old_run_and_a_new_run_reads_both(raw_copy, tmp_path, truth, built, synth_raw):
    dataset = tmp_path / "dataset"
    late_keys = {t["key"] for t in truth if t["vsn"] == "W057"}
    late = [p for p in raw_copy.glob("W057/*") if f"W057_{p.name.split('-')[0]}" in late_keys]
    parked = tmp_path / "parked"
    parked.mkdir()
    for p in late:
        shutil.move(p, parked / p.name)
    build_old_format(raw_copy, dataset)  # the first run, before the change
    for p in late:
        shutil.move(parked / p.name, p)
    build_shards(raw_copy, dataset, INGEST, nodes_csv=raw_copy / "nodes.csv", **QUIET)  # the run after it

    def check() -> None:
        with catalog.open(dataset) as cat:
            rows = cat.query("SELECT key, vsn, ir_member FROM samples").to_pylist()
            selection = cat.select()
        members = {(r["vsn"] == "W057", r["ir_member"]) for r in rows}
        assert members == {(False, IR_MEMBER), (True, IR_GZ_MEMBER)}
        assert shards_main(["verify", str(dataset)]) == 0
        samples = selection_samples(dataset, selection)
        by_key = {r["key"]: r["ir_member"] for r in rows}
        assert samples.keys() == by_key.keys()
        for key, sample in samples.items():
            assert ir_member_of(sample) == by_key[key]
            assert np.array_equal(ir_celsius(sample), csv_celsius(raw_copy, sample), equal_nan=True)
        mixed_ir, new_ir = loader_ir(dataset), loader_ir(built)
        assert mixed_ir.keys() == new_ir.keys()
        assert all(torch.equal(mixed_ir[key], new_ir[key]) for key in mixed_ir)

    check()
    # Stock webdataset reads both kinds of shard: the first of the two names a sample has.
    urls = sorted(str(p) for p in (dataset / "shards").glob("*.tar"))
    kinds = set()
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        kinds.add(ir_member_of(sample))
        ir = wds.filters.getfirst(sample, f"{IR_GZ_MEMBER};{IR_MEMBER}")
        assert ir.dtype == np.float32 and np.array_equal(ir, csv_celsius(raw_copy, sample), equal_nan=True)
    assert kinds == {IR_MEMBER, IR_GZ_MEMBER}
    # Compaction writes ir_member for the old run's rows too; everything still reads.
    write_snapshot(DatasetLayout(dataset))
    snapshot = next((dataset / "catalog" / "snapshots").glob("*/samples.parquet"))
    assert set(pq.read_table(snapshot, columns=["ir_member"]).column(0).to_pylist()) == {IR_MEMBER, IR_GZ_MEMBER}
    check()


def test_catalog_parts_of_every_age_read_together(built_copy):
    """A part with draft_factor and no ir_member (before 2026-11-28), one with decode_scale and no ir_member, and
    one of today: one view, each row with its own decode_scale and ir_member."""
    runs = sorted((built_copy / "catalog" / "runs").iterdir())
    part = runs[-1] / "samples.parquet"
    today = pq.read_table(part)
    n = today.num_rows
    oldest = today.drop_columns(["decode_scale", "ir_member"])
    oldest = oldest.append_column("draft_factor", pa.array([2] * n, pa.int8()))
    pq.write_table(oldest, part)
    with catalog.open(built_copy) as cat:
        rows = cat.query("SELECT * FROM samples").to_pylist()
    assert len(rows) == n and "draft_factor" not in rows[0]
    assert {(r["decode_scale"], r["ir_member"]) for r in rows} == {(0.5, IR_MEMBER)}
    for number, table in ((1, today.drop_columns(["ir_member"])), (2, today)):
        later = runs[-1].with_name(f"run-{int(runs[-1].name.split('-')[1]) + number:06d}")
        shutil.copytree(runs[-1], later)
        pq.write_table(table, later / "samples.parquet")
    with catalog.open(built_copy) as cat:
        counts = cat.query("SELECT decode_scale, ir_member, count(*) AS n FROM samples GROUP BY ALL").to_pylist()
        selection = cat.select()
    assert {(r["decode_scale"], r["ir_member"]): r["n"] for r in counts} == {
        (0.5, IR_MEMBER): n, (1.0, IR_MEMBER): n, (1.0, IR_GZ_MEMBER): n}
    assert "ir_member" in selection.column_names
