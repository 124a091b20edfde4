"""Plots written by the recipe and the demo (PNG, headless matplotlib).

Set ``train.plots: false`` to skip them (tests do).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metattn.data.synthetic import SinusoidTasks  # noqa: E402
from metattn.meta.base import LOSS_KEYS  # noqa: E402
from metattn.meta.maml import MAML  # noqa: E402

# (label, matplotlib style, predict(support_x, support_y, x) -> y) for one task
Curve = tuple[str, dict[str, Any], Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                            torch.Tensor]]


def training_curves(metrics_path: Path, out: Path,
                    inner_steps: tuple[int, int] | None = None) -> Path | None:
    """Meta-training loss (and accuracy) against the outer step, with evaluation points;
    ``inner_steps``: (training, test) inner steps of a MAML-family learner, for the labels."""
    if not metrics_path.is_file():
        return None
    train, evals = [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        (evals if rec.get("kind") == "eval" else train).append(rec)
    if not train:
        return None
    keys = [k for k in (*LOSS_KEYS, "mse_queries", "accuracy") if k in train[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        after = "" if inner_steps is None else f" after {inner_steps[0]} inner step(s)"
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1,
                label=f"training episodes' queries{after}")
        ev = [r for r in evals if key in r]
        if ev:
            after = "" if inner_steps is None else f", after {inner_steps[1]} inner step(s)"
            ax.errorbar([r["step"] for r in ev], [r[key] for r in ev],
                        yerr=[r.get(f"{key}_ci95", 0) for r in ev], fmt="o-", ms=3,
                        label=f"test episodes (95% CI){after}")
        ax.set_xlabel("meta-iteration (outer step)")
        ax.set_ylabel(f"query {key.replace('_', ' ')}")
        if key != "accuracy":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def learner_curves(learner: Any, name: str = "") -> list[Curve]:
    """How a learner predicts a task from its support set: a MAML-family learner before
    adapting (its meta-learned initialisation) and after ``eval_inner_steps`` steps; any
    other learner after its ``adapt`` (a forward pass for the in-context learner)."""
    who = f"{name}, " if name else ""
    if not isinstance(learner, MAML):
        label = f"{who}forward pass" if name else "adapted"
        return [(label, {"color": "tab:green", "lw": 2, "alpha": 0.85},
                 _predictor(learner))]
    return [(f"{name or 'meta-learned'} init", {"ls": ":", "color": "tab:gray"},
             _predictor(learner, steps=0)),
            (f"{who}after {learner.eval_inner_steps} steps",
             {"ls": "--", "color": "tab:red", "lw": 2}, _predictor(learner))]


def _predictor(learner: Any, **adapt: Any) -> Callable[..., torch.Tensor]:
    """``(support_x, support_y, x) -> y`` on the CPU, run on the learner's device and dtype."""
    p = next(learner.parameters())

    def predict(sx: torch.Tensor, sy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return learner.adapt(sx.to(p), sy.to(p), **adapt)(x.to(p)).float().cpu()

    return predict


def sinusoid_panels(tasks: SinusoidTasks, curves: Sequence[Curve], path: Path,
                    seed: int = 0, n_tasks: int = 4) -> Path:
    """PNG: on ``n_tasks`` seeded sinusoids, the ground truth, the support points and each
    curve (predicted on a grid from the task's support set)."""
    batch = tasks.sample(n_tasks, torch.Generator().manual_seed(seed))
    grid = torch.linspace(*tasks.x_range, 200).view(-1, 1)
    fig, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3.4), squeeze=False)
    for t, ax in enumerate(axes[0]):
        sx, sy = batch.support_x[t], batch.support_y[t]
        amp, phase = batch.info["amplitude"][t], batch.info["phase"][t]
        ax.plot(grid, tasks.function(grid, amp, phase), "k-", lw=2, label="ground truth")
        for label, style, predict in curves:
            ax.plot(grid, predict(sx, sy, grid), label=label, **style)
        ax.plot(sx, sy, "^", color="tab:blue", ms=7, label=f"{sx.shape[0]} support points")
        ax.set_title(f"A={float(amp):.2f}, phase={float(phase):.2f}")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_ylim(-5.5, 5.5)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def adaptation(tasks: Any, learner: Any, path: Path, seed: int = 0) -> Path | None:
    """The recipe's ``adaptation.png`` for task families that can be drawn (sinusoids: the
    learner's curves against the truth); None for the others."""
    if not isinstance(tasks, SinusoidTasks):
        return None
    return sinusoid_panels(tasks, learner_curves(learner), path, seed)
