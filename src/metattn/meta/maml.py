"""The MAML family as ONE inner loop over parameter dicts.

theta' = theta - alpha * grad_theta L_support(theta)   (repeated ``inner_steps`` times)
meta-loss = mean over tasks of L_query(theta')

The inner loop is a pure function of a parameter dict (``torch.func.functional_call`` +
``torch.func.grad``), so any ``nn.Module`` works unchanged and nothing is monkey-patched.
``torch.func.grad`` keeps the graph of the gradient it returns, so the outer backward goes
THROUGH the update (second order) unless ``first_order`` detaches it.

Options of this one loop give the family:

* MAML: ``first_order=False`` (exact second order).
* first-order MAML: ``first_order=True``.
* ANIL: ``adapt=["head"]`` adapts only the named parameters (names or module prefixes).
* Meta-SGD: ``learn_inner_lr="per_param"`` learns an inner rate per parameter element.
* MAML++: ``learn_inner_lr="per_layer_step"`` (LSLR: a rate per tensor per step),
  ``msl_steps`` (multi-step loss with annealed weights), ``second_order_start`` (first order
  for the first outer steps, then second order).

Tasks are processed either vectorised (``torch.func.vmap`` over the task dimension) or in a
Python loop; both give the same numbers. ``vectorize="auto"`` picks vmap on CUDA, and on CPU
for every model without convolutions (see :meth:`MAML._use_vmap` for the measurements).
"""

from __future__ import annotations

import contextvars
import copy
import difflib
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, closing, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, InnerLoopError, TaskError
from metattn.meta.base import Learner, LossFn, accuracy, default_loss
from metattn.meta.norms import NormRewrite
from metattn.nn.attention import MultiHeadAttention, double_backward, recording, unhooked

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
               nn.LocalResponseNorm)
InnerLR = Literal["scalar", "per_param", "per_layer_step"]
Params = dict[str, torch.Tensor]


def _key(name: str) -> str:
    # ParameterDict keys may not contain "."
    return name.replace(".", "__")


def resolve_names(model: nn.Module, names: Sequence[str] | str | None) -> list[str]:
    """Parameter names selected by exact names or module prefixes (``"head"`` -> ``head.*``)."""
    all_names = [n for n, _ in model.named_parameters()]
    if names is None:
        return all_names
    if isinstance(names, str):
        names = [names]
    chosen: list[str] = []
    for want in names:
        hit = [n for n in all_names if n == want or n.startswith(want + ".")]
        if not hit:
            close = difflib.get_close_matches(want, all_names, n=3)
            prefixes = sorted({n.rsplit(".", 1)[0] for n in all_names if "." in n})
            hint = f"did you mean {close}? " if close else ""
            raise ConfigError(
                f"adapt: the model has no parameter or module named {want!r}; {hint}"
                f"parameters: {all_names[:12]}{' ...' if len(all_names) > 12 else ''}; "
                f"modules: {prefixes[:12]}"
            )
        chosen += [n for n in hit if n not in chosen]
    return chosen


class AdaptedModel:
    """A model with task-specific parameters: call it on query inputs.

    ``norm_rewrite``: run under :class:`NormRewrite` (batch statistics, running statistics
    untouched), as the inner loop that produced the parameters did."""

    def __init__(self, model: nn.Module, params: Params, buffers: Params,
                 norm_rewrite: bool = False):
        self.model = model
        self.params = params
        self.buffers = buffers
        self.norm_rewrite = norm_rewrite

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with NormRewrite(split_affine=False) if self.norm_rewrite else nullcontext():
            return functional_call(self.model, (self.params, self.buffers), (x,))


