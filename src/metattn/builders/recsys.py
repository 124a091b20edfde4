"""Config builders for cold-start recommendation: MovieLens tasks, the MeLU and attention
rating models, and the MAML learner that reports rating metrics (see
:mod:`metattn.registry`; each signature is the schema of its config section)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from metattn.data.movielens import MovieLensTasks
from metattn.meta.maml import MAMLOptions
from metattn.meta.ranking import RatingMAML
from metattn.nn.recsys import MeLU, RatingSetTransformer
from metattn.registry import register


# ------------------------------------------------------------------ tasks
@register("task", "movielens")
def movielens(split: str, scenario: Literal["new_users", "new_items", "both_new"] = "new_users",
              k_shot: int = 10, k_query: int = 10, root: str | None = None,
              context: bool = False, user_seed: int = 0) -> MovieLensTasks:
    """MovieLens 100K users as tasks (MeLU's protocol): ``train`` = existing users and
    items; ``test`` = the ``scenario``'s new users and/or items. ``context``: every row
    carries the support set (for ``rating_set_transformer``)."""
    return MovieLensTasks(split=split, scenario=scenario, k_shot=k_shot, k_query=k_query,
                          root=root, context=context, user_seed=user_seed)


# ------------------------------------------------------------------ models
@register("model", "melu")
def melu(dim: int = 32, hidden: int = 64, n_items: int = 0) -> nn.Module:
    """MeLU: item (genres, year) and user (age, gender, occupation, zip) embeddings, decision
    layers ``fc1``, ``fc2`` (``hidden`` wide) and output ``out``; ``n_items`` > 0 adds an
    item-id embedding (zero for an item no training rating reaches: a new item)."""
    return MeLU(dim, hidden, n_items)


@register("model", "rating_set_transformer")
def rating_set_transformer(dim: int = 32, d_model: int = 64, n_heads: int = 4,
                           n_layers: int = 2, hidden: int = 64, dropout: float = 0.0,
                           n_items: int = 0, user_features: bool = True) -> nn.Module:
    """The query item attends over the support items and ratings (a Transformer set
    encoder), then MeLU's decision layers; needs ``task.context: true``. ``n_items``: as
    for ``melu``; ``user_features: false`` leaves the user's demographics out."""
    return RatingSetTransformer(dim, d_model, n_heads, n_layers, hidden, dropout, n_items,
                                user_features)


# ------------------------------------------------------------------ learners
# MAML whose evaluation adds MAE, RMSE and nDCG@1/3; MeLU's local update is
# ``inner_params: [fc1, fc2, out]``, the global model ``inner_steps: 0``.
register("learner", "rating_maml", options=MAMLOptions)(RatingMAML)
