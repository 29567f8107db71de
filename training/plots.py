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



def plot_loss(metrics: Path, out: Path) -> Path | None:
    """Loss and its three weighted terms against the step, the learning rate beside; None if nothing was logged."""
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
    for term, colour in (("sim", "tab:blue"), ("std", "tab:orange"), ("cov", "tab:green")):
        ax_loss.plot(steps, [r[f"{term}_weighted"] for r in rows], label=f"{term} (weighted)", color=colour, lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("VICReg loss")
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
