"""From a config to objects: the task samplers, the learner with its model, the optimiser."""

from __future__ import annotations

import math
from typing import Any

import torch

from metattn import registry
from metattn.config import RunConfig
from metattn.meta.base import Learner
from metattn.optim import MuonAdam, split_for_muon


def build_tasks(cfg: RunConfig) -> tuple[Any, Any]:
    """The train and test task samplers."""
    return (registry.build("task", cfg.task, "train"),
            registry.build("task", cfg.test_task_spec(), "test"))


def build_learner(cfg: RunConfig, device: torch.device | str = "cpu") -> Learner:
    """The learner and its model, seeded by ``cfg.seed``, on ``device`` in
    ``train.dtype``."""
    torch.manual_seed(cfg.seed)
    return _learner(cfg, device)


def build(cfg: RunConfig, device: torch.device) -> tuple[Any, Any, Learner]:
    """Train sampler, test sampler and learner (with its model) from the config, all after
    ``torch.manual_seed(cfg.seed)``."""
    torch.manual_seed(cfg.seed)
    train_tasks, test_tasks = build_tasks(cfg)
    return train_tasks, test_tasks, _learner(cfg, device)


def _learner(cfg: RunConfig, device: torch.device | str) -> Learner:
    model = registry.build("model", cfg.model)
    learner = registry.build("learner", cfg.learner, model)
    return learner.to(device=device, dtype=getattr(torch, cfg.train.dtype))


def make_optimizer(cfg: RunConfig, learner: Learner, device: torch.device | None = None
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and its learning-rate schedule. With ``train.cuda_graph`` Adam/AdamW are
    built ``capturable`` with the rate as a tensor on ``device``, so that the schedule's
    in-place updates reach a replayed CUDA graph (a float rate would be frozen into it)."""
    t = cfg.train
    params = [p for p in learner.parameters() if p.requires_grad]
    # foreach: one multi-tensor kernel per update instead of a Python loop over parameters
    # (PyTorch picks it by default on CUDA only); the same numbers as the loop.
    graph = {"capturable": True} if t.cuda_graph else {}
    lr: float | torch.Tensor = torch.tensor(t.lr, device=device) if t.cuda_graph else t.lr
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay,
                              foreach=True)
    elif t.optimizer == "muon":  # Muon on hidden matrices, Adam on the rest
        opt = MuonAdam(*split_for_muon(learner.named_parameters()), lr=t.lr,
                       weight_decay=t.weight_decay)
    elif t.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, foreach=True,
                                **graph)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay, foreach=True,
                               **graph)

    def factor(step: int) -> float:
        # A linear warm-up to the base rate, then (cosine) a half cosine from the base rate at
        # the end of the warm-up to zero at train.steps.
        w = t.warmup_steps
        if t.schedule == "cosine":
            # at most half the horizon (also one a time budget shrank), so the rate still
            # decays to zero at train.steps
            w = min(w, t.steps // 2)
        if w > 0 and step < w:
            return (step + 1) / w
        if t.schedule == "cosine" and t.steps > 0:
            done = min((step - w) / max(t.steps - w, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
