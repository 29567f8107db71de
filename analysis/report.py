"""`analysis report`: ``RUN/report/index.html``, self-contained beside its PNGs, from whatever has been computed.

Every number of the trained model is shown next to the same number of a random-init model of the same
architecture (the ``random`` checkpoint), so a reader sees what training bought. The numbers come from the typed
records of :mod:`analysis.results`; a step that could not run on the data is named with its reason.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Mapping
from pathlib import Path

from analysis.results import (AttentionResult, CheckpointResults, ClusterResult, EvolutionResult, KNNResult,
                              PCAResult, RESULT_FILES, RetrievalResult, SkippedSteps, TSNEResult,
                              load_checkpoint_results, read_if_present, result_from_json)
from analysis.runs import RANDOM, AnalysisError, RunDir
from analysis.store import SPACES

__all__ = ["write_report", "summary_rows", "knn_against_baseline"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}td,th{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.better{background:#e6f4ea}.worse{background:#fdecea}
img{max-width:100%;border:1px solid #eee;margin:.3rem 0}.muted{color:#777;font-size:.88rem}code{background:#f4f4f4;padding:0 .2rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:.6rem}.skipped{background:#fff8e1}
"""


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# -- the headline metrics (also `analysis compare`'s) ----------------------------------------------------------

Row = tuple[str, dict[str, float | None]]


def summary_rows(results: Mapping[str, CheckpointResults]) -> list[Row]:
    """(metric name, {checkpoint: value}) rows: k-NN at the headline k per label and space, retrieval, silhouette;
    a metric no checkpoint has is left out."""
    typed = {name: _as_records(value) for name, value in results.items()}
    rows = _knn_rows(typed) + _retrieval_rows(typed) + _silhouette_rows(typed)
    return [(name, values) for name, values in rows if any(v is not None for v in values.values())]


def _as_records(value: CheckpointResults | dict) -> CheckpointResults:
    """compare.py still passes {step: the file's parsed JSON, or {}}: read those through the records, strictly."""
    if isinstance(value, CheckpointResults):
        return value

    def record(step: str, record_type: type):
        data = value[step] if step in value else {}
        return result_from_json(data, record_type, f"{step}.json") if data else None

    return CheckpointResults(pca=None, knn=record("knn", KNNResult), retrieval=record("retrieval", RetrievalResult),
                             cluster=record("cluster", ClusterResult), tsne=None, attention=None)


def _knn_rows(results: dict[str, CheckpointResults]) -> list[Row]:
    first = next((r.knn for r in results.values() if r.knn is not None), None)
    if first is None:
        return []
    k = first.headline_k
    rows: list[Row] = []
    for label, entry in first.labels.items():
        for space in entry.spaces:
            rows.append((f"k-NN {label} top-1 (k={k}, {space})",
                         {c: _knn_top1(r.knn, label, space, k) for c, r in results.items()}))
        rows.append((f"k-NN {label}: majority class", {c: entry.majority_baseline for c in results}))
    return rows


def _knn_top1(knn: KNNResult | None, label: str, space: str, k: str) -> float | None:
    """None where this checkpoint has no such measurement (not computed, label not measured, other k)."""
    if knn is None or label not in knn.labels or space not in knn.labels[label].spaces:
        return None
    scores = knn.labels[label].spaces[space]
    return scores[k].top1 if k in scores else None


def _retrieval_rows(results: dict[str, CheckpointResults]) -> list[Row]:
    def top(retrieval: RetrievalResult | None, direction: str, k: str) -> float | None:
        scores = getattr(retrieval, direction) if retrieval is not None else {}
        return scores[k] if k in scores else None

    directions = (("rgb_to_ir", "RGB -> IR"), ("ir_to_rgb", "IR -> RGB"))
    rows: list[Row] = [(f"retrieval {name} top-{k}", {c: top(r.retrieval, direction, k) for c, r in results.items()})
                       for direction, name in directions for k in ("1", "5")]
    first = next((r.retrieval for r in results.values() if r.retrieval is not None), None)
    if first is not None:
        rows += [(f"retrieval chance top-{k}", {c: value for c in results}) for k, value in first.chance.items()]
    return rows


