"""Non-learned in-context baselines and the error-vs-k curve (Garg et al. 2022).

Every baseline is a batched predictor ``f(support_x [T, k, d], support_y [T, k, m],
query_x [T, Q, d]) -> [T, Q, m]``: it fits each task's k examples and predicts its queries.
``k = 0`` (no examples) predicts 0, the prior mean of every function class here. Linear
algebra runs in float64 so that, e.g., noiseless least squares with k >= d is exact to
rounding; the result comes back in the input dtype.

:func:`error_vs_k` evaluates any such predictor (an in-context learner's ``predict`` too)
on a fixed seeded set of prompts: the error of predicting point k+1 from the first k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from metattn.data.functions import error_scale
from metattn.data.tasks import TaskSampler, fixed_episodes, mean_ci95
from metattn.errors import ConfigError
from metattn.meta.base import Learner, back_home, mse_loss, on_learner

PredictFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _zeros(support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    return query_x.new_zeros(*query_x.shape[:2], support_y.shape[-1])


def least_squares(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
) -> torch.Tensor:
    """Minimum-norm least squares, w = pinv(X) y (exact when noiseless and k >= d)."""
    if support_x.shape[1] == 0:
        return _zeros(support_y, query_x)
    x, y = support_x.double(), support_y.double()
    w = torch.linalg.pinv(x) @ y  # [T, d, m]
    return (query_x.double() @ w).to(query_x.dtype)


def ridge(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, lam: float = 0.1
) -> torch.Tensor:
    """Ridge regression, argmin_w ||X w - y||^2 + lam ||w||^2 = (X^T X + lam I)^-1 X^T y.

    With noise variance s^2 and w ~ N(0, I), ``lam = s^2`` is the Bayes-optimal posterior mean.
    """
    if support_x.shape[1] == 0:
        return _zeros(support_y, query_x)
    x, y = support_x.double(), support_y.double()
    d = x.shape[-1]
    gram = x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(gram, x.transpose(1, 2) @ y)
    return (query_x.double() @ w).to(query_x.dtype)


def lasso(
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    alpha: float = 0.01,
    iters: int = 500,
) -> torch.Tensor:
    """Lasso, argmin_w 1/(2k) ||X w - y||^2 + alpha ||w||_1 (scikit-learn's objective, no
    intercept, as Garg et al.), solved by batched FISTA.

    FISTA (Beck & Teboulle 2009) is proximal gradient descent with Nesterov momentum: a
    gradient step of size 1/L on the squared loss (L = the largest eigenvalue of
    X^T X / k, its Lipschitz constant), then soft-thresholding at alpha/L. ``iters`` fixed
    iterations for every task keep it batched; the objective gap shrinks as O(1 / iters^2).
    """
    k = support_x.shape[1]
    if k == 0:
        return _zeros(support_y, query_x)
    x, y = support_x.double(), support_y.double()
    # the squared loss only needs the Gram matrix: grad = G w - c, G = X^T X / k, c = X^T y / k
    gram = x.transpose(1, 2) @ x / k
    c = x.transpose(1, 2) @ y / k
    lip = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(1e-12)[:, None, None]
    thresh = alpha / lip
    w = x.new_zeros(x.shape[0], x.shape[-1], y.shape[-1])
    z, t = w, 1.0
    for _ in range(iters):
        v = z - (gram @ z - c) / lip
        w_new = torch.sign(v) * (v.abs() - thresh).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = w_new + ((t - 1) / t_new) * (w_new - w)
        w, t = w_new, t_new
    return (query_x.double() @ w).to(query_x.dtype)


def nearest_neighbours(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, n: int = 3
) -> torch.Tensor:
    """Average y of the ``n`` support points nearest (Euclidean) to each query (fewer if k < n)."""
    k = support_x.shape[1]
    if k == 0:
        return _zeros(support_y, query_x)
    dist = torch.cdist(query_x.double(), support_x.double())  # [T, Q, k]
    idx = dist.topk(min(n, k), dim=-1, largest=False).indices  # [T, Q, n]
    t = torch.arange(support_y.shape[0], device=support_y.device)[:, None, None]
    return support_y[t, idx].mean(-2)


def averaging(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
) -> torch.Tensor:
    """Garg et al.'s averaging estimator: w_hat = mean_i y_i x_i, prediction x . w_hat.

    Unbiased for w when x ~ N(0, I) (E[x x^T] = I), but with variance that shrinks only as 1/k.
    """
    if support_x.shape[1] == 0:
        return _zeros(support_y, query_x)
    w = (support_x.double().transpose(1, 2) @ support_y.double()) / support_x.shape[1]
    return (query_x.double() @ w).to(query_x.dtype)


BASELINES: dict[str, PredictFn] = {
    "least_squares": least_squares,
    "ridge": ridge,
    "lasso": lasso,
    "3_nearest_neighbours": nearest_neighbours,
    "averaging": averaging,
}


def adapted_predict_fn(learner: Learner) -> PredictFn:
    """A batched predictor from any learner's ``adapt`` (e.g. MAML), one task at a time.

    Needs k >= 1 (a learner such as MAML cannot adapt on an empty support set).
    """

    def predict(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        return torch.stack([learner.adapt(sx[t], sy[t])(qx[t]) for t in range(sx.shape[0])])

    return predict


def maml_predict_fn(learner: Learner, steps: int | None = None) -> PredictFn:
    """A batched predictor from a MAML-family learner (:meth:`MAML.predict`: every task of the
    batch adapts at once) with ``steps`` inner steps (default ``eval_inner_steps``). With
    k = 0 (no support point) it predicts with the meta-learned initialisation, the learner's
    best guess before seeing data. Prompts move to the learner's device and dtype;
    predictions come back on the query's."""

    def predict(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        n = learner.eval_inner_steps if steps is None else steps
        home = qx
        sx, sy, qx = on_learner(learner, sx, sy, qx)
        if sx.shape[1] == 0:  # nothing to adapt on: the initialisation (support unused)
            sx, sy, n = qx, qx.new_zeros(*qx.shape[:2], sy.shape[-1]), 0
        out = learner.predict(sx, sy, qx, steps=n, loss_fn=learner.loss_fn or mse_loss)
        return back_home(out, home)

    return predict


@dataclass
class ErrorCurve:
    """Normalised squared error (squared error / scale, see :func:`error_vs_k`) of point
    k+1 given k, with 95% CIs."""

    ks: list[int]
    mean: list[float]
    ci95: list[float]

    def as_dict(self) -> dict[int, tuple[float, float]]:
        """``{k: (mean, ci95 half-width)}``."""
        return {k: (m, c) for k, m, c in zip(self.ks, self.mean, self.ci95, strict=True)}


def _prompt_sampler(sampler: TaskSampler, n_context: int) -> TaskSampler:
    if dataclasses.is_dataclass(sampler) and {"k_shot", "k_query"} <= {
        f.name for f in dataclasses.fields(sampler)
    }:
        return dataclasses.replace(sampler, k_shot=n_context, k_query=1)
    return sampler


def error_vs_k(
    predict_fn: PredictFn,
    sampler: TaskSampler,
    ks: Sequence[int],
    n_prompts: int = 1000,
    seed: int = 20240,
    chunk: int = 500,
) -> ErrorCurve:
    """Error of predicting the (k+1)-th point of a prompt from its first k, for each k.

    The prompts are a FIXED seeded set (:func:`fixed_episodes` with ``seed``) of ``n_prompts``
    prompts of ``max(ks) + 1`` points each, shared by every k and every predictor: a sampler
    with ``k_shot``/``k_query`` fields (the samplers of :mod:`metattn.data.functions`,
    :class:`~metattn.data.synthetic.SinusoidTasks`) is re-parametrised to
    ``k_shot=max(ks), k_query=1``; any other sampler must already make prompts that long.
    The error of one prompt is ``||f_hat(x_{k+1}) - y_{k+1}||^2 / s`` with s the task
    family's :func:`~metattn.data.functions.error_scale` (Garg et al.'s normalisation, about
    1 for the zero predictor: d for dense linear functions and ReLU nets, the sparsity for
    sparse linear ones, 1 for decision trees; the input dimension for samplers that do not
    say).
    Report numbers with ``n_prompts >= 1000``. ``seed`` defaults to the recipe's evaluation
    seed (``eval.seed``), not its training seed (``seed: 0``), whose stream would give the
    very prompts a run trained on.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 0:
        raise ConfigError(f"error_vs_k: ks={list(ks)}; give at least one k >= 0")
    if n_prompts < 1:
        raise ConfigError(f"error_vs_k: n_prompts={n_prompts}; it must be >= 1")
    batches = fixed_episodes(_prompt_sampler(sampler, max(max(ks), 1)), n_prompts, seed, chunk)
    errs: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    with torch.no_grad():
        for b in batches:
            xs = torch.cat([b.support_x, b.query_x], 1)
            ys = torch.cat([b.support_y, b.query_y], 1)
            if xs.shape[1] < max(ks) + 1:
                raise ConfigError(
                    f"error_vs_k: the sampler makes prompts of {xs.shape[1]} points but "
                    f"k={max(ks)} needs {max(ks) + 1}; raise its k_shot or lower ks"
                )
            scale = error_scale(b)
            scale = scale.double() if isinstance(scale, torch.Tensor) else scale
            for k in ks:
                pred = predict_fn(xs[:, :k], ys[:, :k], xs[:, k : k + 1])
                err = (pred.double() - ys[:, k : k + 1].double()).pow(2).flatten(1).sum(1)
                errs[k].append(err / scale)
    stats = [mean_ci95(torch.cat(errs[k])) for k in ks]
    return ErrorCurve(ks, [m for m, _ in stats], [c for _, c in stats])
