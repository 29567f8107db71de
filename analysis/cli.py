"""`analysis` command line: parses arguments, builds a typed config, calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys

STEPS = ("pca", "cluster", "tsne", "knn", "retrieval")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analysis",
        description="What a trained RGB <-> IR model learned: embeddings to Zarr (alone or under `mpiexec -n R`), "
        "out-of-core PCA, clustering, t-SNE, k-NN, cross-modal retrieval, attention maps, evolution over "
        "checkpoints, and an HTML report. Results go to RUN/embeddings, RUN/analysis and RUN/report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, checkpoint: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run", help="RUN directory of `training run`")
        if checkpoint:
            p.add_argument("--checkpoint", default="last", help="last, epoch_NNNN, or random (random-init baseline)")
        p.add_argument("--config", help="analysis.toml overriding any key of analysis.config.AnalysisConfig")
        p.add_argument("--dataset", help="the dataset, if it moved since training (default: the run's data.dataset)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    embed = add("embed", "both branches' embeddings of the selected samples into RUN/embeddings/<checkpoint>.zarr")
    embed.add_argument("--where", help="SQL over the catalog's `samples` (default: embed.where, all samples)")
    add("pca", "exact PCA from a streamed covariance (rgb, ir, joint), explained-variance plot")
    cluster = add("cluster", "MiniBatchKMeans on the PCA features, cluster x metadata tables, example grids")
    cluster.add_argument("--k", type=int, help="clusters (default cluster.k)")
    cluster.add_argument("--sweep", help="comma-separated k values: keep the best silhouette")
    tsne = add("tsne", "openTSNE maps coloured by metadata, and the RGB-IR link plot")
    tsne.add_argument("--max-points", type=int, help="all points up to this many, else a sample")
    add("knn", "weighted k-NN (train -> test) predicting catalog labels")
    add("retrieval", "cross-modal top-1/top-5: is a sample's own IR among the nearest to its RGB (and back)")
    attention = add("attention", "last-block CLS attention per head, both branches, overlaid on the images")
    pick = attention.add_mutually_exclusive_group()
    pick.add_argument("--keys", help="comma-separated sample keys")
    pick.add_argument("--where", help="SQL over `samples` (default attention.where)")
    add("evolution", "embed every kept checkpoint; k-NN / retrieval / silhouette over epochs", checkpoint=False)
    add("report", "RUN/report/index.html from what has been computed", checkpoint=False)
    add("all", "every step that is missing or stale, then the report", checkpoint=False)

    compare = sub.add_parser("compare", help="the same metrics of several runs side by side (e.g. rgb-ir vs rgb-grey)")
    compare.add_argument("runs", nargs="+", help="RUN directories (each analysed, e.g. by `analysis all`)")
    compare.add_argument("--checkpoint", default="last")
    compare.add_argument("--out", help="also write compare.html and compare.md here")
    compare.add_argument("--no-baseline", action="store_true", help="leave out each run's random-init model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Every analysis import below comes after the arguments are parsed, each where its command needs it: `analysis
    # --help` and a usage error then start in 0.1 s. analysis.runs and catalog.runinfo (duckdb through catalog)
    # cost 0.3-0.4 s; embed, and pipeline's steps, torch's 1.6-2.0 s (`python -X importtime`, 2-core machine).
    from analysis.runs import AnalysisError
    from catalog.runinfo import ConfigError

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.command == "compare":
            from analysis.compare import compare_runs

            text = compare_runs(args.runs, args.checkpoint, args.out, baseline=not args.no_baseline)
            sys.stdout.write(text)
            return 0
        from analysis.config import load_analysis_config
        from analysis.pipeline import Analysis

        config = load_analysis_config(args.config)
        if args.command == "cluster" and (args.k or args.sweep):
            sweep = tuple(int(k) for k in args.sweep.split(",")) if args.sweep else ()
            config = dataclasses.replace(config, cluster=dataclasses.replace(
                config.cluster, k=args.k or config.cluster.k, sweep=sweep))
        if args.command == "tsne" and args.max_points:
            config = dataclasses.replace(config, tsne=dataclasses.replace(config.tsne, max_points=args.max_points))
        progress = not args.quiet
        if args.command == "embed":
            from analysis.embed import embed

            embed(args.run, args.checkpoint, where=args.where, config=config.embed, dataset=args.dataset,
                  progress=progress, log=log)
            return 0
        analysis = Analysis.open(args.run, config, args.dataset, progress, log)
        if args.command == "pca":
            from analysis.pca import run_pca

            analysis.write_config()
            run_pca(analysis.embeddings(args.checkpoint), analysis.run.results(args.checkpoint),
                    config.pca.components, progress=progress, log=log)
        elif args.command in STEPS:
            analysis.write_config()
            getattr(analysis, args.command)(args.checkpoint)
        elif args.command == "attention":
            keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
            result = analysis.attention(args.checkpoint, keys=keys, where=args.where)
            log(f"attention maps: {analysis.run.results(args.checkpoint) / 'attention'} ({len(result.keys)} samples)")
        elif args.command == "evolution":
            analysis.write_config()
            analysis.evolution(force=False)
            log(f"evolution: {analysis.run.analysis_dir / 'evolution.png'}")
        elif args.command == "report":
            path = analysis.report()
            print(path)
        elif args.command == "all":
            from analysis.report import knn_against_baseline

            path = analysis.all()
            comparison = knn_against_baseline(analysis)
            if comparison:
                log("k-NN on the test split, trained vs random init:")
                for line in comparison:
                    log(f"  {line}")
            log("report:")
            print(path)
        return 0
    except (AnalysisError, ConfigError) as exc:
        print(f"analysis {args.command}: {exc}", file=sys.stderr)
        return 2
