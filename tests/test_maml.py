"""metattn.meta.maml: exact second-order meta-gradients and the family's options (ANIL,
Meta-SGD, MAML++, frozen parameters, norms, adapt)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import make, meta_grad, meta_train, tiny_batch, tiny_net
from torch import nn

import metattn as mt
from metattn.errors import ConfigError, InnerLoopError
from metattn.meta.maml import msl_weights


def directional_fd(learner, batch, direction, eps):
    params = list(learner.model.parameters())
    with torch.no_grad():
        vals = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            vals.append(learner.meta_loss(batch)[0].item())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    return (vals[0] - vals[1]) / (2 * eps)


@pytest.mark.parametrize("kind", ["mlp", "transformer", "conv_bn"])
def test_second_order_meta_gradient_matches_finite_differences(kind, fp64):
    m, batch = make(kind)
    learner = mt.MAML(m, inner_lr=0.3, inner_steps=2, vectorize=False)
    _, g = meta_grad(learner, batch)
    g_fo = meta_grad(mt.MAML(m, inner_lr=0.3, inner_steps=2, first_order=True,
                             vectorize=False), batch)[1]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in m.parameters()]
        dflat = torch.cat([x.reshape(-1) for x in d])
        fd = directional_fd(learner, batch, d, eps=1e-7 if kind == "conv_bn" else 1e-6)
        an = float(g @ dflat)
        assert abs(fd - an) / abs(an) < 1e-6, (kind, fd, an)
        # the second-order term is not negligible here: first order is measurably different
        assert abs(float(g_fo @ dflat) - fd) / abs(fd) > 1e-4


def test_quadratic_closed_form(fp64):
    """L(theta) = 1/2 theta^T A theta - b^T theta: meta-grad = (I - alpha A)^T grad L_q(theta')."""
    d = 4
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(d, d, generator=gen)
    A_s = M @ M.T / d + torch.eye(d)  # support quadratic
    M2 = torch.randn(d, d, generator=gen)
    A_q = M2 @ M2.T / d + torch.eye(d)  # query quadratic
    b_s, b_q = torch.randn(d, generator=gen), torch.randn(d, generator=gen)

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.randn(d, generator=gen))

        def forward(self, x):  # x selects the task's (A, b): 0 = support, 1 = query
            return self.theta.expand(x.shape[0], d)

    def loss_fn(theta_rows, y):
        theta = theta_rows[0]
        A = torch.where(y[0] == 0, A_s, A_q)
        b = torch.where(y[0] == 0, b_s, b_q)
        return 0.5 * theta @ A @ theta - b @ theta

    alpha = 0.1
    model = Quad()
    batch = mt.TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.long),
                         torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.long))
    theta = model.theta.detach().clone()
    theta1 = theta - alpha * (A_s @ theta - b_s)
    gq = A_q @ theta1 - b_q
    expected_so = (torch.eye(d) - alpha * A_s).T @ gq
    for vec in (False, True):
        model.zero_grad()
        mt.MAML(model, inner_lr=alpha, inner_steps=1, vectorize=vec, loss_fn=loss_fn
                ).meta_loss(batch)[0].backward()
        torch.testing.assert_close(model.theta.grad, expected_so, rtol=1e-12, atol=1e-12)
        model.zero_grad()
        mt.FOMAML(model, inner_lr=alpha, inner_steps=1, vectorize=vec, loss_fn=loss_fn
                  ).meta_loss(batch)[0].backward()
        torch.testing.assert_close(model.theta.grad, gq, rtol=1e-12, atol=1e-12)
        assert (model.theta.grad - expected_so).norm() > 1e-3


def test_layernorm_and_batchnorm_modules_with_buffers_and_dropout():
    """A user module with running-stat BatchNorm, LayerNorm, Dropout and a buffer works."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.bn = nn.BatchNorm1d(8)
            self.ln = nn.LayerNorm(8)
            self.drop = nn.Dropout(0.1)
            self.register_buffer("scale", torch.tensor(2.0))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.drop(self.ln(torch.relu(self.bn(self.fc(x))))) * self.scale)

    m = Odd()
    batch = mt.TaskBatch(torch.randn(4, 6, 4), torch.randint(0, 3, (4, 6)),
                         torch.randn(4, 5, 4), torch.randint(0, 3, (4, 5)), n_way=3)
    for vec in (False, True):
        loss, metrics = mt.MAML(m, inner_lr=0.1, inner_steps=2, vectorize=vec).meta_loss(batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert set(metrics) == {"cross_entropy", "support_loss_before", "accuracy"}
        assert all(p.grad is not None for p in m.parameters())


def test_running_stat_batchnorm_uses_batch_statistics_in_eval_mode_too():
    """MAML never updates running statistics, so it must not use them at test time either:
    evaluate/adapt give the same numbers in train and eval mode and leave the buffers alone."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    batch = mt.TaskBatch(torch.randn(3, 6, 4) * 3 + 1, torch.randint(0, 3, (3, 6)),
                         torch.randn(3, 5, 4) * 3 + 1, torch.randint(0, 3, (3, 5)), n_way=3)
    for vec in (False, True):
        learner = mt.MAML(m, inner_lr=0.1, inner_steps=2, vectorize=vec)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        trained = learner.train().evaluate(batch)["cross_entropy"]
        evaluated = learner.eval().evaluate(batch)["cross_entropy"]
        torch.testing.assert_close(trained, evaluated)
        model = learner.adapt(batch.support_x[0], batch.support_y[0])
        learner.train()
        torch.testing.assert_close(model(batch.query_x[0]),
                                   learner.adapt(batch.support_x[0], batch.support_y[0])(
                                       batch.query_x[0]))
        # running statistics untouched (BatchNorm's own step counter still ticks in train mode)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()
                   if "running" in k)


