"""`analysis report`: ``RUN/report/index.html``, self-contained beside its PNGs, from whatever has been computed.

Every number of the trained model is shown next to the same number of a random-init model of the same
architecture (the ``random`` checkpoint), so a reader sees what training bought.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path

from analysis.runs import RANDOM
from analysis.store import read_json

__all__ = ["write_report", "summary_rows", "knn_against_baseline"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}td,th{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.better{background:#e6f4ea}.worse{background:#fdecea}
img{max-width:100%;border:1px solid #eee;margin:.3rem 0}.muted{color:#777;font-size:.88rem}code{background:#f4f4f4;padding:0 .2rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:.6rem}
"""


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_rows(results: dict[str, dict]) -> list[tuple[str, dict[str, float | None]]]:
    """(metric name, {checkpoint: value}) rows: k-NN at the headline k per label and space, retrieval, silhouette."""
    rows: list[tuple[str, dict]] = []
    knn_any = next((r["knn"] for r in results.values() if r.get("knn")), None)
    if knn_any:
        ks = [int(k) for k in knn_any["k"]]
        k = str(20 if 20 in ks else ks[0])
        for label, entry in knn_any["labels"].items():
            for space in entry.get("spaces", {}):
                rows.append((f"k-NN {label} top-1 (k={k}, {space})",
                             {c: r.get("knn", {}).get("labels", {}).get(label, {}).get("spaces", {}).get(space, {})
                              .get(k, {}).get("top1") for c, r in results.items()}))
            if "majority_baseline" in entry:
                rows.append((f"k-NN {label}: majority class", {c: entry["majority_baseline"] for c in results}))
    for direction, name in (("rgb_to_ir", "RGB -> IR"), ("ir_to_rgb", "IR -> RGB")):
        for k in ("1", "5"):
            rows.append((f"retrieval {name} top-{k}", {c: r.get("retrieval", {}).get(direction, {}).get(k)
                                                       for c, r in results.items()}))
    chance = next((r["retrieval"].get("chance") for r in results.values() if r.get("retrieval", {}).get("chance")), None)
    if chance:
        for k, value in chance.items():
            rows.append((f"retrieval chance top-{k}", {c: value for c in results}))
    for space in ("rgb", "ir", "joint"):
        rows.append((f"silhouette ({space})", {c: r.get("cluster", {}).get("spaces", {}).get(space, {})
                                               .get("silhouette_mean") for c, r in results.items()}))
    return [(name, values) for name, values in rows if any(v is not None for v in values.values())]


def knn_against_baseline(analysis, labels: tuple[str, ...] = ("is_sky", "is_day")) -> list[str]:
    """One line per label and space: k-NN top-1 at the headline k of ``last`` against the random-init model."""
    names = [c for c in ("last", RANDOM) if analysis.run.results(c).exists()]
    if len(names) < 2:
        return []
    results = {c: _load(analysis.run.results(c)) for c in names}
    lines = []
    for name, values in summary_rows(results):
        if any(name.startswith(f"k-NN {label} top-1") for label in labels):
            trained, baseline = values.get("last"), values.get(RANDOM)
            verdict = "" if trained is None or baseline is None else (
                "  better" if trained > baseline else ("  same" if trained == baseline else "  WORSE"))
            lines.append(f"{name[len('k-NN '):]}: trained {_pct(trained)}, random init {_pct(baseline)}{verdict}")
    return lines


def _load(results_dir: Path) -> dict:
    loaded = {name: read_json(results_dir / f"{name}.json") or {} for name in ("pca", "knn", "retrieval", "cluster", "tsne")}
    loaded["attention"] = read_json(results_dir / "attention" / "attention.json") or {}
    return loaded


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


