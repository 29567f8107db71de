"""Analysis at full size on CPU: streamed PCA of a million embeddings, t-SNE of 100k points, k-NN of 100k x 100k.

Data: synthetic Gaussian blobs (a few hundred clusters, isotropic noise, a few percent of background points drawn
from a wider Gaussian), float32, made here; nothing is read from a real run.

1. PCA: a 1,000,000 x 384 ``rgb`` store made with ``analysis.store.create_embedding_store`` (keys k0000000...,
   chunks of ``embed.chunk_rows`` rows), filled chunk by chunk (each chunk's rows, then its ``done`` flag, as
   ``analysis embed`` writes them) and marked complete: the write rate (MB/s of float32 rows; the blobs are
   generated outside the timed writes). Then ``analysis.pca.streamed_pca(store, "rgb", 50)`` in a child process
   that imports only what ``analysis.pca`` needs (numpy, zarr; it asserts that torch was never imported): wall
   time, and its peak RSS (VmHWM) against the target < 500 MB, next to its RSS right after the imports (the
   interpreter, numpy and zarr), so what PCA itself adds shows. The store (~1.5 GB) lives under bench/out
   (gitignored) and is deleted at the end, also when the bench fails.
2. t-SNE: ``analysis.tsne.tsne_embed`` of 100,000 x 50 float32 blobs, perplexity 30, n_jobs 2, seed 0 (exact
   neighbours + openTSNE's defaults but 125 early-exaggeration iterations; run as ``analysis.tsne._embed``, which
   it wraps, for the kNN / affinity / optimisation split and the final KL divergence). Target <= 150 s on 2 cores.
   Sanity: how often a point's nearest point in the map is from its own blob.
3. k-NN: ``analysis.knn.weighted_knn`` with 100,000 L2-normalised 384-d train rows and 100,000 test rows, k = 10,
   20, 100, 200, T = 0.07, 10 classes (blob id mod 10), query_chunk 2048: as it runs by default (exact neighbours,
   cluster-pruned where that pays) and with ``prune=False`` (every pair: what data that does not prune gets),
   whose accuracies must be the same. Target <= 60 s on 2 cores. Floor of the every-pair search: the float32
   product of one 2048-row block with the 100k train rows into a reused buffer (as ``topk_neighbours`` runs it;
   also into a fresh tensor, for comparison), torch, this process's threads, timed and scaled to all the test
   rows, and the top-k of one block (``top_k`` against ``torch.topk``).

Every part ends with the CPU that other processes took meanwhile (this machine may be shared).

    python bench/analysis.py [--scale 1.0] [--skip pca,tsne,knn] [--no-record]

On a copy of the tree without .git (a lent machine), set SAGEPAIRS_COMMIT=<sha> so the record names the code.
``--scale F`` multiplies every N (0.05 runs in seconds, to check the script); the targets are for scale 1 and a
scaled run says so next to each verdict. ``--no-record``: print the figures, leave RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first, so that `analysis` is the package and not this file

from bench._common import OUT, record  # noqa: E402
from bench.train import Neighbours  # noqa: E402

PCA_N, PCA_DIM, PCA_COMPONENTS = 1_000_000, 384, 50
TSNE_N, TSNE_DIM, TSNE_JOBS = 100_000, 50, 2
KNN_N, KNN_DIM, KNN_KS, KNN_T, KNN_CLASSES, KNN_CHUNK = 100_000, 384, (10, 20, 100, 200), 0.07, 10, 2048
CLUSTERS = 300  # Gaussian blobs
NOISE = 0.5  # per-dimension standard deviation around a blob's centre (centres: standard normal)
BACKGROUND = 0.03  # share of points drawn from a wide Gaussian instead of a blob
TARGET_RSS_MB, TARGET_TSNE_S, TARGET_KNN_S = 500, 150, 60
STORE = OUT / "analysis-pca.zarr"

# The PCA child: imports only what analysis.pca needs, reports JSON on its last line.
PCA_CHILD = r"""
import json, resource, sys, time
started = time.perf_counter()

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0

