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

:class:`Curriculum` is Garg et al.'s schedule of ``(d_active, prompt points)`` over outer steps;
:class:`CurriculumTasks` wraps a sampler so that the recipe's ``set_step(step)`` (called before
every meta-batch) follows it. Only the TRAIN sampler is wrapped: test prompts use the full d
and length.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError


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

    @property
    def error_scale(self) -> float:
        """The divisor of the squared error in error-vs-k curves, so that the zero predictor
        scores about 1 (Garg et al.'s normalisation: d for dense linear functions and ReLU
        nets, the sparsity for sparse linear functions, 1 for decision trees), for draws
        over the instance's active dimensions."""
        return self.scale_for(self._active(None))

    def scale_for(self, d_active: int) -> float:
        """:attr:`error_scale` for draws over ``d_active`` coordinates (E y^2 = d_active)."""
        return float(d_active)

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
        info["error_scale"] = torch.full((num_tasks,), self.scale_for(da))
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], info=info)

    def function(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The noiseless function of each task at ``x [T, n, d]`` -> ``[T, n, 1]``.

        ``params`` is the ``info`` dict of a batch (or what ``_params`` drew).
        """
        return self._f(x, params)


def error_scale(batch: TaskBatch) -> torch.Tensor | float:
    """The per-task divisor ``[T]`` of squared errors in error-vs-k curves:
    ``info["error_scale"]`` (set by the samplers here), else the input dimension."""
    s = batch.info.get("error_scale")
    return s if s is not None else float(batch.support_x[0, 0].numel())


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

    def scale_for(self, d_active: int) -> float:
        """The number of non-zero weights: the sparsity s for sparse w (at most the active
        coordinates), else d_active (E y^2 = that number; Garg et al.)."""
        s = d_active if self.sparsity is None else min(self.sparsity, d_active)
        return float(s)

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

    def scale_for(self, d_active: int) -> float:
        """1: leaf values are N(0, 1) whatever d is (Garg et al.)."""
        return 1.0

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


# ------------------------------------------------------------------ curriculum
@dataclass
class Curriculum:
    """Garg et al.'s curriculum: every ``every`` outer steps, ``d_inc`` more active input
    coordinates (``d_start`` -> ``d_end``) and ``points_inc`` more prompt points
    (``points_start`` -> ``points_end``). Defaults are the paper's for d = 20 (d 5 -> 20 and
    11 -> 41 points, +1 and +2 every 2000 steps)."""

    d_start: int = 5
    d_end: int = 20
    d_inc: int = 1
    points_start: int = 11
    points_end: int = 41
    points_inc: int = 2
    every: int = 2000

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"Curriculum.every={self.every}; it must be >= 1")
        if not 1 <= self.d_start <= self.d_end:
            raise ConfigError(
                f"Curriculum: d_start={self.d_start}, d_end={self.d_end}; need "
                "1 <= d_start <= d_end"
            )
        if not 2 <= self.points_start <= self.points_end:
            raise ConfigError(
                f"Curriculum: points_start={self.points_start}, points_end="
                f"{self.points_end}; need 2 <= points_start <= points_end"
            )
        if self.d_inc < 0 or self.points_inc < 0:
            raise ConfigError(
                f"Curriculum: d_inc={self.d_inc}, points_inc={self.points_inc}; they must be >= 0"
            )

    @classmethod
    def from_options(cls, options: dict[str, Any], d: int, n_points: int) -> Curriculum:
        """From a config mapping (a task's ``curriculum:`` key). ``d_end`` and ``points_end``
        default to the task's ``d`` and prompt length ``n_points`` (= k_shot + k_query), which
        they may not exceed."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in options.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"task.curriculum.{key}: unknown key; {hint}valid keys: {names}")
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(
                    f"task.curriculum.{key}: got {value!r} ({type(value).__name__}), expected "
                    "an int"
                )
        opts = {"d_end": d, "points_end": n_points, **options}
        if "d_start" not in options:
            opts["d_start"] = min(cls.d_start, opts["d_end"])
        if "points_start" not in options:
            opts["points_start"] = min(cls.points_start, opts["points_end"])
        cur = cls(**opts)
        if cur.d_end > d:
            raise ConfigError(f"task.curriculum.d_end={cur.d_end} exceeds the task's d={d}")
        if cur.points_end > n_points:
            raise ConfigError(
                f"task.curriculum.points_end={cur.points_end} exceeds the task's prompt length "
                f"k_shot + k_query = {n_points}; raise k_shot or lower points_end"
            )
        return cur

    def __call__(self, step: int) -> tuple[int, int]:
        """``(d_active, n_points)`` at outer step ``step``."""
        stage = max(int(step), 0) // self.every
        d = min(self.d_start + stage * self.d_inc, self.d_end)
        n = min(self.points_start + stage * self.points_inc, self.points_end)
        return d, n

    def apply(self, sampler: Any, step: int) -> Any:
        """A copy of a dataclass sampler with ``d_active`` and ``k_shot = n_points - k_query``
        set for ``step`` (the samplers of this module)."""
        d, n = self(step)
        return dataclasses.replace(sampler, d_active=d, k_shot=max(n - sampler.k_query, 1))


class CurriculumTasks:
    """A training sampler that follows a :class:`Curriculum`.

    The recipe calls :meth:`set_step` before drawing each meta-batch (and again after a
    resume, so a resumed run sees the same schedule); :meth:`sample` then draws prompts with
    that step's ``d_active`` and length. Other attributes (``d``, ``k_query``, ``function``,
    ...) are those of the wrapped sampler.
    """

    def __init__(self, base: Any, curriculum: Curriculum):
        if not dataclasses.is_dataclass(base) or not {"d_active", "k_shot", "k_query"} <= {
            f.name for f in dataclasses.fields(base)
        }:
            raise ConfigError(
                f"CurriculumTasks: {type(base).__name__} has no d_active/k_shot/k_query fields; "
                "a curriculum needs a function-class sampler (linear, relu_net, decision_tree)"
            )
        if curriculum.d_end > base.d:
            raise ConfigError(f"Curriculum.d_end={curriculum.d_end} exceeds d={base.d}")
        if curriculum.points_start <= base.k_query:
            raise ConfigError(
                f"Curriculum.points_start={curriculum.points_start} leaves no support point "
                f"besides k_query={base.k_query}; raise points_start"
            )
        self.base = base
        self.curriculum = curriculum
        self.step = 0
        self.current = curriculum.apply(base, 0)

    def set_step(self, step: int) -> None:
        """Follow the schedule at outer step ``step``."""
        self.step = int(step)
        if self.curriculum(step) != (self.current.d_active, self.n_points):
            self.current = self.curriculum.apply(self.base, step)

    @property
    def d_active(self) -> int:
        """Active input coordinates at the current step."""
        return int(self.current.d_active)

    @property
    def n_points(self) -> int:
        """Prompt length (support + query points) at the current step."""
        return int(self.current.k_shot + self.current.k_query)

    def sample(self, num_tasks: int, generator: torch.Generator, **overrides: Any) -> TaskBatch:
        """Draw from the current stage (keyword overrides as in the wrapped sampler)."""
        return self.current.sample(num_tasks, generator, **overrides)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "current", "curriculum"):  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.current, name)

    def __repr__(self) -> str:
        return (f"CurriculumTasks({self.base!r}, {self.curriculum!r}, step={self.step}, "
                f"d_active={self.d_active}, n_points={self.n_points})")
