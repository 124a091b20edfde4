"""Text models (a learner over a Hugging Face encoder): the attention inside each query
sentence, as attention rollout into the sentence embedding over the tokens and as the last
layer's maps per head (padding removed); and, for the metric learners, the token deletion
test (does removing the most attended token change the prediction?)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from metattn.explain.metric import LABELS
from metattn.explain.report import Section
from metattn.explain.run import Explained
from metattn.meta.base import eval_mode
from metattn.meta.faithfulness import (
    faithfulness_table,
    text_tokens,
    token_deletion,
    token_rollout,
)
from metattn.meta.metric import MetricLearner

SHOWN = 4  # query sentences in the rollout figure (the first query of each episode)
HEADS_SHOWN = 2  # of those, how many get the per-head figure


def _encoder(ctx: Explained):
    model = getattr(ctx.learner, "model", None)
    return model if type(model).__name__ == "HFEncoder" else None


def applies(ctx: Explained) -> bool:
    """Any learner whose ``model`` is an HFEncoder (metric learners, MAML)."""
    return _encoder(ctx) is not None


def _tokens(enc, ids: torch.Tensor) -> list[str]:
    from tokenizers import Tokenizer

    from metattn.nn.hf import pretrained_path

    tok = Tokenizer.from_file(str(pretrained_path(enc.path) / "tokenizer.json"))
    return [tok.id_to_token(int(i)) or f"<{int(i)}>" for i in ids]


def _predictions(ctx: Explained) -> torch.Tensor | None:
    """Predicted classes ``[T, Q]`` of a metric learner (None for others)."""
    if not isinstance(ctx.learner, MetricLearner):
        return None
    b = ctx.batch
    n = b.n_way if b.n_way is not None else int(b.support_y.max()) + 1
    with eval_mode(ctx.learner), torch.no_grad():
        zs, zq = ctx.learner.embed(b.support_x, b.query_x)
        return ctx.learner.logits(zs, b.support_y, zq, n).argmax(-1)


def _rollout_figure(rows: list[tuple[str, list[str], torch.Tensor, torch.Tensor]]
                    ) -> plt.Figure:
    """One bar chart per sentence: ``(title, tokens, weights, maskable)``."""
    fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                             figsize=(max(6.0, 0.45 * max(len(r[1]) for r in rows)),
                                      1.9 * len(rows)))
    for ax, (title, toks, w, inner) in zip(axes[:, 0], rows):
        # [CLS]/[SEP] often take most of the rollout: the axis fits the other tokens and a
        # taller grey bar is clipped, its value written on it
        top = 1.15 * float(w[inner].max()) if inner.any() else float(w.max())
        ax.bar(range(len(toks)), w.clamp(max=top).numpy(),
               color=["tab:blue" if m else "tab:gray" for m in inner.tolist()])
        for j in (w > top).nonzero()[:, 0].tolist():
            ax.text(j, 0.5 * top, f"{float(w[j]):.2f}", ha="center", fontsize=7,
                    rotation=90, color="white")
        ax.set_ylim(0, top)
        ax.set_xticks(range(len(toks)), toks, rotation=60, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def _heads_figure(maps: torch.Tensor, toks: list[str]) -> plt.Figure:
    """``maps [heads, L, L]`` (one sentence, last layer, padding removed)."""
    heads = maps.shape[0]
    cols = min(heads, 4)
    nrows = -(-heads // cols)
    size = max(2.2, 0.18 * len(toks))
    fig, axes = plt.subplots(nrows, cols, squeeze=False, figsize=(size * cols, size * nrows))
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(maps[h].numpy(), vmin=0, cmap="viridis")
        ax.set_xticks(range(len(toks)), toks, rotation=90, fontsize=5)
        ax.set_yticks(range(len(toks)), toks, fontsize=5)
        ax.set_title(f"head {h}", fontsize=7)
    fig.tight_layout()
    return fig


def sections(ctx: Explained) -> list[Section]:
    """The text sections of the report."""
    enc, b = _encoder(ctx), ctx.batch
    sec = Section("Text: token attention inside the query sentences")
    Q = b.query_x.shape[1]
    step = max(1, Q // b.n_way) if b.n_way else 1  # queries come class by class
    picks = [(t, (t * step) % Q) for t in range(min(SHOWN, b.num_tasks))]
    pred = _predictions(ctx)
    ids = torch.stack([b.query_x[t, q] for t, q in picks])
    with eval_mode(ctx.learner), torch.no_grad():
        maps = enc.attention(ids)
        roll = token_rollout(enc, ids)  # [n, L]
    inner = text_tokens(ids, enc.pad_id)
    rows, table = [], []
    for i, (t, q) in enumerate(picks):
        keep = ids[i] != enc.pad_id
        toks = _tokens(enc, ids[i][keep])
        w = roll[i][keep]
        true = int(b.query_y[t, q])
        title = f"episode {t}, query {q}: true class {true}"
        if pred is not None:
            title += f", predicted {int(pred[t, q])}"
        rows.append((title, toks, w, inner[i][keep]))
        top = w.masked_fill(~inner[i][keep], -1).argsort(descending=True)[:3].tolist()
        table.append([" ".join(toks), *(f"{toks[j]} ({float(w[j]):.3f})" for j in top)])
    into = "the first token ([CLS])" if enc.pooling == "cls" else "the mean-pooled tokens"
    sec.text(f"Attention rollout (Abnar & Zuidema 2020) over all {maps.shape[1]} layers, "
             "heads averaged, the residual counted: the bars are how much each token flows "
             f"into the sentence embedding, i.e. into {into} at the top (grey: [CLS] and "
             "[SEP], which the deletion test never masks; a grey bar taller than the axis is "
             "clipped and its value written on it). Padding removed. One query per episode.")
    ctx.figures.add(sec, _rollout_figure(rows), "text_rollout",
                    "Rollout into the sentence embedding over the tokens of each query.")
    sec.table(["query tokens", "most attended word piece", "2nd", "3rd"],
              [r + [""] * (4 - len(r)) for r in table])
    for i, (t, q) in enumerate(picks[:HEADS_SHOWN]):
        keep = b.query_x[t, q] != enc.pad_id
        last = maps[i, -1][:, keep][:, :, keep]
        ctx.figures.add(sec, _heads_figure(last, rows[i][1]), f"text_heads_{i}",
                        f"Episode {t}, query {q}: the last layer's attention per head "
                        "(rows: query tokens, columns: the tokens they attend to).")
    if not isinstance(ctx.learner, MetricLearner):
        sec.note("The maps are those of the meta-learned initialisation, before the inner "
                 "loop adapts it to the episode.")
    sec.note("Attention weights show where the model reads, not why it decides; rollout "
             "assumes the heads mix linearly and ignores the value vectors and the MLPs. "
             "The deletion table below (metric learners) is the check.")
    if not isinstance(ctx.learner, MetricLearner):
        return [sec]
    return [sec, _faithfulness(ctx)]


def _faithfulness(ctx: Explained) -> Section:
    sec = Section("Faithfulness of the token attention")
    rows = faithfulness_table(ctx.learner, ctx.faith, ctx.seed, test=token_deletion)
    sec.text("For each query one token of its sentence is masked (its id becomes the pad "
             "id: no layer attends to it and the pooling skips it): the token that flows "
             "most into the sentence embedding by the rollout above (top), one drawn at "
             "random, or the one that flows least (lowest); [CLS] and [SEP] are never "
             "masked. The query is then classified again against the same support set. "
             "Mean and 95% CI over the fixed test episodes (each episode: the mean over its "
             "queries).")
    measures = [k for k in rows[0] if k in LABELS]
    header = ["masked token"] + [h for k in measures for h in (LABELS[k], "95% CI")]
    sec.table(header + ["episodes"],
              [[r["removal"], *(r[x] for k in measures for x in (k, f"{k}_ci95")),
                r["episodes"]] for r in rows])
    return sec