def write_report(analysis) -> Path:
    run = analysis.run
    report = run.report_dir
    report.mkdir(parents=True, exist_ok=True)
    checkpoints = [c for c in analysis.checkpoints_for_report() if run.results(c).exists()]
    results = {c: _load(run.results(c)) for c in checkpoints}
    config = run.training_config()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sagepairs analysis: {html.escape(str(run.root))}"
             f"</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>What the model learned: <code>{html.escape(str(run.root))}</code></h1>")
    emb_attrs = {}
    try:
        emb_attrs = analysis.embeddings("last").attrs
    except Exception:  # noqa: BLE001 - the report shows what exists
        pass
    m = config.model
    parts.append(
        "<p>"
        f"Mode <b>{html.escape(m.mode)}</b>; RGB branch <code>{html.escape(m.rgb_arch)}</code> (patch {m.rgb_patch}), "
        f"IR branch <code>{html.escape(m.ir_arch)}</code> (patch {m.ir_patch}){f', depth {m.depth}' if m.depth else ''}; "
        f"input {config.data.rgb_size[0]}x{config.data.rgb_size[1]} / {config.data.ir_size[0]}x{config.data.ir_size[1]}. "
        f"Dataset <code>{html.escape(str(emb_attrs.get('dataset', config.data.dataset)))}</code>, "
        f"{emb_attrs.get('n', '?')} samples embedded (<code>{html.escape(str(emb_attrs.get('where', '')))}</code>), "
        f"checkpoint <code>last</code> = step {emb_attrs.get('checkpoint_step', '?')}, "
        f"epoch {_num(emb_attrs.get('checkpoint_epoch'), 1) if emb_attrs.get('checkpoint_epoch') is not None else '?'}."
        "</p>"
    )
    parts.append("<p class='muted'>Embeddings are the backbone outputs (before the expander) of the evaluation view "
                 "(whole frame, no augmentation), as training preprocesses it. <code>random</code> is a random-init "
                 "model of the same architecture: the baseline.</p>")

    # -- summary --
    parts.append("<h2>Trained vs random init</h2>")
    rows, classes = [], []
    for name, values in summary_rows(results):
        row = [name] + [_pct(values.get(c)) if "silhouette" not in name else _num(values.get(c)) for c in checkpoints]
        cls = [""] * len(row)
        if "last" in values and RANDOM in values and None not in (values["last"], values[RANDOM]) \
                and "chance" not in name and "majority" not in name:
            cls[checkpoints.index("last") + 1] = "better" if values["last"] > values[RANDOM] else (
                "worse" if values["last"] < values[RANDOM] else "")
        rows.append(row)
        classes.append(cls)
    parts.append(_table(["metric"] + [("trained (last)" if c == "last" else "random init" if c == RANDOM else c)
                                      for c in checkpoints], rows, classes))
    knn = results.get("last", {}).get("knn")
    if knn:
        parts.append(f"<p class='muted'>k-NN: DINO's weighted k-NN (cosine, T = {knn['temperature']}), trained on "
                     f"{knn['train']} samples of split 'train', tested on {knn['test']} of split 'test'.</p>")

    # -- training --
    loss = _copy_png(run.root / "loss.png", report, "loss.png")
    if loss:
        parts.append("<h2>Training</h2>" + _img(loss, "loss and its terms over the steps"))
    evolution = read_json(run.analysis_dir / "evolution.json")
    if evolution:
        parts.append("<h2>Over the checkpoints</h2>")
        parts.append(_img(_copy_png(run.analysis_dir / "evolution.png", report, "evolution.png"),
                          "k-NN, retrieval and silhouette per kept checkpoint (epoch 0 = random init)"))

    # -- per checkpoint sections --
    for checkpoint in checkpoints:
        res, source = results[checkpoint], run.results(checkpoint)
        title = "trained model (last)" if checkpoint == "last" else "random-init baseline" if checkpoint == RANDOM else checkpoint
        parts.append(f"<h2>PCA, clusters and maps: {html.escape(title)}</h2>")
        pca = res.get("pca", {}).get("spaces", {})
        if pca:
            parts.append(_table(["space", "dim", "components", "variance explained", "components for 90%"],
                                [[s, str(v["dim"]), str(v["components"]), _pct(v["explained_by_components"]),
                                  str(v["components_for_90pct"] or "more")] for s, v in pca.items()]))
            parts.append(_img(_copy_png(source / "pca.png", report, f"{checkpoint}/pca.png"), "explained variance"))
        cluster = res.get("cluster", {})
        if cluster.get("spaces"):
            columns = sorted({c for v in cluster["spaces"].values() for c in v.get("nmi", {})})
            parts.append("<p>Normalised mutual information between the clusters and each metadata column "
                         "(1: the clusters are that column; 0: unrelated):</p>")
            parts.append(_table(["space", "k", "silhouette"] + columns,
                                [[s, str(v.get("k")), f"{_num(v.get('silhouette_mean'))} ± {_num(v.get('silhouette_std'))}"]
                                 + [_num(v.get("nmi", {}).get(c)) for c in columns]
                                 for s, v in cluster["spaces"].items()]))
            if cluster.get("agreement"):
                parts.append("<p>Do clusters fit on RGB and on IR separately agree with each other and with the joint "
                             "ones?</p>")
                parts.append(_table(["pair", "ARI", "NMI"], [[p, _num(v.get("ari")), _num(v.get("nmi"))]
                                                             for p, v in cluster["agreement"].items()]))
        figures = []
        for step in ("cluster", "tsne"):
            for png in res.get(step, {}).get("pngs", []):
                figures.append(_img(_copy_png(source / png, report, f"{checkpoint}/{png}"), png))
        if figures:
            parts.append("<div class='grid'>" + "".join(figures) + "</div>")
        link = res.get("tsne", {}).get("link")
        if link:
            parts.append(f"<p>Link map: mean distance between a sample's RGB and IR points "
                         f"{_num(link.get('pair_distance'))} vs {_num(link.get('random_distance'))} between random "
                         f"non-partners (ratio {_num(link.get('ratio'))}; lower = the branches agree).</p>")
        attention = res.get("attention", {})
        if attention.get("pngs"):
            parts.append("<h3>Attention (last block, CLS to patches, per head)</h3>")
            images = []
            for png in attention["pngs"]:
                src = source / png if (source / png).exists() else source / "attention" / png
                images.append(_img(_copy_png(src, report, f"{checkpoint}/attention/{Path(png).name}"), Path(png).stem))
            parts.append("".join(images))
    parts.append("<p class='muted'>Made by <code>analysis report</code>; the numbers are in "
                 "<code>RUN/analysis/&lt;checkpoint&gt;/*.json</code>.</p></body></html>")
    tmp = report / "index.html.tmp"
    tmp.write_text("\n".join(parts))
    tmp.replace(report / "index.html")
    return report / "index.html"
