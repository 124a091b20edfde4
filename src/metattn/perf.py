"""Speed: a process-level CPU setting, and one whole meta-step in a CUDA graph.

:func:`tune_cpu_allocator` keeps freed memory in the process instead of handing it back to
the OS. MAML allocates and frees the same large activation and graph tensors every
meta-iteration; with glibc's defaults each large block is a fresh ``mmap`` that the kernel
zero-fills page by page. Measured on 2 CPU cores (torch 2.13, 1 thread, Conv-4 5-way 1-shot,
vmap over 16 tasks): 2.1 s of system time per meta-iteration (~600k page faults) on ~4 s of
compute, gone after tuning; the per-task loop saves 2-8%. The cost: the process keeps its
peak memory (RSS does not shrink after a large step). It changes the whole process, so the
library never calls it by itself; the programs that own their process do: the ``metattn``
command line (``--no-malloc-tune`` or ``METATTN_MALLOC_TUNE=0`` to opt out; runs record
``malloc_tuned`` in summary.json) and the benchmarks (for every method alike). Measured for a
ProtoNet training step of ``configs/omniglot_5w1s_protonet_cpu.yaml`` (Conv-4 forward and
backward on 180 images, channels-last, Adam; 2 threads): 241-281 ms -> 176-193 ms.

:class:`CUDAGraphStep` captures a whole meta-step (meta-loss, the backward through the inner
loop, the optimiser's step) in one CUDA graph and replays it. A MAML step launches thousands of
small kernels (5437 for the transformer workload of ``benchmarks/throughput.py``), so eager
PyTorch keeps the GPU waiting on Python. Measured there on one H100 (torch 2.11, TF32, median
s per meta-iteration): transformer 0.135 eager -> 0.0325 graphed, conv4 0.033 -> 0.025; the
graphed meta-gradient equalled the eager one exactly (max difference 0). This class, run on an
H100 (2026-11-27): its CUDA tests pass (skipped on CPU-only machines), conv4 0.0251 s (0.0324 s
and 895 MB peak in chunks of 8 tasks), transformer 0.0325 s, parameter updates equal to the
eager steps' exactly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import torch

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator() -> bool:
    """Serve large CPU tensors from the heap and never trim it (glibc ``mallopt``).

    Returns True when applied (Linux with glibc), False elsewhere (then nothing changes).
    Idempotent. PyTorch's own knob for the same cost, ``THP_MEM_ALLOC_ENABLE=1`` (huge pages),
    must be set in the environment before ``import torch``; this one works at any time.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # blocks up to 1 GiB come from the heap (not mmap), and the heap is never trimmed
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _tuned = bool(ok)
    return _tuned


def cpu_allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has been applied in this process."""
    return _tuned


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
    every replay would reset it), MAML++ schedules that change with the outer step
    (``msl_steps``, ``second_order_start``: no step reaches a replay), ``checkpoint=True``
    (its recomputation saves the CUDA RNG state, which a capture forbids) and
    ``compile_inner`` (compiled steps are not captured).
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
        for key in ("msl_steps", "second_order_start"):
            if getattr(learner, key, 0):
                raise ConfigError(
                    f"CUDAGraphStep: the learner's {key}={getattr(learner, key)} changes the "
                    "meta-loss with the outer step, which a replayed graph cannot follow; set "
                    f"{key}=0 or train with eager steps")
        if getattr(learner, "checkpoint", False):
            raise ConfigError(
                "CUDAGraphStep: the learner has checkpoint=True, whose recomputed inner steps "
                "save the CUDA RNG state, which a graph capture forbids; set checkpoint=False "
                "or train with eager steps")
        if getattr(learner, "compile_inner", False) is not False:
            raise ConfigError(
                "CUDAGraphStep: the learner has compile_inner set, and compiled steps are not "
                "captured here; set compile_inner=False or train with eager steps")
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

    def _eager(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.optimizer.zero_grad(set_to_none=True)
        return self._body(batch)

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
        checks = getattr(self.learner, "check_finite", None)
        if checks:  # a NaN check reads the loss on the host: not allowed while capturing
            self.learner.check_finite = False
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.loss, self.metrics = self._body(self.static, cache=False)
        except RuntimeError as err:
            if "captur" not in str(err).lower():
                raise
            raise ConfigError(
                f"CUDAGraphStep: {type(self.learner).__name__}.meta_loss cannot be captured "
                f"({err}); it reads a GPU value on the host (an .item(), a data-dependent "
                "shape or a check). MAML-family learners capture; train this one with eager "
                "steps") from err
        finally:
            if checks:
                self.learner.check_finite = checks
        born = [p for p in self.optimizer.state if p not in had_state]
        if born:  # a parameter first used in the capture: its state would reset each replay
            raise ConfigError(
                f"CUDAGraphStep: {len(born)} parameter(s) got their first gradient inside the "
                "capture, so their optimiser state was made there and every replay would "
                "reset it; raise warmup so that every parameter is used before the capture")
        self.graph = graph  # only a completed, checked capture is ever replayed

    def _body(self, batch: TaskBatch, cache: bool = True
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cuda", dtype=self.autocast, enabled=self.autocast is not None,
                            cache_enabled=cache):
            loss, metrics = self.learner.meta_loss(batch, self.loss_fn)
        loss.backward()
        if self.grad_clip:  # no host sync (error_if_nonfinite stays off): capturable
            torch.nn.utils.clip_grad_norm_(self._params(), self.grad_clip)
        self.optimizer.step()
        return loss.detach(), {k: v.detach() for k, v in metrics.items()}

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
                out = self._eager(batch)
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
