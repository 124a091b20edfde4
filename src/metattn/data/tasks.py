"""Tasks as data: one dataclass that every learner eats and every sampler makes."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field, fields
from typing import Protocol

import numpy as np
import torch

from metattn.errors import TaskError


@dataclass
class TaskBatch:
    """A batch of ``T`` few-shot tasks, each with a support set and a query set.

    Shapes: ``support_x`` is ``[T, S, ...]``, ``support_y`` is ``[T, S, ...]``,
    ``query_x`` is ``[T, Q, ...]`` and ``query_y`` is ``[T, Q, ...]``. The trailing input
    dimensions of support and query must agree. ``n_way``/``k_shot`` describe classification
    episodes (labels are then integers in ``[0, n_way)``); they are ``None`` for regression.
    ``info`` holds optional per-task tensors with leading dimension ``T`` (e.g. a sinusoid's
    amplitude and phase, or the source class ids) for oracles, plots and interpretation.
    ``check_labels=False`` (for samplers whose labels are right by construction) skips the
    label-range check, which reads the labels back from a GPU every step.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_way: int | None = None
    k_shot: int | None = None
    info: dict[str, torch.Tensor] = field(default_factory=dict)
    check_labels: InitVar[bool] = True

    def __post_init__(self, check_labels: bool = True) -> None:
        self.validate(labels=check_labels)

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``T`` (the leading dimension)."""
        return int(self.support_x.shape[0])

    def __len__(self) -> int:
        return self.num_tasks

    def validate(self, labels: bool = True) -> None:
        """Raise :class:`TaskError` naming the field and the fix if the batch is malformed.
        ``labels=False`` skips the label-range check, which reads the labels (a host sync on
        a GPU): batches cut or moved from a checked one skip it (see :meth:`_derive`)."""
        tensors = {
            "support_x": self.support_x,
            "support_y": self.support_y,
            "query_x": self.query_x,
            "query_y": self.query_y,
        }
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TaskError(
                    f"TaskBatch.{name} must be a torch.Tensor, got {type(t).__name__}; "
                    "convert it with torch.as_tensor(...)"
                )
            if t.dim() < 2:
                raise TaskError(
                    f"TaskBatch.{name} has shape {tuple(t.shape)}; expected a leading task "
                    f"dimension and a set dimension [T, N, ...]. For one task use "
                    f"{name}.unsqueeze(0)"
                )
        T = self.support_x.shape[0]
        for name, t in tensors.items():
            if t.shape[0] != T:
                raise TaskError(
                    f"TaskBatch.{name} has {t.shape[0]} tasks but support_x has {T}; every "
                    "field needs the same leading task dimension T"
                )
        if T == 0:
            raise TaskError("TaskBatch has 0 tasks (support_x.shape[0] == 0); sample T >= 1")
        if self.support_x.shape[1] == 0:
            raise TaskError(
                f"TaskBatch.support_x is empty (shape {tuple(self.support_x.shape)}); "
                "each task needs at least one support example to adapt on"
            )
        if self.query_x.shape[1] == 0:
            raise TaskError(
                f"TaskBatch.query_x is empty (shape {tuple(self.query_x.shape)}); "
                "each task needs at least one query example to measure the adapted model"
            )
        if self.support_y.shape[1] != self.support_x.shape[1]:
            raise TaskError(
                f"TaskBatch.support_y has {self.support_y.shape[1]} examples per task but "
                f"support_x has {self.support_x.shape[1]}; they must pair up one to one"
            )
        if self.query_y.shape[1] != self.query_x.shape[1]:
            raise TaskError(
                f"TaskBatch.query_y has {self.query_y.shape[1]} examples per task but "
                f"query_x has {self.query_x.shape[1]}; they must pair up one to one"
            )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise TaskError(
                f"TaskBatch.query_x has example shape {tuple(self.query_x.shape[2:])} but "
                f"support_x has {tuple(self.support_x.shape[2:])}; a model needs the same "
                "input shape for both sets"
            )
        if self.n_way is not None:
            if self.n_way < 1:
                raise TaskError(f"TaskBatch.n_way={self.n_way}; it must be >= 1")
            for name in ("support_y", "query_y"):
                y = tensors[name]
                if y.dtype.is_floating_point or y.dtype == torch.bool:
                    raise TaskError(
                        f"TaskBatch.{name} has dtype {y.dtype} but n_way={self.n_way} marks a "
                        "classification task; use integer labels (y.long()) or n_way=None "
                        "for regression"
                    )
                if labels and y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_way):
                    raise TaskError(
                        f"TaskBatch.{name} holds labels in [{int(y.min())}, {int(y.max())}] "
                        f"but n_way={self.n_way} needs labels in [0, {self.n_way}); "
                        "relabel each task's classes 0..n_way-1"
                    )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move every tensor to ``device``; floating inputs are cast to ``dtype`` if given."""

        # non-blocking towards an accelerator only: a copy to the CPU would hand back tensors
        # that may still be filling
        nb = torch.device(device).type != "cpu"

        def mv(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.dtype.is_floating_point:
                return t.to(device=device, dtype=dtype, non_blocking=nb)
            return t.to(device=device, non_blocking=nb)

        return self._derive(
            support_x=mv(self.support_x),
            support_y=mv(self.support_y),
            query_x=mv(self.query_x),
            query_y=mv(self.query_y),
            info={k: v.to(device, non_blocking=nb) for k, v in self.info.items()},
        )

    def _derive(self, **changes: torch.Tensor | dict) -> TaskBatch:
        """``dataclasses.replace`` for a batch moved or cut from this one: shapes are checked
        again, but not the label range, which these labels already passed. That check reads
        the labels back to the host, which a CUDA graph capture forbids (MAML's chunks slice
        the batch inside the captured step)."""
        new = object.__new__(type(self))
        for f in fields(self):
            setattr(new, f.name, changes.get(f.name, getattr(self, f.name)))
        new.validate(labels=False)
        return new

    def task(self, i: int) -> TaskBatch:
        """The ``i``-th task as a batch of one."""
        return self.slice(i, i + 1)

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop`` (used to split a meta-batch across DDP ranks or chunks)."""
        return self._derive(
            support_x=self.support_x[start:stop],
            support_y=self.support_y[start:stop],
            query_x=self.query_x[start:stop],
            query_y=self.query_y[start:stop],
            info={k: v[start:stop] for k, v in self.info.items()},
        )

    @classmethod
    def cat(cls, batches: list[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task dimension."""
        if not batches:
            raise TaskError("TaskBatch.cat got an empty list; pass at least one batch")
        b0 = batches[0]
        return cls(
            support_x=torch.cat([b.support_x for b in batches]),
            support_y=torch.cat([b.support_y for b in batches]),
            query_x=torch.cat([b.query_x for b in batches]),
            query_y=torch.cat([b.query_y for b in batches]),
            n_way=b0.n_way,
            k_shot=b0.k_shot,
            info={k: torch.cat([b.info[k] for b in batches]) for k in b0.info},
        )


class TaskSampler(Protocol):
    """Anything that makes seeded task batches.

    ``sample(num_tasks, generator)`` draws fresh tasks from the generator. Samplers that know
    a train/test split take ``split`` in their constructor.
    """

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


def fixed_episodes(
    sampler: TaskSampler, episodes: int, seed: int, chunk: int = 100
) -> list[TaskBatch]:
    """A reproducible list of evaluation batches: the same ``episodes`` tasks for a seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    left = episodes
    while left > 0:
        n = min(chunk, left)
        out.append(sampler.sample(n, g))
        left -= n
    return out


def mean_ci95(values: torch.Tensor | np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (normal approximation, 1.96 SE).

    Non-finite values (diverged tasks) make the mean non-finite on purpose: count them with
    :func:`split_finite` and report them beside the mean of the rest.
    """
    v = np.asarray(
        values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else values,
        dtype=np.float64,
    ).ravel()
    if v.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan")
    return mean, float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def split_finite(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The finite values and how many were not finite (e.g. tasks whose inner loop diverged)."""
    ok = torch.isfinite(values)
    return values[ok], int((~ok).sum())
