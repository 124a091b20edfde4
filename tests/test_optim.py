"""MuonAdam: Muon on hidden matrices, Adam on the rest, as one optimiser."""

import pytest
import torch

from metattn.config import load
from metattn.errors import ConfigError
from metattn.optim import MuonAdam, WeightAverage, orthogonalize, split_for_muon


@pytest.mark.parametrize("shape", [(16, 16), (32, 8), (8, 32)])
def test_orthogonalize_keeps_the_singular_vectors_and_flattens_the_values(shape):
    gen = torch.Generator().manual_seed(0)
    r = min(shape)
    q1 = torch.linalg.qr(torch.randn(shape[0], r, generator=gen, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(shape[1], r, generator=gen, dtype=torch.float64))[0]
    g = q1 @ torch.diag(torch.logspace(0, -1.7, r, dtype=torch.float64)) @ q2.mT
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    o = orthogonalize(g)
    assert o.shape == g.shape
    # o = U S' V^T: the same singular vectors, values pulled towards 1 (about 0.7 to 1.2 for
    # the quintic iteration's coefficients), where g's spread over a wide range
    core = u.mT @ o @ vh.mT
    sv = torch.diagonal(core)
    assert torch.allclose(core, torch.diag(sv), atol=1e-6)
    assert s.max() / s.min() > 40 and bool(((sv > 0.6) & (sv < 1.25)).all()), sv


def _params(seed: int, shape: tuple[int, ...] = (16, 8)) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)),
            torch.nn.Parameter(torch.randn(8, generator=g))]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 4) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_adam_groups_follow_torch_adamw():
    ours, ref = _params(0), _params(0)
    _run(MuonAdam([], ours, lr=0.01, weight_decay=0.1), ours)
    _run(torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1), ref)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (8, 4, 3, 3)])
def test_muon_groups_follow_torch_muon(shape):
    # torch's Muon orthogonalises in bfloat16, ours in the parameter's dtype: equal to about
    # bf16's precision, while a wrong momentum, Nesterov term or rate scale is off by far more.
    # torch's Muon takes matrices only: a filter bank is compared as its [out, in * k * k] view
    ours, ref = _params(1, shape)[:1], _params(1, shape)[:1]
    ref = [torch.nn.Parameter(ref[0].detach().reshape(shape[0], -1))]
    start = ours[0].detach().clone()
    _run(MuonAdam(ours, [], lr=0.02, weight_decay=0.1), ours)
    _run(torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), ref)
    moved = (ours[0].detach() - start).reshape(shape[0], -1)
    ref_moved = ref[0].detach() - start.reshape(shape[0], -1)
    rel = (moved - ref_moved).norm() / ref_moved.norm()
    assert rel < 0.03, float(rel)


def test_split_on_the_library_models():
    """Hidden matrices and filters get Muon; input layers, heads, positions and Meta-SGD's
    learned rates keep Adam."""
    from metattn.recipe import build_learner

    def names(path: str, *sets: str) -> set[str]:  # (the learner alone: no data needed)
        learner = build_learner(load(path, list(sets)))
        by_id = {id(p): n for n, p in learner.named_parameters()}
        return {by_id[id(p)] for p in split_for_muon(learner.named_parameters())[0]}

    icl = names("configs/icl_linear_d5_cpu.yaml")
    assert len(icl) == 6 * 2 and all(".encoder.layers." in n for n in icl)  # 2 layers
    vit = names("configs/omniglot_5w1s_protonet_vit.yaml")
    assert len(vit) == 12 and not any("patch" in n or "pos" in n for n in vit)
    conv = names("configs/omniglot_5w1s_maml_gpu60s.yaml", "train.cuda_graph=false")
    assert conv == {f"model.body.{i}.weight" for i in (0, 4, 8, 12)}  # not inner_lrs.*


def test_split_keeps_input_head_and_vectors_on_adam():
    model = torch.nn.ModuleDict({"read_in": torch.nn.Linear(3, 16),
                                 "hidden": torch.nn.Linear(16, 16),
                                 "head": torch.nn.Linear(16, 1)})
    muon, adam = split_for_muon(model.named_parameters())
    assert [p.shape for p in muon] == [torch.Size([16, 16])]
    assert len(adam) == 5
    conv = torch.nn.Conv2d(4, 8, 3)
    assert [p.shape for p in split_for_muon(conv.named_parameters())[0]] == [conv.weight.shape]
    with pytest.raises(ConfigError, match="2 or more dimensions"):
        MuonAdam([model["hidden"].bias], [])


def test_state_dict_round_trip_continues_identically():
    a, b = _params(2), _params(2)
    opt_a = MuonAdam(a[:1], a[1:], lr=0.01)
    _run(opt_a, a, 2)
    opt_b = MuonAdam(b[:1], b[1:], lr=0.01)
    _run(opt_b, b, 2)
    opt_c = MuonAdam(b[:1], b[1:], lr=0.01)
    opt_c.load_state_dict(opt_b.state_dict())
    _run(opt_a, a, 2)
    _run(opt_c, b, 2)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_recipe_option_and_cuda_graph_refusal(tmp_path):
    from metattn.recipe import build, make_optimizer

    cfg = load("configs/icl_linear_d5_cpu.yaml", ["train.optimizer=muon"])
    _, _, learner = build(cfg, torch.device("cpu"))
    opt, sched = make_optimizer(cfg, learner)
    assert isinstance(opt, MuonAdam) and [g["use_muon"] for g in opt.param_groups] == [True,
                                                                                        False]
    opt.step()  # (no gradients yet: nothing moves)
    sched.step()
    assert {g["lr"] for g in opt.param_groups} == {sched.get_last_lr()[0]}
    from metattn.recipe import build_learner
    from metattn.recipe.cuda_graph import cuda_graph_blockers

    gpu = load("configs/omniglot_5w1s_maml_gpu60s.yaml", ["train.optimizer=muon"])
    why = cuda_graph_blockers(gpu, build_learner(gpu), torch.device("cuda", 0), 1)
    assert why == ["train.cuda_graph=true needs train.optimizer adam or adamw (built with "
                   "capturable=True); muon cannot be captured here"]


def test_weight_average_follows_its_formula_and_swaps_back() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    avg = WeightAverage(net, decay=0.5)
    w0 = net[0].weight.detach().clone()
    expect = w0.clone()
    for n in range(1, 4):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net(torch.randn(8, 3))  # training mode: running statistics move
        avg.update()
        d = min(0.5, (1 + n) / (10 + n))
        expect = d * expect + (1 - d) * net[0].weight.detach()
    live = net[0].weight.detach().clone()
    torch.testing.assert_close(avg.average[avg.names.index("0.weight")], expect)
    assert "1.running_mean" in avg.names and "1.num_batches_tracked" not in avg.names
    with avg.swapped():
        torch.testing.assert_close(net[0].weight.detach(), expect)
    assert torch.equal(net[0].weight.detach(), live)  # training continues from the live ones
    # a checkpoint round trip, and a fresh average from other weights takes it over
    state = avg.state()
    other = WeightAverage(net, decay=0.5)
    assert other.load(state) and other.updates == 3
    torch.testing.assert_close(other.average[0], avg.average[0])
    assert not other.load({})
    with pytest.raises(ConfigError, match="train.ema=1.0"):
        WeightAverage(net, decay=1.0)
