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

:func:`token_deletion` applies it to the tokens of text queries (a metric learner over a
Hugging Face encoder): the keys are the query sentence's tokens, weighed by attention
rollout into the sentence embedding (:func:`token_rollout`); a removed token's id becomes
the pad id, which takes it out of every layer's attention and of the pooling. [CLS] and
[SEP] are never removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metattn.data.tasks import TaskBatch, mean_ci95
from metattn.errors import ConfigError
from metattn.meta.base import Learner, eval_mode
from metattn.meta.incontext import InContextLearner
from metattn.meta.metric import FEAT, MatchingNet, MetricLearner, class_means
from metattn.nn.interpret import attention_rollout

REMOVALS = ("top", "random", "lowest")


def pick(weights: torch.Tensor, how: str, g: torch.Generator,
         valid: torch.Tensor | None = None) -> torch.Tensor:
    """The key to remove for each row of ``weights [..., K]`` -> indices ``[...]``; with
    ``valid [..., K]`` (bool) only among the valid keys (each row needs one)."""
    if how not in REMOVALS:
        raise ValueError(f"removal {how!r}; choose one of {REMOVALS}")
    if how == "random":
        if valid is None:
            return torch.randint(0, weights.shape[-1], weights.shape[:-1], generator=g).to(
                weights.device)
        rows = valid.reshape(-1, valid.shape[-1]).float().cpu()
        return torch.multinomial(rows, 1, generator=g).view(valid.shape[:-1]).to(
            weights.device)
    if valid is not None:
        weights = weights.masked_fill(~valid, float("-inf") if how == "top" else float("inf"))
    return weights.argmax(-1) if how == "top" else weights.argmin(-1)


def deletion_test(weights: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor],
                  y: torch.Tensor, g: torch.Generator, valid: torch.Tensor | None = None
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Remove one key per query and re-predict.

    ``weights [..., K]``: each query's attention over its keys. ``predict(drop)``: class
    probabilities ``[..., C]`` with the keys where ``drop [..., K]`` (bool) is True removed.
    ``y [...]``: the true classes. Returns ``{removal: {"changed", "true_prob_drop"}}``, each
    ``[...]``: whether the predicted class changed (0/1) and ``p_true(before) - p_true(after)``.
    ``valid [..., K]`` (bool): the keys that may be removed (default: all).
    """
    base = predict(torch.zeros_like(weights, dtype=torch.bool))
    p_true = base.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    out = {}
    for how in REMOVALS:
        drop = F.one_hot(pick(weights, how, g, valid), weights.shape[-1]).bool()
        p = predict(drop)
        out[how] = {
            "changed": (p.argmax(-1) != base.argmax(-1)).to(weights.dtype),
            "true_prob_drop": p_true - p.gather(-1, y.unsqueeze(-1)).squeeze(-1),
        }
    return out


@dataclass
class SupportAttention:
    """An attention learner's queries' attention over their keys, for one batch of episodes.

    ``weights [T, Q, K]`` (rows sum to 1); ``probs [T, Q, n_way]`` the class probabilities;
    ``keys [T, K]`` the support example that shows each key; ``predict(drop [T, Q, K])`` the
    probabilities with the marked keys removed; ``what`` the keys in words.
    """

    weights: torch.Tensor
    probs: torch.Tensor
    keys: torch.Tensor
    predict: Callable[[torch.Tensor], torch.Tensor]
    what: str


def _matching(learner: MatchingNet, batch: TaskBatch, n: int) -> SupportAttention:
    zs, zq = learner.embed(batch.support_x, batch.query_x)
    s = learner.scores(zs, zq)  # [T, Q, S]

    def predict(drop: torch.Tensor) -> torch.Tensor:
        return learner.class_log_probs(s.masked_fill(drop, float("-inf")),
                                       batch.support_y, n).exp()

    keys = torch.arange(s.shape[-1], device=s.device).expand(s.shape[0], -1)
    return SupportAttention(torch.softmax(s, -1), predict(torch.zeros_like(s, dtype=torch.bool)),
                            keys, predict, "support examples")


def _feat(learner: FEAT, batch: TaskBatch, n: int) -> SupportAttention:
    zs, zq = learner.embed(batch.support_x, batch.query_x)
    protos = class_means(zs, batch.support_y, n)  # [T, n, D]
    T, Q = zq.shape[:2]

    def predict(drop: torch.Tensor) -> torch.Tensor:  # drop [T, Q, n]: per-query key masks
        x = protos.unsqueeze(1).expand(T, Q, *protos.shape[1:])
        keep = (~drop).unsqueeze(-2).expand(T, Q, n, n)
        adapted = learner.set_fn(x, mask=keep)  # [T, Q, n, D]
        d = (zq.unsqueeze(-2) - adapted).pow(2).sum(-1)
        return torch.softmax(-d / learner.temperature, -1)

    _, a = learner.set_fn.attn(protos, need_weights=True)
    rows = a.mean(-3)  # [T, n, n]: each prototype's attention over the prototypes
    probs = predict(torch.zeros(T, Q, n, dtype=torch.bool, device=zq.device))
    pred = probs.argmax(-1)
    # the first support example of each class shows its prototype
    keys = torch.stack([(batch.support_y == k).int().argmax(-1) for k in range(n)], -1)
    return SupportAttention(rows.gather(1, pred.unsqueeze(-1).expand(T, Q, n)), probs, keys,
                            predict, "class prototypes, as the predicted class's prototype "
                            "attends to them in the set-to-set layer")


def support_attention(learner: MatchingNet | FEAT, batch: TaskBatch) -> SupportAttention:
    """The attention of an attention learner's queries over their support set (call it in
    eval mode without a graph)."""
    n = batch.n_way if batch.n_way is not None else int(batch.support_y.max()) + 1
    if isinstance(learner, MatchingNet):
        return _matching(learner, batch, n)
    if isinstance(learner, FEAT):
        return _feat(learner, batch, n)
    raise ConfigError(f"the deletion test reads a learner's attention over its support set: "
                      f"Matching Networks or FEAT, not {type(learner).__name__}")


def support_deletion(learner: MatchingNet | FEAT, batch: TaskBatch, g: torch.Generator
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`deletion_test` on an attention learner's episodes, in eval mode without a
    graph; each value is per episode ``[T]`` (the mean over its queries)."""
    with eval_mode(learner), torch.no_grad():
        view = support_attention(learner, batch)
        res = deletion_test(view.weights, view.predict, batch.query_y, g)
    return {how: {k: v.float().mean(-1) for k, v in r.items()} for how, r in res.items()}


