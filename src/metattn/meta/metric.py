"""Metric and attention learners: ProtoNet, Matching Networks and FEAT.

None of them adapts weights per task: each embeds the support and query sets with a shared
encoder and classifies a query by comparing its embedding with the support embeddings.

Encoder. The wrapped ``model`` maps ``[N, ...] -> [N, D]``: its ``features`` method when it
has one (metattn backbones do: that drops the classification ``head``), else the module
itself; outputs with more than one trailing dimension are flattened to ``D``. Like the
reference ProtoNet and FEAT code, a task's support and query sets share one forward pass, so
a BatchNorm that uses batch statistics (Conv4) normalises over both sets of THAT task, as
MAML's per-task passes do; ``adapt`` keeps this by embedding the support set again together
with each query batch. Tasks are batched by flattening (``[T * (S + Q), ...]``, one pass)
when the encoder treats examples independently (LayerNorm, a ViT, BatchNorm on running
statistics), and passed one task at a time when it has a BatchNorm on batch statistics: one
pass over a whole evaluation chunk would make an episode's accuracy depend on the other
episodes of its chunk (measured: 98.36% pooled over chunks of 20 vs 98.22% per episode, same
checkpoint and episodes). On CPU the per-task passes are also faster (smaller activations).

Labels. Support labels may come in any order with any number of shots per class (class
means use a one-hot matrix product); every class ``0..n_way-1`` needs at least one support
example. ``n_way`` is the batch's, or ``max(support_y) + 1`` in ``adapt``.

Logits and losses. ProtoNet and FEAT return logits for cross-entropy; MatchingNet returns the
log of its predicted class distribution (so cross-entropy on it equals the NLL). A custom
``loss_fn(logits [N, n_way], y [N]) -> scalar`` replaces the default; ``evaluate`` then calls
it once per task on the cheap logits only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError
from metattn.meta.base import (
    Learner,
    LossFn,
    accuracy,
    check_batch,
    check_one_task,
    loss_name,
)
from metattn.nn.attention import MultiHeadAttention, push_attention, recording


def class_means(z: torch.Tensor, y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Per-task class means: ``z [T, N, D]``, ``y [T, N]`` -> ``[T, n_way, D]``.

    Raises :class:`TaskError` if a class has no example (its mean would be undefined).
    """
    onehot = F.one_hot(y, n_way).to(z.dtype)  # [T, N, n]
    counts = onehot.sum(1)  # [T, n]
    if bool((counts == 0).any()):
        t, c = (int(i) for i in (counts == 0).nonzero()[0])
        raise TaskError(
            f"task {t} has no support example of class {c} (n_way={n_way}); every class "
            "0..n_way-1 needs at least one support example"
        )
    return onehot.transpose(1, 2) @ z / counts.unsqueeze(-1)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` for ``a [T, N, D]``, ``b [T, M, D]`` -> ``[T, N, M]`` (exact form)."""
    return (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)


def _scalar(value: float, learn: bool, name: str) -> nn.Parameter | torch.Tensor:
    """``value`` (> 0) as a learned parameter or a constant; ``name``: ``Owner.key``."""
    if not value > 0:
        owner, key = name.split(".")
        raise ConfigError(f"{key}={value}; it must be > 0", key=key, owner=owner)
    return nn.Parameter(torch.tensor(float(value))) if learn else torch.tensor(float(value))


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.features(x)`` (or ``model(x)``) flattened to ``[N, D]``."""
    f = getattr(model, "features", None)
    return (f(x) if callable(f) else model(x)).flatten(1)


class _Encoder(nn.Module):
    """:func:`_embed` as a module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _embed(self.model, x)


class MetricLearner(Learner):
    """Shared machinery: the batched encoder pass and the Learner contract.

    Subclasses implement ``logits(zs, sy, zq, n_way) -> [T, Q, n_way]`` on embeddings.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None, test_shift: int = 0):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        if not 0 <= int(test_shift) <= 4:
            raise ConfigError(f"test_shift={test_shift}; use 0 (off) to 4 pixels (each image "
                              "is embedded (2 s + 1)^2 times)", key="test_shift",
                              owner=type(self).__name__)
        self.test_shift = int(test_shift)

    # ------------------------------------------------------------------ pieces
    def encoder(self) -> nn.Module:
        """The embedding (:meth:`encode`, without test-time shifts) as an ordinary module in
        eval mode, to save, ``torch.export`` or export to ONNX."""
        return _Encoder(self.model).eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a flat batch ``[N, ...] -> [N, D]`` (``model.features`` if it exists)."""
        return _embed(self.model, x)

    def encode_views(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`encode`, averaged in eval mode over the ``(2 s + 1)^2`` whole-pixel shifts of
        each image ``[N, C, H, W]`` by ``-s..s`` pixels per axis, ``s = test_shift`` (blank =
        zero border, as :class:`~metattn.data.omniglot.OmniglotTasks` ``shift`` trains with).

        Test-time augmentation: the embedding of a drawing then varies less with where it
        sits in the frame. Only the episode's own images are used (support and query, each
        on its own), so no other test data enters. Training mode embeds once."""
        s = self.test_shift
        if s == 0 or self.training:
            return self.encode(x)
        if x.dim() != 4:
            raise TaskError(f"{type(self).__name__}.test_shift={s} shifts images [N, C, H, W]; "
                            f"got a {x.dim()}-D batch {tuple(x.shape)} (use test_shift=0)")
        H, W = x.shape[-2:]
        pad = F.pad(x, (s, s, s, s))
        total: torch.Tensor | None = None
        for dy in range(-s, s + 1):  # one pass per shift: memory stays that of one view
            for dx in range(-s, s + 1):
                # view[r, c] = x[r - dy, c - dx]: the drawing moved by (dy, dx)
                view = pad[..., s - dy:s - dy + H, s - dx:s - dx + W].contiguous()
                z = self.encode(view)
                # at least float32 (a bf16 embedding under autocast), float64 stays float64
                z = z.to(torch.promote_types(z.dtype, torch.float32))
                total = z if total is None else total + z
        assert total is not None
        return total / (2 * s + 1) ** 2

    def batch_statistics(self) -> bool:
        """Whether the encoder normalises with batch statistics (a BatchNorm in training mode
        or without running statistics), so that tasks must not share a pass."""
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or not m.track_running_stats)
            for m in self.model.modules()
        )

    def embed(self, support_x: torch.Tensor, query_x: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Support ``[T, S, ...]`` and query ``[T, Q, ...]``: each task's support and query
        share one encoder pass; tasks share it too unless :meth:`batch_statistics`."""
        T, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        x = torch.cat([support_x, query_x], 1)
        if T > 1 and self.batch_statistics():
            z = torch.stack([self.encode_views(xt) for xt in x])
        else:
            z = self.encode_views(x.flatten(0, 1)).view(T, S + Q, -1)
        if z.dtype in (torch.float16, torch.bfloat16):
            # under autocast: distances and cosines of bf16 embeddings lose ~3 digits; the
            # metric head is cheap, so it runs in float32
            z = z.float()
        return z[:, :S], z[:, S:]

    def logits(self, zs: torch.Tensor, sy: torch.Tensor, zq: torch.Tensor, n_way: int
               ) -> torch.Tensor:
        raise NotImplementedError

    def default_loss(self) -> LossFn:
        """The loss used when none is given: cross-entropy on the logits."""
        return F.cross_entropy

    @staticmethod
    def _n_way(batch: TaskBatch) -> int:
        return batch.n_way if batch.n_way is not None else int(batch.support_y.max()) + 1

    def _forward(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self._n_way(batch)
        zs, zq = self.embed(batch.support_x, batch.query_x)
        return self.logits(zs, batch.support_y, zq, n), zs, zq

    def _extra_loss(self, batch: TaskBatch, zs: torch.Tensor, zq: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """Named auxiliary training losses (already weighted) added to the meta-loss."""
        return {}

    # ------------------------------------------------------------------ contract
    def meta_loss(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean query loss over all tasks (+ auxiliary losses); ``step`` is unused."""
        batch = check_batch(batch, f"{type(self).__name__}.meta_loss")
        loss_fn = loss_fn or self.loss_fn or self.default_loss()
        logits, zs, zq = self._forward(batch)
        n = logits.shape[-1]
        q_loss = loss_fn(logits.reshape(-1, n), batch.query_y.reshape(-1))
        extra = self._extra_loss(batch, zs, zq)
        loss = q_loss + sum(extra.values()) if extra else q_loss
        metrics = {
            loss_name(loss_fn): q_loss.detach(),
            "accuracy": accuracy(logits.detach(), batch.query_y).mean(),
        }
        for k, v in extra.items():
            metrics[k] = v.detach()
        return loss, metrics

    def evaluate(self, batch: TaskBatch, loss_fn: LossFn | None = None
                 ) -> dict[str, torch.Tensor]:
        """Per-task query loss ``[T]`` (named by its function: ``cross_entropy``, or
        ``loss`` for a ``loss_fn`` of the user's) and ``accuracy`` ``[T]`` (no graph)."""
        batch = check_batch(batch, f"{type(self).__name__}.evaluate")
        loss_fn = loss_fn or self.loss_fn
        with torch.no_grad():
            logits, _, _ = self._forward(batch)
            y = batch.query_y
            if loss_fn is None:
                loss_fn = self.default_loss()
                per = loss_fn(logits.flatten(0, 1), y.flatten(), reduction="none")
                loss = per.view(y.shape[0], -1).mean(1)
            else:
                loss = torch.stack([loss_fn(logits[t], y[t]) for t in range(y.shape[0])])
        return {loss_name(loss_fn): loss, "accuracy": accuracy(logits, y)}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              loss_fn: LossFn | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """One task's classifier: ``query_x [Q, ...] -> logits [Q, n_way]``.

        Nothing is trained; the support set is re-embedded with each query batch (see the
        module docstring), so the result matches ``evaluate`` on a batch of one task.
        """
        check_one_task(support_x, support_y, f"{type(self).__name__}.adapt")
        sx, sy = support_x.detach()[None], support_y.detach()[None]
        n = int(sy.max()) + 1

        def classify(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                zs, zq = self.embed(sx, query_x[None])
                return self.logits(zs, sy, zq, n)[0]

        return classify


# ---------------------------------------------------------------------- ProtoNet
class ProtoNet(MetricLearner):
    """Prototypical Networks (Snell et al. 2017).

    Prototype ``c_k`` = mean support embedding of class k; logits
    ``= -scale * ||f(x) - c_k||^2`` (squared Euclidean, as in the paper; ``scale=1``
    is the paper's model, ``learn_scale`` learns it).

    ``train_loss="nca"`` trains with the neighbourhood component analysis loss instead of
    the episodic one (Laenen & Bertinetto 2021, "On episodes, Prototypical Networks, and
    few-shot learning"): support and query examples of a task are pooled, and every example
    is classified against every other one, ``-log sum_{j != i, y_j = y_i} softmax_j(-scale
    * ||z_i - z_j||^2)``. An episode of N examples then gives N (N - 1) comparisons instead
    of (query count) x (n_way), from the same encoder pass. Evaluation is unchanged
    (prototypes of the support set).
    """

    def __init__(self, model: nn.Module, scale: float = 1.0, learn_scale: bool = False,
                 loss_fn: LossFn | None = None, train_loss: str = "proto", test_shift: int = 0):
        super().__init__(model, loss_fn, test_shift)
        s = _scalar(scale, learn_scale, "ProtoNet.scale")
        if isinstance(s, nn.Parameter):
            self.scale = s
        else:
            self.register_buffer("scale", s)
        if train_loss not in ("proto", "nca"):
            raise ConfigError(
                f"ProtoNet: train_loss={train_loss!r}; choose 'proto' (episodic, the paper) "
                "or 'nca' (all pairs of the episode)"
            )
        if train_loss == "nca" and loss_fn is not None:
            raise ConfigError("ProtoNet: train_loss='nca' has its own loss; drop loss_fn")
        self.train_loss = train_loss

    def logits(self, zs: torch.Tensor, sy: torch.Tensor, zq: torch.Tensor, n_way: int
               ) -> torch.Tensor:
        protos = class_means(zs, sy, n_way)
        return -self.scale * squared_distances(zq, protos)

    def nca_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """NCA loss over ``z [T, N, D]`` with labels ``y [T, N]``; every example needs another
        of its class in the task (a 1-shot episode with queries has them)."""
        n = z.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        scores = (-self.scale * squared_distances(z, z)).masked_fill(eye, float("-inf"))
        same = (y.unsqueeze(-1) == y.unsqueeze(-2)) & ~eye
        if not bool(same.any(-1).all()):
            raise TaskError(
                "ProtoNet(train_loss='nca'): an example has no other example of its class "
                "in its task; use k_shot + k_query >= 2"
            )
        pos = torch.logsumexp(scores.masked_fill(~same, float("-inf")), -1)
        return (torch.logsumexp(scores, -1) - pos).mean()

    def meta_loss(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The episodic loss of :class:`MetricLearner`, or the NCA loss (``train_loss``)."""
        if self.train_loss == "proto":
            return super().meta_loss(batch, loss_fn, step)
        if loss_fn is not None:
            raise ConfigError("ProtoNet(train_loss='nca') trains with its own loss; call "
                              "meta_loss without loss_fn, or use train_loss='proto'")
        zs, zq = self.embed(batch.support_x, batch.query_x)
        loss = self.nca_loss(torch.cat([zs, zq], 1),
                             torch.cat([batch.support_y, batch.query_y], 1))
        with torch.no_grad():
            logits = self.logits(zs, batch.support_y, zq, self._n_way(batch))
            metrics = {
                "cross_entropy": F.cross_entropy(logits.flatten(0, 1),
                                                 batch.query_y.flatten()),
                "accuracy": accuracy(logits, batch.query_y).mean(),
                "nca_loss": loss.detach(),
            }
        return loss, metrics


# ---------------------------------------------------------------------- Matching Networks
class MatchingNet(MetricLearner):
    """Matching Networks (Vinyals et al. 2016): attention over the support set.

    ``a(x, x_i) = softmax_i(temperature * cos(f(x), g(x_i)))`` and
    ``P(y = k | x) = sum_i a(x, x_i) [y_i = k]``; the loss is the NLL of ``log P``, computed
    as ``logsumexp`` over class k's support scores minus ``logsumexp`` over all of them (equal
    to ``log`` of the sum, without the clamp a direct ``log`` needs). The paper uses a plain
    cosine; ``temperature`` (learned by default) sharpens the softmax. Its starting value
    matters on short runs, since Adam moves it by about the learning rate per step: with
    Conv-4 (non-negative features, so cosines in [0, 1]) on Omniglot 20-way 5-shot, 90 s of
    training on one core gave 85.8% from 10, 92.0% from 30, 93.8% from 60 and 93.5% from
    120; the Omniglot configs start at 60.

    ``fce=True``: full-context embeddings of the paper's appendix. ``g`` = the embedding plus
    the forward and backward states of a bidirectional LSTM over the support set (in the
    order given: class-major from metattn samplers). ``f`` = an attention LSTM run for
    ``fce_steps`` steps: ``r = sum_i softmax_i(h^T g(x_i)) g(x_i)``,
    ``h_hat, c = LSTM(f'(x), [h, r], c)``, ``h = h_hat + f'(x)``, starting from ``h = f'(x)``,
    ``c = 0``. Feeding ``[f'(x), r]`` as the LSTM input with hidden state ``h`` gives the same
    gates as the paper's hidden state ``[h, r]``. The LSTMs need the embedding size ``dim``
    (default ``model.feature_dim``).
    """

    def __init__(self, model: nn.Module, fce: bool = False, fce_steps: int = 5,
                 temperature: float = 10.0, learn_temperature: bool = True,
                 dim: int | None = None, loss_fn: LossFn | None = None, test_shift: int = 0):
        super().__init__(model, loss_fn, test_shift)
        t = _scalar(temperature, learn_temperature, "MatchingNet.temperature")
        if isinstance(t, nn.Parameter):
            self.temperature = t
        else:
            self.register_buffer("temperature", t)
        self.fce = bool(fce)
        self.fce_steps = int(fce_steps)
        if self.fce:
            d = dim if dim is not None else getattr(model, "feature_dim", None)
            if d is None:
                raise ConfigError(
                    "MatchingNet(fce=True) needs the embedding size for its LSTMs: pass dim=D "
                    "(the model has no feature_dim attribute)"
                )
            if self.fce_steps < 1:
                raise ConfigError(f"fce_steps={fce_steps}; it must be >= 1", key="fce_steps",
                                  owner="MatchingNet")
            self.dim = int(d)
            self.g_lstm = nn.LSTM(self.dim, self.dim, batch_first=True, bidirectional=True)
            self.f_cell = nn.LSTMCell(2 * self.dim, self.dim)

    def default_loss(self) -> LossFn:
        """NLL of the log class distribution."""
        return F.nll_loss

    def context(self, zs: torch.Tensor, zq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(support) [T, S, D], f(query) [T, Q, D])``; identity unless ``fce``."""
        if not self.fce:
            return zs, zq
        D = zs.shape[-1]
        out, _ = self.g_lstm(zs)
        g = zs + out[..., :D] + out[..., D:]
        T, Q, _ = zq.shape
        f = zq.reshape(T * Q, D)
        h, c = f, torch.zeros_like(f)
        for _ in range(self.fce_steps):
            a = torch.softmax(h.view(T, Q, D) @ g.transpose(1, 2), -1)  # [T, Q, S]
            r = (a @ g).reshape(T * Q, D)
            h_hat, c = self.f_cell(torch.cat([f, r], -1), (h, c))
            h = h_hat + f
        return g, h.view(T, Q, D)

    def scores(self, zs: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """Attention logits ``temperature * cos(f(query), g(support))`` ``[T, Q, S]``."""
        g, f = self.context(zs, zq)
        cos = F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).transpose(1, 2)
        s = self.temperature * cos
        if recording():  # captured as one head over the support set [T, 1, Q, S]
            push_attention(self, torch.softmax(s, -1).unsqueeze(1))
        return s

    def logits(self, zs: torch.Tensor, sy: torch.Tensor, zq: torch.Tensor, n_way: int
               ) -> torch.Tensor:
        member = F.one_hot(sy, n_way).transpose(1, 2).bool()  # [T, n, S]
        if bool((~member.any(-1)).any()):
            class_means(zs, sy, n_way)  # raises the TaskError naming the empty class
        return self.class_log_probs(self.scores(zs, zq), sy, n_way)

    @staticmethod
    def class_log_probs(s: torch.Tensor, sy: torch.Tensor, n_way: int) -> torch.Tensor:
        """``log P(y = k | x)`` ``[T, Q, n]`` from the attention logits ``s [T, Q, S]``; a
        support example whose score is ``-inf`` is left out (a class left with none gets
        ``-inf``)."""
        member = F.one_hot(sy, n_way).transpose(1, 2).bool()  # [T, n, S]
        per_class = s.unsqueeze(2).masked_fill(~member.unsqueeze(1), float("-inf"))
        return per_class.logsumexp(-1) - s.logsumexp(-1, keepdim=True)

    def attention(self, support_x: torch.Tensor, support_y: torch.Tensor,
                  query_x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[Q, S]`` of one task's queries over its support set (rows sum
        to 1). ``support_y`` is unused by the attention itself (kept for a uniform API)."""
        with torch.no_grad():
            zs, zq = self.embed(support_x[None], query_x[None])
            return torch.softmax(self.scores(zs, zq), -1)[0]


# ---------------------------------------------------------------------- FEAT
class SetToSet(nn.Module):
    """FEAT's set-to-set function: one post-norm attention layer with a residual,
    ``LayerNorm(x + Dropout(MultiHeadAttention(x)))`` over the set dimension.

    ``mask [..., L, L]`` (True = may attend) restricts which set members see each other.
    """

    def __init__(self, dim: int, n_heads: int = 1, dropout: float = 0.5,
                 attn_dropout: float = 0.1):
        super().__init__()
        self.attn = MultiHeadAttention(dim, n_heads, dropout=attn_dropout)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = None if mask is None else mask.unsqueeze(-3)  # broadcast over heads
        return self.norm(x + self.drop(self.attn(x, mask=m)))


class FEAT(MetricLearner):
    """FEAT (Ye et al. 2020): Transformer adaptation of the prototypes, then ProtoNet.

    Prototypes ``c`` (class means of the support embeddings) pass through a set-to-set
    attention layer (:class:`SetToSet`, one head and dropout 0.5 as in the official code) to
    give task-adapted ``c'``; logits ``= -||f(x) - c'_k||^2 / temperature``.

    Contrastive regulariser (training only, weight ``balance``): as in the official code
    (Sha-Lab/FEAT, ``model/models/feat.py``), the embeddings of ALL support and query
    instances of class k are transformed together by the same set-to-set function, each class
    on its own (here: one pass with a same-class attention mask); their mean is the adapted
    centre ``c~_k``. Every instance is then classified against the centres,
    ``logits_reg = -||f(x) - c~_k||^2 / temperature2``, and the cross-entropy of these
    logits is added: ``loss = CE(logits, y_q) + balance * CE(logits_reg, y_{s+q})``. The
    instance side ``f(x)`` is the un-adapted embedding, as in that code. ``meta_loss``
    reports the weighted term as ``reg_loss`` and the query cross-entropy alone as ``loss``.

    ``temperature = 1`` gives ProtoNet's scale; the official code uses larger temperatures
    for its wider ImageNet backbones, and the Omniglot configs use 20 (ProtoNet's scale 0.05).
    ``dim`` defaults to ``model.feature_dim``.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, temperature2: float = 1.0,
                 balance: float = 0.1, n_heads: int = 1, dropout: float = 0.5,
                 attn_dropout: float = 0.1, dim: int | None = None,
                 loss_fn: LossFn | None = None, test_shift: int = 0):
        super().__init__(model, loss_fn, test_shift)
        for name, v in (("temperature", temperature), ("temperature2", temperature2)):
            if not v > 0:
                raise ConfigError(f"{name}={v}; it must be > 0", key=name, owner="FEAT")
        if not balance >= 0:
            raise ConfigError(f"balance={balance}; it must be >= 0 (0 = no regulariser)",
                              key="balance", owner="FEAT")
        d = dim if dim is not None else getattr(model, "feature_dim", None)
        if d is None:
            raise ConfigError(
                "FEAT needs the embedding size for its attention layer: pass dim=D (the model "
                "has no feature_dim attribute)"
            )
        self.temperature = float(temperature)
        self.temperature2 = float(temperature2)
        self.balance = float(balance)
        self.set_fn = SetToSet(int(d), n_heads, dropout, attn_dropout)

    def adapted_prototypes(self, zs: torch.Tensor, sy: torch.Tensor, n_way: int
                           ) -> torch.Tensor:
        """Prototypes after the set-to-set function ``[T, n_way, D]``."""
        return self.set_fn(class_means(zs, sy, n_way))

    def logits(self, zs: torch.Tensor, sy: torch.Tensor, zq: torch.Tensor, n_way: int
               ) -> torch.Tensor:
        protos = self.adapted_prototypes(zs, sy, n_way)
        return -squared_distances(zq, protos) / self.temperature

    def regularizer(self, batch: TaskBatch, zs: torch.Tensor, zq: torch.Tensor
                    ) -> torch.Tensor:
        """The contrastive auxiliary loss (unweighted; see the class docstring)."""
        n = self._n_way(batch)
        x = torch.cat([zs, zq], 1)  # [T, S+Q, D]
        y = torch.cat([batch.support_y, batch.query_y], 1)  # [T, S+Q]
        same = y.unsqueeze(-1) == y.unsqueeze(-2)  # [T, L, L]: attend within the class only
        centres = class_means(self.set_fn(x, mask=same), y, n)  # [T, n, D]
        logits = -squared_distances(x, centres) / self.temperature2
        return F.cross_entropy(logits.reshape(-1, n), y.reshape(-1))

    def _extra_loss(self, batch: TaskBatch, zs: torch.Tensor, zq: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        if self.balance == 0:
            return {}
        return {"reg_loss": self.balance * self.regularizer(batch, zs, zq)}
