"""What every learner shares: the contract and small helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from metattn.data.tasks import TaskBatch
from metattn.errors import TaskError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error that refuses to broadcast: a model with 3 outputs against 1-wide
    targets would otherwise train on a silently broadcast loss."""
    if pred.shape != target.shape:
        raise TaskError(
            f"the model's predictions have shape {tuple(pred.shape)} but the targets "
            f"{tuple(target.shape)}; make the model's output size (e.g. model.out_features) "
            "match the targets' width")
    return F.mse_loss(pred, target)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) inside the block, back in its own mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def default_loss(batch_or_n_way: TaskBatch | int | None) -> LossFn:
    """Cross-entropy for classification episodes (``n_way`` set), mean squared error otherwise.
    Integer labels without ``n_way`` are refused: neither loss would be meant."""
    if isinstance(batch_or_n_way, TaskBatch):
        batch = batch_or_n_way
        y = batch.support_y
        if batch.n_way is None and not (y.dtype.is_floating_point or y.dtype.is_complex):
            raise TaskError(
                f"TaskBatch.support_y holds integer labels ({y.dtype}) but n_way is not set; "
                "for classification pass n_way (TaskBatch(..., n_way=5)), for regression "
                "float targets ([T, N, outputs])")
        return F.cross_entropy if batch.n_way is not None else mse_loss
    return F.cross_entropy if batch_or_n_way is not None else mse_loss


# the names a loss goes by in metrics, summary.json and plots
LOSS_KEYS = ("mse", "cross_entropy", "loss")


def loss_name(loss_fn: LossFn) -> str:
    """What a loss is called in metrics: ``mse``, ``cross_entropy``, or ``loss`` for another
    (a user's own)."""
    if loss_fn in (mse_loss, F.mse_loss):
        return "mse"
    # (the negative log-likelihood of log-probabilities is their cross-entropy)
    return "cross_entropy" if loss_fn in (F.cross_entropy, F.nll_loss) else "loss"


def check_batch(batch: object, who: str) -> TaskBatch:
    """``batch`` if it is a :class:`TaskBatch`, else a TaskError saying how to make one."""
    if not isinstance(batch, TaskBatch):
        raise TaskError(
            f"{who} takes a TaskBatch, got {type(batch).__name__}; build one with "
            "mt.TaskBatch(support_x, support_y, query_x, query_y, n_way=...) (a leading task "
            "dimension T on each), or sample one from a task sampler")
    return batch


def check_one_task(support_x: torch.Tensor, support_y: torch.Tensor, who: str,
                   label_dims: int = 1) -> None:
    """Refuse a support set with a task dimension where ONE task is expected: integer labels
    are ``[N]`` (``label_dims=2``: ``[N, L]``, a sequence per example) and regression targets
    ``[N, outputs]``."""
    if not isinstance(support_x, torch.Tensor) or not isinstance(support_y, torch.Tensor):
        raise TaskError(f"{who}: support_x and support_y must be tensors, got "
                        f"{type(support_x).__name__} and {type(support_y).__name__}")
    labels = not support_y.dtype.is_floating_point
    if (support_y.dim() > (label_dims if labels else 2)
            or support_x.shape[:1] != support_y.shape[:1]):
        raise TaskError(
            f"{who} adapts to ONE task: support_x {tuple(support_x.shape)} and support_y "
            f"{tuple(support_y.shape)} look like a batch of tasks (labels are [N], targets "
            "[N, outputs]); pass batch.support_x[t], batch.support_y[t], or for many tasks "
            "at once use evaluate(batch) (or MAML.predict)")


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct argmax predictions over the last-but-one dimension (per task), in
    at least float32 (a bf16 mean under autocast would round 299/300 to 0.9961)."""
    return (logits.argmax(-1) == y).to(torch.promote_types(logits.dtype, torch.float32)).mean(-1)


def on_learner(learner: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Regression prompts moved to ``learner``'s device and cast to its floating dtype
    (prompts are drawn on the CPU while a trained learner may sit on a GPU). A learner
    without floating parameters or buffers leaves them where they are."""
    ref = next((t for t in (*learner.parameters(), *learner.buffers())
                if t.is_floating_point()), None)
    if ref is None:
        return tensors
    return tuple(t.to(ref.device, ref.dtype) for t in tensors)


def back_home(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A prediction moved back to ``like``'s device, in ``like``'s dtype when that is floating
    (integer inputs keep the prediction's floating dtype instead of truncating it)."""
    return out.to(like.device, like.dtype if like.is_floating_point() else out.dtype)


class Learner(nn.Module):
    """The contract every learner follows.

    * ``meta_loss(batch, loss_fn=None, step=None) -> (loss, metrics)``: a differentiable
      scalar to minimise over a meta-batch, and detached 0-dim tensors to log.
    * ``evaluate(batch, loss_fn=None) -> dict[str, Tensor]``: per-task query metrics
      (``loss`` and, for classification, ``accuracy``), no outer graph.
    * ``adapt(support_x, support_y, loss_fn=None) -> callable``: adapt to ONE task and return
      something that maps query inputs to predictions.
    * ``capture_blockers()``: what keeps its meta-step out of a CUDA graph (none: it can be
      captured, inside ``capturing()``, which turns host-side checks off).
    """

    def meta_loss(self, batch: TaskBatch, loss_fn: LossFn | None = None,
                  step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, batch: TaskBatch, loss_fn: LossFn | None = None,
                step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`meta_loss`; lets ``DistributedDataParallel(learner)`` all-reduce
        meta-gradients with its usual hooks."""
        return self.meta_loss(batch, loss_fn, step)

    def evaluate(self, batch: TaskBatch, loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              loss_fn: LossFn | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def capture_blockers(self) -> list[tuple[str | None, str]]:
        """Why a whole meta-step of this learner cannot be captured in a CUDA graph, as
        (option, reason) pairs; empty when it can."""
        return [(None, f"{type(self).__name__}.meta_loss checks its episodes on the host "
                       "inside the step (which a CUDA graph cannot capture)")]

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Inside, the meta-step reads no GPU value on the host (a CUDA graph is capturing
        it); learners with host-side checks turn them off here."""
        yield
