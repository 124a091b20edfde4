"""ProtoNet, Matching Networks and FEAT: exact maths on tiny examples and short training runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import blob_tasks
from torch import nn

import metattn.builders  # noqa: F401  (registers the built-in kinds)
from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError
from metattn.meta.metric import FEAT, MatchingNet, ProtoNet, SetToSet
from metattn.nn.backbones import Conv4
from metattn.registry import build


def vec_task() -> TaskBatch:
    """One 2-way task on 2-d points, support in mixed order with unequal shots."""
    sx = torch.tensor([[[0.0, 0.0], [4.0, 2.0], [2.0, 0.0], [4.0, 4.0], [4.0, 0.0]]])
    sy = torch.tensor([[0, 1, 0, 1, 1]])  # class 0 mean (1, 0); class 1 mean (4, 2)
    qx = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [0.0, 5.0]]])
    qy = torch.tensor([[0, 1, 0]])
    return TaskBatch(sx, sy, qx, qy, n_way=2, k_shot=None)


# ---------------------------------------------------------------- ProtoNet
def test_protonet_logits_are_negative_squared_distances() -> None:
    b = vec_task()
    learner = ProtoNet(nn.Identity())
    logits = learner.adapt(b.support_x[0], b.support_y[0])(b.query_x[0])
    # hand computed: -||q - mean||^2 with means (1, 0) and (4, 2)
    expected = -torch.tensor([[0 + 1, 9 + 1], [4 + 9, 1 + 1], [1 + 25, 16 + 9]],
                             dtype=torch.float32)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(ProtoNet(nn.Identity(), scale=0.5).adapt(
        b.support_x[0], b.support_y[0])(b.query_x[0]), 0.5 * expected)
    out = learner.evaluate(b)
    torch.testing.assert_close(out["accuracy"], torch.tensor([2 / 3]))
    torch.testing.assert_close(out["cross_entropy"], F.cross_entropy(expected, b.query_y[0])[None])


def test_test_shift_averages_the_embeddings_of_every_shifted_view() -> None:
    # identity encoder: a one-pixel image's averaged "embedding" is the 3x3 box around the
    # pixel, each cell 1/9 (each shift by -1..1 per axis puts the pixel in one cell); at the
    # corner the views that move it out of the frame lose it (blank border)
    learner = ProtoNet(nn.Flatten(), test_shift=1).eval()
    x = torch.zeros(2, 1, 8, 9)
    x[0, 0, 4, 5] = 1.0
    x[1, 0, 0, 0] = 1.0
    z = learner.encode_views(x).view(2, 8, 9)
    box = torch.zeros(2, 8, 9)
    box[0, 3:6, 4:7] = 1 / 9
    box[1, 0:2, 0:2] = 1 / 9
    torch.testing.assert_close(z, box)
    # training embeds once, and test_shift=0 is the plain encoder
    learner.train()
    torch.testing.assert_close(learner.encode_views(x), x.flatten(1))
    torch.testing.assert_close(ProtoNet(nn.Flatten()).eval().encode_views(x), x.flatten(1))
    # float64 stays float64 (bf16 under autocast becomes float32)
    learner.eval()
    assert learner.encode_views(x.double()).dtype == torch.float64
    assert learner.encode_views(x.bfloat16()).dtype == torch.float32


def test_test_shift_reaches_evaluation_and_checks_its_input() -> None:
    g = torch.Generator().manual_seed(0)
    batch = blob_tasks(2, g)
    model = Conv4(hidden=8, track_running_stats=True)
    plain, tta = ProtoNet(model, scale=0.1).eval(), ProtoNet(model, scale=0.1, test_shift=2)
    tta.eval()
    a, b = plain.evaluate(batch)["cross_entropy"], tta.evaluate(batch)["cross_entropy"]
    assert not torch.allclose(a, b)
    # the same as evaluating on the hand-averaged embeddings
    views = [torch.roll(F.pad(x, (2, 2, 2, 2)), (dy, dx), (-2, -1))[..., 2:30, 2:30]
             for x in [torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)]
             for dy in range(-2, 3) for dx in range(-2, 3)]
    with torch.no_grad():
        z = torch.stack([plain.encode(v) for v in views]).mean(0).view(2, 30, -1)
        logits = plain.logits(z[:, :5], batch.support_y, z[:, 5:], 5)
    expect = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(),
                             reduction="none").view(2, -1).mean(1)
    torch.testing.assert_close(b, expect)
    with pytest.raises(TaskError, match="test_shift=1"):
        ProtoNet(nn.Flatten(), test_shift=1).eval().encode_views(torch.zeros(3, 10))
    with pytest.raises(ConfigError, match="test_shift=5"):
        ProtoNet(nn.Flatten(), test_shift=5)
    learner = build("learner", {"kind": "matching", "test_shift": 1}, nn.Flatten())
    assert learner.test_shift == 1


def test_protonet_nca_loss_matches_a_per_example_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 7, 3, generator=g)
    y = torch.tensor([[0, 1, 2, 0, 1, 2, 0], [1, 1, 0, 0, 2, 2, 2]])
    learner = ProtoNet(nn.Identity(), scale=0.7, train_loss="nca")
    terms = []
    for t in range(2):
        for i in range(7):
            others = [j for j in range(7) if j != i]
            p = torch.softmax(torch.stack([-0.7 * (z[t, i] - z[t, j]).pow(2).sum()
                                           for j in others]), 0)
            terms.append(-torch.log(sum(p[n] for n, j in enumerate(others)
                                        if y[t, j] == y[t, i])))
    torch.testing.assert_close(learner.nca_loss(z, y), torch.stack(terms).mean())
    # through meta_loss: support and query pooled; metrics still report prototype accuracy
    b = vec_task()
    loss, metrics = ProtoNet(nn.Identity(), train_loss="nca").meta_loss(b)
    zz = torch.cat([b.support_x, b.query_x], 1)
    yy = torch.cat([b.support_y, b.query_y], 1)
    torch.testing.assert_close(loss, ProtoNet(nn.Identity(), train_loss="nca").nca_loss(zz, yy))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor(2 / 3))


def test_protonet_nca_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="train_loss='ncaa'"):
        ProtoNet(nn.Identity(), train_loss="ncaa")
    lonely = TaskBatch(torch.randn(1, 2, 2), torch.tensor([[0, 1]]), torch.randn(1, 1, 2),
                       torch.tensor([[0]]), n_way=2, k_shot=1)
    with pytest.raises(TaskError, match="k_shot \\+ k_query >= 2"):
        ProtoNet(nn.Identity(), train_loss="nca").meta_loss(lonely)
    with pytest.raises(ConfigError, match="without loss_fn"):
        ProtoNet(nn.Identity(), train_loss="nca").meta_loss(lonely, loss_fn=F.cross_entropy)


def test_missing_support_class_is_a_task_error() -> None:
    b = vec_task()
    b.n_way = 3
    with pytest.raises(TaskError, match="no support example of class 2"):
        ProtoNet(nn.Identity()).evaluate(b)
    with pytest.raises(TaskError, match="class 2"):
        MatchingNet(nn.Identity()).evaluate(b)


class CountingEncoder(nn.Module):
    """Conv4 features, counting how many forward calls it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Conv4(1, 5, 8, 28)
        self.calls = 0
        self.feature_dim = self.net.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net.features(x)


