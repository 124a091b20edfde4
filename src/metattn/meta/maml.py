"""The MAML family as ONE inner loop over parameter dicts.

theta' = theta - alpha * grad_theta L_support(theta)   (repeated ``inner_steps`` times)
meta-loss = mean over tasks of L_query(theta')

The inner loop is a pure function of a parameter dict (``torch.func.functional_call`` +
``torch.func.grad``), so any ``nn.Module`` works unchanged and nothing is monkey-patched.
``torch.func.grad`` keeps the graph of the gradient it returns, so the outer backward goes
THROUGH the update (second order) unless ``first_order`` detaches it.

Options of this one loop give the family:

* MAML: ``first_order=False`` (exact second order).
* first-order MAML: ``first_order=True``.
* ANIL: ``adapt=["head"]`` adapts only the named parameters (names or module prefixes).
* Meta-SGD: ``learn_inner_lr="per_param"`` learns an inner rate per parameter element.
* MAML++: ``learn_inner_lr="per_layer_step"`` (LSLR: a rate per tensor per step),
  ``msl_steps`` (multi-step loss with annealed weights), ``second_order_start`` (first order
  for the first outer steps, then second order).

Tasks are processed either vectorised (``torch.func.vmap`` over the task dimension) or in a
Python loop; both give the same numbers. ``vectorize="auto"`` picks vmap on CUDA, and on CPU
for every model without convolutions (see :meth:`MAML._use_vmap` for the measurements).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, InnerLoopError
from metattn.meta.base import Learner, LossFn, accuracy, default_loss
from metattn.meta.norms import NormRewrite
from metattn.nn.attention import double_backward

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
               nn.LocalResponseNorm)
InnerLR = Literal["scalar", "per_param", "per_layer_step"]
Params = dict[str, torch.Tensor]


def _key(name: str) -> str:
    # ParameterDict keys may not contain "."
    return name.replace(".", "__")


def resolve_names(model: nn.Module, names: Sequence[str] | str | None) -> list[str]:
    """Parameter names selected by exact names or module prefixes (``"head"`` -> ``head.*``)."""
    all_names = [n for n, _ in model.named_parameters()]
    if names is None:
        return all_names
    if isinstance(names, str):
        names = [names]
    chosen: list[str] = []
    for want in names:
        hit = [n for n in all_names if n == want or n.startswith(want + ".")]
        if not hit:
            close = difflib.get_close_matches(want, all_names, n=3)
            prefixes = sorted({n.rsplit(".", 1)[0] for n in all_names if "." in n})
            hint = f"did you mean {close}? " if close else ""
            raise ConfigError(
                f"adapt: the model has no parameter or module named {want!r}; {hint}"
                f"parameters: {all_names[:12]}{' ...' if len(all_names) > 12 else ''}; "
                f"modules: {prefixes[:12]}"
            )
        chosen += [n for n in hit if n not in chosen]
    return chosen


class AdaptedModel:
    """A model with task-specific parameters: call it on query inputs."""

    def __init__(self, model: nn.Module, params: Params, buffers: Params):
        self.model = model
        self.params = params
        self.buffers = buffers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (self.params, self.buffers), (x,))


class MAML(Learner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017) and its family, in one inner loop.

    Args:
        model: any ``nn.Module`` mapping a set of inputs ``[N, ...]`` to outputs ``[N, ...]``.
        inner_lr: initial inner-loop learning rate alpha.
        inner_steps: gradient steps on the support set during meta-training.
        first_order: drop the second-order term (first-order MAML).
        adapt: parameter names or module prefixes to adapt (ANIL: ``["head"]``); None = all.
        learn_inner_lr: None (fixed alpha), ``"scalar"``, ``"per_param"`` (Meta-SGD) or
            ``"per_layer_step"`` (MAML++ LSLR).
        msl_steps: MAML++ multi-step loss: anneal the per-step query-loss weights towards the
            final step over this many outer steps (0 = only the final step's loss).
        second_order_start: MAML++ derivative-order annealing: outer steps before this one are
            first order.
        eval_inner_steps: inner steps used by ``evaluate``/``adapt`` (default ``inner_steps``).
        vectorize: ``True`` (vmap over tasks), ``False`` (loop) or ``"auto"`` (measured choice).
        chunk_size: vmap this many tasks at a time (bounds memory); None = all at once.
        loss_fn: default loss; None = cross-entropy for classification batches, else MSE.
        check_finite: raise :class:`InnerLoopError` when an inner loss is NaN/inf.

    Normalisation layers: inside the inner loop BatchNorm in training mode uses batch statistics
    and does not update its running statistics (see :mod:`metattn.meta.norms`). Models are
    recognised as having norm layers by their ``torch.nn`` norm modules; a module that calls
    ``F.batch_norm``/``F.layer_norm`` directly without one should set ``has_norms=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        first_order: bool = False,
        adapt: Sequence[str] | str | None = None,
        learn_inner_lr: InnerLR | None = None,
        msl_steps: int = 0,
        second_order_start: int = 0,
        eval_inner_steps: int | None = None,
        vectorize: bool | Literal["auto"] = "auto",
        chunk_size: int | None = None,
        loss_fn: LossFn | None = None,
        check_finite: bool = True,
        has_norms: bool | None = None,
    ):
        super().__init__()
        if inner_steps < 0:
            raise ConfigError(f"MAML: inner_steps={inner_steps}; it must be >= 0")
        if learn_inner_lr not in (None, "scalar", "per_param", "per_layer_step"):
            raise ConfigError(
                f"MAML: learn_inner_lr={learn_inner_lr!r}; choose None, 'scalar', "
                "'per_param' (Meta-SGD) or 'per_layer_step' (MAML++)"
            )
        if vectorize not in (True, False, "auto"):
            raise ConfigError(f"MAML: vectorize={vectorize!r}; choose True, False or 'auto'")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.adapt_names = resolve_names(model, adapt)
        self.learn_inner_lr = learn_inner_lr
        self.msl_steps = int(msl_steps)
        self.second_order_start = int(second_order_start)
        self.eval_inner_steps = int(eval_inner_steps if eval_inner_steps is not None
                                    else inner_steps)
        self.vectorize = vectorize
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn
        self.check_finite = check_finite
        params = dict(model.named_parameters())
        # The norm rewrite costs a Python call per op: enter it only for models with norms.
        self._has_norms = has_norms if has_norms is not None else any(
            isinstance(mod, _NORM_TYPES) for mod in model.modules())
        self._has_conv = any(isinstance(mod, nn.modules.conv._ConvNd) for mod in model.modules())
        self.inner_lrs = nn.ParameterDict()
        if learn_inner_lr == "scalar":
            self.inner_lrs["all"] = nn.Parameter(torch.tensor(self.inner_lr))
        elif learn_inner_lr == "per_param":
            for n in self.adapt_names:
                self.inner_lrs[_key(n)] = nn.Parameter(torch.full_like(params[n], self.inner_lr))
        elif learn_inner_lr == "per_layer_step":
            for n in self.adapt_names:
                self.inner_lrs[_key(n)] = nn.Parameter(
                    torch.full((max(self.inner_steps, 1),), self.inner_lr,
                               dtype=params[n].dtype, device=params[n].device)
                )

    # ------------------------------------------------------------------ pieces
    def _lr(self, name: str, step: int) -> torch.Tensor | float:
        mode = self.learn_inner_lr
        if mode is None:
            return self.inner_lr
        if mode == "scalar":
            return self.inner_lrs["all"]
        lr = self.inner_lrs[_key(name)]
        if mode == "per_layer_step":
            return lr[min(step, lr.shape[0] - 1)]
        return lr

    def _split_params(self) -> tuple[Params, Params, Params]:
        adapt = set(self.adapt_names)
        fast, slow = {}, {}
        for n, p in self.model.named_parameters():
            (fast if n in adapt else slow)[n] = p
        buffers = dict(self.model.named_buffers())
        return fast, slow, buffers

    def _use_vmap(self, device: torch.device) -> bool:
        """vmap or loop. ``auto``, by measurement (torch 2.13, meta-batches of the issue's
        workloads): on CUDA vmap wins by 10x+; on 2 CPU cores vmap wins for MLPs (7x, sinusoid)
        and Transformers (1.2x) but the loop wins for conv nets (2.5x, Conv-4), whose batched
        convolutions have no fast CPU path under vmap."""
        if self.vectorize == "auto":
            return device.type == "cuda" or not self._has_conv
        return bool(self.vectorize)

    def msl_weights(self, steps: int, step: int | None) -> list[float]:
        """Per-inner-step weights of the query loss (MAML++ multi-step loss).

        Starts uniform (1/N each) and moves linearly over ``msl_steps`` outer steps to the
        final step, keeping non-final weights at least 0.03/N (Antoniou et al. 2019).
        """
        if self.msl_steps <= 0 or steps <= 1 or step is None:
            return [0.0] * (steps - 1) + [1.0]
        p = min(step / self.msl_steps, 1.0)
        n = steps
        floor = 0.03 / n
        nonfinal = max(1.0 / n - p / n, floor)
        final = min(1.0 / n + p * (n - 1) / n, 1.0 - (n - 1) * floor)
        return [nonfinal] * (n - 1) + [final]

    def _task_fn(
        self,
        fast: Params,
        slow: Params,
        buffers: Params,
        loss_fn: LossFn,
        steps: int,
        first_order: bool,
        record: Sequence[int],
        vectorized: bool,
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The per-task computation: adapt on the support set, measure on the query set.

        Returns ``f(sx, sy, qx, qy) -> (support_losses [steps], query_losses [len(record)],
        query_outputs [len(record), Q, ...])`` where ``record`` lists the inner steps
        (0 = before adaptation) at which the query set is measured. Under vmap the inner
        gradient is ``torch.func.grad`` (which keeps its graph, so the outer backward goes
        through it); in the loop it is ``torch.autograd.grad`` with ``create_graph`` set by
        ``first_order`` (measured ~35% faster on CPU than ``torch.func.grad`` for Conv-4).
        """
        model = self.model

        # Buffers are passed as an argument (not captured): modules may update them in place
        # (BatchNorm's num_batches_tracked), which torch.func allows only for inputs.
        def support_loss(p: Params, bufs: Params, sx: torch.Tensor, sy: torch.Tensor
                         ) -> torch.Tensor:
            return loss_fn(functional_call(model, (p, slow, bufs), (sx,)), sy)

        if vectorized:
            func_grad = grad_and_value(support_loss)

            def grad_fn(p: Params, sx: torch.Tensor, sy: torch.Tensor):
                g, loss = func_grad(p, buffers, sx, sy)
                return ({k: v.detach() for k, v in g.items()} if first_order else g), loss
        else:
            def grad_fn(p: Params, sx: torch.Tensor, sy: torch.Tensor):
                loss = support_loss(p, buffers, sx, sy)
                names = list(p)
                gs = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True,
                                         create_graph=not first_order)
                g = {k: torch.zeros_like(p[k]) if gk is None else gk
                     for k, gk in zip(names, gs, strict=True)}
                return g, loss.detach() if first_order else loss

        def f(sx, sy, qx, qy):
            p = fast
            if not vectorized and not torch.is_grad_enabled():
                # evaluation: adapt detached copies, without an outer graph
                p = {k: v.detach().requires_grad_() for k, v in p.items()}
            s_losses, q_losses, q_outs = [], [], []

            def measure() -> None:
                out = functional_call(model, (p, slow, buffers), (qx,))
                q_outs.append(out)
                q_losses.append(loss_fn(out, qy))

            if 0 in record:
                measure()
            for i in range(steps):
                if vectorized:
                    g, loss = grad_fn(p, sx, sy)
                else:
                    with torch.enable_grad():
                        g, loss = grad_fn(p, sx, sy)
                        p = {k: p[k] - self._lr(k, i) * g[k] for k in p}
                s_losses.append(loss)
                if vectorized:
                    p = {k: p[k] - self._lr(k, i) * g[k] for k in p}
                if i + 1 in record:
                    measure()
            s = torch.stack(s_losses) if s_losses else qx.new_zeros(0)
            return s, torch.stack(q_losses), torch.stack(q_outs)

        return f

    def _run(
        self,
        batch: TaskBatch,
        loss_fn: LossFn,
        steps: int,
        first_order: bool,
        record: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the inner loop on every task; outputs have a leading task dimension."""
        fast, slow, buffers = self._split_params()
        use_vmap = self._use_vmap(batch.support_x.device)
        f = self._task_fn(fast, slow, buffers, loss_fn, steps, first_order, record, use_vmap)
        args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        with ExitStack() as stack:
            # The math attention path is needed for a second derivative, and under vmap
            # (the fused CPU kernels have no batching rule: vmap would loop over them).
            if use_vmap or (not first_order and steps > 0 and torch.is_grad_enabled()):
                stack.enter_context(double_backward())
            if self._has_norms:
                stack.enter_context(NormRewrite(split_affine=use_vmap))
            if use_vmap:
                s, q, o = vmap(f, randomness="different", chunk_size=self.chunk_size)(*args)
            else:
                outs = [f(*(a[t] for a in args)) for t in range(batch.num_tasks)]
                s, q, o = (torch.stack(z) for z in zip(*outs, strict=True))
        if self.check_finite:
            self._check_finite(s, q, record)
        return s, q, o

    def _check_finite(self, s: torch.Tensor, q: torch.Tensor, record: Sequence[int]) -> None:
        for name, losses, labels in (("support", s, None), ("query", q, record)):
            bad = ~torch.isfinite(losses.detach())
            if bool(bad.any()):
                task, idx = (int(i) for i in bad.nonzero()[0])
                step = idx if labels is None else labels[idx]
                raise InnerLoopError(
                    f"MAML inner loop: the {name} loss of task {task} is "
                    f"{float(losses[task, idx].detach())} at inner step {step} (inner_lr={self.inner_lr}, "
                    f"learn_inner_lr={self.learn_inner_lr}); lower inner_lr, check the task "
                    "inputs for NaN/inf, or normalise the targets"
                )

    # ------------------------------------------------------------------ contract
    def meta_loss(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Meta-loss over the batch (differentiable w.r.t. the model and learned rates).

        ``step`` is the outer step, used by the MAML++ schedules (multi-step loss weights and
        the first-to-second-order switch).
        """
        loss_fn = loss_fn or self.loss_fn or default_loss(batch)
        n = self.inner_steps
        first_order = self.first_order or (step is not None and step < self.second_order_start)
        weights = self.msl_weights(n, step)
        record = [i + 1 for i, w in enumerate(weights) if w > 0] if n > 0 else [0]
        w = [weights[r - 1] for r in record] if n > 0 else [1.0]
        s, q, o = self._run(batch, loss_fn, n, first_order, record)
        w_t = torch.tensor(w, dtype=q.dtype, device=q.device)
        loss = (q * w_t).sum(-1).mean()
        metrics = {"loss": q[:, -1].mean().detach()}
        if n > 0:
            metrics["support_loss"] = s[:, 0].mean().detach()
        if batch.n_way is not None:
            metrics["accuracy"] = accuracy(o[:, -1].detach(), batch.query_y).mean()
        return loss, metrics

    def evaluate(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, steps: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-task query metrics after ``steps`` inner steps (default ``eval_inner_steps``).

        Also returns ``loss_per_step`` ``[T, steps + 1]`` (column 0 = before adaptation) and,
        for classification, ``accuracy_per_step``.
        """
        loss_fn = loss_fn or self.loss_fn or default_loss(batch)
        steps = self.eval_inner_steps if steps is None else steps
        with torch.no_grad():
            s, q, o = self._run(batch, loss_fn, steps, True, list(range(steps + 1)))
        out = {"loss": q[:, -1], "loss_per_step": q}
        if batch.n_way is not None:
            acc = accuracy(o, batch.query_y.unsqueeze(1))
            out["accuracy"] = acc[:, -1]
            out["accuracy_per_step"] = acc
        return out

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        loss_fn: LossFn | None = None,
        steps: int | None = None,
    ) -> AdaptedModel:
        """Adapt to one task (no task dimension) and return the adapted model."""
        steps = self.eval_inner_steps if steps is None else steps
        batch = TaskBatch(support_x[None], support_y[None], support_x[None, :1],
                          support_y[None, :1])
        loss_fn = loss_fn or self.loss_fn or default_loss(
            None if support_y.dtype.is_floating_point else 0
        )
        fast, slow, buffers = self._split_params()
        p = {k: v.detach() for k, v in fast.items()}
        model = self.model

        def support_loss(p: Params, bufs: Params) -> torch.Tensor:
            return loss_fn(functional_call(model, (p, slow, bufs), (batch.support_x[0],)),
                           batch.support_y[0])

        with torch.no_grad(), NormRewrite(split_affine=False) if self._has_norms \
                else nullcontext():
            for i in range(steps):
                g, loss = grad_and_value(support_loss)(p, buffers)
                if self.check_finite and not torch.isfinite(loss):
                    raise InnerLoopError(
                        f"MAML.adapt: the support loss is {float(loss)} at inner step {i}; "
                        "lower inner_lr or check the support set for NaN/inf"
                    )
                p = {k: p[k] - self._lr(k, i) * g[k] for k in p}
        slow_d = {k: v.detach() for k, v in slow.items()}
        return AdaptedModel(model, {**slow_d, **p}, buffers)


class FOMAML(MAML):
    """First-order MAML: the meta-gradient ignores the second-order term."""

    def __init__(self, model: nn.Module, **kwargs):
        kwargs.setdefault("first_order", True)
        super().__init__(model, **kwargs)


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al. 2020): adapt only the head in the inner loop."""

    def __init__(self, model: nn.Module, head: Sequence[str] | str = "head", **kwargs):
        super().__init__(model, adapt=head, **kwargs)


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): a learned inner learning rate per parameter element."""

    def __init__(self, model: nn.Module, **kwargs):
        kwargs.setdefault("learn_inner_lr", "per_param")
        super().__init__(model, **kwargs)


class MAMLpp(MAML):
    """MAML++ (Antoniou et al. 2019): per-layer per-step rates, multi-step loss, DA."""

    def __init__(self, model: nn.Module, **kwargs):
        kwargs.setdefault("learn_inner_lr", "per_layer_step")
        kwargs.setdefault("msl_steps", 1000)
        kwargs.setdefault("second_order_start", 1000)
        super().__init__(model, **kwargs)
