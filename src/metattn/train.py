"""The recipe: meta-train a learner from a config, evaluate it, checkpoint, resume.

Read it top to bottom: :func:`train` is the whole loop. It is the only place that knows about
processes and devices. Under ``torchrun`` every rank draws the SAME meta-batch from the same
seeded stream and keeps its own slice of tasks, and DistributedDataParallel all-reduces the
meta-gradients, so a run is the same on 1 or N processes and resumes on any number of them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metattn import checkpoint, registry
from metattn.config import RunConfig, config_diff, dump
from metattn.data.tasks import TaskBatch, fixed_episodes, mean_ci95, split_finite
from metattn.errors import CheckpointError, ConfigError, MetattnError
from metattn.meta.base import Learner, eval_mode
from metattn.optim import MuonAdam, WeightAverage, split_for_muon
from metattn.perf import CUDAGraphStep, cpu_allocator_tuned

# Keys that may differ between a run and its resumption (they do not change the maths).
# ``eval.chunk`` is not among them: with the seed it fixes which test episodes are drawn.
# ``train.steps`` is, except under the cosine schedule, whose horizon it is (checked below).
# ``train.max_seconds`` counts the run's total training time, resumed parts included.
RESUMABLE_KEYS = {"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.progress", "train.tensorboard", "train.target", "eval.episodes",
                  "train.eval_episodes", "train.threads", "train.device", "train.max_seconds",
                  "train.cuda_graph"}


class TrainingError(MetattnError, RuntimeError):
    """Meta-training cannot go on (a non-finite meta-loss, say); saved work is kept."""


# ---------------------------------------------------------------------- processes and devices
def setup_distributed(device: str = "auto") -> tuple[int, int, int]:
    """Join the torchrun process group if there is one: (rank, world_size, local_rank).

    The backend is NCCL when the run's ``device`` is a GPU (``auto`` with CUDA available, or
    ``cuda``), else gloo; ``METATTN_DIST_BACKEND`` overrides it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
        backend = os.environ.get("METATTN_DIST_BACKEND") or ("nccl" if on_gpu else "gloo")
        if backend == "nccl" and torch.cuda.is_available():
            # bind this process to its GPU before NCCL creates its communicators
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _agree(error: Exception | None, world: int) -> None:
    """Raise ``error`` on every rank if rank 0 found one (so no rank waits forever in a
    collective that another rank never reaches)."""
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def _share(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (checkpoints need not be on a shared filesystem)."""
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use auto or cpu")
    if dev.type == "cuda" and dev.index is None:  # plain "cuda": this process's local GPU
        dev = torch.device("cuda", local_rank)
    return dev


# ---------------------------------------------------------------------- building blocks
def build(cfg: RunConfig, device: torch.device) -> tuple[Any, Any, Learner]:
    """Train sampler, test sampler and learner (with its model) from the config."""
    torch.manual_seed(cfg.seed)
    train_tasks = registry.build("task", cfg.task, "train")
    test_tasks = registry.build("task", cfg.test_task_spec(), "test")
    model = registry.build("model", cfg.model)
    learner = registry.build("learner", cfg.learner, model)
    dtype = getattr(torch, cfg.train.dtype)
    return train_tasks, test_tasks, learner.to(device=device, dtype=dtype)


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
            loss = out.get("loss")
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


def _rich_bar(label: str, transient: bool, info: bool = False):
    """A rich progress bar: label, bar, done/total, elapsed, remaining (and an info field)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn()]
    if info:
        cols.append(TextColumn("{task.fields[info]}"))
    return Progress(*cols, transient=transient)


