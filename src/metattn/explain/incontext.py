"""In-context regression: which prompt points each prediction attends to, on the curve."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from metattn.explain.metric import faithfulness_section
from metattn.explain.report import Section
from metattn.explain.run import Explained
from metattn.meta.base import eval_mode
from metattn.meta.incontext import InContextLearner


def applies(ctx: Explained) -> bool:
    """The in-context learner."""
    return isinstance(ctx.learner, InContextLearner)


def _curve_figure(ctx: Explained, per_example: torch.Tensor, pred: torch.Tensor
                  ) -> plt.Figure:
    """One panel per episode: the prompt points sized and coloured by the attention of one
    query (last layer, heads averaged), the query's prediction and truth, and the
    predictions at every query (the learned curve)."""
    b = ctx.batch
    T = b.num_tasks
    fig, axes = plt.subplots(1, T, squeeze=False, figsize=(3.2 * T, 3))
    for t in range(T):
        ax = axes[0, t]
        xq, yq, p = (v[t, :, 0].cpu().numpy() for v in (b.query_x, b.query_y, pred))
        order = xq.argsort()
        ax.plot(xq[order], yq[order], color="0.75", lw=1, label="truth (queries)")
        ax.plot(xq[order], p[order], color="C0", lw=1, label="prediction")
        q = int(order[len(order) // 2])  # the middle query
        w = per_example[t, -1, :, q].mean(0).cpu().numpy()  # [k]
        sc = ax.scatter(b.support_x[t, :, 0].cpu().numpy(), b.support_y[t, :, 0].cpu().numpy(),
                        s=20 + 300 * w, c=w, cmap="viridis", vmin=0, zorder=3,
                        label="prompt (size: attention)")
        ax.scatter([xq[q]], [p[q]], marker="*", s=150, color="C3", zorder=4,
                   label="the query")
        ax.set_title(f"episode {t}", fontsize=8)
        fig.colorbar(sc, ax=ax, fraction=0.05)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def _layers_figure(per_example: torch.Tensor) -> plt.Figure:
    """Episode 0, first query: its attention over the prompt points per layer and head."""
    w = per_example[0, :, :, 0]  # [layers, heads, k]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * w.shape[-1] + 2), 0.3 * w.shape[0]
                                    * w.shape[1] + 1.5))
    ax.imshow(w.flatten(0, 1).cpu().numpy(), aspect="auto", vmin=0)
    ax.set_yticks(range(w.shape[0] * w.shape[1]),
                  [f"layer {i // w.shape[1]} head {i % w.shape[1]}"
                   for i in range(w.shape[0] * w.shape[1])], fontsize=6)
    ax.set_xlabel("prompt point i (weight on x_i plus y_i)")
    fig.tight_layout()
    return fig


def sections(ctx: Explained) -> list[Section]:
    """The in-context regression section."""
    learner, b = ctx.learner, ctx.batch
    sec = Section("In-context regression: which prompt points each prediction attends to")
    with eval_mode(learner), torch.no_grad():
        att = learner.query_attention(b.support_x, b.support_y, b.query_x)
        pred = learner.predict(b.support_x, b.support_y, b.query_x)
    if b.support_x.shape[-1] == 1 and pred.shape[-1] == 1:
        ctx.figures.add(sec, _curve_figure(ctx, att.per_example, pred), "icl_curve",
                        "Prompt points sized and coloured by the attention of the marked "
                        "query (last layer, heads averaged), with the predicted curve.")
    else:
        sec.note("Inputs are not one-dimensional: no curve to draw.")
    ctx.figures.add(sec, _layers_figure(att.per_example), "icl_layers",
                    "Episode 0, first query: attention on each prompt point, per layer "
                    "and head (a looped model: one row per layer application).")
    nearest = (b.support_x.unsqueeze(1) - b.query_x.unsqueeze(2)).norm(dim=-1).argmin(-1)
    last = att.per_example[:, -1].mean(1)  # [T, Q, k]
    share = last.gather(-1, nearest.unsqueeze(-1)).mean()
    sec.text(f"Last layer, heads averaged: the prompt point nearest the query (in x) gets "
             f"{float(share):.3f} of the query's attention on average (uniform: "
             f"{1 / b.support_x.shape[1]:.3f}).")
    return [sec, faithfulness_section(ctx, "prompt point")]
