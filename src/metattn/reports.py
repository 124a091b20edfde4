"""Evaluation tables shared by the demo and the benchmark scripts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from metattn.data.synthetic import SinusoidTasks
from metattn.data.tasks import fixed_episodes, mean_ci95, split_finite
from metattn.meta.base import eval_mode


def finite_mean_ci95(v: torch.Tensor) -> tuple[float, float, int]:
    """(mean, ci95) over the finite values, and the number of diverged (non-finite) ones."""
    fin, bad = split_finite(v)
    mean, ci = mean_ci95(fin) if fin.numel() else (float("inf"), float("nan"))
    return mean, ci, bad


def sinusoid_mse_vs_shots(
    learner: Any,
    shots: Sequence[int] = (5, 10, 20),
    steps: Sequence[int] = (1, 10),
    episodes: int = 600,
    seed: int = 20240,
    k_query: int = 100,
    tasks: SinusoidTasks | None = None,
    chunk: int = 100,
) -> dict[int, dict[int, tuple[float, float, int]]]:
    """Test MSE (mean, 95% CI, diverged tasks) on fixed seeded sinusoid tasks, per K and steps.

    The tasks of each K are the recipe's test episodes for that K (:func:`fixed_episodes`
    with ``seed`` and ``chunk``, as ``eval.seed`` and ``eval.chunk``): a run trained and
    evaluated at K gets the same number in its ``summary.json``.

    ``learner`` is a MAML-family learner (``evaluate(batch, steps=...)`` gives per-step losses)
    or any learner whose ``evaluate`` adapts by a forward pass (then every step count shows
    the same number). ``tasks`` is the run's test sampler (its amplitude, phase and noise
    settings; only the shot and query counts are replaced), the paper's sinusoids by default.
    The learner runs in eval mode (no dropout), as in the recipe's
    evaluation, and is put back in its mode afterwards.
    """
    p = next(learner.parameters())
    tasks = tasks or SinusoidTasks()
    out: dict[int, dict[int, tuple[float, float, int]]] = {}
    with eval_mode(learner):
        for k in shots:
            sampler = dataclasses.replace(tasks, k_shot=k, k_query=k_query)
            eps = fixed_episodes(sampler, episodes, seed, chunk)
            per_step: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
            for b in eps:
                b = b.to(p.device, p.dtype)
                if hasattr(learner, "eval_inner_steps"):
                    curve = learner.evaluate(b, steps=max(steps))["mse_per_step"]
                    for s in steps:
                        per_step[s].append(curve[:, s].float().cpu())
                else:
                    loss = learner.evaluate(b)["mse"].float().cpu()
                    for s in steps:
                        per_step[s].append(loss)
            out[k] = {s: finite_mean_ci95(torch.cat(v)) for s, v in per_step.items()}
    return out


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                console: Console | None = None) -> None:
    """Print a table with rich (plain text when not on a terminal)."""
    table = Table(title=title)
    for c in columns:
        table.add_column(str(c), justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    (console or Console(width=140)).print(table)


def fmt(mean: float, ci: float, diverged: int = 0, digits: int = 3) -> str:
    """``0.123 ± 0.010`` (plus ``, 2 diverged`` when some tasks' adaptation diverged)."""
    text = f"{mean:.{digits}f} ± {ci:.{digits}f}"
    return text + (f" ({diverged} diverged)" if diverged else "")
