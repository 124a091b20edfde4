"""The train state: everything a checkpoint holds and a resumed run restores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metattn import checkpoint
from metattn.config import RunConfig
from metattn.meta.base import Learner
from metattn.optim import WeightAverage
from metattn.recipe.log import Window


@dataclass
class TrainState:
    """The learner, optimiser and schedule, the task stream (one seeded generator, the same
    on every rank), the weight average (``train.ema``), the outer step, the seconds of
    training so far, the best periodic evaluation, and the log window."""

    learner: Learner
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tasks: torch.Generator
    window: Window
    ema: WeightAverage | None = None
    step: int = 0
    seconds: float = 0.0
    best: float | None = None
    saved_at: float = 0.0  # the training seconds at the last checkpoint

    def to_checkpoint(self, cfg: RunConfig, device: torch.device, now: float
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The checkpoint's JSON state and extra tensors (random streams, weight average)."""
        state = {"step": self.step, "seconds": self.seconds, "best": self.best,
                 "scheduler": self.scheduler.state_dict(), "config": cfg.to_dict(),
                 "torch": torch.__version__, **self.window.state(now)}
        tensors = {"task_generator": self.tasks.get_state(), "torch_rng": torch.get_rng_state(),
                   **(self.ema.state() if self.ema is not None else {})}
        if device.type == "cuda":
            tensors["cuda_rng"] = torch.cuda.get_rng_state(device)
        return state, tensors

    def restore(self, saved: tuple[dict[str, torch.Tensor], dict[str, Any]], cfg: RunConfig,
                device: torch.device) -> None:
        """Continue from a checkpoint (see :meth:`to_checkpoint`) with ``cfg``."""
        tensors, state = saved
        opt = self.optimizer
        # train.cuda_graph may differ from the run that wrote the checkpoint: the optimiser's
        # saved groups would restore ITS capturable flag (and place Adam's step by it)
        for group in (state.get("optimizer") or {}).get("param_groups", []):
            if "capturable" in group or "capturable" in opt.defaults:
                group["capturable"] = bool(cfg.train.cuda_graph)
        checkpoint.restore(tensors, state, self.learner, opt)
        self.scheduler.load_state_dict(state["scheduler"])
        if cfg.train.cuda_graph:  # the checkpoint stores the rate as a number
            for group in opt.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.tasks.set_state(tensors["extra/task_generator"])
        torch.set_rng_state(tensors["extra/torch_rng"])
        if device.type == "cuda" and "extra/cuda_rng" in tensors:
            torch.cuda.set_rng_state(tensors["extra/cuda_rng"], device)
        self.step, self.seconds, self.best = state["step"], state["seconds"], state.get("best")
        self.saved_at = self.seconds
        self.window = Window(state, device)