@pytest.mark.parametrize("kind", ["protonet", "matching", "feat"])
def test_contract_and_one_encoder_pass_per_batch(kind: str) -> None:
    torch.manual_seed(0)
    enc = CountingEncoder()
    learner = build("learner", {"kind": kind}, enc)
    b = blob_tasks(6, torch.Generator().manual_seed(0))
    loss, metrics = learner.meta_loss(b)
    # Conv4's BatchNorm uses batch statistics: one pass per task (support and query together)
    assert enc.calls == 6
    assert loss.dim() == 0 and loss.requires_grad
    assert {"cross_entropy", "accuracy"} <= set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    out = learner.evaluate(b)
    assert out["cross_entropy"].shape == (6,) and out["accuracy"].shape == (6,)
    assert enc.calls == 12
    # adapt on one task gives that task's logits (a batch of one matches evaluate)
    one = b.task(2)
    logits = learner.adapt(one.support_x[0], one.support_y[0])(one.query_x[0])
    assert logits.shape == (25, 5)
    acc = (logits.argmax(-1) == one.query_y[0]).float().mean()
    torch.testing.assert_close(acc, learner.evaluate(one)["accuracy"][0])


def test_builders_reject_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="temprature"):
        build("learner", {"kind": "feat", "temprature": 2.0}, Conv4(hidden=8))
    with pytest.raises(ConfigError, match="dim"):
        MatchingNet(nn.Identity(), fce=True)


