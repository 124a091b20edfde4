"""A Transformer encoder-decoder built from metattn's attention, with greedy and beam decoding.

The encoder is :class:`~metattn.nn.attention.TransformerEncoder` (self-attention over the
source, padded keys masked); each decoder block is causal self-attention, cross-attention to
the encoder's output, and a feed-forward layer, all pre-norm. Every attention is a
:class:`~metattn.nn.attention.MultiHeadAttention`, so MAML can differentiate the whole model
twice (the math path runs under ``double_backward``; the fused kernel everywhere else), and
``mt.record_attention()`` reads the cross-attention maps (modules named ``decoder.<i>.cross``).

Input rows are packed ``[source ids (max_src, PAD-padded) | BOS, target ids ...]``, so a
batch of tasks is a plain ``[T, N, L]`` integer tensor (``metattn.data.seq2seq.pack``):
``forward(x)`` is teacher forcing and returns logits ``[..., max_tgt, vocab]``.
"""

from __future__ import annotations

import torch
from torch import nn

from metattn.errors import ConfigError
from metattn.nn.attention import MultiHeadAttention, TransformerEncoder


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to ``memory``, FF."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.cross = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ln3 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
                ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), is_causal=True))
        x = x + self.drop(self.cross(self.ln2(x), memory, mask=memory_mask))
        return x + self.drop(self.ff(self.ln3(x)))


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder over one shared vocabulary (characters or subwords).

    ``max_src`` and ``max_tgt`` are the packed row's source and target widths (the target's
    BOS/EOS included); ``out`` is the output projection (ANIL's head). ``pad_id``, ``bos_id``,
    ``eos_id`` are the vocabulary's specials (``metattn.data.seq2seq``: 0, 1, 2).
    """

    def __init__(self, vocab_size: int, max_src: int, max_tgt: int, d_model: int = 128,
                 n_heads: int = 4, enc_layers: int = 2, dec_layers: int = 2, d_ff: int = 256,
                 dropout: float = 0.0, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        for key, v in (("vocab_size", vocab_size), ("max_src", max_src), ("max_tgt", max_tgt)):
            if int(v) < 2:
                raise ConfigError(f"{key}={v}; it must be >= 2 (take it from the task's "
                                  "vocabulary and packing)", key=key, owner="seq2seq")
        self.max_src, self.max_tgt = int(max_src), int(max_tgt)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.embed = nn.Embedding(vocab_size, d_model)
        self.src_pos = nn.Parameter(torch.randn(self.max_src, d_model) * 0.02)
        self.tgt_pos = nn.Parameter(torch.randn(self.max_tgt, d_model) * 0.02)
        self.encoder = TransformerEncoder(d_model, n_heads, enc_layers, d_ff, dropout)
        self.decoder = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(dec_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ids ``[..., L_s]`` -> (memory ``[..., L_s, d]``, key mask ``[..., 1, 1,
        L_s]``: True where a real token may be attended)."""
        mask = (src != self.pad_id)[..., None, None, :]
        h = self.embed(src) + self.src_pos[: src.shape[-1]]
        return self.encoder(h, mask=mask), mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
        """Decoder inputs ``[..., L_t]`` (BOS first) -> next-token logits ``[..., L_t, V]``."""
        h = self.embed(tgt_in) + self.tgt_pos[: tgt_in.shape[-1]]
        for block in self.decoder:
            h = block(h, memory, mask)
        return self.out(self.ln_f(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher forcing over packed rows ``[..., max_src + max_tgt]``."""
        if x.shape[-1] != self.max_src + self.max_tgt:
            raise ValueError(f"packed rows have width {x.shape[-1]}, but this model takes "
                             f"max_src + max_tgt = {self.max_src + self.max_tgt}; build the "
                             "model with the task's max_src and max_tgt")
        memory, mask = self.encode(x[..., : self.max_src])
        return self.decode(x[..., self.max_src:], memory, mask)


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor, max_len: int | None = None
                  ) -> torch.Tensor:
    """The most likely next token, one at a time: ``src [B, L_s]`` -> ids ``[B, <= max_len]``
    (no BOS; EOS where a row stopped, PAD after it)."""
    return beam_search(model, src, beam=1, max_len=max_len)


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: torch.Tensor, beam: int = 4,
                max_len: int | None = None, length_penalty: float = 1.0) -> torch.Tensor:
    """Beam search: ``src [B, L_s]`` -> the best hypothesis per row, ``[B, <= max_len]``
    (EOS where a row stopped, PAD after it). Finished hypotheses are ranked by total
    log-probability over ``length ** length_penalty`` (0: no normalisation); ``beam=1`` is
    greedy decoding."""
    max_len = min(max_len or model.max_tgt, model.max_tgt)
    B, k = src.shape[0], int(beam)
    memory, mask = model.encode(src)
    memory = memory.repeat_interleave(k, 0)
    mask = mask.repeat_interleave(k, 0)
    seqs = torch.full((B * k, 1), model.bos_id, dtype=torch.long, device=src.device)
    # one live hypothesis per row at the start (the other k - 1 copies are -inf)
    scores = torch.full((B, k), float("-inf"), device=src.device)
    scores[:, 0] = 0.0
    done = torch.zeros(B * k, dtype=torch.bool, device=src.device)
    lengths = torch.zeros(B * k, device=src.device)
    for _ in range(max_len):
        logp = model.decode(seqs, memory, mask)[:, -1].float().log_softmax(-1)
        V = logp.shape[-1]
        # a finished hypothesis only extends with PAD at no cost
        logp = torch.where(done[:, None], torch.full_like(logp, float("-inf")), logp)
        logp[done, model.pad_id] = 0.0
        cand = (scores.view(-1, 1) + logp).view(B, k * V)
        scores, idx = cand.topk(k, dim=-1)
        origin = (idx // V) + torch.arange(B, device=src.device)[:, None] * k
        token = (idx % V).view(-1, 1)
        origin = origin.view(-1)
        seqs = torch.cat([seqs[origin], token], 1)
        lengths = lengths[origin] + (~done[origin]).float()  # EOS counts as a token
        done = done[origin] | (token.view(-1) == model.eos_id)
        if bool(done.all()):
            break
    norm = scores / lengths.view(B, k).clamp_min(1).pow(length_penalty)
    best = norm.argmax(-1) + torch.arange(B, device=src.device) * k
    return seqs[best, 1:]
