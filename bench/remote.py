"""A published dataset read from S3 by byte range, through a proxy that adds 20 ms to every request (issue 17).

Dataset: ~1,200 samples built by the real pipeline (synth at small source size: the shard members are the same
size as from full frames: 672x504 JPEG q90 + 336x252 IR as stored), in 16 MB shards so that there are well over 8;
published once per run to a SeaweedFS S3 server on loopback (tests/objectstore.py, a temporary directory), and
read through its ``FaultProxy`` with ``latency_s=0.02`` (no faults). The local runs read the same dataset from
its directory with the page cache warm. On this 2-core machine the S3 server and the proxy (a thread of this
process) share the cores with the readers: every figure of an S3 run comes with the CPU each of them used.

1. Full read, the training loader: ``PairBatches`` through ``make_loader`` with 2 workers, batch 64, the default
   ``DataConfig`` (decode='cpu', RGB 240x320, IR 120x160, prefetch 4), mode rgb-ir, shuffled epochs of the whole
   selection, as bench/train.py runs it; the first 2 x workers batches (start-up) not counted. Local and S3 runs
   alternate; median of each. Target: S3 >= 0.8 x the local samples/s. For context, a plain ``read_selection``
   full read (no decode) in this process, local vs S3.
2. A 10% SQL subset (``hash(key) % 10 = 3``): bytes through the proxy vs the bytes the selection wants (target
   <= 1.3x), and its time vs the anchors' approach: download every shard the subset touches whole (8 GETs in
   flight, written to a local directory), then read the samples from there (target: byte ranges >= 5x faster).
3. Bytes per sample of the dataset (the catalog's mean sample_length; bench/ir_encoding.py measures the change).

    python bench/remote.py [--frames 600] [--repeats 5] [--epochs 2] [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import OUT, record  # noqa: E402

SHARD_MB = 16  # several shards from ~220 MB of samples (the default 64 MB would make only 4)
LATENCY_S = 0.02  # added by the proxy to every request
LINK_BPS = 1e9  # the link of the capped subset comparison: 1 Gb/s, a node's share of a site's network
WORKERS = 2
BATCH = 64
SUBSET = "hash(key) % 10 = 3"
IN_FLIGHT = 8  # the anchors' whole-shard downloads at once
BUCKET_PREFIX = "remote-bench"


def dataset(frames_per_node: int) -> Path:
    """OUT/remote-<frames>-16mb/dataset, built like bench._common.synthetic_dataset but with 16 MB shards."""
    from ingest.build import build_shards
    from ingest.config import IngestConfig
    from ingest.synth import SynthConfig, synthesize

    root = OUT / f"remote-{frames_per_node}-{SHARD_MB}mb"
    if not (root / "dataset" / "catalog").exists():
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root / "raw", SynthConfig(nodes=2, frames=frames_per_node, seed=7, scale=0.1))
        build_shards(root / "raw", root / "dataset", IngestConfig(shard_target_mb=SHARD_MB),
                     nodes_csv=root / "raw" / "nodes.csv")
        shutil.rmtree(root / "raw")
    return root / "dataset"


# -- CPU accounting (/proc) -----------------------------------------------------------------------------------------
_HZ = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> float:
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _HZ


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                try:
                    todo += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    pass
        except OSError:
            pass
    return out


def _threads_by_name() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by name: Python's own names (MainThread, sagepairs-storage,
    FaultProxy...) where the thread is a Python one, else the kernel's (tokio-rt-worker: obstore's runtime)."""
    import threading

    python_names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = python_names.get(int(task.name)) or (task / "comm").read_text().strip()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + _stat_cpu(str(task / "stat"))
    return out


def _busy_cores_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, _steal = fields
    return (user + nice + system + irq + softirq) / _HZ