@contextmanager
def _eval_bar(enabled: bool):
    """A transient 'evaluate' progress bar over test episodes (final evaluation, ``metattn
    eval``): 600 MAML episodes with 10 inner steps can take many minutes on a CPU."""
    if not enabled:
        yield None
        return
    with _rich_bar("evaluate", transient=True) as bar:
        task = bar.add_task("eval", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def headline(result: dict[str, Any], n_way: int | None) -> tuple[str, float, float]:
    """The metric a run is judged by: accuracy for classification, else loss (MSE)."""
    key = "accuracy" if n_way is not None and "accuracy" in result else "loss"
    return key, float(result[key]), float(result[f"{key}_ci95"])


def make_optimizer(cfg: RunConfig, learner: Learner, device: torch.device | None = None
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and its learning-rate schedule. With ``train.cuda_graph`` Adam/AdamW are
    built ``capturable`` with the rate as a tensor on ``device``, so that the schedule's
    in-place updates reach a replayed CUDA graph (a float rate would be frozen into it)."""
    t = cfg.train
    params = [p for p in learner.parameters() if p.requires_grad]
    # foreach: one multi-tensor kernel per update instead of a Python loop over parameters
    # (PyTorch picks it by default on CUDA only); the same numbers as the loop.
    graph = {"capturable": True} if t.cuda_graph else {}
    lr: float | torch.Tensor = torch.tensor(t.lr, device=device) if t.cuda_graph else t.lr
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay,
                              foreach=True)
    elif t.optimizer == "muon":  # Muon on hidden matrices, Adam on the rest
        opt = MuonAdam(*split_for_muon(learner.named_parameters()), lr=t.lr,
                       weight_decay=t.weight_decay)
    elif t.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, foreach=True,
                                **graph)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay, foreach=True,
                               **graph)

    def factor(step: int) -> float:
        # A linear warm-up to the base rate, then (cosine) a half cosine from the base rate at
        # the end of the warm-up to zero at train.steps. (The warm-up used to multiply a
        # cosine that started at step 0, so a run whose warm-up was a large part of it never
        # reached the base rate: 0.6 of it for 500 warm-up steps in a 1054-step run.)
        w = t.warmup_steps
        if t.schedule == "cosine":
            # at most half the horizon (also one a time budget shrank), so the rate still
            # decays to zero at train.steps
            w = min(w, t.steps // 2)
        if w > 0 and step < w:
            return (step + 1) / w
        if t.schedule == "cosine" and t.steps > 0:
            done = min((step - w) / max(t.steps - w, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _record(line: str) -> dict | None:
    """One metrics.jsonl record, or None for a blank or half-written line (a hard kill)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


class _Logger:
    """metrics.jsonl (+ TensorBoard when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Drop what was logged after the checkpoint we resume from: the log then reads as
            # one uninterrupted run.
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (rec := _record(ln)) is not None and rec.get("step", 0) <= resume_step]
            checkpoint.atomic_write_bytes(self.path, "".join(k + "\n" for k in keep).encode())
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.f = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self.tb = None

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, **values}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


class TimeBudget:
    """Callback for :func:`train`: end the run within ``seconds`` of TRAINING time (the
    recipe's ``seconds``: meta-steps with sampling; evaluation and checkpoints excluded) by
    lowering ``cfg.train.steps`` in place, so the recipe ends its loop normally, saves and
    evaluates.

    With a cosine schedule and ``fit_schedule``, the schedule's horizon also moves to the
    step where the budget is projected to run out, so the learning rate reaches zero when
    time does, on any machine. The time per step is measured from a reference point after the
    first 5% of the budget (slow warm-up steps do not count); the horizon is fitted once a
    tenth of the budget has passed and re-fitted at every call, never past the config's
    steps. Until half of the budget it may grow as well as shrink (a horizon that could only
    shrink ended runs early when the steps sped up: a ViT run stopped at 73 of 90 s); from
    then on it only shrinks, so the rate never rises late in the run. The warm-up is the
    config's, and the cosine runs from its end to the fitted horizon.
    Under torchrun rank 0's clock decides for every rank.
    Without a fitted schedule the run ends at the step where the budget runs out, when that
    comes before the next call. The recipe calls it every ``train.log_every`` steps; in one
    process it also ends the run at the first step past the budget between calls. Under
    torchrun the budget acts at log steps only, so keep ``log_every`` small (e.g. 10) for a
    tight budget there. ``stopped_by_budget`` says whether it cut the run.
    """

    def __init__(self, cfg: RunConfig, seconds: float, fit_schedule: bool = True):
        if not seconds > 0:
            raise ConfigError(f"TimeBudget: seconds={seconds}; give a positive budget")
        self.cfg = cfg
        self.seconds = float(seconds)
        self.cap = cfg.train.steps
        self.fit = fit_schedule and cfg.train.schedule == "cosine"
        self.ref: tuple[int, float] | None = None  # (step, seconds) once warm-up is behind
        self.stopped_by_budget = False

    def __call__(self, step: int, vals: dict[str, float]) -> None:
        elapsed = float(vals["seconds"])
        if step >= self.cap:  # the config's own length reached first: the run ends there
            return
        if self.ref is None and elapsed >= 0.05 * self.seconds:
            self.ref = (step, elapsed)
        steady = self.ref is not None and step > self.ref[0]
        per_step = ((elapsed - self.ref[1]) / (step - self.ref[0]) if steady
                    else elapsed / max(step, 1))
        # the step at which the budget runs out at this rate
        projected = step + int(max(self.seconds - elapsed, 0.0) / max(per_step, 1e-9))
        steps = self.cfg.train.steps
        if self.fit and steady and elapsed >= 0.1 * self.seconds:
            if step < steps:  # (a horizon reached is the end, even with time left)
                # growing raises the rate a little: allowed only in the first half, where
                # the rate is high anyway; later the horizon may only shrink
                grow = elapsed < 0.5 * self.seconds
                steps = min(self.cap, projected) if grow else min(steps, self.cap, projected)
        elif projected < step + self.cfg.train.log_every:
            # the budget runs out before the next call (every log_every steps): end there
            steps = min(steps, projected)
        self.cfg.train.steps = max(steps, step)  # the recipe's loop ends there, saves, evaluates
        self.stopped_by_budget = self.cfg.train.steps < self.cap

    def end_if_spent(self, step: int, elapsed: float) -> None:
        """Between log steps (the recipe calls it after every step in one process): when the
        time is up, end the run at this step, which is then logged, saved and evaluated as
        the last, instead of at the next log step (with log_every 100 and 4 s steps that was
        up to 400 s late)."""
        if elapsed >= self.seconds and step < self.cfg.train.steps:
            self.cfg.train.steps = step


class _Progress:
    """A rich progress bar on rank 0 (quiet when disabled or not on a terminal)."""

    def __init__(self, enabled: bool, total: int, start: int, main: bool = True):
        self.bar = None
        self.main = main  # messages come from rank 0 only
        if not enabled:
            return
        self.bar = _rich_bar("meta-train", transient=False, info=True)
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str, total: int | None = None) -> None:
        if self.bar is None:
            return
        # A moved horizon (TimeBudget): rich's update(total=...) would also reset the speed
        # estimate, leaving no time-remaining; so the task's total is set on its own.
        task = getattr(self.bar, "_tasks", {}).get(self.task)
        if total is not None and task is not None and task.total != total:
            task.total = total
        self.bar.update(self.task, completed=step, info=info)

    def print(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_loss(loss: torch.Tensor, step: int, run_dir: Path, note: str = "") -> None:
    """A non-finite meta-loss ends the run with the last checkpoint kept."""
    if not torch.isfinite(loss):
        raise TrainingError(
            f"meta-loss is {loss.item()} at step {step}{note}; the last checkpoint in "
            f"{str(run_dir)!r} is kept. Lower train.lr or the learner's inner_lr, or set "
            "train.grad_clip")


def _check_window(losses: list[torch.Tensor], step: int, run_dir: Path) -> None:
    """:func:`_check_loss` for the meta-losses of the steps since the last check, in one
    host sync; ``step`` counts the steps taken (the CUDA-graph path defers the check so that
    the host never waits for a replay)."""
    if not losses:
        return
    bad = (~torch.isfinite(torch.stack(losses).reshape(len(losses), -1).sum(1))).nonzero()
    if len(bad):
        first = int(bad[0, 0])
        _check_loss(losses[first], step - len(losses) + first, run_dir,
                    f" (a replayed step; found at step {step}, where train.cuda_graph checks)")


def _reduce_step(metrics: dict[str, torch.Tensor], loss: torch.Tensor, stop: bool, world: int
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """Average the step's metrics and loss over ranks (equal slices: the whole-batch mean) and
    OR the stop flags, in one all-reduce."""
    keys = sorted(metrics)
    vals = torch.stack([metrics[k].detach().double().reshape(()) for k in keys]
                       + [loss.detach().double().reshape(()),
                          torch.tensor(float(stop), dtype=torch.float64, device=loss.device)])
    dist.all_reduce(vals)
    stop_any = bool(vals[-1].item() > 0)
    vals = vals / world
    return {k: vals[i] for i, k in enumerate(keys)}, vals[len(keys)], stop_any


# ---------------------------------------------------------------------- the recipe
def train(
    cfg: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    callbacks: list[Callable[[int, dict[str, float]], None]] | None = None,
) -> dict[str, Any]:
    """Meta-train ``cfg`` into ``out_dir``; returns the summary (also in summary.json).

    ``callbacks`` are called as ``cb(step, metrics)`` at every logged step (each
    ``train.log_every`` steps and the last) and may change ``cfg.train.steps`` (e.g.
    :class:`TimeBudget`); under ``torchrun`` every rank calls them and rank 0's
    ``train.steps`` holds. Under ``torchrun`` it joins (and at the end leaves) the process
    group; every rank returns the summary, rank 0 writes the files.
    """
    if cfg.train.threads:
        # tiny models (the sinusoid MLP) run faster on one CPU thread than on two
        torch.set_num_threads(cfg.train.threads)
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rank, world, local_rank = setup_distributed(cfg.train.device)
    try:
        summary = _train(cfg, out_dir, resume, callbacks, rank, world, local_rank)
        if created and world > 1:
            # leave together: rank 0 may still be writing files and plots (after the last
            # collective) while the others would already tear their process group down
            dist.barrier()
        return summary
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: RunConfig, out_dir: str | Path, resume: bool,
           callbacks: list[Callable[[int, dict[str, float]], None]] | None,
           rank: int, world: int, local_rank: int) -> dict[str, Any]:
    is_main = rank == 0
    # The time budget: a caller's TimeBudget (e.g. a benchmark's) replaces the config's and is
    # recorded as train.max_seconds. Made before a resume adopts a fitted horizon, so its cap
    # is the steps asked for now (the horizon may still grow within the first half).
    budget = next((c for c in callbacks or [] if isinstance(c, TimeBudget)), None)
    if budget is not None:
        cfg.train.max_seconds = budget.seconds
    elif cfg.train.max_seconds:
        budget = TimeBudget(cfg, cfg.train.max_seconds)
        callbacks = [*(callbacks or []), budget]
    device = pick_device(cfg.train.device, local_rank)
    dtype = getattr(torch, cfg.train.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if cfg.train.meta_batch % world:
        raise ConfigError(f"train.meta_batch={cfg.train.meta_batch} does not split over "
                          f"{world} processes; use a multiple of {world}")
    if cfg.train.cuda_graph:
        # refused from the config, before anything is written (CUDAGraphStep, built after
        # the learner, checks the learner itself)
        if cfg.task.get("curriculum"):
            raise ConfigError("train.cuda_graph=true replays fixed episode shapes, but "
                              "task.curriculum changes them during the run; set one of them "
                              "off")
        if cfg.learner.get("kind") != "maml":
            raise ConfigError(
                f"train.cuda_graph=true replays MAML-family meta-steps; learner.kind="
                f"{cfg.learner.get('kind')!r} checks its episodes on the host inside the step "
                "(which a CUDA graph cannot capture): set train.cuda_graph=false")
        for key in ("msl_steps", "second_order_start", "checkpoint"):
            if cfg.learner.get(key):
                raise ConfigError(
                    f"train.cuda_graph=true cannot replay learner.{key}={cfg.learner[key]!r} "
                    "(MAML++ schedules change with the outer step; checkpointed inner steps "
                    f"save the RNG state): set learner.{key} off or train.cuda_graph=false")
        if device.type != "cuda" or world > 1:
            raise ConfigError(
                f"train.cuda_graph=true replays the meta-step from a CUDA graph in one "
                f"process; this run has device {device} and {world} process(es): set "
                "train.cuda_graph=false" + ("" if device.type == "cuda" else " on the CPU"))
    run_dir = Path(out_dir)
    ckpt_path = run_dir / checkpoint.WEIGHTS
    written_config: list[bytes | None] = [None]

    def write_config() -> None:
        """``config.yaml`` = the config as run now (rank 0; rewritten only when it changed: a
        callback such as TimeBudget may move train.steps, and ``--resume`` from the file
        must continue the same schedule)."""
        text = dump(cfg).encode()
        if is_main and text != written_config[0]:
            checkpoint.atomic_write_bytes(run_dir / "config.yaml", text)
            written_config[0] = text

    # --- the run directory: new, or resumed. Rank 0 decides; every rank raises its error.
    error: Exception | None = None
    saved_ckpt = None
    if is_main:
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(f"--out {str(run_dir)!r} is a file; pass a directory for the "
                                  "run (created if missing)")
            if ckpt_path.exists() and not resume:
                raise CheckpointError(
                    f"{str(run_dir)!r} already holds a run; pass --resume to continue it, or "
                    "--out NEW_DIR to start a new one (nothing was overwritten)")
            if resume and not ckpt_path.exists():
                raise CheckpointError(f"--resume: no checkpoint in {str(run_dir)!r}; "
                                      "start without --resume")
            saved = None
            if resume:
                # the checkpoint's own config decides (config.yaml may be missing or edited)
                saved_ckpt = checkpoint.load(run_dir)
                saved = saved_ckpt[1].get("config")
                if saved is None and (run_dir / "config.yaml").is_file():
                    import yaml

                    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
                    saved_ckpt[1]["config"] = saved  # (older checkpoints: for every rank)
            if saved is not None:
                diff = config_diff(saved, cfg.to_dict(), ignore=RESUMABLE_KEYS)
                if diff:
                    raise ConfigError(
                        "--resume: the config differs from the one in the run's checkpoint in "
                        f"{diff}; only {sorted(RESUMABLE_KEYS)} may change when resuming")
                old_steps = (saved.get("train") or {}).get("steps")
                if cfg.train.schedule == "cosine" and old_steps != cfg.train.steps \
                        and not cfg.train.max_seconds:
                    raise ConfigError(
                        f"--resume: train.steps {old_steps} -> {cfg.train.steps}, but the "
                        "cosine schedule spans train.steps, so the learning rate would jump "
                        f"back up; resume with train.steps={old_steps}, or start a new run "
                        "(--out NEW_DIR) with the longer schedule")
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # a resume writes it once the checkpoint has been restored
                write_config()
        except MetattnError as err:
            error = err
    _agree(error, world)

    train_tasks, test_tasks, learner = build(cfg, device)
    if device.type == "cuda" and hasattr(train_tasks, "to"):
        train_tasks = train_tasks.to(device)  # samplers that can draw episodes on the GPU
    opt, sched = make_optimizer(cfg, learner, device)
    amp = torch.bfloat16 if cfg.train.autocast == "bf16" else None  # fp16: rejected by config
    # train.cuda_graph: 3 eager warm-up steps, then every step replays one captured graph
    # (made here, before anything is opened, so that its refusals leave nothing behind)
    graph_step = CUDAGraphStep(learner, opt, warmup=3, autocast=amp,
                               grad_clip=cfg.train.grad_clip) if cfg.train.cuda_graph else None
    gen = torch.Generator().manual_seed(cfg.seed)  # the task stream, identical on every rank
    start, elapsed, best = 0, 0.0, None
    if resume:
        # rank 0 read the checkpoint; the others get it from rank 0, so resuming on any
        # number of processes (or nodes without a shared filesystem) restores the same state
        tensors, state = _share(saved_ckpt, world)
        # train.cuda_graph may differ from the run that wrote the checkpoint: the optimiser's
        # saved groups would restore ITS capturable flag (and place Adam's step by it)
        for group in (state.get("optimizer") or {}).get("param_groups", []):
            if "capturable" in group or "capturable" in opt.defaults:
                group["capturable"] = bool(cfg.train.cuda_graph)
        checkpoint.restore(tensors, state, learner, opt)
        sched.load_state_dict(state["scheduler"])
        if cfg.train.cuda_graph:  # the checkpoint stores the rate as a number
            for group in opt.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)
        gen.set_state(tensors["extra/task_generator"])
        torch.set_rng_state(tensors["extra/torch_rng"])
        if device.type == "cuda" and "extra/cuda_rng" in tensors:
            torch.cuda.set_rng_state(tensors["extra/cuda_rng"], device)
        start, elapsed, best = state["step"], state["seconds"], state.get("best")
        saved_steps = ((state.get("config") or {}).get("train") or {}).get("steps")
        if budget is not None and cfg.train.schedule == "cosine" and saved_steps:
            # the horizon a time budget fitted is the schedule's: it continues from there
            # (the budget may still move it, up to its cap: the steps asked for now)
            cfg.train.steps = int(saved_steps)
        if budget is not None:
            # the time left decides at once (not at the next log step): a run whose time is
            # spent trains no further
            budget(start, {"seconds": elapsed})
            cfg.train.steps = _share(cfg.train.steps, world)
        write_config()
    # train.ema: the weight average starts from the (restored) live weights, or continues
    # from the checkpoint's average
    ema = WeightAverage(learner, cfg.train.ema) if cfg.train.ema else None
    if ema is not None and resume and not ema.load(tensors, "extra/") and is_main:
        print("[metattn] train.ema: the checkpoint holds no weight average; it starts again "
              "from the restored weights", flush=True)

    model = learner
    if world > 1:
        # find_unused_parameters: the metric learners never use the backbone's ``head`` and
        # MAML with zero inner steps never uses learned inner rates; without it DDP stops at
        # the second step waiting for their gradients.
        model = torch.nn.parallel.DistributedDataParallel(
            learner, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
        # every rank its own random stream (dropout masks, vmap randomness), reproducible
        # from (seed, rank, start step); one process keeps the plain seeded stream
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + start)

    # Periodic evaluation (progress, ``best``, the ``target`` stop) uses OTHER test episodes
    # than the final one (seed + 1), so the final number is never over episodes that decided
    # when training stopped.
    eval_sets = {"periodic": fixed_episodes(test_tasks, cfg.train.eval_episodes,
                                            cfg.eval.seed + 1, cfg.eval.chunk)}
    logger = _Logger(run_dir, is_main, cfg.train.tensorboard, start if resume else None)
    progress = _Progress(is_main and cfg.train.progress, cfg.train.steps, start, is_main)
    n_way = None
    per_rank = cfg.train.meta_batch // world

    replayed: list[torch.Tensor] = []  # train.cuda_graph: meta-losses not yet NaN-checked

    def drain(step: int) -> None:
        """train.cuda_graph: the host runs ahead of the replays between checks. Wait for them
        (counted as training time, so a time budget sees the GPU's time) and check their
        meta-losses for NaN."""
        nonlocal elapsed
        if graph_step is None:
            return
        t = time.perf_counter()
        torch.cuda.current_stream(device).synchronize()
        elapsed += time.perf_counter() - t
        _check_window(replayed, step, run_dir)
        replayed.clear()

    def save(step: int) -> None:
        drain(step)
        if not is_main:
            return
        for n, p in learner.named_parameters():
            if not torch.isfinite(p).all():
                raise TrainingError(f"parameter {n} is not finite at step {step}; the last "
                                    f"good checkpoint in {str(run_dir)!r} is kept")
        checkpoint.save(run_dir, learner, opt,
                        {"step": step, "seconds": elapsed, "best": best,
                         "scheduler": sched.state_dict(), "config": cfg.to_dict(),
                         "torch": torch.__version__,
                         # the steps since the last log line, so that a resumed run logs
                         # the same averages as an uninterrupted one
                         "log_window": {k: [t.tolist() for t in v] for k, v in window.items()},
                         "log_tasks": tasks_window,
                         "log_seconds": time.perf_counter() - t_window},
                        {"task_generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                         **(ema.state() if ema is not None else {}),
                         **({"cuda_rng": torch.cuda.get_rng_state(device)}
                            if device.type == "cuda" else {})})
        write_config()  # follows the checkpoint (a callback may have moved train.steps)

    # Ctrl-C: finish the current step, checkpoint, then stop (a second Ctrl-C stops at once).
    stop_requested = False

    def on_sigint(signum, frame):
        nonlocal stop_requested
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested = True

    stop_agreed = False  # under several processes, stop only when all ranks know it

    def stopping() -> bool:
        return stop_agreed if world > 1 else stop_requested

    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        pass

    if is_main:
        n_params = sum(p.numel() for p in learner.parameters())
        budget_note = "" if budget is None else f" (at most; {budget.seconds:g} s budget)"
        progress.print(f"[metattn] {cfg.name}: {type(learner).__name__} on {device} "
                       f"({n_params:,} parameters), {world} process(es), steps {start}->"
                       f"{cfg.train.steps}{budget_note}, out {run_dir}")
    window: dict[str, list[torch.Tensor]] = {}
    t_window, tasks_window = time.perf_counter(), 0
    if resume:
        # (floats: the window's mean is taken in float32, which they hold exactly)
        window = {k: [torch.tensor(x, device=device) for x in v]
                  for k, v in (state.get("log_window") or {}).items()}
        tasks_window = state.get("log_tasks", 0)
        t_window -= state.get("log_seconds", 0.0)
    step = start
    try:
        while step < cfg.train.steps and not stopping():
            t0 = time.perf_counter()
            if hasattr(train_tasks, "set_step"):  # curricula (e.g. in-context learning)
                train_tasks.set_step(step)
            batch = train_tasks.sample(cfg.train.meta_batch, gen)
            n_way = batch.n_way
            batch = batch.slice(rank * per_rank, (rank + 1) * per_rank).to(device, dtype)
            learner.train()
            # the scheduler's copy of this step's rate (under train.cuda_graph a device
            # tensor, read, a host sync, only at the log step)
            lr_used = sched.get_last_lr()[0]
            if graph_step is not None:
                # the whole step (meta-loss, backward, clip, optimiser) in one replay; its
                # outputs are overwritten by the next replay, so they are copied. The loss
                # is checked for NaN at the next log step (below), not here: a check now
                # would make the host wait for every replay before sampling the next batch
                loss, metrics = graph_step(batch)
                replayed.append(loss.clone())
                metrics = {k: v.clone() for k, v in metrics.items()}
            else:
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    loss, metrics = model(batch, None, step)
                if world > 1:
                    # one small collective: whole-batch metrics for the log, the same
                    # finiteness verdict and the same Ctrl-C decision on every rank
                    metrics, loss_all, stop_agreed = _reduce_step(
                        metrics, loss, stop_requested, world)
                else:
                    loss_all = loss.detach()
                _check_loss(loss_all, step, run_dir)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(learner.parameters(), cfg.train.grad_clip)
                opt.step()
            if ema is not None:
                ema.update()
            sched.step()
            step += 1
            elapsed += time.perf_counter() - t0
            tasks_window += cfg.train.meta_batch
            for k, v in metrics.items():
                window.setdefault(k, []).append(v)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                drain(step)  # (train.cuda_graph only) before the budget reads the clock
            if budget is not None and world == 1:  # (under torchrun: at log steps only)
                budget.end_if_spent(step, elapsed)

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                drain(step)  # (again: a budget may have moved train.steps to this step)
                now = time.perf_counter()
                vals = {k: float(torch.stack(v).float().mean()) for k, v in window.items()}
                vals["tasks_per_s"] = tasks_window / max(now - t_window, 1e-9)
                vals["lr"] = float(lr_used)  # the rate of the step just taken (not the next)
                vals["seconds"] = elapsed
                logger.log("train", step, vals)
                info = "  ".join(f"{k} {vals[k]:.4g}" for k in ("loss", "accuracy") if k in vals)
                window, t_window, tasks_window = {}, now, 0
                for cb in callbacks or []:
                    cb(step, vals)
                if callbacks and world > 1:
                    # rank 0's decision (e.g. a TimeBudget on its own clock) holds for every
                    # rank: the same schedule, and no rank left alone in a collective
                    cfg.train.steps = _share(cfg.train.steps, world)
                progress.update(step, f"{info}  {vals['tasks_per_s']:.0f} tasks/s",
                                cfg.train.steps)

            if cfg.train.eval_every and step % cfg.train.eval_every == 0 \
                    and step < cfg.train.steps:
                drain(step)  # the replays' time is training time, not evaluation time
                with ema.swapped() if ema is not None else nullcontext():
                    res = evaluate(learner, eval_sets["periodic"], device, dtype,
                                   lambda d, n, s=step: progress.update(
                                       s, f"evaluating: {d}/{n} episodes"), rank, world)
                key, mean, ci = headline(res, n_way)
                logger.log("eval", step, {**{k: v for k, v in res.items()
                                             if not isinstance(v, list)}, "seconds": elapsed})
                progress.print(f"  step {step}: test {key} {mean:.4f} ± {ci:.4f} "
                               f"({res['episodes']} episodes)")
                # rank 0's numbers decide for every rank (GPU kernels need not agree bit for
                # bit, and a rank that stopped alone would leave the others in a collective)
                mean = _share(mean, world)
                better = best is None or (mean > best if key == "accuracy" else mean < best)
                best = mean if better else best
                if cfg.train.target is not None and (
                        mean >= cfg.train.target if key == "accuracy"
                        else mean <= cfg.train.target):
                    progress.print(f"  target {cfg.train.target} reached at step {step}")
                    save(step)
                    break
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save(step)
        else:
            if step > start or not ckpt_path.exists():
                save(step)
        if stopping():
            progress.print(f"[metattn] interrupted: checkpoint at step {step} in {run_dir}; "
                           "continue with --resume")
    finally:
        progress.stop()
        logger.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    if stopping():
        raise KeyboardInterrupt
    extra = None if budget is None else {  # a time-budgeted run: did the budget end it?
        "max_seconds": budget.seconds, "stopped_by_budget": budget.stopped_by_budget}
    if ema is not None:
        # the live weights too, on the same episodes: what the average changed
        live = final_evaluation(cfg, learner, test_tasks, run_dir, device, dtype, n_way,
                                step, elapsed, write=False, rank=rank, world=world)
        extra = {**(extra or {}), "without_ema": {k: live[k] for k in ("mean", "ci95")}}
    with ema.swapped() if ema is not None else nullcontext():
        summary = final_evaluation(cfg, learner, test_tasks, run_dir, device, dtype, n_way,
                                   step, elapsed, write=is_main, extra=extra, rank=rank,
                                   world=world)
        if is_main:
            from metattn.plots import training_curves

            training_curves(run_dir / "metrics.jsonl", run_dir / "training.png")
            plot = getattr(test_tasks, "plot", None)
            if plot is not None:
                learner.eval()  # the plot shows the model as evaluated (no dropout)
                plot(learner, run_dir / "adaptation.png", seed=cfg.eval.seed)
    return summary


def final_evaluation(cfg: RunConfig, learner: Learner, test_tasks: Any, run_dir: Path,
                     device: torch.device, dtype: torch.dtype, n_way: int | None, step: int,
                     seconds: float, write: bool = True, episodes: int | None = None,
                     extra: dict[str, Any] | None = None, rank: int = 0, world: int = 1
                     ) -> dict[str, Any]:
    """Evaluate on the fixed seeded test episodes (split over ``world`` ranks under torchrun)
    and write ``summary.json``."""
    n = episodes or cfg.eval.episodes
    with _eval_bar(write and cfg.train.progress) as bar:
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
        "torch": torch.__version__,
        "malloc_tuned": cpu_allocator_tuned(),
        "results": res,
        **(extra or {}),
    }
    if write:
        name = "summary.json" if episodes is None else "eval.json"
        checkpoint.atomic_write_bytes(run_dir / name, json.dumps(summary, indent=1).encode())
    return summary


def evaluate_run(run_dir: str | Path, episodes: int | None = None, device: str | None = None,
                 threads: int | None = None, overrides: list[str] | None = None
                 ) -> dict[str, Any]:
    """Re-evaluate a run directory's checkpoint; writes ``eval.json``. ``device`` and
    ``threads`` override the run's (a GPU run can be evaluated on a CPU machine), and
    ``overrides`` (``KEY=VALUE``) any other field of its config, e.g. a learner's
    test-time option such as ``learner.test_shift=1``; ``eval.json`` records them."""
    from metattn.config import apply_overrides, from_dict, load

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if episodes is not None and episodes < 1:
        raise ConfigError(f"episodes={episodes}; evaluate on at least 1 episode")
    user = list(overrides or [])
    overrides = [f"train.device={device}"] if device else []
    overrides += [f"train.threads={threads}"] if threads else []
    overrides += user
    tensors, state = checkpoint.load(run_dir)
    # the config the checkpoint was trained with (config.yaml may be missing or edited);
    # checkpoints from before it was stored fall back to config.yaml
    if state.get("config") is not None:
        cfg = from_dict(apply_overrides(state["config"], overrides))
    else:
        cfg = load(cfg_path, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    dtype = getattr(torch, cfg.train.dtype)
    _, test_tasks, learner = build(cfg, device)
    checkpoint.restore(tensors, state, learner)
    if cfg.train.ema:
        # a run trained with train.ema is evaluated with its weight average (as its own
        # final evaluation was); --set train.ema=null evaluates the live weights
        average = WeightAverage(learner, cfg.train.ema)
        if not average.load(tensors, "extra/"):
            raise CheckpointError(
                f"train.ema={cfg.train.ema} but the checkpoint in {str(run_dir)!r} holds no "
                "weight average; evaluate with --set train.ema=null")
        average.apply()
    return final_evaluation(cfg, learner, test_tasks, run_dir, device, dtype, None,
                            state["step"], state["seconds"],
                            episodes=cfg.eval.episodes if episodes is None else episodes,
                            extra={"overrides": user} if user else None)
