"""A memo of a frozen prefix's outputs, sentence by sentence.

When the lower layers of an encoder are frozen, their output for a sentence never changes:
a run that adapts the top layer computes it once per distinct sentence and looks it up after
(docs/performance.md measures what it saves). The memo is keyed by the sentence's token ids
and holds each sentence's ``[length, dim]`` output (padding is not stored: padded positions
come back as zeros, which attention masks out). It lives in process memory only (never in a
checkpoint) and is shared, not copied, by model replicas (task threads); two threads that
miss the same sentence both compute it, which is harmless. Encoders whose frozen prefixes are
equal (same model, same depth, same weights) share one memo through :func:`shared`, so a
benchmark that trains several learners over one encoder computes each sentence once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._C import _functorch

from metattn.errors import ConfigError

_SHARED: dict[tuple, PrefixCache] = {}


def shared(key: tuple) -> PrefixCache:
    """The process's memo for the prefix identified by ``key`` (model, depth, weights)."""
    return _SHARED.setdefault(key, PrefixCache())


class PrefixCache:
    """``lookup(ids, keep, prefix)``: ``prefix(ids, keep)`` for a batch of sentences, each row
    computed once (under ``no_grad``: the prefix is frozen) and remembered."""

    def __init__(self) -> None:
        self.rows: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __deepcopy__(self, memo: dict) -> PrefixCache:
        return self  # replicas share one memo (see the module docstring)

    def clear(self) -> None:
        """Forget every sentence (e.g. after the frozen layers' weights were loaded anew)."""
        self.rows.clear()

    def lookup(self, ids: torch.Tensor, keep: torch.Tensor,
               prefix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Outputs ``[B, L, D]`` of ``prefix`` for token ids ``ids [B, L]`` (``keep``: the
        non-padding positions, padding on the right)."""
        if _functorch.is_batchedtensor(ids) or _functorch.is_functorch_wrapped_tensor(ids):
            raise ConfigError("the frozen-layer cache cannot run inside torch.func.vmap; set "
                              "the learner's vectorize: false or the model's cache: false",
                              key="cache")
        lengths = keep.sum(1).tolist()
        host = ids.cpu().numpy()
        keys = [host[i, :n].tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            sel = torch.as_tensor(missing, device=ids.device)
            width = max(lengths[i] for i in missing)
            with torch.no_grad():
                out = prefix(ids[sel, :width], keep[sel, :width])
            for j, i in enumerate(missing):
                self.rows[keys[i]] = out[j, : lengths[i]].clone()
        first = self.rows[keys[0]]
        h = first.new_zeros(ids.shape[0], ids.shape[1], first.shape[-1])
        for i, k in enumerate(keys):
            h[i, : lengths[i]] = self.rows[k]
        return h