class Meter:
    """CPU seconds used meanwhile by: this process's threads (by name), the S3 server, given processes, the machine."""

    def __init__(self, server_pid: int | None, proxy_tid: int | None) -> None:
        self.server_pid, self.proxy_tid = server_pid, proxy_tid
        self.t0, self.busy0 = time.perf_counter(), _busy_cores_s()
        self.threads0 = _threads_by_name()
        self.own0 = _stat_cpu("/proc/self/stat")
        self.proxy0 = self._proxy()
        self.server0 = self._server()

    def _proxy(self) -> float:
        return _stat_cpu(f"/proc/self/task/{self.proxy_tid}/stat") if self.proxy_tid else 0.0

    def _server(self) -> float:
        return sum(_stat_cpu(f"/proc/{p}/stat") for p in _descendants(self.server_pid)) if self.server_pid else 0.0

    def stop(self, others: dict[int, float] | None = None) -> dict:
        """``others``: pid -> CPU seconds they used in the window (DataLoader workers, read before they exit)."""
        wall = time.perf_counter() - self.t0
        threads = {k: v - self.threads0.get(k, 0.0) for k, v in _threads_by_name().items()}
        proxy = self._proxy() - self.proxy0
        server = self._server() - self.server0
        own = _stat_cpu("/proc/self/stat") - self.own0
        workers = sum((others or {}).values())
        busy = _busy_cores_s() - self.busy0
        return {"wall": wall, "proxy": proxy, "server": server, "main": own - proxy, "workers": workers,
                "threads": threads, "other": max(busy - own - server - workers, 0.0)}


def cpu_line(m: dict, split: bool = False) -> str:
    """Cores used on average; ``split``: this process's share by thread (the reader's own threads)."""
    w = m["wall"]
    parts = [f"workers {m['workers'] / w:.2f}"] if m["workers"] else []
    own = f"this process {m['main'] / w:.2f}"
    if split:
        t = dict(m["threads"])
        t.pop("FaultProxy", None)
        named = {"MainThread": "main thread", "sagepairs-storage": "storage loop", "tokio-rt-worker": "obstore runtime"}
        shown = [f"{label} {t.pop(name, 0.0) / w:.2f}" for name, label in named.items()]
        shown.append(f"other threads {max(sum(t.values()), 0.0) / w:.2f}")
        own += f" ({', '.join(shown)})"
    parts += [own, f"proxy {m['proxy'] / w:.2f}", f"S3 server {m['server'] / w:.2f}",
              f"everything else {m['other'] / w:.2f}"]
    return "cores used: " + ", ".join(parts)


def pooled(meters: list[dict]) -> dict:
    """Several short windows as one (CPU time is counted in 10 ms ticks: one 100 ms window says little)."""
    out = {k: sum(m[k] for m in meters) for k in ("wall", "proxy", "server", "main", "workers", "other")}
    threads: dict[str, float] = {}
    for m in meters:
        for name, v in m["threads"].items():
            threads[name] = threads.get(name, 0.0) + v
    out["threads"] = threads
    return out


# -- the pieces -------------------------------------------------------------------------------------------------------
def drain(iterable) -> int:
    from shards.layout import ir_member_of

    count = 0
    for sample in iterable:
        count += len(sample[ir_member_of(sample)]) > 0
    return count


