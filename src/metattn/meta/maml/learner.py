"""The MAML learner: the algorithm (:mod:`.algorithm`) behind the :class:`Learner` contract,
run by the strategy its :mod:`.plan` picks (:mod:`.execution`)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, InnerLoopError, TaskError
from metattn.meta.base import (
    Learner,
    LossFn,
    accuracy,
    check_batch,
    check_one_task,
    default_loss,
    loss_name,
    mse_loss,
)
from metattn.meta.maml.algorithm import (
    Params,
    Rates,
    functional,
    inner_loop,
    msl_weights,
    weighted,
)
from metattn.meta.maml.execution import InnerJob, checkpointed, compiled, loop, taskwise, threads
from metattn.meta.maml.execution import vmap as batched
from metattn.meta.maml.options import (
    ANILOptions,
    FOMAMLOptions,
    MAMLOptions,
    MAMLppOptions,
    MetaSGDOptions,
    resolve_names,
)
from metattn.meta.maml.plan import Call, ModelFacts, Plan, make_plan
from metattn.meta.norms import NormRewrite
from metattn.nn.attention import MultiHeadAttention, double_backward, recording, unhooked

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
               nn.LocalResponseNorm)
_OPTIONS = frozenset(f.name for f in dataclasses.fields(MAMLOptions))


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain "."


class AdaptedModel:
    """A model with task-specific parameters: call it on query inputs.

    ``norm_rewrite``: run under :class:`NormRewrite` (batch statistics, running statistics
    untouched), as the inner loop that produced the parameters did."""

    def __init__(self, model: nn.Module, params: Params, buffers: Params,
                 norm_rewrite: bool = False):
        self.model = model
        self.params = params
        self.buffers = buffers
        self.norm_rewrite = norm_rewrite

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with NormRewrite(split_affine=False) if self.norm_rewrite else nullcontext():
            return functional_call(self.model, (self.params, self.buffers), (x,))

    def to_module(self) -> nn.Module:
        """The adapted model as an ordinary ``nn.Module`` in eval mode: a copy of the model
        holding the task's parameters, to save, ``torch.export`` or export to ONNX. It
        computes what this object does: BatchNorm layers normalise with batch statistics
        (their running statistics dropped), as in the inner loop."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.params[name])
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and self.norm_rewrite:
                mod.track_running_stats = False
                mod.running_mean = mod.running_var = mod.num_batches_tracked = None
            elif self.norm_rewrite and isinstance(mod, nn.modules.instancenorm._InstanceNorm):
                mod.track_running_stats = False
                mod.running_mean = mod.running_var = None
        if self.norm_rewrite and not any(isinstance(m, nn.modules.batchnorm._NormBase)
                                         for m in model.modules()):
            raise ConfigError("to_module: the model normalises with F.batch_norm itself "
                              "(has_norms=True), which a plain module cannot follow; call "
                              "the adapted model instead")
        return model.eval().requires_grad_(False)


