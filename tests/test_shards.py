"""shards verify, and reading Selections by byte range (equal to a stock webdataset scan)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import webdataset as wds

import catalog
from shards.cli import main as shards_main
from shards.reader import ShardReadError, partition, read_selection


def _first_sample(dataset):
    with catalog.open(dataset) as cat:
        return cat.query("SELECT * FROM samples ORDER BY shard, sample_offset LIMIT 1").to_pylist()[0]


def test_verify_ok(built, capsys):
    assert shards_main(["verify", str(built)]) == 0
    assert capsys.readouterr().out.startswith("OK:")


def test_verify_catches_one_flipped_byte(built_copy, capsys):
    sample = _first_sample(built_copy)
    path = built_copy / "shards" / sample["shard"]
    with open(path, "r+b") as fh:
        fh.seek(sample["rgb_offset"] + 100)
        byte = fh.read(1)
        fh.seek(sample["rgb_offset"] + 100)
        fh.write(bytes([byte[0] ^ 0x01]))
    assert shards_main(["verify", str(built_copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {sample['shard']}: sha256" in out


def test_verify_catches_a_moved_member_and_a_truncated_shard(built_copy, capsys):
    sample = _first_sample(built_copy)
    path = built_copy / "shards" / sample["shard"]
    with open(path, "r+b") as fh:  # corrupt the name in the json member's tar header
        fh.seek(sample["json_offset"] - 512)
        fh.write(b"X")
    size = path.stat().st_size
    os.truncate(path, size // 2)
    assert shards_main(["verify", str(built_copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {sample['shard']} {sample['key']}: no valid tar header before {sample['key']}.json" in out
    assert f"FAIL {sample['shard']}: {size // 2} bytes on disk" in out
    assert "past the end of the shard" in out


def test_untracked_shards_are_reported_not_trusted(built_copy, capsys):
    (built_copy / "shards" / "sage-999999.tar").write_bytes(b"\0" * 1024)
    assert shards_main(["verify", str(built_copy)]) == 0
    assert "sage-999999.tar is not listed in the catalog" in capsys.readouterr().out


@pytest.mark.parametrize("remainder", ["pad", "drop", "uneven"])
def test_partition(remainder):
    for n in (0, 1, 7, 10, 33):
        for slots in (1, 2, 3, 4):
            parts = [partition(n, s, slots, remainder) for s in range(slots)]
            counts = {len(p) for p in parts}
            covered = set(np.concatenate(parts).tolist()) if n else set()
            if remainder == "uneven":
                assert sorted(np.concatenate(parts).tolist()) == list(range(n))
                assert max(counts) - min(counts) <= 1
            else:
                assert len(counts) == 1
                if remainder == "pad":
                    assert covered == set(range(n))
                else:
                    assert len(covered) == sum(len(p) for p in parts)


def _stock(built, keys=None):
    urls = sorted(str(p) for p in (built / "shards").glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False) if keys is None or s["__key__"] in keys}


def test_selection_reads_equal_a_filtered_stock_scan(built, tmp_path):
    path = tmp_path / "sel.parquet"
    assert catalog_cli(["select", str(built), "--where", "is_sky AND NOT is_day OR position = 0", "--out", str(path)]) == 0
    import pyarrow.parquet as pq

    keys = set(pq.read_table(path).column("key").to_pylist())
    assert 0 < len(keys)
    mine = list(read_selection(path))
    stock = _stock(built, keys)
    assert [s["__key__"] for s in mine] == sorted(stock, key=lambda k: [s["__key__"] for s in mine].index(k))
    assert {s["__key__"] for s in mine} == keys
    for sample in mine:
        for field in ("ir.npy.gz", "json", "rgb.jpg", "__key__"):
            assert sample[field] == stock[sample["__key__"]][field]
        assert set(sample) == set(stock[sample["__key__"]])


def test_full_selection_and_decode(built):
    with catalog.open(built) as cat:
        selection = cat.select()
    stock = _stock(built)
    decoded = list(read_selection(selection, decode="rgb8"))
    assert len(decoded) == len(stock)
    first = decoded[0]
    assert first["rgb.jpg"].shape == (504, 672, 3) and first["ir.npy.gz"].dtype == np.float32


def test_ranks_and_dataloader_workers_get_equal_counts(built):
    import torch

    with catalog.open(built) as cat:
        selection = cat.select("vsn <> 'V017'")
    n = selection.num_rows
    per_rank = []
    for rank in range(2):
        pipeline = read_selection(selection, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
        per_rank.append([s["__key__"] for s in loader])
    assert len(per_rank[0]) == len(per_rank[1]) == 2 * (-(-n // 4))
    assert set(per_rank[0]) | set(per_rank[1]) == set(selection.column("key").to_pylist())


def test_truncated_shard_is_named(built_copy):
    with catalog.open(built_copy) as cat:
        selection = cat.select()
    sample = _first_sample(built_copy)
    path = built_copy / "shards" / sample["shard"]
    os.truncate(path, path.stat().st_size - 4096)
    with pytest.raises(ShardReadError, match=sample["shard"]):
        list(read_selection(selection))


def catalog_cli(argv):
    from catalog.cli import main

    return main(argv)


def test_writer_bytes_equal_tarfile_and_roll_over(tmp_path):
    """Samples written to two segment files, cut by size and assembled, give exactly tarfile's bytes."""
    import io
    import tarfile

    from shards.writer import ShardCuts, assemble_shard, sample_bytes

    samples = [(f"W056_{i}", {"ir.npy.gz" if i % 2 else "ir.npy": bytes([i]) * (1000 + i), "json": b"{}",
                              "rgb.jpg": bytes(513 + i)}) for i in range(5)]
    segments = [tmp_path / "a.seg", tmp_path / "b.seg"]
    cuts = ShardCuts(target_bytes=6000)
    shards: list[list] = []  # per shard: (key, mtime, members, range in a segment, offset in the shard)
    for i, (key, members) in enumerate(samples):
        data, relative = sample_bytes(key, members, mtime=1685708796 + i)
        segment = segments[i * len(segments) // len(samples)]
        with open(segment, "ab") as out:
            start = out.tell()
            out.write(data)
        if cuts.starts_shard(len(data)):
            shards.append([])
        shards[-1].append((key, 1685708796 + i, members, (str(segment), start, len(data)), cuts.shard_bytes - len(data), relative))
    assert len(shards) > 1
    for n, shard in enumerate(shards):
        path = tmp_path / f"{n}.tar"
        sha256, size = assemble_shard(path, [s[3] for s in shard])
        reference = io.BytesIO()
        with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, mtime, members, _, _, _ in shard:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), mtime, 0o444, 0, 0
                    info.uname = info.gname = "sagepairs"
                    tar.addfile(info, io.BytesIO(data))
        data = path.read_bytes()
        assert data == reference.getvalue() and size == len(data)
        assert sha256 == hashlib.sha256(data).hexdigest()
        for _, _, members, _, offset, relative in shard:
            for ext, member in relative.items():
                assert data[offset + member.offset : offset + member.offset + member.size] == members[ext]
    with pytest.raises(OSError, match="truncated"):
        assemble_shard(tmp_path / "bad.tar", [(str(segments[0]), 0, segments[0].stat().st_size + 1)])