# ---------------------------------------------------------------- Matching Networks
def test_matching_attention_rows_sum_to_one_and_match_cosine_softmax() -> None:
    b = vec_task()
    learner = MatchingNet(nn.Identity(), temperature=3.0, learn_temperature=False)
    a = learner.attention(b.support_x[0], b.support_y[0], b.query_x[0])
    assert a.shape == (3, 5) and (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3))
    cos = F.normalize(b.query_x[0], dim=-1) @ F.normalize(b.support_x[0], dim=-1).T
    torch.testing.assert_close(a, torch.softmax(3.0 * cos, -1))
    # predicted distribution = attention summed per class; logits are its log
    p = a @ F.one_hot(b.support_y[0], 2).float()
    logits = learner.adapt(b.support_x[0], b.support_y[0])(b.query_x[0])
    torch.testing.assert_close(logits.exp(), p)


def test_matching_fce_attention_rows_sum_to_one() -> None:
    torch.manual_seed(0)
    learner = MatchingNet(nn.Identity(), fce=True, dim=2)
    b = vec_task()
    a = learner.attention(b.support_x[0], b.support_y[0], b.query_x[0])
    torch.testing.assert_close(a.sum(-1), torch.ones(3))
    plain = MatchingNet(nn.Identity()).attention(b.support_x[0], b.support_y[0],
                                                 b.query_x[0])
    assert not torch.allclose(a, plain)  # the context embeddings change the attention
    # the attention LSTM's read steps matter (fce_steps is not ignored)
    torch.manual_seed(0)
    one = MatchingNet(nn.Identity(), fce=True, dim=2, fce_steps=1)
    one.load_state_dict(learner.state_dict())
    assert not torch.allclose(one.attention(b.support_x[0], b.support_y[0], b.query_x[0]), a)


