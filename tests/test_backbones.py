"""metattn.nn.backbones: Conv-4 (channels-last, the folded first block, the CPU max-pool)
is the textbook function, to second order."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import blob_tasks
from torch import nn

import metattn.builders  # noqa: F401  (registers the built-in kinds)
from metattn.data.tasks import TaskBatch
from metattn.meta.metric import ProtoNet
from metattn.nn.backbones import Conv4, MaxPool2x2
from metattn.registry import build


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


def test_conv4_rejects_images_too_small_for_four_pools() -> None:
    with pytest.raises(ValueError, match="image_size=10"):
        Conv4(1, 5, hidden=8, image_size=10)
    assert Conv4(1, 5, hidden=8, image_size=16)(torch.rand(2, 1, 16, 16)).shape == (2, 5)
