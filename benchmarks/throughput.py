"""MAML throughput: meta-iterations/s, tasks/s and peak memory, metattn against plain PyTorch.

Two workloads (the issue "Speed and scale", REFERENCES.md "MAML implementations, speed"):

* ``conv4``: the MAML paper's Omniglot net (``metattn.Conv4``, BatchNorm on batch
  statistics), 28x28, 5-way 1-shot, 15 queries per class, meta-batch 32, 1 inner step at 0.4,
  second order.
* ``transformer``: ``metattn.TokenTransformer`` (vocab 1000, seq 32, d_model 128, 4 heads,
  2 layers, FF 256, mean pool, linear head), 5-way 5-shot, 5 queries per class, meta-batch 16,
  5 inner steps at 0.01, second order.
* ``user_conv4``: conv4's episodes on the Conv-4 a user writes (``nn.Conv2d``,
  ``nn.BatchNorm2d`` with running statistics, ``nn.MaxPool2d``), not ``metattn.Conv4``:
  what metattn's engine adds or saves on a module it knows nothing about.

One meta-iteration = zero_grad + meta-loss + backward + outer Adam step. Methods:

* ``default``: ``metattn.MAML(model, inner_lr=..., inner_steps=...)``, every other option
  at its default (``--task-threads`` and the other switches do not apply);
* ``vmap`` / ``loop`` / ``auto``: ``metattn.MAML(vectorize=True / False / "auto")``;
* ``compiled``: the loop with ``MAML(compile_inner=True)`` (so one run times both);
* ``plain``: a per-task loop written here (``functional_call`` +
  ``torch.autograd.grad(create_graph=True)``, one backward per task);
* ``higher``: ``higher.innerloop_ctx`` (when importable; ``pip install higher``).

Every method's meta-gradient is checked against ``plain`` in float64 on the first
``--check-tasks`` tasks of the batch (column ``grad diff``: max |g - g_plain| / max |g_plain|).
The plain loop is always timed in the same run, so ``vs plain`` compares like with like; the
``anchor`` rows are REFERENCES.md's published side-by-side numbers (another machine) and the
``norm.`` column rescales our seconds to that machine through the plain loop
(``ours / plain_ours * plain_anchor``).

The compute floor is the time the workload's matmuls and convolutions alone would take at
this machine's matmul peak: their FLOPs (counted on the plain loop with
``torch.utils.flop_counter``; second-order MAML costs 9 forward passes' worth per inner step)
over the rate of a large square matmul timed here. The ``of peak`` column is that floor over
each method's s/it, and where anchors exist the table says which share of the peak the goal
(1.5x the best anchor) asks for. ``--no-floor`` (or ``--no-plain``) skips it.

On CUDA, ``--cuda-graph`` runs metattn's methods through :class:`metattn.recipe.CUDAGraphStep`
(the whole meta-step captured once and replayed; its parameter updates are checked against
eager steps), ``--check-finite off`` drops MAML's per-step NaN check (a host sync),
``--autocast bf16`` runs the meta-loss under autocast (on CPU too, where oneDNN's bf16
kernels need AVX512-BF16 or AMX; the table's footnote then gives that meta-gradient's error
against the float64 plain loop, beside float32's) and ``--profile`` prints torch.profiler
tables: kernels per meta-step and how much of the wall time the device is busy.
``--compile-inner`` runs metattn's loop with ``MAML(compile_inner=True)`` (each inner step
through ``torch.compile``, compiled in the first warm-up iteration, whose time is printed).
``--task-threads N|auto`` (default auto) is ``MAML(task_threads=...)``: on the CPU metattn's
per-task loop runs N tasks at a time, each on one intra-op thread (1 = one task at a time on
all threads). ``--channels-last`` builds the Conv4 of metattn's ``loop`` method in NHWC order. The
references (``plain``, ``higher``) run torch's own ``nn.MaxPool2d`` and the textbook conv +
BatchNorm modules; metattn's Conv4 pools NCHW CPU tensors through its faster, equal
:class:`metattn.nn.backbones.MaxPool2x2` and computes its first conv + BatchNorm as one folded
matmul (``Conv4(fold_first_norm=True)``, the same function; ``--no-fold`` turns it off, to
measure what comes from the MAML loop alone).

    python benchmarks/throughput.py --workload conv4 --iters 5 --warmup 1 --threads 2
    python benchmarks/throughput.py --device cuda --tf32 on --json out.json
    python benchmarks/throughput.py --device cuda --tf32 on --methods vmap --no-plain --cuda-graph
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

import metattn as mt
from metattn.nn.backbones import MaxPool2x2
from metattn.recipe import CUDAGraphStep

METHODS = ("default", "vmap", "loop", "auto", "compiled", "plain", "higher")
OURS = ("default", "vmap", "loop", "auto", "compiled")  # metattn's methods

# REFERENCES.md, "MAML implementations, speed": median s per meta-iteration, measured side
# by side on one machine (higher / learn2learn / plain torch.func loop / hand-written vmap).
ANCHORS = {
    ("conv4", "cpu"): {"higher": 3.11, "learn2learn": 2.84, "plain loop": 2.85, "vmap": 4.50},
    ("transformer", "cpu"): {"higher": 3.91, "learn2learn": 3.77, "plain loop": 4.02,
                             "vmap": 3.91},
    ("conv4", "cuda"): {"higher": 0.851, "learn2learn": 0.603, "plain loop": 0.562,
                        "vmap": 0.033},
    ("transformer", "cuda"): {"higher": 2.18, "learn2learn": 2.26, "plain loop": 2.38,
                              "vmap": 0.168},
}
ANCHOR_MACHINE = {"cpu": "2 CPU cores, torch 2.13", "cuda": "one H100, torch 2.11"}


@dataclass
class Workload:
    name: str
    make_model: Callable[[], torch.nn.Module]
    make_batch: Callable[[int, torch.Generator], mt.TaskBatch]
    meta_batch: int
    inner_lr: float
    inner_steps: int
    double_backward: bool  # the plain loop / higher need the math attention path


def _labels(n_way: int, per_class: int, T: int, g: torch.Generator) -> torch.Tensor:
    y = torch.arange(n_way).repeat_interleave(per_class)
    return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(T)])


def conv4_batch(T: int, g: torch.Generator) -> mt.TaskBatch:
    n, k, q = 5, 1, 15
    return mt.TaskBatch(torch.rand(T, n * k, 1, 28, 28, generator=g), _labels(n, k, T, g),
                        torch.rand(T, n * q, 1, 28, 28, generator=g), _labels(n, q, T, g),
                        n_way=n, k_shot=k)


def transformer_batch(T: int, g: torch.Generator) -> mt.TaskBatch:
    n, k, q = 5, 5, 5
    return mt.TaskBatch(torch.randint(0, 1000, (T, n * k, 32), generator=g),
                        _labels(n, k, T, g),
                        torch.randint(0, 1000, (T, n * q, 32), generator=g),
                        _labels(n, q, T, g), n_way=n, k_shot=k)


def user_conv4() -> torch.nn.Module:
    """The MAML paper's Conv-4 as a user writes it, with torch's modules only."""
    def block(i: int, o: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o),
                                   torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    return torch.nn.Sequential(block(1, 64), block(64, 64), block(64, 64), block(64, 64),
                               torch.nn.Flatten(), torch.nn.Linear(64, 5))


WORKLOADS = {
    "conv4": Workload("conv4", lambda: mt.Conv4(1, 5, hidden=64, image_size=28), conv4_batch,
                      meta_batch=32, inner_lr=0.4, inner_steps=1, double_backward=False),
    "user_conv4": Workload("user_conv4", user_conv4, conv4_batch, meta_batch=32, inner_lr=0.4,
                           inner_steps=1, double_backward=False),
    "transformer": Workload(
        "transformer",
        lambda: mt.TokenTransformer(vocab_size=1000, max_len=32, n_classes=5, d_model=128,
                                    n_heads=4, n_layers=2, d_ff=256),
        transformer_batch, meta_batch=16, inner_lr=0.01, inner_steps=5, double_backward=True),
}


# ---------------------------------------------------------------------- the methods
def plain_step(model: torch.nn.Module, batch: mt.TaskBatch, lr: float, steps: int) -> None:
    """A plain per-task MAML loop: functional_call + autograd.grad(create_graph=True)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    T = batch.num_tasks
    for t in range(T):
        p = params
        for _ in range(steps):
            out = functional_call(model, (p, buffers), (batch.support_x[t],))
            loss = F.cross_entropy(out, batch.support_y[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - lr * gk for (k, v), gk in zip(p.items(), grads)}
        out = functional_call(model, (p, buffers), (batch.query_x[t],))
        (F.cross_entropy(out, batch.query_y[t]) / T).backward()


def higher_step(model: torch.nn.Module, batch: mt.TaskBatch, lr: float, steps: int) -> None:
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    T = batch.num_tasks
    for t in range(T):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fm(batch.support_x[t]), batch.support_y[t]))
            (F.cross_entropy(fm(batch.query_x[t]), batch.query_y[t]) / T).backward()


