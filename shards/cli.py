"""`shards` command line: `shards verify DATASET`."""

from __future__ import annotations

import argparse
import sys
import time

from catalog.query import Catalog, CatalogError
from shards.verify import verify_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shards", description="Check and inspect a dataset's WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="re-hash every shard against the catalog and check every member's offset")
    verify.add_argument("dataset")
    args = parser.parse_args(argv)

    if args.command == "verify":
        started = time.perf_counter()
        try:
            with Catalog(args.dataset) as catalog:
                shard_rows = catalog.query("SELECT name, sha256, bytes, n_samples FROM shards").to_pylist()
                sample_rows = catalog.query(
                    "SELECT key, shard, sample_offset, ir_offset, ir_size, json_offset, json_size, rgb_offset, rgb_size "
                    "FROM samples"
                ).to_pylist()
        except CatalogError as exc:
            print(f"shards verify: {exc}", file=sys.stderr)
            return 2
        report = verify_shards(args.dataset, shard_rows, sample_rows)
        seconds = time.perf_counter() - started
        for name in report.untracked:
            print(f"note: {name} is not listed in the catalog (left by an interrupted run?); it is never read")
        for problem in report.problems:
            print(f"FAIL {problem}")
        rate = report.bytes_hashed / 1e6 / seconds if seconds > 0 else 0.0
        print(
            f"{'OK' if report.ok else 'FAILED'}: {report.shards_checked} shards, {report.samples_checked} samples, "
            f"{report.bytes_hashed / 1e6:.1f} MB hashed in {seconds:.2f} s ({rate:.0f} MB/s)"
            + (f"; {len(report.problems)} problem(s)" if report.problems else "")
        )
        return 0 if report.ok else 1
    return 2
