"""`shards` command line: `shards verify DATASET`, `shards publish DATASET URL`."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from catalog.publication import PublishError, plan_publish, publish
from catalog.query import Catalog, CatalogError
from catalog.storage import StorageError
from shards.verify import verify_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shards", description="Check and inspect a dataset's WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="re-hash every shard against the catalog and check every member's offset")
    verify.add_argument("dataset")
    pub = sub.add_parser("publish", help="upload the committed shards and catalog to s3://bucket/prefix (or a "
                         "directory a web server serves); only what is missing moves, the manifest goes last")
    pub.add_argument("dataset")
    pub.add_argument("url", help="s3://bucket/prefix, or a local directory served over https")
    pub.add_argument("--dry-run", action="store_true", help="list what would move, move nothing")
    pub.add_argument("--replace", action="store_true",
                     help="overwrite objects that differ from this dataset's (another dataset was published there)")
    args = parser.parse_args(argv)

    if args.command == "publish":
        return _publish(args)

    if args.command == "verify":
        started = time.perf_counter()
        try:
            with Catalog(args.dataset) as catalog:
                shard_rows = catalog.query("SELECT name, sha256, bytes, n_samples FROM shards").to_pylist()
                sample_rows = catalog.query(
                    "SELECT key, shard, sample_offset, ir_member, ir_offset, ir_size, json_offset, json_size, rgb_offset, "
                    "rgb_size FROM samples"
                ).to_pylist()
        except CatalogError as exc:
            print(f"shards verify: {exc}", file=sys.stderr)
            return 2
        try:
            report = verify_shards(args.dataset, shard_rows, sample_rows)
        except StorageError as exc:
            print(f"shards verify: {exc}", file=sys.stderr)
            return 2
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


def _publish(args: argparse.Namespace) -> int:
    try:
        plan = plan_publish(args.dataset, args.url, replace=args.replace)
        summary = (f"{len(plan.upload)} object(s) to upload ({plan.bytes_to_upload / 1e6:.1f} MB), "
                   f"{len(plan.check)} already there to check, {len(plan.keep)} unchanged")
        if args.dry_run:
            for obj in plan.upload:
                print(f"upload {obj.key} ({obj.size / 1e6:.1f} MB)")
            for obj in plan.check:
                print(f"check  {obj.key} (there, not yet in a manifest: read back and hashed)")
            print(f"dry run: {summary}; then write {plan.url}/manifest.json")
            return 0
        total = plan.bytes_to_upload + sum(o.size for o in plan.check)
        started = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="publish", disable=None) as bar:
            manifest = publish(plan, bar.update)
    except (PublishError, StorageError, CatalogError) as exc:
        print(f"shards publish: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    print(f"published {plan.url}: {len(manifest.objects)} objects; {summary}; {seconds:.1f} s")
    return 0
