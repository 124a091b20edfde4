"""MAML's options in one validated dataclass; the YAML schema of ``learner: {kind: maml}``.

Every option of the family lives here, with its default and its check. :class:`MAML` takes
them as keyword arguments, and the config builder takes its schema from the fields (a field
with ``metadata={"config": False}`` is Python-only, such as a loss function).
"""

from __future__ import annotations

import difflib
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
        for key in ("inner_steps", "msl_steps", "second_order_start"):
            if getattr(self, key) < 0:
                raise ConfigError(f"MAML: {key}={getattr(self, key)}; it must be >= 0")
        if self.eval_inner_steps is None:
            self.eval_inner_steps = self.inner_steps
        if self.eval_inner_steps < 0:
            raise ConfigError(f"MAML: eval_inner_steps={self.eval_inner_steps}; it must be >= 0")
        if self.learn_inner_lr not in (None, "scalar", "per_param", "per_layer_step"):
            raise ConfigError(
                f"MAML: learn_inner_lr={self.learn_inner_lr!r}; choose None, 'scalar', "
                "'per_param' (Meta-SGD) or 'per_layer_step' (MAML++)")
        if self.vectorize not in (True, False, "auto"):
            raise ConfigError(f"MAML: vectorize={self.vectorize!r}; choose True, False or "
                              "'auto'")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"MAML: chunk_size={self.chunk_size}; use a number of tasks >= 1, "
                              "or None for all at once")
        threads = self.task_threads
        if threads != "auto" and not (isinstance(threads, int) and not isinstance(threads, bool)
                                      and threads >= 1):
            raise ConfigError(f"MAML: task_threads={threads!r}; use a number of threads >= 1 "
                              "(1 = off) or 'auto'")
        if not isinstance(self.compile_inner, (bool, dict)):
            raise ConfigError(f"MAML: compile_inner={self.compile_inner!r}; use true/false or a "
                              "dict of torch.compile options, e.g. {'mode': 'max-autotune'}")
        if self.compile_inner is not False:
            if self.vectorize is True:
                raise ConfigError("MAML: compile_inner compiles the per-task loop's inner step; "
                                  "use vectorize=False or 'auto' (which then picks the loop)")
            if self.checkpoint:
                raise ConfigError("MAML: compile_inner with checkpoint=True is not supported "
                                  "(the recomputed steps run eagerly); drop one of them")
        self.inner_lr = float(self.inner_lr)


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
            close = difflib.get_close_matches(want, all_names, n=3)
            prefixes = sorted({n.rsplit(".", 1)[0] for n in all_names if "." in n})
            hint = f"did you mean {close}? " if close else ""
            raise ConfigError(
                f"inner_params: the model has no parameter or module named {want!r}; {hint}"
                f"parameters: {all_names[:12]}{' ...' if len(all_names) > 12 else ''}; "
                f"modules: {prefixes[:12]}"
            )
        chosen += [n for n in hit if n not in chosen]
    if not chosen:
        raise ConfigError("MAML: inner_params=[] names no parameter to adapt; name some (ANIL: "
                          "['head']) or leave inner_params unset to adapt all")
    return chosen
