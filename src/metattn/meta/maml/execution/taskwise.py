"""Per-task backward: each task's (or chunk's) meta-gradient is taken right after its inner
loop, inside ``meta_loss``, and its graph freed before the next one, so the memory is one
task's graph whatever the meta-batch. The returned meta-loss carries the summed gradients
(:class:`PerTaskMetaLoss`): ``backward`` then works as usual (scaling, other losses, DDP's
hooks), but it cannot be differentiated again."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from typing import Any

import torch

from metattn.meta.maml.algorithm import weighted
from metattn.meta.maml.execution.job import Result

# unit(i) -> the unit's (s, q, o); run_units(unit, n) yields unit(0..n-1) in order
Runner = Callable[[Callable[[int], Any], int], Generator[Any, None, None]]


def in_order(unit: Callable[[int], Any], n: int) -> Generator[Any, None, None]:
    """The units one after another, in this thread."""
    return (unit(i) for i in range(n))


def run(unit: Callable[[int], Result], num_units: int, weights: Sequence[float],
        num_tasks: int, run_units: Runner = in_order
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, q, o, meta-loss)`` over ``num_units`` units of ``num_tasks`` tasks in all, each
    unit's weighted query loss back-propagated as soon as the unit is done. ``run_units``
    may run the units elsewhere (task threads); the sums run here, in unit order, so they do
    not depend on how the units ran."""

    def backward(i: int) -> tuple:
        s, q, o = unit(i)
        loss = weighted(q, weights).sum() / num_tasks
        mine = _graph_leaves(loss)
        gs: Sequence[torch.Tensor | None] = ()
        if mine:
            # a backward, so outside any autocast region (as loss.backward() would be)
            with torch.autocast(q.device.type, enabled=False):
                gs = torch.autograd.grad(loss, mine, allow_unused=True)
        return s.detach(), q.detach(), o.detach(), loss.detach(), mine, gs

    # The leaves are collected unit by unit: a model with data-dependent branches may reach a
    # parameter in one task's graph and not in another's.
    leaves: list[torch.Tensor] = []
    where: dict[int, int] = {}
    total: list[torch.Tensor | None] = []
    value = None
    outs = []
    # closing: an error while summing ends the runner at once (its threads restored)
    with closing(run_units(backward, num_units)) as results:
        for s, q, o, loss, mine, gs in results:
            for leaf, g in zip(mine, gs, strict=True):
                if id(leaf) not in where:
                    where[id(leaf)] = len(leaves)
                    leaves.append(leaf)
                    total.append(None)
                i = where[id(leaf)]
                if g is not None:
                    total[i] = g if total[i] is None else total[i] + g
            value = loss if value is None else value + loss
            outs.append((s, q, o))
    s, q, o = (torch.cat(z) for z in zip(*outs, strict=True))
    loss = PerTaskMetaLoss.apply(value, tuple(total), *leaves) if leaves else value
    return s, q, o, loss


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


class PerTaskMetaLoss(torch.autograd.Function):
    """The meta-loss value with its meta-gradient already computed (unit by unit)."""

    @staticmethod
    def forward(ctx, value, grads, *leaves):  # noqa: ANN001, ANN205
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():
            raise RuntimeError(
                "MAML(per_task_backward=True) computed the meta-gradient inside meta_loss (the "
                "loop path, or vmap with chunk_size); it cannot be differentiated again "
                "(create_graph=True). Build the learner with per_task_backward=False for "
                "higher-order derivatives")
        return (None, None, *(None if g is None else g * grad_out for g in ctx.grads))
