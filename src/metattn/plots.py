"""Plots written by the recipe (PNG, headless matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(metrics_path: Path, out: Path) -> Path | None:
    """Meta-training loss (and accuracy) against the outer step, with evaluation points."""
    if not metrics_path.is_file():
        return None
    train, evals = [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        (evals if rec.get("kind") == "eval" else train).append(rec)
    if not train:
        return None
    keys = [k for k in ("loss", "accuracy") if k in train[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1, label="train (query)")
        ev = [r for r in evals if key in r]
        if ev:
            ax.errorbar([r["step"] for r in ev], [r[key] for r in ev],
                        yerr=[r.get(f"{key}_ci95", 0) for r in ev], fmt="o-", ms=3,
                        label="test episodes (95% CI)")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(key)
        if key == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
