"""Sequence-to-sequence learning: the loss over packed targets, the metrics (exact match,
Levenshtein distance, chrF, BLEU), plain fine-tuning, and the MAML learner that reports them.

Targets are ``y [..., L_t]`` with -100 after EOS (``metattn.data.seq2seq.pack``). Under
teacher forcing, every position's argmax equals the reference (EOS included) exactly when
greedy decoding reproduces the reference, so :func:`sequence_accuracy`'s ``exact_match``
is greedy decoding's exact-match accuracy, from one forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metattn.data.seq2seq import IGNORE
from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError
from metattn.meta.base import LossFn, check_batch
from metattn.meta.maml import MAML


def sequence_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of ``logits [..., L_t, V]`` against ``y [..., L_t]``
    (positions holding -100 skipped)."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE)


def sequence_accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``token_accuracy`` and ``exact_match`` (all tokens right) per task, logits ``[T, Q,
    L_t, V]`` and targets ``[T, Q, L_t]`` -> ``[T]`` each."""
    keep = y != IGNORE
    right = (logits.argmax(-1) == y) & keep
    tokens = right.sum((1, 2)).float() / keep.sum((1, 2)).clamp_min(1).float()
    exact = (right | ~keep).all(-1).float().mean(-1)
    return {"token_accuracy": tokens, "exact_match": exact}


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def string_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy (%) and mean Levenshtein distance, as the SIGMORPHON scorer."""
    if len(hyps) != len(refs) or not refs:
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references; need the same, "
                         ">= 1")
    exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    dist = sum(levenshtein(h, r) for h, r in zip(hyps, refs)) / len(refs)
    return {"accuracy": 100.0 * exact, "levenshtein": dist}


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, 4-grams), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-3,
              batch_size: int = 32, seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """A copy of ``model`` trained with Adam for ``steps`` minibatches (drawn with ``seed``)
    of ONE task's pairs ``x [N, L]``, ``y [N, L_t]``: the adaptation that transfer, training
    from scratch and meta-learned initialisations share. The copy is returned in eval mode."""
    tuned = copy.deepcopy(model).train()
    for p in tuned.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    order = torch.randperm(n, generator=g)
    at = 0
    for _ in range(steps):
        if at + min(batch_size, n) > n:
            order, at = torch.randperm(n, generator=g), 0
        idx = order[at: at + batch_size]
        at += len(idx)
        loss = sequence_loss(tuned(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tuned.eval()


class Seq2SeqMAML(MAML):
    """:class:`MAML` with the sequence loss by default, whose ``evaluate`` adds per-task
    ``token_accuracy`` and ``exact_match`` (greedy decoding's, see the module docstring);
    ``first_order: true`` is first-order MAML, ``inner_steps: 0`` plain multi-task training
    (the multilingual transfer model)."""

    label_dims = 2  # one target sequence [L_t] per example

    def __init__(self, model: nn.Module, inner_lr: float | None = None, **options):
        options.setdefault("loss_fn", sequence_loss)
        super().__init__(model, inner_lr, **options)
        self._vocab_checked = False

    def _check_vocab(self, batch: TaskBatch) -> None:
        """Once: the task's token ids fit the model's embedding (else a clear error, not an
        index error deep in the forward)."""
        embed = getattr(self.model, "embed", None)
        if self._vocab_checked or not isinstance(embed, nn.Embedding):
            return
        top = int(max(batch.support_x.max(), batch.query_x.max(), batch.query_y.max()))
        if top >= embed.num_embeddings:
            raise ConfigError(f"the task's token ids reach {top} but the model's vocab_size is "
                              f"{embed.num_embeddings}; set model.vocab_size to the task's "
                              "vocabulary size (the task logs it)", key="vocab_size",
                              owner="seq2seq")
        self._vocab_checked = True

    def meta_loss(self, batch: TaskBatch, loss_fn: LossFn | None = None,
                  step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_vocab(check_batch(batch, "Seq2SeqMAML.meta_loss"))
        return super().meta_loss(batch, loss_fn, step)

    def evaluate(self, batch: TaskBatch, loss_fn: LossFn | None = None,
                 steps: int | None = None) -> dict[str, torch.Tensor]:
        self._check_vocab(check_batch(batch, "Seq2SeqMAML.evaluate"))
        return super().evaluate(batch, loss_fn, steps)

    def query_metrics(self, pred: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Token accuracy and exact match of the adapted logits."""
        return sequence_accuracy(pred, batch.query_y)
