"""The recipe: meta-train a learner from a config, evaluate it, checkpoint, resume.

Read :func:`train` top to bottom: the loop is the whole run; each step of it is a named
helper of this package (process group, run directory, train state, stepping, logging, time
budget, evaluation, Ctrl-C). It is the only place that knows about processes and devices.
Under ``torchrun`` every rank draws the SAME meta-batch from the same seeded stream and keeps
its own slice of tasks, and DistributedDataParallel all-reduces the meta-gradients, so a run
is the same on 1 or N processes and resumes on any number of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from metattn import checkpoint
from metattn.config import RunConfig
from metattn.data.tasks import TaskBatch, fixed_episodes
from metattn.errors import ConfigError
from metattn.meta.base import LOSS_KEYS, Learner
from metattn.optim import WeightAverage
from metattn.recipe.budget import Callback, TimeBudget, time_budget
from metattn.recipe.build import build, make_optimizer
from metattn.recipe.cuda_graph import cuda_graph_blockers
from metattn.recipe.distributed import process_group, setup_device, share
from metattn.recipe.evaluation import evaluate, final_evaluation, headline
from metattn.recipe.log import Logger, Progress, Window
from metattn.recipe.run_dir import RunDir
from metattn.recipe.signals import StopRequest
from metattn.recipe.state import TrainState
from metattn.recipe.stepper import Stepper


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False,
          callbacks: list[Callback] | None = None,
          clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Meta-train ``cfg`` into ``out_dir``; returns the summary (also in summary.json).

    ``callbacks`` are called as ``cb(step, metrics)`` at every logged step (each
    ``train.log_every`` steps and the last) and may change ``cfg.train.steps`` (e.g.
    :class:`TimeBudget`); under ``torchrun`` every rank calls them and rank 0's
    ``train.steps`` holds. ``clock`` measures the training time (a time budget's too).
    Under ``torchrun`` it joins (and at the end leaves) the process group; every rank
    returns the summary, rank 0 writes the files.
    """
    if cfg.train.threads:  # tiny models (the sinusoid MLP) run faster on one CPU thread
        torch.set_num_threads(cfg.train.threads)
    with process_group(cfg.train.device) as (rank, world, local_rank):
        return _train(cfg, Path(out_dir), resume, list(callbacks or []), clock, rank, world,
                      local_rank)


def _train(cfg: RunConfig, out: Path, resume: bool, callbacks: list[Callback],
           clock: Callable[[], float], rank: int, world: int, local_rank: int
           ) -> dict[str, Any]:
    main, t = rank == 0, cfg.train
    budget, callbacks = time_budget(cfg, callbacks)
    device, dtype = setup_device(t.device, local_rank, t.tf32), getattr(torch, t.dtype)
    if t.meta_batch % world:
        raise ConfigError(f"train.meta_batch={t.meta_batch} does not split over {world} "
                          f"processes; use a multiple of {world}")
    # refusals come before anything is written: the run directory is checked, the run built
    run = RunDir(out, resume, main, world)
    saved = run.check(cfg)
    train_tasks, test_tasks, learner = build(cfg, device)
    if t.cuda_graph and (why := cuda_graph_blockers(cfg, learner, device, world)):
        raise ConfigError("\n  ".join(why))
    run.create(cfg)
    if device.type == "cuda" and hasattr(train_tasks, "to"):
        train_tasks = train_tasks.to(device)  # samplers that can draw episodes on the GPU
    state = _start(cfg, learner, device, saved, budget, run)
    stepper = Stepper(cfg, learner, state.optimizer, device, world, out, rank, state.step)
    # periodic evaluations (progress, best, the target stop) use OTHER test episodes than
    # the final one (seed + 1), so the final number is never over episodes that decided
    # when training stopped
    periodic = fixed_episodes(test_tasks, t.eval_episodes, cfg.eval.seed + 1, cfg.eval.chunk)
    logger = Logger(out, main, t.tensorboard, state.step if resume else None)
    progress = Progress(main and t.progress, t.steps, state.step, main)
    _announce(progress, cfg, learner, device, world, state.step, budget, out)
    start, n_way = state.step, None
    state.window.begin(clock())
    try:
        with StopRequest() as stop:
            while state.step < t.steps and not stepper.stopping(stop.requested):
                t0 = clock()
                batch = _sample(train_tasks, cfg, state, rank, world).to(device, dtype)
                n_way = batch.n_way
                learner.train()
                lr = state.scheduler.get_last_lr()[0]  # the rate of the step taken now
                metrics = stepper(batch, state.step, stop.requested)
                if state.ema is not None:
                    state.ema.update()
                state.scheduler.step()
                state.step += 1
                state.seconds += clock() - t0
                state.window.add(metrics, t.meta_batch)
                if _due(state.step, t.log_every, t.steps):
                    state.seconds += stepper.drain(state.step)  # before the budget reads it
                if budget is not None and world == 1:  # (under torchrun: at log steps only)
                    budget.end_if_spent(state.step, state.seconds)
                if _due(state.step, t.log_every, t.steps):  # (a budget may have moved steps)
                    state.seconds += stepper.drain(state.step)
                    _log_train(cfg, state, lr, logger, progress, callbacks, world, clock())
                if t.eval_every and state.step % t.eval_every == 0 and state.step < t.steps:
                    state.seconds += stepper.drain(state.step)  # replays are training time
                    if _periodic_eval(cfg, state, periodic, device, dtype, n_way, logger,
                                      progress, rank, world):
                        _save(run, cfg, state, stepper, device, clock)
                        break
                if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or (
                        t.checkpoint_minutes
                        and state.seconds - state.saved_at >= 60 * t.checkpoint_minutes):
                    _save(run, cfg, state, stepper, device, clock)
            else:
                if state.step > start or not run.ckpt.exists():
                    _save(run, cfg, state, stepper, device, clock)
            stopped = stepper.stopping(stop.requested)
        if stopped:
            progress.print(f"[metattn] interrupted: checkpoint at step {state.step} in {out}; "
                           "continue with --resume")
    finally:
        progress.stop()
        logger.close()
    if stopped:
        raise KeyboardInterrupt
    return _finish(cfg, state, test_tasks, out, device, dtype, n_way, budget, rank, world)


