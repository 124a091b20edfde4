"""One whole meta-step in a CUDA graph: :class:`CUDAGraphStep`.

It captures a meta-step (meta-loss, the backward through the inner loop, the optimiser's
step: :func:`~metattn.recipe.step.meta_step`, the recipe's own step body) in one CUDA graph and
replays it. A MAML step launches thousands of small kernels (5437 for the transformer
workload of ``benchmarks/throughput.py``), so eager PyTorch keeps the GPU waiting on Python.
Measured there on one H100 (torch 2.11, TF32, median s per meta-iteration): transformer 0.135
eager -> 0.0325 graphed, conv4 0.033 -> 0.025; the graphed meta-gradient equalled the eager
one exactly (docs/performance.md).

Whether a run may use one is decided here, in :func:`cuda_graph_blockers`: the learner says
what in it blocks a capture (:meth:`~metattn.meta.base.Learner.capture_blockers`), the run adds
its own reasons (device, processes, optimiser, curriculum).
"""

from __future__ import annotations

from typing import Any

import torch

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError
from metattn.recipe.step import meta_step


def cuda_graph_blockers(cfg: Any, learner: Any, device: torch.device, world: int) -> list[str]:
    """Why ``cfg`` cannot run with ``train.cuda_graph=true`` here (empty: it can), each reason
    naming the config key and the fix. The one place that decides it: the learner's own
    reasons (:meth:`~metattn.meta.base.Learner.capture_blockers`) and the run's."""
    why = []
    if device.type != "cuda" or world > 1:
        why.append(f"train.cuda_graph=true replays the meta-step from a CUDA graph in one "
                   f"process; this run has device {device} and {world} process(es): set "
                   "train.cuda_graph=false" + ("" if device.type == "cuda" else " on the CPU"))
    if cfg.train.optimizer not in ("adam", "adamw"):
        why.append(f"train.cuda_graph=true needs train.optimizer adam or adamw (built with "
                   f"capturable=True); {cfg.train.optimizer} cannot be captured here")
    if cfg.task.get("curriculum"):
        why.append("train.cuda_graph=true replays fixed episode shapes, but task.curriculum "
                   "changes them during the run; set one of them off")
    for key, reason in learner.capture_blockers():
        where = (f"learner.{key}={getattr(learner, key)!r}" if key
                 else f"learner.kind={cfg.learner.get('kind')!r}")
        fix = f"set learner.{key} off or train.cuda_graph=false" if key \
            else "set train.cuda_graph=false"
        why.append(f"train.cuda_graph=true cannot replay {where}: {reason}; {fix}")
    return why


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if not group.get("capturable", False):
            raise ConfigError(
                f"CUDAGraphStep: {type(optimizer).__name__} was built without "
                "capturable=True; build it with capturable=True (e.g. torch.optim.Adam("
                "params, lr, capturable=True)) so its step can be captured")


