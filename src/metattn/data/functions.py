"""Function classes for in-context learning (Garg et al. 2022, "What can Transformers learn
in-context?").

Each task is one random function f; its support set is the k in-context examples and its
query set holds further points of the same f. Inputs follow the paper: x ~ N(0, I_d), with
every coordinate beyond ``d_active`` set to zero (the paper's curriculum grows ``d_active``
from 5 to d). Shapes: x ``[T, n, d]``, y ``[T, n, 1]``. Everything is drawn from the given
``torch.Generator`` with vectorised torch ops, so a seed fixes the whole batch.

* :class:`LinearTasks`: y = w . x with w ~ N(0, I) (sparse: s non-zero coordinates).
* :class:`ReLUNetTasks`: y = sqrt(2 / h) * W2 . relu(W1^T x), W1, W2 ~ N(0, I).
* :class:`DecisionTreeTasks`: depth-D binary trees splitting on one coordinate at 0.

``sample(..., k_shot=..., d_active=...)`` overrides the instance's values for one draw (the
curriculum and the error-vs-k curves vary both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metattn.data.tasks import TaskBatch
from metattn.errors import TaskError


class _FunctionFamily:
    """Shared sampling code: draw inputs, evaluate the family's function, split the prompt."""

    d: int
    k_shot: int
    k_query: int
    noise_std: float
    d_active: int | None

    def _check(self) -> None:
        name = type(self).__name__
        if self.d < 1:
            raise TaskError(f"{name}.d={self.d}; the input dimension must be >= 1")
        if self.k_shot < 1:
            raise TaskError(f"{name}.k_shot={self.k_shot}; it must be >= 1")
        if self.k_query < 1:
            raise TaskError(f"{name}.k_query={self.k_query}; it must be >= 1")
        if self.noise_std < 0:
            raise TaskError(f"{name}.noise_std={self.noise_std}; it must be >= 0")
        if self.d_active is not None and not 1 <= self.d_active <= self.d:
            raise TaskError(
                f"{name}.d_active={self.d_active}; it must lie in [1, d={self.d}] "
                "(or be None for all coordinates)"
            )

    def _active(self, d_active: int | None) -> int:
        da = self.d_active if d_active is None else d_active
        da = self.d if da is None else int(da)
        if not 1 <= da <= self.d:
            raise TaskError(
                f"{type(self).__name__}: d_active={da}; it must lie in [1, d={self.d}]"
            )
        return da

    def _params(self, num_tasks: int, da: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _f(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def sample(
        self,
        num_tasks: int,
        generator: torch.Generator,
        *,
        k_shot: int | None = None,
        d_active: int | None = None,
    ) -> TaskBatch:
        """Draw ``num_tasks`` functions and ``k_shot + k_query`` points of each.

        ``k_shot``/``d_active`` override the instance's values for this draw.
        """
        g = generator
        k = self.k_shot if k_shot is None else int(k_shot)
        da = self._active(d_active)
        params = self._params(num_tasks, da, g)
        n = k + self.k_query
        x = torch.randn(num_tasks, n, self.d, generator=g)
        x[..., da:] = 0
        y = self.function(x, params)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=g)
        info = dict(params)
        info["d_active"] = torch.full((num_tasks,), da, dtype=torch.long)
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], info=info)

    def function(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The noiseless function of each task at ``x [T, n, d]`` -> ``[T, n, 1]``.

        ``params`` is the ``info`` dict of a batch (or what ``_params`` drew).
        """
        return self._f(x, params)


@dataclass
class LinearTasks(_FunctionFamily):
    """Linear regression y = w . x (+ noise), w ~ N(0, I_d), as in Garg et al. (2022).

    ``sparsity=s`` keeps ``s`` coordinates of w, chosen uniformly among the active ones (the
    paper's sparse linear functions; more than ``d_active`` means all). Weights beyond
    ``d_active`` are zero, so ``info["w"]`` ``[T, d]`` is the function actually used.
    """

    d: int = 20
    k_shot: int = 40
    k_query: int = 1
    noise_std: float = 0.0
    sparsity: int | None = None
    d_active: int | None = None

    def __post_init__(self) -> None:
        self._check()
        if self.sparsity is not None and self.sparsity < 1:
            raise TaskError(f"LinearTasks.sparsity={self.sparsity}; it must be >= 1 or None")

    def _params(self, num_tasks: int, da: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        w = torch.randn(num_tasks, self.d, generator=g)
        w[:, da:] = 0
        if self.sparsity is not None and self.sparsity < da:
            # a uniformly random subset of s active coordinates per task
            order = torch.rand(num_tasks, da, generator=g).argsort(dim=1)
            keep = torch.zeros(num_tasks, self.d, dtype=torch.bool)
            keep.scatter_(1, order[:, : self.sparsity], True)
            w = w * keep
        return {"w": w}

    def _f(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.einsum("tnd,td->tn", x, p["w"].to(x.dtype)).unsqueeze(-1)


@dataclass
class ReLUNetTasks(_FunctionFamily):
    """Two-layer ReLU networks y = sqrt(2 / h) * sum_j W2_j relu(W1_j . x), as in Garg et al.

    W1 ``[T, d, h]`` and W2 ``[T, h]`` are standard normal (the sqrt(2 / h) factor keeps
    Var y close to that of a linear function of the same inputs). Garg et al. use h = 100
    and prompts of up to 101 points.
    """

    d: int = 20
    hidden: int = 100
    k_shot: int = 100
    k_query: int = 1
    noise_std: float = 0.0
    d_active: int | None = None

    def __post_init__(self) -> None:
        self._check()
        if self.hidden < 1:
            raise TaskError(f"ReLUNetTasks.hidden={self.hidden}; it must be >= 1")

    def _params(self, num_tasks: int, da: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        w1 = torch.randn(num_tasks, self.d, self.hidden, generator=g)
        w2 = torch.randn(num_tasks, self.hidden, generator=g)
        return {"W1": w1, "W2": w2}

    def _f(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.relu(torch.bmm(x, p["W1"].to(x.dtype)))
        return math.sqrt(2.0 / h.shape[-1]) * torch.bmm(h, p["W2"].to(x.dtype).unsqueeze(-1))


@dataclass
class DecisionTreeTasks(_FunctionFamily):
    """Binary decision trees of depth ``depth`` (Garg et al. use 4).

    Node ``i`` (heap order, root 0) splits on coordinate ``split_coord[i]``: go to child
    ``2i + 2`` if ``x[split_coord[i]] > 0`` else ``2i + 1``. The ``2**depth`` leaves hold
    values ~ N(0, 1). Split coordinates are uniform over the ACTIVE coordinates (the paper
    draws them over all d; a split on a zeroed coordinate would always go left).
    ``info``: ``split_coord`` ``[T, 2**depth - 1]`` and ``leaf_value`` ``[T, 2**depth]``.
    """

    d: int = 20
    depth: int = 4
    k_shot: int = 100
    k_query: int = 1
    noise_std: float = 0.0
    d_active: int | None = None

    def __post_init__(self) -> None:
        self._check()
        if self.depth < 1:
            raise TaskError(f"DecisionTreeTasks.depth={self.depth}; it must be >= 1")

    def _params(self, num_tasks: int, da: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        n_internal = 2**self.depth - 1
        coord = torch.randint(0, da, (num_tasks, n_internal), generator=g)
        leaves = torch.randn(num_tasks, 2**self.depth, generator=g)
        return {"split_coord": coord, "leaf_value": leaves}

    def _f(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        coord, leaves = p["split_coord"], p["leaf_value"].to(x.dtype)
        depth = int(math.log2(leaves.shape[-1]))
        node = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        for _ in range(depth):
            c = torch.gather(coord, 1, node)  # [T, n] coordinate tested at each point's node
            right = torch.gather(x, 2, c.unsqueeze(-1)).squeeze(-1) > 0
            node = 2 * node + 1 + right.long()
        leaf = node - (2**depth - 1)
        return torch.gather(leaves, 1, leaf).unsqueeze(-1)
