"""Compiled inner steps: the support forward, its gradient and the update as ONE function
through ``torch.compile``.

torch.compile has no double backward, and none is needed: the compiled step computes the
first derivative in its forward (``torch.func.grad``), and the outer backward differentiates
that compiled function once (AOTAutograd), so second-order MAML runs on fused kernels with the
eager loop's meta-gradient (tested in float64). Measured on the throughput benchmark's
Transformer, 2 CPU cores: 1.13-1.19x over the eager loop (docs/performance.md).

Task threads share one compiled step. Dynamo compiles on a call with inputs it has not seen,
and AOTAutograd compiles the step's backward at its first backward; compiling is not
thread-safe (a call into compiled code while another thread traces is refused). So inputs of
a new kind (:meth:`CompiledStep.key`: what dynamo guards on) first go through a throw-away call
and backward (zero cotangents) that compile both, one thread at a time; the calls that count
then run concurrently (compiled code does not touch the module). The same locked first call
finds the parameters that the support loss does not reach: they keep their value and their
learned rates get no gradient, as :func:`~..algorithm.update` says. Where torch.compile gives
up (past its recompile limit, 8 per process) or the model has hooks (which a compiled graph
would skip), the step runs eagerly, with a warning.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from metattn.errors import ConfigError
from metattn.meta.base import LossFn
from metattn.meta.maml.algorithm import ForwardLoss, Params, Rate, Step, inner_step, update
from metattn.meta.maml.execution.job import InnerJob
from metattn.nn.attention import unhooked

_LOCK = threading.Lock()
# per owner (the learner): {(loss_fn, first_order): CompiledStep}, kept while the owner lives.
# Keyed by the owner, not the model: the compiled step holds the model, and a value that
# referred to its own weak key would keep the entry (and the model) alive forever.
_CACHE: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


class _NotCompiled(Exception):
    """Raised by the compiled function when torch.compile ran it eagerly instead."""


try:  # what fullgraph=True raises past the recompile limit (eager execution otherwise)
    from torch._dynamo.exc import FailOnRecompileLimitHit as _LimitHit
    _GAVE_UP: tuple[type[Exception], ...] = (_NotCompiled, _LimitHit)
except ImportError:  # pragma: no cover (older torch)
    _GAVE_UP = (_NotCompiled,)


def step(job: InnerJob, options: bool | dict[str, Any], owner: object) -> Step:
    """The compiled equivalent of :func:`~..algorithm.inner_step` for ``job`` (training
    only). ``options``: ``True`` or a dict of ``torch.compile`` options; ``owner``: the
    object whose life the compiled step lives for (its learner)."""
    compiled = _compiled(owner, job.model, job.loss_fn, job.first_order, options)

    def compiled_step(forward_loss: ForwardLoss, params: Params, x: torch.Tensor,
                      y: torch.Tensor, rates: dict[str, Rate], create_graph: bool
                      ) -> tuple[Params, torch.Tensor]:
        out = compiled(params, job.slow, job.buffers, rates, x, y, forward_loss)
        return inner_step(forward_loss, params, x, y, rates, create_graph) if out is None \
            else out

    return compiled_step


def _compiled(owner: object, model: nn.Module, loss_fn: LossFn, first_order: bool,
              options: bool | dict[str, Any]) -> CompiledStep:
    """One compiled step per owner, loss function and order, kept for the owner's life. It
    always runs ``model`` (never a task thread's replica): compiled code takes the
    parameters as inputs and leaves the module alone, and one module object keeps one
    compiled graph."""
    cache = _CACHE.setdefault(owner, {})
    key = (loss_fn, first_order)
    if key not in cache:
        seen = {fn for fn, _ in cache}
        if loss_fn not in seen and len(seen) >= 8:
            raise ConfigError(
                f"MAML(compile_inner=...): meta_loss has seen {len(seen) + 1} different loss "
                "functions, each compiled anew; pass the same function object each time (not "
                "a lambda made per call) or set compile_inner=False")

        def fn(p: Params, slow: Params, buffers: Params, rates: dict[str, Rate],
               sx: torch.Tensor, sy: torch.Tensor) -> tuple[Params, torch.Tensor]:
            if not torch.compiler.is_compiling():
                # torch.compile gave up on this call (its recompile limit): the caller steps
                # eagerly instead, on its own thread's replica of the model
                raise _NotCompiled

            def support_loss(p_: Params) -> torch.Tensor:
                return loss_fn(functional_call(model, (p_, slow, buffers), (sx,)), sy)

            g, loss = grad_and_value(support_loss)(p)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            return update(p, g, rates), loss

        # fullgraph: a graph break would run part of the step eagerly on the shared module
        opts = {"dynamic": False, "fullgraph": True}
        if isinstance(options, dict):
            opts.update(options)
        cache[key] = CompiledStep(torch.compile(fn, **opts), model)
    return cache[key]


class CompiledStep:
    """A ``torch.compile``'d inner step that task threads may share (see the module
    docstring). Returns None where the step must run eagerly."""

    def __init__(self, fn: Callable[..., Any], model: nn.Module):
        self.fn, self.model = fn, model
        self.unused: dict[tuple, frozenset[str]] = {}
        self.warned: set[str] = set()

    def _warn(self, why: str) -> None:
        if why not in self.warned:
            self.warned.add(why)
            warnings.warn(f"MAML(compile_inner=...): {why}", stacklevel=5)

    def key(self, p: Params, slow: Params, buffers: Params, rates: dict[str, Rate],
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

    def __call__(self, p: Params, slow: Params, buffers: Params, rates: dict[str, Rate],
                 sx: torch.Tensor, sy: torch.Tensor, forward_loss: ForwardLoss
                 ) -> tuple[Params, torch.Tensor] | None:
        """One inner step; ``forward_loss`` (the caller's model or its thread's replica) runs
        the first call's eager check, so the shared module is never swapped."""
        if not unhooked(*self.model.modules()):
            # dynamo does not guard on module hooks: a graph traced without them would skip
            # them, so hooked models step eagerly
            self._warn("the model has forward/backward hooks, which compiled steps would "
                       "skip; its steps run eagerly")
            return None
        # one input type for every step (parameters at step 0, tensors after): one graph
        p = {k: v.view_as(v) if isinstance(v, nn.Parameter) else v for k, v in p.items()}
        key = self.key(p, slow, buffers, rates, sx, sy)
        if key not in self.unused:
            with _LOCK:
                if key not in self.unused:
                    # the first call's extra passes leave the random stream (dropout) alone
                    dev = sx.device
                    rng = {"devices": []} if dev.type == "cpu" else {
                        "devices": [dev], "device_type": dev.type}
                    with torch.random.fork_rng(**rng):
                        self._first_call(key, p, slow, buffers, rates, sx, sy, forward_loss)
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
                    rates: dict[str, Rate], sx: torch.Tensor, sy: torch.Tensor,
                    forward_loss: ForwardLoss) -> None:
        from torch._dynamo.exc import BackendCompilerFailed, Unsupported

        _, loss = forward_loss(p, sx, sy)
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


def _without(rates: dict[str, Rate], unused: frozenset[str]) -> dict[str, Rate]:
    """The step's rates with those of unused parameters as 0.0: their learned rates stay out
    of the compiled graph (no gradient, as in the eager loop)."""
    return {k: 0.0 if k in unused else r for k, r in rates.items()} if unused else rates
