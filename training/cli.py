"""`training` command line. No subcommands yet; it says so instead of pretending."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="training",
        description="VICReg training of an RGB ViT and an IR ViT over MPI ranks (planned: `training run --config train.toml`, `training jobscript`). Not built yet: it lands with its own issue, after the data path.",
    )
    parser.parse_args(argv)
    print("training: no commands yet (this part of sagepairs is not built yet); see README.md", file=sys.stderr)
    return 2
