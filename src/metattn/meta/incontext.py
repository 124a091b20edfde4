"""In-context learning: a causal Transformer reads the support set as a prompt and predicts.

Following Garg et al. (2022), "What can Transformers learn in-context?", a task's examples
become the prompt ``x_1, y_1, x_2, y_2, ..., x_n, y_n``: each x is a token ``[x]`` and each
y a token ``[y, 0, ..., 0]`` of the same width. A linear read-in, learned positional
embeddings, a GPT-2-like pre-norm causal Transformer and a linear read-out give, at the
token of ``x_i``, the prediction of ``y_i`` from ``(x_1, y_1, ..., x_{i-1}, y_{i-1}, x_i)``.
Training minimises the squared error averaged over every position, so one prompt of n
points trains every context size k = 0 .. n-1 at once. No weights change at test time: the
forward pass over the prompt IS the learning.

At evaluation, query points must not see one another: each query token attends to the
support tokens and itself only (a block mask, with every query at the position that
``x_{k+1}`` has), which equals running one prompt per query but costs one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from metattn.data.functions import (  # noqa: F401 (Curriculum* re-exported)
    Curriculum,
    CurriculumTasks,
    error_scale,
)
from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError
from metattn.meta.base import (
    Learner,
    LossFn,
    back_home,
    check_batch,
    check_one_task,
    eval_mode,
    on_learner,
)
from metattn.nn.attention import MultiHeadAttention, record_attention
from metattn.nn.incontext import ICLTransformer


@dataclass
class QueryAttention:
    """Attention of each query token over its context, per layer and head.

    ``weights`` ``[T, layers, heads, Q, 2k + 1]``: over the tokens x_1, y_1, ..., x_k, y_k
    and the query itself (the last column); each row sums to 1. ``per_example``
    ``[T, layers, heads, Q, k]``: the weight on x_i plus the weight on y_i.
    """

    weights: torch.Tensor
    per_example: torch.Tensor


class InContextPredictor:
    """The result of :meth:`InContextLearner.adapt`: a model conditioned on one support set."""

    def __init__(self, model: ICLTransformer, support_x: torch.Tensor, support_y: torch.Tensor):
        self.model = model
        self.support_x = support_x
        self.support_y = support_y

    def __call__(self, query_x: torch.Tensor) -> torch.Tensor:
        """``[Q, d_x]`` -> ``[Q, d_y]``; queries are predicted independently."""
        with torch.no_grad():
            return self.model.predict(self.support_x[None], self.support_y[None], query_x[None])[0]


class InContextLearner(Learner):
    """Attention as the learner: adaptation is a forward pass over the support prompt.

    Args:
        model: an :class:`ICLTransformer`.
        loss_on: ``"all"`` (Garg et al.: squared error averaged over every prompt position,
            so every context size trains) or ``"query"`` (only the query positions).
        loss_fn: training loss ``f(pred, target)``; None = mean squared error.
    """

    def __init__(
        self,
        model: ICLTransformer,
        loss_on: Literal["all", "query"] = "all",
        loss_fn: LossFn | None = None,
    ):
        super().__init__()
        if not isinstance(model, ICLTransformer):
            raise ConfigError(
                f"InContextLearner: model is a {type(model).__name__}; it needs an "
                "ICLTransformer (model.kind: icl_transformer)"
            )
        if loss_on not in ("all", "query"):
            raise ConfigError(f"InContextLearner: loss_on={loss_on!r}; choose 'all' or 'query'")
        self.model = model
        self.loss_on = loss_on
        self.loss_fn = loss_fn

    def _check(self, batch: TaskBatch) -> None:
        check_batch(batch, "InContextLearner")
        if batch.n_way is not None:
            raise TaskError(
                "InContextLearner: got a classification batch (n_way set); it regresses "
                "real-valued y: use regression tasks (n_way=None)"
            )
        m = self.model
        for name, t, want in (("support_x", batch.support_x, m.d_x),
                              ("support_y", batch.support_y, m.d_y)):
            if t.dim() != 3:
                hint = ("for scalar targets use y.unsqueeze(-1)" if name == "support_y"
                        else "give one flat input vector per point")
                raise TaskError(
                    f"InContextLearner: TaskBatch.{name} has shape {tuple(t.shape)}; expected "
                    f"a 3-D tensor [T, n, {want}]: {hint}"
                )
            if t.shape[-1] != want:
                raise TaskError(
                    f"InContextLearner: TaskBatch.{name} has shape {tuple(t.shape)} but the "
                    f"model expects [T, n, {want}]; build the model with "
                    f"{'d_x' if name == 'support_x' else 'd_y'}={t.shape[-1]}"
                )

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Batched predictor ``[T, k, d], [T, k, m], [T, Q, d] -> [T, Q, m]`` (k may be 0);
        plugs into :func:`metattn.meta.baselines.error_vs_k`. Inputs go to the model's device
        and dtype (prompts are drawn on the CPU, the model may sit on a GPU); the prediction
        comes back on the query's."""
        out = self.model.predict(*on_learner(self, support_x, support_y, query_x))
        return back_home(out, query_x)

    def meta_loss(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Support and query points of each task form one prompt; the loss averages the
        squared error over every position (``loss_on="all"``) or the query positions.

        Metrics: ``mse_queries`` (MSE over the query positions, each seeing the support set
        and the earlier queries) and ``mse_all_positions`` (MSE over every position, what
        ``loss_on="all"`` trains on). ``step`` is unused: the
        curriculum acts on the sampler (:class:`Curriculum`).
        """
        self._check(batch)
        loss_fn = loss_fn or self.loss_fn or F.mse_loss
        k = batch.support_x.shape[1]
        xs = torch.cat([batch.support_x, batch.query_x], 1)
        ys = torch.cat([batch.support_y, batch.query_y], 1)
        pred = self.model(xs, ys)
        if self.loss_on == "all":
            loss = loss_fn(pred, ys)
        else:
            loss = loss_fn(pred[:, k:], ys[:, k:])
        with torch.no_grad():
            metrics = {
                "mse_queries": F.mse_loss(pred[:, k:], ys[:, k:]).detach(),
                "mse_all_positions": F.mse_loss(pred, ys).detach(),
            }
        return loss, metrics

    def evaluate(self, batch: TaskBatch, loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
        """Per-task metrics given the support set as context (queries independent).

        * ``mse`` ``[T]``: query MSE given all K support points (``loss`` with a
          ``loss_fn``).
        * ``error_vs_k`` ``[T, K + 1]``: the error-vs-k curve of Garg et al., column k the
          squared error / scale (d for dense linear tasks, see
          :func:`metattn.meta.baselines.error_vs_k`) of predicting a point from the
          first k of the prompt
          ``support + first query`` (one causal pass; column K is the first query's). The
          recipe reports its column means, so ``summary.json`` holds the whole curve.
        """
        self._check(batch)
        with torch.no_grad():
            pred = self.model.predict(batch.support_x, batch.support_y, batch.query_x)
            if loss_fn is None:
                loss = (pred - batch.query_y).pow(2).flatten(1).mean(1)
            else:
                loss = torch.stack([loss_fn(pred[t], batch.query_y[t])
                                    for t in range(batch.num_tasks)])
            xs = torch.cat([batch.support_x, batch.query_x[:, :1]], 1)
            ys = torch.cat([batch.support_y, batch.query_y[:, :1]], 1)
            scale = error_scale(batch)
            if isinstance(scale, torch.Tensor):
                scale = scale.to(xs.dtype).unsqueeze(-1)
            err = (self.model(xs, ys) - ys).pow(2).flatten(2).sum(-1) / scale
        return {"mse" if loss_fn is None else "loss": loss, "error_vs_k": err}

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, loss_fn: LossFn | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Condition on one task's support set ``[k, d]``, ``[k, m]`` (no weight update)."""
        check_one_task(support_x, support_y, "InContextLearner.adapt")
        return InContextPredictor(self.model, support_x, support_y)

    def query_attention(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> QueryAttention:
        """Attention weights of each query over its context examples (batched, ``[T, ...]``),
        read in eval mode (no dropout anywhere in the pass). A looped model (``n_loops``) has
        one entry per layer application, in order: ``n_loops * n_layers`` of them."""
        k = support_x.shape[1]
        mine = {id(mod) for mod in self.model.encoder.modules()
                if isinstance(mod, MultiHeadAttention)}
        with eval_mode(self.model), torch.no_grad(), record_attention() as rec:
            self.model.predict(support_x, support_y, query_x)
        w = torch.stack([a for mod, a in rec if id(mod) in mine], dim=1)  # [T, layers, H, L, L]
        rows = w[..., 2 * k :, :]  # the query rows [T, layers, H, Q, L]
        own = rows[..., 2 * k :].diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        weights = torch.cat([rows[..., : 2 * k], own], dim=-1)
        per_example = weights[..., : 2 * k].unflatten(-1, (k, 2)).sum(-1)
        return QueryAttention(weights, per_example)
