"""Attention, Transformer blocks and backbones."""

from metattn.nn.attention import (
    MultiHeadAttention,
    TransformerBlock,
    TransformerEncoder,
    double_backward,
    double_backward_enabled,
    fused_allowed,
    push_attention,
    record_attention,
    scaled_dot_product_attention,
)
from metattn.nn.backbones import MLP, Conv4, TokenTransformer, ViT
from metattn.nn.incontext import ICLTransformer
from metattn.nn.interpret import AttentionMaps, attention_rollout, capture_attention
from metattn.nn.recsys import MeLU, RatingSetTransformer

__all__ = [
    "MultiHeadAttention",
    "TransformerBlock",
    "TransformerEncoder",
    "double_backward",
    "double_backward_enabled",
    "fused_allowed",
    "push_attention",
    "record_attention",
    "AttentionMaps",
    "attention_rollout",
    "capture_attention",
    "scaled_dot_product_attention",
    "MLP",
    "Conv4",
    "ViT",
    "TokenTransformer",
    "ICLTransformer",
    "MeLU",
    "RatingSetTransformer",
]