def warm(root: Path) -> None:
    for p in sorted((root / "shards").glob("*.tar")):
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def loader_run(where: Path | str, table, fill: float, epochs: int, meter_args) -> dict:
    """The training loader over ``epochs`` shuffled epochs of the whole selection; samples/s after start-up.

    The plan holds one epoch more than is counted (as in bench/train.py), so that no worker runs out of steps and
    exits inside the counted window (its CPU time could not be read after).
    """
    from shards.reader import SelectionReader
    from training.config import DataConfig
    from training.loader import PairBatches, StepPlan, make_loader

    data = DataConfig()
    plan = StepPlan(table.num_rows, BATCH, 1, 0, epochs + 1)
    counted_steps = plan.steps_per_epoch * epochs
    batches = PairBatches(SelectionReader(table, where), plan, 0, data, "rgb-ir", 0, plan.total_steps, fill)
    skip = 2 * WORKERS
    started = time.perf_counter()
    loader = make_loader(batches, WORKERS, data.prefetch, pin_memory=False)
    iterator = iter(loader)
    count, total, pids, cpu0, meter, steady_from, first_at = 0, 0, [], {}, None, 0.0, 0.0
    try:
        for i in range(counted_steps):
            batch = next(iterator)
            assert batch["rgb"].shape == (BATCH, *data.rgb_size, 3) and batch["ir"].shape == (BATCH, *data.ir_size)
            total += len(batch["keys"])
            if i == 0:
                first_at = time.perf_counter() - started
            if i == skip - 1:
                pids = [w.pid for w in iterator._workers]  # the DataLoader's worker processes (forked or forkserver's)
                cpu0 = {p: _stat_cpu(f"/proc/{p}/stat") for p in pids}
                meter = Meter(*meter_args)
                steady_from = time.perf_counter()
            elif i >= skip:
                count += len(batch["keys"])
        end = time.perf_counter()
        # The workers are still busy (the extra epoch): read their CPU time before shutting them down.
        used = meter.stop({p: _stat_cpu(f"/proc/{p}/stat") - cpu0[p] for p in pids})
    finally:
        # The workers ignore SIGTERM (training.loader.make_loader), so they are told to stop, as training does.
        iterator._shutdown_workers()
        del iterator, loader
    return {"rate": count / (end - steady_from), "whole_rate": total / (end - started), "first_s": first_at,
            "samples": count, "steps": counted_steps, "cpu": used,
            "worker_ms": used["workers"] / count * 1000}


