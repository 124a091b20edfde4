"""Built-in builders for configs: task sources, models and learners.

Each function's signature (or options dataclass) is the schema of its config section (see
:mod:`metattn.registry`).
"""

from __future__ import annotations

from torch import nn

from metattn.data.synthetic import SinusoidTasks
from metattn.meta.maml import ANIL, FOMAML, MAML, MAMLpp, MetaSGD
from metattn.nn.backbones import MLP, Conv4, TokenTransformer, ViT
from metattn.registry import register


# ------------------------------------------------------------------ tasks
@register("task", "sinusoid")
def sinusoid(split: str, k_shot: int = 10, k_query: int = 10, noise_std: float = 0.0
             ) -> SinusoidTasks:
    """MAML paper sinusoids (the same distribution for train and test; seeds differ)."""
    return SinusoidTasks(k_shot=k_shot, k_query=k_query, noise_std=noise_std)


# ------------------------------------------------------------------ models
@register("model", "mlp")
def mlp(in_features: int = 1, hidden: list[int] = (40, 40), out_features: int = 1) -> nn.Module:
    """ReLU MLP; the MAML paper's sinusoid regressor is the default (1 -> 40 -> 40 -> 1)."""
    return MLP(in_features, list(hidden), out_features)


@register("model", "conv4")
def conv4(in_channels: int = 1, n_classes: int = 5, hidden: int = 64, image_size: int = 28,
          channels_last: bool = False, track_running_stats: bool = False,
          pool_last: bool = True, fold_first_norm: bool = True) -> nn.Module:
    """The MAML paper's Conv-4; ``track_running_stats``: evaluate metric learners with running
    BatchNorm statistics instead of each test episode's own (MAML always uses the batch's);
    ``pool_last: false`` keeps the last block's 3x3 map (28x28 input: 576 features, not 64);
    ``fold_first_norm: false`` runs the first block's textbook conv + BatchNorm modules
    instead of the equal, faster folded matmul (CPU)."""
    return Conv4(in_channels, n_classes, hidden, image_size, channels_last, track_running_stats,
                 pool_last, fold_first_norm)


@register("model", "vit")
def vit(in_channels: int = 1, n_classes: int = 5, image_size: int = 28, patch_size: int = 7,
        d_model: int = 64, n_heads: int = 4, n_layers: int = 2, d_ff: int | None = None,
        dropout: float = 0.0) -> nn.Module:
    """Small ViT-style encoder: non-overlapping patches, learned positions, Transformer."""
    return ViT(in_channels, n_classes, image_size, patch_size, d_model, n_heads, n_layers, d_ff,
               dropout)


@register("model", "token_transformer")
def token_transformer(vocab_size: int = 1000, max_len: int = 32, n_classes: int = 5,
                      d_model: int = 128, n_heads: int = 4, n_layers: int = 2, d_ff: int = 256,
                      dropout: float = 0.0) -> nn.Module:
    """Token embedding + learned positions + Transformer, mean-pooled: the transformer
    workload of benchmarks/throughput.py."""
    return TokenTransformer(vocab_size, max_len, n_classes, d_model, n_heads, n_layers, d_ff,
                            dropout)


# ------------------------------------------------------------------ learners
# The MAML family: one learner; the other kinds are presets of its options (the keys are
# MAMLOptions' fields, with the preset's defaults).
for _kind, _cls in (("maml", MAML), ("fomaml", FOMAML), ("anil", ANIL), ("metasgd", MetaSGD),
                    ("mamlpp", MAMLpp)):
    register("learner", _kind, options=_cls.Options)(_cls)
