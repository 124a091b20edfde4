"""MAML over a Transformer or ViT: the same query's attention before and after the inner
loop, per head, and their difference; which heads changed most across episodes; how much
the inner loop moved each layer's parameters."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from metattn.data.tasks import mean_ci95
from metattn.explain.report import Section
from metattn.explain.run import Explained
from metattn.meta.maml import MAML
from metattn.nn.interpret import AttentionMaps, attention_rollout, capture_attention


def applies(ctx: Explained) -> bool:
    """MAML and its variants."""
    return isinstance(ctx.learner, MAML)


def _episode(ctx: Explained, t: int) -> tuple[AttentionMaps, AttentionMaps, dict[str, float]]:
    """One episode's query attention before and after adaptation, and each layer's relative
    parameter change ``||theta' - theta|| / ||theta||`` (its weight and bias together)."""
    learner, b = ctx.learner, ctx.batch
    model = learner.model
    adapted = learner.adapt(b.support_x[t], b.support_y[t])
    with torch.no_grad():
        _, before = capture_attention(model, b.query_x[t], root=model)
        _, after = capture_attention(adapted, b.query_x[t], root=model)
        moved: dict[str, list[float]] = {}  # layer -> [sum ||d||^2, sum ||theta||^2]
        for name, p in model.named_parameters():
            acc = moved.setdefault(name.rpartition(".")[0] or name, [0.0, 0.0])
            acc[0] += float((adapted.params[name] - p).pow(2).sum())
            acc[1] += float(p.pow(2).sum())
    change = {k: (d / max(n, 1e-24)) ** 0.5 for k, (d, n) in moved.items()}
    return _first_stack(before), _first_stack(after), change


def _first_stack(maps: AttentionMaps) -> AttentionMaps:
    """The maps shaped like the first one (all of a ViT's; an encoder-decoder's encoder
    self-attention: its decoder and cross-attention maps have other shapes)."""
    if not maps.weights:
        return maps
    keep = [i for i, w in enumerate(maps.weights) if w.shape == maps.weights[0].shape]
    return AttentionMaps([maps.names[i] for i in keep], [maps.weights[i] for i in keep],
                         maps.math_path)