def _start(cfg: RunConfig, learner: Learner, device: torch.device,
           saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
           budget: TimeBudget | None, run: RunDir) -> TrainState:
    """The train state of a new run, or of the checkpoint ``saved`` (and the horizon a time
    budget fitted there: the cosine schedule continues from it)."""
    opt, sched = make_optimizer(cfg, learner, device)
    state = TrainState(learner, opt, sched, torch.Generator().manual_seed(cfg.seed), Window())
    if saved is not None:
        state.restore(saved, cfg, device)
        saved_steps = ((saved[1].get("config") or {}).get("train") or {}).get("steps")
        if budget is not None and cfg.train.schedule == "cosine" and saved_steps:
            cfg.train.steps = int(saved_steps)  # (the budget may still move it, up to its cap)
        if budget is not None:  # the time left decides at once: a spent run trains no further
            budget(state.step, {"seconds": state.seconds})
            cfg.train.steps = share(cfg.train.steps, run.world)
        run.write_config(cfg)
    if cfg.train.ema:  # the average continues from the checkpoint's, or starts from the weights
        state.ema = WeightAverage(learner, cfg.train.ema)
        if saved is not None and not state.ema.load(saved[0], "extra/") and run.is_main:
            print("[metattn] train.ema: the checkpoint holds no weight average; it starts "
                  "again from the restored weights", flush=True)
    return state


def _announce(progress: Progress, cfg: RunConfig, learner: Learner, device: torch.device,
              world: int, start: int, budget: TimeBudget | None, out: Path) -> None:
    n_params = sum(p.numel() for p in learner.parameters())
    note = "" if budget is None else f" (at most; {budget.seconds:g} s budget)"
    progress.print(f"[metattn] {cfg.name}: {type(learner).__name__} on {device} "
                   f"({n_params:,} parameters), {world} process(es), steps {start}->"
                   f"{cfg.train.steps}{note}, out {out}")


