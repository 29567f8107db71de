"""Shared by the benchmarks: where they keep data, what machine this is, and appending to RESULTS.md."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
OUT = BENCH_DIR / "out"  # generated data (gitignored); reused between runs when its recipe is unchanged
RESULTS = BENCH_DIR / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}"


def code_version() -> str:
    """The commit the figures belong to (and whether the tree had uncommitted changes)."""
    try:
        sha = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(BENCH_DIR), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", "..", ":!RESULTS.md"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    if not sha:  # a copy of the tree without .git (a lent GPU machine): the caller may say which commit it is
        return os.environ.get("SAGEPAIRS_COMMIT", "unknown")
    return sha + (" + uncommitted changes" if dirty else "")


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the venv's, from the mpich wheel) first, else the one on PATH."""
    return shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def record(bench: str, lines: list[str]) -> None:
    """Print the figures and append them, dated, with the machine and the commit, to bench/RESULTS.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [f"## {bench} — {stamp}", f"Machine: {machine()}; code: {code_version()}", ""] + [f"- {line}" for line in lines] + [""]
    print("\n".join(block))
    new = not RESULTS.exists()
    with open(RESULTS, "a") as fh:
        if new:
            fh.write("# Benchmark results\n\nEach bench in `bench/` appends its figures here, next to the limit it chases.\n\n")
        fh.write("\n".join(block) + "\n")


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def synthetic_dataset(name: str, frames_per_node: int, seed: int, keep_raw: bool = True) -> Path:
    """OUT/<name>/dataset built by the real pipeline from small synthetic sources (shard members are full size:
    672x504 JPEG + 336x252 float32, whatever the source scale); reused while it exists."""
    import shutil

    from ingest.build import build_shards
    from ingest.config import IngestConfig
    from ingest.synth import SynthConfig, synthesize

    root = OUT / name
    if not (root / "dataset" / "catalog").exists():
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root / "raw", SynthConfig(nodes=2, frames=frames_per_node, seed=seed, scale=0.1))
        build_shards(root / "raw", root / "dataset", IngestConfig(), nodes_csv=root / "raw" / "nodes.csv")
        if not keep_raw:
            shutil.rmtree(root / "raw")  # about 1 GB of sources that nothing reads again
    return root / "dataset"
