"""metattn.meta.maml.plan and .execution: every strategy (vmap, chunks, per-task backward, task
threads, checkpointed steps) gives the loop's meta-gradient, with the memory and threads it
promises, and the plan says which one runs."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from models import KINDS, make, meta_grad, tiny_batch, tiny_net
from torch import nn

import metattn as mt
from metattn.errors import ConfigError, TaskError
from metattn.meta.maml import MAMLOptions
from metattn.meta.maml import plan as plan_module


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_equals_loop(kind, first_order, fp64):
    m, batch = make(kind)
    l_loop = mt.MAML(m, inner_lr=0.3, inner_steps=2, first_order=first_order, vectorize=False)
    l_vmap = mt.MAML(m, inner_lr=0.3, inner_steps=2, first_order=first_order, vectorize=True)
    loss_a, g_a = meta_grad(l_loop, batch)
    loss_b, g_b = meta_grad(l_vmap, batch)
    assert abs(loss_a - loss_b) <= 1e-12 * abs(loss_a)
    rel = float((g_a - g_b).norm() / g_a.norm())
    assert rel < 1e-10, rel


def test_vmap_chunked_equals_unchunked(fp64):
    m, batch = make("conv_bn", T=4)
    _, g_a = meta_grad(mt.MAML(m, inner_lr=0.3, vectorize=True), batch)
    _, g_b = meta_grad(mt.MAML(m, inner_lr=0.3, vectorize=True, chunk_size=3), batch)
    assert float((g_a - g_b).norm() / g_a.norm()) < 1e-10
    # and the chunks are real: 4 tasks in chunks of 3 run the model twice as often
    calls: list[int] = []
    counts = {}
    h = m.register_forward_hook(lambda mod, i, o: calls.append(1))
    try:
        for chunk in (None, 3):
            calls.clear()
            mt.MAML(m, inner_lr=0.3, vectorize=True, chunk_size=chunk).meta_loss(batch)
            counts[chunk] = len(calls)
    finally:
        h.remove()
    assert counts[3] == 2 * counts[None], counts


def test_vmap_chunks_bound_the_training_memory():
    """With chunk_size, each chunk's meta-gradient is taken before the next chunk runs: the
    tensors saved for the backward peak at one chunk's worth (here 4 chunks: about a
    quarter), and none is left for loss.backward(). Before, chunking only split vmap's
    forward and every chunk's graph stayed alive until the backward."""
    import gc
    import weakref

    g = torch.Generator().manual_seed(0)
    T = 8
    batch = mt.TaskBatch(torch.rand(T, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(T, 1),
                         torch.rand(T, 10, 1, 28, 28, generator=g),
                         torch.arange(5).repeat_interleave(2).repeat(T, 1), n_way=5)
    stats = {}
    for chunk in (None, 2):
        torch.manual_seed(0)
        model = mt.Conv4(1, 5, hidden=8, image_size=28)
        refs: list[tuple[weakref.ref, int]] = []
        peak = [0]

        def pack(t, refs=refs, peak=peak):
            refs.append((weakref.ref(t), t.numel() * t.element_size()))
            peak[0] = max(peak[0], sum(n for r, n in refs if r() is not None))
            return t

        learner = mt.MAML(model, inner_lr=0.4, inner_steps=1, vectorize=True, chunk_size=chunk)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = learner.meta_loss(batch)
        gc.collect()
        stats[chunk] = (peak[0], sum(n for r, n in refs if r() is not None))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    (peak_all, left_all), (peak_chunks, left_chunks) = stats[None], stats[2]
    assert left_all > 0.9 * peak_all and left_chunks == 0, stats
    assert peak_chunks < 0.35 * peak_all, stats


# ----------------------------------------------------------------- scale: memory and precision
@pytest.mark.parametrize("kind", ["transformer", "conv_bn"])
@pytest.mark.parametrize("vec", [False, True])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(kind, vec, fp64):
    m, batch = make(kind)
    for extra in ({}, {"learn_inner_lr": "per_layer_step", "msl_steps": 10}):
        kw = {"step": 0} if extra else {}
        plain = mt.MAML(m, inner_lr=0.3, inner_steps=3, vectorize=vec, **extra)
        ckpt = mt.MAML(m, inner_lr=0.3, inner_steps=3, vectorize=vec, checkpoint=True, **extra)
        loss_a, g_a = meta_grad(plain, batch, **kw)
        rates_a = [r.grad.clone() for r in plain.inner_lrs.values()]
        loss_b, g_b = meta_grad(ckpt, batch, **kw)
        assert abs(loss_a - loss_b) <= 1e-12 * abs(loss_a)
        assert float((g_a - g_b).norm() / g_a.norm()) < 1e-10
        for ra, rb in zip(rates_a, ckpt.inner_lrs.values(), strict=True):
            torch.testing.assert_close(rb.grad, ra, rtol=1e-10, atol=1e-14)


def test_checkpointed_inner_steps_replay_dropout(fp64):
    m = mt.TokenTransformer(vocab_size=20, max_len=6, n_classes=3, d_model=16, n_heads=2,
                            n_layers=1, d_ff=32, dropout=0.2).double()
    _, batch = make("transformer")
    for vec in (False, True):
        grads = []
        for ckpt in (False, True):
            torch.manual_seed(7)
            grads.append(meta_grad(mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=vec,
                                           checkpoint=ckpt), batch)[1])
        assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-10


