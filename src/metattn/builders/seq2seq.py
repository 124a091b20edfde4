"""Config builders for sequence to sequence: languages as tasks (SIGMORPHON 2018 inflection,
Django's translation catalogs), the Transformer encoder-decoder, and the MAML learner with
the sequence loss (see :mod:`metattn.registry`; each signature is its section's schema)."""

from __future__ import annotations

from torch import nn

from metattn.data.inflection import InflectionTasks
from metattn.data.translation import TranslationTasks
from metattn.meta.maml import MAMLOptions
from metattn.meta.seq2seq import Seq2SeqMAML
from metattn.nn.seq2seq import Seq2SeqTransformer
from metattn.registry import register


# ------------------------------------------------------------------ tasks
@register("task", "inflection")
def inflection(split: str, families: list[str] | None = None, k_shot: int = 16,
               k_query: int = 16, max_src: int = 32, max_tgt: int = 32,
               root: str | None = None) -> InflectionTasks:
    """SIGMORPHON 2018 task 1, each language a task: ``train`` samples the meta-training
    languages' train-high; ``test`` the held-out languages (support: train-low, query: test).
    ``families``: only these families' languages (e.g. ``[germanic, turkic]``); the
    vocabulary size the model needs is logged."""
    return InflectionTasks(split, families=families, k_shot=k_shot, k_query=k_query, root=root,
                           max_src=max_src, max_tgt=max_tgt)


@register("task", "translation")
def translation(split: str, locales: list[str] | None = None, k_shot: int = 16,
                k_query: int = 16, shots: int | None = None, shots_seed: int = 0,
                vocab_size: int = 4000, max_src: int = 64, max_tgt: int = 96,
                root: str | None = None) -> TranslationTasks:
    """English -> X over Django's catalogs, each locale a task: ``train`` samples the
    meta-training locales; ``test`` the held-out locales (support: ``shots`` pairs drawn with
    ``shots_seed``; query: the held-out strings). ``locales``: a subset of the split's;
    ``vocab_size``: the byte-level BPE's (trained on the meta-training text only); pairs
    longer than ``max_src`` / ``max_tgt`` tokens are dropped and counted."""
    return TranslationTasks(split, locales=locales, k_shot=k_shot, k_query=k_query,
                            shots=shots, shots_seed=shots_seed, root=root,
                            vocab_size=vocab_size, max_src=max_src, max_tgt=max_tgt)


# ------------------------------------------------------------------ models
@register("model", "seq2seq")
def seq2seq(vocab_size: int, max_src: int, max_tgt: int, d_model: int = 128, n_heads: int = 4,
            enc_layers: int = 2, dec_layers: int = 2, d_ff: int = 256, dropout: float = 0.0
            ) -> nn.Module:
    """Transformer encoder-decoder over packed rows; ``vocab_size``, ``max_src`` and
    ``max_tgt`` are the task's (its log line names them)."""
    return Seq2SeqTransformer(vocab_size, max_src, max_tgt, d_model, n_heads, enc_layers,
                              dec_layers, d_ff, dropout)


# ------------------------------------------------------------------ learners
# MAML with the sequence loss, reporting token accuracy and exact match; ``first_order:
# true`` is first-order MAML, ``inner_steps: 0`` multilingual training (transfer).
register("learner", "seq2seq_maml", options=MAMLOptions)(Seq2SeqMAML)
