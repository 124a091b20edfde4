"""Synthetic regression task families (the MAML paper's sinusoids)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metattn.data.tasks import TaskBatch
from metattn.errors import TaskError


@dataclass
class SinusoidTasks:
    """Sinusoid regression tasks, y = A sin(x - phi), as in Finn et al. (2017).

    Protocol of the paper and its reference code (cbfinn/maml): amplitude A ~ U[0.1, 5.0],
    phase phi ~ U[0, pi], inputs x ~ U[-5, 5]. Each task has ``k_shot`` support points and
    ``k_query`` query points drawn independently. ``info`` carries ``amplitude`` and
    ``phase`` so that an oracle (and a plot) can use the true function.
    """

    k_shot: int = 10
    k_query: int = 10
    amp_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        if self.k_shot < 1:
            raise TaskError(f"SinusoidTasks.k_shot={self.k_shot}; it must be >= 1")
        if self.k_query < 1:
            raise TaskError(f"SinusoidTasks.k_query={self.k_query}; it must be >= 1")

    @staticmethod
    def function(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """The true function of each task; ``amplitude``/``phase`` broadcast against ``x``."""
        return amplitude * torch.sin(x - phase)

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``num_tasks`` tasks; x has shape ``[T, K, 1]`` and y ``[T, K, 1]``."""
        g = generator
        lo, hi = self.amp_range
        amp = torch.rand(num_tasks, 1, 1, generator=g) * (hi - lo) + lo
        lo, hi = self.phase_range
        phase = torch.rand(num_tasks, 1, 1, generator=g) * (hi - lo) + lo
        lo, hi = self.x_range
        n = self.k_shot + self.k_query
        x = torch.rand(num_tasks, n, 1, generator=g) * (hi - lo) + lo
        y = self.function(x, amp, phase)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=g)
        k = self.k_shot
        return TaskBatch(
            support_x=x[:, :k],
            support_y=y[:, :k],
            query_x=x[:, k:],
            query_y=y[:, k:],
            info={"amplitude": amp.view(-1), "phase": phase.view(-1)},
        )