class CUDAGraphStep:
    """``step(batch) -> (loss, metrics)``: one meta-step of ``learner`` with ``optimizer``
    (zero_grad, ``meta_loss``, backward, ``optimizer.step()``), replayed from a CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream (the CUDA-graph docs ask for it;
    they are real steps on their batches). The next call captures the step and replays it;
    later calls copy their batch into the captured input tensors and replay. Every call is a
    true meta-step on its own batch, so a loop need not change::

        opt = torch.optim.Adam(learner.parameters(), 1e-3, capturable=True)
        step = CUDAGraphStep(learner, opt)
        for batch in batches:
            loss, metrics = step(batch.to("cuda"))

    Requirements, checked with errors that name the fix: the batch on a CUDA device, every
    batch of the same shapes and dtypes as the captured one, an optimiser built with
    ``capturable=True`` (Adam, AdamW), and a ``meta_loss`` that does not synchronise with the
    host. MAML's per-step NaN check (``check_finite``) does, so it is off during the capture:
    check the returned loss for NaN at your own cadence. The returned loss and metrics are
    the graph's output tensors, overwritten by the next call: ``.clone()`` them to keep them.
    ``loss_fn`` is passed to ``meta_loss`` and ``autocast`` (e.g. ``torch.bfloat16``) runs it
    under ``torch.autocast`` (with its weight cache off, as the CUDA-graph docs ask);
    ``grad_clip`` clips the gradients' total norm before the optimiser's step. Refused,
    with the reason: ``warmup < 1`` (the optimiser's state must exist before the capture, or
    every replay would reset it) and whatever the learner's
    :meth:`~metattn.meta.base.Learner.capture_blockers` names.
    """

    def __init__(self, learner: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 warmup: int = 3, loss_fn: Any = None,
                 autocast: torch.dtype | None = None, grad_clip: float | None = None) -> None:
        _check_capturable(optimizer)
        if int(warmup) < 1:
            raise ConfigError(
                f"CUDAGraphStep: warmup={warmup}; use warmup >= 1: the optimiser creates its "
                "state (Adam's moments and step) on its first step, and a capture that made "
                "it would reset it on every replay")
        for key, reason in learner.capture_blockers():
            what = f"the learner's {key}={getattr(learner, key)!r}" if key else \
                f"{type(learner).__name__}"
            raise ConfigError(f"CUDAGraphStep: {what}: {reason}; "
                              + (f"set {key} off or " if key else "") + "train with eager steps")
        self.learner, self.optimizer = learner, optimizer
        self.warmup, self.loss_fn, self.autocast = int(warmup), loss_fn, autocast
        self.grad_clip = grad_clip
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: TaskBatch | None = None
        self.loss: torch.Tensor | None = None
        self.metrics: dict[str, torch.Tensor] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _capture(self, batch: TaskBatch) -> None:
        self.static = TaskBatch(*(t.clone() for t in (batch.support_x, batch.support_y,
                                                      batch.query_x, batch.query_y)),
                                n_way=batch.n_way, k_shot=batch.k_shot)
        _check_capturable(self.optimizer)  # again: a resumed state may have changed it
        missing = [p for p in self._params()
                   if p.grad is not None and p not in self.optimizer.state]
        if missing:
            raise ConfigError(
                f"CUDAGraphStep: {len(missing)} parameter(s) have no optimiser state after the "
                "warm-up, so the capture would create it and every replay would reset it; "
                "raise warmup")
        had_state = set(self.optimizer.state)
        graph = torch.cuda.CUDAGraph()
        try:
            # host-side checks (MAML's NaN check) read GPU values: off while capturing
            with self.learner.capturing(), torch.cuda.graph(graph):
                self.loss, self.metrics = self._body(self.static, cache=False)
        except RuntimeError as err:
            if "captur" not in str(err).lower():
                raise
            raise ConfigError(
                f"CUDAGraphStep: {type(self.learner).__name__}.meta_loss cannot be captured "
                f"({err}); it reads a GPU value on the host (an .item(), a data-dependent "
                "shape or a check). MAML-family learners capture; train this one with eager "
                "steps") from err
        born = [p for p in self.optimizer.state if p not in had_state]
        if born:  # a parameter first used in the capture: its state would reset each replay
            raise ConfigError(
                f"CUDAGraphStep: {len(born)} parameter(s) got their first gradient inside the "
                "capture, so their optimiser state was made there and every replay would "
                "reset it; raise warmup so that every parameter is used before the capture")
        self.graph = graph  # only a completed, checked capture is ever replayed

    def _body(self, batch: TaskBatch, cache: bool = True
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return meta_step(self.learner, self.optimizer, batch, loss_fn=self.loss_fn,
                         autocast=self.autocast, cache=cache, grad_clip=self.grad_clip)

    def __call__(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.support_x.device.type != "cuda":
            raise ConfigError(
                f"CUDAGraphStep: the batch is on {batch.support_x.device}; CUDA graphs need "
                "a CUDA device: move it with batch.to('cuda'), or use eager steps on the CPU")
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream(batch.support_x.device)
            side.wait_stream(torch.cuda.current_stream(batch.support_x.device))
            with torch.cuda.stream(side):
                out = self._body(batch)
            torch.cuda.current_stream(batch.support_x.device).wait_stream(side)
            return out
        if self.graph is None:
            self._capture(batch)
        else:
            assert self.static is not None
            for name in ("support_x", "support_y", "query_x", "query_y"):
                dst, src = getattr(self.static, name), getattr(batch, name)
                if dst.shape != src.shape or dst.dtype != src.dtype:
                    raise TaskError(
                        f"CUDAGraphStep: batch.{name} is {tuple(src.shape)} {src.dtype} but "
                        f"the graph was captured for {tuple(dst.shape)} {dst.dtype}; a graph "
                        "replays fixed shapes: keep the episode sizes, or make one "
                        "CUDAGraphStep per shape")
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        assert self.loss is not None
        return self.loss, self.metrics
