"""Muon for a network's hidden matrices, Adam for everything else, in one optimiser.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") replaces each 2-D weight's
update by the orthogonalised momentum: a few Newton-Schulz iterations map the momentum
``G = U S V^T`` to about ``U V^T``, so every direction of the matrix moves at the same rate.
It is meant for hidden layers only: the input layer, the output head, biases, norms and
position tables keep Adam (chosen by name: :data:`ADAM_PARTS`). One
:class:`torch.optim.Optimizer` holds both kinds of group, so a learning-rate scheduler,
``state_dict`` and checkpoints treat it like Adam. The Muon update is scaled by
``0.2 * sqrt(max(rows, cols))`` (Liu et al. 2025, "Muon is scalable for LLM training"), which
gives it about AdamW's RMS, so a rate tuned for Adam carries over.

Also here: :class:`WeightAverage`, the exponential moving average of the weights that
``train.ema`` evaluates with (torch's ``AveragedModel`` with a warm-up decay).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.optim.swa_utils import AveragedModel

from metattn.errors import ConfigError

# the quintic Newton-Schulz coefficients of Jordan et al.: fast rather than exact convergence
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About ``U V^T`` for ``g = U S V^T`` (2-D), by ``steps`` Newton-Schulz iterations."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + eps)  # singular values <= 1, where the iteration converges
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


# name parts whose weights keep Adam: input layers (the ICL Transformer's read_in, a ViT's
# patch embedding), output heads, embeddings and position tables, and MAML's learned inner
# rates (Meta-SGD, MAML++), which are step sizes, not maps to orthogonalise
ADAM_PARTS = ("read_in", "patch", "head", "embed", "pos", "inner_lrs")


def split_for_muon(named: Iterable[tuple[str, torch.Tensor]],
                   exclude: Iterable[str] = ADAM_PARTS
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(Muon parameters, Adam parameters). Muon takes trainable weights of 2 or more
    dimensions (matrices; convolution filters, as ``[out, in * kernel]`` matrices) unless a
    dot-separated part of their name is in ``exclude``. (Conv-4's first convolution,
    ``body.0``, has no such name and gets Muon.)"""
    muon, adam = [], []
    excl = set(exclude)
    for name, p in named:
        if not p.requires_grad:
            continue
        hidden = (p.ndim >= 2 and min(p.shape[0], p[0].numel()) > 1
                  and excl.isdisjoint(name.split(".")))
        (muon if hidden else adam).append(p)
    return muon, adam


class MuonAdam(torch.optim.Optimizer):
    """Muon on ``muon_params`` and Adam on ``adam_params``, with one rate ``lr`` for both.

    Args:
        muon_params: hidden weight matrices and convolution filters (see
            :func:`split_for_muon`).
        adam_params: the rest.
        lr: the rate of both kinds (schedulers scale every group's ``lr``).
        weight_decay: decoupled, as AdamW's, on both kinds (so the Adam part is AdamW: unlike
            ``torch.optim.Adam``, whose decay is an L2 term added to the gradient).
        momentum: Muon's (Nesterov) momentum.
        betas, eps: Adam's.
        ns_steps: Newton-Schulz iterations per Muon update.
    """

    def __init__(self, muon_params: list[torch.Tensor], adam_params: list[torch.Tensor],
                 lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 ns_steps: int = 5) -> None:
        for p in muon_params:
            if p.ndim < 2:
                raise ConfigError(f"MuonAdam: a Muon parameter has shape {tuple(p.shape)}; "
                                  "Muon takes matrices and filters (2 or more dimensions), "
                                  "pass the others as adam_params")
        groups = [{"params": list(muon_params), "use_muon": True},
                  {"params": list(adam_params), "use_muon": False}]
        groups = [g for g in groups if g["params"]]
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "betas": betas, "eps": eps, "ns_steps": ns_steps}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer's signature)
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)
                if group["use_muon"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    u = g.add(buf, alpha=group["momentum"])  # Nesterov
                    m = u.reshape(len(u), -1)  # a filter bank as [out, in * kernel]
                    o = orthogonalize(m, group["ns_steps"]).view_as(p)
                    p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(m.shape)))
                    continue
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                b1, b2 = group["betas"]
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))
        return loss


class WeightAverage:
    """An exponential moving average of a module's parameters and floating-point buffers
    (BatchNorm's running statistics), kept beside the live weights: torch's
    :class:`~torch.optim.swa_utils.AveragedModel` (a copy of the module) with a warm-up decay.

    ``update()`` after each optimiser step: ``avg <- avg + (1 - d) (live - avg)`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at the ``n``-th update, so the first updates do not
    tie the average to the random initialisation (torch's ``get_ema_multi_avg_fn`` has a fixed
    decay only). ``swapped()`` puts the average into the module for an evaluation and restores
    the live weights afterwards (training continues from them). Integer buffers (BatchNorm's
    batch counter) are the live ones.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema={decay}; use a decay in (0, 1), e.g. 0.999, or null")
        self.decay = float(decay)
        self.updates = 0  # counted here: the decay needs no read of a device counter
        self.averaged = AveragedModel(module, multi_avg_fn=self._ema, use_buffers=True)
        self.averaged.update_parameters(module)  # the first call copies: n_averaged = 1
        live = module.state_dict(keep_vars=True)
        self.names = [k for k, v in live.items() if v.is_floating_point()]
        self._live = [live[k].detach() for k in self.names]  # the module's own storage
        mine = self.averaged.module.state_dict(keep_vars=True)
        self.average = [mine[k].detach() for k in self.names]
        self.module = module

    def _ema(self, averaged: list[torch.Tensor], live: list[torch.Tensor],
             n_averaged: torch.Tensor) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = [(a, b) for a, b in zip(averaged, live, strict=True) if a.is_floating_point()]
        if pairs:  # one fused multi-tensor lerp
            torch._foreach_lerp_([a for a, _ in pairs], [b for _, b in pairs], 1.0 - d)
        for a, b in zip(averaged, live, strict=True):
            if not a.is_floating_point():
                a.copy_(b)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live weights."""
        self.updates += 1
        self.averaged.update_parameters(self.module)

    def state(self) -> dict[str, torch.Tensor]:
        """The average as named tensors (for a checkpoint), plus the update count."""
        out = {f"ema/{k}": v for k, v in zip(self.names, self.average, strict=True)}
        out["ema_updates"] = torch.tensor(self.updates)
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> bool:
        """Restore from :meth:`state`'s keys (under ``prefix``); False if they are absent."""
        keys = [f"{prefix}ema/{k}" for k in self.names]
        if not all(k in tensors for k in keys):
            return False
        for avg, k in zip(self.average, keys, strict=True):
            avg.copy_(tensors[k])
        self.updates = int(tensors.get(f"{prefix}ema_updates", torch.tensor(0)))
        self.averaged.n_averaged.fill_(self.updates + 1)
        return True

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the average into the module for good (evaluating a saved run)."""
        torch._foreach_copy_(self._live, self.average)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the module holds the average; the live weights come back after."""
        with torch.no_grad():
            saved = [v.clone() for v in self._live]
            torch._foreach_copy_(self._live, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, saved)