def _silhouette_rows(results: dict[str, CheckpointResults]) -> list[Row]:
    def mean(cluster: ClusterResult | None, space: str) -> float | None:
        return cluster.spaces[space].silhouette_mean if cluster is not None and space in cluster.spaces else None

    return [(f"silhouette ({space})", {c: mean(r.cluster, space) for c, r in results.items()}) for space in SPACES]


def knn_against_baseline(analysis, labels: tuple[str, ...] = ("is_sky", "is_day")) -> list[str]:
    """One line per label and space: k-NN top-1 at the headline k of ``last`` against the random-init model."""
    names = [c for c in ("last", RANDOM) if analysis.run.results(c).exists()]
    if len(names) < 2:
        return []
    results = {c: load_checkpoint_results(analysis.run.results(c)) for c in names}
    lines = []
    for name, values in summary_rows(results):
        if any(name.startswith(f"k-NN {label} top-1") for label in labels):
            trained, baseline = values["last"], values[RANDOM]
            verdict = "" if trained is None or baseline is None else (
                "  better" if trained > baseline else ("  same" if trained == baseline else "  WORSE"))
            lines.append(f"{name[len('k-NN '):]}: trained {_pct(trained)}, random init {_pct(baseline)}{verdict}")
    return lines


# -- HTML pieces ---------------------------------------------------------------------------------------------

def _copy_png(source: Path, report: Path, name: str) -> str | None:
    if not source.exists():
        return None
    target = report / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return name


def _img(src: str | None, caption: str = "") -> str:
    if src is None:
        return ""
    alt = html.escape(caption or src)
    return f'<figure><img src="{html.escape(src)}" alt="{alt}"><figcaption class="muted">{alt}</figcaption></figure>'


