"""Scaled dot-product attention that MAML can differentiate through twice.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

Two implementations compute it:

* the fused kernel, ``torch.nn.functional.scaled_dot_product_attention`` (fast, low memory);
* an explicit math path (``q @ k^T``, softmax, ``@ v``) built from ordinary differentiable ops.

The fused kernels implement only a first derivative: on torch 2.13 a double backward through
them fails ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented"). The rule is therefore automatic: the fused kernel is used unless

1. the caller asked for the attention weights (the fused kernel does not return them), or
2. a second derivative will be taken: metattn's second-order learners run their inner loop
   inside :func:`double_backward`, which also pins ``F.scaled_dot_product_attention`` (and so
   ``torch.nn.MultiheadAttention`` in user models) to PyTorch's math backend, or
3. attention maps are being recorded (:func:`record_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module

from metattn.errors import ConfigError

_DOUBLE_BACKWARD: ContextVar[bool] = ContextVar("metattn_double_backward", default=False)
_RECORDER: ContextVar[list | None] = ContextVar("metattn_attention_recorder", default=None)


@contextmanager
def double_backward(enabled: bool = True) -> Iterator[None]:
    """Run the block on attention paths that support a second derivative.

    Inside it, metattn's attention uses the explicit math path and PyTorch's own
    ``scaled_dot_product_attention`` is restricted to its math backend.
    """
    token = _DOUBLE_BACKWARD.set(enabled or _DOUBLE_BACKWARD.get())
    with ExitStack() as stack:
        if enabled:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        try:
            yield
        finally:
            _DOUBLE_BACKWARD.reset(token)


def double_backward_enabled() -> bool:
    """Whether the current code runs inside :func:`double_backward`."""
    return _DOUBLE_BACKWARD.get()


@contextmanager
def record_attention() -> Iterator[list[tuple[nn.Module, torch.Tensor]]]:
    """Collect ``(module, weights)`` from every :class:`MultiHeadAttention` called inside (and
    from any other attention handed to :func:`push_attention`); named, stacked maps:
    :func:`metattn.nn.interpret.capture_attention`.

    Weights have shape ``[..., heads, L_q, L_k]`` and are detached. Recording forces the
    math path, which computes the weights explicitly, and MAML's per-task loop (not vmap), so
    each task's weights come out as their own entries. Modules run through ``torch.compile``
    record nothing (compiled code cannot read the recorder).
    """
    store: list[tuple[nn.Module, torch.Tensor]] = []
    token = _RECORDER.set(store)
    try:
        yield store
    finally:
        _RECORDER.reset(token)


def push_attention(module: nn.Module, weights: torch.Tensor | None) -> None:
    """Hand ``module``'s attention ``weights [..., heads, L_q, L_k]`` to the active
    :func:`record_attention` block (nothing happens outside one). Every metattn attention
    module calls it; an attention of one's own (a wrapped Hugging Face layer, a metric
    learner's attention over its support set) calls it to be captured the same way."""
    recorder = _recorder()
    if recorder is not None and weights is not None:
        recorder.append((module, _plain(weights.detach())))


def _recorder() -> list | None:
    # torch.compile cannot trace ContextVar.get (a graph break in every layer), and a compiled
    # graph could not honour a flag it was not traced with: compiled code neither records nor
    # takes a second derivative (torch.compile has no double backward).
    return None if torch.compiler.is_compiling() else _RECORDER.get()


def _double_backward() -> bool:
    return False if torch.compiler.is_compiling() else _DOUBLE_BACKWARD.get()


def recording() -> bool:
    """Whether a :func:`record_attention` block is active (MAML then loops over tasks: weights
    recorded inside vmap could not leave it)."""
    return _recorder() is not None


