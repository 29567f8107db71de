"""`ingest` command line: parses arguments, builds a typed config, calls the library."""

from __future__ import annotations

import argparse
import sys

from catalog.runinfo import ConfigError, load_config
from catalog.storage import is_remote
from catalog.store import DatasetLocked
from ingest.build import BuildSummary, build_shards
from ingest.collective import BuildError, RankStopped, Ranks, exit_code
from ingest.config import IngestConfig
from ingest.download import DownloadConfig, DownloadError, download
from ingest.synth import SynthConfig, synthesize


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingest", description="Raw SAGE Mobotix downloads -> verified shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a seeded synthetic SAGE download (exact raw format + truth)")
    synth.add_argument("raw", help="RAW directory to write")
    synth.add_argument("--nodes", type=int, default=2, help="number of nodes (W056, W057, V017, then more)")
    synth.add_argument("--frames", type=int, default=200, help="frames per node")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--scale", type=float, default=1.0, help="optical JPEG size relative to 6144x2048")
    synth.add_argument("--faults", action="store_true", help="plant one of each bad case")
    synth.add_argument("--start", default="2023-03-01", help="first capture day (UTC)")
    synth.add_argument("--end", default="2023-10-31", help="last capture day (UTC)")
    synth.add_argument("--visit-frames", type=int, default=8,
                       help="consecutive presets per visit (fewer: more independent capture times per frame)")
    synth.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    build = sub.add_parser("build-shards", help="ingest RAW into DATASET (shards + catalog)")
    build.add_argument("raw", help="RAW directory (RAW/<VSN>/<ts_ns>-<filename>, RAW/metadata/)")
    build.add_argument("dataset", help="DATASET directory (created if missing)")
    build.add_argument("--nodes", help="nodes.csv with vsn,node_id,lat,lon,valid_from,valid_to")
    build.add_argument("--workers", type=int, help="decode processes (default: all cores)")
    build.add_argument("--config", help="ingest.toml (crop box, sizes, limits, shard size, split fractions)")
    build.add_argument("--recheck-rejects", action="store_true", help="decode rejected frames again even if unchanged")
    build.add_argument("--quiet", action="store_true", help="no progress bar")

    download = sub.add_parser(
        "download",
        help="fetch Mobotix uploads from the SAGE data API into RAW (resumable)",
        description="Query upload records with sage_data_client and download the files into RAW/<VSN>/<ts_ns>-<filename>. "
        "Credentials for private nodes: SAGE_USERNAME and SAGE_ACCESS_TOKEN, or ~/.netrc.",
    )
    download.add_argument("raw", help="RAW directory to download into")
    download.add_argument("--vsn", action="append", required=True, help="node VSN (repeat for several)")
    download.add_argument("--start", required=True, help="query start (e.g. 2023-06-01 or 2023-06-01T00:00:00Z)")
    download.add_argument("--end", required=True, help="query end")
    download.add_argument("--plugin", default="*mobotix*", help="plugin filter (glob), default '*mobotix*'")
    download.add_argument("--all-files", action="store_true", help="also the uint CSV, .raw and .nc files")
    download.add_argument("--workers", type=int, default=8, help="concurrent downloads")
    download.add_argument("--endpoint", default=None, help="query API URL (default: the SAGE data API)")
    download.add_argument("--timeout", type=float, default=None, help="seconds before a stalled request is retried")
    download.add_argument("--retries", type=int, default=None, help="attempts per file before it is listed as failed")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _print_summary(summary: BuildSummary, dataset: str) -> None:
    counts = summary.status_counts
    total = sum(counts.values())
    print(f"\n{summary.run_id}: {dataset}")
    print(
        f"  raw files {total} = sample {counts.get('sample', 0)} + rejected {counts.get('rejected', 0)}"
        f" + ignored {counts.get('ignored', 0)}   ({summary.files_new} new)"
    )
    print(
        f"  added {summary.samples_added} samples in {summary.shards_added} shard(s); decoded {summary.frames_decoded}"
        f" frames at {summary.frames_per_second:.1f} frames/s; {summary.seconds:.1f} s in all"
    )
    print(f"  time: plan {summary.plan_seconds:.2f} s (scan, metadata, plan), decode {summary.decode_seconds:.2f} s, "
          f"commit {summary.commit_seconds:.2f} s")
    if len(summary.share_seconds) > 1:
        slowest = max(summary.share_seconds)
        print(
            f"  {len(summary.share_seconds)} ranks x {'/'.join(map(str, sorted(set(summary.workers))))} workers; each rank's share took "
            + ", ".join(f"{s:.1f}" for s in summary.share_seconds) + " s"
            + (f" (the fastest waited {slowest - min(summary.share_seconds):.1f} s for the slowest)" if slowest > 0 else "")
        )
    if summary.reason_counts:
        print("  rejected files by reason:")
        for reason, n in summary.reason_counts.items():
            print(f"    {reason:<18} {n}")
    if summary.samples_per_node:
        print("  samples per node: " + ", ".join(f"{v} {n}" for v, n in summary.samples_per_node.items()))
    if summary.unlocated_vsns:
        print(
            "  warning: no location in nodes.csv for " + ", ".join(summary.unlocated_vsns)
            + ": their tz, local time and day/night are NULL (fix with `catalog set-nodes`)"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "synth":
        try:
            config = SynthConfig(
                nodes=args.nodes, frames=args.frames, seed=args.seed, scale=args.scale, faults=args.faults,
                start=args.start, end=args.end, workers=args.workers, visit_frames=args.visit_frames,
            )
            truth = synthesize(args.raw, config, progress=not args.quiet)
        except ValueError as exc:
            print(f"ingest synth: {exc}", file=sys.stderr)
            return 2
        faults = sum(1 for f in truth.column("fault").to_pylist() if f)
        print(f"wrote {truth.num_rows} frames ({faults} with planted faults) under {args.raw}")
        return 0
    if args.command == "build-shards":
        return _build_shards(args, argv)
    if args.command == "download":
        return _download(args)
    return 2


def _build_shards(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Under mpiexec every rank runs this; rank 0 alone reads the configuration and reports (see ingest.collective)."""
    if is_remote(args.dataset):
        print(f"ingest build-shards: {args.dataset}: ingest writes a dataset directory; build it locally, then "
              f"`shards publish DATASET {args.dataset}`", file=sys.stderr)
        return 2
    try:
        ranks = Ranks.start()
        config = ranks.decide(lambda: load_config(IngestConfig, args.config, {"workers": args.workers}))
        summary = build_shards(
            args.raw, args.dataset, config, nodes_csv=args.nodes,
            argv=["ingest", *(argv if argv is not None else sys.argv[1:])],
            progress=not args.quiet, recheck_rejects=args.recheck_rejects, ranks=ranks,
        )
    except RankStopped as exc:  # rank 0 says why, once
        return exc.exit_code
    except (ConfigError, BuildError, DatasetLocked) as exc:
        print(f"ingest build-shards: {exc}", file=sys.stderr)
        return exit_code(exc)
    if summary is not None:  # None: an MPI rank other than 0, whose share rank 0 reports
        _print_summary(summary, args.dataset)
    return 0


def _download(args: argparse.Namespace) -> int:
    overrides = {"endpoint": args.endpoint, "timeout_s": args.timeout, "retries": args.retries}
    try:
        config = DownloadConfig(
            raw_dir=args.raw, vsns=tuple(args.vsn), start=args.start, end=args.end, plugin=args.plugin,
            all_files=args.all_files, workers=args.workers, **{k: v for k, v in overrides.items() if v is not None},
        )
        summary = download(config, progress=not args.quiet)
    except (DownloadError, ValueError) as exc:
        print(f"ingest download: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. RAW not writable: say which path, not a traceback
        print(f"ingest download: {exc.filename or args.raw}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 1 if summary.failed else 0