def _sample(tasks: Any, cfg: RunConfig, state: TrainState, rank: int, world: int) -> TaskBatch:
    """This rank's slice of the step's meta-batch (the same batch on every rank)."""
    if hasattr(tasks, "set_step"):  # curricula (e.g. in-context learning)
        tasks.set_step(state.step)
    per_rank = cfg.train.meta_batch // world
    return tasks.sample(cfg.train.meta_batch, state.tasks).slice(rank * per_rank,
                                                                 (rank + 1) * per_rank)


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _log_train(cfg: RunConfig, state: TrainState, lr: float | torch.Tensor, logger: Logger,
               progress: Progress, callbacks: list[Callback], world: int, now: float) -> None:
    """A log line: the window's means, tasks/s, the rate, the seconds; then the callbacks
    (rank 0's decision on ``train.steps`` holds for every rank)."""
    vals = state.window.flush(now)
    vals["lr"] = float(lr)
    vals["seconds"] = state.seconds
    logger.log("train", state.step, vals)
    for cb in callbacks:
        cb(state.step, vals)
    if callbacks and world > 1:
        cfg.train.steps = share(cfg.train.steps, world)
    info = "  ".join(f"{k} {vals[k]:.4g}" for k in (*LOSS_KEYS, "mse_queries", "accuracy")
                     if k in vals)
    progress.update(state.step, f"{info}  {vals['tasks_per_s']:.0f} tasks/s", cfg.train.steps)


def _periodic_eval(cfg: RunConfig, state: TrainState, episodes: list[TaskBatch],
                   device: torch.device, dtype: torch.dtype, n_way: int | None,
                   logger: Logger, progress: Progress, rank: int, world: int) -> bool:
    """Evaluate on the periodic episodes, log it, keep the best; True when
    ``train.target`` is reached."""
    with state.ema.swapped() if state.ema is not None else nullcontext():
        res = evaluate(state.learner, episodes, device, dtype,
                       lambda d, n, s=state.step: progress.update(
                           s, f"evaluating: {d}/{n} episodes"), rank, world)
    key, mean, ci = headline(res, n_way)
    logger.log("eval", state.step, {**{k: v for k, v in res.items() if not isinstance(v, list)},
                                    "seconds": state.seconds})
    progress.print(f"  step {state.step}: test {key} {mean:.4f} ± {ci:.4f} "
                   f"({res['episodes']} episodes)")
    # rank 0's numbers decide for every rank (GPU kernels need not agree bit for bit, and a
    # rank that stopped alone would leave the others in a collective)
    mean = share(mean, world)
    better = state.best is None or (mean > state.best if key == "accuracy" else mean < state.best)
    state.best = mean if better else state.best
    target = cfg.train.target
    reached = target is not None and (mean >= target if key == "accuracy" else mean <= target)
    if reached:
        progress.print(f"  target {target} reached at step {state.step}")
    return reached


def _save(run: RunDir, cfg: RunConfig, state: TrainState, stepper: Stepper,
          device: torch.device, clock: Callable[[], float]) -> None:
    state.seconds += stepper.drain(state.step)
    run.save(cfg, state, device, clock())
    state.saved_at = state.seconds


def _finish(cfg: RunConfig, state: TrainState, test_tasks: Any, out: Path,
            device: torch.device, dtype: torch.dtype, n_way: int | None,
            budget: TimeBudget | None, rank: int, world: int) -> dict[str, Any]:
    """The final evaluation (``summary.json``; with ``train.ema``, the live weights'
    numbers too) and the plots."""
    learner, ema = state.learner, state.ema
    extra = None if budget is None else {  # a time-budgeted run: did the budget end it?
        "max_seconds": budget.seconds, "stopped_by_budget": budget.stopped_by_budget}
    if ema is not None:  # the live weights too, on the same episodes: what the average changed
        live = final_evaluation(cfg, learner, test_tasks, out, device, dtype, n_way,
                                state.step, state.seconds, write=False, rank=rank, world=world)
        extra = {**(extra or {}), "without_ema": {k: live[k] for k in ("mean", "ci95")}}
    with ema.swapped() if ema is not None else nullcontext():
        summary = final_evaluation(cfg, learner, test_tasks, out, device, dtype, n_way,
                                   state.step, state.seconds, write=rank == 0, extra=extra,
                                   rank=rank, world=world)
        model = getattr(learner, "model", None)
        if rank == 0 and isinstance(model, torch.nn.Module):
            # the weights the final evaluation scored, under the model's own names
            checkpoint.save_weights(out, model)
        if rank == 0 and cfg.train.plots:
            from metattn import plots

            steps = getattr(learner, "inner_steps", None)
            plots.training_curves(out / "metrics.jsonl", out / "training.png",
                                  None if steps is None else (steps, learner.eval_inner_steps))
            learner.eval()  # the plot shows the model as evaluated (no dropout)
            plots.adaptation(test_tasks, learner, out / "adaptation.png", seed=cfg.eval.seed)
    return summary