from pathlib import Path
import numpy as np
import zarr  # open_embeddings imports it on its first call: counted with the imports
from analysis.pca import streamed_pca
from analysis.store import open_embeddings
imported = time.perf_counter()
rss_imports, hwm_imports = status_mb("VmRSS"), status_mb("VmHWM")
embeddings = open_embeddings(Path(sys.argv[1]))
fit = streamed_pca(embeddings, "rgb", int(sys.argv[2]))
done = time.perf_counter()
assert "torch" not in sys.modules, "the PCA child imported torch"
print(json.dumps({
    "n": fit.n, "dim": int(fit.mean.shape[0]), "components": int(fit.components.shape[0]),
    "explained": float(fit.explained_variance_ratio.sum()), "import_s": imported - started, "pca_s": done - imported,
    "rss_imports_mb": rss_imports, "hwm_imports_mb": hwm_imports, "hwm_mb": status_mb("VmHWM"),
    "rss_end_mb": status_mb("VmRSS"), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "chunk_rows": embeddings.chunk_rows, "zarr": zarr.__version__, "numpy": np.__version__,
    "torch_imported": "torch" in sys.modules,
}))
"""


def scaled(n: int, scale: float, least: int = 10) -> int:
    return max(int(round(n * scale)), least)


def verdict(ok: bool, scale: float) -> str:
    word = "met" if ok else "MISSED"
    return word if scale == 1.0 else f"{word} at scale {scale:g} only: the target is for scale 1"


def blob_centres(clusters: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((clusters, dim), dtype=np.float32)


def blobs(centres: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n x dim float32 points, blob id of each); background points get a random blob id."""
    clusters, dim = centres.shape
    labels = rng.integers(0, clusters, n)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= NOISE
    x += centres[labels]
    background = rng.random(n) < BACKGROUND
    x[background] = rng.standard_normal((int(background.sum()), dim), dtype=np.float32) * 2.0
    return x, labels


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# -- 1. PCA ------------------------------------------------------------------------------------------------------

def write_store(path: Path, n: int, dim: int, chunk_rows: int, seed: int) -> dict:
    import zarr
    from tqdm import tqdm

    from analysis.store import create_embedding_store

    need = n * dim * 4
    free = shutil.disk_usage(path.parent if path.parent.exists() else OUT.parent).free
    if free < 1.3 * need:
        raise SystemExit(f"{path.parent}: {free / 1e9:.1f} GB free, the store needs about {need / 1e9:.1f} GB")
    t0 = time.perf_counter()
    create_embedding_store(path, [f"k{i:07d}" for i in range(n)], {"rgb": (dim, "float32")}, chunk_rows,
                           {"identity": "bench-analysis", "checkpoint": "synthetic", "dataset": "none"})
    create_s = time.perf_counter() - t0
    group = zarr.open_group(str(path), mode="r+")
    rows = int(group.attrs["chunk_rows"])
    centres = blob_centres(CLUSTERS, dim, seed)
    write_s = generate_s = 0.0
    for chunk, start in enumerate(tqdm(range(0, n, rows), desc="write store", unit="chunk", dynamic_ncols=True)):
        t0 = time.perf_counter()
        x, _ = blobs(centres, min(rows, n - start), np.random.default_rng([seed, 1, chunk]))
        t1 = time.perf_counter()
        group["rgb"][start : start + len(x)] = x
        group["done"][chunk] = 1
        write_s += time.perf_counter() - t1
        generate_s += t1 - t0
    group.attrs["complete"] = True
    return {"create_s": create_s, "write_s": write_s, "generate_s": generate_s, "chunk_rows": rows,
            "raw_mb": need / 1e6, "stored_mb": dir_mb(path)}


