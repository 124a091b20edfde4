"""Synthetic regression task families (the MAML paper's sinusoids)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

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

    def plot(self, learner: Any, path: str | os.PathLike, seed: int = 0,
             n_tasks: int = 4) -> None:
        """PNG of adapted curves against the ground truth on ``n_tasks`` seeded test tasks."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from metattn.meta.maml import MAML

        batch = self.sample(n_tasks, torch.Generator().manual_seed(seed))
        p = next(learner.parameters())
        grid = torch.linspace(*self.x_range, 200).view(-1, 1)
        fig, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3.2), squeeze=False)
        for t, ax in enumerate(axes[0]):
            sx = batch.support_x[t].to(p.device, p.dtype)
            sy = batch.support_y[t].to(p.device, p.dtype)
            g = grid.to(p.device, p.dtype)
            truth = self.function(grid, batch.info["amplitude"][t], batch.info["phase"][t])
            ax.plot(grid, truth, "k-", lw=2, label="ground truth")
            if isinstance(learner, MAML):
                with torch.no_grad():
                    before = learner.adapt(sx, sy, steps=0)(g).cpu()
                ax.plot(grid, before, ":", color="tab:gray", label="meta-learned init")
                label = f"after {learner.eval_inner_steps} steps"
            else:
                label = "adapted"
            with torch.no_grad():
                after = learner.adapt(sx, sy)(g).cpu()
            ax.plot(grid, after, "--", color="tab:red", lw=2, label=label)
            finish_panel(ax, sx, sy, batch, t)
        save_figure(fig, axes, path)


def finish_panel(ax: Any, sx: torch.Tensor, sy: torch.Tensor, batch: TaskBatch, t: int) -> None:
    """Draw task ``t``'s support points and give the panel its title, range and grid."""
    ax.plot(sx.cpu(), sy.cpu(), "^", color="tab:blue", ms=7,
            label=f"{sx.shape[0]} support points")
    ax.set_title(f"A={float(batch.info['amplitude'][t]):.2f}, "
                 f"phase={float(batch.info['phase'][t]):.2f}")
    ax.set_ylim(-5.5, 5.5)
    ax.grid(alpha=0.3)


def save_figure(fig: Any, axes: Any, path: Any) -> None:
    """Legend on the first panel, tight layout, PNG at ``path``, figure closed."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