def _graph_bytes(loss: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the tensors saved in ``loss``'s autograd graph (storages not in ``exclude``)."""
    seen, storages, stack = set(), {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        vals = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    vals.append(getattr(node, name))
                except RuntimeError:
                    pass
        if hasattr(node, "saved_tensors"):  # custom autograd functions
            vals.extend(node.saved_tensors)
        for v in vals:
            for x in v if isinstance(v, (tuple, list)) else [v]:
                if isinstance(x, torch.Tensor):
                    st = x.untyped_storage()
                    if st.data_ptr() not in exclude:
                        storages[st.data_ptr()] = st.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


def test_checkpointed_inner_loop_memory_does_not_grow_with_steps():
    g = torch.Generator().manual_seed(0)
    m = mt.MLP(8, [32, 32], 3)  # activations of 1000 support points >> parameters
    T = 4
    batch = mt.TaskBatch(torch.randn(T, 1000, 8, generator=g),
                         torch.randint(0, 3, (T, 1000), generator=g),
                         torch.randn(T, 10, 8, generator=g),
                         torch.randint(0, 3, (T, 10), generator=g), n_way=3)
    exclude = {t.untyped_storage().data_ptr() for t in (*m.parameters(), batch.support_x,
                                                        batch.support_y, batch.query_x,
                                                        batch.query_y)}
    param_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    for vec in (False, True):
        stored, ckpt = (
            [_graph_bytes(mt.MAML(m, 0.1, inner_steps=s, vectorize=vec, checkpoint=c,
                                  per_task_backward=False).meta_loss(batch)[0], exclude)
             for s in (2, 6)]
            for c in (False, True))
        assert stored[1] > 2.5 * stored[0], stored  # the graph grows with the inner steps
        # checkpointed: only each step's parameters are kept (per task)
        assert ckpt[1] - ckpt[0] <= 1.1 * 4 * T * param_bytes, (ckpt, param_bytes)
        assert ckpt[1] < 0.05 * stored[1], (ckpt, stored)


@pytest.mark.parametrize("kind", ["transformer", "conv_bn"])
def test_bf16_autocast_meta_training_runs(kind):
    m, batch = make(kind)
    for vec in (False, True):
        for ckpt in (False, True):
            learner = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=vec, checkpoint=ckpt)
            ref_loss, ref = meta_grad(learner, batch)
            learner.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = learner.meta_loss(batch)
            loss.backward()
            g = torch.cat([p.grad.float().reshape(-1) for p in m.parameters()])
            assert torch.isfinite(loss) and bool(torch.isfinite(g).all())
            assert abs(float(loss.detach()) - ref_loss) < 0.05 * abs(ref_loss)
            if kind == "transformer":
                # (the tiny BatchNorm net's bf16 meta-gradient is mostly rounding noise, in a
                # plain PyTorch loop too: there only running and finiteness are checked)
                assert float((g - ref).norm() / ref.norm()) < 0.3


def test_per_task_backward_keeps_one_task_graph_and_the_same_meta_gradient(fp64):
    m, batch = make("conv_bn", T=4)
    graph = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False, per_task_backward=False)
    taskwise = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False,
                       learn_inner_lr="per_layer_step")
    graph_rates = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False,
                          learn_inner_lr="per_layer_step", per_task_backward=False)
    for a, b in ((graph, mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False)),
                 (graph_rates, taskwise)):
        loss_a, g_a = meta_grad(a, batch)
        loss_b, g_b = meta_grad(b, batch)
        assert abs(loss_a - loss_b) <= 1e-12 * abs(loss_a)
        assert float((g_a - g_b).norm() / g_a.norm()) < 1e-12
    for ra, rb in zip(graph_rates.inner_lrs.values(), taskwise.inner_lrs.values(), strict=True):
        torch.testing.assert_close(rb.grad, ra.grad, rtol=1e-12, atol=1e-15)
    exclude = {p.untyped_storage().data_ptr() for p in m.parameters()}
    held = _graph_bytes(taskwise.meta_loss(batch)[0], exclude)
    stored = _graph_bytes(graph_rates.meta_loss(batch)[0], exclude)
    assert held < 0.01 * stored, (held, stored)
    # the meta-loss composes like any loss: scaled, summed with another term
    m.zero_grad()
    loss, _ = taskwise.meta_loss(batch)
    (3 * loss + sum(p.sum() for p in m.parameters())).backward()
    g3 = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    torch.testing.assert_close(g3, 3 * meta_grad(taskwise, batch)[1] + 1)
    # but it cannot be differentiated twice: a clear error, not a wrong number
    loss, _ = taskwise.meta_loss(batch)
    with pytest.raises(RuntimeError, match="per_task_backward=False"):
        torch.autograd.grad(loss, list(m.parameters()), create_graph=True)