def pca_child(path: Path, components: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PCA_CHILD, str(path), str(components)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"PCA child failed, exit {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def bench_pca(scale: float, seed: int) -> list[str]:
    from analysis.config import EmbedConfig

    n = scaled(PCA_N, scale, least=1000)
    neighbours = Neighbours()
    try:
        store = write_store(STORE, n, PCA_DIM, EmbedConfig().chunk_rows, seed)
        pca = pca_child(STORE, PCA_COMPONENTS)
    finally:
        shutil.rmtree(STORE, ignore_errors=True)
    assert pca["n"] == n and not pca["torch_imported"]
    peak = pca["hwm_mb"]
    lines = [
        f"PCA store: {n:,} x {PCA_DIM} float32 rgb ({store['raw_mb']:.0f} MB, {store['stored_mb']:.0f} MB on disk, "
        f"zarr {pca['zarr']} default codecs, chunks of {store['chunk_rows']} rows), keys k0000000..., "
        f"{CLUSTERS} Gaussian blobs + {BACKGROUND:.0%} background: create_embedding_store (keys) "
        f"{store['create_s']:.1f} s; rows written chunk by chunk, each with its done flag, in {store['write_s']:.1f} s "
        f"= {store['raw_mb'] / store['write_s']:.0f} MB/s (generating the blobs, {store['generate_s']:.1f} s, not "
        f"counted)",
        f"PCA: streamed_pca(rgb, {PCA_COMPONENTS} components) of {n:,} x {PCA_DIM} in a child process without torch "
        f"(asserted): {pca['pca_s']:.1f} s ({n / pca['pca_s'] / 1e3:.0f}k rows/s, "
        f"{store['raw_mb'] / pca['pca_s']:.0f} MB/s; child's whole life {pca['wall_s']:.1f} s, imports "
        f"{pca['import_s']:.1f} s); {pca['components']} components explain {pca['explained']:.1%} of the variance",
        f"PCA child peak RSS (VmHWM): {peak:.0f} MB (target < {TARGET_RSS_MB} MB: "
        f"{verdict(peak < TARGET_RSS_MB, scale)}), of which the interpreter + numpy + zarr + analysis.pca after the "
        f"imports {pca['rss_imports_mb']:.0f} MB, so PCA itself added {peak - pca['rss_imports_mb']:.0f} MB "
        f"(ru_maxrss {pca['maxrss_mb']:.0f} MB)",
        f"while the store was written and PCA ran, {neighbours.summary()}",
    ]
    return lines


# -- 2. t-SNE ------------------------------------------------------------------------------------------------------

def bench_tsne(scale: float, seed: int) -> list[str]:
    from scipy.spatial import cKDTree

    from analysis.tsne import _embed  # what tsne_embed runs, with its stage timings

    n = scaled(TSNE_N, scale, least=100)
    x, labels = blobs(blob_centres(CLUSTERS, TSNE_DIM, seed + 1), n, np.random.default_rng([seed, 2]))
    neighbours = Neighbours()
    t0 = time.perf_counter()
    xy, details = _embed(x, 30, TSNE_JOBS, seed, progress="tsne")
    seconds = time.perf_counter() - t0
    summary = neighbours.summary()
    assert xy.shape == (n, 2) and np.isfinite(xy).all()
    _, nearest = cKDTree(xy).query(xy, k=2)
    agree = float((labels[nearest[:, 1]] == labels).mean())
    return [
        f"t-SNE: tsne_embed({n:,} x {TSNE_DIM} float32, {CLUSTERS} blobs + {BACKGROUND:.0%} background, perplexity 30, "
        f"n_jobs {TSNE_JOBS}, seed {seed}): {seconds:.1f} s (target <= {TARGET_TSNE_S} s on 2 cores: "
        f"{verdict(seconds <= TARGET_TSNE_S, scale)}); a point's nearest point in the map is from its own blob for "
        f"{agree:.1%}",
        f"t-SNE stages: exact {details['k']}-NN ({details['knn_method']}) {details['knn_seconds']:.1f} s, affinities "
        f"{details['affinity_seconds']:.1f} s, openTSNE's {details['early_exaggeration_iter']} early-exaggeration + "
        f"{details['n_iter']} iterations {details['optimise_seconds']:.1f} s"
        f"{', attractive and repulsive terms overlapped' if details['overlapped_gradient'] else ''} (final KL divergence "
        f"{details['kl_divergence']:.4f})",
        f"while t-SNE ran, {summary}",
    ]


# -- 3. k-NN -------------------------------------------------------------------------------------------------------

def bench_knn(scale: float, seed: int) -> list[str]:
    import statistics

    import torch

    from analysis.knn import weighted_knn
    from analysis.neighbours import l2_normalise, top_k

    n = scaled(KNN_N, scale, least=100)
    ks = tuple(k for k in KNN_KS if k <= n) or (min(KNN_KS[0], n),)
    centres = blob_centres(CLUSTERS, KNN_DIM, seed + 2)
    train_x, train_blob = blobs(centres, n, np.random.default_rng([seed, 3]))
    test_x, test_blob = blobs(centres, n, np.random.default_rng([seed, 4]))
    train_x, test_x = l2_normalise(train_x), l2_normalise(test_x)
    train_y, test_y = train_blob % KNN_CLASSES, test_blob % KNN_CLASSES
    threads = torch.get_num_threads()
    neighbours = Neighbours()

    # The floor: the all-pairs k-NN's own product, for one full block of queries, warm, into the score buffer it
    # reuses (a fresh 800 MB result per block costs ~0.5 s of page faults more here), and its top-k.
    base_t = torch.from_numpy(train_x)
    block = torch.from_numpy(np.ascontiguousarray(test_x[: min(KNN_CHUNK, n)]))
    buffer = torch.empty(len(block), n)
    times, fresh_times, topk_times, torch_topk_times = [], [], [], []
    with torch.inference_mode():
        for _ in range(4):  # the first warms up
            t0 = time.perf_counter()
            torch.matmul(block, base_t.T, out=buffer)
            t1 = time.perf_counter()
            top_k(buffer, max(ks))
            t2 = time.perf_counter()
            torch.topk(buffer, max(ks), dim=1)
            t3 = time.perf_counter()
            fresh = block @ base_t.T  # the same product as a fresh tensor, for comparison
            fresh_times.append(time.perf_counter() - t3)
            del fresh
            times.append(t1 - t0)
            topk_times.append(t2 - t1)
            torch_topk_times.append(t3 - t2)
    block_s, fresh_s = statistics.median(times[1:]), statistics.median(fresh_times[1:])
    topk_s, torch_topk_s = statistics.median(topk_times[1:]), statistics.median(torch_topk_times[1:])
    blocks = n / len(block)
    floor_s = block_s * blocks
    gflops = 2 * len(block) * n * KNN_DIM / block_s / 1e9
    del base_t, block, buffer

    runs = {}
    for prune in (True, False):
        details: dict = {}
        t0 = time.perf_counter()
        scores = weighted_knn(train_x, train_y, test_x, test_y, ks, KNN_T, KNN_CLASSES, query_chunk=KNN_CHUNK,
                              prune=prune, details=details)
        runs[prune] = (time.perf_counter() - t0, scores, details)
    summary = neighbours.summary()
    seconds, scores, details = runs[True]
    every_s, every_scores, _ = runs[False]
    headline = 20 if 20 in scores else ks[0]
    accuracy = ", ".join(f"k={k} {100 * s['top1']:.1f}%" for k, s in scores.items())
    how = details["knn_method"] + (f", {details['knn_cells']} cells, {details['knn_loose']:.1%} loose rows, "
                                   f"{details['knn_scanned']:.1%} of the pairs read"
                                   if details["knn_method"] == "cluster-pruned" else "")
    return [
        f"k-NN: weighted_knn({n:,} train x {n:,} test, {KNN_DIM}-d L2-normalised, {CLUSTERS} blobs + "
        f"{BACKGROUND:.0%} background, {KNN_CLASSES} classes = blob mod {KNN_CLASSES}, k={list(ks)}, T={KNN_T}, "
        f"query_chunk {KNN_CHUNK}), {threads} torch threads, exact neighbours ({how}): {seconds:.1f} s "
        f"(target <= {TARGET_KNN_S} s on 2 cores: {verdict(seconds <= TARGET_KNN_S, scale)}); top-1 {accuracy}",
        f"k-NN over every pair (prune=False, the path for data that does not prune): {every_s:.1f} s "
        f"({verdict(every_s <= TARGET_KNN_S, scale)}), {every_s / floor_s:.2f} x the floor below; accuracies "
        f"{'identical' if every_scores == scores else 'DIFFERENT: ' + str(every_scores)}",
        f"k-NN floor: the float32 product of one {len(test_x[:KNN_CHUNK])}-row block with the {n:,} train rows into "
        f"a reused buffer, {block_s * 1000:.0f} ms ({gflops:.0f} GFLOP/s; {fresh_s * 1000:.0f} ms into a fresh "
        f"tensor), x {blocks:.1f} blocks = {floor_s:.1f} s: no all-pairs k-NN beats it on this CPU; then top_k(k="
        f"{max(ks)}) of the block {topk_s * 1000:.0f} ms (torch.topk {torch_topk_s * 1000:.0f} ms), x the blocks = "
        f"{topk_s * blocks:.1f} s (headline k={headline} top-1 {100 * scores[headline]['top1']:.1f}%)",
        f"while the k-NN (both ways) and its floor ran, {summary}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every N (default 1.0: the targets' size)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: pca, tsne, knn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="print the figures only; leave RESULTS.md alone")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"pca", "tsne", "knn"}
    if unknown:
        parser.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))} (pca, tsne, knn)")
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines = [f"run: bench/analysis.py --scale {args.scale:g}" + (f" --skip {','.join(sorted(skip))}" if skip else "")]
    for name, part in (("pca", bench_pca), ("tsne", bench_tsne), ("knn", bench_knn)):
        if name in skip:
            continue
        new = part(args.scale, args.seed)
        print("\n".join(new), flush=True)
        lines += new
    lines.append(f"whole bench {time.perf_counter() - started:.0f} s")
    if args.no_record:
        print(f"(--no-record: {len(lines)} lines not appended to bench/RESULTS.md)")
    else:
        record("bench/analysis.py", lines)


if __name__ == "__main__":
    main()
