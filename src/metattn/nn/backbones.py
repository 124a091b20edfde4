"""Backbones used by the recipes. They are plain ``nn.Module`` s: any user module works too.

Every backbone names its final classifier/regressor ``head`` so that ANIL can adapt only it
(``adapt=["head"]``) and metric learners can drop it (``model.features``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metattn.errors import ConfigError
from metattn.nn.attention import TransformerEncoder


def _positive(**sizes: list[int]) -> None:
    """Layer sizes must be >= 1 (0 would train a model that ignores its input)."""
    for owner, values in sizes.items():
        if any(int(v) < 1 for v in values):
            raise ConfigError(f"{owner}: layer sizes {list(values)}; every size must be >= 1")


class MLP(nn.Module):
    """Fully connected ReLU network; the MAML paper's sinusoid model is ``MLP(1, [40, 40], 1)``."""

    def __init__(self, in_features: int = 1, hidden: list[int] | tuple[int, ...] = (40, 40),
                 out_features: int = 1):
        super().__init__()
        _positive(MLP=[in_features, *hidden, out_features])
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _NHWCMaxPool2x2(torch.autograd.Function):
    """2x2 max-pool of an NCHW CPU tensor, found in NHWC order. PyTorch's NCHW CPU kernel is
    slow (forward 12 ms for 75 x 64 x 28 x 28 on 2 threads, bf16 or fp32, against 0.5-0.7 ms
    for the same tensor in NHWC order); reordering the input, pooling and reordering the
    (4x smaller) output and indices back costs 3.7 ms in bf16 and 5.7 ms in fp32. The indices
    are spatial positions in either order, so the backward is ATen's own NCHW
    ``max_pool2d_with_indices_backward``: the same gradient, and itself differentiable (the
    MAML inner step's gradient is differentiated again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        y, idx = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2])
        idx = idx.contiguous()
        ctx.save_for_backward(x, idx)
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


class MaxPool2x2(nn.Module):
    """``F.max_pool2d(x, 2)`` with a faster CPU path for NCHW inputs (:class:`_NHWCMaxPool2x2`;
    the same values, gradients and gradients of gradients). Other devices, NHWC inputs, and
    any input while a torch.func transform is active (MAML's vmap path, ``torch.func.grad``)
    or under ``torch.compile`` take ``F.max_pool2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch._C._are_functorch_transforms_active()  # first: vmap cannot answer below
                and not torch.compiler.is_compiling()
                and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()
                and not x.is_contiguous(memory_format=torch.channels_last)):
            return _NHWCMaxPool2x2.apply(x)
        return F.max_pool2d(x, 2)


class Conv4(nn.Module):
    """The MAML paper's Omniglot network: 4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool], linear.

    BatchNorm uses the statistics of the batch it sees (``track_running_stats=False``, the
    default), as in the paper's reference code, so train and test behave alike and per-task
    batches are normalised on their own. ``track_running_stats=True`` is the usual PyTorch
    BatchNorm instead: batch statistics in training mode, running averages in eval mode (what
    the Prototypical Networks code evaluates with; a 5-way test episode's own statistics differ
    from those of the many-way training episodes). MAML ignores it and always normalises with
    batch statistics.

    Each block applies the max-pool BEFORE the ReLU: the two commute exactly (ReLU is
    monotone, so max(relu(a), relu(b)) = relu(max(a, b)), and the gradients agree too), and
    the ReLU then runs on a quarter of the values. Parameter names are those of the textbook
    order, so checkpoints are interchangeable.

    ``pool_last=False`` drops the last block's max-pool, so a 28x28 image gives a 64 x 3 x 3
    map (576 features for metric learners) instead of 64 x 1 x 1; the parameters are the same.

    ``channels_last=True`` keeps weights and activations in NHWC order (same numbers): oneDNN's
    CPU convolutions are faster so (measured, 180 images, one core: 1.3-1.5x for forward +
    backward). Leave it off under vmap (MAML's vectorised path), which batches 5-D inputs.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 5, hidden: int = 64,
                 image_size: int = 28, channels_last: bool = False,
                 track_running_stats: bool = False, pool_last: bool = True):
        super().__init__()
        _positive(Conv4=[in_channels, n_classes, hidden])
        if image_size < 16:
            raise ConfigError(
                f"Conv4: image_size={image_size}; four 2x2 max-pools need images of at least "
                "16x16 (resize the inputs, or use a backbone with fewer blocks)")
        self.channels_last = bool(channels_last)
        blocks: list[nn.Module] = []
        c = in_channels
        size = image_size
        for i in range(4):
            pool = pool_last or i < 3
            blocks += [
                nn.Conv2d(c, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=track_running_stats),
                # before the ReLU: same values, 4x fewer ReLUs (see above); Identity keeps
                # the parameter names when the last block does not pool
                MaxPool2x2() if pool else nn.Identity(),
                nn.ReLU(),
            ]
            c = hidden
            size = size // 2 if pool else size
        self.body = nn.Sequential(*blocks)
        self.feature_dim = hidden * size**2
        self.head = nn.Linear(self.feature_dim, n_classes)
        if self.channels_last:
            self.body.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x).flatten(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ViT(nn.Module):
    """Small ViT-style encoder: non-overlapping patches, learned positions, Transformer, mean."""

    def __init__(self, in_channels: int = 1, n_classes: int = 5, image_size: int = 28,
                 patch_size: int = 7, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 d_ff: int | None = None, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(
                f"ViT: image_size={image_size} is not a multiple of patch_size={patch_size}; "
                "pick a patch size that divides the image"
            )
        self.patch_size = patch_size
        n_patches = (image_size // patch_size) ** 2
        self.patch = nn.Linear(in_channels * patch_size * patch_size, d_model)
        self.pos = nn.Parameter(torch.randn(n_patches, d_model) * 0.02)
        self.encoder = TransformerEncoder(d_model, n_heads, n_layers, d_ff, dropout)
        self.feature_dim = d_model
        self.head = nn.Linear(d_model, n_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., C, H, W]`` -> ``[..., n_patches, C * p * p]`` (row-major patch order)."""
        p = self.patch_size
        c, h, w = x.shape[-3:]
        x = x.unflatten(-2, (h // p, p)).unflatten(-1, (w // p, p))  # [..., C, h, p, w, p]
        x = x.movedim(-5, -1)  # [..., h, p, w, p, C]
        x = x.transpose(-4, -3)  # [..., h, w, p, p, C]
        return x.flatten(-5, -4).flatten(-3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = self.patch(self.patches(x)) + self.pos
        return self.encoder(z).mean(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TokenTransformer(nn.Module):
    """Token classifier: embedding + positions, Transformer encoder, mean pool, linear head."""

    def __init__(self, vocab_size: int = 1000, max_len: int = 32, n_classes: int = 5,
                 d_model: int = 128, n_heads: int = 4, n_layers: int = 2, d_ff: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.encoder = TransformerEncoder(d_model, n_heads, n_layers, d_ff, dropout)
        self.feature_dim = d_model
        self.head = nn.Linear(d_model, n_classes)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        return self.encoder(z).mean(-2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))