def test_per_task_backward_keeps_parameters_only_some_tasks_reach():
    """A model with a data-dependent branch: task 0 never uses ``extra``, task 1 does. The
    per-task backward must still give ``extra`` task 1's meta-gradient."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.extra = nn.Linear(2, 2, bias=False)

        def forward(self, x):
            h = self.fc(x)
            return h + self.extra(x) if bool(x[0, 0] > 0) else h

    torch.manual_seed(0)
    m = Branchy()
    x = torch.randn(2, 4, 2)
    x[0, :, 0] = -x[0, :, 0].abs() - 0.1  # task 0: branch off
    x[1, :, 0] = x[1, :, 0].abs() + 0.1  # task 1: branch on
    y = torch.randn(2, 4, 2)
    batch = mt.TaskBatch(x, y, x.clone(), y.clone())
    grads = []
    for ptb in (False, True):
        m.zero_grad(set_to_none=True)
        mt.MAML(m, inner_lr=0.1, vectorize=False, per_task_backward=ptb,
                loss_fn=F.mse_loss).meta_loss(batch)[0].backward()
        assert m.extra.weight.grad is not None
        grads.append(m.extra.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_checkpointed_vmap_with_running_stat_batchnorm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    batch = mt.TaskBatch(torch.randn(3, 6, 4), torch.randint(0, 3, (3, 6)),
                         torch.randn(3, 5, 4), torch.randint(0, 3, (3, 5)), n_way=3)
    ref = mt.MAML(m, inner_lr=0.5, inner_steps=2, vectorize=False).meta_loss(batch)[0]
    got = mt.MAML(m, inner_lr=0.5, inner_steps=2, vectorize=True,
                  checkpoint=True).meta_loss(batch)[0]
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("vectorize, checkpoint, per_task", [
    (False, False, True), (True, False, False), (False, True, False), (True, True, False),
    (False, True, True)])
def test_inputs_with_a_graph_get_the_meta_gradient_on_every_path(vectorize, checkpoint,
                                                                 per_task):
    """Support/query features from a trainable encoder OUTSIDE the model (W here): every
    path gives the reference path's gradient for W (checkpointing used to drop the inner
    loop's part, per-task backward used to crash)."""
    torch.manual_seed(7)
    W = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def w_grad(**kw):
        W.grad = None
        learner = mt.MAML(tiny_net(), inner_lr=0.3, inner_steps=2, **kw)
        loss, _ = learner.meta_loss(tiny_batch(lambda x: x @ W))
        loss.backward()
        return W.grad.clone()

    ref = w_grad(vectorize=False, per_task_backward=False)
    got = w_grad(vectorize=vectorize, checkpoint=checkpoint, per_task_backward=per_task)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_task_threads_give_the_loops_meta_gradient(kind, fp64):
    """Tasks on two worker threads (one intra-op thread each): the same meta-loss and
    meta-gradient as the one-thread loop, the caller's thread count restored, no replica
    registered as a submodule."""
    m, batch = make(kind, T=5)
    keys = set(m.state_dict())
    ref = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False, task_threads=1)
    par = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False, task_threads=2)
    threads = torch.get_num_threads()
    loss_a, g_a = meta_grad(ref, batch)
    loss_b, g_b = meta_grad(par, batch)
    assert torch.get_num_threads() == threads
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    torch.testing.assert_close(g_b, g_a, rtol=1e-10, atol=1e-12)
    assert set(m.state_dict()) == keys and set(par.state_dict()) == set(ref.state_dict())


