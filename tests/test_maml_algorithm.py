"""metattn.meta.maml.algorithm: the inner step written once, its one rule for a parameter the
support loss does not reach, and that rule on every execution strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metattn as mt
from metattn.meta.maml.algorithm import Rates, functional, inner_loop, inner_step, update


class PartlyUsed(nn.Module):
    """A linear map and a parameter that no loss reaches."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.spare = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.lin(x)


def _data(T=4, n=5):
    g = torch.Generator().manual_seed(0)
    return mt.TaskBatch(torch.randn(T, n, 3, generator=g), torch.randn(T, n, 2, generator=g),
                        torch.randn(T, n, 3, generator=g), torch.randn(T, n, 2, generator=g))


def test_update_keeps_a_parameter_without_gradient_as_it_is():
    p = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    new = update(p, {"a": torch.tensor([0.5, -1.0]), "b": None}, {"a": 0.1, "b": 0.1})
    assert new["b"] is p["b"]
    assert torch.allclose(new["a"], torch.tensor([0.95, 2.1]))


@pytest.mark.parametrize("mode", [None, "scalar", "per_param", "per_layer_step"])
def test_inner_step_is_sgd_with_the_rates_and_second_order_through_them(mode, fp64):
    torch.manual_seed(0)
    model = PartlyUsed().double()
    params = dict(model.named_parameters())
    learned = {"all": torch.tensor(0.3, requires_grad=True)} if mode == "scalar" else {
        n: torch.full_like(p, 0.3, requires_grad=True) if mode == "per_param"
        else torch.full((2,), 0.3, requires_grad=True) for n, p in params.items()}
    rates = Rates(0.3, mode, learned if mode else None)
    b = _data(T=1)
    fl = functional(model, {}, {}, F.mse_loss)
    new, loss = inner_step(fl, params, b.support_x[0], b.support_y[0],
                           {k: rates(k, 1) for k in params}, create_graph=True)
    g = torch.autograd.grad(F.mse_loss(model(b.support_x[0]), b.support_y[0]),
                            [params["lin.weight"], params["lin.bias"]])
    torch.testing.assert_close(new["lin.weight"], params["lin.weight"] - 0.3 * g[0])
    torch.testing.assert_close(new["lin.bias"], params["lin.bias"] - 0.3 * g[1])
    assert new["spare"] is params["spare"] and float(loss.detach()) == pytest.approx(
        F.mse_loss(model(b.support_x[0]), b.support_y[0]).item())
    # second order: the query loss after the step depends on the support gradient
    q = F.mse_loss(fl(new, b.query_x[0], b.query_y[0])[0], b.query_y[0])
    grads = torch.autograd.grad(q, [params["lin.weight"], *learned.values()], allow_unused=True)
    assert grads[0] is not None
    if mode in ("per_param", "per_layer_step"):
        assert grads[1 + list(learned).index("spare")] is None  # its rate: no gradient
        assert grads[1 + list(learned).index("lin.weight")].abs().sum() > 0


def test_inner_loop_records_the_query_at_the_asked_steps_and_evaluation_keeps_no_graph():
    torch.manual_seed(0)
    model = PartlyUsed()
    params = dict(model.named_parameters())
    b = _data(T=1)
    fl = functional(model, {}, {}, F.mse_loss)
    args = (fl, params, (b.support_x[0], b.support_y[0]), (b.query_x[0], b.query_y[0]), 3,
            Rates(0.1), False)
    p, s, q, o = inner_loop(*args, record=[0, 2])
    assert len(s) == 3 and len(q) == len(o) == 2 and s[0].requires_grad
    assert q[0].item() == pytest.approx(F.mse_loss(model(b.query_x[0]), b.query_y[0]).item())
    with torch.no_grad():
        p_eval, s_eval, q_eval, _ = inner_loop(*args, record=[3])
    assert all(not v.grad_fn for v in p_eval.values()) and not q_eval[0].requires_grad
    torch.testing.assert_close(p_eval["lin.weight"], p["lin.weight"].detach())


STRATEGIES = [{"vectorize": False, "per_task_backward": False}, {"vectorize": False},
              {"vectorize": False, "task_threads": 2}, {"vectorize": True},
              {"vectorize": True, "chunk_size": 2}, {"vectorize": True, "checkpoint": True},
              {"vectorize": False, "checkpoint": True}]


@pytest.mark.parametrize("mode", ["per_param", "per_layer_step"])
def test_every_strategy_follows_the_one_rule_for_unreached_parameters(mode, fp64):
    """The unreached parameter keeps its value and its learned rate gets no gradient, while
    every strategy gives the same meta-gradient for the rest."""
    b = _data()
    ref = None
    for kw in STRATEGIES:
        torch.manual_seed(0)
        learner = mt.MAML(PartlyUsed().double(), inner_lr=0.2, inner_steps=2,
                          learn_inner_lr=mode, **kw)
        learner.meta_loss(b)[0].backward()
        rates = dict(learner.inner_lrs.named_parameters())
        assert rates["spare"].grad is None and learner.model.spare.grad is None, kw
        got = [learner.model.lin.weight.grad, rates["lin__weight"].grad]
        ref = ref or got
        for a, r in zip(got, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
        adapted = learner.adapt(b.support_x[0], b.support_y[0])
        assert torch.equal(adapted.params["spare"], learner.model.spare.detach())
