"""Does the attention matter? A deletion test (attention is not automatically an explanation:
Jain & Wallace 2019; Wiegreffe & Pinter 2019).

For each query, one key is removed from its attention: the most attended one ("top"), a key
drawn at random ("random") or the least attended one ("lowest"). Re-predicting without it
shows how often the prediction changes and how much the true class's probability drops. If
the attention explains the prediction, removing the top key changes it much more often
than removing a random one, and removing the lowest barely at all.

:func:`deletion_test` is the measurement on any attention (support examples, prototypes,
tokens of a text query); :func:`support_deletion` applies it to the attention learners:

* Matching Networks: the keys are the support examples; a removed one leaves the softmax
  over the support set (a class left with no example gets probability 0).
* FEAT: the keys are the class prototypes its set-to-set attention reads; the query's
  attention is the row of the prototype of its predicted class, and a removed key is masked
  in that attention for every prototype of the task (re-adapted per query).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError
from metattn.meta.base import eval_mode
from metattn.meta.metric import FEAT, MatchingNet, class_means

REMOVALS = ("top", "random", "lowest")


def pick(weights: torch.Tensor, how: str, g: torch.Generator) -> torch.Tensor:
    """The key to remove for each row of ``weights [..., K]`` -> indices ``[...]``."""
    if how == "top":
        return weights.argmax(-1)
    if how == "lowest":
        return weights.argmin(-1)
    if how == "random":
        return torch.randint(0, weights.shape[-1], weights.shape[:-1], generator=g).to(
            weights.device)
    raise ValueError(f"removal {how!r}; choose one of {REMOVALS}")


def deletion_test(weights: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor],
                  y: torch.Tensor, g: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Remove one key per query and re-predict.

    ``weights [..., K]``: each query's attention over its keys. ``predict(drop)``: class
    probabilities ``[..., C]`` with the keys where ``drop [..., K]`` (bool) is True removed.
    ``y [...]``: the true classes. Returns ``{removal: {"changed", "true_prob_drop"}}``, each
    ``[...]``: whether the predicted class changed (0/1) and ``p_true(before) - p_true(after)``.
    """
    base = predict(torch.zeros_like(weights, dtype=torch.bool))
    p_true = base.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    out = {}
    for how in REMOVALS:
        drop = F.one_hot(pick(weights, how, g), weights.shape[-1]).bool()
        p = predict(drop)
        out[how] = {
            "changed": (p.argmax(-1) != base.argmax(-1)).to(weights.dtype),
            "true_prob_drop": p_true - p.gather(-1, y.unsqueeze(-1)).squeeze(-1),
        }
    return out


def _matching(learner: MatchingNet, batch: TaskBatch, n: int
              ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    zs, zq = learner.embed(batch.support_x, batch.query_x)
    s = learner.scores(zs, zq)  # [T, Q, S]

    def predict(drop: torch.Tensor) -> torch.Tensor:
        return learner.class_log_probs(s.masked_fill(drop, float("-inf")),
                                       batch.support_y, n).exp()

    return torch.softmax(s, -1), predict


def _feat(learner: FEAT, batch: TaskBatch, n: int
          ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    zs, zq = learner.embed(batch.support_x, batch.query_x)
    protos = class_means(zs, batch.support_y, n)  # [T, n, D]
    T, Q = zq.shape[:2]

    def predict(drop: torch.Tensor) -> torch.Tensor:  # drop [T, Q, n]: per-query key masks
        x = protos.unsqueeze(1).expand(T, Q, *protos.shape[1:])
        keep = (~drop).unsqueeze(-2).expand(T, Q, n, n)
        adapted = learner.set_fn(x, mask=keep)  # [T, Q, n, D]
        d = (zq.unsqueeze(-2) - adapted).pow(2).sum(-1)
        return torch.softmax(-d / learner.temperature, -1)

    mha = learner.set_fn.attn
    _, a = mha(protos, need_weights=True)
    rows = a.mean(-3)  # [T, n, n]: each prototype's attention over the prototypes
    pred = predict(torch.zeros(T, Q, n, dtype=torch.bool, device=zq.device)).argmax(-1)
    return rows.gather(1, pred.unsqueeze(-1).expand(T, Q, n)), predict


def support_deletion(learner: MatchingNet | FEAT, batch: TaskBatch, g: torch.Generator
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`deletion_test` on an attention learner's episodes, in eval mode without a
    graph; each value is per episode ``[T]`` (the mean over its queries)."""
    n = batch.n_way if batch.n_way is not None else int(batch.support_y.max()) + 1
    if isinstance(learner, MatchingNet):
        make = _matching
    elif isinstance(learner, FEAT):
        make = _feat
    else:
        raise ConfigError(f"the deletion test reads a learner's attention over its support "
                          f"set: Matching Networks or FEAT, not {type(learner).__name__}")
    with eval_mode(learner), torch.no_grad():
        weights, predict = make(learner, batch, n)
        res = deletion_test(weights, predict, batch.query_y, g)
    return {how: {k: v.float().mean(-1) for k, v in r.items()} for how, r in res.items()}
