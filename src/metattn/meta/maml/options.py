"""MAML's options in one validated dataclass; the YAML schema of ``learner: {kind: maml}``.

Every option of the family lives here, with its default and its check. :class:`MAML` takes
them as keyword arguments, and the config builder takes its schema from the fields (a field
with ``metadata={"config": False}`` is Python-only, such as a loss function).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from metattn.errors import ConfigError
from metattn.meta.base import LossFn

InnerLR = Literal["scalar", "per_param", "per_layer_step"]


@dataclass
class MAMLOptions:
    """The options of the MAML family's one inner loop (see :class:`MAML` for each one)."""

    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    inner_params: list[str] | str | None = None
    learn_inner_lr: InnerLR | None = None
    msl_steps: int = 0
    second_order_start: int = 0
    eval_inner_steps: int | None = None
    vectorize: bool | Literal["auto"] = "auto"
    chunk_size: int | None = None
    loss_fn: LossFn | None = field(default=None, metadata={"config": False})
    check_finite: bool = True
    has_norms: bool | None = None
    checkpoint: bool = False
    per_task_backward: bool = True
    task_threads: int | Literal["auto"] = "auto"
    compile_inner: bool | dict[str, Any] = False

    def __post_init__(self) -> None:
        if not (isinstance(self.inner_lr, (int, float)) and math.isfinite(self.inner_lr)
                and self.inner_lr > 0):
            _bad("inner_lr", f"inner_lr={self.inner_lr!r}; give a step size > 0 (0.4 for "
                 "Omniglot's Conv-4, 0.01 for the sinusoid MLP)")
        for key in ("inner_steps", "msl_steps", "second_order_start"):
            if getattr(self, key) < 0:
                _bad(key, f"{key}={getattr(self, key)}; it must be >= 0")
        if self.eval_inner_steps is None:
            self.eval_inner_steps = self.inner_steps
        if self.eval_inner_steps < 0:
            _bad("eval_inner_steps", f"eval_inner_steps={self.eval_inner_steps}; it must be "
                 ">= 0")
        if self.learn_inner_lr not in (None, "scalar", "per_param", "per_layer_step"):
            _bad("learn_inner_lr", f"learn_inner_lr={self.learn_inner_lr!r}; choose null, "
                 "'scalar', 'per_param' (Meta-SGD) or 'per_layer_step' (MAML++)")
        if self.vectorize not in (True, False, "auto"):
            _bad("vectorize", f"vectorize={self.vectorize!r}; choose true, false or 'auto'")
        if self.chunk_size is not None and self.chunk_size < 1:
            _bad("chunk_size", f"chunk_size={self.chunk_size}; use a number of tasks >= 1, or "
                 "null for all at once")
        threads = self.task_threads
        if threads != "auto" and not (isinstance(threads, int) and not isinstance(threads, bool)
                                      and threads >= 1):
            _bad("task_threads", f"task_threads={threads!r}; use a number of threads >= 1 "
                 "(1 = off) or 'auto'")
        if not isinstance(self.compile_inner, (bool, dict)):
            _bad("compile_inner", f"compile_inner={self.compile_inner!r}; use true/false or a "
                 "dict of torch.compile options, e.g. {'mode': 'max-autotune'}")
        if self.compile_inner is not False:
            if self.vectorize is True:
                _bad("compile_inner", "compile_inner compiles the per-task loop's inner step; "
                     "use vectorize=False or 'auto' (which then picks the loop)")
            if self.checkpoint:
                _bad("compile_inner", "compile_inner with checkpoint=True is not supported "
                     "(the recomputed steps run eagerly); drop one of them")
        self.inner_lr = float(self.inner_lr)


def _bad(key: str, message: str) -> None:
    raise ConfigError(message, key=key, owner="MAML")


# The family's other members are MAML with other defaults (Python classes and YAML kinds).
@dataclass
class FOMAMLOptions(MAMLOptions):
    """First-order MAML: the meta-gradient without the second-order term."""

    first_order: bool = True


@dataclass
class ANILOptions(MAMLOptions):
    """ANIL (Raghu et al. 2020): only the head adapts in the inner loop."""

    inner_params: list[str] | str | None = "head"


@dataclass
class MetaSGDOptions(MAMLOptions):
    """Meta-SGD (Li et al. 2017): a learned inner rate per parameter element."""

    learn_inner_lr: InnerLR | None = "per_param"


@dataclass
class MAMLppOptions(MAMLOptions):
    """MAML++ (Antoniou et al. 2019): per-layer per-step rates, the multi-step loss and
    derivative-order annealing over the first 1000 outer steps."""

    learn_inner_lr: InnerLR | None = "per_layer_step"
    msl_steps: int = 1000
    second_order_start: int = 1000


def resolve_names(model: nn.Module, names: Sequence[str] | str | None) -> list[str]:
    """Parameter names selected by exact names or module prefixes (``"head"`` -> ``head.*``)."""
    all_names = [n for n, _ in model.named_parameters()]
    if names is None:
        return all_names
    if isinstance(names, str):
        names = [names]
    chosen: list[str] = []
    for want in names:
        hit = [n for n in all_names if n == want or n.startswith(want + ".")]
        if not hit:
            prefixes = sorted({n.rsplit(".", 1)[0] for n in all_names if "." in n})
            close = difflib.get_close_matches(want, prefixes + all_names, n=3)
            hint = f"did you mean {close}? " if close else ""
            raise ConfigError(
                f"inner_params: the model has no parameter or module named {want!r}; {hint}"
                f"parameters: {all_names[:12]}{' ...' if len(all_names) > 12 else ''}; "
                f"modules: {prefixes[:12]}", key="inner_params")
        chosen += [n for n in hit if n not in chosen]
    if not chosen:
        raise ConfigError("inner_params=[] names no parameter to adapt; name some (ANIL: "
                          "['head']) or leave inner_params unset to adapt all",
                          key="inner_params", owner="MAML")
    return chosen
