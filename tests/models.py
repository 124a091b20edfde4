"""Small seeded models and task batches shared by the core tests."""

from __future__ import annotations

import torch

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