def amp_dtype(args) -> torch.dtype | None:
    """``--autocast``: the dtype metattn's meta-loss runs under, or None."""
    return torch.bfloat16 if args.autocast == "bf16" else None


def make_method(name: str, model: torch.nn.Module, wl: Workload, chunk_size: int | None,
                checkpoint: bool, check_finite: bool = True,
                autocast: torch.dtype | None = None, task_threads: int | str = "auto",
                compile_inner: bool = False):
    """(step function that accumulates meta-gradients into .grad, params for the optimiser,
    the metattn learner or None)."""
    ctx = mt.double_backward if wl.double_backward else nullcontext
    if name == "default":
        learner = mt.MAML(model, inner_lr=wl.inner_lr, inner_steps=wl.inner_steps)

        def step(batch):
            loss, _ = learner.meta_loss(batch)
            loss.backward()
        return step, list(learner.parameters()), learner
    if name in OURS:
        vec = {"vmap": True, "loop": False, "auto": "auto", "compiled": False}[name]
        kw = {"checkpoint": True} if checkpoint else {}
        if name == "compiled" or (compile_inner and name != "vmap"):  # the loop's step
            kw["compile_inner"] = True
        learner = mt.MAML(model, inner_lr=wl.inner_lr, inner_steps=wl.inner_steps,
                          first_order=False, vectorize=vec, chunk_size=chunk_size,
                          check_finite=check_finite, task_threads=task_threads, **kw)
        dev = next(model.parameters()).device.type

        def step(batch):
            with torch.autocast(dev, dtype=autocast, enabled=autocast is not None):
                loss, _ = learner.meta_loss(batch)
            loss.backward()
        return step, list(learner.parameters()), learner
    if name == "plain":
        def step(batch):
            with ctx():
                plain_step(model, batch, wl.inner_lr, wl.inner_steps)
        return step, list(model.parameters()), None
    if name == "higher":
        def step(batch):
            with ctx():
                higher_step(model, batch, wl.inner_lr, wl.inner_steps)
        return step, list(model.parameters()), None
    raise ValueError(name)