def _table(header: list[str], rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            cls = classes[i][j] if classes else ""
            cells.append(f'<td class="{cls}">{html.escape(cell)}</td>' if cls else f"<td>{html.escape(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _checkpoint_title(checkpoint: str) -> str:
    return {"last": "trained (last)", RANDOM: "random init"}.get(checkpoint, checkpoint)


# -- the page, top to bottom ----------------------------------------------------------------------------------

def write_report(analysis) -> Path:
    """``RUN/report/index.html`` (and its PNGs beside it) from whatever has been computed."""
    run: RunDir = analysis.run
    run.report_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = [c for c in analysis.checkpoints_for_report() if run.results(c).exists()]
    results = {c: load_checkpoint_results(run.results(c)) for c in checkpoints}
    sections = [
        _page_head(run.root),
        _what_was_analysed(analysis),
        _skipped_steps(run),
        _trained_vs_random(results),
        _training(run),
        *(_checkpoint_section(c, results[c], run.results(c), run.report_dir) for c in checkpoints),
        _page_foot(),
    ]
    return _write_page(run.report_dir / "index.html", sections)


def _page_head(root: Path) -> str:
    name = html.escape(str(root))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sagepairs analysis: {name}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>What the model learned: <code>{name}</code></h1>")


def _what_was_analysed(analysis) -> str:
    """The model, its input sizes, the dataset and the embedded selection of ``last``."""
    config = analysis.run.training_config()
    try:
        embedded = analysis.embeddings("last").attrs
    except AnalysisError:  # not embedded yet: the report shows what exists
        embedded = {}
    m, data = config.model, config.data
    depth = f", depth {m.depth}" if m.depth else ""
    epoch = embedded.get("checkpoint_epoch")
    return (
        "<p>"
        f"Mode <b>{html.escape(m.mode)}</b>; RGB branch <code>{html.escape(m.rgb_arch)}</code> (patch {m.rgb_patch}), "
        f"IR branch <code>{html.escape(m.ir_arch)}</code> (patch {m.ir_patch}){depth}; "
        f"input {data.rgb_size[0]}x{data.rgb_size[1]} / {data.ir_size[0]}x{data.ir_size[1]}. "
        f"Dataset <code>{html.escape(str(embedded.get('dataset', data.dataset)))}</code>, "
        f"{embedded.get('n', '?')} samples embedded (<code>{html.escape(str(embedded.get('where', '')))}</code>), "
        f"checkpoint <code>last</code> = step {embedded.get('checkpoint_step', '?')}, "
        f"epoch {_num(epoch, 1) if epoch is not None else '?'}."
        "</p>\n"
        "<p class='muted'>Embeddings are the backbone outputs (before the expander) of the evaluation view "
        "(whole frame, no augmentation), as training preprocesses it. <code>random</code> is a random-init "
        "model of the same architecture: the baseline.</p>"
    )


def _skipped_steps(run: RunDir) -> str:
    """What the last `analysis all` could not run on this data, and why (a skip later made good is not shown)."""
    record = read_if_present(run.analysis_dir / "skipped.json", SkippedSteps)
    still = [s for s in record.steps if not (run.results(s.checkpoint) / RESULT_FILES[s.step]).exists()] \
        if record is not None else []
    if not still:
        return ""
    return ("<h2>Skipped steps</h2><p>These steps could not run on this data; everything else below was "
            "computed.</p>\n" + _table(["step", "checkpoint", "why"], [[s.step, s.checkpoint, s.reason] for s in still],
                                     [["skipped", "", ""] for _ in still]))


def _trained_vs_random(results: dict[str, CheckpointResults]) -> str:
    """The headline metrics, the trained model's cell green where it beats the random-init model, red where not."""
    checkpoints = list(results)
    rows, classes = [], []
    for name, values in summary_rows(results):
        show = _num if "silhouette" in name else _pct
        rows.append([name] + [show(values[c]) for c in checkpoints])
        classes.append([""] * (len(checkpoints) + 1))
        if "last" in values and RANDOM in values and None not in (values["last"], values[RANDOM]) \
                and "chance" not in name and "majority" not in name:
            classes[-1][checkpoints.index("last") + 1] = "better" if values["last"] > values[RANDOM] else (
                "worse" if values["last"] < values[RANDOM] else "")
    parts = ["<h2>Trained vs random init</h2>",
             _table(["metric"] + [_checkpoint_title(c) for c in checkpoints], rows, classes)]
    knn = results["last"].knn if "last" in results else None
    if knn is not None:
        parts.append(f"<p class='muted'>k-NN: DINO's weighted k-NN (cosine, T = {knn.temperature}), trained on "
                     f"{knn.train} samples of split 'train', tested on {knn.test} of split 'test'.</p>")
    return "\n".join(parts)


def _training(run: RunDir) -> str:
    """The loss curve, and the metrics over the kept checkpoints."""
    parts = []
    loss = _copy_png(run.root / "loss.png", run.report_dir, "loss.png")
    if loss:
        parts.append("<h2>Training</h2>" + _img(loss, "loss and its terms over the steps"))
    evolution = read_if_present(run.analysis_dir / "evolution.json", EvolutionResult)
    if evolution is not None:
        parts.append("<h2>Over the checkpoints</h2>")
        parts.append(_img(_copy_png(run.analysis_dir / evolution.png, run.report_dir, evolution.png),
                          "k-NN, retrieval and silhouette per kept checkpoint (epoch 0 = random init)"))
    return "\n".join(parts)


def _checkpoint_section(checkpoint: str, res: CheckpointResults, source: Path, report: Path) -> str:
    """PCA, clusters, maps and attention of one checkpoint."""
    title = {"last": "trained model (last)", RANDOM: "random-init baseline"}.get(checkpoint, checkpoint)
    return "\n".join([
        f"<h2>PCA, clusters and maps: {html.escape(title)}</h2>",
        _pca(res.pca, checkpoint, source, report),
        _clusters(res.cluster),
        _explorer_link(report) if checkpoint == "last" else "",
        _maps(res.cluster, res.tsne, checkpoint, source, report),
        _link(res.tsne),
        _attention(res.attention, checkpoint, source, report),
    ])


def _pca(pca: PCAResult | None, checkpoint: str, source: Path, report: Path) -> str:
    if pca is None or not pca.spaces:
        return ""
    table = _table(["space", "dim", "components", "variance explained", "components for 90%"],
                   [[s, str(v.dim), str(v.components), _pct(v.explained_by_components),
                     str(v.components_for_90pct or "more")] for s, v in pca.spaces.items()])
    return table + _img(_copy_png(source / pca.png, report, f"{checkpoint}/{pca.png}"), "explained variance")


def _clusters(cluster: ClusterResult | None) -> str:
    """Silhouette and NMI against each metadata column per space; agreement between the spaces' clusterings."""
    if cluster is None or not cluster.spaces:
        return ""
    columns = sorted({c for v in cluster.spaces.values() for c in v.nmi})
    parts = ["<p>Normalised mutual information between the clusters and each metadata column "
             "(1: the clusters are that column; 0: unrelated):</p>",
             _table(["space", "k", "silhouette"] + columns,
                    [[s, str(v.k), f"{_num(v.silhouette_mean)} ± {_num(v.silhouette_std)}"]
                     + [_num(v.nmi[c] if c in v.nmi else None) for c in columns] for s, v in cluster.spaces.items()])]
    if cluster.agreement:
        parts.append("<p>Do clusters fit on RGB and on IR separately agree with each other and with the joint "
                     "ones?</p>")
        parts.append(_table(["pair", "ARI", "NMI"],
                            [[pair, _num(v.ari), _num(v.nmi)] for pair, v in cluster.agreement.items()]))
    return "\n".join(parts)


def _maps(cluster: ClusterResult | None, tsne: TSNEResult | None, checkpoint: str, source: Path, report: Path) -> str:
    """The cluster and t-SNE figures, in a grid."""
    pngs = (cluster.pngs if cluster is not None else []) + (tsne.pngs if tsne is not None else [])
    figures = [_img(_copy_png(source / png, report, f"{checkpoint}/{png}"), png) for png in pngs]
    return "<div class='grid'>" + "".join(figures) + "</div>" if figures else ""


def _explorer_link(report: Path) -> str:
    """A link to the interactive explorer (RUN/report/explorer/), when `analysis report` wrote it."""
    if not (report / "explorer" / "index.html").exists():
        return ""
    return ("<p class='explorer'><a href='explorer/index.html'><b>Open the explorer</b></a>: the maps below with every point, "
            "coloured by any catalog column or cluster, with thumbnails; a selection exported there becomes a "
            "subset with <code>catalog select DATASET --keys keys.csv</code>.</p>")


def _link(tsne: TSNEResult | None) -> str:
    if tsne is None or tsne.link is None:
        return ""
    link = tsne.link
    return (f"<p>Link map: mean distance between a sample's RGB and IR points {_num(link.pair_distance)} vs "
            f"{_num(link.random_distance)} between random non-partners (ratio {_num(link.ratio)}; lower = the "
            "branches agree).</p>")


def _attention(attention: AttentionResult | None, checkpoint: str, source: Path, report: Path) -> str:
    if attention is None or not attention.pngs:
        return ""
    images = []
    for png in attention.pngs:
        src = source / png if (source / png).exists() else source / "attention" / png
        images.append(_img(_copy_png(src, report, f"{checkpoint}/attention/{Path(png).name}"), Path(png).stem))
    return "<h3>Attention (last block, CLS to patches, per head)</h3>" + "".join(images)


def _page_foot() -> str:
    return ("<p class='muted'>Made by <code>analysis report</code>; the numbers are in "
            "<code>RUN/analysis/&lt;checkpoint&gt;/*.json</code>.</p></body></html>")


def _write_page(path: Path, sections: list[str]) -> Path:
    """Atomically: a browser never sees half a page."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(s for s in sections if s))
    tmp.replace(path)
    return path