def _tv(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Mean total-variation distance between attention rows -> ``[layers, heads]``."""
    d = 0.5 * (after - before).abs().sum(-1)  # [Q, layers, heads, L]
    return d.mean(-1).mean(0)


def _heads_figure(before: torch.Tensor, after: torch.Tensor, names: list[str]) -> plt.Figure:
    """``[layers, heads, L, L]`` of one query: rows before / after / after - before per
    layer, one column per head."""
    n_layers, n_heads = before.shape[:2]
    fig, axes = plt.subplots(3 * n_layers, n_heads, squeeze=False,
                             figsize=(2.1 * n_heads, 2.1 * 3 * n_layers))
    for li in range(n_layers):
        for h in range(n_heads):
            diff = after[li, h] - before[li, h]
            lim = float(diff.abs().max()) or 1.0
            for r, (m, kw) in enumerate(((before[li, h], {"vmin": 0}),
                                         (after[li, h], {"vmin": 0}),
                                         (diff, {"cmap": "coolwarm", "vmin": -lim,
                                                 "vmax": lim}))):
                ax = axes[3 * li + r, h]
                ax.imshow(m.cpu().numpy(), **kw)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{('before', 'after', 'difference')[r]}\n{names[li]} h{h}",
                             fontsize=7)
    fig.tight_layout()
    return fig


def _rollout_figure(ctx: Explained, pairs: list[tuple[torch.Tensor, torch.Tensor]]
                    ) -> plt.Figure | None:
    """For image queries whose tokens are patches: the rollout's attention received by each
    patch (mean over the rows), before and after, over the image."""
    x = ctx.batch.query_x
    p = getattr(ctx.learner.model, "patch_size", None)
    if p is None or x.dim() != 5:
        return None
    H, W = x.shape[-2] // p, x.shape[-1] // p
    fig, axes = plt.subplots(len(pairs), 4, squeeze=False, figsize=(8, 2.1 * len(pairs)))
    for t, (before, after) in enumerate(pairs):
        rb, ra = (attention_rollout(m[0]).mean(0).view(H, W) for m in (before, after))
        img = x[t, 0].mean(0).cpu()
        lim = float((ra - rb).abs().max()) or 1.0
        kws = ({"cmap": "gray_r"}, {"cmap": "viridis"}, {"cmap": "viridis"},
               {"cmap": "coolwarm", "vmin": -lim, "vmax": lim})
        for c, (m, title) in enumerate(((img, "query"), (rb, "rollout before"),
                                        (ra, "rollout after"), (ra - rb, "after - before"))):
            ax = axes[t, c]
            ax.imshow(m.cpu().numpy(), **kws[c])
            ax.set_title(f"episode {t}: {title}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def sections(ctx: Explained) -> list[Section]:
    """The MAML sections of the report."""
    T = ctx.batch.num_tasks
    runs = [_episode(ctx, t) for t in range(T)]
    out = []
    if runs[0][0].weights:
        out.append(_attention_section(ctx, runs))
    out.append(_parameter_section(ctx, [c for _, _, c in runs]))
    if not runs[0][0].weights:
        out[-1].note(f"{type(ctx.learner.model).__name__} computes no attention: only its "
                     "parameters' change is shown.")
    return out


def _attention_section(ctx: Explained, runs: list) -> Section:
    sec = Section("MAML: attention before and after the inner loop")
    before, after = runs[0][0], runs[0][1]
    names = before.names
    b0, a0 = before.stack(), after.stack()  # [Q, layers, heads, L, L]
    steps = getattr(ctx.learner, "eval_inner_steps", "?")
    if before.math_path:
        sec.note("The model normally runs the fused attention kernel, which returns no "
                 "weights; the maps below come from the math path (same outputs to rounding).")
    ctx.figures.add(sec, _heads_figure(b0[0], a0[0], names), "maml_heads",
                    f"Episode 0, query 0: each layer's attention per head (queries x keys) "
                    f"before adaptation, after {steps} inner step(s), and the difference.")
    fig = _rollout_figure(ctx, [(b.stack()[:1], a.stack()[:1]) for b, a, _ in runs[:4]])
    if fig is not None:
        ctx.figures.add(sec, fig, "maml_rollout",
                        "Query 0 of each episode: attention rollout (Abnar & Zuidema 2020), "
                        "the attention each image patch receives, before and after.")
    tv = torch.stack([_tv(b.stack(), a.stack()) for b, a, _ in runs])  # [T, layers, heads]
    rows = []
    for li, name in enumerate(names):
        for h in range(tv.shape[-1]):
            m, ci = mean_ci95(tv[:, li, h])
            rows.append([name, h, m, ci])
    rows.sort(key=lambda r: -r[2])
    sec.text(f"Heads whose attention the inner loop changed most, over {tv.shape[0]} "
             "episode(s): the mean total-variation distance between a query's attention row "
             "before and after adaptation (0 = unchanged, 1 = disjoint).")
    sec.table(["layer", "head", "change (TV)", "95% CI"], rows[:12])
    return sec


def _parameter_section(ctx: Explained, changes: list[dict[str, float]]) -> Section:
    sec = Section("MAML: how far the inner loop moves each layer")
    names = list(changes[0])
    stats = [mean_ci95(torch.tensor([c[n] for c in changes])) for n in names]
    moved = [(n, m, ci) for n, (m, ci) in zip(names, stats, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(moved) + 1))
    ax.barh([n for n, _, _ in moved][::-1], [m for _, m, _ in moved][::-1])
    ax.set_xlabel("||theta' - theta|| / ||theta||, mean over episodes")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    ctx.figures.add(sec, fig, "maml_parameters",
                    "Relative change of each layer's parameters (weight and bias together) "
                    "after the inner loop (0: not adapted, e.g. ANIL's body).")
    sec.table(["layer", "relative change", "95% CI"],
              sorted(([n, m, ci] for n, m, ci in moved), key=lambda r: -r[1]))
    return sec