def fused_allowed(need_weights: bool) -> bool:
    """The rule for the fused kernel: no weights wanted and no second derivative coming."""
    return not need_weights and not _double_backward() and not recording()


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d_k)) v over the last two dimensions.

    ``q`` is ``[..., L_q, d_k]``, ``k`` is ``[..., L_k, d_k]``, ``v`` is ``[..., L_k, d_v]``.
    ``mask`` broadcasts to ``[..., L_q, L_k]``: boolean (True = may attend) or additive float.
    ``is_causal`` lets query i attend to keys <= i only (top-left aligned, as PyTorch).
    Returns the output and, when ``need_weights``, the attention weights (else ``None``).
    """
    if fused_allowed(need_weights):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )
        return out, None
    d_k = q.shape[-1]
    # d_k is a Python int: math.sqrt gives the exact float scale (no integer-sqrt trap).
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_k)
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask.is_floating_point():
            scores = scores + mask
        else:  # an integer "keep" mask added as a bias would mask nothing (the fused kernel
            # rejects it too)
            raise TypeError(
                f"attention mask has dtype {mask.dtype}; pass a bool mask (True = may attend) "
                "or a float mask added to the scores (-inf = masked), e.g. mask.bool()")
    if mask is not None or (is_causal and q.shape[-2] > k.shape[-2]):
        # a query that may attend to nothing gets zero output (as the fused kernel gives),
        # not the NaN of a softmax over -inf only; no NaN in the gradients either
        empty = torch.isneginf(scores).all(-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.matmul(attn, v), weights


def unhooked(*modules: nn.Module) -> bool:
    """Whether no forward/backward hook (the modules' own or global) would fire: only then may
    a fast path compute the modules' maths without calling them."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks for m in modules)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` without torch.func wrappers: a map recorded inside ``grad``/``vmap`` (MAML's
    inner loop) outlives the transform and must still be a tensor one can save or plot."""
    from torch._C import _functorch

    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (so ANIL can name them).

    ``forward(x)`` is self-attention; ``forward(x, context)`` attends from ``x`` to
    ``context``. Inputs are ``[..., L, d_model]`` (any number of leading batch dimensions).
    ``mask`` (bool, True = may attend; or float, added to the scores) broadcasts against the
    scores ``[..., heads, L_q, L_k]``: a per-sample key-padding mask ``pad [B, L_k]`` is
    ``pad[:, None, None, :]`` (``[B, 1, L_k]`` would line B up with the heads).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model < 1 or n_heads < 1:
            raise ConfigError(f"n_heads={n_heads} with d_model={d_model}; both must be >= 1",
                              key="n_heads", owner="MultiHeadAttention")
        if d_model % n_heads != 0:
            raise ConfigError(f"n_heads={n_heads} does not divide d_model={d_model}; choose "
                              "n_heads that divides d_model", key="n_heads",
                              owner="MultiHeadAttention")
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.n_heads, self.d_head)).transpose(-3, -2)

    def _fused(self, projs: tuple[nn.Linear, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """Projections of the same input as ONE matmul with the weights concatenated (the
        parameters stay ``q_proj``/``k_proj``/``v_proj``; measured 7-9% faster second-order
        MAML on CPU for the d_model=128 Transformer). Projections replaced by other modules or
        carrying hooks run as modules. Returns them split into heads."""
        plain = all(type(p) is nn.Linear for p in projs) and unhooked(*projs)
        if len(projs) == 1 or not plain:  # a wrapped or hooked projection runs as a module
            return [self._heads(p(x)) for p in projs]
        w = torch.cat([p.weight for p in projs])
        b = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
        return [self._heads(t) for t in F.linear(x, w, b).chunk(len(projs), dim=-1)]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend; returns the output, or ``(output, weights [..., heads, L_q, L_k])``."""
        if context is None:
            q, k, v = self._fused((self.q_proj, self.k_proj, self.v_proj), x)
        else:
            (q,) = self._fused((self.q_proj,), x)
            k, v = self._fused((self.k_proj, self.v_proj), context)
        want = need_weights or recording()
        out, weights = scaled_dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=want,
        )
        push_attention(self, weights)
        out = self.out_proj(out.transpose(-3, -2).flatten(-2))
        if need_weights:
            return out, weights
        return out


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, dropout: float = 0.0):
        super().__init__()
        d_ff = d_ff or 4 * d_model
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask=mask, is_causal=is_causal))
        return x + self.drop(self.ff(self.ln2(x)))


class TransformerEncoder(nn.Module):
    """A stack of pre-norm :class:`TransformerBlock` s with a final LayerNorm.

    ``n_loops > 1`` makes it a looped Transformer (Yang et al. 2023): the stack is applied
    ``n_loops`` times with shared weights, its input added again before each repeat.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int | None = None,
        dropout: float = 0.0,
        n_loops: int = 1,
    ):
        super().__init__()
        if int(n_loops) < 1:
            raise ConfigError(f"n_loops={n_loops}; use n_loops >= 1", key="n_loops",
                              owner="TransformerEncoder")
        self.n_loops = int(n_loops)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        e = x
        for i in range(self.n_loops):
            if i:
                x = x + e
            for layer in self.layers:
                x = layer(x, mask=mask, is_causal=is_causal)
        return self.ln_f(x)
