"""Encoder-decoder runs (inflection, translation): which source tokens each output token
attends to (the last decoder layer's cross-attention, averaged over heads), for the
meta-learned initialisation and for the model adapted to the task's support set, on the
output each one decodes."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from metattn.data.seq2seq import SPECIALS
from metattn.explain.report import Section
from metattn.explain.run import Explained
from metattn.meta.maml import MAML
from metattn.nn.interpret import capture_attention
from metattn.nn.seq2seq import Seq2SeqTransformer, greedy_decode

SHOWN = 3  # episodes drawn (the first query pair of each)


def applies(ctx: Explained) -> bool:
    """A MAML-family learner over a :class:`Seq2SeqTransformer`."""
    return isinstance(ctx.learner, MAML) and isinstance(ctx.learner.model, Seq2SeqTransformer)


def _label(vocab, i: int) -> str:
    if 0 <= i < len(SPECIALS):
        return SPECIALS[i]
    itos = getattr(vocab, "itos", None)
    if itos is not None and 0 <= i < len(itos):
        return itos[i]
    return vocab.decode([i]) or f"<{i}>"


def _cross(model: Seq2SeqTransformer, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy output ids (EOS included) and the last layer's head-averaged cross-attention
    ``[outputs, source]`` over them."""
    out = greedy_decode(model, src[None])[0]
    stop = (out == model.eos_id).nonzero()
    out = out[: int(stop[0]) + 1] if len(stop) else out
    tgt_in = torch.cat([torch.tensor([model.bos_id]), out[:-1]])
    name = f"decoder.{len(model.decoder) - 1}.cross"
    with torch.no_grad():
        _, maps = capture_attention(
            lambda: model.decode(tgt_in[None], *model.encode(src[None])), root=model)
    (w,) = maps.select(name).weights
    return out, w[0].mean(0)


def _figure(rows: list[tuple[str, list[str], list[str], torch.Tensor]]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, (title, src, out, w) in zip(axes[0], rows):
        ax.imshow(w.numpy(), cmap="viridis", vmin=0, aspect="auto")
        ax.set_xticks(range(len(src)), src, fontsize=7, rotation=90)
        ax.set_yticks(range(len(out)), out, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("source token")
    axes[0][0].set_ylabel("output token")
    fig.tight_layout()
    return fig


def sections(ctx: Explained) -> list[Section]:
    """The cross-attention section."""
    vocab, model, b = ctx.tasks.vocab, ctx.learner.model, ctx.batch
    s = Section("Cross-attention: what each output token reads")
    s.text("Each panel: one held-out task's first query pair; rows are the tokens the model "
           "writes (greedy decoding, EOS last), columns the source tokens, colour the last "
           "decoder layer's cross-attention averaged over heads. Left: the meta-learned "
           "initialisation; right: after the inner loop on the task's support set.")
    for t in range(min(SHOWN, b.num_tasks)):
        x = b.query_x[t, 0]
        src = x[: model.max_src][x[: model.max_src] != model.pad_id]
        ref = vocab.decode([int(i) for i in b.query_y[t, 0] if int(i) >= 0])
        rows, said = [], []
        adapted = ctx.learner.adapt(b.support_x[t], b.support_y[t]).to_module()
        for title, m in (("before adaptation", model), ("after adaptation", adapted)):
            out, w = _cross(m.eval(), src)
            rows.append((title, [_label(vocab, int(i)) for i in src],
                         [_label(vocab, int(i)) for i in out], w))
            said.append(f"{title}: {vocab.decode(out.tolist())!r}")
        name = f"cross_attention_{t}"
        ctx.figures.add(s, _figure(rows), name,
                        f"task {t}: reference {ref!r}; " + "; ".join(said))
    return [s]
