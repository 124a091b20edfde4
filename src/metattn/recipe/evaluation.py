"""Evaluation: mean and 95% CI of each metric on fixed, seeded test episodes; the final
evaluation's ``summary.json``; and the way back from a run directory to a trained learner
(:func:`load_run`), used by ``metattn eval``, the demo and the benchmarks."""

from __future__ import annotations

import functools
import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metattn import __version__, checkpoint
from metattn.allocator import cpu_allocator_tuned
from metattn.config import RunConfig, apply_overrides, from_dict, load
from metattn.data.tasks import TaskBatch, fixed_episodes, mean_ci95, split_finite
from metattn.errors import CheckpointError, ConfigError
from metattn.meta.base import LOSS_KEYS, Learner, eval_mode
from metattn.optim import WeightAverage
from metattn.recipe.build import build_learner, build_tasks
from metattn.recipe.distributed import pick_device
from metattn.recipe.log import eval_bar


def evaluate(learner: Learner, episodes: list[TaskBatch], device: torch.device,
             dtype: torch.dtype, on_chunk: Callable[[int, int], None] | None = None,
             rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Mean and 95% CI of every per-task metric over a fixed list of episode batches.

    The learner runs in eval mode (no dropout: an episode's result must not depend on the
    random state or on its chunk-mates) and inside a forked RNG, so evaluating during training
    leaves the training run's random stream untouched. A task whose loss is not finite
    (diverged adaptation) is left out of EVERY metric and counted once per metric as
    ``<metric>_diverged``. Under torchrun (``world`` > 1) each rank evaluates every
    ``world``-th batch and the per-task results are gathered in the batches' order, so every
    rank gets the single-process result in 1/world of the time.
    """
    if world > 1:
        # every rank scores rank 0's model: running statistics (BatchNorm buffers) drift
        # apart between ranks, since DDP copies buffers only at the start of a forward
        for buf in learner.buffers():
            dist.broadcast(buf, src=0)
    mine = [(i, b) for i, b in enumerate(episodes) if i % world == rank]
    results: dict[int, dict[str, torch.Tensor]] = {}
    total, done = sum(b.num_tasks for _, b in mine), 0
    with eval_mode(learner), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, b in mine:
            if on_chunk is not None:
                on_chunk(done, total)
            done += b.num_tasks
            out = learner.evaluate(b.to(device, dtype))
            loss = next((out[k] for k in LOSS_KEYS if k in out), None)
            bad = (~torch.isfinite(loss.detach()) if loss is not None and loss.dim() == 1
                   else None)
            results[i] = {}
            for k, v in out.items():
                v = v.detach().float().cpu()
                if bad is not None and v.dim() in (1, 2) and bool(bad.any()):
                    # per-task values and per-task curves alike: a diverged task leaves
                    # every metric, so each curve is over the same tasks as the loss
                    m = bad.cpu() if v.dim() == 1 else bad.cpu().unsqueeze(-1)
                    v = v.masked_fill(m, float("nan"))
                results[i][k] = v
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, results)
        results = {i: r for part in gathered for i, r in part.items()}
    per_task: dict[str, list[torch.Tensor]] = {}
    for i in sorted(results):
        for k, v in results[i].items():
            per_task.setdefault(k, []).append(v)
    res: dict[str, Any] = {"episodes": sum(b.num_tasks for b in episodes)}
    # Tasks whose adaptation diverged (non-finite loss) are counted, not averaged in.
    for k, vs in per_task.items():
        v = torch.cat(vs)
        if v.dim() == 1:
            fin, bad = split_finite(v)
            res[k], res[f"{k}_ci95"] = mean_ci95(fin) if fin.numel() else (math.inf, math.nan)
            if bad:
                res[f"{k}_diverged"] = bad
        else:  # per-step curves [T, steps + 1]
            cols = [split_finite(v[:, i]) for i in range(v.shape[1])]
            stats = [mean_ci95(f) if f.numel() else (math.inf, math.nan) for f, _ in cols]
            res[k] = [m for m, _ in stats]
            res[f"{k}_ci95"] = [c for _, c in stats]
            if any(b for _, b in cols):
                res[f"{k}_diverged"] = [b for _, b in cols]
    return res


def headline(result: dict[str, Any], n_way: int | None) -> tuple[str, float, float]:
    """The metric a run is judged by: accuracy for classification, else loss (MSE)."""
    key = "accuracy" if n_way is not None and "accuracy" in result else next(
        k for k in LOSS_KEYS if k in result)
    return key, float(result[key]), float(result[f"{key}_ci95"])


def final_evaluation(cfg: RunConfig, learner: Learner, test_tasks: Any, run_dir: Path,
                     device: torch.device, dtype: torch.dtype, n_way: int | None, step: int,
                     seconds: float, write: bool = True, episodes: int | None = None,
                     extra: dict[str, Any] | None = None, rank: int = 0, world: int = 1
                     ) -> dict[str, Any]:
    """Evaluate on the fixed seeded test episodes (split over ``world`` ranks under torchrun)
    and write ``summary.json``."""
    n = episodes or cfg.eval.episodes
    with eval_bar(write and cfg.train.progress) as bar:
        res = evaluate(learner, fixed_episodes(test_tasks, n, cfg.eval.seed, cfg.eval.chunk),
                       device, dtype, bar, rank, world)
    if n_way is None:
        n_way = test_tasks.sample(1, torch.Generator().manual_seed(0)).n_way
    key, mean, ci = headline(res, n_way)
    summary = {
        "name": cfg.name,
        "metric": key,
        "mean": mean,
        "ci95": ci,
        "episodes": res["episodes"],
        "steps": step,
        "seconds": round(seconds, 2),
        "learner": cfg.learner.get("kind"),
        "eval_inner_steps": getattr(learner, "eval_inner_steps", None),
        "device": str(device),
        **provenance(),
        "malloc_tuned": cpu_allocator_tuned(),
        "results": res,
        **(extra or {}),
    }
    if write:
        name = "summary.json" if episodes is None else "eval.json"
        checkpoint.atomic_write_bytes(run_dir / name, json.dumps(summary, indent=1).encode())
    return summary


def provenance() -> dict[str, Any]:
    """What produced a result: metattn's version, the git commit of its source checkout
    (None when installed from a package), torch's version."""
    return {"metattn": __version__, "git_commit": _git_commit(), "torch": torch.__version__}


@functools.cache
def _git_commit() -> str | None:
    src = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def load_run(run_dir: str | Path, overrides: list[str] | None = None,
             device: str | None = None) -> tuple[RunConfig, Learner]:
    """``(config, learner)`` of a trained run: the config the checkpoint was trained with
    (``overrides``, ``KEY=VALUE``, change any field, e.g. a learner's test-time option) and
    its learner with the trained weights, on ``device`` (default: the run's), in eval mode.
    A run trained with ``train.ema`` comes back with its weight average, as its own final
    evaluation was (``--set train.ema=null`` for the live weights)."""
    cfg, learner, _ = _restore(Path(run_dir), overrides, device)
    return cfg, learner


def _restore(run_dir: Path, overrides: list[str] | None, device: str | None
             ) -> tuple[RunConfig, Learner, dict[str, Any]]:
    overrides = ([f"train.device={device}"] if device else []) + list(overrides or [])
    tensors, state = checkpoint.load(run_dir)
    # the config the checkpoint was trained with (config.yaml may be missing or edited);
    # checkpoints from before it was stored fall back to config.yaml
    if state.get("config") is not None:
        cfg = from_dict(apply_overrides(state["config"], overrides))
    else:
        cfg = load(run_dir / "config.yaml", overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    learner = build_learner(cfg, pick_device(cfg.train.device))
    checkpoint.restore(tensors, state, learner)
    if cfg.train.ema:
        average = WeightAverage(learner, cfg.train.ema)
        if not average.load(tensors, "extra/"):
            raise CheckpointError(
                f"train.ema={cfg.train.ema} but the checkpoint in {str(run_dir)!r} holds no "
                "weight average; evaluate with --set train.ema=null")
        average.apply()
    return cfg, learner.eval(), state


def evaluate_run(run_dir: str | Path, episodes: int | None = None, device: str | None = None,
                 threads: int | None = None, overrides: list[str] | None = None
                 ) -> dict[str, Any]:
    """Re-evaluate a run directory's checkpoint; writes ``eval.json``. ``device`` and
    ``threads`` override the run's (a GPU run can be evaluated on a CPU machine), and
    ``overrides`` (``KEY=VALUE``) any other field of its config, e.g. a learner's
    test-time option such as ``learner.test_shift=1``; ``eval.json`` records them."""
    if episodes is not None and episodes < 1:
        raise ConfigError(f"episodes={episodes}; evaluate on at least 1 episode")
    user = list(overrides or [])
    threads_set = [f"train.threads={threads}"] if threads else []
    cfg, learner, state = _restore(Path(run_dir), threads_set + user, device)
    _, test_tasks = build_tasks(cfg)
    return final_evaluation(cfg, learner, test_tasks, Path(run_dir),
                            pick_device(cfg.train.device), getattr(torch, cfg.train.dtype),
                            None, state["step"], state["seconds"],
                            episodes=cfg.eval.episodes if episodes is None else episodes,
                            extra={"overrides": user} if user else None)
