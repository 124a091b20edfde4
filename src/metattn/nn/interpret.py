"""Reading attention out of a model: per-layer, per-head maps, and attention rollout.

:func:`capture_attention` runs one forward under :func:`~metattn.nn.attention.record_attention`
and names what it caught: every :class:`~metattn.nn.attention.MultiHeadAttention` (metattn's
blocks, the ViT, the in-context Transformer, FEAT's set-to-set layer, cross-attention) and
anything else that hands its weights to :func:`~metattn.nn.attention.push_attention` (Matching
Networks' attention over the support set; a wrapped Hugging Face encoder). The fused kernel
returns no weights, so a forward that would have run it runs the math path instead: the
result says so (``math_path``) and a log line tells. The outputs are those of the math path,
equal to the fused kernel's to rounding.

:func:`attention_rollout` is Abnar & Zuidema (2020): average the heads, add the residual
connection as the identity (``0.5 A + 0.5 I``, rows renormalised), multiply the layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metattn.nn.attention import fused_allowed, record_attention

log = logging.getLogger(__name__)

MATH_PATH_NOTICE = ("attention capture: this forward would have run the fused attention "
                    "kernel, which returns no weights; it ran the math path instead (same "
                    "outputs to rounding)")


@dataclass
class AttentionMaps:
    """The attention of one forward: ``weights[i]`` ``[..., heads, L_q, L_k]`` (detached,
    rows sum to 1 over the keys) of the module called ``names[i]``, in call order. A module
    called more than once (a looped Transformer) appears once per call, ``name@1``, ``@2``...
    ``math_path``: the forward would have run the fused kernel and ran the math path to
    expose the weights."""

    names: list[str]
    weights: list[torch.Tensor]
    math_path: bool = False

    def __len__(self) -> int:
        return len(self.weights)

    def select(self, prefix: str) -> AttentionMaps:
        """The maps of modules whose name starts with ``prefix`` (e.g. ``"encoder."``)."""
        keep = [i for i, n in enumerate(self.names) if n.startswith(prefix)]
        return AttentionMaps([self.names[i] for i in keep], [self.weights[i] for i in keep],
                             self.math_path)

    def stack(self) -> torch.Tensor:
        """All maps as one tensor ``[..., layers, heads, L_q, L_k]`` (layers in call order).

        Raises ``ValueError`` if the maps differ in shape (:meth:`select` one stack first)."""
        if not self.weights:
            raise ValueError("no attention was captured: the forward called no attention "
                             "module (a compiled model records nothing)")
        shapes = {tuple(w.shape) for w in self.weights}
        if len(shapes) > 1:
            raise ValueError(f"attention maps of different shapes {sorted(shapes)} from "
                             f"{self.names}; select one stack of layers with .select(prefix)")
        return torch.stack(self.weights, dim=-4)


def _names(root: nn.Module | None, modules: list[nn.Module]) -> list[str]:
    known = {id(m): n for n, m in root.named_modules()} if root is not None else {}
    seen: dict[str, int] = {}
    out = []
    for m in modules:
        name = known.get(id(m), type(m).__name__)
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}@{k}")
    return out


def capture_attention(fn: Callable[..., Any], *args: Any, root: nn.Module | None = None,
                      **kwargs: Any) -> tuple[Any, AttentionMaps]:
    """Run ``fn(*args, **kwargs)`` and return ``(its output, the attention it computed)``.

    ``root``: the module whose ``named_modules`` name the maps (default: class names).
    Nothing about the model changes; wrap the call in ``torch.no_grad()`` as usual.
    """
    fused = fused_allowed(need_weights=False)
    with record_attention() as rec:
        out = fn(*args, **kwargs)
    maps = AttentionMaps(_names(root, [m for m, _ in rec]), [w for _, w in rec],
                         math_path=fused and bool(rec))
    if maps.math_path:
        log.info(MATH_PATH_NOTICE)
    return out, maps


def attention_rollout(weights: torch.Tensor, residual: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of stacked self-attention maps.

    ``weights`` ``[..., layers, heads, L, L]`` (first layer first) -> ``[..., L, L]``: row i
    says how much each input token flows into token i at the top. Heads are averaged; with
    ``residual`` each layer's map becomes ``0.5 A + 0.5 I`` (the skip connection), rows
    renormalised; the layers' maps are then multiplied, top layer leftmost.
    """
    if weights.dim() < 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"rollout takes self-attention maps [..., layers, heads, L, L]; got "
                         f"shape {tuple(weights.shape)}")
    a = weights.mean(-3)  # [..., layers, L, L]
    if residual:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
    out = a[..., 0, :, :]
    for layer in range(1, a.shape[-3]):
        out = a[..., layer, :, :] @ out
    return out
