"""The in-context regressor of Garg et al. (2022): a GPT-2-like causal Transformer over
interleaved (x, y) tokens. The learner that trains and evaluates it is
:class:`metattn.meta.incontext.InContextLearner`."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metattn.errors import ConfigError, TaskError
from metattn.nn.attention import TransformerEncoder


class ICLTransformer(nn.Module):
    """GPT-2-like in-context regressor over interleaved (x, y) tokens (Garg et al. 2022).

    Args:
        d_x: input dimension d (1 for sinusoids).
        d_y: output dimension (1 in the paper).
        d_model, n_layers, n_heads, d_ff, dropout: the Transformer (Garg et al.'s standard
            model is 256 x 12 layers x 8 heads).
        max_points: longest prompt in (x, y) pairs; there are ``2 * max_points`` positions.
        token_layout: ``"shared"`` (Garg et al.: tokens are ``max(d_x, d_y)`` wide and y sits
            in the first coordinate, where x_1 sits in x tokens, so only the positional
            embedding tells them apart) or ``"disjoint"`` (tokens are ``d_x + d_y`` wide, x in
            the first d_x coordinates and y in the last d_y: the read-in keeps values and
            inputs in separate directions, which trains faster on small budgets) or
            ``"paired"`` (as disjoint, but the y token carries its x too, ``[x_i, y_i]``: one
            attention step can then weigh y_i by how x_i relates to the query, where the
            other layouts first spend a layer moving x_i next to y_i).
        n_loops: apply the layers ``n_loops`` times with shared weights, the prompt's
            embedding added back before each repeat (a looped Transformer; see
            :class:`TransformerEncoder`).
    """

    def __init__(
        self,
        d_x: int,
        d_y: int = 1,
        d_model: int = 256,
        n_layers: int = 12,
        n_heads: int = 8,
        max_points: int = 101,
        d_ff: int | None = None,
        dropout: float = 0.0,
        token_layout: Literal["shared", "disjoint", "paired"] = "shared",
        n_loops: int = 1,
    ):
        super().__init__()
        if token_layout not in ("shared", "disjoint", "paired"):
            raise ConfigError(f"token_layout={token_layout!r}; choose 'shared', 'disjoint' or "
                              "'paired'", key="token_layout", owner="ICLTransformer")
        self.d_x, self.d_y = int(d_x), int(d_y)
        self.token_layout = token_layout
        disjoint = token_layout in ("disjoint", "paired")
        self.d_token = self.d_x + self.d_y if disjoint else max(self.d_x, self.d_y)
        # (left, right) zero padding of x and of y values into a token
        self._x_pad = (0, self.d_token - self.d_x)
        self._y_pad = (self.d_x, 0) if disjoint else (0, self.d_token - self.d_y)
        self.max_points = int(max_points)
        self.read_in = nn.Linear(self.d_token, d_model)
        self.pos = nn.Parameter(torch.randn(2 * self.max_points, d_model) * 0.02)
        self.encoder = TransformerEncoder(d_model, n_heads, n_layers, d_ff, dropout, n_loops)
        self.head = nn.Linear(d_model, self.d_y)

    def _pad_x(self, t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, self._x_pad)

    def _pad_y(self, t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, self._y_pad)

    def tokens(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """``[B, n, d_x]``, ``[B, n, d_y]`` -> interleaved ``[B, 2n, d_token]``: x_1, y_1, ..."""
        y_tok = torch.cat([xs, ys], -1) if self.token_layout == "paired" else self._pad_y(ys)
        return torch.stack([self._pad_x(xs), y_tok], dim=2).flatten(1, 2)

    def _check_len(self, n_points: int) -> None:
        if n_points > self.max_points:
            raise TaskError(
                f"ICLTransformer: a prompt of {n_points} points exceeds max_points="
                f"{self.max_points}; build the model with max_points >= {n_points} or use "
                "fewer support points"
            )

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Causal predictions ``[B, n, d_y]``: entry i predicts y_i from the pairs before it."""
        n = xs.shape[1]
        self._check_len(n)
        h = self.read_in(self.tokens(xs, ys)) + self.pos[: 2 * n]
        h = self.encoder(h, is_causal=True)
        return self.head(h[:, 0::2])

    def query_mask(self, k: int, q: int, device: torch.device | None = None) -> torch.Tensor:
        """Boolean ``[2k + q, 2k + q]`` mask (True = may attend): causal over the 2k support
        tokens, then each of the q query tokens sees the support tokens and itself."""
        L = 2 * k + q
        m = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        m[2 * k :, 2 * k :] = torch.eye(q, dtype=torch.bool, device=device)
        return m

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Predict every query ``[B, Q, d_x]`` from the support context alone -> ``[B, Q, d_y]``.

        Queries share one pass but not information: query j attends to the 2k support tokens
        and itself, at position 2k (that of x_{k+1}), exactly as in a prompt of its own.
        """
        k, q = support_x.shape[1], query_x.shape[1]
        self._check_len(k + 1)
        ctx = self.tokens(support_x, support_y)
        seq = torch.cat([ctx, self._pad_x(query_x)], dim=1)
        pos = torch.cat([self.pos[: 2 * k], self.pos[2 * k].expand(q, -1)], dim=0)
        h = self.read_in(seq) + pos
        h = self.encoder(h, mask=self.query_mask(k, q, seq.device))
        return self.head(h[:, 2 * k :])
