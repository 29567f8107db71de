"""loss.png from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_jsonl", "plot_loss"]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a process killed mid-write) is skipped, not fatal."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows



def _terms(rows: list[dict]) -> list[tuple[str, str]]:
    """(metrics key, legend label) of the loss's terms: VICReg's weighted terms, or DINO's per-direction losses."""
    if "sim_weighted" in rows[0]:
        return [(f"{term}_weighted", f"{term} (weighted)") for term in ("sim", "std", "cov")]
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith("loss_"))
    return [(key, key.removeprefix("loss_")) for key in keys]


def plot_loss(metrics: Path, out: Path) -> Path | None:
    """Loss and its terms (VICReg's three weighted ones, or DINO's loss per direction) against the step, the learning
    rate beside; None if nothing was logged."""
    rows = [r for r in read_jsonl(metrics) if r.get("loss") is not None]
    if not rows:
        return None
    # matplotlib here, not at the top: Agg must be chosen before pyplot loads, and every rank and DataLoader
    # worker imports this module while only rank 0 draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    ax_loss.plot(steps, [r["loss"] for r in rows], label="loss", color="black", lw=2)
    for (key, label), colour in zip(_terms(rows), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax_loss.plot([s for s, _ in points], [v for _, v in points], label=label, color=colour, lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("DINO loss" if "sim_weighted" not in rows[0] else "VICReg loss")
    ax_loss.set_yscale("log" if min(r["loss"] for r in rows) > 0 else "linear")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title("training loss")
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:purple")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