class MAML(Learner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017) and its family, in one inner loop.

    Args:
        model: any ``nn.Module`` mapping a set of inputs ``[N, ...]`` to outputs ``[N, ...]``.
        inner_lr: initial inner-loop learning rate alpha.
        inner_steps: gradient steps on the support set during meta-training.
        first_order: drop the second-order term (first-order MAML).
        adapt: parameter names or module prefixes to adapt (ANIL: ``["head"]``); None = all.
        learn_inner_lr: None (fixed alpha), ``"scalar"``, ``"per_param"`` (Meta-SGD) or
            ``"per_layer_step"`` (MAML++ LSLR).
        msl_steps: MAML++ multi-step loss: anneal the per-step query-loss weights towards the
            final step over this many outer steps (0 = only the final step's loss).
        second_order_start: MAML++ derivative-order annealing: outer steps before this one are
            first order.
        eval_inner_steps: inner steps used by ``evaluate``/``adapt`` (default ``inner_steps``).
        vectorize: ``True`` (vmap over tasks), ``False`` (loop) or ``"auto"`` (measured choice).
        chunk_size: vmap this many tasks at a time; None = all at once. In training (with
            ``per_task_backward``) each chunk's meta-gradient is taken right after its inner
            loops and its graph freed before the next chunk, so the peak memory is that of
            one chunk; in evaluation it bounds vmap's temporaries. (A vmap chunked in the
            forward alone did not lower the training peak: on an H100, Conv-4 meta-batch 32,
            2.8 GB either way.) ``checkpoint`` also bounds the inner loop's memory.
        checkpoint: recompute each inner step's graph during the outer backward instead of
            storing it (second order, with gradients enabled): the inner loop's memory then
            stays flat in ``inner_steps`` (only each step's parameters are kept), for about
            one more support forward and backward per step. Same meta-gradient.
        per_task_backward: in the loop (``vectorize=False``), back-propagate each task's query
            loss as soon as its inner loop is done (inside ``meta_loss``), so only ONE task's
            graph is alive at a time (memory independent of the meta-batch size; the default);
            under vmap with ``chunk_size``, each chunk's.
            The returned meta-loss carries the summed meta-gradient: ``backward`` works as
            usual (scaling, adding other losses, DDP), but it cannot be differentiated again
            (``create_graph=True``); set False for that.
        task_threads: on the CPU, run the per-task loop (``vectorize=False`` with
            ``per_task_backward``) on this many threads, each task on ONE intra-op thread
            (each task's inner loop, query pass and meta-gradient on its own thread; the
            meta-gradients are summed in task order, so a run gives the same numbers as the
            loop on one thread, on any machine). Small convolutions and norms use two cores
            better as two tasks than as one task split in two: Conv-4, meta-batch 32, 2 cores,
            see README.md. ``"auto"``: ``torch.get_num_threads()``, or 1 for a model with
            active dropout (its random draws would depend on thread timing, so seeded runs
            would not repeat); 1 (the default) = off. Opt-in, since the workers run
            structural copies of the model (``copy.deepcopy`` of the modules, sharing the
            parameter tensors): a model that cannot be deep-copied is refused, hooks that
            are bound methods of other objects fire on copies of those objects, and random
            ops other than dropout draw in a thread-dependent order.
        compile_inner: ``torch.compile`` each inner step of the per-task loop (the support
            forward, its gradient by ``torch.func.grad`` and the update, as one function;
            ``True``, or a dict of ``torch.compile`` options). torch.compile has no double
            backward, but none is needed: the compiled step computes the first derivative
            in its forward, and the outer backward differentiates that compiled function once
            (AOTAutograd), so second-order MAML runs on fused kernels with the same
            meta-gradient (tested in float64). Training only (evaluation adapts eagerly), the
            loop path only (``vectorize=False`` or ``"auto"``, which then picks the loop),
            not with ``checkpoint`` or BatchNorm running statistics. The first call compiles
            (about a minute for the throughput benchmark's Transformer on 2 CPU cores); new
            episode shapes and model structures compile again (learners of one structure
            share a graph; past torch's recompile limit, 8 per process, steps run eagerly,
            as do models with module hooks, which compiled graphs would skip).
            Measured on that Transformer: 380 -> 305 ms per task on one CPU thread
            (README.md). Needs a C++ compiler on the CPU.
        loss_fn: default loss; None = cross-entropy for classification batches, else MSE.
        check_finite: raise :class:`InnerLoopError` when an inner loss is NaN/inf.

    Normalisation layers: inside the inner loop BatchNorm in training mode uses batch statistics
    and does not update its running statistics (see :mod:`metattn.meta.norms`). Models are
    recognised as having norm layers by their ``torch.nn`` norm modules; a module that calls
    ``F.batch_norm``/``F.layer_norm`` directly without one should set ``has_norms=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        first_order: bool = False,
        adapt: Sequence[str] | str | None = None,
        learn_inner_lr: InnerLR | None = None,
        msl_steps: int = 0,
        second_order_start: int = 0,
        eval_inner_steps: int | None = None,
        vectorize: bool | Literal["auto"] = "auto",
        chunk_size: int | None = None,
        loss_fn: LossFn | None = None,
        check_finite: bool = True,
        has_norms: bool | None = None,
        checkpoint: bool = False,
        per_task_backward: bool = True,
        task_threads: int | Literal["auto"] = 1,
        compile_inner: bool | dict[str, Any] = False,
    ):
        super().__init__()
        if inner_steps < 0:
            raise ConfigError(f"MAML: inner_steps={inner_steps}; it must be >= 0")
        if learn_inner_lr not in (None, "scalar", "per_param", "per_layer_step"):
            raise ConfigError(
                f"MAML: learn_inner_lr={learn_inner_lr!r}; choose None, 'scalar', "
                "'per_param' (Meta-SGD) or 'per_layer_step' (MAML++)"
            )
        if vectorize not in (True, False, "auto"):
            raise ConfigError(f"MAML: vectorize={vectorize!r}; choose True, False or 'auto'")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.adapt_names = resolve_names(model, adapt)
        self.learn_inner_lr = learn_inner_lr
        self.msl_steps = int(msl_steps)
        self.second_order_start = int(second_order_start)
        self.eval_inner_steps = int(eval_inner_steps if eval_inner_steps is not None
                                    else inner_steps)
        for key, value in (("inner_steps", self.inner_steps),
                           ("eval_inner_steps", self.eval_inner_steps)):
            if value < 0:
                raise ConfigError(f"MAML: {key}={value}; it must be >= 0")
        if adapt is not None and not self.adapt_names:
            raise ConfigError("MAML: adapt=[] names no parameter to adapt; name some (ANIL: "
                              "['head']) or leave adapt unset to adapt all")
        self.vectorize = vectorize
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"MAML: chunk_size={chunk_size}; use a number of tasks >= 1, or "
                              "None for all at once")
        self.chunk_size = chunk_size
        self.checkpoint = bool(checkpoint)
        self.per_task_backward = bool(per_task_backward)
        if task_threads != "auto" and not (isinstance(task_threads, int) and task_threads >= 1):
            raise ConfigError(f"MAML: task_threads={task_threads!r}; use a number of threads "
                              ">= 1 (1 = off) or 'auto'")
        self.task_threads = task_threads
        if not isinstance(compile_inner, (bool, dict)):
            raise ConfigError(f"MAML: compile_inner={compile_inner!r}; use true/false or a dict "
                              "of torch.compile options, e.g. {'mode': 'max-autotune'}")
        self.compile_inner = compile_inner
        if compile_inner is not False:
            if vectorize is True:
                raise ConfigError("MAML: compile_inner compiles the per-task loop's inner step; "
                                  "use vectorize=False or 'auto' (which then picks the loop)")
            if checkpoint:
                raise ConfigError("MAML: compile_inner with checkpoint=True is not supported "
                                  "(the recomputed steps run eagerly); drop one of them")
        self.loss_fn = loss_fn
        self.check_finite = check_finite
        params = dict(model.named_parameters())
        # The norm rewrite costs a Python call per op: enter it only for models with norms.
        self._declared_norms = bool(has_norms)
        self._has_norms = has_norms if has_norms is not None else any(
            isinstance(mod, _NORM_TYPES) for mod in model.modules())
        self._has_conv = any(isinstance(mod, nn.modules.conv._ConvNd) for mod in model.modules())
        self._has_attention = any(isinstance(mod, (MultiHeadAttention, nn.MultiheadAttention))
                                  for mod in model.modules())
        if compile_inner is not False and self._needs_rewrite(False):
            raise ConfigError(
                "MAML: compile_inner cannot trace the inner loop's norm rewrite, which this "
                "model needs (BatchNorm with running statistics, or has_norms=True); build the "
                "norms with track_running_stats=False or set compile_inner=False")
        self.inner_lrs = nn.ParameterDict()
        if learn_inner_lr == "scalar":
            self.inner_lrs["all"] = nn.Parameter(torch.tensor(self.inner_lr))
        elif learn_inner_lr == "per_param":
            for n in self.adapt_names:
                self.inner_lrs[_key(n)] = nn.Parameter(torch.full_like(params[n], self.inner_lr))
        elif learn_inner_lr == "per_layer_step":
            for n in self.adapt_names:
                self.inner_lrs[_key(n)] = nn.Parameter(
                    torch.full((max(self.inner_steps, 1),), self.inner_lr,
                               dtype=params[n].dtype, device=params[n].device)
                )

    # ------------------------------------------------------------------ pieces
    def _lr(self, name: str, step: int, rates: Params | None = None) -> torch.Tensor | float:
        mode = self.learn_inner_lr
        if mode is None:
            return self.inner_lr
        rates = self.inner_lrs if rates is None else rates
        if mode == "scalar":
            return rates["all"]
        lr = rates[_key(name)]
        if mode == "per_layer_step":
            return lr[min(step, lr.shape[0] - 1)]
        return lr

    def _split_params(self) -> tuple[Params, Params, Params]:
        adapt = set(self.adapt_names)
        fast, slow = {}, {}
        for n, p in self.model.named_parameters():
            # a frozen parameter (requires_grad=False) is neither meta-trained nor adapted
            (fast if n in adapt and p.requires_grad else slow)[n] = p
        # BatchNorm's forward counts batches in place before any norm function runs; a copy
        # keeps the module's counter out of MAML's inner loops (whose passes it never saw)
        buffers = {n: b.clone() if n.endswith("num_batches_tracked") else b
                   for n, b in self.model.named_buffers()}
        return fast, slow, buffers

    def _needs_rewrite(self, vectorized: bool) -> bool:
        """Whether the inner loop must run under :class:`NormRewrite`. Under vmap: any norm
        (affine split). In the loop it only drops running-stat updates, so models whose norms
        keep no running statistics (LayerNorm, Conv4's BatchNorm) skip its per-op Python call."""
        if not self._has_norms:
            return False
        if vectorized or self._declared_norms:
            return True
        return any(isinstance(mod, nn.modules.batchnorm._NormBase)
                   and getattr(mod, "running_mean", None) is not None
                   for mod in self.model.modules())

    def _use_vmap(self, device: torch.device, loop_threads: int = 1) -> bool:
        """vmap or loop. ``auto``, by measurement (torch 2.13, meta-batches of the issue's
        workloads): on CUDA vmap wins by 10x+; on 2 CPU cores vmap wins for MLPs (7x, sinusoid)
        but the loop wins for conv nets (2.5x, Conv-4), whose batched convolutions have no fast
        CPU path under vmap, and for Transformers when ``task_threads`` runs it on several
        threads (the issue's transformer: 3.55 against vmap's 3.87 s/it, and 3.22 against 3.55
        in another run; with one task thread on 2 intra-op threads vmap wins, 3.62 against 4.68).
        ``loop_threads``: the task threads this call's loop would run on (more than one only
        when training task by task, not checkpointed, with 2+ tasks)."""
        if recording():  # recorded attention weights cannot leave a vmap
            return False
        if self.compile_inner is not False and torch.is_grad_enabled():
            return False  # the compiled step is the loop's (evaluation adapts eagerly)
        if self.vectorize == "auto":
            if device.type == "cuda":
                return True
            return not (self._has_conv or (self._has_attention and loop_threads > 1))
        return bool(self.vectorize)

    def msl_weights(self, steps: int, step: int | None) -> list[float]:
        """Per-inner-step weights of the query loss (MAML++ multi-step loss).

        Starts uniform (1/N each) and moves linearly over ``msl_steps`` outer steps to the
        final step, keeping non-final weights at least 0.03/N (Antoniou et al. 2019); from
        outer step ``msl_steps`` on, the final step's loss alone.
        """
        if self.msl_steps <= 0 or steps <= 1 or step is None or step >= self.msl_steps:
            # after the annealing, the final step alone (as in the MAML++ reference code)
            return [0.0] * (steps - 1) + [1.0]
        p = min(step / self.msl_steps, 1.0)
        n = steps
        floor = 0.03 / n
        nonfinal = max(1.0 / n - p / n, floor)
        final = min(1.0 / n + p * (n - 1) / n, 1.0 - (n - 1) * floor)
        return [nonfinal] * (n - 1) + [final]

    def _task_fn(
        self,
        fast: Params,
        slow: Params,
        buffers: Params,
        loss_fn: LossFn,
        steps: int,
        first_order: bool,
        record: Sequence[int],
        model: nn.Module | None = None,
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The per-task computation of the loop path: adapt on the support set, measure on the
        query set.

        Returns ``f(sx, sy, qx, qy) -> (support_losses [steps], query_losses [len(record)],
        query_outputs [len(record), Q, ...])`` where ``record`` lists the inner steps
        (0 = before adaptation) at which the query set is measured. The inner gradient is
        ``torch.autograd.grad`` with ``create_graph`` set by ``first_order`` (measured ~35%
        faster on CPU than ``torch.func.grad`` for Conv-4). The vectorised path is
        :meth:`_run_batched`.
        """
        model = self.model if model is None else model
        # the compiled step (training only; recorded attention needs the eager modules)
        compiled = (self._compiled_step(loss_fn, first_order)
                    if self.compile_inner is not False and torch.is_grad_enabled()
                    and not recording() else None)

        # Buffers are passed as an argument (not captured): modules may update them in place
        # (BatchNorm's num_batches_tracked).
        def support_loss(p: Params, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(model, (p, slow, buffers), (sx,)), sy)

        def f(sx, sy, qx, qy):
            p = fast
            if not torch.is_grad_enabled():
                # evaluation: adapt detached copies, without an outer graph
                p = {k: v.detach().requires_grad_() for k, v in p.items()}
            s_losses, q_losses, q_outs = [], [], []

            def measure() -> None:
                out = functional_call(model, (p, slow, buffers), (qx,))
                q_outs.append(out)
                q_losses.append(loss_fn(out, qy))

            if 0 in record:
                measure()
            for i in range(steps):
                out = None if compiled is None else compiled(
                    p, slow, buffers, {k: self._lr(k, i) for k in p}, sx, sy, model)
                if out is not None:
                    p, loss = out
                else:  # eager (also where torch.compile gave up on the step: see _CompiledStep)
                    with torch.enable_grad():
                        loss = support_loss(p, sx, sy)
                        names = list(p)
                        gs = torch.autograd.grad(loss, [p[k] for k in names],
                                                 allow_unused=True, create_graph=not first_order)
                        p = {k: p[k] if g is None else p[k] - self._lr(k, i) * g
                             for k, g in zip(names, gs, strict=True)}
                s_losses.append(loss.detach() if first_order else loss)
                if i + 1 in record:
                    measure()
            s = torch.stack(s_losses) if s_losses else qx.new_zeros(0)
            return s, torch.stack(q_losses), torch.stack(q_outs)

        return f

    def _compiled_step(self, loss_fn: LossFn, first_order: bool) -> _CompiledStep:
        """The inner step ``(p, slow, buffers, rates, sx, sy) -> (p', support loss)`` under
        ``torch.compile``, one per loss function and order, kept for the learner's life. It
        always runs ``self.model`` (never a task thread's replica): compiled code takes the
        parameters as inputs and leaves the module alone, and one module object keeps one
        compiled graph."""
        cache = _COMPILED.setdefault(self, {})
        key = (loss_fn, first_order)
        if key not in cache:
            seen = {fn for fn, _ in cache}
            if loss_fn not in seen and len(seen) >= 8:
                raise ConfigError(
                    f"MAML(compile_inner=...): meta_loss has seen {len(seen) + 1} different "
                    "loss functions, each compiled anew; pass the same function object each "
                    "time (not a lambda made per call) or set compile_inner=False")
            model = self.model

            def step(p: Params, slow: Params, buffers: Params, rates: dict[str, Any],
                     sx: torch.Tensor, sy: torch.Tensor) -> tuple[Params, torch.Tensor]:
                if not torch.compiler.is_compiling():
                    # torch.compile gave up on this call (its recompile limit): the caller
                    # steps eagerly instead, on its own thread's replica of the model
                    raise _NotCompiled

                def support_loss(p_: Params) -> torch.Tensor:
                    return loss_fn(functional_call(model, (p_, slow, buffers), (sx,)), sy)

                g, loss = grad_and_value(support_loss)(p)
                if first_order:
                    g = {k: v.detach() for k, v in g.items()}
                return {k: p[k] - rates[k] * g[k] for k in p}, loss

            # fullgraph: a graph break would run part of the step eagerly on the shared module
            options = {"dynamic": False, "fullgraph": True}
            if isinstance(self.compile_inner, dict):
                options.update(self.compile_inner)
            cache[key] = _CompiledStep(torch.compile(step, **options), model, loss_fn)
        return cache[key]

    def _run(
        self,
        batch: TaskBatch,
        loss_fn: LossFn,
        steps: int,
        first_order: bool,
        record: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the inner loop on every task; outputs have a leading task dimension.

        With ``weights`` (the query-loss weight of each recorded step) the loop path may
        back-propagate task by task (``per_task_backward``): it then also returns the
        meta-loss, else None (the caller builds it from the query losses)."""
        split = self._split_params()
        fast, slow, buffers = split
        ckpt = self.checkpoint and not first_order and steps > 0 and torch.is_grad_enabled()
        # Task-by-task backward frees each task's graph, so it needs inputs without a graph of
        # their own (a trainable encoder outside ``model`` would be shared by all tasks).
        inputs_have_graph = any(t.requires_grad for t in (batch.support_x, batch.support_y,
                                                         batch.query_x, batch.query_y))
        backward_each = (weights is not None and self.per_task_backward
                         and torch.is_grad_enabled() and not inputs_have_graph)
        # the loop runs on task threads only task by task and not checkpointed (never more
        # threads than tasks: idle workers would only take the caller's threads)
        loop_threads = (min(self._threads(batch.support_x.device), batch.num_tasks)
                        if backward_each and not ckpt else 1)
        use_vmap = self._use_vmap(batch.support_x.device, loop_threads)
        f = self._task_fn(fast, slow, buffers, loss_fn, steps, first_order, record)
        args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        # The math attention path is needed for a second derivative, and under vmap
        # (the fused CPU kernels have no batching rule: vmap would loop over them).
        need_math = use_vmap or (not first_order and steps > 0 and torch.is_grad_enabled())

        def contexts() -> ExitStack:
            stack = ExitStack()
            if need_math:
                stack.enter_context(double_backward())
            if self._needs_rewrite(use_vmap):
                stack.enter_context(NormRewrite(split_affine=use_vmap))
            return stack

        taskwise = backward_each and not use_vmap
        cs = self.chunk_size
        chunkwise = backward_each and use_vmap and cs is not None and cs < batch.num_tasks
        loss = None

        def one_chunk(c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            part = batch.slice(c * cs, min((c + 1) * cs, batch.num_tasks))
            if ckpt:
                return self._run_checkpointed(part, loss_fn, steps, record, True, contexts,
                                              split)
            return self._run_batched(part, loss_fn, steps, first_order, record, split)

        threads = loop_threads if taskwise else 1

        def one_task(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if ckpt:
                s_, q_, o_ = self._run_checkpointed(batch.slice(t, t + 1), loss_fn, steps,
                                                    record, False, contexts, split)
                return s_[0], q_[0], o_[0]
            fn = f
            if threads > 1:  # this worker thread's replica of the model
                fn = self._task_fn(fast, slow, buffers, loss_fn, steps, first_order, record,
                                   model=_WORKER.model)
            return fn(*(a[t] for a in args))

        run_units = None
        if threads > 1:
            def run_units(unit, n):  # noqa: E306
                return self._in_threads(unit, n, threads, contexts)

        with contexts():
            if taskwise:
                s, q, o, loss = self._taskwise(one_task, batch.num_tasks, weights,
                                               run_units=run_units)
            elif chunkwise:
                s, q, o, loss = self._taskwise(one_chunk, -(-batch.num_tasks // cs), weights,
                                               num_tasks=batch.num_tasks)
            elif ckpt:
                s, q, o = self._run_checkpointed(batch, loss_fn, steps, record, use_vmap,
                                                 contexts, split)
            elif use_vmap:
                s, q, o = self._run_batched(batch, loss_fn, steps, first_order, record, split)
            else:
                outs = [f(*(a[t] for a in args)) for t in range(batch.num_tasks)]
                s, q, o = (torch.stack(z) for z in zip(*outs, strict=True))
        # Training stops on a non-finite inner loss; evaluation (no grad) reports it instead:
        # a diverged test task is a result (counted as such by the recipe), not a crash.
        if self.check_finite and torch.is_grad_enabled():
            self._check_finite(s, q, record)
        return s, q, o, loss

    def _run_batched(
        self,
        batch: TaskBatch,
        loss_fn: LossFn,
        steps: int,
        first_order: bool,
        record: Sequence[int],
        split: tuple[Params, Params, Params],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All tasks at once: vmap over the tasks for the FORWARD passes only, inner gradients
        by ordinary autograd.

        Each task gets its own copy of the fast weights (``p.expand(T, ...)``, a view, no
        memory); the batched support loss is ``[T]`` and task t's loss depends only on copy t,
        so ``autograd.grad(sum of losses, copies)`` is exactly the stack of per-task gradients.
        Same maths as ``vmap(torch.func.grad(...))`` over the whole inner loop, without
        functorch's nested grad level: measured 1.3-1.5x faster per meta-step on CPU (the
        sinusoid MLP: 10.6 -> 7.2 ms) and the double backward is plain autograd.
        ``split``: the (fast, slow, buffers) dicts of :meth:`_split_params`.
        """
        fast, slow, buffers = split
        model, T = self.model, batch.num_tasks
        train = torch.is_grad_enabled()
        create_graph = train and not first_order

        def task_out(p: Params, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(model, (p, slow, buffers), (x,))
            return out, loss_fn(out, y)

        batched = vmap(task_out, randomness="different", chunk_size=self.chunk_size)
        names = list(fast)
        s_losses, q_losses, q_outs = [], [], []

        def measure(p: Params) -> None:
            with torch.set_grad_enabled(train):
                out, loss = batched(p, batch.query_x, batch.query_y)
            q_outs.append(out if train else out.detach())
            q_losses.append(loss if train else loss.detach())

        # Gradients are needed in the inner loop even in evaluation (under no_grad), so the
        # copies and their updates are built with grad enabled; evaluation starts from
        # detached copies and cuts each step's graph, so no outer graph is kept.
        with torch.enable_grad():
            if train:
                p = {k: v.unsqueeze(0).expand(T, *v.shape) for k, v in fast.items()}
            else:
                p = {k: v.detach().requires_grad_().unsqueeze(0).expand(T, *v.shape)
                     for k, v in fast.items()}
            if 0 in record:
                measure(p)
            for i in range(steps):
                _, loss = batched(p, batch.support_x, batch.support_y)
                gs = torch.autograd.grad(loss.sum(), [p[k] for k in names], allow_unused=True,
                                         create_graph=create_graph)
                new = {}
                for k, g in zip(names, gs, strict=True):
                    new[k] = p[k] if g is None else p[k] - self._lr(k, i) * g
                    if not train:
                        new[k] = new[k].detach().requires_grad_()
                p = new
                s_losses.append(loss if create_graph else loss.detach())
                if i + 1 in record:
                    measure(p)
        s = torch.stack(s_losses, 1) if s_losses else batch.query_x.new_zeros(T, 0)
        return s, torch.stack(q_losses, 1), torch.stack(q_outs, 1)

    def _threads(self, device: torch.device) -> int:
        """How many threads the per-task loop runs on (``task_threads``; CPU only, and not
        while attention is recorded: the records must come in task order)."""
        if device.type != "cpu" or recording():
            return 1
        if self.task_threads == "auto":
            # random ops would draw from the shared generator in a thread-dependent order:
            # auto keeps such models on one thread, so a seeded run stays reproducible
            return 1 if _draws_random_numbers(self.model) else max(1, torch.get_num_threads())
        return int(self.task_threads)

    def _in_threads(self, unit: Callable[[int], Any], n: int, threads: int,
                    contexts: Callable[[], ExitStack]) -> Iterator[Any]:
        """``unit(0..n-1)`` on ``threads`` worker threads (one intra-op thread each), yielded
        in unit order. Each worker gets the caller's grad mode, autocast, context variables
        (attention recording, the double-backward flag) and ``contexts()`` (the thread-local
        norm rewrite), and its own structural replica of the model: the module objects are
        copied, their parameters and buffers are the model's own tensors (functional_call
        swaps a module's tensors while it runs, so one module cannot serve two threads; made
        per call, about 1 ms each, so they follow the model's current mode and attributes)."""
        shared = {id(t): t for t in list(self.model.parameters()) + list(self.model.buffers())}
        try:
            free = [copy.deepcopy(self.model, dict(shared)) for _ in range(threads)]
        except Exception as err:  # noqa: BLE001  (any module state deepcopy cannot copy)
            raise ConfigError(f"MAML(task_threads={self.task_threads!r}): the model cannot be "
                              f"replicated for the worker threads ({err}); use task_threads=1"
                              ) from err
        lock = threading.Lock()
        grad = torch.is_grad_enabled()
        amp = torch.is_autocast_enabled("cpu")
        amp_dtype = torch.get_autocast_dtype("cpu")

        def job(t: int) -> Any:
            with lock:
                _WORKER.model = free.pop()
            try:
                with torch.set_grad_enabled(grad), \
                        torch.autocast("cpu", dtype=amp_dtype, enabled=amp), contexts():
                    return unit(t)
            finally:
                with lock:
                    free.append(_WORKER.model)
                _WORKER.model = None

        # the caller's own ops meanwhile (summing the gradients) on one thread: its OpenMP
        # team would otherwise wake for each of them and spin on the workers' cores; each
        # worker gets an equal share of the caller's threads (one each on 2 cores)
        caller_threads = torch.get_num_threads()
        pool = _pool(threads, max(1, caller_threads // threads))
        # at most 2 units per worker in flight: a finished unit holds a whole meta-gradient,
        # so the memory stays a few tasks' worth, as in the one-thread loop
        pending: deque[Future] = deque()
        submitted = 0

        def submit_upto(limit: int) -> None:
            nonlocal submitted
            while submitted < min(n, limit):
                pending.append(pool.submit(contextvars.copy_context().run, job, submitted))
                submitted += 1

        torch.set_num_threads(1)
        try:
            submit_upto(2 * threads)
            done = 0
            while pending:
                result = pending.popleft().result()
                done += 1
                submit_upto(done + 2 * threads)
                yield result
                del result
        finally:
            for fut in pending:  # on an error: drop the queued units, wait for running ones
                fut.cancel()
            wait(list(pending))
            pending.clear()
            torch.set_num_threads(caller_threads)

    @staticmethod
    def _taskwise(one_task: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  num_units: int, weights: Sequence[float], num_tasks: int | None = None,
                  run_units: Callable[[Callable[[int], Any], int], Iterable[Any]] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-task backward: the meta-gradient of each task's weighted query loss is taken
        right after its inner loop, and the task's graph is freed before the next task.

        With ``num_tasks`` set, each unit is a CHUNK of tasks (outputs with a leading task
        dimension, concatenated), of ``num_tasks`` in all. ``run_units(unit, n)`` yields
        ``unit(0..n-1)`` in order (default: one after the other; :meth:`_in_threads`); the
        sums run here, in unit order, so they do not depend on how the units were run."""
        chunks = num_tasks is not None
        num_tasks = num_tasks if chunks else num_units

        def unit(t: int) -> tuple:
            s_t, q_t, o_t = one_task(t)
            loss_t = _weighted(q_t, weights).sum() / num_tasks
            mine = _graph_leaves(loss_t)
            gs: Sequence[torch.Tensor | None] = ()
            if mine:
                # a backward, so outside any autocast region (as loss.backward() would be)
                with torch.autocast(q_t.device.type, enabled=False):
                    gs = torch.autograd.grad(loss_t, mine, allow_unused=True)
            return s_t.detach(), q_t.detach(), o_t.detach(), loss_t.detach(), mine, gs

        # The leaves are collected task by task: a model with data-dependent branches may reach
        # a parameter in one task's graph and not in another's.
        leaves: list[torch.Tensor] = []
        where: dict[int, int] = {}
        total: list[torch.Tensor | None] = []
        value = None
        outs = []
        results = (unit(t) for t in range(num_units)) if run_units is None \
            else run_units(unit, num_units)
        # closing: an error while summing ends the runner at once (its threads restored), not
        # whenever the traceback lets the generator go
        with closing(results):
            for s_t, q_t, o_t, loss_t, mine, gs in results:
                for leaf in mine:
                    if id(leaf) not in where:
                        where[id(leaf)] = len(leaves)
                        leaves.append(leaf)
                        total.append(None)
                for leaf, g in zip(mine, gs, strict=True):
                    i = where[id(leaf)]
                    if g is not None:
                        total[i] = g if total[i] is None else total[i] + g
                value = loss_t if value is None else value + loss_t
                outs.append((s_t, q_t, o_t))
        join = torch.cat if chunks else torch.stack
        s, q, o = (join(z) for z in zip(*outs, strict=True))
        loss = _PerTaskMetaLoss.apply(value, tuple(total), *leaves) if leaves else value
        return s, q, o, loss

    def _run_checkpointed(
        self,
        batch: TaskBatch,
        loss_fn: LossFn,
        steps: int,
        record: Sequence[int],
        use_vmap: bool,
        contexts: Callable[[], ExitStack],
        split: tuple[Params, Params, Params],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Second-order inner loop with each step's graph recomputed in the backward.

        Each inner step is one :class:`_RecomputedStep` (a custom autograd function): its
        forward keeps only its inputs (the step's parameters), its backward re-runs the step
        with ``create_graph`` and back-propagates through it. Under vmap a step covers all
        tasks; in the loop, one task.
        """
        fast, slow, buffers = split
        model = self.model
        names, slow_names = list(fast), list(slow)
        rate_keys = list(self.inner_lrs.keys())
        n_fast, n_slow = len(names), len(slow_names)

        def task_step(i: int, create_graph: bool, sx, sy, p_vals, slow_vals, rate_vals):
            """One inner step of one task: (new fast parameters, support loss)."""
            sl = dict(zip(slow_names, slow_vals))
            rates = dict(zip(rate_keys, rate_vals))

            def support_loss(p_: Params, b_: Params = buffers) -> torch.Tensor:
                return loss_fn(functional_call(model, (p_, sl, b_), (sx,)), sy)

            if use_vmap:  # torch.func.grad ignores the outer grad mode
                p = dict(zip(names, p_vals))
                # buffers go in as an argument: a BatchNorm's in-place counter update on a
                # tensor captured from outside grad() is an error
                g, loss = grad_and_value(support_loss)(p, buffers)
                return tuple(p[k] - self._lr(k, i, rates) * g[k] for k in names), loss
            with torch.enable_grad():
                if not create_graph:
                    p_vals = tuple(v.detach().requires_grad_() for v in p_vals)
                p = dict(zip(names, p_vals))
                loss = support_loss(p)
                gs = torch.autograd.grad(loss, p_vals, allow_unused=True,
                                         create_graph=create_graph)
                g = {k: torch.zeros_like(p[k]) if gk is None else gk
                     for k, gk in zip(names, gs, strict=True)}
                return tuple(p[k] - self._lr(k, i, rates) * g[k] for k in names), loss

        def make_step(i: int, batched_params: bool):
            def step(create_graph, sx, sy, *tensors):
                p_vals = tensors[:n_fast]
                slow_vals = tensors[n_fast:n_fast + n_slow]
                rate_vals = tensors[n_fast + n_slow:]
                if not use_vmap:
                    return task_step(i, create_graph, sx, sy, p_vals, slow_vals, rate_vals)
                dims = (0, 0, 0 if batched_params else None, None, None)
                return vmap(lambda *a: task_step(i, create_graph, *a), in_dims=dims,
                            randomness="different", chunk_size=self.chunk_size
                            )(sx, sy, tuple(p_vals), tuple(slow_vals), tuple(rate_vals))
            return step

        def measure(p_vals, qx):
            p = dict(zip(names, p_vals))
            return functional_call(model, (p, slow, buffers), (qx,))

        slow_vals = tuple(slow.values())
        rate_vals = tuple(self.inner_lrs.values())
        if use_vmap:
            tasks = [(batch.support_x, batch.support_y, batch.query_x, batch.query_y)]
        else:
            tasks = [(batch.support_x[t], batch.support_y[t], batch.query_x[t],
                      batch.query_y[t]) for t in range(batch.num_tasks)]
        s_all, q_all, o_all = [], [], []
        for sx, sy, qx, qy in tasks:
            p_vals = tuple(fast.values())
            s_losses, q_losses, q_outs = [], [], []
            for i in range(steps):
                outs = _RecomputedStep.apply(make_step(i, use_vmap and i > 0), contexts,
                                             sx, sy, *p_vals, *slow_vals, *rate_vals)
                p_vals, loss = outs[:-1], outs[-1]
                s_losses.append(loss)
                if i + 1 in record:
                    if use_vmap:
                        out = vmap(measure, randomness="different")(p_vals, qx)
                        q_losses.append(vmap(loss_fn)(out, qy))
                    else:
                        out = measure(p_vals, qx)
                        q_losses.append(loss_fn(out, qy))
                    q_outs.append(out)
            dim = 1 if use_vmap else 0
            s_all.append(torch.stack(s_losses, dim))
            q_all.append(torch.stack(q_losses, dim))
            o_all.append(torch.stack(q_outs, dim))
        if use_vmap:
            return s_all[0], q_all[0], o_all[0]
        return torch.stack(s_all), torch.stack(q_all), torch.stack(o_all)

    def _check_finite(self, s: torch.Tensor, q: torch.Tensor, record: Sequence[int]) -> None:
        for name, losses, labels in (("support", s, None), ("query", q, record)):
            bad = ~torch.isfinite(losses.detach())
            if bool(bad.any()):
                task, idx = (int(i) for i in bad.nonzero()[0])
                step = idx if labels is None else labels[idx]
                raise InnerLoopError(
                    f"MAML inner loop: the {name} loss of task {task} is "
                    f"{float(losses[task, idx].detach())} at inner step {step} "
                    f"(inner_lr={self.inner_lr}, "
                    f"learn_inner_lr={self.learn_inner_lr}); lower inner_lr, check the task "
                    "inputs for NaN/inf, or normalise the targets"
                )

    # ------------------------------------------------------------------ contract
    def meta_loss(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Meta-loss over the batch (differentiable w.r.t. the model and learned rates).

        ``step`` is the outer step, used by the MAML++ schedules (multi-step loss weights and
        the first-to-second-order switch).
        """
        loss_fn = loss_fn or self.loss_fn or default_loss(batch)
        n = self.inner_steps
        first_order = self.first_order or (step is not None and step < self.second_order_start)
        weights = self.msl_weights(n, step)
        record = [i + 1 for i, w in enumerate(weights) if w > 0] if n > 0 else [0]
        w = [weights[r - 1] for r in record] if n > 0 else [1.0]
        with _shape_errors(batch):
            s, q, o, loss = self._run(batch, loss_fn, n, first_order, record, weights=w)
        if loss is None:
            loss = _weighted(q, w).mean()
        metrics = {"loss": q[:, -1].mean().detach()}
        if n > 0:
            metrics["support_loss"] = s[:, 0].mean().detach()
        if batch.n_way is not None:
            metrics["accuracy"] = accuracy(o[:, -1].detach(), batch.query_y).mean()
        return loss, metrics

    def evaluate(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, steps: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-task query metrics after ``steps`` inner steps (default ``eval_inner_steps``).

        Also returns ``loss_per_step`` ``[T, steps + 1]`` (column 0 = before adaptation) and,
        for classification, ``accuracy_per_step``.
        """
        loss_fn = loss_fn or self.loss_fn or default_loss(batch)
        steps = self.eval_inner_steps if steps is None else steps
        with torch.no_grad(), _shape_errors(batch):
            s, q, o, _ = self._run(batch, loss_fn, steps, True, list(range(steps + 1)))
        out = {"loss": q[:, -1], "loss_per_step": q}
        if batch.n_way is not None:
            acc = accuracy(o, batch.query_y.unsqueeze(1))
            out["accuracy"] = acc[:, -1]
            out["accuracy_per_step"] = acc
        return out

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        loss_fn: LossFn | None = None,
        steps: int | None = None,
    ) -> AdaptedModel:
        """Adapt to one task (no task dimension) and return the adapted model."""
        steps = self.eval_inner_steps if steps is None else steps
        batch = TaskBatch(support_x[None], support_y[None], support_x[None, :1],
                          support_y[None, :1])
        loss_fn = loss_fn or self.loss_fn or default_loss(
            None if support_y.dtype.is_floating_point else 0
        )
        fast, slow, buffers = self._split_params()
        p = {k: v.detach() for k, v in fast.items()}
        model = self.model

        def support_loss(p: Params, bufs: Params) -> torch.Tensor:
            return loss_fn(functional_call(model, (p, slow, bufs), (batch.support_x[0],)),
                           batch.support_y[0])

        rewrite = self._needs_rewrite(False)
        with torch.no_grad(), NormRewrite(split_affine=False) if rewrite else nullcontext():
            for i in range(steps):
                g, loss = grad_and_value(support_loss)(p, buffers)
                if self.check_finite and not torch.isfinite(loss):
                    raise InnerLoopError(
                        f"MAML.adapt: the support loss is {float(loss)} at inner step {i}; "
                        "lower inner_lr or check the support set for NaN/inf"
                    )
                p = {k: p[k] - self._lr(k, i) * g[k] for k in p}
        slow_d = {k: v.detach() for k, v in slow.items()}
        return AdaptedModel(model, {**slow_d, **p}, buffers, norm_rewrite=rewrite)


@contextmanager
def _shape_errors(batch: TaskBatch):
    """A shape error from inside the model (e.g. a model built for 2 input features on 1-d
    data) becomes a TaskError saying which batch and what to check; the original stays
    chained."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError on torch >= 2.5)
        raise
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        if not any(k in msg for k in ("size", "shape", "dimension", "mat1", "mat2")):
            raise
        raise TaskError(
            f"the model could not run on this batch (support_x {tuple(batch.support_x.shape)}, "
            f"support_y {tuple(batch.support_y.shape)}): {msg}; check that the model's input "
            "size (e.g. model.in_features) matches the data") from e


def _weighted(q: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Each task's query losses ``q[..., j]`` (one per recorded inner step) weighted and
    summed. Python-float weights: no host-to-device copy, so a CUDA graph can capture it."""
    return torch.stack([q[..., j] * wj for j, wj in enumerate(weights)], -1).sum(-1)


_WORKER = threading.local()  # the model replica of a task_threads worker
_COMPILE_LOCK = threading.Lock()


class _NotCompiled(Exception):
    """Raised by the compiled inner step when torch.compile ran it eagerly instead."""


class _CompiledStep:
    """A ``torch.compile``'d inner step that task threads may share.

    Dynamo compiles on a call with inputs it has not seen, and AOTAutograd compiles the
    step's backward at its first backward; compiling is not thread-safe (a call into compiled
    code while another thread traces is refused). So inputs of a new kind (the key below
    covers what dynamo guards on) first go through a throw-away call and backward (zero
    cotangents) that compile both, one thread at a time; the calls that count then run
    concurrently (compiled code does not touch the module). The same locked first call finds
    the parameters the support loss does not reach: the eager loop leaves them (and their
    learned rates) out of the update, and so does this. Returns None where torch.compile
    gave up (past its recompile limit): the caller then steps eagerly."""

    def __init__(self, fn: Callable[..., Any], model: nn.Module, loss_fn: LossFn):
        self.fn, self.model, self.loss_fn = fn, model, loss_fn
        self.unused: dict[tuple, frozenset[str]] = {}
        self.warned: set[str] = set()

    def _warn(self, why: str) -> None:
        if why not in self.warned:
            self.warned.add(why)
            warnings.warn(f"MAML(compile_inner=...): {why}", stacklevel=4)

    def _key(self, p: Params, slow: Params, buffers: Params, rates: dict[str, Any],
             sx: torch.Tensor, sy: torch.Tensor) -> tuple:
        """What dynamo's guards look at: the global state (grad mode, autocast, default dtype,
        this thread's thread count, deterministic flags), every input's metadata, the
        modules' plain attributes (``training``, a dropout's ``p``, a temperature; not
        closures or globals) and the fixed rates' values."""
        from torch._C._dynamo.guards import GlobalStateGuard

        def meta(t: torch.Tensor) -> tuple:
            return (t.dtype, t.device, tuple(t.shape), t.stride(), t.requires_grad)

        plain = (int, float, bool, str, type(None))
        return (GlobalStateGuard().__getstate__(), meta(sx), meta(sy),
                tuple(tuple((k, v) for k, v in vars(m).items() if isinstance(v, plain))
                      for m in self.model.modules()),
                tuple(meta(v) for d in (p, slow, buffers) for v in d.values()),
                tuple(r if isinstance(r, float) else meta(r) for r in rates.values()))

    def __call__(self, p: Params, slow: Params, buffers: Params, rates: dict[str, Any],
                 sx: torch.Tensor, sy: torch.Tensor, eager_model: nn.Module
                 ) -> tuple[Params, torch.Tensor] | None:
        """One inner step; ``eager_model`` (the caller's model or its thread's replica) runs
        the first call's eager check, so the shared module is never swapped."""
        if not unhooked(*self.model.modules()):
            # dynamo does not guard on module hooks: a graph traced without them would skip
            # them, so hooked models step eagerly
            self._warn("the model has forward/backward hooks, which compiled steps would "
                       "skip; its steps run eagerly")
            return None
        # one input type for every step (parameters at step 0, tensors after): one graph
        p = {k: v.view_as(v) if isinstance(v, nn.Parameter) else v for k, v in p.items()}
        key = self._key(p, slow, buffers, rates, sx, sy)
        if key not in self.unused:
            with _COMPILE_LOCK:
                if key not in self.unused:
                    # the first call's extra passes leave the random stream (dropout) alone
                    dev = sx.device
                    rng = {"devices": []} if dev.type == "cpu" else {
                        "devices": [dev], "device_type": dev.type}
                    with torch.random.fork_rng(**rng):
                        self._first_call(key, p, slow, buffers, rates, sx, sy, eager_model)
        unused = self.unused[key]
        rates = _without(rates, unused)
        try:
            new_p, loss = self.fn(p, slow, buffers, rates, sx, sy)
        except _GAVE_UP:
            self._warn("torch.compile gave up on the inner step (its recompile limit: too "
                       "many episode shapes or model structures); those steps run eagerly")
            return None
        for k in unused:
            new_p[k] = p[k]
        return new_p, loss

    def _first_call(self, key: tuple, p: Params, slow: Params, buffers: Params,
                    rates: dict[str, Any], sx: torch.Tensor, sy: torch.Tensor,
                    eager_model: nn.Module) -> None:
        from torch._dynamo.exc import BackendCompilerFailed, Unsupported

        loss = self.loss_fn(functional_call(eager_model, (p, slow, buffers), (sx,)), sy)
        gs = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        unused = frozenset(k for k, g in zip(p, gs, strict=True) if g is None)
        rates = _without(rates, unused)  # as __call__ will pass them
        try:
            # a throw-away call and backward: the compiled backward may reuse its saved
            # tensors' memory, so the call that counts keeps a graph of its own
            new_p, loss = self.fn(p, slow, buffers, rates, sx, sy)
            outs = [t for t in (loss, *new_p.values()) if t.requires_grad]
            ins = [t for t in (*p.values(), *rates.values())
                   if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs and ins:
                torch.autograd.grad(outs, ins, [torch.zeros_like(t) for t in outs],
                                    allow_unused=True)
        except _GAVE_UP:
            pass  # past the recompile limit already: __call__ falls back to eager
        except Unsupported as err:  # e.g. a graph break (the step compiles as one graph)
            raise ConfigError(
                "MAML(compile_inner=...): torch.compile cannot capture the inner step as one "
                f"graph ({str(err).strip().splitlines()[0][:300]}); set compile_inner=False "
                "to run the step eagerly") from err
        except BackendCompilerFailed as err:  # the model traced; its compiler failed
            cause = getattr(err, "inner_exception", None) or err.__cause__ or err
            why = f"{type(cause).__name__}: {str(cause).strip()[:300]}"
            raise ConfigError(
                f"MAML(compile_inner=...): torch.compile's backend failed on the inner step "
                f"({why}); on the CPU it needs a C++ compiler (g++ or clang++, or CXX "
                "set); set compile_inner=False to run the step eagerly") from err
        self.unused[key] = unused


def _without(rates: dict[str, Any], unused: frozenset[str]) -> dict[str, Any]:
    """The step's rates with those of unused parameters as 0.0: their learned rates stay out
    of the compiled graph (no gradient, as in the eager loop)."""
    return {k: 0.0 if k in unused else r for k, r in rates.items()} if unused else rates


try:  # what fullgraph=True raises past the recompile limit (eager execution otherwise)
    from torch._dynamo.exc import FailOnRecompileLimitHit as _LimitHit
    _GAVE_UP: tuple[type[Exception], ...] = (_NotCompiled, _LimitHit)
except ImportError:  # pragma: no cover (older torch)
    _GAVE_UP = (_NotCompiled,)

_COMPILED: weakref.WeakKeyDictionary[MAML, dict] = weakref.WeakKeyDictionary()
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _limit_threads(intra: int) -> None:
    """A worker's intra-op threads (``torch.set_num_threads`` is per thread under OpenMP: the
    caller keeps its own). ``get_num_threads`` first: torch's lazy per-thread setup would
    otherwise reset the count at the worker's first op."""
    torch.get_num_threads()
    torch.set_num_threads(intra)


def _pool(threads: int, intra: int = 1) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers with ``intra`` intra-op threads each."""
    with _POOLS_LOCK:
        pool = _POOLS.get((threads, intra))
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="metattn-task",
                                      initializer=_limit_threads, initargs=(intra,))
            _POOLS[(threads, intra)] = pool
        return pool


def _draws_random_numbers(model: nn.Module) -> bool:
    """Whether ``model`` has active dropout: a ``torch.nn`` dropout module, or a module with
    a positive ``dropout`` / ``dropout_p`` / ``attn_dropout`` rate (metattn's attention), in
    training mode."""
    for mod in model.modules():
        if not mod.training:
            continue
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            return True
        for name in ("dropout", "dropout_p", "attn_dropout"):
            rate = getattr(mod, name, None)
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
                return True
    return False


def _graph_leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors (parameters, inputs requiring grad) that ``t``'s graph reaches."""
    seen, leaves, stack = set(), [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad
        if var is not None and not node.next_functions:
            leaves.append(var)
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


class _PerTaskMetaLoss(torch.autograd.Function):
    """The meta-loss value with its meta-gradient already computed (task by task)."""

    @staticmethod
    def forward(ctx, value, grads, *leaves):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "MAML(per_task_backward=True) computed the meta-gradient inside meta_loss (the "
                "loop path, or vmap with chunk_size); it cannot be differentiated again "
                "(create_graph=True). Build the learner with per_task_backward=False for "
                "higher-order derivatives")
        return (None, None, *(None if g is None else g * grad_out for g in ctx.grads))


class _RecomputedStep(torch.autograd.Function):
    """``step(sx, sy, *tensors) -> (*new_params, support_loss)`` run without keeping its graph;
    the backward re-runs it (same RNG state, autocast and metattn contexts) with the graph and
    back-propagates through it. The support loss is returned detached."""

    @staticmethod
    def forward(ctx, step, contexts, sx, sy, *tensors):
        ctx.step, ctx.contexts = step, contexts
        ctx.device = sx.device
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = (torch.cuda.get_rng_state(sx.device) if sx.device.type == "cuda"
                        else None)
        ctx.autocast = (torch.is_autocast_enabled(sx.device.type),
                        torch.get_autocast_dtype(sx.device.type))
        ctx.save_for_backward(sx, sy, *tensors)
        new, loss = step(False, sx, sy, *tensors)
        loss = loss.detach()
        ctx.mark_non_differentiable(loss)
        return (*(t.detach() for t in new), loss)

    @staticmethod
    def backward(ctx, *grads):
        sx, sy, *tensors = ctx.saved_tensors
        ins = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
        # support inputs with a graph of their own (e.g. features of a trainable encoder
        # outside the model) get their share of the meta-gradient too
        sx = sx.detach().requires_grad_(ctx.needs_input_grad[2])
        sy = sy.detach().requires_grad_(ctx.needs_input_grad[3])
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), ctx.contexts():
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.autocast(ctx.device.type, dtype=ctx.autocast[1],
                                enabled=ctx.autocast[0]):
                new, _ = ctx.step(True, sx, sy, *ins)
            every = [sx, sy, *ins]
            want = [i for i in range(len(every)) if ctx.needs_input_grad[2 + i]]
            outs = [(n, g) for n, g in zip(new, grads[:-1], strict=True) if g is not None
                    and n.requires_grad]
            got = torch.autograd.grad([n for n, _ in outs], [every[i] for i in want],
                                      [g for _, g in outs], allow_unused=True) if outs and want \
                else [None] * len(want)
        result: list[torch.Tensor | None] = [None] * len(every)
        for i, g in zip(want, got, strict=True):
            result[i] = g
        return (None, None, *result)


class FOMAML(MAML):
    """First-order MAML: the meta-gradient ignores the second-order term."""

    def __init__(self, model: nn.Module, **kwargs):
        kwargs.setdefault("first_order", True)
        super().__init__(model, **kwargs)


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al. 2020): adapt only the head in the inner loop."""

    def __init__(self, model: nn.Module, head: Sequence[str] | str = "head", **kwargs):
        super().__init__(model, adapt=head, **kwargs)


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): a learned inner learning rate per parameter element."""

    def __init__(self, model: nn.Module, **kwargs):
        kwargs.setdefault("learn_inner_lr", "per_param")
        super().__init__(model, **kwargs)


class MAMLpp(MAML):
    """MAML++ (Antoniou et al. 2019): per-layer per-step rates, multi-step loss, DA."""

    def __init__(self, model: nn.Module, **kwargs):
        kwargs.setdefault("learn_inner_lr", "per_layer_step")
        kwargs.setdefault("msl_steps", 1000)
        kwargs.setdefault("second_order_start", 1000)
        super().__init__(model, **kwargs)