def anchors_read(store, table, local: Path) -> int:
    """The anchors' way: every shard the subset touches downloaded whole (IN_FLIGHT at once), then read locally."""
    from catalog.storage import run
    from shards.reader import SelectionReader

    names = sorted(set(table.column("shard").to_pylist()))
    (local / "shards").mkdir(parents=True, exist_ok=True)

    async def download() -> None:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(name: str) -> None:
            async with gate:
                data = await store.read_async(f"shards/{name}")
            # To local disk, as the anchors keep them (a thread, so the other downloads go on meanwhile).
            await asyncio.to_thread((local / "shards" / name).write_bytes, data)

        await asyncio.gather(*(one(n) for n in names))

    run(download())
    return drain(SelectionReader(table, local))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=600, help="frames per node, 2 nodes (default 600)")
    parser.add_argument("--repeats", type=int, help="runs of each kind (default 5; 2 with --quick)")
    parser.add_argument("--epochs", type=int, help="epochs per loader run (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="2 runs of each kind, 1 epoch each")
    parser.add_argument("--no-record", action="store_true", help="print the figures without appending to RESULTS.md")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    epochs = args.epochs or (1 if args.quick else 2)
    bench_started = time.perf_counter()

    import catalog
    from catalog import storage
    from catalog.publication import plan_publish, publish
    from shards.reader import read_selection
    from tests.objectstore import FaultProxy, SeaweedS3

    root = dataset(args.frames)
    with catalog.open(root) as cat:
        local_all = cat.select("TRUE")
        local_subset = cat.select(SUBSET)
        fill = float(cat.query("SELECT avg(ir_mean) AS m FROM samples WHERE ir_mean IS NOT NULL AND NOT "
                               "isnan(ir_mean)").column("m")[0].as_py() or 0.0)
    shard_files = sorted((root / "shards").glob("*.tar"))
    total_bytes = sum(p.stat().st_size for p in shard_files)
    warm(root)

    tmp = Path(tempfile.mkdtemp(prefix="sagepairs-remote-bench-"))
    lines: list[str] = []
    try:
        for name in [v for v in os.environ if v.startswith("AWS_")]:
            del os.environ[name]
        os.environ["SAGEPAIRS_CACHE"] = str(tmp / "cache")
        with SeaweedS3(tmp / "s3") as s3, FaultProxy(s3, latency_s=LATENCY_S) as proxy:
            # Publish straight to the server (not timed, not through the proxy).
            os.environ.update(s3.env())
            storage.forget_clients()
            url = f"s3://{s3.private_bucket}/{BUCKET_PREFIX}"
            t0 = time.perf_counter()
            publish(plan_publish(root, url))
            publish_s = time.perf_counter() - t0
            # Everything from here goes through the proxy (the DataLoader's forkserver starts later, with this env).
            os.environ.update(s3.env(proxy.endpoint))
            storage.forget_clients()
            with catalog.open(url) as cat:
                remote_all = cat.select("TRUE")
                remote_subset = cat.select(SUBSET)
            assert remote_all.column("key").equals(local_all.column("key"))
            assert remote_subset.num_rows == local_subset.num_rows
            meter_args = (s3.pid, proxy._thread.native_id)
            sample_length = np.asarray(remote_all.column("sample_length"))
            n_shards = len(set(remote_all.column("shard").to_pylist()))
            lines.append(
                f"dataset: {remote_all.num_rows} samples in {n_shards} shards ({SHARD_MB} MB target), "
                f"{total_bytes / 1e6:.0f} MB; published to SeaweedFS S3 on loopback in {publish_s:.1f} s; every S3 "
                f"read below goes through FaultProxy adding {LATENCY_S * 1000:.0f} ms to each request; local reads "
                f"with the page cache warm")
            print(lines[-1], flush=True)

            # 1. The training loader, local and S3 alternating.
            runs: dict[str, list[dict]] = {"local": [], "s3": []}
            for _ in range(repeats):
                for kind, where in (("local", root), ("s3", url)):
                    proxy.reset_stats()
                    r = loader_run(where, local_all if kind == "local" else remote_all, fill, epochs, meter_args)
                    r["proxy_bytes"], r["proxy_requests"] = proxy.bytes_down, proxy.requests
                    runs[kind].append(r)
                    print(f"  loader {kind}: {r['rate']:.0f} samples/s steady, {r['whole_rate']:.0f} whole "
                          f"(first batch {r['first_s']:.1f} s), worker CPU {r['worker_ms']:.2f} ms/sample, "
                          f"{cpu_line(r['cpu'])}", flush=True)
            local_rate = statistics.median(r["rate"] for r in runs["local"])
            s3_rate = statistics.median(r["rate"] for r in runs["s3"])
            local_whole = statistics.median(r["whole_rate"] for r in runs["local"])
            s3_whole = statistics.median(r["whole_rate"] for r in runs["s3"])
            ratio = s3_rate / local_rate
            pairs = [b["rate"] / a["rate"] for a, b in zip(runs["local"], runs["s3"])]
            steps = runs["local"][0]["steps"]
            counted = runs["local"][0]["samples"]

            def rates(kind: str) -> str:
                return ", ".join(f"{r['rate']:.0f}" for r in runs[kind])

            def per_sample(key: str) -> float:
                return statistics.median(r["cpu"][key] / r["samples"] * 1000 for r in runs["s3"])

            def med(kind: str, key: str) -> float:
                return statistics.median(r["cpu"][key] / r["cpu"]["wall"] for r in runs[kind])

            lines.append(
                f"full read, training loader ({WORKERS} workers, batch {BATCH}, decode='cpu', RGB 240x320 + IR "
                f"120x160, prefetch 4, {epochs} shuffled epoch(s) = {steps} steps, {counted} samples counted after "
                f"the first {2 * WORKERS} batches), median of {repeats} alternating runs: S3 {s3_rate:.0f} samples/s "
                f"({rates('s3')}) vs local {local_rate:.0f} ({rates('local')}) = {ratio:.2f}; run by run "
                f"{', '.join(f'{a:.2f}' for a in pairs)} (median {statistics.median(pairs):.2f}) (target >= 0.8: "
                f"{'met' if ratio >= 0.8 else 'NOT met'})")
            lines.append(
                f"  the same including start-up (loader made -> last batch): S3 {s3_whole:.0f} vs local "
                f"{local_whole:.0f} samples/s = {s3_whole / local_whole:.2f}; first batch after "
                f"{statistics.median(r['first_s'] for r in runs['s3']):.1f} s (S3, forkserver workers) vs "
                f"{statistics.median(r['first_s'] for r in runs['local']):.1f} s (local, forked)")
            lines.append(
                f"  CPU while counted (median cores): S3 runs: workers {med('s3', 'workers'):.2f}, proxy "
                f"{med('s3', 'proxy'):.2f}, S3 server {med('s3', 'server'):.2f}, training process "
                f"{med('s3', 'main'):.2f}, everything else {med('s3', 'other'):.2f}; local runs: workers "
                f"{med('local', 'workers'):.2f}, training process {med('local', 'main'):.2f}, everything else "
                f"{med('local', 'other'):.2f}; worker CPU per sample S3 "
                f"{statistics.median(r['worker_ms'] for r in runs['s3']):.2f} ms vs local "
                f"{statistics.median(r['worker_ms'] for r in runs['local']):.2f} ms, and on S3 runs the proxy "
                f"{per_sample('proxy'):.2f} ms + the S3 server {per_sample('server'):.2f} ms per sample on these cores "
                f"too; proxy bytes per S3 run "
                f"{statistics.median(r['proxy_bytes'] for r in runs['s3']) / 1e6:.0f} MB in "
                f"{statistics.median(r['proxy_requests'] for r in runs['s3']):.0f} requests")
            print("\n".join(lines[-3:]), flush=True)

            # 1b. A plain full read, no decode, in this process.
            plain: dict[str, list[float]] = {"local": [], "s3": []}
            plain_cpu, plain_bytes = [], []
            for i in range(repeats + 1):  # the first of each warms up, not counted
                for kind, table, where in (("local", local_all, root), ("s3", remote_all, url)):
                    proxy.reset_stats()
                    meter = Meter(*meter_args)
                    t0 = time.perf_counter()
                    n = drain(read_selection(table, where))
                    seconds = time.perf_counter() - t0
                    used = meter.stop()
                    assert n == table.num_rows
                    if i:
                        plain[kind].append(seconds)
                        if kind == "s3":
                            plain_cpu.append(used)
                            plain_bytes.append(proxy.bytes_down)
            local_s, s3_s = statistics.median(plain["local"]), statistics.median(plain["s3"])
            used = pooled(plain_cpu)
            lines.append(
                f"plain read_selection full read (no decode, this process), median of {repeats}: S3 "
                f"{remote_all.num_rows / s3_s:.0f} samples/s ({total_bytes / 1e6 / s3_s:.0f} MB/s, {s3_s:.2f} s) vs "
                f"local {local_all.num_rows / local_s:.0f} samples/s ({local_s:.2f} s) = {local_s / s3_s:.2f}; "
                f"through the proxy {statistics.median(plain_bytes) / total_bytes:.3f} x the shards' bytes; over the S3 "
                f"runs {cpu_line(used, split=True)}")
            print(lines[-1], flush=True)

            # 2. The 10% subset: bytes and time, byte ranges vs the anchors' whole-shard downloads.
            wanted = int(np.asarray(remote_subset.column("sample_length")).sum())
            touched = sorted(set(remote_subset.column("shard").to_pylist()))
            touched_bytes = sum(p.stat().st_size for p in shard_files if p.name in touched)
            store = storage.storage(url)
            ranged, anchors, ranged_bytes, ranged_requests, anchor_bytes = [], [], [], [], []
            ranged_cpu, anchor_cpu = [], []
            for i in range(repeats + 1):  # the first of each warms up, not counted
                proxy.reset_stats()
                meter = Meter(*meter_args)
                t0 = time.perf_counter()
                n = drain(read_selection(remote_subset))
                seconds = time.perf_counter() - t0
                used = meter.stop()
                assert n == remote_subset.num_rows
                if i:
                    ranged.append(seconds)
                    ranged_cpu.append(used)
                    ranged_bytes.append(proxy.bytes_down)
                    ranged_requests.append(proxy.requests)
                local_copy = tmp / "anchors"
                shutil.rmtree(local_copy, ignore_errors=True)
                proxy.reset_stats()
                meter = Meter(*meter_args)
                t0 = time.perf_counter()
                n = anchors_read(store, remote_subset, local_copy)
                seconds = time.perf_counter() - t0
                used = meter.stop()
                assert n == remote_subset.num_rows
                if i:
                    anchors.append(seconds)
                    anchor_cpu.append(used)
                    anchor_bytes.append(proxy.bytes_down)
            shutil.rmtree(tmp / "anchors", ignore_errors=True)
            r_s, a_s = statistics.median(ranged), statistics.median(anchors)
            amp = statistics.median(ranged_bytes) / wanted
            speed = a_s / r_s
            lines.append(
                f"10% SQL subset (`{SUBSET}`: {remote_subset.num_rows} samples in {len(touched)} of {n_shards} "
                f"shards): through the proxy {statistics.median(ranged_bytes) / 1e6:.1f} MB in "
                f"{statistics.median(ranged_requests):.0f} requests for {wanted / 1e6:.1f} MB wanted = {amp:.3f}x "
                f"(target <= 1.3x: {'met' if amp <= 1.3 else 'NOT met'})")
            lines.append(
                f"10% SQL subset time, median of {repeats}: byte ranges {r_s * 1000:.0f} ms "
                f"({', '.join(f'{s * 1000:.0f}' for s in ranged)}) vs the anchors' whole-shard download of the "
                f"{len(touched)} shards ({IN_FLIGHT} in flight, {statistics.median(anchor_bytes) / 1e6:.0f} MB "
                f"through the proxy, {touched_bytes / 1e6:.0f} MB of shards) + local read {a_s * 1000:.0f} ms "
                f"({', '.join(f'{s * 1000:.0f}' for s in anchors)}) = {speed:.1f}x (target >= 5x: "
                f"{'met' if speed >= 5 else 'NOT met'})")
            lines.append(f"  over the {repeats} runs of each, byte ranges {cpu_line(pooled(ranged_cpu), split=True)}; "
                         f"anchors {cpu_line(pooled(anchor_cpu), split=True)}")
            print("\n".join(lines[-3:]), flush=True)

            # 2b. The same over a link: loopback carries whole shards at the server's speed, which no network does.
            proxy.bandwidth_bps = LINK_BPS
            capped_ranged, capped_anchors = [], []
            for _ in range(max(repeats // 2, 1)):
                t0 = time.perf_counter()
                assert drain(read_selection(remote_subset)) == remote_subset.num_rows
                capped_ranged.append(time.perf_counter() - t0)
                shutil.rmtree(tmp / "anchors", ignore_errors=True)
                t0 = time.perf_counter()
                assert anchors_read(store, remote_subset, tmp / "anchors") == remote_subset.num_rows
                capped_anchors.append(time.perf_counter() - t0)
            proxy.bandwidth_bps = None
            shutil.rmtree(tmp / "anchors", ignore_errors=True)
            cr_s, ca_s = statistics.median(capped_ranged), statistics.median(capped_anchors)
            lines.append(
                f"10% SQL subset time over a {LINK_BPS / 1e9:.0f} Gb/s link (FaultProxy's shared cap, + {LATENCY_S * 1000:.0f} "
                f"ms a request), median of {len(capped_ranged)}: byte ranges {cr_s * 1000:.0f} ms vs whole-shard "
                f"download + local read {ca_s * 1000:.0f} ms = {ca_s / cr_s:.1f}x (target >= 5x: "
                f"{'met' if ca_s / cr_s >= 5 else 'NOT met'})")
            print(lines[-1], flush=True)

            # 3. Bytes per sample.
            lines.append(
                f"bytes per sample (catalog's mean sample_length): {sample_length.mean() / 1e3:.1f} kB "
                f"(shard bytes per sample {total_bytes / remote_all.num_rows / 1e3:.1f} kB; IR member "
                f"{np.asarray(remote_all.column('ir_size')).mean() / 1e3:.1f} kB as "
                f"{', '.join(sorted(set(remote_all.column('ir_member').to_pylist())))}, RGB "
                f"{np.asarray(remote_all.column('rgb_size')).mean() / 1e3:.1f} kB); the IR encoding change: "
                f"bench/ir_encoding.py")
            lines.append(f"bench wall time {time.perf_counter() - bench_started:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.no_record:
        print("\n".join(lines))
    else:
        record("bench/remote.py", lines)


if __name__ == "__main__":
    main()
