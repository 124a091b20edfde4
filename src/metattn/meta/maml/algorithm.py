"""MAML, the algorithm. Read this file first: the rest of the package only runs it faster.

For each task, with a support set (xs, ys) and a query set (xq, yq):

    theta_0     = theta                                          the meta-learned start
    theta_{i+1} = theta_i - alpha_i * grad L(f(xs; theta_i), ys)  for i < inner_steps
    meta-loss   = mean over tasks of  sum_j w_j * L(f(xq; theta_j), yq)

The meta-gradient (of the meta-loss with respect to theta, and to alpha when it is learned)
goes THROUGH the inner updates: each inner gradient is taken with ``create_graph=True``, so
the outer backward differentiates it once more (second order). First-order MAML takes the
inner gradients without their graph.

Everything here is a pure function of parameter dicts. The model runs through
``torch.func.functional_call``, so any ``nn.Module`` works unchanged. The same functions run
one task, or all tasks at once: ``forward_loss`` vmapped over a leading task dimension and
the parameters expanded to one copy per task (``p.expand(T, ...)``, a view). Task t's loss
depends on copy t only, so the gradient of the summed losses is the stack of the per-task
gradients, and :func:`inner_step` serves both.

The family, as options of this one loop (see :class:`~metattn.meta.maml.options.MAMLOptions`):

* MAML: second order. First-order MAML: ``first_order=True``.
* ANIL: only the head is in ``params``; the other parameters are fixed inputs of the model.
* Meta-SGD: :class:`Rates` gives a learned rate per parameter element.
* MAML++: learned rates per parameter and step (LSLR), and :func:`msl_weights` (the
  multi-step loss: the query loss after every step, weighted).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from metattn.meta.base import LossFn

Params = dict[str, torch.Tensor]
Rate = float | torch.Tensor
# (params, x, y) -> (outputs, loss): the model and loss as a function of the adapted parameters
ForwardLoss = Callable[[Params, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# one inner step; :func:`inner_step` or a faster equal one (checkpointed, compiled)
Step = Callable[[ForwardLoss, Params, torch.Tensor, torch.Tensor, dict[str, Rate], bool],
                tuple[Params, torch.Tensor]]
Trace = tuple[Params, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def functional(model: nn.Module, slow: Params, buffers: Params, loss_fn: LossFn) -> ForwardLoss:
    """``model`` as a function of its adapted parameters; ``slow`` (meta-learned, not
    adapted) parameters and buffers are fixed inputs."""

    def forward_loss(params: Params, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (params, slow, buffers), (x,))
        return out, loss_fn(out, y)

    return forward_loss


def update(params: Params, grads: Mapping[str, torch.Tensor | None],
           rates: Mapping[str, Rate]) -> Params:
    """``theta - alpha * g``, parameter by parameter.

    The one rule for a parameter that the support loss does not reach (its gradient is
    None): it keeps its value, and its learned rate gets no gradient from this step."""
    return {k: p if grads[k] is None else p - rates[k] * grads[k] for k, p in params.items()}


def inner_step(forward_loss: ForwardLoss, params: Params, x: torch.Tensor, y: torch.Tensor,
               rates: dict[str, Rate], create_graph: bool) -> tuple[Params, torch.Tensor]:
    """One gradient step on the support set: (the new parameters, the support loss before
    the step). ``create_graph`` keeps the gradient's graph, so that the meta-gradient can go
    through it (second order). Gradients are on even under ``torch.no_grad`` (evaluation)."""
    with torch.enable_grad():
        _, loss = forward_loss(params, x, y)
        names = list(params)
        grads = torch.autograd.grad(loss.sum(), [params[k] for k in names], allow_unused=True,
                                    create_graph=create_graph)
        return update(params, dict(zip(names, grads, strict=True)), rates), loss


def inner_loop(forward_loss: ForwardLoss, params: Params,
               support: tuple[torch.Tensor, torch.Tensor],
               query: tuple[torch.Tensor, torch.Tensor] | None, steps: int,
               rates: Callable[[str, int], Rate], first_order: bool, record: Sequence[int],
               step: Step = inner_step) -> Trace:
    """Adapt ``params`` on ``support`` for ``steps`` inner steps, and measure ``query`` at the
    steps listed in ``record`` (0 = before adapting).

    Returns (the adapted parameters, support losses, query losses, query outputs), the
    lists in step order. With
    gradients disabled (evaluation) every step starts from detached parameters: the inner
    gradients are taken, but no graph back to the meta-parameters is kept."""
    train = torch.is_grad_enabled()
    create_graph = train and not first_order

    def fresh(p: Params) -> Params:
        return p if train else {k: v.detach().requires_grad_() for k, v in p.items()}

    s_losses: list[torch.Tensor] = []
    q_losses: list[torch.Tensor] = []
    q_outs: list[torch.Tensor] = []

    def measure(p: Params) -> None:
        assert query is not None, "record lists steps but there is no query set"
        out, loss = forward_loss(p, *query)
        q_outs.append(out)
        q_losses.append(loss)

    params = fresh(params)
    if 0 in record:
        measure(params)
    for i in range(steps):
        params, loss = step(forward_loss, params, *support,
                            {k: rates(k, i) for k in params}, create_graph)
        params = fresh(params)
        s_losses.append(loss if create_graph else loss.detach())
        if i + 1 in record:
            measure(params)
    return params, s_losses, q_losses, q_outs


@dataclass
class Rates:
    """The inner learning rate alpha of each parameter at each step: ``fixed``, or learned
    (``mode``): one scalar (``learned["all"]``), one tensor per parameter shaped like it
    (Meta-SGD), or one per parameter and step (MAML++ LSLR; steps past the last reuse it)."""

    fixed: float
    mode: Literal["scalar", "per_param", "per_layer_step"] | None = None
    learned: Mapping[str, torch.Tensor] | None = None

    def __call__(self, name: str, step: int) -> Rate:
        if self.mode is None or self.learned is None:
            return self.fixed
        if self.mode == "scalar":
            return self.learned["all"]
        lr = self.learned[name]
        return lr[min(step, lr.shape[0] - 1)] if self.mode == "per_layer_step" else lr


def msl_weights(steps: int, outer_step: int | None, msl_steps: int) -> list[float]:
    """Per-inner-step weights w_j of the query loss (MAML++ multi-step loss).

    Uniform (1/N each) at outer step 0, moving linearly over ``msl_steps`` outer steps to the
    final step, non-final weights kept at least 0.03/N (Antoniou et al. 2019); from outer
    step ``msl_steps`` on (and with ``msl_steps=0``), the final step's loss alone."""
    if msl_steps <= 0 or steps <= 1 or outer_step is None or outer_step >= msl_steps:
        return [0.0] * (steps - 1) + [1.0]
    p, n = min(outer_step / msl_steps, 1.0), steps
    floor = 0.03 / n
    nonfinal = max(1.0 / n - p / n, floor)
    final = min(1.0 / n + p * (n - 1) / n, 1.0 - (n - 1) * floor)
    return [nonfinal] * (n - 1) + [final]


def weighted(q: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Each task's query losses ``q[..., j]`` (one per recorded step) weighted and summed.
    Python-float weights: no host-to-device copy, so a CUDA graph can capture it."""
    return torch.stack([q[..., j] * wj for j, wj in enumerate(weights)], -1).sum(-1)
