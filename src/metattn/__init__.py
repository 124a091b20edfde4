"""metattn: meta-learning attention models.

Public API lives here; everything else may change.
"""

from metattn import errors
from metattn.data import SinusoidTasks, TaskBatch, mean_ci95
from metattn.errors import ConfigError, DataError, InnerLoopError, MetattnError, TaskError
from metattn.meta import ANIL, FOMAML, MAML, Learner, MAMLpp, MetaSGD
from metattn.nn import (
    MLP,
    Conv4,
    MultiHeadAttention,
    TokenTransformer,
    TransformerBlock,
    TransformerEncoder,
    ViT,
    double_backward,
    record_attention,
    scaled_dot_product_attention,
)

__version__ = "0.1.0"

__all__ = [
    "errors",
    "TaskBatch",
    "SinusoidTasks",
    "mean_ci95",
    "MetattnError",
    "TaskError",
    "InnerLoopError",
    "ConfigError",
    "DataError",
    "Learner",
    "MAML",
    "FOMAML",
    "ANIL",
    "MetaSGD",
    "MAMLpp",
    "MLP",
    "Conv4",
    "ViT",
    "TokenTransformer",
    "MultiHeadAttention",
    "TransformerBlock",
    "TransformerEncoder",
    "double_backward",
    "record_attention",
    "scaled_dot_product_attention",
]