def test_anil_adapts_only_the_head(fp64):
    m, batch = make("mlp")
    learner = mt.ANIL(m, inner_params="head", inner_lr=0.5, inner_steps=3)
    adapted = learner.adapt(batch.support_x[0], batch.support_y[0])
    for name, p in m.named_parameters():
        same = torch.equal(adapted.params[name], p.detach())
        assert same == (not name.startswith("head.")), name
    # meta-gradient still reaches the body (through the query loss)
    _, g = meta_grad(learner, batch)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # and matches the ANIL closed form: body-only FD check in one direction
    d = [torch.randn_like(p) for p in m.parameters()]
    fd = directional_fd(learner, batch, d, 1e-6)
    an = float(g @ torch.cat([x.reshape(-1) for x in d]))
    assert abs(fd - an) / abs(an) < 1e-6


def test_anil_unknown_name_is_a_clear_error():
    m, _ = make("mlp")
    with pytest.raises(ConfigError, match="no parameter or module named 'haed'.*head"):
        mt.ANIL(m, inner_params="haed")


def test_meta_sgd_rates_receive_gradients_and_change_adaptation(fp64):
    m, batch = make("mlp")
    learner = mt.MetaSGD(m, inner_lr=0.1, inner_steps=1)
    names = [n for n, _ in m.named_parameters()]
    assert len(learner.inner_lrs) == len(names)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    for n, p in m.named_parameters():
        lr = learner.inner_lrs[n.replace(".", "__")]
        assert lr.shape == p.shape
        assert lr.grad is not None and lr.grad.abs().sum() > 0
    # the learned rates are what the inner loop uses: doubling them changes the result
    with torch.no_grad():
        for lr in learner.inner_lrs.values():
            lr.mul_(2)
    assert abs(learner.meta_loss(batch)[0].item() - loss.item()) > 1e-6


def test_maml_pp_options(fp64):
    m, batch = make("mlp")
    learner = mt.MAMLpp(m, inner_lr=0.1, inner_steps=3, msl_steps=100, second_order_start=50)
    assert {lr.shape for lr in learner.inner_lrs.values()} == {torch.Size([3])}
    w0 = msl_weights(3, 0, learner.msl_steps)
    assert w0 == pytest.approx([1 / 3] * 3)
    w_late = msl_weights(3, 99, learner.msl_steps)
    assert w_late[-1] == pytest.approx(1 - 2 * 0.01) and w_late[0] == pytest.approx(0.01)
    # after the annealing, the final step alone (MAML++ reference code)
    assert msl_weights(3, 100, learner.msl_steps) == [0.0, 0.0, 1.0]
    assert msl_weights(3, 10**6, learner.msl_steps) == [0.0, 0.0, 1.0]
    loss, _ = learner.meta_loss(batch, step=0)
    loss.backward()
    # per-step per-layer rates all get gradients; with MSL at step 0 all 3 are used
    for lr in learner.inner_lrs.values():
        assert lr.grad is not None and bool((lr.grad != 0).all())
    # derivative-order annealing: step < second_order_start is first order
    _, g_early = meta_grad(learner, batch, step=10)
    learner_fo = mt.MAMLpp(m, inner_lr=0.1, inner_steps=3, msl_steps=100, first_order=True)
    _, g_fo = meta_grad(learner_fo, batch, step=10)
    _, g_late = meta_grad(learner, batch, step=60)
    learner_fo2 = mt.MAMLpp(m, inner_lr=0.1, inner_steps=3, msl_steps=100, first_order=True)
    _, g_fo_late = meta_grad(learner_fo2, batch, step=60)
    torch.testing.assert_close(g_early, g_fo)
    assert (g_late - g_fo_late).norm() > 1e-6