def test_task_threads_carry_the_callers_modes_into_the_workers():
    """Autocast, grad mode, context variables (the double-backward flag) and the norm rewrite
    (thread-local) reach the worker threads; BatchNorm running statistics stay untouched."""
    import threading

    from metattn.nn.attention import double_backward_enabled

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((threading.current_thread().name, torch.is_autocast_enabled("cpu"),
                         torch.is_grad_enabled(), double_backward_enabled()))
            return x

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), Probe(), nn.ReLU(), nn.Linear(8, 3))
    batch = mt.TaskBatch(torch.randn(4, 6, 4), torch.randint(0, 3, (4, 6)),
                         torch.randn(4, 5, 4), torch.randint(0, 3, (4, 5)), n_way=3)
    before = m[1].running_mean.clone()
    learner = mt.MAML(m, inner_lr=0.1, vectorize=False, task_threads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = learner.meta_loss(batch)
    loss.backward()
    assert seen and all(name.startswith("metattn-task") for name, *_ in seen)
    assert all(amp and grad and dbl for _, amp, grad, dbl in seen)
    assert torch.equal(m[1].running_mean, before)
    assert m[0].weight.grad is not None and torch.isfinite(m[0].weight.grad).all()


def test_task_threads_errors_reach_the_caller_and_bad_values_are_config_errors():
    m, batch = make("mlp", T=4)
    bad = mt.TaskBatch(batch.support_x[..., :3], batch.support_y, batch.query_x[..., :3],
                       batch.query_y, n_way=batch.n_way)
    learner = mt.MAML(m, inner_lr=0.1, vectorize=False, task_threads=2)
    assert learner.plan(bad).threads == 2
    threads = torch.get_num_threads()
    with pytest.raises(TaskError, match="could not run on this batch"):
        learner.meta_loss(bad)
    assert torch.get_num_threads() == threads
    for value in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="task_threads"):
            mt.MAML(m, task_threads=value)


def _threads_planned(model, batch, **kw) -> int:
    with _torch_threads(4):
        return mt.MAML(model, inner_lr=0.1, vectorize=False, **kw).plan(batch).threads


@contextmanager
def _torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_task_threads_are_on_by_default_where_they_are_safe():
    """The default, auto: every torch thread (never more than tasks) on the CPU when training
    task by task; one thread for models with active dropout (seeded runs must repeat), with
    module hooks (they would fire on the workers' copies of the modules), on CUDA, while
    attention is recorded, checkpointed, in evaluation, and with per_task_backward=False."""
    m, batch = make("mlp", T=3)
    assert mt.MAML(m).task_threads == "auto"
    assert _threads_planned(m, batch) == 3  # 4 torch threads, 3 tasks
    assert _threads_planned(m, make("mlp", T=8)[1]) == 4
    assert _threads_planned(m, batch, task_threads=2) == 2
    assert _threads_planned(m, batch, checkpoint=True) == 1
    assert _threads_planned(m, batch, per_task_backward=False) == 1
    with _torch_threads(4):
        assert mt.MAML(m, vectorize=False).plan(batch, train=False).threads == 1
        with mt.record_attention():
            assert mt.MAML(m, vectorize=False).plan(batch).threads == 1
    drop, tb = make("transformer", T=3)
    drop.encoder.layers[0].drop.p = 0.2
    drop.train()
    assert _threads_planned(drop, tb) == 1
    assert _threads_planned(drop.eval(), tb) == 3
    hooked = copy.deepcopy(m)
    handle = next(hooked.children()).register_forward_hook(lambda *a: None)
    assert _threads_planned(hooked, batch) == 1
    handle.remove()
    assert _threads_planned(hooked, batch) == 3
    opts = MAMLOptions(task_threads=4)
    cuda = plan_module.make_plan(opts, plan_module.ModelFacts(), plan_module.Call(
        device="cuda", num_tasks=8, per_task_loss=True, cpu_threads=4))
    assert cuda.threads == 1 and cuda.vmap