class MAML(Learner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017) and its family, in one inner loop.

    ``MAML(model, **options)``; the options (:class:`MAMLOptions`) read as attributes too
    (``learner.inner_steps``). ``learner.plan(batch)`` says how a call runs.

    Args:
        model: any ``nn.Module`` mapping a set of inputs ``[N, ...]`` to outputs ``[N, ...]``.
        inner_lr: initial inner-loop learning rate alpha.
        inner_steps: gradient steps on the support set during meta-training.
        first_order: drop the second-order term (first-order MAML).
        inner_params: parameter names or module prefixes adapted in the inner loop (ANIL:
            ``["head"]``); None = all.
        learn_inner_lr: None (fixed alpha), ``"scalar"``, ``"per_param"`` (Meta-SGD) or
            ``"per_layer_step"`` (MAML++ LSLR).
        msl_steps: MAML++ multi-step loss: anneal the per-step query-loss weights towards the
            final step over this many outer steps (0 = only the final step's loss).
        second_order_start: MAML++ derivative-order annealing: outer steps before this one are
            first order.
        eval_inner_steps: inner steps used by ``evaluate``/``adapt`` (default ``inner_steps``).
        vectorize: ``True`` (vmap over tasks), ``False`` (loop) or ``"auto"`` (measured
            choice, see :mod:`metattn.meta.maml.plan`).
        chunk_size: vmap this many tasks at a time; None = all at once. In training (with
            ``per_task_backward``) each chunk's meta-gradient is taken right after its inner
            loops and its graph freed before the next chunk, so the peak memory is one
            chunk's; in evaluation it bounds vmap's temporaries.
        checkpoint: recompute each inner step's graph during the outer backward instead of
            storing it (second order): memory flat in ``inner_steps``, for about one more
            support forward and backward per step. Same meta-gradient.
        per_task_backward: back-propagate each task's query loss (each chunk's, under vmap
            with ``chunk_size``) as soon as its inner loop is done, inside ``meta_loss``, so
            one task's graph is alive at a time. The returned meta-loss carries the summed
            meta-gradient: ``backward`` works as usual (scaling, other losses, DDP), but it
            cannot be differentiated again; set False for that.
        task_threads: on the CPU, run the per-task loop on this many threads, one intra-op
            thread and one structural copy of the model (``copy.deepcopy`` of the modules,
            sharing the parameters) each; meta-gradients are summed in task order, so a run
            gives the loop's numbers. ``"auto"`` (default): ``torch.get_num_threads()``, or 1
            for models with active dropout (random draws would depend on thread timing) or
            module hooks (they would fire on the copies); 1 = off. Other random ops in a
            model's forward draw in a thread-dependent order: set 1 for bitwise-repeatable
            runs of such models.
        compile_inner: ``torch.compile`` each inner step of the per-task loop (``True``, or a
            dict of ``torch.compile`` options); training only, not with ``checkpoint`` or
            BatchNorm running statistics. See :mod:`metattn.meta.maml.execution.compiled`.
        loss_fn: default loss; None = cross-entropy for classification batches, else MSE.
        check_finite: raise :class:`InnerLoopError` when an inner loss is NaN/inf.
        has_norms: the model normalises with ``F.batch_norm``/``F.layer_norm`` itself
            (without ``torch.nn`` norm modules, by which norms are otherwise recognised).

    Normalisation layers: inside the inner loop BatchNorm uses batch statistics and does not
    update its running statistics (see :mod:`metattn.meta.norms`).
    """

    Options = MAMLOptions  # a preset (FOMAML, ANIL, ...) is MAML with other defaults
    label_dims = 1  # an integer label per example (a sequence learner: 2)

    def __init__(self, model: nn.Module, inner_lr: float | None = None, **options: Any):
        super().__init__()
        if inner_lr is not None:
            options["inner_lr"] = inner_lr
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(_OPTIONS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"MAML: unknown option {unknown[0]!r}; {hint}options: "
                              f"{sorted(_OPTIONS)}")
        opts = self.Options(**options)
        self.options = opts
        self.model = model
        self.adapt_names = resolve_names(model, opts.inner_params)
        mods = list(model.modules())
        self._declared_norms = bool(opts.has_norms)
        self._has_norms = opts.has_norms if opts.has_norms is not None else any(
            isinstance(m, _NORM_TYPES) for m in mods)
        self._has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in mods)
        self._has_attention = any(isinstance(m, (MultiHeadAttention, nn.MultiheadAttention))
                                  for m in mods)
        if opts.compile_inner is not False and self._facts().loop_rewrite:
            raise ConfigError(
                "compile_inner cannot trace the inner loop's norm rewrite, which this model "
                "needs (BatchNorm with running statistics, or has_norms=True); build the norms "
                "with track_running_stats=False or set compile_inner=False",
                key="compile_inner", owner="MAML")
        params = dict(model.named_parameters())
        self.inner_lrs = nn.ParameterDict()
        mode, lr = opts.learn_inner_lr, opts.inner_lr
        if mode == "scalar":
            self.inner_lrs["all"] = nn.Parameter(torch.tensor(lr))
        for n in self.adapt_names if mode in ("per_param", "per_layer_step") else ():
            p = params[n]
            self.inner_lrs[_key(n)] = nn.Parameter(
                torch.full_like(p, lr) if mode == "per_param" else
                torch.full((max(opts.inner_steps, 1),), lr, dtype=p.dtype, device=p.device))

    # the options read (and written) as attributes: learner.inner_steps, learner.check_finite
    def __getattr__(self, name: str) -> Any:
        if name in _OPTIONS and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OPTIONS and "options" in self.__dict__:
            setattr(self.options, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ planning
    def _facts(self) -> ModelFacts:
        mods = list(self.model.modules())
        return ModelFacts(
            has_conv=self._has_conv, has_attention=self._has_attention,
            has_norms=self._has_norms, norms_declared=self._declared_norms,
            running_stats=any(isinstance(m, nn.modules.batchnorm._NormBase)
                              and getattr(m, "running_mean", None) is not None for m in mods),
            draws_random=_draws_random_numbers(mods), hooked=not unhooked(*mods),
            vmappable=all(getattr(m, "vmappable", True) for m in mods))

    def _call(self, batch: TaskBatch, steps: int, first_order: bool, per_task_loss: bool
              ) -> Call:
        return Call(device=batch.support_x.device.type, num_tasks=batch.num_tasks,
                    grad=torch.is_grad_enabled(), first_order=first_order, steps=steps,
                    per_task_loss=per_task_loss,
                    inputs_have_graph=any(t.requires_grad for t in (
                        batch.support_x, batch.support_y, batch.query_x, batch.query_y)),
                    recording=recording(), cpu_threads=torch.get_num_threads())

    def plan(self, batch: TaskBatch, train: bool = True, step: int | None = None) -> Plan:
        """How ``meta_loss(batch, step=step)`` (``train``) or ``evaluate(batch)`` would run
        here and now (device, threads, grad mode as in a training step or evaluation)."""
        o = self.options
        with torch.set_grad_enabled(train):
            if train:
                call = self._call(batch, o.inner_steps, self._first_order(step), True)
            else:
                call = self._call(batch, o.eval_inner_steps, True, False)
        return make_plan(o, self._facts(), call)

    def _first_order(self, step: int | None) -> bool:
        o = self.options
        return o.first_order or (step is not None and step < o.second_order_start)

    # ------------------------------------------------------------------ running
    def _split_params(self) -> tuple[Params, Params, Params]:
        adapt = set(self.adapt_names)
        fast, slow = {}, {}
        for n, p in self.model.named_parameters():
            # a frozen parameter (requires_grad=False) is neither meta-trained nor adapted
            (fast if n in adapt and p.requires_grad else slow)[n] = p
        # BatchNorm's forward counts batches in place before any norm function runs; a copy
        # keeps the module's counter out of MAML's inner loops (whose passes it never saw)
        buffers = {n: b.clone() if n.endswith("num_batches_tracked") else b
                   for n, b in self.model.named_buffers()}
        return fast, slow, buffers

    def _rates(self) -> Rates:
        o = self.options
        if o.learn_inner_lr == "scalar":
            learned = {"all": self.inner_lrs["all"]}
        else:
            learned = {n: self.inner_lrs[_key(n)] for n in self.adapt_names
                       if _key(n) in self.inner_lrs}
        return Rates(o.inner_lr, o.learn_inner_lr, learned)

    def _run(self, batch: TaskBatch, loss_fn: LossFn, steps: int, first_order: bool,
             record: Sequence[int], weights: Sequence[float] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every task's inner loop, by the plan's strategy; outputs have a leading task
        dimension. With ``weights`` (the query-loss weight of each recorded step) the
        meta-gradient may be taken inside (per-task backward): the meta-loss is then
        returned too, else None (the caller builds it from the query losses)."""
        o = self.options
        plan = make_plan(o, self._facts(), self._call(batch, steps, first_order,
                                                      weights is not None))
        fast, slow, buffers = self._split_params()
        job = InnerJob(self.model, fast, slow, buffers, loss_fn, self._rates(), steps,
                       first_order, record)
        contexts = partial(_contexts, plan)
        if plan.checkpoint:
            job = dataclasses.replace(job, step=checkpointed.step(job, contexts, plan.vmap,
                                                                  plan.chunk_size))
        if plan.compiled:
            job = dataclasses.replace(job, step=compiled.step(job, o.compile_inner, self))

        def tasks(part: TaskBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if plan.vmap:
                return batched.run(job, part, plan.chunk_size)
            return loop.run(job, part, threads.replica_of(self.model))

        T, loss = batch.num_tasks, None
        with contexts():
            if plan.backward == "caller":
                s, q, o_ = tasks(batch)
            else:
                size = 1 if plan.backward == "task" else int(plan.chunk_size or T)
                s, q, o_, loss = taskwise.run(
                    lambda i: tasks(batch.slice(i * size, min((i + 1) * size, T))),
                    -(-T // size), weights or [1.0], T, self._units(plan, contexts))
        # Training stops on a non-finite inner loss; evaluation (no grad) reports it instead:
        # a diverged test task is a result (counted as such by the recipe), not a crash.
        if o.check_finite and torch.is_grad_enabled():
            self._check_finite(s, q, record)
        return s, q, o_, loss

    def _units(self, plan: Plan, contexts: Any) -> taskwise.Runner:
        """How the units of a per-task backward run: on task threads, or in this thread."""
        if plan.threads > 1:
            try:
                return threads.runner(self.model, plan.threads, contexts)
            except ConfigError:
                if self.options.task_threads != "auto":
                    raise
                warnings.warn("MAML(task_threads='auto'): the model cannot be deep-copied for "
                              "task threads; its tasks run one at a time", stacklevel=4)
        return taskwise.in_order

    def _check_finite(self, s: torch.Tensor, q: torch.Tensor, record: Sequence[int]) -> None:
        for name, losses, labels in (("support", s, None), ("query", q, record)):
            bad = ~torch.isfinite(losses.detach())
            if bool(bad.any()):
                task, idx = (int(i) for i in bad.nonzero()[0])
                step = idx if labels is None else labels[idx]
                raise InnerLoopError(
                    f"MAML inner loop: the {name} loss of task {task} is "
                    f"{float(losses[task, idx].detach())} at inner step {step} "
                    f"(inner_lr={self.options.inner_lr}, learn_inner_lr="
                    f"{self.options.learn_inner_lr}); lower inner_lr, check the task inputs "
                    "for NaN/inf, or normalise the targets")

    def capture_blockers(self) -> list[tuple[str | None, str]]:
        """What keeps this learner's meta-step out of a CUDA graph (see :class:`Learner`)."""
        o, why = self.options, []
        for key in ("msl_steps", "second_order_start"):
            if getattr(o, key):
                why.append((key, "MAML++ schedules change the meta-loss with the outer step, "
                                 "which a replayed graph cannot follow"))
        if o.checkpoint:
            why.append(("checkpoint", "checkpointed inner steps save the CUDA RNG state, "
                                      "which a graph capture forbids"))
        if o.compile_inner is not False:
            why.append(("compile_inner", "compiled inner steps are not captured"))
        return why

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """The per-step NaN check (a host sync) off while a CUDA graph captures the step:
        check the replayed losses at your own cadence."""
        checks = self.options.check_finite
        self.options.check_finite = False
        try:
            yield
        finally:
            self.options.check_finite = checks

    # ------------------------------------------------------------------ contract
    def meta_loss(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Meta-loss over the batch (differentiable w.r.t. the model and learned rates).

        ``step`` is the outer step, used by the MAML++ schedules (multi-step loss weights and
        the first-to-second-order switch).
        """
        o = self.options
        batch = check_batch(batch, "MAML.meta_loss")
        loss_fn = loss_fn or o.loss_fn or default_loss(batch)
        n = o.inner_steps
        weights = msl_weights(n, step, o.msl_steps)
        record = [i + 1 for i, w in enumerate(weights) if w > 0] if n > 0 else [0]
        w = [weights[r - 1] for r in record] if n > 0 else [1.0]
        with _shape_errors(batch):
            s, q, out, loss = self._run(batch, loss_fn, n, self._first_order(step), record, w)
        if loss is None:
            loss = weighted(q, w).mean()
        metrics = {loss_name(loss_fn): q[:, -1].mean().detach()}
        if n > 0:  # the support loss at the meta-learned initialisation
            metrics["support_loss_before"] = s[:, 0].mean().detach()
        if batch.n_way is not None:
            metrics["accuracy"] = accuracy(out[:, -1].detach(), batch.query_y).mean()
        return loss, metrics

    def evaluate(
        self, batch: TaskBatch, loss_fn: LossFn | None = None, steps: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-task query metrics after ``steps`` inner steps (default ``eval_inner_steps``).

        The loss is named by its function (``mse``, ``cross_entropy``, or ``loss``), with
        ``<name>_per_step`` ``[T, steps + 1]`` (column 0 = before adaptation) and, for
        classification, ``accuracy`` and ``accuracy_per_step``.
        """
        batch = check_batch(batch, "MAML.evaluate")
        loss_fn = loss_fn or self.options.loss_fn or default_loss(batch)
        steps = self.options.eval_inner_steps if steps is None else steps
        with torch.no_grad(), _shape_errors(batch):
            _, q, out, _ = self._run(batch, loss_fn, steps, True, list(range(steps + 1)))
        name = loss_name(loss_fn)
        res = {name: q[:, -1], f"{name}_per_step": q}
        if batch.n_way is not None:
            acc = accuracy(out, batch.query_y.unsqueeze(1))
            res["accuracy"] = acc[:, -1]
            res["accuracy_per_step"] = acc
        return {**res, **self.query_metrics(out[:, -1], batch)}

    def query_metrics(self, pred: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """More per-task metrics ``[T]`` of the adapted predictions ``pred [T, Q, ...]``,
        added to :meth:`evaluate`'s; none here (a learner for a task family adds its own)."""
        return {}

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor,
                query_x: torch.Tensor, steps: int | None = None,
                loss_fn: LossFn | None = None) -> torch.Tensor:
        """Adapt to each task's support set and predict its queries, all tasks at once (the
        plan's strategy): inputs ``[T, N, ...]``, outputs ``[T, Q, ...]``, no outer graph."""
        steps = self.options.eval_inner_steps if steps is None else steps
        integer = not support_y.dtype.is_floating_point
        loss_fn = loss_fn or self.options.loss_fn or (F.cross_entropy if integer else mse_loss)
        with torch.no_grad():
            # the queries' labels are not known: placeholders for the query loss (unused)
            qy = support_y.new_zeros((*query_x.shape[:2], *support_y.shape[2:]))
            batch = TaskBatch(support_x, support_y, query_x, qy, check_labels=False)
            with _shape_errors(batch):
                return self._run(batch, loss_fn, steps, True, [steps])[2][:, -1]

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        loss_fn: LossFn | None = None,
        steps: int | None = None,
    ) -> AdaptedModel:
        """Adapt to ONE task (inputs without a task dimension) and return the adapted model."""
        check_one_task(support_x, support_y, "MAML.adapt", self.label_dims)
        steps = self.options.eval_inner_steps if steps is None else steps
        loss_fn = loss_fn or self.options.loss_fn or default_loss(
            None if support_y.dtype.is_floating_point else 0)
        fast, slow, buffers = self._split_params()
        rewrite = self._facts().loop_rewrite
        with torch.no_grad(), NormRewrite(split_affine=False) if rewrite else nullcontext():
            p, s, _, _ = inner_loop(functional(self.model, slow, buffers, loss_fn), fast,
                                    (support_x, support_y), None, steps, self._rates(), True, [])
        for i, loss in enumerate(s):
            if self.options.check_finite and not torch.isfinite(loss):
                raise InnerLoopError(
                    f"MAML.adapt: the support loss is {float(loss)} at inner step {i}; lower "
                    "inner_lr or check the support set for NaN/inf")
        p = {k: v.detach() for k, v in p.items()}
        slow_d = {k: v.detach() for k, v in slow.items()}
        return AdaptedModel(self.model, {**slow_d, **p}, buffers, norm_rewrite=rewrite)


def _contexts(plan: Plan) -> ExitStack:
    """The contexts a plan's inner loops run in: the attention path that can be
    differentiated twice, and the norm rewrite."""
    stack = ExitStack()
    if plan.math_attention:
        stack.enter_context(double_backward())
    if plan.norms != "as_is":
        stack.enter_context(NormRewrite(split_affine=plan.norms == "split_affine"))
    return stack


def _draws_random_numbers(modules: Sequence[nn.Module]) -> bool:
    """Whether a module has active dropout: a ``torch.nn`` dropout module, or a module with a
    positive ``dropout`` / ``dropout_p`` / ``attn_dropout`` rate (metattn's attention), in
    training mode."""
    for mod in modules:
        if not mod.training:
            continue
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            return True
        for name in ("dropout", "dropout_p", "attn_dropout"):
            rate = getattr(mod, name, None)
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
                return True
    return False


@contextmanager
def _shape_errors(batch: TaskBatch) -> Iterator[None]:
    """A shape error from inside the model (e.g. a model built for 2 input features on 1-d
    data) becomes a TaskError saying which batch and what to check; the original stays
    chained."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError on torch >= 2.5)
        raise
    except (RuntimeError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        if "out of bounds" in msg and batch.n_way is not None:
            raise TaskError(
                f"a label is beyond the model's outputs ({msg}): the batch's labels go up to "
                f"n_way - 1 = {batch.n_way - 1}, so the model needs n_way = {batch.n_way} "
                "outputs per example (e.g. model n_classes or out_features)") from e
        if isinstance(e, IndexError) or not any(
                k in msg for k in ("size", "shape", "dimension", "mat1", "mat2")):
            raise
        raise TaskError(
            f"the model could not run on this batch (support_x {tuple(batch.support_x.shape)}, "
            f"support_y {tuple(batch.support_y.shape)}): {msg}; check that the model's input "
            "size (e.g. model.in_features) matches the data") from e


def _signature(options: type[MAMLOptions]) -> inspect.Signature:
    """``MAML(model, *, inner_lr=0.4, ...)`` for ``help()`` and editors: the options' fields."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("model", positional)]
    for f in dataclasses.fields(options):
        kind = positional if f.name == "inner_lr" else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=f.default, annotation=f.type))
    return inspect.Signature(params)




class FOMAML(MAML):
    """First-order MAML: the meta-gradient ignores the second-order term
    (``first_order=True`` by default)."""

    Options = FOMAMLOptions


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al. 2020): only the head adapts in the inner loop
    (``inner_params="head"`` by default: a parameter or module name, or a list)."""

    Options = ANILOptions


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): a learned inner learning rate per parameter element
    (``learn_inner_lr="per_param"`` by default)."""

    Options = MetaSGDOptions


class MAMLpp(MAML):
    """MAML++ (Antoniou et al. 2019): per-layer per-step rates, the multi-step loss and
    derivative-order annealing (``learn_inner_lr="per_layer_step"``, ``msl_steps=1000``,
    ``second_order_start=1000`` by default)."""

    Options = MAMLppOptions


for _cls in (MAML, FOMAML, ANIL, MetaSGD, MAMLpp):
    _cls.__signature__ = _signature(_cls.Options)  # type: ignore[attr-defined]
