"""metattn: meta-learning attention models.

The public API (``import metattn as mt``); everything else may change.

Learners
    MAML, FOMAML, ANIL, MetaSGD, MAMLpp   the MAML family: one inner loop with options
    ProtoNet, MatchingNet, FEAT           metric learners: attention over the support set
    InContextLearner                      a Transformer that learns from its prompt
    RatingMAML                            MAML reporting MAE, RMSE and nDCG (recommendation)
    Seq2SeqMAML                           MAML with the sequence loss (inflection, translation)
    Learner                               the contract every learner follows
    MAMLOptions                           the MAML family's options, with defaults and checks
Models
    MLP, Conv4, ViT, TokenTransformer     backbones
    HFEncoder                             any Hugging Face encoder (pip install metattn[text])
    ICLTransformer                        the in-context regressor (Garg et al. 2022)
    MeLU, RatingSetTransformer            rating models: MeLU's, and attention over a user's set
    Seq2SeqTransformer, greedy_decode, beam_search
                                          encoder-decoder (cross-attention) and its decoding
    MultiHeadAttention, TransformerBlock, TransformerEncoder, scaled_dot_product_attention
    double_backward, record_attention     attention's second-derivative path and read-out
    capture_attention, AttentionMaps, attention_rollout, push_attention
                                          named per-layer maps, rollout, custom attention
Tasks
    TaskBatch                             a batch of few-shot tasks (support and query sets)
    SinusoidTasks, OmniglotTasks          task samplers: the MAML paper's sinusoids, Omniglot
    IntentTasks, load_intents             few-shot intent episodes (CLINC150, Banking77)
    MovieLensTasks                        MovieLens 100K users as cold-start tasks (MeLU)
    InflectionTasks, TranslationTasks     languages as seq2seq tasks (SIGMORPHON 2018, Django)
    LinearTasks, ReLUNetTasks, DecisionTreeTasks   in-context function families
    fixed_episodes, mean_ci95             the fixed test episodes, mean and 95% CI
Runs
    load_config, train, load_run, evaluate_run, TimeBudget, CUDAGraphStep
    explain_run                           attention figures + offline HTML report of a run
Errors
    MetattnError, ConfigError, TaskError, DataError, InnerLoopError, CheckpointError,
    TrainingError

Names are imported when first used, so ``import metattn`` (and ``metattn --help``) does not
load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "metattn.meta.maml": ("MAML", "FOMAML", "ANIL", "MetaSGD", "MAMLpp", "MAMLOptions"),
    "metattn.meta.metric": ("ProtoNet", "MatchingNet", "FEAT"),
    "metattn.meta.incontext": ("InContextLearner",),
    "metattn.meta.base": ("Learner",),
    "metattn.meta.ranking": ("RatingMAML",),
    "metattn.meta.seq2seq": ("Seq2SeqMAML",),
    "metattn.nn.seq2seq": ("Seq2SeqTransformer", "greedy_decode", "beam_search"),
    "metattn.nn": ("MLP", "Conv4", "ViT", "TokenTransformer", "ICLTransformer", "MeLU",
                   "RatingSetTransformer",
                   "MultiHeadAttention", "TransformerBlock", "TransformerEncoder",
                   "scaled_dot_product_attention", "double_backward", "record_attention",
                   "capture_attention", "AttentionMaps", "attention_rollout",
                   "push_attention"),
    "metattn.data.tasks": ("TaskBatch", "fixed_episodes", "mean_ci95"),
    "metattn.data.synthetic": ("SinusoidTasks",),
    "metattn.data.omniglot": ("OmniglotTasks",),
    "metattn.data.intents": ("IntentTasks", "load_intents"),
    "metattn.nn.hf": ("HFEncoder",),
    "metattn.data.movielens": ("MovieLensTasks",),
    "metattn.data.inflection": ("InflectionTasks",),
    "metattn.data.translation": ("TranslationTasks",),
    "metattn.data.functions": ("LinearTasks", "ReLUNetTasks", "DecisionTreeTasks"),
    "metattn.config": ("load_config",),
    "metattn.recipe": ("train", "load_run", "evaluate_run", "TimeBudget", "CUDAGraphStep"),
    "metattn.explain": ("explain_run",),
    "metattn.errors": ("MetattnError", "ConfigError", "TaskError", "DataError",
                       "InnerLoopError", "CheckpointError", "TrainingError"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [*_WHERE, "errors", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("metattn.errors")
    if name not in _WHERE:
        raise AttributeError(f"module 'metattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
