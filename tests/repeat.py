"""Loop the tests that could flake: every MPI test N times in one session, and the whole suite N times from a
fresh clone. A test that fails once in these loops is a defect to fix, not to rerun.

    python tests/repeat.py --mpi 20                 # each test marked `mpi`, 20 times (pytest-repeat)
    python tests/repeat.py --mpi 20 -m 'not slow'   # ... only the quick ones
    python tests/repeat.py --suite 3                # `make test` 3 times in a fresh clone of HEAD

Each loop prints one summary line per run and exits non-zero if any run failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed).*?)\s*=*$")


def summary_line(output: str) -> str:
    """pytest's closing counts ("280 passed, 8 skipped in 400s"), or the last line when there is none."""
    for line in reversed(output.splitlines()):
        match = SUMMARY.match(line.strip())
        if match:
            return match.group(1)
    lines = output.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def loop_mpi_tests(count: int, marker: str | None, keyword: str | None = None) -> int:
    """Every `mpi` test ``count`` times in one pytest session (fixtures made once)."""
    expression = "mpi" if not marker else f"mpi and ({marker})"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", expression, f"--count={count}",
            "--repeat-scope=function"] + (["-k", keyword] if keyword else [])
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    failures = sorted({line.split(" - ")[0] for line in done.stdout.splitlines() if line.startswith("FAILED ")})
    print(f"mpi tests x{count} ({expression}): {summary_line(done.stdout)} [{time.monotonic() - started:.0f} s]")
    for failure in failures:
        print(f"  {failure}")
    return done.returncode


def loop_suite(count: int) -> int:
    """`make test` ``count`` times in a fresh clone of HEAD (the first run also makes the virtual environment)."""
    worst = 0
    with tempfile.TemporaryDirectory(prefix="sagepairs-repeat-") as tmp:
        clone = Path(tmp) / "sagepairs"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
        env = {**os.environ, "SAGEPAIRS_SHARED": os.environ.get("SAGEPAIRS_SHARED", str(ROOT.parent / "shared"))}
        for run in range(1, count + 1):
            started = time.monotonic()
            done = subprocess.run(["make", "test"], cwd=clone, capture_output=True, text=True, env=env)
            print(f"suite run {run}/{count} at {head.strip()}: exit {done.returncode}, "
                  f"{summary_line(done.stdout)} [{time.monotonic() - started:.0f} s]", flush=True)
            for line in done.stdout.splitlines():
                if line.startswith("FAILED ") or line.startswith("ERROR "):
                    print(f"  {line}")
            worst = worst or done.returncode
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpi", type=int, metavar="N", help="run each test marked `mpi` N times")
    parser.add_argument("-m", dest="marker", help="a further pytest marker expression for --mpi (e.g. 'not slow')")
    parser.add_argument("-k", dest="keyword", help="a pytest -k expression for --mpi (e.g. 'training')")
    parser.add_argument("--suite", type=int, metavar="N", help="run `make test` N times in a fresh clone of HEAD")
    args = parser.parse_args(argv)
    if not (args.mpi or args.suite):
        parser.error("give --mpi N, --suite N or both")
    code = 0
    if args.mpi:
        code = loop_mpi_tests(args.mpi, args.marker, args.keyword) or code
    if args.suite:
        code = loop_suite(args.suite) or code
    return code


if __name__ == "__main__":
    sys.exit(main())