def test_several_inner_steps_and_zero_steps(fp64):
    m, batch = make("mlp")
    per_step = mt.MAML(m, inner_lr=0.2).evaluate(batch, steps=5)["cross_entropy_per_step"]
    assert per_step.shape == (3, 6)
    zero = mt.MAML(m, inner_steps=0)
    loss, _ = zero.meta_loss(batch)
    plain = torch.stack([F.cross_entropy(m(batch.query_x[t]), batch.query_y[t])
                         for t in range(3)]).mean()
    torch.testing.assert_close(loss, plain)
    # support loss goes down with inner steps on a convex-ish head-only problem
    anil = mt.ANIL(m, inner_lr=0.5)
    s = anil.evaluate(mt.TaskBatch(batch.support_x, batch.support_y, batch.support_x,
                                   batch.support_y, n_way=3), steps=5)["cross_entropy_per_step"]
    assert bool((s[:, -1] < s[:, 0]).all())


def test_adapt_api_predicts_and_matches_evaluate(fp64):
    m, batch = make("transformer")
    learner = mt.MAML(m, inner_lr=0.3, inner_steps=2)
    with torch.no_grad():
        predict = learner.adapt(batch.support_x[1], batch.support_y[1])
    logits = predict(batch.query_x[1])
    assert logits.shape == (5, 3)
    ev = learner.evaluate(batch)
    torch.testing.assert_close(F.cross_entropy(logits, batch.query_y[1]), ev["cross_entropy"][1])
    # adapt did not touch the model's own parameters
    assert all(p.grad is None for p in m.parameters())


def test_maml_learns_sinusoids_quickly():
    torch.manual_seed(0)
    tasks = mt.SinusoidTasks(k_shot=10, k_query=10)
    model = mt.MLP(1, [40, 40], 1)
    learner = mt.MAML(model, inner_lr=0.01, inner_steps=1, eval_inner_steps=5)
    test = tasks.sample(200, torch.Generator().manual_seed(123))
    before = float(learner.evaluate(test)["mse"].mean())
    meta_train(learner, tasks, steps=400, meta_batch=25)
    after = float(learner.evaluate(test)["mse"].mean())
    assert after < 0.5 * before, (before, after)


# ----------------------------------------------------------------- bad input
def test_nonfinite_inner_loss_is_a_clear_error():
    m, batch = make("mlp")
    batch.support_x[1, 2, 0] = float("nan")
    for vec in (False, True):
        with pytest.raises(InnerLoopError, match="support loss of task 1 is nan at inner step 0"):
            mt.MAML(m, vectorize=vec).meta_loss(batch)


def test_exploding_inner_lr_is_caught():
    m, batch = make("mlp")
    with pytest.raises(InnerLoopError, match="lower inner_lr"):
        mt.MAML(m, inner_lr=1e30, inner_steps=3).meta_loss(batch)


def test_learner_params_include_rates_for_outer_optimiser():
    m, _ = make("mlp")
    learner = mt.MetaSGD(m)
    n_model = sum(1 for _ in m.parameters())
    assert sum(1 for _ in learner.parameters()) == 2 * n_model


def test_bad_step_counts_and_empty_adapt_are_config_errors():
    m, _ = make("mlp")
    with pytest.raises(ConfigError, match="eval_inner_steps=-1"):
        mt.MAML(m, eval_inner_steps=-1)
    with pytest.raises(ConfigError, match="inner_steps=-2"):
        mt.MAML(m, inner_steps=-2)
    with pytest.raises(ConfigError, match="inner_params=\\[\\] names no parameter"):
        mt.MAML(m, inner_params=[])


@pytest.mark.parametrize("vectorize", [False, True])
def test_frozen_parameters_are_neither_trained_nor_adapted(vectorize):
    model = tiny_net()
    model[0].weight.requires_grad_(False)
    learner = mt.MAML(model, inner_lr=0.3, inner_steps=1, vectorize=vectorize)
    b = tiny_batch()
    loss, _ = learner.meta_loss(b)
    loss.backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    # the checkpointed path and evaluation agree with it: the frozen weight stays as it is
    ck = mt.MAML(model, inner_lr=0.3, inner_steps=1, vectorize=vectorize, checkpoint=True)
    torch.testing.assert_close(ck.meta_loss(b)[0], loss)
    adapted = learner.adapt(b.support_x[0], b.support_y[0])
    torch.testing.assert_close(adapted(b.query_x[0]),
                               ck.adapt(b.support_x[0], b.support_y[0])(b.query_x[0]))


@pytest.mark.parametrize("vectorize, checkpoint", [(False, False), (True, False),
                                                   (False, True), (True, True)])
def test_batchnorm_counter_is_not_touched_by_maml(vectorize, checkpoint):
    model = tiny_net(norm=True)
    learner = mt.MAML(model, inner_lr=0.3, inner_steps=2, vectorize=vectorize,
                      checkpoint=checkpoint)
    b = tiny_batch()
    learner.meta_loss(b)[0].backward()
    learner.evaluate(b)
    learner.adapt(b.support_x[0], b.support_y[0])
    bn = model[1]
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(8, dtype=torch.float64))
