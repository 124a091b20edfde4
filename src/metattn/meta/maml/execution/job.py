"""What every execution strategy gets: one call's inner loops, without the learner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metattn.meta.base import LossFn
from metattn.meta.maml.algorithm import ForwardLoss, Params, Rates, Step, functional, inner_step

# (support losses [T, steps], query losses [T, len(record)], query outputs [T, len(record), ...])
Result = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class InnerJob:
    """The inner loops of one call: the model and its parameters split into ``fast``
    (adapted), ``slow`` (meta-learned, fixed inside the loop) and buffers; the loss, rates,
    number of steps and order; ``record``: the steps whose query loss is measured (0 =
    before adapting); ``step``: the inner step (:func:`~..algorithm.inner_step`, or an equal
    checkpointed or compiled one)."""

    model: nn.Module
    fast: Params
    slow: Params
    buffers: Params
    loss_fn: LossFn
    rates: Rates
    steps: int
    first_order: bool
    record: Sequence[int]
    step: Step = inner_step

    def forward_loss(self, model: nn.Module | None = None) -> ForwardLoss:
        """The model (or a thread's replica of it) as a function of the fast parameters."""
        return functional(self.model if model is None else model, self.slow, self.buffers,
                          self.loss_fn)