def higher_available() -> bool:
    try:
        import higher  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or the CPU process's peak RSS
    (Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere ru_maxrss, which
    cannot be reset and so is an upper bound). Reported as growth over the block's start."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.reset_ok = False
        gc.collect()
        try:  # hand freed heap memory back to the OS, so the growth below is this block's
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            pass
        rss = self._status_kb("VmRSS")
        self.start = (rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = self._status_kb("VmHWM") if self.reset_ok else None
            self.peak = (hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        self.mb = max(self.peak - self.start, 0) / 2**20
        return False


# ---------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One method, ready to run meta-iterations (its own copy of the model and optimiser)."""

    def __init__(self, name: str, wl: Workload, base: torch.nn.Module, args,
                 device: torch.device):
        self.name, self.device = name, device
        self.model = copy.deepcopy(base)
        ours = name in OURS
        prepare(self.model, name, args)
        self.graphed = bool(args.cuda_graph and ours and device.type == "cuda")
        self.step, params, learner = make_method(
            name, self.model, wl, args.chunk_size, args.checkpoint,
            check_finite=args.check_finite == "on", autocast=amp_dtype(args) if ours else None,
            task_threads=args.task_threads, compile_inner=args.compile_inner)
        self.opt = torch.optim.Adam(params, lr=1e-3, foreach=True, capturable=self.graphed)
        # metattn.recipe.CUDAGraphStep: 2 eager warm-up steps, the capture at the 3rd
        self.graph_step = CUDAGraphStep(learner, self.opt, warmup=2,
                                        autocast=amp_dtype(args)) if self.graphed else None
        self.compiles = learner is not None and learner.compile_inner is not False
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def iteration(self, batch: mt.TaskBatch, record: bool) -> None:
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        if self.graph_step is not None:
            self.graph_step(batch)
        else:
            self.opt.zero_grad(set_to_none=True)
            self.step(batch)
            self.opt.step()
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)


def time_methods(names: list[str], wl: Workload, base: torch.nn.Module,
                 batches: list[mt.TaskBatch], args, device: torch.device) -> list[dict]:
    """Warm-up iterations one method at a time (their peak memory is the method's), then the
    timed iterations round-robin over the methods, so a change of background load during
    the run biases no method."""
    runners = []
    for name in names:
        r = Runner(name, wl, base, args, device)
        with PeakMemory(device) as mem:  # a CUDA graph is captured within the warm-up
            t0 = time.perf_counter()
            for i in range(max(args.warmup, 3 if r.graphed else 1)):
                r.iteration(batches[i % len(batches)], record=False)
                if i == 0:  # where --compile-inner compiles
                    r.first_s = time.perf_counter() - t0
        r.peak_mb = mem.mb
        runners.append(r)
        print(f"  {wl.name:11s} {name:7s} warm", file=sys.stderr, flush=True)
    for i in range(args.iters):
        for r in runners:
            r.iteration(batches[i % len(batches)], record=True)
    if args.profile:
        for r in runners:
            if r.name != "plain" or len(runners) == 1:
                try:
                    profile(r, batches, wl.name)
                except Exception as e:  # a profiler failure must not lose the timings
                    print(f"profile of {r.name} failed: {e!r}", flush=True)
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        # process CPU seconds: with 1 thread, a load-independent measure of the work done
        rows.append({"method": r.name, "s_per_it": med, "it_per_s": 1 / med,
                     "tasks_per_s": wl.meta_batch / med, "peak_mb": r.peak_mb,
                     "times": r.times, "cpu_s_per_it": statistics.median(r.cpu_times),
                     "first_iteration_s": r.first_s, "compile_inner": r.compiles,
                     "graph_vs_eager": graph_check(r.name, wl, base, batches, args)
                     if r.graphed else None})
    return rows


def graph_check(method: str, wl: Workload, base: torch.nn.Module,
                batches: list[mt.TaskBatch], args, steps: int = 4) -> float:
    """Parameter updates after ``steps`` meta-steps through ``CUDAGraphStep`` (1 eager
    warm-up, the capture, replays) against eager steps from the same start and batches:
    max |graphed - eager| / max |eager|."""
    updates = []
    for graphed in (False, True):
        model = copy.deepcopy(base)
        step, params, learner = make_method(method, model, wl, args.chunk_size,
                                            args.checkpoint, check_finite=False,
                                            autocast=amp_dtype(args))
        opt = torch.optim.Adam(params, lr=1e-3, foreach=True, capturable=True)
        start = [p.detach().clone() for p in params]
        stepper = CUDAGraphStep(learner, opt, warmup=1, autocast=amp_dtype(args))
        for i in range(steps):
            if graphed:
                stepper(batches[i % len(batches)])
            else:
                opt.zero_grad(set_to_none=True)
                step(batches[i % len(batches)])
                opt.step()
        updates.append([p.detach() - s0 for p, s0 in zip(params, start, strict=True)])
    eager, graph = updates
    num = max(float((a - b).abs().max()) for a, b in zip(graph, eager, strict=True))
    return num / max(float(b.abs().max()) for b in eager)


def profile(r: Runner, batches: list[mt.TaskBatch], wl_name: str, iters: int = 3) -> None:
    """torch.profiler over ``iters`` iterations of one method: the kernels that take the
    device time, and device time per iteration against wall time (how busy the device is)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.device.type == "cuda" else [])
    sync(r.device)
    t0 = time.perf_counter()
    with tprofile(activities=acts) as prof:
        for i in range(iters):
            r.iteration(batches[i % len(batches)], record=False)
    wall = (time.perf_counter() - t0) / iters
    ev = prof.key_averages()
    key = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else \
        "self_cuda_time_total"
    # the kernels alone (ops carry their kernels' time too: summing both counts it twice)
    kernels = [e for e in ev if e.device_type.name == "CUDA"
               and not getattr(e, "is_user_annotation", False)]
    dev_us = sum(getattr(e, key, 0.0) for e in kernels) / iters
    launches = sum(e.count for e in kernels) // iters
    print(f"\n### profile: {wl_name} {r.name}, {iters} iterations under the profiler: "
          f"{wall * 1000:.1f} ms wall/it, {dev_us / 1000:.1f} ms of kernels/it "
          f"(device busy {100 * dev_us / 1000 / max(wall * 1000, 1e-9):.0f}% of the wall "
          f"time), {launches} kernels/it")
    sort = key if r.device.type == "cuda" else "self_cpu_time_total"
    print(ev.table(sort_by=sort, row_limit=18, max_name_column_width=60))


def prepare(model: torch.nn.Module, name: str, args) -> None:
    """The references (``plain``, ``higher``) run torch's own ``nn.MaxPool2d``, not metattn's
    CPU max-pool, and Conv4's textbook first block (``fold_first_norm=False``, as metattn's
    methods under ``--no-fold``); ``--channels-last`` puts metattn's ``loop`` method's Conv4 in
    NHWC order (vmap batches 5-D inputs, which channels_last does not cover)."""
    if name in ("plain", "higher"):
        if isinstance(model, mt.Conv4):  # the textbook first block, not the folded matmul
            model.fold_first_norm = False
        for mod in model.modules():
            for child_name, child in mod.named_children():
                if isinstance(child, MaxPool2x2):
                    setattr(mod, child_name, torch.nn.MaxPool2d(2))
    if name in OURS and args.no_fold and isinstance(model, mt.Conv4):
        model.fold_first_norm = False
    if name == "loop" and args.channels_last and isinstance(model, mt.Conv4):
        model.channels_last = True  # NHWC weights and activations (same numbers)
        model.body.to(memory_format=torch.channels_last)


def grad_check(name: str, wl: Workload, base: torch.nn.Module, batch: mt.TaskBatch,
               args, ref: list[torch.Tensor] | None, dtype: torch.dtype = torch.float64,
               autocast: torch.dtype | None = None) -> tuple[list[torch.Tensor], float | None]:
    """Meta-gradient of ``name`` on a few tasks (float64 by default; ``dtype`` and
    ``autocast`` measure a lower precision), and its max relative difference from ``ref``
    (the plain loop's, in float64)."""
    model = copy.deepcopy(base).to(dtype)
    prepare(model, name, args)
    b = mt.TaskBatch(*(t[: args.check_tasks] for t in (batch.support_x, batch.support_y,
                                                       batch.query_x, batch.query_y)),
                     n_way=batch.n_way)
    b = b.to(b.support_x.device, dtype)
    step, _, _ = make_method(name, model, wl, args.chunk_size, args.checkpoint,
                             autocast=autocast, task_threads=args.task_threads,
                             compile_inner=args.compile_inner)
    model.zero_grad(set_to_none=True)
    step(b)
    g = [p.grad.detach().double().clone() for p in model.parameters()]
    if ref is None:
        return g, None
    num = max(float((a - r).abs().max()) for a, r in zip(g, ref))
    den = max(float(r.abs().max()) for r in ref)
    return g, num / den


def workload_flops(wl: Workload, base: torch.nn.Module, batch: mt.TaskBatch, args) -> float:
    """Matmul and convolution FLOPs of one meta-iteration (``torch.utils.flop_counter``
    counts mm/bmm/addmm and convolutions, forward and backward, the double backward included),
    counted on the plain loop: the workload's own maths, on one thread, so no op escapes the
    counter on a worker thread. Elementwise work (norms, softmax, the optimiser) is free here:
    the floor below is a lower bound."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(base)
    prepare(model, "plain", args)
    step, _, _ = make_method("plain", model, wl, None, False)
    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int = 3) -> tuple[float, int]:
    """(FLOP/s, n) of a large square matmul in ``dtype`` on the current threads (on CUDA
    under the current TF32 setting): the rate no meta-iteration's matmuls can beat."""
    n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    k = 20 if device.type == "cuda" else 8
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / k)
    return 2 * n ** 3 / best, n


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def run_workload(wl_name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    wl = WORKLOADS[wl_name]
    if args.meta_batch:
        wl = Workload(**{**wl.__dict__, "meta_batch": args.meta_batch})
    torch.manual_seed(0)
    base = wl.make_model().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    batches = [wl.make_batch(wl.meta_batch, g).to(device, dtype) for _ in range(2)]
    methods = [m for m in args.methods if m != "higher" or higher_available()]
    skipped = [m for m in args.methods if m not in methods]
    # the plain loop first: it is the reference of every ratio and gradient check
    if args.no_plain:
        methods = [m for m in methods if m != "plain"]
    else:
        methods = ["plain"] + [m for m in methods if m != "plain"]
    rows = time_methods(methods, wl, base, batches, args, device)
    ref = None
    for row in rows:
        if args.check_tasks > 0 and not args.no_plain:
            gref, diff = grad_check(row["method"], wl, base, batches[0], args, ref)
            ref = gref if row["method"] == "plain" else ref
            row["grad_diff"] = diff
            if row["method"] in OURS and amp_dtype(args) is not None:
                # what the timed precision costs: float32 under autocast, and float32 alone,
                # each against the float64 reference
                g_amp, row["amp_grad_diff"] = grad_check(
                    row["method"], wl, base, batches[0], args, ref, torch.float32,
                    amp_dtype(args))
                flat = torch.cat([a.flatten() for a in g_amp])
                flat_ref = torch.cat([r.flatten() for r in ref])
                row["amp_grad_norm_diff"] = float((flat - flat_ref).norm() / flat_ref.norm())
                row["fp32_grad_diff"] = grad_check(row["method"], wl, base, batches[0], args,
                                                   ref, torch.float32)[1]
    floor = None
    if not (args.no_floor or args.no_plain):  # quick runs without the reference skip it too
        flops = workload_flops(wl, base, batches[0], args)
        timed = amp_dtype(args) or dtype  # the precision metattn's methods run in
        peak, n = matmul_peak(device, timed)
        floor = {"gflop": flops / 1e9, "peak_gflops": peak / 1e9, "n": n,
                 "dtype": str(timed).replace("torch.", ""),
                 "s_per_it": flops / peak}
        for r in rows:
            r["of_peak"] = floor["s_per_it"] / r["s_per_it"]
    plain = next((r["s_per_it"] for r in rows if r["method"] == "plain"), None)
    anchors = ANCHORS.get((wl_name, device.type), {})
    plain_cpu = next((r["cpu_s_per_it"] for r in rows if r["method"] == "plain"), None)
    for r in rows:
        r["vs_plain"] = None if plain is None else plain / r["s_per_it"]
        r["cpu_vs_plain"] = None if plain_cpu is None else plain_cpu / r["cpu_s_per_it"]
        if anchors and plain is not None:
            r["normalised_s_per_it"] = r["s_per_it"] / plain * anchors["plain loop"]
    return {"workload": wl_name, "meta_batch": wl.meta_batch, "inner_steps": wl.inner_steps,
            "rows": rows, "anchors": anchors, "skipped": skipped, "floor": floor,
            "plain_s_per_it": plain}


def print_table(res: dict, header: dict) -> None:
    anchors = res["anchors"]
    best = min(anchors.values()) if anchors else None
    print(f"\n## {res['workload']} (meta-batch {res['meta_batch']}, {res['inner_steps']} inner "
          f"step(s), second order) on {header['device']}, torch {header['torch']}, "
          f"{header['dtype']}, tf32 {header['tf32']}, malloc {header['malloc']}, check_finite "
          f"{header['check_finite']}, autocast {header['autocast']}, "
          + (f"channels_last {header['channels_last']}, fold_first_norm "
             f"{header.get('fold_first_norm', False)}, " if res["workload"] == "conv4" else "")
          + f"task_threads {header.get('task_threads', 1)}, compile_inner "
          f"{header.get('compile_inner', False)}, cuda_graph {header['cuda_graph']}")
    floor = res.get("floor")
    if floor:
        print(f"compute floor: {floor['gflop']:.1f} GFLOP of matmuls and convolutions per "
              f"meta-iteration (counted on the plain loop) at {floor['peak_gflops']:.1f} GFLOP/s "
              f"(a {floor['n']}^3 {floor['dtype']} matmul here) = {floor['s_per_it']:.3f} s/it; "
              "column 'of peak' = that floor / s/it")
    print(f"| method | s/it (median of {header['iters']}) | it/s | tasks/s | peak MB | "
          "vs plain | norm. s/it | grad diff (fp64) | CPU s/it | CPU vs plain | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        gd = r.get("grad_diff")
        gd = "ref" if r["method"] == "plain" else ("-" if gd is None else f"{gd:.1e}")
        norm = r.get("normalised_s_per_it")
        vs = "-" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}x"
        cpu_vs = "-" if r.get("cpu_vs_plain") is None else f"{r['cpu_vs_plain']:.2f}x"
        of_peak = "-" if r.get("of_peak") is None else f"{100 * r['of_peak']:.0f}%"
        print(f"| {r['method']} | {r['s_per_it']:.4f} | {r['it_per_s']:.3f} | "
              f"{r['tasks_per_s']:.1f} | {r['peak_mb']:.0f} | {vs} | "
              f"{'-' if norm is None else f'{norm:.3f}'} | {gd} | {r['cpu_s_per_it']:.3f} | "
              f"{cpu_vs} | {of_peak} |")
    if anchors:
        dev = header["device_type"]
        print(f"anchors ({ANCHOR_MACHINE[dev]}, REFERENCES.md, s/it): " +
              ", ".join(f"{k} {v}" for k, v in anchors.items()) +
              f"; best {best}; 1.5x the best = {best / 1.5:.3f} norm. s/it")
        if floor and res.get("plain_s_per_it"):
            # the goal in this machine's seconds, and the share of the matmul peak it takes
            goal = best / 1.5 * res["plain_s_per_it"] / anchors["plain loop"]
            print(f"1.5x the best anchor is {goal:.3f} s/it on this machine: it needs "
                  f"{100 * floor['s_per_it'] / goal:.0f}% of the matmul peak sustained over "
                  "the whole meta-iteration")
    for r in res["rows"]:
        if r.get("amp_grad_diff") is not None:
            print(f"{r['method']}: meta-gradient under autocast {header['autocast']} (timed "
                  f"above) vs the float64 plain loop: max rel diff {r['amp_grad_diff']:.1e}, "
                  f"|g - g64| / |g64| {r['amp_grad_norm_diff']:.1e} (float32 without "
                  f"autocast: max rel diff {r['fp32_grad_diff']:.1e})")
        if r.get("compile_inner"):
            print(f"{r['method']}: first warm-up iteration (compiles the inner step) "
                  f"{r['first_iteration_s']:.1f} s")
        if r.get("graph_vs_eager") is not None:
            print(f"{r['method']}: CUDA graph (metattn.recipe.CUDAGraphStep) vs eager, parameter "
                  f"updates after 4 meta-steps: max rel diff {r['graph_vs_eager']:.1e} (the "
                  "fp64 gradient check above is of the eager path)")
    if res["skipped"]:
        print(f"skipped (not importable): {res['skipped']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--tf32", default="off", choices=["on", "off"])
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of {METHODS} (plain runs too, first: it is the reference)")
    p.add_argument("--meta-batch", type=int, default=None, help="override (quick runs)")
    p.add_argument("--chunk-size", type=int, default=None, help="metattn vmap chunk_size")
    p.add_argument("--checkpoint", action="store_true",
                   help="metattn: checkpoint each inner step (memory does not grow with steps)")
    p.add_argument("--check-finite", default="on", choices=["on", "off"],
                   help="metattn: MAML's per-step NaN check (a device sync on GPUs)")
    p.add_argument("--channels-last", action="store_true",
                   help="metattn's loop method on conv4: Conv4(channels_last=True), NHWC")
    p.add_argument("--no-fold", action="store_true",
                   help="metattn's Conv4 runs its textbook first block too (no folded matmul)")
    p.add_argument("--task-threads", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="metattn's per-task loop on the CPU: MAML(task_threads=N or auto), "
                        "N tasks at a time, one intra-op thread each")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"],
                   help="metattn: run the meta-loss under torch.autocast")
    p.add_argument("--cuda-graph", action="store_true",
                   help="metattn on CUDA: capture the whole meta-step (inner loop, double "
                        "backward, Adam capturable) in one CUDA graph and replay it")
    p.add_argument("--compile-inner", action="store_true",
                   help="metattn: MAML(compile_inner=True), each inner step of the per-task "
                        "loop through torch.compile (compiled in the first warm-up iteration)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler tables of metattn's methods after the timing")
    p.add_argument("--no-plain", action="store_true",
                   help="skip the plain-loop reference (no ratios, no gradient check)")
    p.add_argument("--check-tasks", type=int, default=4,
                   help="tasks in the float64 gradient check (0 = skip it)")
    p.add_argument("--malloc", default="tuned", choices=["tuned", "default"],
                   help="CPU: metattn.allocator.tune_cpu_allocator() for every method alike "
                        "(no page-fault storm on each iteration's large tensors)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the compute floor (FLOPs counted on the plain loop / the "
                        "measured matmul peak)")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown {m!r}; choose from {METHODS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "default"
    if args.malloc == "tuned":
        from metattn.allocator import tune_cpu_allocator

        malloc = "tuned" if tune_cpu_allocator() else "default (tuning unavailable)"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    tf32 = args.tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    header = {"device": device_name(device), "device_type": device.type,
              "torch": torch.__version__, "dtype": args.dtype, "tf32": args.tf32,
              "check_finite": args.check_finite, "autocast": args.autocast,
              "channels_last": args.channels_last, "fold_first_norm": not args.no_fold,
              "task_threads": args.task_threads, "compile_inner": args.compile_inner,
              "cuda_graph": bool(args.cuda_graph and device.type == "cuda"),
              "iters": args.iters, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "python": platform.python_version(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "malloc": malloc}
    results = []
    for wl in (list(WORKLOADS) if args.workload == "all" else [args.workload]):
        res = run_workload(wl, args, device, dtype)
        print_table(res, header)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
