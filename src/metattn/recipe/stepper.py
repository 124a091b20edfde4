"""How the recipe steps: :class:`Stepper` runs :func:`~metattn.recipe.step.meta_step` eagerly
(one process, or DDP) or through a CUDA graph."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from metattn.config import RunConfig
from metattn.data.tasks import TaskBatch
from metattn.meta.base import Learner
from metattn.recipe.cuda_graph import CUDAGraphStep
from metattn.recipe.distributed import reduce_step
from metattn.recipe.step import Metrics, autocast_dtype, check_loss, check_replayed, meta_step


class Stepper:
    """How the recipe steps: eagerly (under DDP with one all-reduce of the step's metrics,
    loss and Ctrl-C flag), or from a CUDA graph (``train.cuda_graph``), whose meta-losses
    are checked for NaN at :meth:`drain`, so the host never waits for a replay."""

    def __init__(self, cfg: RunConfig, learner: Learner, optimizer: torch.optim.Optimizer,
                 device: torch.device, world: int, run_dir: Path, rank: int = 0,
                 start: int = 0):
        self.optimizer, self.device, self.world, self.run_dir = optimizer, device, world, run_dir
        self.amp = autocast_dtype(cfg.train.autocast, device) \
            if cfg.train.dtype == "float32" else None
        self.grad_clip = cfg.train.grad_clip
        self.model: torch.nn.Module = learner
        if world > 1:
            # find_unused_parameters: the metric learners never use the backbone's ``head``
            # and MAML with zero inner steps never uses learned inner rates; without it DDP
            # stops at the second step waiting for their gradients.
            self.model = torch.nn.parallel.DistributedDataParallel(
                learner, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True)
            # every rank its own random stream (dropout masks, vmap randomness), reproducible
            # from (seed, rank, start step); one process keeps the plain seeded stream
            torch.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + start)
        # train.cuda_graph: 3 eager warm-up steps, then every step replays one captured graph
        self.graph = CUDAGraphStep(learner, optimizer, warmup=3, autocast=self.amp,
                                   grad_clip=self.grad_clip) if cfg.train.cuda_graph else None
        self.replayed: list[torch.Tensor] = []  # replayed meta-losses not yet NaN-checked
        self.stop_agreed = False  # under several processes: every rank's Ctrl-C verdict

    def __call__(self, batch: TaskBatch, step: int, stop: bool) -> Metrics:
        """One meta-step at outer step ``step``; ``stop``: this rank's Ctrl-C flag."""
        if self.graph is not None:
            # the graph's outputs are overwritten by the next replay: copies are kept
            loss, metrics = self.graph(batch)
            self.replayed.append(loss.clone())
            return {k: v.clone() for k, v in metrics.items()}

        def check(loss: torch.Tensor, metrics: Metrics) -> Metrics:
            loss_all = loss.detach()
            if self.world > 1:
                # one small collective: whole-batch metrics for the log, the same finiteness
                # verdict and the same Ctrl-C decision on every rank
                metrics, loss_all, self.stop_agreed = reduce_step(metrics, loss, stop,
                                                                  self.world)
            check_loss(loss_all, step, self.run_dir)
            return metrics

        return meta_step(self.model, self.optimizer, batch, step, autocast=self.amp,
                         grad_clip=self.grad_clip, check=check)[1]

    def stopping(self, requested: bool) -> bool:
        """Whether the run stops: this process's Ctrl-C, or under several processes the
        verdict every rank agreed on at the last step."""
        return self.stop_agreed if self.world > 1 else requested

    def drain(self, step: int) -> float:
        """CUDA graphs: wait for the replays (their time is training time: a time budget sees
        the GPU's time) and check their meta-losses; returns the seconds waited."""
        if self.graph is None:
            return 0.0
        t = time.perf_counter()
        torch.cuda.current_stream(self.device).synchronize()
        waited = time.perf_counter() - t
        losses, self.replayed = self.replayed, []
        check_replayed(losses, step, self.run_dir)
        return waited
