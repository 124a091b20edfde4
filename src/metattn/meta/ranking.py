"""Rating metrics over each task's (user's) query set: MAE, RMSE and nDCG@k, and the MAML
learner that reports them (:class:`RatingMAML`).

nDCG@k (the definition; MeLU re-implementations disagree):

* the gain of a rating r is ``2**r - 1`` (Burges et al. 2005; MovieLens ratings 1-5 give
  gains 1, 3, 7, 15, 31);
* the query items are ranked by predicted score, highest first, and position i = 1, 2, ...
  is discounted by ``1 / log2(i + 1)``: ``DCG@k = sum_{i <= k} gain_i / log2(i + 1)``;
* ties in the predicted scores are broken by no arbitrary rule: every position of a tied
  block gets the block's mean gain, which is the expected DCG over random tie-breaking
  (a constant predictor scores the mean gain everywhere, not whatever order the data had);
* the ideal DCG@k ranks by the true ratings; ``nDCG@k = DCG@k / IDCG@k`` (IDCG > 0 since
  every gain is at least 1); k larger than the query set counts the whole set.
"""

from __future__ import annotations

import torch

from metattn.data.tasks import TaskBatch
from metattn.meta.maml import MAML


def _flat(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, Q]`` or ``[T, Q, 1]`` -> ``[T, Q]`` both, in float64."""
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} "
                         "must have the same shape [T, Q] or [T, Q, 1]")
    if pred.dim() == 3:
        pred, target = pred.squeeze(-1), target.squeeze(-1)
    return pred.double(), target.double()


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each task over its query set: ``[T]``."""
    p, t = _flat(pred, target)
    return (p - t).abs().mean(-1)


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error of each task over its query set: ``[T]``."""
    p, t = _flat(pred, target)
    return (p - t).pow(2).mean(-1).sqrt()


def _dcg(gains: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, gains.shape[-1])
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=gains.dtype, device=gains.device))
    return (gains[..., :k] * disc).sum(-1)


def ndcg_at_k(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """nDCG@k of each task's query ranking (module docstring: gain ``2**r - 1``, tied
    predictions share their mean gain): ``[T]``."""
    p, t = _flat(pred, target)
    gains = torch.pow(2.0, t) - 1
    order = p.argsort(dim=-1, descending=True, stable=True)
    sp, sg = p.gather(-1, order), gains.gather(-1, order)
    # a tied block's mean gain at each of its positions: block ids from score changes
    block = torch.cat([torch.zeros_like(sp[..., :1], dtype=torch.long),
                       (sp[..., 1:] != sp[..., :-1]).long().cumsum(-1)], -1)
    total = torch.zeros_like(sg).scatter_add_(-1, block, sg)
    count = torch.zeros_like(sg).scatter_add_(-1, block, torch.ones_like(sg))
    shared = (total / count.clamp_min(1)).gather(-1, block)
    ideal = gains.sort(-1, descending=True).values
    return _dcg(shared, k) / _dcg(ideal, k)


def rating_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-task ``mae``, ``rmse``, ``ndcg@1`` and ``ndcg@3`` (float32 ``[T]`` each)."""
    out = {"mae": mae(pred, target), "rmse": rmse(pred, target),
           "ndcg@1": ndcg_at_k(pred, target, 1), "ndcg@3": ndcg_at_k(pred, target, 3)}
    return {k: v.float() for k, v in out.items()}


class RatingMAML(MAML):
    """:class:`MAML` whose ``evaluate`` adds the rating metrics of the adapted predictions
    (``mae``, ``rmse``, ``ndcg@1``, ``ndcg@3``, per task) to MAML's own; with
    ``inner_steps: 0`` it is a model trained without adaptation (the global model)."""

    def query_metrics(self, pred: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """MAE, RMSE, nDCG@1 and nDCG@3 of the adapted predictions."""
        return rating_metrics(pred, batch.query_y)
