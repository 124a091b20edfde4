"""MAML(compile_inner=True): each inner step through torch.compile, the same meta-gradient."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from models import make, meta_grad
from torch import nn

import metattn as mt
from metattn.errors import ConfigError
from metattn.recipe import CUDAGraphStep

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("kind, first_order", [("transformer", False), ("conv_bn", True)])
def test_compiled_inner_steps_give_the_eager_meta_gradient(kind, first_order, fp64):
    """Second order through attention with learned per-parameter rates (Meta-SGD) on two task
    threads, and first order through Conv-4's batch-statistics BatchNorm: the compiled
    steps' meta-loss and meta-gradient (model and rates) are the eager loop's, in float64.
    Evaluation adapts eagerly (no new graph)."""
    m, batch = make(kind, T=3)
    kw = dict(inner_lr=0.3, inner_steps=2, first_order=first_order, vectorize=False,
              learn_inner_lr="per_param")
    ref = mt.MAML(m, **kw)
    comp = mt.MAML(m, **kw, compile_inner=True, task_threads=2)
    comp.inner_lrs.load_state_dict(ref.inner_lrs.state_dict())
    loss_a, g_a = meta_grad(ref, batch)
    rates_a = [p.grad.clone() for p in ref.inner_lrs.parameters()]
    before = _graphs()
    loss_b, g_b = meta_grad(comp, batch)
    assert _graphs() > before  # the steps really ran compiled
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    torch.testing.assert_close(g_b, g_a, rtol=1e-10, atol=1e-12)
    for a, b in zip(rates_a, comp.inner_lrs.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a, rtol=1e-10, atol=1e-12)
    meta_grad(comp, batch)  # a second meta-step reuses the compiled step
    graphs = _graphs()
    out_a, out_b = ref.evaluate(batch), comp.evaluate(batch)
    assert _graphs() == graphs
    torch.testing.assert_close(out_b["accuracy"], out_a["accuracy"])


def test_compile_inner_refuses_what_it_cannot_compile():
    m, _ = make("mlp")
    with pytest.raises(ConfigError, match="vectorize=False or 'auto'"):
        mt.MAML(m, compile_inner=True, vectorize=True)
    with pytest.raises(ConfigError, match="checkpoint"):
        mt.MAML(m, compile_inner=True, checkpoint=True)
    with pytest.raises(ConfigError, match="compile_inner='yes'"):
        mt.MAML(m, compile_inner="yes")
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))  # running stats
    with pytest.raises(ConfigError, match="track_running_stats=False"):
        mt.MAML(bn, compile_inner=True)
    learner = mt.MAML(m, compile_inner=True)
    # auto picks the loop, whose step is the compiled one (an MLP would otherwise take vmap);
    # evaluation adapts eagerly and keeps vmap
    _, batch = make("mlp")
    assert str(learner.plan(batch, train=False)) == str(mt.MAML(m).plan(batch)) == "vmap"
    assert learner.plan(batch).compiled and not learner.plan(batch).vmap
    opt = torch.optim.Adam(learner.parameters(), 1e-3, capturable=True)
    with pytest.raises(ConfigError, match="compile_inner"):
        CUDAGraphStep(learner, opt)


def test_a_failing_compiler_is_a_config_error_that_names_the_way_out(fp64):
    """The compiler backend failing (as without a C++ compiler) is reported as such, with
    compile_inner=False as the fix, and no gradient lands on the model."""
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    m, batch = make("mlp", T=2)
    learner = mt.MAML(m, inner_steps=1, compile_inner={"backend": broken_backend})
    with pytest.raises(ConfigError, match="compile_inner=False") as info:
        learner.meta_loss(batch)
    assert "no C++ compiler found" in str(info.value)
    assert all(p.grad is None for p in m.parameters())


class _WithUnused(nn.Module):
    """An MLP with a layer the forward never uses (its rates must get no gradient)."""

    def __init__(self):
        super().__init__()
        self.net = mt.MLP(4, [8], 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@needs_compiler
@pytest.mark.slow
def test_compiled_steps_follow_the_eager_loop_in_its_corners(fp64):
    """Per-step learned rates (MAML++ LSLR), a first- to second-order switch, an unused
    layer (no update, no rate gradient: None as in the eager loop, not 0) and one compiled
    graph for all inner steps."""
    torch.manual_seed(0)
    _, batch = make("mlp", T=2)
    m = _WithUnused().double()
    kw = dict(inner_lr=0.3, inner_steps=3, vectorize=False, learn_inner_lr="per_layer_step",
              second_order_start=1)
    ref, comp = mt.MAML(m, **kw), mt.MAML(m, **kw, compile_inner=True)
    for outer_step in (0, 1):  # first order, then second order
        before = _graphs()
        for learner in (ref, comp):
            learner.zero_grad(set_to_none=True)
            loss, _ = learner.meta_loss(batch, step=outer_step)
            loss.backward()
        assert _graphs() - before == 1  # steps 0-2 share one graph (parameters or not)
        for (name, a), b in zip(ref.named_parameters(), comp.parameters(), strict=True):
            if a.grad is None:
                assert b.grad is None, name
            else:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)
        assert ref.inner_lrs["unused__weight"].grad is None


@needs_compiler
@pytest.mark.slow
def test_past_the_recompile_limit_threads_step_eagerly_and_correctly(fp64):
    """When torch.compile gives up (its recompile limit), the step runs eagerly on each
    thread's own model replica: same meta-gradient, one warning."""
    torch._dynamo.reset()
    m, _ = make("mlp", T=4)
    ref = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False)
    comp = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False, compile_inner=True,
                   task_threads=2)
    # (config.patch, not monkeypatch: the config module's attributes are not its __dict__'s)
    with torch._dynamo.config.patch(recompile_limit=1):
        for shots in (6, 4):  # the second shape is past the limit
            batch = make("mlp", T=4, S=shots, seed=shots)[1]
            g_a = meta_grad(ref, batch)[1]
            if shots == 4:
                with pytest.warns(UserWarning, match="gave up"):
                    g_b = meta_grad(comp, batch)[1]
            else:
                g_b = meta_grad(comp, batch)[1]
            torch.testing.assert_close(g_b, g_a, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


def _recording_backend(log: list):
    """An AOTAutograd backend without a code generator (fast) that records, for each forward
    and backward it compiles, whether the compile lock was held."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from metattn.meta.maml.execution import compiled

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            log.append((kind, compiled._LOCK.locked()))
            return make_boxed_func(gm.forward)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))


def test_task_threads_never_compile_outside_the_lock(fp64):
    """What dynamo guards on may change between calls (the calling thread's thread count
    when a 1-task batch runs on the caller, the inputs' strides): each new kind of input
    compiles under the lock, forward and backward, never concurrently in the workers."""
    log: list = []
    m, one = make("mlp", T=1)
    _, four = make("mlp", T=4, seed=1)
    comp = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False, task_threads=2,
                   compile_inner={"backend": _recording_backend(log)})
    ref = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False)
    strided = mt.TaskBatch(four.support_x.transpose(1, 2).contiguous().transpose(1, 2),
                           four.support_y, four.query_x, four.query_y, n_way=four.n_way)
    for batch in (one, four, strided):
        torch.testing.assert_close(meta_grad(comp, batch)[1], meta_grad(ref, batch)[1],
                                   rtol=1e-10, atol=1e-12)
    assert {kind for kind, _ in log} == {"fw", "bw"}
    assert all(locked for _, locked in log), log


def test_a_graph_break_in_the_model_is_a_config_error(fp64):
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            torch._dynamo.graph_break()
            return self.lin(x)

    _, batch = make("mlp", T=2)
    learner = mt.MAML(Breaks().double(), inner_steps=1, compile_inner={"backend": "eager"})
    with pytest.raises(ConfigError, match="one graph.*compile_inner=False"):
        learner.meta_loss(batch)


class _Tempered(nn.Module):
    """Logits over a temperature the forward reads as a plain attribute, and dropout."""

    def __init__(self, p_drop: float = 0.0):
        super().__init__()
        self.net = mt.MLP(4, [8], 3)
        self.drop = nn.Dropout(p_drop)
        self.temp = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.drop(x)) / self.temp


def test_attributes_hooks_and_dropout_follow_the_eager_loop(fp64):
    """A plain attribute the forward reads (changed between calls) recompiles under the
    lock; a model with hooks (which dynamo's graphs would skip: not guarded) steps eagerly
    with a warning, also where another learner already compiled its structure; a model with
    dropout draws the same masks as the eager loop from its first call on."""
    log: list = []
    backend = _recording_backend(log)
    torch.manual_seed(0)
    _, batch = make("mlp", T=4)
    m = _Tempered().double()
    kw = dict(inner_lr=0.3, inner_steps=2, vectorize=False)
    comp = mt.MAML(m, **kw, task_threads=2, compile_inner={"backend": backend})
    ref = mt.MAML(m, **kw)
    for temp in (1.0, 2.0):
        m.temp = temp
        torch.testing.assert_close(meta_grad(comp, batch)[1], meta_grad(ref, batch)[1],
                                   rtol=1e-10, atol=1e-12)
    assert len(log) == 4 and all(locked for _, locked in log), log  # fw + bw per temperature

    hooked = copy.deepcopy(m)
    hooked.net.register_forward_hook(lambda mod, args, out: 2 * out)
    comp_h = mt.MAML(hooked, **kw, compile_inner={"backend": backend})
    with pytest.warns(UserWarning, match="hooks"):
        got = meta_grad(comp_h, batch)[1]
    torch.testing.assert_close(got, meta_grad(mt.MAML(hooked, **kw), batch)[1],
                               rtol=1e-10, atol=1e-12)

    dropped = _Tempered(p_drop=0.3).double()
    losses = []
    for compiled in (False, True):
        learner = mt.MAML(dropped, **kw, compile_inner={"backend": backend} if compiled
                          else False)
        torch.manual_seed(1)
        losses.append(learner.meta_loss(batch)[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)


def test_compiled_steps_die_with_their_learner():
    """The cache of compiled steps is keyed by the learner: dropping the learner frees the
    model and its graphs (a value that pointed back at a weak key would pin both)."""
    import gc
    import weakref

    from metattn.meta.maml.execution import compiled

    m = nn.Linear(2, 2)
    learner = mt.MAML(m, compile_inner=True)
    compiled._compiled(learner, m, F.mse_loss, False, True)
    model_ref = weakref.ref(m)
    assert learner in compiled._CACHE
    del learner, m
    gc.collect()
    assert model_ref() is None and len(compiled._CACHE) == 0


def test_compile_inner_accepts_norms_declared_absent():
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    assert mt.MAML(bn, compile_inner=True, has_norms=False).plan(
        make("mlp")[1]).compiled  # has_norms=False: no rewrite to trace