def test_task_threads_keep_few_tasks_in_flight_and_never_more_threads_than_tasks():
    """A finished task holds a whole meta-gradient: at most 2 per worker may wait for the
    (slow) caller; a one-task batch runs on the caller's thread."""
    import threading
    import time
    from contextlib import ExitStack

    from metattn.meta.maml.execution import threads

    m, batch = make("mlp", T=1)
    started, seen = [], []

    def unit(t):
        started.append(t)
        return t

    for r in threads.runner(m, 2, ExitStack)(unit, 20):
        time.sleep(0.005)  # a slow consumer: unbounded workers would run far ahead
        assert len(started) - len(seen) <= 5
        seen.append(r)
    assert seen == list(range(20))
    names = []

    class Probe(nn.Module):
        def forward(self, x):
            names.append(threading.current_thread().name)
            return x

    probe = nn.Sequential(nn.Linear(4, 3), Probe())
    learner = mt.MAML(probe, inner_lr=0.1, vectorize=False, task_threads=2)
    assert learner.plan(batch).threads == 1
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    assert names and all(n == threading.current_thread().name for n in names)


def test_auto_vectorize_picks_the_threaded_loop_for_transformers_on_the_cpu():
    """vectorize="auto" on the CPU: the loop for conv nets, and for attention models when
    task threads run it (training task by task); vmap for MLPs (threads or not), and for
    attention on one thread, in evaluation and on the checkpointed path. Each plan is what
    runs: the threaded loop's forwards run on the workers."""
    import threading

    tr, batch = make("transformer", T=3)
    mlp, mb = make("mlp", T=3)
    conv, cb = make("conv_bn", T=3)
    with _torch_threads(2):
        assert str(mt.MAML(tr).plan(batch)) == "loop, backward per task, 2 task threads"
        assert str(mt.MAML(tr, task_threads=1).plan(batch)) == "vmap"
        assert str(mt.MAML(mlp).plan(mb)) == "vmap"
        assert mt.MAML(conv, task_threads=1).plan(cb).vmap is False
        torch_mha = nn.Sequential(nn.Linear(4, 4))
        torch_mha.attn = nn.MultiheadAttention(4, 2)
        assert not mt.MAML(torch_mha).plan(mb).vmap
        assert mt.MAML(tr, vectorize=True).plan(batch).vmap
        for kw, want in (({"checkpoint": True}, "vmap, checkpoint"),
                         ({"per_task_backward": False}, "vmap"),
                         ({"chunk_size": 2, "vectorize": True},
                          "vmap, chunks of 2, backward per chunk")):
            assert str(mt.MAML(tr, **kw).plan(batch)) == want, kw
        assert str(mt.MAML(tr).plan(batch, train=False)) == "vmap"
        facts = plan_module.ModelFacts(has_attention=True)
        cuda = plan_module.Call(device="cuda", num_tasks=3, per_task_loss=True, cpu_threads=2)
        assert plan_module.make_plan(MAMLOptions(), facts, cuda).vmap
        # the plan is what runs
        seen = []
        tr.encoder.layers[0].attn.register_forward_pre_hook(
            lambda *a: seen.append(threading.current_thread().name))
        learner = mt.MAML(tr, inner_lr=0.1, task_threads=2)
        assert learner.plan(batch).threads == 2  # (explicit threads: hooks do not stop them)
        learner.meta_loss(batch)[0].backward()
        assert seen and all(n.startswith("metattn-task") for n in seen)