Test = Callable[[Learner, TaskBatch, torch.Generator], dict[str, dict[str, torch.Tensor]]]


def faithfulness_table(learner: Learner, batches: list[TaskBatch], seed: int = 0,
                       test: Test | None = None) -> list[dict[str, float | int | str]]:
    """The deletion test over ``batches`` (the fixed test episodes): ``test`` (default
    :func:`support_deletion` for the classifiers, :func:`prompt_deletion` for in-context
    regression; :func:`token_deletion` for the tokens of text queries). One row per removal
    with the mean and 95% CI over episodes of each measure."""
    g = torch.Generator().manual_seed(seed)
    if test is None:
        test = prompt_deletion if isinstance(learner, InContextLearner) else support_deletion
    parts: dict[str, dict[str, list[torch.Tensor]]] = {h: {} for h in REMOVALS}
    for b in batches:
        for how, r in test(learner, b, g).items():
            for k, v in r.items():
                parts[how].setdefault(k, []).append(v.cpu())
    rows: list[dict[str, float | int | str]] = []
    for how in REMOVALS:
        row: dict[str, float | int | str] = {"removal": how}
        for k, vs in parts[how].items():
            v = torch.cat(vs)
            row[k], row[f"{k}_ci95"] = mean_ci95(v)
            row["episodes"] = v.numel()
        rows.append(row)
    return rows


