"""`catalog select --keys FILE`: a CSV of keys (what the explorer exports) selects exactly those samples, locally
and from a publication; unknown keys and a file without a key column are one line naming the file."""

from __future__ import annotations

import pyarrow.parquet as pq

import catalog
from catalog.cli import main as catalog_main
from catalog.publication import plan_publish, publish
from tests.test_remote import s3_env, unique_url  # noqa: F401 - s3_env is a fixture


def all_keys(dataset) -> list[str]:
    with catalog.open(dataset) as cat:
        return cat.query("SELECT key FROM samples ORDER BY key").column("key").to_pylist()


def write_keys(path, keys: list[str], header: str = "key") -> str:
    path.write_text(header + "\n" + "".join(f"{k}\n" for k in keys))
    return str(path)


def test_keys_select_exactly_those_samples_and_combine_with_where_and_split(built, tmp_path):
    keys = all_keys(built)[::3]
    csv = write_keys(tmp_path / "keys.csv", keys + keys[:2])  # a key twice selects it once
    out = tmp_path / "sel.parquet"
    assert catalog_main(["select", str(built), "--keys", csv, "--out", str(out)]) == 0
    selection = pq.read_table(out)
    assert sorted(selection.column("key").to_pylist()) == sorted(keys)
    assert selection.schema.metadata[b"sagepairs.keys"] == str(len(keys)).encode()
    with catalog.open(built) as cat:
        expected = cat.select("is_sky", split="train")
    wanted = set(keys) & set(expected.column("key").to_pylist())
    assert catalog_main(["select", str(built), "--keys", csv, "--where", "is_sky", "--split", "train",
                         "--out", str(out)]) == 0
    assert set(pq.read_table(out).column("key").to_pylist()) == wanted
    # The catalog's other columns may sit beside the key, as in any CSV export.
    wide = tmp_path / "wide.csv"
    wide.write_text("vsn,key\n" + "".join(f"x,{k}\n" for k in keys[:4]))
    assert catalog_main(["select", str(built), "--keys", str(wide), "--out", str(out)]) == 0
    assert sorted(pq.read_table(out).column("key").to_pylist()) == sorted(keys[:4])


def test_unknown_keys_and_a_file_without_keys_are_one_line_naming_the_file(built, tmp_path, capsys):
    keys = all_keys(built)[:3]
    csv = write_keys(tmp_path / "keys.csv", keys + ["W999_1", "W999_2", "W999_3", "W999_4"])
    out = tmp_path / "sel.parquet"
    assert catalog_main(["select", str(built), "--keys", csv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and csv in err and "4 of 7 key(s) are not in the catalog" in err
    assert "W999_1, W999_2, W999_3, ..." in err and not out.exists()
    for bad, expected in ((write_keys(tmp_path / "nokey.csv", keys, header="name"), "no 'key' column (has name)"),
                          (str(tmp_path / "absent.csv"), "no such keys file"),
                          # an empty selection's export: refused, not an empty Selection that fails later
                          (write_keys(tmp_path / "empty.csv", []), "no keys (a header line 'key' and nothing under it)")):
        assert catalog_main(["select", str(built), "--keys", bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and bad in err and expected in err, err


def test_keys_select_from_a_published_dataset(built, s3_env, tmp_path):  # noqa: F811 - the fixture
    url = unique_url(s3_env, "keys")
    publish(plan_publish(built, url))
    keys = all_keys(built)[1::4]
    out = tmp_path / "sel.parquet"
    assert catalog_main(["select", url, "--keys", write_keys(tmp_path / "keys.csv", keys), "--out", str(out)]) == 0
    assert sorted(pq.read_table(out).column("key").to_pylist()) == sorted(keys)
