"""`catalog` command line: query, describe, select, set-nodes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from catalog.describe import describe, format_table
from catalog.location import NodesError, load_nodes_csv
from catalog.maintain import set_nodes_locked
from catalog.query import Catalog, CatalogError, read_keys_csv, write_selection
from catalog.storage import is_remote
from catalog.store import DatasetLayout, DatasetLocked, dataset_lock

FORMATS = ("table", "csv", "json", "parquet")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catalog", description="SQL over a sagepairs dataset's catalog (DuckDB).")
    sub = parser.add_subparsers(dest="command", required=True)
    query = sub.add_parser("query", help="run SQL over the views samples, files, rejects, shards, nodes, runs")
    query.add_argument("dataset")
    query.add_argument("sql")
    query.add_argument("--format", choices=FORMATS, default="table")
    query.add_argument("--out", help="write the result to this file instead of stdout (required for parquet)")
    desc = sub.add_parser("describe", help="counts per node, position, day/night, split; rejects; runs")
    desc.add_argument("dataset")
    select = sub.add_parser("select", help="write a Selection (keys, shards, byte offsets) for training/analysis")
    select.add_argument("dataset")
    select.add_argument("--where", default=None, help="SQL condition over the samples view, e.g. 'is_sky AND is_day'")
    select.add_argument("--split", choices=("train", "val", "test"))
    select.add_argument("--limit", type=int)
    select.add_argument("--keys", help="CSV file with a 'key' column (e.g. the explorer's export): only these samples")
    select.add_argument("--out", required=True, help="Selection Parquet file to write")
    nodes = sub.add_parser("set-nodes", help="replace node locations and recompute tz, local time and day/night")
    nodes.add_argument("dataset")
    nodes.add_argument("nodes_csv")
    return parser


def _emit(table, fmt: str, out: str | None) -> None:
    if fmt == "parquet":
        pq.write_table(table, out)
        return
    if fmt == "csv":
        if out:
            pacsv.write_csv(table, out)
        else:
            pacsv.write_csv(table, sys.stdout.buffer)
        return
    if fmt == "json":
        text = json.dumps(table.to_pylist(), default=str, ensure_ascii=False)
    else:
        text = format_table(table)
    if out:
        Path(out).write_text(text + "\n")
    else:
        print(text)


def _check_keys(catalog: Catalog, keys: list[str], source: str) -> None:
    """Every key of ``source`` names a sample of the catalog, else one line saying how many do not."""
    missing = catalog.missing_keys(keys)
    if missing:
        examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CatalogError(f"{source}: {len(missing)} of {len(keys)} key(s) are not in the catalog of "
                           f"{catalog.source} (e.g. {examples}); export the keys from an explorer of this "
                           "dataset, or select from the dataset they came from")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "query":
            if args.format == "parquet" and not args.out:
                print("catalog query: --format parquet needs --out FILE", file=sys.stderr)
                return 2
            with Catalog(args.dataset) as catalog:
                table = catalog.query(args.sql)
            _emit(table, args.format, args.out)
            return 0
        if args.command == "describe":
            with Catalog(args.dataset) as catalog:
                print(describe(catalog))
            return 0
        if args.command == "select":
            keys = read_keys_csv(args.keys) if args.keys else None
            with Catalog(args.dataset) as catalog:
                if keys is not None:
                    _check_keys(catalog, keys, args.keys)
                selection = catalog.select(args.where, split=args.split, limit=args.limit, keys=keys)
            write_selection(selection, args.out)
            shards = len(set(selection.column("shard").to_pylist()))
            print(f"{selection.num_rows} samples from {shards} shard(s) -> {args.out}")
            return 0
        if args.command == "set-nodes":
            if is_remote(args.dataset):
                raise CatalogError(f"{args.dataset}: a published dataset is read-only; set the nodes in the dataset "
                                   "directory, then `shards publish` it again")
            nodes = load_nodes_csv(args.nodes_csv)
            layout = DatasetLayout(args.dataset)
            if not layout.exists():
                raise CatalogError(f"{args.dataset}: not a sagepairs dataset (no catalog/ directory)")
            with dataset_lock(args.dataset, "catalog set-nodes"):
                set_nodes_locked(layout, nodes)
            with Catalog(args.dataset) as catalog:
                rows = catalog.query(
                    "SELECT count(*) AS n, count(tz) AS located, count(*) FILTER (WHERE is_day) AS day FROM samples"
                ).to_pylist()[0]
            print(f"nodes replaced ({nodes.num_rows} periods); {rows['n']} samples recomputed, "
                  f"{rows['located']} located, {rows['day']} by day")
            return 0
    except (CatalogError, NodesError) as exc:
        print(f"catalog {args.command}: {exc}", file=sys.stderr)
        return 2
    except DatasetLocked as exc:
        print(f"catalog {args.command}: {exc}", file=sys.stderr)
        return 3
    return 2