def prompt_deletion(learner: InContextLearner, batch: TaskBatch, g: torch.Generator
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """The deletion test for in-context regression: per query, the prompt point its
    attention weighs most (last layer, heads averaged; x_i and y_i together), a random one or
    the least weighed one leaves the prompt, and the query is predicted again. Per episode
    ``[T]`` (mean over queries): ``abs_change`` ``|y_hat' - y_hat|`` and ``error_increase``,
    the squared error's growth."""
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    T, k = sx.shape[:2]
    Q = qx.shape[1]
    if k < 2:
        raise ConfigError("the prompt deletion test needs prompts of at least 2 points")
    out: dict[str, dict[str, torch.Tensor]] = {}
    with eval_mode(learner), torch.no_grad():
        w = learner.query_attention(sx, sy, qx).per_example[:, -1].mean(1)  # [T, Q, k]
        base = learner.predict(sx, sy, qx)
        for how in REMOVALS:
            keep = ~F.one_hot(pick(w, how, g), k).bool()  # [T, Q, k]
            sx2, sy2 = (t.unsqueeze(1).expand(T, Q, *t.shape[1:])[keep]
                        .view(T * Q, k - 1, t.shape[-1]) for t in (sx, sy))
            p = learner.predict(sx2, sy2, qx.reshape(T * Q, 1, -1))
            p = p.view_as(base)
            err = (p - qy).pow(2).sum(-1) - (base - qy).pow(2).sum(-1)
            out[how] = {"abs_change": (p - base).norm(dim=-1).mean(-1),
                        "error_increase": err.mean(-1)}
    return out


def text_tokens(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The tokens of right-padded ids ``[..., L]`` that may be removed (bool ``[..., L]``):
    not padding, not the first ([CLS]) nor the last ([SEP]); a sentence with no other token
    keeps all of its tokens."""
    keep = ids != pad_id
    pos = torch.arange(ids.shape[-1], device=ids.device)
    inner = keep & (pos > 0) & (pos < keep.sum(-1, keepdim=True) - 1)
    return torch.where(inner.any(-1, keepdim=True), inner, keep)


def token_rollout(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """How much each token of ids ``[B, L]`` flows into the sentence embedding of a Hugging
    Face encoder (``attention``, ``pad_id``, ``pooling``): attention rollout ``[B, L]``, the
    first token's row for ``cls`` pooling, else the mean of the rows of the real tokens (mean
    pooling). Padding gets 0."""
    roll = attention_rollout(model.attention(ids))  # [B, L, L]
    if getattr(model, "pooling", "mean") == "cls":
        return roll[:, 0]
    keep = (ids != model.pad_id).to(roll.dtype)
    return (roll * keep.unsqueeze(-1)).sum(-2) / keep.sum(-1, keepdim=True).clamp_min(1)


def token_deletion(learner: Learner, batch: TaskBatch, g: torch.Generator
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`deletion_test` on the tokens of each text query of a metric learner (ProtoNet,
    Matching Networks, FEAT) whose ``model`` is a Hugging Face encoder (it has ``pad_id``
    and ``attention(ids)``): remove the query token that flows most into the sentence
    embedding (:func:`token_rollout`), a random one or the one that flows least, and
    classify the query again against the same support set. Per episode ``[T]`` (the mean
    over its queries)."""
    model = getattr(learner, "model", None)
    if not isinstance(learner, MetricLearner) or not hasattr(model, "attention"):
        raise ConfigError("the token deletion test reads the token attention of a metric "
                          "learner over a text encoder (model kind hf_encoder), not "
                          f"{type(learner).__name__} over {type(model).__name__}")
    parts: dict[str, dict[str, list[torch.Tensor]]] = {h: {} for h in REMOVALS}
    with eval_mode(learner), torch.no_grad():
        for t in range(batch.num_tasks):  # one episode at a time: the maps are L^2 each
            for how, r in _episode_tokens(learner, batch.slice(t, t + 1), g).items():
                for k, v in r.items():
                    parts[how].setdefault(k, []).append(v.float().mean())
    return {how: {k: torch.stack(v) for k, v in r.items()} for how, r in parts.items()}


def _episode_tokens(learner: MetricLearner, b: TaskBatch, g: torch.Generator
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`token_deletion` of one episode (``b`` holds one task), per query ``[Q]``."""
    model, qx = learner.model, b.query_x[0]
    n = b.n_way if b.n_way is not None else int(b.support_y.max()) + 1
    zs = learner.embed(b.support_x, b.query_x)[0]

    def predict(drop: torch.Tensor) -> torch.Tensor:
        zq = learner.embed(b.support_x, qx.masked_fill(drop, model.pad_id).unsqueeze(0))[1]
        return torch.softmax(learner.logits(zs, b.support_y, zq, n), -1)[0]

    w = token_rollout(model, qx)
    return deletion_test(w, predict, b.query_y[0], g, text_tokens(qx, model.pad_id))
