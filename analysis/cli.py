"""`analysis` command line. No subcommands yet; it says so instead of pretending."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="analysis",
        description="embeddings to Zarr and out-of-core PCA, clustering, t-SNE, k-NN and an HTML report (planned: `analysis embed RUN`, `analysis report RUN`). Not built yet: it lands with its own issue, after the data path.",
    )
    parser.parse_args(argv)
    print("analysis: no commands yet (this part of sagepairs is not built yet); see README.md", file=sys.stderr)
    return 2
