"""Config builders for in-context learning: function-class tasks, the ICL Transformer and its
learner (see :mod:`metattn.registry`; each signature is the schema of its config section)."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from metattn.data.functions import (
    Curriculum,
    CurriculumTasks,
    DecisionTreeTasks,
    LinearTasks,
    ReLUNetTasks,
)
from metattn.errors import ConfigError
from metattn.meta.incontext import InContextLearner
from metattn.nn.incontext import ICLTransformer
from metattn.registry import register


# ------------------------------------------------------------------ tasks
# One distribution for train and test (as for sinusoids): splits differ only by seed.
# ``curriculum`` (train split only; the test split always uses the full d and prompt length):
# a mapping of :class:`~metattn.data.functions.Curriculum` fields, e.g.
# ``{d_start: 5, d_inc: 1, points_start: 11, points_inc: 2, every: 2000}``; ``d_end`` and
# ``points_end`` default to the task's d and k_shot + k_query. The recipe calls the train
# sampler's ``set_step(step)`` before every meta-batch.
def _with_curriculum(split: str, sampler: Any, curriculum: dict[str, int] | None) -> Any:
    if curriculum is None:
        return sampler
    cur = Curriculum.from_options(curriculum, sampler.d, sampler.k_shot + sampler.k_query)
    return CurriculumTasks(sampler, cur) if split == "train" else sampler


@register("task", "linear")
def linear(split: str, d: int = 20, k_shot: int = 40, k_query: int = 1, noise_std: float = 0.0,
           sparsity: int | None = None, d_active: int | None = None,
           curriculum: dict[str, int] | None = None) -> LinearTasks | CurriculumTasks:
    """Linear functions y = w . x, x, w ~ N(0, I_d) (sparse when ``sparsity`` is set)."""
    return _with_curriculum(split, LinearTasks(
        d=d, k_shot=k_shot, k_query=k_query, noise_std=noise_std, sparsity=sparsity,
        d_active=d_active), curriculum)


@register("task", "relu_net")
def relu_net(split: str, d: int = 20, hidden: int = 100, k_shot: int = 100, k_query: int = 1,
             noise_std: float = 0.0, d_active: int | None = None,
             curriculum: dict[str, int] | None = None) -> ReLUNetTasks | CurriculumTasks:
    """Random two-layer ReLU networks (Garg et al. 2022)."""
    return _with_curriculum(split, ReLUNetTasks(
        d=d, hidden=hidden, k_shot=k_shot, k_query=k_query, noise_std=noise_std,
        d_active=d_active), curriculum)


@register("task", "decision_tree")
def decision_tree(split: str, d: int = 20, depth: int = 4, k_shot: int = 100, k_query: int = 1,
                  noise_std: float = 0.0, d_active: int | None = None,
                  curriculum: dict[str, int] | None = None
                  ) -> DecisionTreeTasks | CurriculumTasks:
    """Random depth-``depth`` decision trees with N(0, 1) leaves (Garg et al. 2022)."""
    return _with_curriculum(split, DecisionTreeTasks(
        d=d, depth=depth, k_shot=k_shot, k_query=k_query, noise_std=noise_std,
        d_active=d_active), curriculum)


# ------------------------------------------------------------------ models
@register("model", "icl_transformer")
def icl_transformer(d_x: int = 20, d_y: int = 1, d_model: int = 256, n_layers: int = 12,
                    n_heads: int = 8, max_points: int = 101, d_ff: int | None = None,
                    dropout: float = 0.0,
                    token_layout: Literal["shared", "disjoint", "paired"] = "shared",
                    n_loops: int = 1) -> nn.Module:
    """GPT-2-like causal Transformer over (x, y) prompt tokens (``token_layout``: y in the
    first coordinate as in Garg et al., ``disjoint`` coordinates for x and y, or ``paired``:
    disjoint, with each y token carrying its x as well; ``n_loops``: the layers repeated with
    shared weights)."""
    return ICLTransformer(d_x, d_y, d_model, n_layers, n_heads, max_points, d_ff, dropout,
                          token_layout, n_loops)


# ------------------------------------------------------------------ learners
@register("learner", "incontext")
def incontext(model: nn.Module, loss_on: Literal["all", "query"] = "all") -> InContextLearner:
    """In-context learner: adaptation is a forward pass over the support prompt."""
    if not isinstance(model, ICLTransformer):
        raise ConfigError(
            f"learner.kind=incontext needs model.kind=icl_transformer, got a "
            f"{type(model).__name__}"
        )
    return InContextLearner(model, loss_on=loss_on)
