"""`analysis compare RUN_A RUN_B ...`: the same metrics of several analysed runs side by side (e.g. the RGB+IR model
against the RGB+greyscale control), as a Markdown table, and optionally compare.md / compare.html."""

from __future__ import annotations

import html
from pathlib import Path

from analysis.report import summary_rows
from analysis.runs import RANDOM, AnalysisError, RunDir
from analysis.store import read_json

__all__ = ["compare_runs"]


RESULTS = ("knn", "retrieval", "cluster")


def _label(run: RunDir, full_path: bool = False) -> str:
    model = run.training_config().model
    return f"{run.root if full_path else run.root.name} ({model.objective}, {model.mode})"


def _loaded(run: RunDir, checkpoint: str) -> dict[str, dict]:
    results = run.results(checkpoint)
    return {name: read_json(results / f"{name}.json") or {} for name in RESULTS}


def compare_runs(run_dirs: list[str], checkpoint: str = "last", out: str | None = None, baseline: bool = True) -> str:
    """The runs' ``checkpoint`` metrics side by side; with ``baseline``, each run's random-init model beside it
    where `analysis all` measured one (the bar a trained model has to clear)."""
    runs = [RunDir.open(path) for path in run_dirs]
    columns: dict[str, dict] = {}
    agreement_rows: list[list[str]] = []
    for run in runs:
        loaded = _loaded(run, checkpoint)
        if not any(loaded.values()):
            raise AnalysisError(f"{run.root}: no analysis results for {checkpoint!r} (run `analysis all {run.root}`)")
        label = _label(run)
        if label in columns:
            label = _label(run, full_path=True)
        columns[label] = loaded
        random = _loaded(run, RANDOM) if baseline and checkpoint != RANDOM else {}
        if any(random.values()):
            columns[f"{label} random init"] = random
        for pair, values in loaded["cluster"].get("agreement", {}).items():
            agreement_rows.append([label, pair, f"{values.get('ari', float('nan')):.3f}",
                                   f"{values.get('nmi', float('nan')):.3f}"])
    rows = summary_rows(columns)
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric, values in rows:
        fmt = (lambda v: "–" if v is None else f"{v:.3f}") if "silhouette" in metric else \
            (lambda v: "–" if v is None else f"{100 * v:.1f}%")
        lines.append(f"| {metric} | " + " | ".join(fmt(values.get(n)) for n in names) + " |")
    text = "\n".join(lines) + "\n"
    if agreement_rows:
        text += "\nClusters fit separately vs jointly (adjusted Rand index, normalised mutual information):\n\n"
        text += "| run | clusterings | ARI | NMI |\n|---|---|---|---|\n"
        text += "".join(f"| {' | '.join(row)} |\n" for row in agreement_rows)
    if out:
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        (target / "compare.md").write_text(text)
        table = ["<table><tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            table.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        (target / "compare.html").write_text(
            "<!doctype html><meta charset='utf-8'><title>sagepairs compare</title><style>body{font-family:sans-serif}"
            "td,th{border:1px solid #ddd;padding:.2rem .5rem}table{border-collapse:collapse}</style>"
            f"<h1>Runs compared ({html.escape(checkpoint)})</h1>" + "".join(table) + "</table>"
            + (f"<pre>{html.escape(text.split(chr(10) + chr(10), 1)[1])}</pre>" if agreement_rows else ""))
    return text
