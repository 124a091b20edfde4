"""Small seeded models, task batches and run configs shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import metattn as mt

KINDS = ["mlp", "transformer", "conv_bn", "vit"]


def make(kind: str, T: int = 3, S: int = 6, Q: int = 5, n_way: int = 3, seed: int = 0):
    """A tiny model of ``kind`` and a matching classification TaskBatch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        m = mt.MLP(4, [16, 16], n_way)
        sx, qx = torch.randn(T, S, 4, generator=g), torch.randn(T, Q, 4, generator=g)
    elif kind == "transformer":
        m = mt.TokenTransformer(vocab_size=20, max_len=6, n_classes=n_way, d_model=16,
                                n_heads=2, n_layers=2, d_ff=32)
        sx = torch.randint(0, 20, (T, S, 6), generator=g)
        qx = torch.randint(0, 20, (T, Q, 6), generator=g)
    elif kind == "conv_bn":
        m = mt.Conv4(1, n_way, hidden=8, image_size=16)
        sx = torch.randn(T, S, 1, 16, 16, generator=g)
        qx = torch.randn(T, Q, 1, 16, 16, generator=g)
    elif kind == "vit":
        m = mt.ViT(1, n_way, image_size=16, patch_size=4, d_model=16, n_heads=2, n_layers=1)
        sx = torch.randn(T, S, 1, 16, 16, generator=g)
        qx = torch.randn(T, Q, 1, 16, 16, generator=g)
    else:  # pragma: no cover
        raise ValueError(kind)
    m = m.to(torch.get_default_dtype())
    if sx.dtype.is_floating_point:
        sx, qx = sx.to(torch.get_default_dtype()), qx.to(torch.get_default_dtype())
    batch = mt.TaskBatch(sx, torch.randint(0, n_way, (T, S), generator=g), qx,
                         torch.randint(0, n_way, (T, Q), generator=g), n_way=n_way)
    return m, batch


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def meta_grad(learner, batch, **kw) -> tuple[float, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(batch, **kw)
    loss.backward()
    return loss.item(), flat_grad(learner.model)


def meta_train(learner, tasks, steps: int, meta_batch: int, lr: float = 3e-3,
               seed: int = 0) -> None:
    """``steps`` Adam meta-steps of ``meta_batch`` tasks drawn from ``tasks`` (seeded)."""
    opt = torch.optim.Adam(learner.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, _ = learner.meta_loss(tasks.sample(meta_batch, g))
        opt.zero_grad()
        loss.backward()
        opt.step()


def tiny_net(norm: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(2, 8)]
    if norm:
        layers.append(nn.BatchNorm1d(8))
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(8, 1)).double()


def tiny_batch(x_map=None) -> mt.TaskBatch:
    g = torch.Generator().manual_seed(1)
    sx, qx = (torch.randn(3, n, 2, generator=g, dtype=torch.float64) for n in (5, 6))
    if x_map is not None:
        sx, qx = x_map(sx), x_map(qx)
    return mt.TaskBatch(sx, torch.randn(3, 5, 1, generator=g, dtype=torch.float64),
                        qx, torch.randn(3, 6, 1, generator=g, dtype=torch.float64))


def blob_tasks(T: int, g: torch.Generator, n: int = 5, k: int = 1, q: int = 5,
               noise: float = 1.5) -> mt.TaskBatch:
    """Synthetic image episodes: each class is a smooth random 28x28 pattern (a 4x4 Gaussian
    grid upsampled) and each example adds white noise; classes are new in every task, so
    a learner must learn a metric that ignores the noise."""
    low = torch.randn(T * n, 1, 4, 4, generator=g)
    proto = F.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)
    x = proto.view(T, n, 1, 1, 28, 28) + noise * torch.randn(T, n, k + q, 1, 28, 28,
                                                             generator=g)
    y = torch.arange(n).view(1, n, 1)
    return mt.TaskBatch(
        support_x=x[:, :, :k].flatten(1, 2), support_y=y.expand(T, n, k).reshape(T, -1),
        query_x=x[:, :, k:].flatten(1, 2), query_y=y.expand(T, n, q).reshape(T, -1),
        n_way=n, k_shot=k,
    )


TINY = {
    "name": "tiny",
    "seed": 3,
    "task": {"kind": "sinusoid", "k_shot": 5, "k_query": 5},
    "model": {"kind": "mlp", "hidden": [16, 16]},
    "learner": {"kind": "maml", "inner_lr": 0.01, "inner_steps": 1, "eval_inner_steps": 3},
    "train": {"steps": 40, "meta_batch": 4, "lr": 0.003, "log_every": 1, "eval_every": 20,
              "eval_episodes": 20, "checkpoint_every": 10, "progress": False,
              "tensorboard": False, "plots": False},
    "eval": {"episodes": 50, "task": {"k_query": 20}},
}

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny(**changes) -> dict:
    """TINY with ``section__key=value`` changes."""
    cfg = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return cfg


def write_cfg(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(**changes)))
    return path


DT = 1 / 64  # a binary fraction: sums of it are exact


class Clock:
    """A clock for ``train(..., clock=...)``: each call moves the time on by ``dt``; the
    recipe reads it twice per step, so each meta-step takes exactly ``dt`` seconds."""

    def __init__(self, dt: float = DT):
        self.t, self.dt = 0.0, dt

    def __call__(self) -> float:
        self.t += self.dt
        return self.t
