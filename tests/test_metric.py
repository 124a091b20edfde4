"""ProtoNet, Matching Networks and FEAT: exact maths on tiny examples and short training runs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metattn.builders  # noqa: F401  (registers the built-in kinds)
from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError
from metattn.meta.metric import FEAT, MatchingNet, ProtoNet, SetToSet
from metattn.nn.backbones import Conv4, MaxPool2x2
from metattn.registry import build


def blob_tasks(T: int, g: torch.Generator, n: int = 5, k: int = 1, q: int = 5,
               noise: float = 1.5) -> TaskBatch:
    """Synthetic image episodes: each class is a smooth random 28x28 pattern (a 4x4 Gaussian
    grid upsampled) and each example adds white noise; classes are new in every task, so
    a learner must learn a metric that ignores the noise."""
    low = torch.randn(T * n, 1, 4, 4, generator=g)
    proto = F.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)
    x = proto.view(T, n, 1, 1, 28, 28) + noise * torch.randn(T, n, k + q, 1, 28, 28,
                                                             generator=g)
    y = torch.arange(n).view(1, n, 1)
    return TaskBatch(
        support_x=x[:, :, :k].flatten(1, 2), support_y=y.expand(T, n, k).reshape(T, -1),
        query_x=x[:, :, k:].flatten(1, 2), query_y=y.expand(T, n, q).reshape(T, -1),
        n_way=n, k_shot=k,
    )


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
    torch.testing.assert_close(out["loss"], F.cross_entropy(expected, b.query_y[0])[None])


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
    a, b = plain.evaluate(batch)["loss"], tta.evaluate(batch)["loss"]
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
    assert {"loss", "accuracy"} <= set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    out = learner.evaluate(b)
    assert out["loss"].shape == (6,) and out["accuracy"].shape == (6,)
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
    torch.testing.assert_close(m0["loss"], m1["loss"])  # same query loss
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
    torch.testing.assert_close(base.evaluate(b)["loss"], reg.evaluate(b)["loss"])


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


def test_conv4_channels_last_same_numbers_and_gradients() -> None:
    torch.manual_seed(0)
    a = Conv4(1, 5, hidden=8, image_size=28)
    b = Conv4(1, 5, hidden=8, image_size=28, channels_last=True)
    b.load_state_dict(a.state_dict())
    assert b.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 28, 28)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        # (conv biases feed BatchNorm, so their true gradient is 0: compare on the scale of all)
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4, msg=n)
    # a ProtoNet step trains it like the default layout
    learner = ProtoNet(b)
    batch = TaskBatch(torch.rand(1, 5, 1, 28, 28), torch.arange(5).view(1, 5),
                      torch.rand(1, 10, 1, 28, 28), torch.arange(5).repeat(2).view(1, 10),
                      n_way=5)
    loss, _ = learner.meta_loss(batch)
    assert torch.isfinite(loss)


def test_conv4_pool_before_relu_is_the_textbook_block_exactly() -> None:
    """Conv4 max-pools before its ReLU (cheaper); values and gradients equal the paper's order."""
    torch.manual_seed(0)
    ours = Conv4(1, 5, hidden=8, image_size=28, fold_first_norm=False).double()
    blocks: list[nn.Module] = []
    for c in (1, 8, 8, 8):
        blocks += [nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
    textbook = nn.Sequential(*blocks).double()
    textbook.load_state_dict({k.removeprefix("body."): v for k, v in ours.state_dict().items()
                              if k.startswith("body.")})
    assert [type(m) for m in ours.body[:4]] == [nn.Conv2d, nn.BatchNorm2d, MaxPool2x2, nn.ReLU]
    x = torch.randn(7, 1, 28, 28, dtype=torch.float64)
    fa, fb = ours.features(x), textbook(x).flatten(1)
    assert torch.equal(fa, fb)
    w = torch.randn_like(fa)
    ga = torch.autograd.grad((fa * w).sum(), list(ours.body.parameters()))
    gb = torch.autograd.grad((fb * w).sum(), list(textbook.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_channels,conv_bias,affine,channels_last,size", [
    (1, True, True, False, 28), (1, False, True, False, 21), (1, True, False, True, 16)])
def test_conv4_folded_first_block_equals_the_modules(
        in_channels: int, conv_bias: bool, affine: bool, channels_last: bool, size: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fold_first_norm: the first conv + batch-statistics BatchNorm as one matmul with folded
    weights gives the textbook modules' values, gradients (parameters and input) and
    gradients of gradients (MAML's inner step is differentiated again), in float64."""
    from metattn.nn import backbones

    calls = []
    folded = backbones._conv_bn_folded
    monkeypatch.setattr(backbones, "_conv_bn_folded",
                        lambda *a: calls.append(a[0].shape) or folded(*a))
    torch.manual_seed(0)
    ours = Conv4(in_channels, 5, hidden=6, image_size=size,
                 channels_last=channels_last).double()
    first = ours.body[0]
    if not conv_bias:
        first.bias = None
    if not affine:
        ours.body[1] = nn.BatchNorm2d(6, affine=False, track_running_stats=False).double()
    with torch.no_grad():  # a non-trivial BatchNorm affine and conv bias
        for p in ours.body[:2].parameters():
            p.add_(torch.randn_like(p))
    ref = copy.deepcopy(ours)
    ref.fold_first_norm = False
    x = torch.rand(5, in_channels, size, size, dtype=torch.float64, requires_grad=True)
    ya, yb = ours(x), ref(x)
    assert calls == [x.shape]  # the folded path ran, once, for ours only
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ya)
    ga = torch.autograd.grad((ya * w).sum(), [x, *ours.parameters()], create_graph=True)
    gb = torch.autograd.grad((yb * w).sum(), [x, *ref.parameters()], create_graph=True)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    va = [torch.randn_like(g) for g in ga]
    ha = torch.autograd.grad(sum((g * v).sum() for g, v in zip(ga, va)),
                             [x, *ours.parameters()], allow_unused=True)
    hb = torch.autograd.grad(sum((g * v).sum() for g, v in zip(gb, va)),
                             [x, *ref.parameters()], allow_unused=True)
    for a, b in zip(ha, hb, strict=True):
        if a is None or b is None:  # (a conv bias before BatchNorm has zero curvature)
            assert (a if b is None else b) is None or (a if b is None else b).abs().max() < 1e-9
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    assert ha[0].abs().max() > 1e-3  # the second-order term is not trivially zero


def test_conv4_folded_first_block_only_where_it_is_the_same_function(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold needs a BatchNorm on batch statistics that updates nothing, no hooks, no
    autocast and no torch.func transform; otherwise the modules run (running statistics kept
    and updated as usual)."""
    from metattn.nn import backbones

    calls = []
    folded = backbones._conv_bn_folded
    monkeypatch.setattr(backbones, "_conv_bn_folded",
                        lambda *a: calls.append(1) or folded(*a))
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    running = Conv4(1, 5, hidden=4, image_size=28, track_running_stats=True)
    running(x)
    assert not calls and int(running.body[1].num_batches_tracked) == 1
    net = Conv4(1, 5, hidden=4, image_size=28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    torch.func.vmap(net)(x.unsqueeze(1))
    handle = net.body[1].register_forward_hook(lambda *a: calls.append("hook"))
    net(x)
    assert calls == ["hook"]  # the hooked module ran, not the fold
    handle.remove()
    net(x)
    assert calls == ["hook", 1]
    # RGB (27 taps: measured slower folded), an empty batch, one value per channel
    rgb = Conv4(3, 5, hidden=4, image_size=28)
    assert rgb(torch.rand(2, 3, 28, 28)).shape == (2, 5)
    assert net(x[:0]).shape == (0, 5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(torch.rand(1, 1, 1, 1))
    assert calls == ["hook", 1]
    # an int padding (F.conv2d takes one) folds too, to the same numbers
    net.body[0].padding = 1
    ref = copy.deepcopy(net)
    ref.fold_first_norm = False
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls == ["hook", 1, 1]


@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 3, 7, 7), (2, 5, 6, 9)])
def test_cpu_max_pool_equals_torch_to_second_order(shape: tuple[int, ...],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """MaxPool2x2's NHWC CPU path: nn.MaxPool2d's values, gradients and gradients of
    gradients (MAML differentiates the inner step's gradient), odd sizes included."""
    from metattn.nn import backbones

    calls = []
    fast = backbones._NHWCMaxPool2x2.apply
    monkeypatch.setattr(backbones._NHWCMaxPool2x2, "apply",
                        lambda x: calls.append(x.shape) or fast(x))
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref = nn.MaxPool2d(2)
    ya, yb = MaxPool2x2()(x), ref(x)
    assert calls == [x.shape]  # the fast path ran
    assert torch.equal(ya, yb)
    # first order, then second order: d/dw <d<y, w>/dx, v> runs the pooling's double backward
    w = torch.randn_like(ya, requires_grad=True)
    v = torch.randn_like(x)
    (ga,) = torch.autograd.grad((ya * w).sum(), x, create_graph=True)
    (gb,) = torch.autograd.grad((yb * w).sum(), x, create_graph=True)
    assert torch.equal(ga, gb)
    (ha,) = torch.autograd.grad((ga * v).sum(), w)
    (hb,) = torch.autograd.grad((gb * v).sum(), w)
    assert ha.abs().sum() > 0 and torch.equal(ha, hb)
    assert torch.autograd.gradgradcheck(backbones._NHWCMaxPool2x2.apply, (x[:1, :2],))
    # ties (a constant region: the same winner as torch's kernel) and bf16 (autocast's dtype)
    for t in (torch.zeros(*shape, dtype=torch.float64), x.detach().to(torch.bfloat16)):
        t = t.requires_grad_()
        (gt,) = torch.autograd.grad(MaxPool2x2()(t).sum(), t)
        (gr,) = torch.autograd.grad(ref(t).sum(), t)
        assert torch.equal(MaxPool2x2()(t), ref(t)) and torch.equal(gt, gr)


@pytest.mark.parametrize("fold", [False, True])
def test_conv4_maml_meta_gradient_with_the_cpu_pool_equals_torch_pool(
        fold: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Second-order MAML (the per-task loop path, where the fast pool and the folded first
    block run) over Conv4: the meta-gradient equals that of the textbook net (nn.MaxPool2d,
    the conv and BatchNorm modules), in float64."""
    from metattn.meta.maml import MAML
    from metattn.nn import backbones

    calls = []
    folded = backbones._conv_bn_folded
    monkeypatch.setattr(backbones, "_conv_bn_folded",
                        lambda *a: calls.append(1) or folded(*a))
    torch.manual_seed(0)
    ours = Conv4(1, 3, hidden=4, image_size=28, fold_first_norm=fold).double()
    ref = Conv4(1, 3, hidden=4, image_size=28, fold_first_norm=False).double()
    ref.load_state_dict(ours.state_dict())
    for i in (2, 6, 10, 14):
        ref.body[i] = nn.MaxPool2d(2)
    batch = TaskBatch(torch.rand(2, 3, 1, 28, 28), torch.arange(3).repeat(2, 1),
                      torch.rand(2, 6, 1, 28, 28), torch.arange(3).repeat(2, 2),
                      n_way=3).to("cpu", torch.float64)
    grads = []
    for net in (ours, ref):
        learner = MAML(net, inner_lr=0.4, inner_steps=2, first_order=False, vectorize=False)
        loss, _ = learner.meta_loss(batch)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    # 2 tasks x (2 inner steps + the query pass), and never for the textbook reference
    assert len(calls) == (6 if fold else 0)
    tol = 1e-10 if fold else 1e-12  # the fold sums in another order
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert grads[0][0].abs().max() > 1e-4


def test_cpu_max_pool_falls_back_inside_vmap() -> None:
    """Inside torch.func transforms (MAML's vmap path) the pool is nn.MaxPool2d's."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 8, 8)
    out = torch.func.vmap(MaxPool2x2())(x)
    assert torch.equal(out, F.max_pool2d(x.flatten(0, 1), 2).view(4, 3, 2, 4, 4))


def test_conv4_without_the_last_pool_keeps_the_3x3_map() -> None:
    """pool_last=False: 576 features for 28x28 (64 x 3 x 3), the same parameter names, and
    pooling its map gives the standard Conv4's features exactly."""
    torch.manual_seed(0)
    full = Conv4(1, 5, hidden=64, image_size=28)
    wide = Conv4(1, 5, hidden=64, image_size=28, pool_last=False)
    assert wide.feature_dim == 576 and full.feature_dim == 64
    assert list(wide.state_dict()) == list(full.state_dict())
    wide.load_state_dict({k: v for k, v in full.state_dict().items() if "head" not in k},
                         strict=False)
    x = torch.randn(6, 1, 28, 28)
    f = wide.features(x)
    assert f.shape == (6, 576) and wide(x).shape == (6, 5)
    pooled = torch.nn.functional.max_pool2d(f.view(6, 64, 3, 3), 2).flatten(1)
    assert torch.equal(pooled, full.features(x))


def test_conv4_running_statistics_at_evaluation() -> None:
    """track_running_stats: training episodes update running averages, evaluation uses them
    (an image's embedding no longer depends on its episode); the default keeps batch stats."""
    torch.manual_seed(0)
    learner = build("learner", {"kind": "protonet"},
                    build("model", {"kind": "conv4", "hidden": 8, "track_running_stats": True}))
    bn = learner.model.body[1]
    g = torch.Generator().manual_seed(0)
    loss, _ = learner.meta_loss(blob_tasks(2, g))
    assert int(bn.num_batches_tracked) == 2  # one pass per task (batch statistics in training)
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    learner.eval()
    assert not learner.batch_statistics()
    x = blob_tasks(1, g).query_x[0]
    with torch.no_grad():
        alone = learner.model.features(x[:3])
        mixed = learner.model.features(x)[:3]
    torch.testing.assert_close(alone, mixed, rtol=1e-5, atol=1e-5)
    plain = Conv4(1, 5, hidden=8).eval()
    assert all(not m.track_running_stats for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        assert not torch.allclose(plain.features(x[:3]), plain.features(x)[:3], atol=1e-3)


@pytest.mark.parametrize("kind", ["protonet", "matching", "feat"])
def test_episode_does_not_see_other_episodes_of_its_batch(kind):
    """With Conv4 (BatchNorm on batch statistics), an episode's logits are the same whether it
    is evaluated alone or in a chunk with other episodes: tasks are normalised on their own."""
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=8)
    kw = {"dim": model.feature_dim} if kind == "feat" else {}
    learner = build("learner", {"kind": kind, **kw}, model).eval()
    assert learner.batch_statistics()
    b = blob_tasks(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        together, _, _ = learner._forward(b)
        alone = torch.cat([learner._forward(b.slice(t, t + 1))[0] for t in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # an encoder without batch statistics takes ONE flattened pass for all tasks
    calls = []
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 8))
    mlp.register_forward_hook(lambda *a: calls.append(1))
    flat = ProtoNet(mlp)
    assert not flat.batch_statistics()
    flat.meta_loss(b)
    assert len(calls) == 1


def test_recipe_evaluation_turns_dropout_off_and_keeps_the_rng():
    """FEAT has dropout in its set-to-set layer: the recipe's evaluation must run it in eval
    mode (same numbers every time, whatever the random state), leave the training RNG stream
    where it was, and restore the learner's mode."""
    from metattn.recipe import evaluate

    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=8)
    learner = build("learner", {"kind": "feat", "dim": model.feature_dim}, model)
    episodes = [blob_tasks(4, torch.Generator().manual_seed(s)) for s in (1, 2)]
    learner.train()
    torch.manual_seed(1)
    a = evaluate(learner, episodes, torch.device("cpu"), torch.float32)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    assert torch.equal(after, torch.get_rng_state())  # evaluation drew nothing from it
    torch.manual_seed(2)
    b = evaluate(learner, episodes[::-1], torch.device("cpu"), torch.float32)
    assert learner.training
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["accuracy"] == pytest.approx(b["accuracy"])


def test_diverged_tasks_leave_every_metric():
    """A task with a non-finite loss is counted as diverged in every metric, not averaged in
    (its NaN logits would otherwise score 1/n_way accuracy)."""
    from metattn.meta.base import Learner
    from metattn.recipe import evaluate

    class Fixed(Learner):
        def meta_loss(self, batch, loss_fn=None, step=None):
            raise NotImplementedError

        def evaluate(self, batch, loss_fn=None):
            return {"loss": torch.tensor([0.1, float("nan"), 0.3, 0.2]),
                    "accuracy": torch.tensor([1.0, 0.2, 1.0, 1.0]),
                    # per-step curve: task 1 is still finite before it diverges
                    "loss_per_step": torch.tensor([[1.0, 0.1], [9.0, float("nan")],
                                                   [1.0, 0.3], [1.0, 0.2]])}

    res = evaluate(Fixed(), [blob_tasks(4, torch.Generator().manual_seed(0))],
                   torch.device("cpu"), torch.float32)
    assert res["accuracy"] == pytest.approx(1.0)
    assert res["accuracy_diverged"] == 1 and res["loss_diverged"] == 1
    assert res["loss"] == pytest.approx(0.2)
    # the curve is over the same tasks as the loss, at every step
    assert res["loss_per_step"] == pytest.approx([1.0, 0.2])
    assert res["loss_per_step_diverged"] == [1, 1]


def test_accuracy_is_not_rounded_to_low_precision() -> None:
    from metattn.meta.base import accuracy

    y = torch.arange(300) % 60
    logits = F.one_hot(y, 60).to(torch.bfloat16)
    logits[0] = F.one_hot(torch.tensor(1), 60)  # one wrong of 300
    acc = accuracy(logits.unsqueeze(0), y.unsqueeze(0))
    assert acc.dtype == torch.float32
    assert abs(float(acc) - 299 / 300) < 1e-6
    assert accuracy(logits.double(), y).dtype == torch.float64


def test_metric_head_runs_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    learner = ProtoNet(nn.Linear(8, 16))
    batch = TaskBatch(torch.randn(1, 5, 8), torch.arange(5).view(1, 5), torch.randn(1, 10, 8),
                      torch.arange(5).repeat(2).view(1, 10), n_way=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs, zq = learner.embed(batch.support_x, batch.query_x)
        logits = learner.logits(zs, batch.support_y, zq, 5)
    assert zs.dtype == zq.dtype == logits.dtype == torch.float32


def test_conv4_rejects_images_too_small_for_four_pools() -> None:
    with pytest.raises(ValueError, match="image_size=10"):
        Conv4(1, 5, hidden=8, image_size=10)
    assert Conv4(1, 5, hidden=8, image_size=16)(torch.rand(2, 1, 16, 16)).shape == (2, 5)
