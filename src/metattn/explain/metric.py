"""Matching Networks and FEAT: which support examples each query attends to, drawn as the
support images with the weights as bars, correct and wrong predictions side by side; and the
faithfulness table (does removing the most attended example change the prediction?)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from metattn.explain.report import Section
from metattn.explain.run import Explained
from metattn.meta.base import eval_mode
from metattn.meta.faithfulness import faithfulness_table, support_attention
from metattn.meta.metric import FEAT, MatchingNet, ProtoNet

SHOWN_KEYS = 10
TEXT_NOTE = ("Text episodes: the text section shows the attention inside each query "
             "sentence; other kinds plug in their own section "
             "(metattn.explain.register_builder).")


def applies(ctx: Explained) -> bool:
    """The metric learners (ProtoNet only gets a note: it has no attention)."""
    return isinstance(ctx.learner, (MatchingNet, FEAT, ProtoNet))


def _show(ax: plt.Axes, img: torch.Tensor, title: str, colour: str | None = None) -> None:
    ax.imshow(img.float().mean(0).cpu().numpy(), cmap="gray_r")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    if colour:
        for side in ax.spines.values():
            side.set_edgecolor(colour)
            side.set_linewidth(3)


def _queries_figure(ctx: Explained, view, picks: list[tuple[int, int]]) -> plt.Figure:
    """One row per ``(episode, query)``: the query, its most attended keys (green frame: the
    true class, red: the predicted class when wrong), and the weights as bars."""
    b = ctx.batch
    k = min(SHOWN_KEYS, view.weights.shape[-1])
    fig, axes = plt.subplots(len(picks), k + 2, squeeze=False,
                             figsize=(1.2 * (k + 2) + 1.5, 1.4 * len(picks)))
    for r, (t, q) in enumerate(picks):
        w = view.weights[t, q]
        pred, true = int(view.probs[t, q].argmax()), int(b.query_y[t, q])
        _show(axes[r, 0], b.query_x[t, q], f"ep {t} query\ntrue {true} pred {pred}",
              "green" if pred == true else "red")
        order = w.argsort(descending=True)[:k]
        for c, key in enumerate(order.tolist()):
            s = int(view.keys[t, key])
            cls = int(b.support_y[t, s])
            colour = "green" if cls == true else ("red" if cls == pred else None)
            _show(axes[r, c + 1], b.support_x[t, s], f"class {cls}\n{float(w[key]):.2f}",
                  colour)
        ax = axes[r, -1]
        ax.bar(range(len(order)), w[order].cpu().numpy())
        ax.set_ylim(0, 1)
        ax.set_xticks([])
        ax.tick_params(labelsize=6)
        ax.set_title("weights", fontsize=7)
    fig.tight_layout()
    return fig


def _picks(view, y: torch.Tensor, correct: bool) -> list[tuple[int, int]]:
    """The first query of each episode predicted correctly (or wrongly)."""
    ok = view.probs.argmax(-1) == y
    out = []
    for t in range(y.shape[0]):
        idx = (ok[t] if correct else ~ok[t]).nonzero()
        if len(idx):
            out.append((t, int(idx[0])))
    return out


def sections(ctx: Explained) -> list[Section]:
    """The metric learner sections of the report."""
    learner = ctx.learner
    if isinstance(learner, ProtoNet):
        sec = Section("ProtoNet: no attention over the support set")
        sec.text("ProtoNet classifies by the distance to class means; it has no attention "
                 "over its support set to show or to test.")
        if ctx.batch.support_x.dim() != 5:
            sec.note(TEXT_NOTE)
        return [sec]
    sec = Section(f"{type(learner).__name__}: which support examples each query attends to")
    if ctx.batch.support_x.dim() != 5:  # not images [T, S, C, H, W]: text draws its own
        sec.note("The support examples are not images: the table below tests the attention "
                 "over them. " + TEXT_NOTE)
        return [sec, faithfulness_section(ctx)]
    with eval_mode(learner), torch.no_grad():
        view = support_attention(learner, ctx.batch)
    sec.text(f"Keys: {view.what}. Green frame: the query's true class; red: the predicted "
             f"class of a wrong prediction. Up to {SHOWN_KEYS} most attended keys, with "
             "their weights.")
    items = []
    for correct in (True, False):
        picks = _picks(view, ctx.batch.query_y, correct)
        word = "correct" if correct else "wrong"
        if picks:
            items.append((_queries_figure(ctx, view, picks), f"metric_{word}",
                          f"{word.capitalize()} predictions, one query per episode."))
        else:
            sec.note(f"No {word} prediction in the {ctx.batch.num_tasks} episode(s) shown.")
    ctx.figures.side_by_side(sec, items)
    return [sec, faithfulness_section(ctx)]


LABELS = {"changed": "prediction changed", "true_prob_drop": "true-class prob. drop",
          "abs_change": "|prediction change|", "error_increase": "squared error increase"}


def faithfulness_section(ctx: Explained, keys: str = "key") -> Section:
    """The deletion test's table over ``ctx.faith``."""
    sec = Section("Faithfulness: does the attention matter?")
    rows = faithfulness_table(ctx.learner, ctx.faith, ctx.seed)
    sec.text(f"For each query one {keys} is removed from its attention: the most attended "
             "one (top), one drawn at random, or the least attended one (lowest); the query "
             "is then predicted again. If the attention explains the prediction, removing "
             "the top one changes it far more than removing a random one. Mean and 95% CI "
             "over the fixed test episodes (each episode: the mean over its queries).")
    measures = [k for k in rows[0] if k in LABELS]
    header = ["removed"] + [h for k in measures for h in (LABELS[k], "95% CI")] + ["episodes"]
    sec.table(header, [[r["removal"], *(r[x] for k in measures for x in (k, f"{k}_ci95")),
                        r["episodes"]] for r in rows])
    sec.note("Attention is not automatically an explanation (Jain & Wallace 2019; Wiegreffe "
             "& Pinter 2019): this table is the check.")
    return sec
