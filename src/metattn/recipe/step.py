"""The meta-step: ONE body (:func:`meta_step`) that every way of stepping runs (eagerly in one
process, under DDP, or captured once in a CUDA graph and replayed:
:class:`~metattn.recipe.stepper.Stepper`), and the check of its meta-loss."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from metattn.data.tasks import TaskBatch
from metattn.errors import TrainingError

Metrics = dict[str, torch.Tensor]


def meta_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TaskBatch,
              step: int | None = None, loss_fn: Any = None,
              autocast: torch.dtype | None = None, cache: bool = True,
              grad_clip: float | None = None,
              check: Callable[[torch.Tensor, Metrics], Metrics] | None = None
              ) -> tuple[torch.Tensor, Metrics]:
    """One meta-step: the meta-loss (under ``autocast``, its weight cache off where a CUDA
    graph captures: ``cache=False``), ``check(loss, metrics)`` before anything changes,
    then zero_grad, backward, clipping and the optimiser's step. ``model`` is the learner,
    or DDP around it. Returns the detached loss and metrics."""
    with torch.autocast(batch.support_x.device.type, dtype=autocast,
                        enabled=autocast is not None, cache_enabled=cache) \
            if autocast is not None else nullcontext():
        loss, metrics = model(batch, loss_fn, step)
    if check is not None:
        metrics = check(loss, metrics)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:  # no host sync (error_if_nonfinite stays off): capturable
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``train.autocast`` on ``device``: ``bf16`` -> bfloat16; ``auto`` -> bfloat16 where the
    device computes it natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or
    AMX), else None (float32 stays: emulated bf16 is slower); ``none`` -> None."""
    if setting == "bf16":
        return torch.bfloat16
    if setting != "auto":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and native_cpu_bf16() else None


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the avx512_bf16 or amx_bf16 flag)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def check_loss(loss: torch.Tensor, step: int, run_dir: Path, note: str = "") -> None:
    """A non-finite meta-loss ends the run with the last checkpoint kept."""
    if not torch.isfinite(loss):
        raise TrainingError(
            f"meta-loss is {loss.item()} at step {step}{note}; the last checkpoint in "
            f"{str(run_dir)!r} is kept. Lower train.lr or the learner's inner_lr, or set "
            "train.grad_clip")


def check_replayed(losses: list[torch.Tensor], step: int, run_dir: Path) -> None:
    """:func:`check_loss` for the meta-losses of the steps since the last check, in one host
    sync; ``step`` counts the steps taken (the CUDA-graph path defers the check so that the
    host never waits for a replay)."""
    if not losses:
        return
    bad = (~torch.isfinite(torch.stack(losses).reshape(len(losses), -1).sum(1))).nonzero()
    if len(bad):
        first = int(bad[0, 0])
        check_loss(losses[first], step - len(losses) + first, run_dir,
                   f" (a replayed step; found at step {step}, where train.cuda_graph checks)")
