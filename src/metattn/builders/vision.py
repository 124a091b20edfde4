"""Config builders for image few-shot learning: the Omniglot task source and metric learners.

Each function's signature is the schema of its config section (see :mod:`metattn.registry`).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from metattn.data.omniglot import OmniglotTasks
from metattn.meta.metric import FEAT, MatchingNet, ProtoNet
from metattn.registry import register


# ------------------------------------------------------------------ tasks
@register("task", "omniglot")
def omniglot(split: str, n_way: int = 5, k_shot: int = 1, k_query: int = 15,
             protocol: Literal["maml", "background"] = "maml", root: str | None = None,
             rotations: bool = True, shift: int = 0) -> OmniglotTasks:
    """Omniglot N-way K-shot episodes ("maml": 1200/423 characters x 4 rotations;
    "background": background/evaluation alphabets). ``root`` holds the official zips.
    ``shift``: training episodes only, each image translated by up to that many pixels."""
    return OmniglotTasks(split=split, n_way=n_way, k_shot=k_shot, k_query=k_query,
                         protocol=protocol, root=root, rotations=rotations,
                         shift=shift if split == "train" else 0)


# ------------------------------------------------------------------ learners
@register("learner", "protonet")
def protonet(model: nn.Module, scale: float = 1.0, learn_scale: bool = False,
             train_loss: Literal["proto", "nca"] = "proto", test_shift: int = 0) -> ProtoNet:
    """Prototypical Networks: logits = -scale * squared distance to the class means;
    ``train_loss: nca`` trains on all pairs of each episode (evaluation unchanged);
    ``test_shift``: evaluation embeds each image at every shift by up to that many pixels and
    averages (test-time augmentation)."""
    return ProtoNet(model, scale=scale, learn_scale=learn_scale, train_loss=train_loss,
                    test_shift=test_shift)


@register("learner", "matching")
def matching(model: nn.Module, fce: bool = False, fce_steps: int = 5,
             temperature: float = 10.0, learn_temperature: bool = True,
             dim: int | None = None, test_shift: int = 0) -> MatchingNet:
    """Matching Networks: softmax attention over cosine similarities to the support set."""
    return MatchingNet(model, fce=fce, fce_steps=fce_steps, temperature=temperature,
                       learn_temperature=learn_temperature, dim=dim, test_shift=test_shift)


@register("learner", "feat")
def feat(model: nn.Module, temperature: float = 1.0, temperature2: float = 1.0,
         balance: float = 0.1, n_heads: int = 1, dropout: float = 0.5,
         attn_dropout: float = 0.1, dim: int | None = None, test_shift: int = 0) -> FEAT:
    """FEAT: attention-adapted prototypes plus the contrastive regulariser (weight balance)."""
    return FEAT(model, temperature=temperature, temperature2=temperature2, balance=balance,
                n_heads=n_heads, dropout=dropout, attn_dropout=attn_dropout, dim=dim,
                test_shift=test_shift)
