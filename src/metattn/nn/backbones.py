"""Backbones used by the recipes. They are plain ``nn.Module`` s: any user module works too.

Every backbone names its final classifier/regressor ``head`` so that ANIL can adapt only it
(``inner_params=["head"]``) and metric learners can drop it (``model.features``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from metattn.errors import ConfigError
from metattn.nn.attention import TransformerEncoder, unhooked


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


def _foldable(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`_conv_bn_folded` computes ``bn(conv(x))``: an unhooked stride-1 ``Conv2d``
    with few input taps (so its patches are small) and a ``BatchNorm2d`` that always normalises
    with the batch's statistics and updates none (``track_running_stats=False``), on a CPU
    tensor in float32/float64 with more than one value per channel (BatchNorm refuses one;
    an empty batch keeps the modules' behaviour), outside autocast and torch.func transforms
    (which take the modules' own path)."""
    if not (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d
            and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and bn.running_mean is None and bn.num_features == conv.out_channels
            and conv.groups == 1 and _pair(conv.stride) == (1, 1)
            and _pair(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.in_channels * math.prod(_pair(conv.kernel_size)) <= _FOLD_MAX_TAPS
            and not torch.is_autocast_enabled("cpu")
            and not torch._C._are_functorch_transforms_active()
            and not torch.compiler.is_compiling()
            and unhooked(conv, bn)):
        return False
    (kh, kw), (ph, pw) = _pair(conv.kernel_size), _pair(conv.padding)
    return x.shape[0] * (x.shape[2] + 2 * ph - kh + 1) * (x.shape[3] + 2 * pw - kw + 1) > 1


# The patch covariance is taps x taps (in float64) and the patches are taps floats per pixel:
# worth it for a one-channel 3x3 layer (9 taps: Omniglot's Conv-4, 100 -> 75 ms per MAML
# task), not for RGB (27 taps; a 3-channel 84x84 Conv4 took 56 ms folded against 40 ms, one
# thread, forward) nor for 64-channel layers.
_FOLD_MAX_TAPS = 9


def _conv_bn_folded(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))`` for a BatchNorm on batch statistics, as ONE matmul over the input's
    patches with the BatchNorm folded into the weights; returns an NHWC (channels_last) tensor.

    The conv output at a pixel is ``w_c . p + b_c`` for the pixel's patch ``p``, so its batch
    mean is ``w_c . mean(p) + b_c`` and its (biased) variance ``w_c^T Cov(p) w_c``: the
    statistics come from the patches' taps x taps covariance (9 x 9 for one channel) instead of
    two passes over the 64-channel output, and normalising is a per-channel rescale of the
    weights. Same function, so the same gradients and gradients of gradients (to rounding; a
    test checks MAML's meta-gradient in float64). Measured on one core for the Conv-4 MAML
    task (75 queries at 28 x 28): the first block's conv, BatchNorm and NCHW/NHWC copies took
    about 40 of 100 ms; the whole task now takes about 75 ms."""
    n, c, h, w = x.shape
    (kh, kw), (ph, pw) = _pair(conv.kernel_size), _pair(conv.padding)
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    patches = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, 1).unfold(3, kw, 1)  # [N,C,Ho,Wo,kh,kw]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
    # The statistics in float64: they are sums over every pixel (N x 784 for Omniglot), which
    # a float32 matmul accumulates less accurately than BatchNorm's kernel (measured on binary
    # images: 1.5e-5 relative error in the conv weight's gradient, against 4e-6); on taps x
    # taps numbers this costs next to nothing.
    weight = conv.weight.flatten(1)  # [C_out, C_in*kh*kw], the patches' tap order
    wide = weight.double()
    p64 = patches.double()
    mean = p64.mean(0)
    centred = p64 - mean
    cov = centred.t() @ centred / patches.shape[0]
    w_mean = wide @ mean
    var = ((wide @ cov) * wide).sum(1)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    # (b - (w.mean + b)) as BatchNorm computes it: the conv bias cancels, exactly
    shift = -w_mean * scale if conv.bias is None else (conv.bias - (w_mean + conv.bias)) * scale
    if bn.bias is not None:
        shift = bn.bias + shift
    # a contiguous [taps, C_out] operand: autograd then takes the weight gradient as
    # patches^T @ grad, 8x faster on CPU than the transposed form (grad^T @ patches)
    folded = (wide * scale[:, None]).t().contiguous().to(x.dtype)
    out = torch.addmm(shift.to(x.dtype), patches, folded)
    return out.view(n, ho, wo, -1).permute(0, 3, 1, 2)


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

    ``fold_first_norm=True`` (the default) computes the first block's conv and BatchNorm as
    one matmul over 3x3 patches with the normalisation folded into the weights
    (:func:`_conv_bn_folded`): the same function, for one input channel, on CPU
    float32/float64 batches when the BatchNorm keeps no running statistics (the default),
    outside autocast and vmap. The activations then stay channels_last. Measured one Conv-4
    MAML task (5 + 75 images, one core): 100 -> 75 ms. ``False`` runs the textbook modules
    (what the speed benchmark's reference loops run).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 5, hidden: int = 64,
                 image_size: int = 28, channels_last: bool = False,
                 track_running_stats: bool = False, pool_last: bool = True,
                 fold_first_norm: bool = True):
        super().__init__()
        self.fold_first_norm = bool(fold_first_norm)
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
        body = self.body
        if self.fold_first_norm and _foldable(body[0], body[1], x):
            return body[4:](body[3](body[2](_conv_bn_folded(x, body[0], body[1])))).flatten(-3)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return body(x).flatten(-3)

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
