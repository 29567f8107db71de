"""`training` command line: parses arguments, builds a typed config, calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from catalog.runinfo import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="training",
        description="VICReg training of an RGB ViT and an IR ViT, streamed from a sagepairs dataset, alone or under "
        "`mpiexec -n R`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init-config", help="print the default config (TOML, every key commented)")

    run = sub.add_parser("run", help="train (running the same command again resumes from RUN/checkpoints/last.pt)")
    run.add_argument("--config", help="train.toml (default: the built-in defaults)")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one key; the value is TOML ([120, 160], 0.3, 'x'), a bare word is a string")
    run.add_argument("--new-schedule", action="store_true",
                     help="resume the weights under a changed schedule (epochs, lr, batch, warm-up, selection)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    job = sub.add_parser("jobscript", help="print a PBS or Slurm submission script for this config")
    job.add_argument("--config", required=True, help="train.toml")
    job.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    job.add_argument("--scheduler", required=True, choices=("pbs", "slurm"))
    job.add_argument("--nodes", type=int, required=True)
    job.add_argument("--ranks-per-node", type=int, required=True, help="ranks (GPUs) per node")
    job.add_argument("--walltime", default="01:00:00", help="HH:MM:SS")
    job.add_argument("--account", help="allocation / project to charge")
    job.add_argument("--queue", help="PBS queue or Slurm partition")
    job.add_argument("--filesystems", help="PBS -l filesystems=... (e.g. home:eagle on ALCF Polaris)")
    job.add_argument("--job-name", default="sagepairs")
    job.add_argument("--venv", help="virtual environment to activate (default: this one)")
    job.add_argument("--cpus-per-rank", type=int, help="CPU cores bound to each rank")
    job.add_argument("--out", help="write the script here (executable; PBS resubmission then knows its path) "
                     "instead of printing it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The library is imported after parsing, and only what the command needs: torch and timm take seconds to
    # import, and `training --help` (0.4 s) or `init-config` need neither.
    if args.command == "init-config":
        from training.config import default_config_toml

        sys.stdout.write(default_config_toml())
        return 0
    from training.config import load_training_config

    try:
        config = load_training_config(args.config, args.sets)
    except ConfigError as exc:
        print(f"training {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        from training.train import run_training

        full_argv = ["training", *(argv if argv is not None else sys.argv[1:])]
        return run_training(config, new_schedule=args.new_schedule, argv=full_argv, progress=not args.quiet,
                            log=lambda message: print(message, file=sys.stderr, flush=True))
    if args.command == "jobscript":
        from training.jobscript import JobSpec, render_jobscript

        try:
            spec = JobSpec(config=args.config, scheduler=args.scheduler, nodes=args.nodes,
                           ranks_per_node=args.ranks_per_node, walltime=args.walltime, account=args.account,
                           queue=args.queue, filesystems=args.filesystems, job_name=args.job_name, venv=args.venv,
                           run_dir=config.run.dir, sets=tuple(args.sets), cpus_per_rank=args.cpus_per_rank,
                           script_path=args.out)
            script = render_jobscript(spec)
        except ValueError as exc:
            print(f"training jobscript: {exc}", file=sys.stderr)
            return 2
        if args.out:
            out = Path(args.out)
            out.write_text(script)
            out.chmod(0o755)
            submit = "qsub" if args.scheduler == "pbs" else "sbatch"
            print(f"wrote {out}; submit with: {submit} {out}", file=sys.stderr)
        else:
            sys.stdout.write(script)
        return 0
    return 2

