"""``metattn explain RUN_DIR``: a run's trained learner on its fixed test episodes, its
attention drawn and its faithfulness measured, as PNG figures and one self-contained HTML
report.

Each learner family has a section builder: a pair ``(applies(ctx) -> bool,
build(ctx) -> list[Section])`` in :data:`BUILDERS`. Every builder that applies adds its
sections, so a model family (a text encoder, a seq2seq model) plugs in with
:func:`register_builder` without touching the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metattn.config import RunConfig
from metattn.data.tasks import TaskBatch, fixed_episodes
from metattn.errors import ConfigError
from metattn.explain.report import Figures, Section, write_html
from metattn.meta.base import Learner
from metattn.recipe.build import build_tasks
from metattn.recipe.evaluation import load_run


@dataclass
class Explained:
    """What a section builder reads: the run's config and learner (eval mode, on the CPU by
    default), ``batch``, the first ``episodes`` fixed test episodes (for the figures),
    ``faith``, the fixed test episodes the faithfulness table averages over, ``figures``,
    which saves and embeds figures, and ``tasks``, the run's test task sampler (e.g. for
    its vocabulary)."""

    cfg: RunConfig
    learner: Learner
    batch: TaskBatch
    faith: list[TaskBatch]
    figures: Figures
    seed: int
    tasks: Any = None


Builder = tuple[Callable[[Explained], bool], Callable[[Explained], list[Section]]]
BUILDERS: list[Builder] = []


def register_builder(applies: Callable[[Explained], bool],
                     build: Callable[[Explained], list[Section]]) -> None:
    """Add a section builder: ``build(ctx)`` runs for every run where ``applies(ctx)``."""
    BUILDERS.append((applies, build))


def _builtin() -> None:
    if BUILDERS:
        return
    from metattn.explain import incontext, maml, metric, seq2seq, text

    for mod in (maml, metric, incontext, text, seq2seq):
        register_builder(mod.applies, mod.sections)


def explain_run(run_dir: str | Path, episodes: int = 4, out: str | Path | None = None,
                faith_episodes: int = 100, device: str = "cpu",
                overrides: list[str] | None = None) -> Path:
    """Write the figures and ``report.html`` of a run directory into ``out`` (default
    ``RUN_DIR/explain``); returns the report's path. The episodes are the run's fixed test
    episodes (``eval.seed``), so a report is reproducible."""
    if episodes < 1 or faith_episodes < 1:
        raise ConfigError(f"episodes={episodes}, faith_episodes={faith_episodes}; each must "
                          "be >= 1")
    _builtin()
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    cfg, learner = load_run(run_dir, overrides, device=device)
    _, test_tasks = build_tasks(cfg)
    n = max(episodes, faith_episodes)
    batches = fixed_episodes(test_tasks, n, cfg.eval.seed, cfg.eval.chunk)
    dev = next(learner.parameters()).device
    dtype = getattr(torch, cfg.train.dtype)
    batches = [b.to(dev, dtype) for b in batches]
    first = TaskBatch.cat(_take(batches, episodes))
    out = Path(out) if out is not None else run_dir / "explain"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Explained(cfg, learner, first, _take(batches, faith_episodes), Figures(out),
                    cfg.eval.seed, test_tasks)
    sections = [s for applies, build in BUILDERS if applies(ctx) for s in build(ctx)]
    if not sections:
        s = Section("Nothing to show")
        s.text(f"No section builder applies to {type(learner).__name__} "
               f"(learner kind {cfg.learner.get('kind')!r}).")
        sections = [s]
    intro = [f"run directory: {run_dir.resolve()}",
             f"learner {type(learner).__name__}, model {cfg.model.get('kind')}, task "
             f"{cfg.task.get('kind')}; {episodes} fixed test episode(s) for the figures "
             f"(eval.seed {cfg.eval.seed}), built in {time.perf_counter() - t0:.1f} s"]
    return write_html(out / "report.html", f"metattn explain: {cfg.name}", intro, sections)


def _take(batches: list[TaskBatch], n: int) -> list[TaskBatch]:
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b.slice(0, min(left, b.num_tasks)))
        left -= out[-1].num_tasks
    return out
