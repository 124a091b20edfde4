"""Checkpointed inner steps: each step's graph is recomputed during the outer backward instead
of stored, so the inner loop's memory stays flat in ``inner_steps`` (only each step's
parameters are kept), for about one more support forward and backward per step. The same
meta-gradient (second order; first-order steps keep no graph to recompute)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch.func import vmap

from metattn.meta.maml.algorithm import ForwardLoss, Params, Rate, Step, functional, inner_step
from metattn.meta.maml.execution.job import InnerJob


def step(job: InnerJob, contexts: Callable[[], AbstractContextManager], batched: bool,
         chunk_size: int | None = None) -> Step:
    """An inner step equal to :func:`~..algorithm.inner_step` that keeps no graph: the
    outer backward re-runs it (same random state, autocast and ``contexts()``). ``batched``:
    the parameters carry a task dimension (vmap in chunks of ``chunk_size``)."""
    slow_names = list(job.slow)

    def forward_loss_with(slow_vals: tuple[torch.Tensor, ...]) -> ForwardLoss:
        fl = functional(job.model, dict(zip(slow_names, slow_vals, strict=True)), job.buffers,
                        job.loss_fn)
        return vmap(fl, randomness="different", chunk_size=chunk_size) if batched else fl

    def recomputed(forward_loss: ForwardLoss, params: Params, x: torch.Tensor,
                   y: torch.Tensor, rates: dict[str, Rate], create_graph: bool
                   ) -> tuple[Params, torch.Tensor]:
        if not create_graph:  # no graph to keep, so none to recompute
            return inner_step(forward_loss, params, x, y, rates, create_graph)
        names = list(params)
        learned = [k for k in names if isinstance(rates[k], torch.Tensor)]
        n_fast, n_slow = len(names), len(slow_names)

        def fn(graph: bool, x: torch.Tensor, y: torch.Tensor, *tensors: torch.Tensor
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
            p = dict(zip(names, tensors[:n_fast], strict=True))
            if not graph:  # the forward pass: gradients of these inputs only
                p = {k: v.detach().requires_grad_() for k, v in p.items()}
            r = {**rates, **dict(zip(learned, tensors[n_fast + n_slow:], strict=True))}
            new, loss = inner_step(forward_loss_with(tensors[n_fast:n_fast + n_slow]), p, x, y,
                                   r, graph)
            return tuple(new[k] for k in names), loss

        outs = RecomputedStep.apply(fn, contexts, x, y, *params.values(), *job.slow.values(),
                                    *(rates[k] for k in learned))
        return dict(zip(names, outs[:-1], strict=True)), outs[-1]

    return recomputed


class RecomputedStep(torch.autograd.Function):
    """``fn(graph, x, y, *tensors) -> (new_params, support_loss)`` run without keeping its
    graph; the backward re-runs it (same RNG state, autocast and contexts) with the graph and
    back-propagates through it. The support loss is returned detached."""

    @staticmethod
    def forward(ctx, fn, contexts, sx, sy, *tensors):  # noqa: ANN001, ANN205
        ctx.fn, ctx.contexts = fn, contexts
        # outputs nothing used come back as None, not zeros: a parameter the loss does not
        # reach gets no gradient, as in the other strategies
        ctx.set_materialize_grads(False)
        ctx.device = sx.device
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = (torch.cuda.get_rng_state(sx.device) if sx.device.type == "cuda"
                        else None)
        ctx.autocast = (torch.is_autocast_enabled(sx.device.type),
                        torch.get_autocast_dtype(sx.device.type))
        ctx.save_for_backward(sx, sy, *tensors)
        new, loss = fn(False, sx, sy, *tensors)
        loss = loss.detach()
        ctx.mark_non_differentiable(loss)
        return (*(t.detach() for t in new), loss)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
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
                new, _ = ctx.fn(True, sx, sy, *ins)
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