def _lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """The LSTM equations written out (PyTorch's gate order: input, forget, cell, output)."""
    i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_matching_fce_matches_the_equations_by_hand() -> None:
    """Full-context embeddings against the paper's appendix written out one support example
    and one query at a time: g(x_i) = g'(x_i) + forward + backward LSTM states, and the
    attention LSTM's K read steps for f."""
    torch.manual_seed(0)
    D, T, S, Q, K = 3, 2, 4, 3, 3
    learner = MatchingNet(nn.Identity(), fce=True, dim=D, fce_steps=K).double()
    zs, zq = torch.randn(T, S, D, dtype=torch.float64), torch.randn(T, Q, D, dtype=torch.float64)
    g_lib, f_lib = learner.context(zs, zq)
    L, C = learner.g_lstm, learner.f_cell
    fwd = (L.weight_ih_l0, L.weight_hh_l0, L.bias_ih_l0, L.bias_hh_l0)
    bwd = (L.weight_ih_l0_reverse, L.weight_hh_l0_reverse, L.bias_ih_l0_reverse,
           L.bias_hh_l0_reverse)
    for t in range(T):
        states_f, states_b = [], [None] * S
        h = c = torch.zeros(D, dtype=torch.float64)
        for i in range(S):
            h, c = _lstm_cell(zs[t, i], h, c, *fwd)
            states_f.append(h)
        h = c = torch.zeros(D, dtype=torch.float64)
        for i in reversed(range(S)):
            h, c = _lstm_cell(zs[t, i], h, c, *bwd)
            states_b[i] = h
        g = torch.stack([zs[t, i] + states_f[i] + states_b[i] for i in range(S)])
        torch.testing.assert_close(g_lib[t], g, rtol=1e-12, atol=1e-12)
        for j in range(Q):
            fx = zq[t, j]
            h, c = fx, torch.zeros(D, dtype=torch.float64)
            for _ in range(K):
                r = torch.softmax(g @ h, 0) @ g  # read from the support set with h_{k-1}
                h_hat, c = _lstm_cell(torch.cat([fx, r]), h, c, C.weight_ih, C.weight_hh,
                                      C.bias_ih, C.bias_hh)
                h = h_hat + fx
            torch.testing.assert_close(f_lib[t, j], h, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- FEAT
def test_feat_regulariser_contributes() -> None:
    torch.manual_seed(0)
    b = blob_tasks(3, torch.Generator().manual_seed(0), q=3)
    base = FEAT(Conv4(hidden=8), balance=0.0, dropout=0.0, attn_dropout=0.0)
    reg = FEAT(Conv4(hidden=8), balance=0.5, dropout=0.0, attn_dropout=0.0)
    reg.load_state_dict(base.state_dict())
    l0, m0 = base.meta_loss(b)
    l1, m1 = reg.meta_loss(b)
    assert "reg_loss" not in m0 and float(m1["reg_loss"]) > 0
    torch.testing.assert_close(m0["cross_entropy"], m1["cross_entropy"])  # same query loss
    assert float((l1 - l0).detach()) > 1e-4
    zs, zq = reg.embed(b.support_x, b.query_x)
    r = reg.regularizer(b, zs, zq)
    torch.testing.assert_close(l1 - l0, 0.5 * r)
    # reference, one task and one class at a time as in the official code: all support and
    # query instances of a class go through the set function as their own set; the raw
    # instance embeddings are classified against the adapted class centres
    with torch.no_grad():
        x, y = torch.cat([zs, zq], 1), torch.cat([b.support_y, b.query_y], 1)
        terms = []
        for t in range(3):
            centres = torch.stack([reg.set_fn(x[t][y[t] == c][None])[0].mean(0)
                                   for c in range(5)])
            logits = -((x[t][:, None] - centres[None]) ** 2).sum(-1) / reg.temperature2
            terms.append(F.cross_entropy(logits, y[t], reduction="sum"))
        torch.testing.assert_close(r, torch.stack(terms).sum() / y.numel())
    # the regulariser trains the set-to-set function through the class-wise pass too
    g0 = torch.autograd.grad(l0, base.set_fn.attn.q_proj.weight, allow_unused=True)[0]
    g1 = torch.autograd.grad(l1, reg.set_fn.attn.q_proj.weight)[0]
    assert g0 is None or not torch.allclose(g0, g1)
    # evaluation has no regulariser: identical per-task losses
    torch.testing.assert_close(base.evaluate(b)["cross_entropy"], reg.evaluate(b)["cross_entropy"])


def test_feat_regulariser_sets_are_class_wise() -> None:
    """Instances attend only within their class: changing class 1 leaves class 0 alone."""
    torch.manual_seed(0)
    f = SetToSet(4, dropout=0.0, attn_dropout=0.0).eval()
    x = torch.randn(1, 6, 4)
    y = torch.tensor([[0, 1, 0, 1, 0, 1]])
    mask = y.unsqueeze(-1) == y.unsqueeze(-2)
    x2 = x.clone()
    x2[:, 1::2] += 3.0
    out, out2 = f(x, mask=mask), f(x2, mask=mask)
    torch.testing.assert_close(out[:, 0::2], out2[:, 0::2])
    assert not torch.allclose(f(x)[:, 0::2], f(x2)[:, 0::2])  # without the mask they mix


# ---------------------------------------------------------------- training improves
@pytest.mark.parametrize(
    "name, make",
    [
        ("protonet", lambda m: ProtoNet(m)),
        ("protonet_nca", lambda m: ProtoNet(m, scale=0.05, train_loss="nca")),
        ("matching", lambda m: MatchingNet(m)),
        ("matching_fce", lambda m: MatchingNet(m, fce=True, fce_steps=2)),
        ("feat", lambda m: FEAT(m, balance=0.1)),
    ],
)
def test_short_training_improves_held_out_accuracy(name: str, make) -> None:
    torch.manual_seed(0)
    learner = make(Conv4(1, 5, hidden=16, image_size=28))
    held_out = blob_tasks(30, torch.Generator().manual_seed(123))
    learner.eval()
    before = float(learner.evaluate(held_out)["accuracy"].mean())
    learner.train()
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(15):
        loss, _ = learner.meta_loss(blob_tasks(4, g), step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learner.eval()
    after = float(learner.evaluate(held_out)["accuracy"].mean())
    assert after > before + 0.3 and after > 0.8, (name, before, after)


def test_metric_head_runs_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    learner = ProtoNet(nn.Linear(8, 16))
    batch = TaskBatch(torch.randn(1, 5, 8), torch.arange(5).view(1, 5), torch.randn(1, 10, 8),
                      torch.arange(5).repeat(2).view(1, 10), n_way=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs, zq = learner.embed(batch.support_x, batch.query_x)
        logits = learner.logits(zs, batch.support_y, zq, 5)
    assert zs.dtype == zq.dtype == logits.dtype == torch.float32
