"""In-context learners: function-class samplers, non-learned baselines, the ICL Transformer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metattn.data.functions import DecisionTreeTasks, LinearTasks, ReLUNetTasks
from metattn.data.synthetic import SinusoidTasks
from metattn.data.tasks import TaskBatch
from metattn.errors import ConfigError, TaskError
from metattn.meta.baselines import (
    BASELINES,
    averaging,
    error_vs_k,
    lasso,
    least_squares,
    nearest_neighbours,
    ridge,
)
from metattn.meta.incontext import Curriculum, InContextLearner
from metattn.nn.incontext import ICLTransformer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small batched kernels are far slower with 2 OpenMP threads on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SAMPLERS = [
    LinearTasks(d=6, k_shot=9, k_query=3),
    LinearTasks(d=6, k_shot=9, k_query=3, sparsity=2, noise_std=0.1),
    ReLUNetTasks(d=6, hidden=20, k_shot=9, k_query=3),
    DecisionTreeTasks(d=6, depth=4, k_shot=9, k_query=3),
]


# ------------------------------------------------------------------ samplers
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: type(s).__name__)
def test_sampler_shapes_seed_and_function(sampler):
    b = sampler.sample(5, gen(0))
    assert b.support_x.shape == (5, 9, 6) and b.support_y.shape == (5, 9, 1)
    assert b.query_x.shape == (5, 3, 6) and b.query_y.shape == (5, 3, 1)
    assert all(v.shape[0] == 5 for v in b.info.values())
    again = sampler.sample(5, gen(0))
    other = sampler.sample(5, gen(1))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(b, name), getattr(again, name))
        assert not torch.allclose(getattr(b, name), getattr(other, name))
    # y is the function stored in info, on support and query alike
    x = torch.cat([b.support_x, b.query_x], 1)
    y = torch.cat([b.support_y, b.query_y], 1)
    noise = sampler.noise_std
    err = (sampler.function(x, b.info) - y).abs().max()
    assert err < 1e-5 if noise == 0 else 1e-3 < err < 10 * noise
    # varying k
    assert sampler.sample(2, gen(0), k_shot=4).support_x.shape == (2, 4, 6)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: type(s).__name__)
def test_d_active_zeroes_inactive_coordinates(sampler):
    b = sampler.sample(50, gen(0), d_active=2)
    x = torch.cat([b.support_x, b.query_x], 1)
    assert (x[..., 2:] == 0).all() and (x[..., :2] != 0).all()
    assert (b.info["d_active"] == 2).all()
    if "w" in b.info:
        assert (b.info["w"][:, 2:] == 0).all()
    if "split_coord" in b.info:
        assert int(b.info["split_coord"].max()) < 2


def test_sparse_linear_has_s_nonzero_weights():
    b = LinearTasks(d=10, k_shot=5, sparsity=3).sample(200, gen(0))
    assert ((b.info["w"] != 0).sum(1) == 3).all()
    # the support of w is spread over the coordinates, not always the first s
    assert ((b.info["w"] != 0).sum(0) > 0).all()
    dense = LinearTasks(d=10, k_shot=5).sample(200, gen(0))
    assert ((dense.info["w"] != 0).sum(1) == 10).all()


def test_relu_net_and_tree_match_reference_implementations():
    b = ReLUNetTasks(d=4, hidden=7, k_shot=5).sample(3, gen(0))
    for t in range(3):
        x = b.support_x[t]
        ref = math.sqrt(2 / 7) * torch.relu(x @ b.info["W1"][t]) @ b.info["W2"][t]
        torch.testing.assert_close(b.support_y[t, :, 0], ref)

    tree = DecisionTreeTasks(d=5, depth=4, k_shot=20)
    b = tree.sample(4, gen(1))
    for t in range(4):
        coord, leaves = b.info["split_coord"][t].tolist(), b.info["leaf_value"][t]
        for i in range(20):
            x, node = b.support_x[t, i].tolist(), 0
            while node < len(coord):  # heap-ordered internal nodes
                node = 2 * node + (2 if x[coord[node]] > 0 else 1)
            assert float(b.support_y[t, i, 0]) == float(leaves[node - len(coord)])
    # 16 leaves, different points reach different leaves
    assert len(torch.unique(b.support_y[0])) > 3


def test_sampler_rejects_bad_options():
    with pytest.raises(TaskError, match="d_active"):
        LinearTasks(d=5, d_active=6)
    with pytest.raises(TaskError, match="sparsity"):
        LinearTasks(d=5, sparsity=0)


# ------------------------------------------------------------------ baselines
def test_least_squares_is_exact_for_noiseless_k_at_least_d():
    curve = error_vs_k(least_squares, LinearTasks(d=8), ks=[8, 12, 20], n_prompts=1000, seed=0)
    assert max(curve.mean) < 1e-8
    # and the direct call recovers held-out points of each task
    b = LinearTasks(d=8, k_shot=10, k_query=5).sample(100, gen(3))
    pred = least_squares(b.support_x, b.support_y, b.query_x)
    assert (pred - b.query_y).abs().max() < 1e-4


def test_least_squares_error_is_one_minus_k_over_d_below_d():
    d, ks = 10, [0, 2, 5, 8]
    curve = error_vs_k(least_squares, LinearTasks(d=d), ks=ks, n_prompts=2000, seed=1)
    for k, m, ci in zip(curve.ks, curve.mean, curve.ci95, strict=True):
        assert abs(m - (1 - k / d)) < 2 * ci, (k, m, ci)
    again = error_vs_k(least_squares, LinearTasks(d=d), ks=ks, n_prompts=2000, seed=1)
    assert again.mean == curve.mean  # a fixed seeded prompt set
    other = error_vs_k(least_squares, LinearTasks(d=d), ks=ks, n_prompts=2000, seed=2)
    assert other.mean != curve.mean
    assert set(curve.as_dict()) == set(ks)


def test_other_baselines():
    b = LinearTasks(d=5, k_shot=12, k_query=4).sample(20, gen(0))
    sx, sy, qx = b.support_x, b.support_y, b.query_x
    for f in BASELINES.values():
        assert f(sx, sy, qx).shape == (20, 4, 1)
        assert (f(sx[:, :0], sy[:, :0], qx) == 0).all()  # no context: the prior mean
    # ridge -> least squares as lam -> 0; more shrinkage as lam grows
    torch.testing.assert_close(ridge(sx, sy, qx, lam=1e-9), least_squares(sx, sy, qx))
    assert ridge(sx, sy, qx, lam=1e3).abs().mean() < 0.2 * least_squares(sx, sy, qx).abs().mean()
    # averaging: x . mean_i(y_i x_i)
    w = (sx * sy).mean(1)  # [T, d]
    torch.testing.assert_close(averaging(sx, sy, qx)[..., 0], (qx * w[:, None]).sum(-1))
    # 3-NN by brute force
    nn3 = nearest_neighbours(sx, sy, qx)
    for t in range(3):
        for q in range(4):
            idx = (sx[t] - qx[t, q]).norm(dim=-1).argsort()[:3]
            torch.testing.assert_close(nn3[t, q, 0], sy[t, idx, 0].mean())
    # Lasso beats least squares on sparse weights with fewer examples than dimensions
    sparse = LinearTasks(d=10, sparsity=2)
    las = error_vs_k(lasso, sparse, ks=[6], n_prompts=1000, seed=0).mean[0]
    ls = error_vs_k(least_squares, sparse, ks=[6], n_prompts=1000, seed=0).mean[0]
    assert las < 0.5 * ls
    # Lasso's FISTA solution satisfies the optimality condition |grad| <= alpha off-support
    alpha = 0.05
    bl = LinearTasks(d=6, k_shot=20, k_query=6).sample(10, gen(5))
    eye = torch.eye(6).expand(10, 6, 6)
    w_hat = lasso(bl.support_x, bl.support_y, eye, alpha=alpha, iters=3000).double()
    x, y = bl.support_x.double(), bl.support_y.double()
    grad = x.transpose(1, 2) @ (x @ w_hat - y) / 20
    assert grad.abs().max() < alpha + 1e-3


# ------------------------------------------------------------------ ICL Transformer
def tiny(d: int = 3, max_points: int = 12, seed: int = 0, n_loops: int = 1) -> ICLTransformer:
    torch.manual_seed(seed)
    return ICLTransformer(d, d_model=32, n_layers=2, n_heads=4, max_points=max_points,
                          n_loops=n_loops)


@pytest.mark.parametrize("n_loops", [1, 3])
def test_causal_mask_blocks_later_tokens(n_loops):
    model = tiny(n_loops=n_loops).eval()
    g = gen(0)
    xs, ys = torch.randn(2, 8, 3, generator=g), torch.randn(2, 8, 1, generator=g)
    base = model(xs, ys)
    assert base.shape == (2, 8, 1)
    j = 4
    ys2 = ys.clone()
    ys2[:, j] += 3.0
    out = model(xs, ys2)
    # prediction i sees y_1..y_{i-1}: changing y_j leaves predictions 0..j untouched ...
    torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
    # ... and changes every later one
    assert ((out[:, j + 1 :] - base[:, j + 1 :]).abs() > 1e-4).all()
    xs2 = xs.clone()
    xs2[:, j] += 3.0
    out = model(xs2, ys)
    torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
    assert ((out[:, j:] - base[:, j:]).abs() > 1e-4).all()


@pytest.mark.parametrize("n_loops", [1, 3])
def test_queries_are_independent_and_match_one_prompt_each(n_loops):
    model = tiny(n_loops=n_loops).eval()
    b = LinearTasks(d=3, k_shot=5, k_query=4).sample(3, gen(1))
    pred = model.predict(b.support_x, b.support_y, b.query_x)
    assert pred.shape == (3, 4, 1)
    for j in range(4):
        xs = torch.cat([b.support_x, b.query_x[:, j : j + 1]], 1)
        ys = torch.cat([b.support_y, b.query_y[:, j : j + 1]], 1)
        torch.testing.assert_close(pred[:, j], model(xs, ys)[:, -1], rtol=0, atol=1e-5)
    qx = b.query_x.clone()
    qx[:, 1:] += 5.0  # other queries change: query 0's prediction must not
    moved = model.predict(b.support_x, b.support_y, qx)
    torch.testing.assert_close(moved[:, 0], pred[:, 0], rtol=0, atol=1e-6)
    assert ((moved[:, 1:] - pred[:, 1:]).abs() > 1e-4).all()
    # adapt = the same predictions for one task; evaluate = their per-task MSE
    learner = InContextLearner(model)
    torch.testing.assert_close(learner.adapt(b.support_x[0], b.support_y[0])(b.query_x[0]),
                               pred[0])
    torch.testing.assert_close(learner.evaluate(b)["mse"],
                               (pred - b.query_y).pow(2).mean((1, 2)))


def test_looped_model_repeats_its_layers_with_the_prompt_added_back():
    model = tiny(n_loops=3).eval()
    plain = tiny(n_loops=1).eval()  # the same weights (same seed), applied once
    xs, ys = torch.randn(2, 5, 3, generator=gen(2)), torch.randn(2, 5, 1, generator=gen(3))
    e = model.read_in(model.tokens(xs, ys)) + model.pos[:10]
    h = e
    for i in range(3):
        h = h + e if i else h
        for layer in model.encoder.layers:
            h = layer(h, is_causal=True)
    want = model.head(model.encoder.ln_f(h)[:, 0::2])
    torch.testing.assert_close(model(xs, ys), want)
    assert (model(xs, ys) - plain(xs, ys)).abs().max() > 1e-3
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in plain.parameters())
    with pytest.raises(ConfigError, match="n_loops"):
        ICLTransformer(3, n_loops=0)


def test_attention_rows_over_context_sum_to_one():
    learner = InContextLearner(tiny())
    b = LinearTasks(d=3, k_shot=5, k_query=4).sample(2, gen(2))
    att = learner.query_attention(b.support_x, b.support_y, b.query_x)
    assert att.weights.shape == (2, 2, 4, 4, 11)  # [T, layers, heads, Q, 2k + 1]
    assert att.per_example.shape == (2, 2, 4, 4, 5)
    torch.testing.assert_close(att.weights.sum(-1), torch.ones(2, 2, 4, 4))
    torch.testing.assert_close(att.per_example.sum(-1) + att.weights[..., -1],
                               torch.ones(2, 2, 4, 4))
    assert (att.weights >= 0).all() and (att.weights[..., :-1] > 0).any()


def test_training_lowers_in_context_error_on_held_out_prompts():
    d = 3
    learner = InContextLearner(tiny(d, max_points=2 * d + 1))
    train = LinearTasks(d=d, k_shot=2 * d, k_query=1)
    held_out = train.sample(1000, gen(123))
    before = learner.evaluate(held_out)["mse"].mean().item() / d
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    g = gen(1)
    for step in range(300):
        loss, metrics = learner.meta_loss(train.sample(64, g), step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(metrics) == {"mse_queries", "mse_all_positions"}
    after = learner.evaluate(held_out)["mse"].mean().item() / d
    assert before > 0.9  # untrained: about the zero predictor's error of 1
    assert after < before - 0.12, (before, after)


def test_learner_on_sinusoids_and_errors():
    model = ICLTransformer(1, d_model=16, n_layers=1, n_heads=2, max_points=20)
    learner = InContextLearner(model)
    b = SinusoidTasks(k_shot=5, k_query=5).sample(4, gen(0))
    loss, metrics = learner.meta_loss(b)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert learner.evaluate(b)["mse"].shape == (4,)
    assert learner.adapt(b.support_x[0], b.support_y[0])(b.query_x[0]).shape == (5, 1)
    with pytest.raises(TaskError, match="d_x=3"):
        learner.evaluate(LinearTasks(d=3, k_shot=2).sample(2, gen(0)))
    with pytest.raises(TaskError, match="max_points"):
        learner.evaluate(SinusoidTasks(k_shot=20, k_query=1).sample(2, gen(0)))
    # error_vs_k takes the learner's batched predictor, k = 0 included
    curve = error_vs_k(learner.predict, SinusoidTasks(), ks=[0, 3], n_prompts=50, seed=0)
    assert all(math.isfinite(m) for m in curve.mean)


def test_curriculum_schedule():
    cur = Curriculum(every=100)
    assert cur(0) == (5, 11) and cur(99) == (5, 11) and cur(100) == (6, 13)
    assert cur(10**6) == (20, 41)
    s = cur.apply(LinearTasks(d=20), 250)
    assert (s.d_active, s.k_shot, s.k_query) == (7, 14, 1)
    b = s.sample(3, gen(0))
    assert b.support_x.shape == (3, 14, 20) and (b.support_x[..., 7:] == 0).all()


def test_builders_are_registered():
    import metattn.builders  # noqa: F401
    from metattn.registry import build

    task = build("task", {"kind": "linear", "d": 4, "k_shot": 8, "sparsity": 2}, "train")
    assert isinstance(task, LinearTasks) and task.sparsity == 2
    assert isinstance(build("task", {"kind": "relu_net", "d": 4}, "test"), ReLUNetTasks)
    assert isinstance(build("task", {"kind": "decision_tree", "depth": 3}, "test"),
                      DecisionTreeTasks)
    model = build("model", {"kind": "icl_transformer", "d_x": 4, "d_model": 16, "n_layers": 1,
                            "n_heads": 2, "max_points": 9})
    learner = build("learner", {"kind": "incontext", "loss_on": "query"}, model)
    assert isinstance(learner, InContextLearner) and learner.loss_on == "query"
    loss, _ = learner.meta_loss(task.sample(2, gen(0)))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ curriculum in the recipe
def test_curriculum_sampler_follows_the_step_and_the_test_sampler_does_not():
    from metattn.data.functions import CurriculumTasks
    from metattn.registry import build

    spec = {"kind": "linear", "d": 8, "k_shot": 14, "k_query": 1,
            "curriculum": {"d_start": 2, "d_inc": 2, "points_start": 5, "points_inc": 3,
                           "every": 10}}
    train = build("task", spec, "train")
    test = build("task", spec, "test")
    assert isinstance(train, CurriculumTasks) and isinstance(test, LinearTasks)
    # d_end and points_end default to the task's d and k_shot + k_query
    assert (train.curriculum.d_end, train.curriculum.points_end) == (8, 15)
    seen = []
    for step in (0, 9, 10, 25, 10**6):
        train.set_step(step)
        b = train.sample(4, gen(step))
        n = b.support_x.shape[1] + b.query_x.shape[1]
        active = int((torch.cat([b.support_x, b.query_x], 1).abs().sum((0, 1)) > 0).sum())
        assert (train.d_active, train.n_points) == (active, n)
        assert b.query_x.shape[1] == 1 and (b.info["w"][:, active:] == 0).all()
        seen.append((active, n))
    assert seen == [(2, 5), (2, 5), (4, 8), (6, 11), (8, 15)]
    assert train.d == 8 and train.k_query == 1  # the wrapped sampler's attributes
    # the test sampler: full d and prompt length, whatever the step
    b = test.sample(4, gen(0))
    assert b.support_x.shape == (4, 14, 8) and (b.support_x != 0).all()
    assert not hasattr(test, "set_step")


def test_curriculum_config_errors():
    from metattn.registry import build

    base = {"kind": "linear", "d": 5, "k_shot": 10}
    with pytest.raises(ConfigError, match="did you mean 'every'"):
        build("task", {**base, "curriculum": {"evry": 10}}, "train")
    with pytest.raises(ConfigError, match="exceeds the task's d=5"):
        build("task", {**base, "curriculum": {"d_end": 6}}, "train")
    with pytest.raises(ConfigError, match="prompt length"):
        build("task", {**base, "curriculum": {"points_end": 20}}, "train")
    with pytest.raises(ConfigError,
                       match="curriculum: got .*expected a mapping of strings to integers"):
        build("task", {**base, "curriculum": {"every": 1.5}}, "train")
    with pytest.raises(ConfigError, match="curriculum"):
        build("task", {**base, "curriculum": 3}, "train")
    # small tasks: the paper's d_start = 5 / points_start = 11 are clipped to the task
    cur = build("task", {"kind": "linear", "d": 3, "k_shot": 4, "curriculum": {}}, "train")
    assert (cur.curriculum.d_start, cur.curriculum.points_start) == (3, 5)


def test_evaluate_reports_the_error_vs_k_curve():
    learner = InContextLearner(tiny(3, max_points=8))
    b = LinearTasks(d=3, k_shot=6, k_query=4).sample(5, gen(0))
    out = learner.evaluate(b)
    assert out["error_vs_k"].shape == (5, 7)
    # column k = error of predicting point k+1 of support + first query from the first k
    curve = error_vs_k(learner.predict, LinearTasks(d=3, k_shot=6, k_query=1), ks=range(7),
                       n_prompts=5, seed=0)
    again = LinearTasks(d=3, k_shot=6, k_query=1).sample(5, gen(0))
    col = learner.evaluate(again)["error_vs_k"].mean(0)
    torch.testing.assert_close(col.double(), torch.tensor(curve.mean, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    # the last column is the first query's error, as in ``loss`` (per query, / d)
    pred = learner.predict(b.support_x, b.support_y, b.query_x[:, :1])
    torch.testing.assert_close(out["error_vs_k"][:, -1],
                               (pred - b.query_y[:, :1]).pow(2)[:, 0, 0] / 3)


def test_maml_predict_fn_matches_per_task_adaptation():
    from metattn.meta.baselines import adapted_predict_fn, maml_predict_fn
    from metattn.meta.maml import MAML
    from metattn.nn.backbones import MLP

    torch.manual_seed(0)
    maml = MAML(MLP(4, [16], 1), inner_lr=0.05, eval_inner_steps=3)
    b = LinearTasks(d=4, k_shot=6, k_query=2).sample(3, gen(0))
    fast = maml_predict_fn(maml)(b.support_x, b.support_y, b.query_x)
    slow = adapted_predict_fn(maml)(b.support_x, b.support_y, b.query_x)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    init = maml_predict_fn(maml)(b.support_x[:, :0], b.support_y[:, :0], b.query_x)
    torch.testing.assert_close(init, maml.model(b.query_x))
    # the learner's own loss drives the batched adaptation too
    l1 = MAML(MLP(4, [16], 1), inner_lr=0.05, eval_inner_steps=3,
              loss_fn=torch.nn.functional.l1_loss)
    torch.testing.assert_close(maml_predict_fn(l1)(b.support_x, b.support_y, b.query_x),
                               adapted_predict_fn(l1)(b.support_x, b.support_y, b.query_x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", [
    LinearTasks(d=12, k_shot=4),
    LinearTasks(d=12, k_shot=4, sparsity=3),
    ReLUNetTasks(d=12, k_shot=4),
    DecisionTreeTasks(d=12, k_shot=4),
    # fewer active coordinates (a curriculum stage) and sparsity above them
    LinearTasks(d=12, k_shot=4, d_active=5),
    LinearTasks(d=12, k_shot=4, sparsity=30),
    LinearTasks(d=12, k_shot=4, sparsity=3, d_active=2),
    ReLUNetTasks(d=12, k_shot=4, d_active=4),
])
def test_zero_predictor_scores_about_one_on_every_family(sampler):
    """Garg et al.'s normalisation: squared error / d (dense), / s (sparse), / 1 (trees)."""
    def zero(sx, sy, qx):
        return torch.zeros(*qx.shape[:2], 1)

    curve = error_vs_k(zero, sampler, [0, 2], n_prompts=4000, seed=1)
    for m, c in zip(curve.mean, curve.ci95, strict=True):
        assert abs(m - 1) < 3 * c + 0.05, (m, c)
    # the in-context learner's own curve uses the same scale
    model = ICLTransformer(d_x=12, d_model=16, n_layers=1, n_heads=2, max_points=8)
    b = sampler.sample(3, gen(0))
    err = InContextLearner(model).evaluate(b)["error_vs_k"]
    xs = torch.cat([b.support_x, b.query_x[:, :1]], 1)
    ys = torch.cat([b.support_y, b.query_y[:, :1]], 1)
    with torch.no_grad():
        raw = (model(xs, ys) - ys).pow(2).flatten(2).sum(-1)
    torch.testing.assert_close(err, raw / sampler.error_scale)


def test_recipe_trains_an_icl_config_with_curriculum_and_writes_the_curve(tmp_path):
    import json

    from metattn.config import from_dict
    from metattn.recipe import build as build_run
    from metattn.recipe import train

    cfg = from_dict({
        "name": "tiny_icl", "seed": 1,
        "task": {"kind": "linear", "d": 3, "k_shot": 6, "k_query": 1,
                 "curriculum": {"d_start": 1, "points_start": 3, "every": 5}},
        "model": {"kind": "icl_transformer", "d_x": 3, "d_model": 16, "n_layers": 1,
                  "n_heads": 2, "max_points": 7},
        "learner": {"kind": "incontext"},
        "train": {"steps": 30, "meta_batch": 8, "lr": 3e-3, "schedule": "cosine",
                  "warmup_steps": 5, "log_every": 5, "eval_every": 15, "eval_episodes": 20,
                  "checkpoint_every": 15, "progress": False, "tensorboard": False,
                  "plots": False},
        "eval": {"episodes": 60, "chunk": 30},
    })
    train_tasks, test_tasks, _ = build_run(cfg, torch.device("cpu"))
    assert hasattr(train_tasks, "set_step") and not hasattr(test_tasks, "set_step")
    summary = train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["steps"] == 30 and saved["episodes"] == 60
    curve = saved["results"]["error_vs_k"]
    assert len(curve) == 7 and len(saved["results"]["error_vs_k_ci95"]) == 7
    assert all(math.isfinite(v) for v in curve)
    assert summary["results"]["error_vs_k"] == curve


@pytest.mark.parametrize("layout", ["disjoint", "paired"])
def test_token_layouts_with_x_and_y_apart(layout):
    torch.manual_seed(0)
    model = ICLTransformer(3, d_model=32, n_layers=2, n_heads=4, max_points=8,
                           token_layout=layout).eval()
    b = LinearTasks(d=3, k_shot=5, k_query=2).sample(2, gen(4))
    tok = model.tokens(b.support_x, b.support_y)
    assert tok.shape == (2, 10, 4)  # d_x + d_y wide
    assert torch.equal(tok[:, 0::2, :3], b.support_x) and (tok[:, 0::2, 3] == 0).all()
    assert torch.equal(tok[:, 1::2, 3:], b.support_y)
    if layout == "paired":  # the y token carries its x
        assert torch.equal(tok[:, 1::2, :3], b.support_x)
    else:
        assert (tok[:, 1::2, :3] == 0).all()
    pred = model.predict(b.support_x, b.support_y, b.query_x)
    for j in range(2):  # a query sees the context as the last point of a prompt would
        xs = torch.cat([b.support_x, b.query_x[:, j : j + 1]], 1)
        ys = torch.cat([b.support_y, b.query_y[:, j : j + 1]], 1)
        torch.testing.assert_close(pred[:, j], model(xs, ys)[:, -1], rtol=0, atol=1e-5)


def test_token_layout_errors_and_the_shared_layout():
    with pytest.raises(ConfigError, match="token_layout"):
        ICLTransformer(3, token_layout="mixed")
    # the Garg et al. layout: y in the first coordinate of a d_x-wide token
    b = LinearTasks(d=3, k_shot=5, k_query=2).sample(2, gen(4))
    shared = tiny(3).tokens(b.support_x, b.support_y)
    assert shared.shape == (2, 10, 3) and torch.equal(shared[:, 1::2, :1], b.support_y)


def test_demo_trains_both_learners_and_prints_one_table(tmp_path, capsys):
    from metattn import demo

    quick = ["train.progress=false", "train.tensorboard=false", "train.eval_every=0",
             "eval.episodes=20"]
    assert demo.main(["--out", str(tmp_path), "--set", "train.steps=5",
                      *[a for q in quick for a in ("--set", q)],
                      "--icl-set", "train.steps=5",
                      *[a for q in quick for a in ("--icl-set", q)]]) == 0
    out = capsys.readouterr().out
    assert "in-context: forward pass" in out and "MAML: after 10 steps" in out
    assert "oracle" not in out and "next:" in out
    for k in (5, 10, 20):
        assert f"K={k}" in out
    for name in ("maml_vs_icl.png", "maml/summary.json", "icl/summary.json", "results.md"):
        assert (tmp_path / name).is_file(), name
    # the table holds each run's own summary: the same test tasks
    table = json.loads((tmp_path / "results.json").read_text())["rows"]
    maml = json.loads((tmp_path / "maml" / "summary.json").read_text())
    icl = json.loads((tmp_path / "icl" / "summary.json").read_text())
    assert table["10"][1][0] == pytest.approx(maml["mean"], rel=1e-12)  # K=10, 10 steps
    assert table["20"][2][0] == pytest.approx(icl["mean"], rel=1e-12)  # K=20, forward pass
    assert "| 10 | " in (tmp_path / "results.md").read_text()


def test_shape_errors_give_the_right_fix():
    model = ICLTransformer(d_x=5, d_model=16, n_layers=1, n_heads=2, max_points=8)
    learner = InContextLearner(model)
    g = gen(0)
    bad_rank = TaskBatch(torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, generator=g),
                         torch.randn(2, 1, 5, generator=g), torch.randn(2, 1, generator=g))
    with pytest.raises(TaskError, match="unsqueeze"):
        learner.meta_loss(bad_rank)
    bad_width = TaskBatch(torch.randn(2, 7, 3, generator=g), torch.randn(2, 7, 1, generator=g),
                          torch.randn(2, 1, 3, generator=g), torch.randn(2, 1, 1, generator=g))
    with pytest.raises(TaskError, match="d_x=3"):
        learner.meta_loss(bad_width)


def test_benchmark_scales_the_curriculum_with_the_steps():
    import importlib.util
    from pathlib import Path

    from metattn.config import load

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_icl", root / "benchmarks" / "icl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load(root / "configs" / "icl_linear_d20.yaml")
    short = bench.with_steps(cfg, cfg.train.steps // 100)
    every = cfg.task["curriculum"]["every"]
    assert short.task["curriculum"]["every"] == max(1, round(every / 100))
    assert cfg.task["curriculum"]["every"] == every  # the original is untouched


def test_sinusoid_table_evaluates_without_dropout():
    from metattn.reports import sinusoid_mse_vs_shots

    torch.manual_seed(0)
    learner = InContextLearner(ICLTransformer(d_x=1, d_model=16, n_layers=1, n_heads=2,
                                              max_points=12, dropout=0.3))
    assert learner.training
    a = sinusoid_mse_vs_shots(learner, shots=(5,), steps=(1,), episodes=8, k_query=5)
    b = sinusoid_mse_vs_shots(learner, shots=(5,), steps=(1,), episodes=8, k_query=5)
    assert a == b
    assert learner.training  # put back


def test_sinusoid_table_uses_the_given_test_tasks():
    from metattn.reports import sinusoid_mse_vs_shots

    torch.manual_seed(0)
    learner = InContextLearner(ICLTransformer(d_x=1, d_model=16, n_layers=1, n_heads=2,
                                              max_points=12))
    clean = sinusoid_mse_vs_shots(learner, shots=(5,), steps=(1,), episodes=50, k_query=20)
    noisy = sinusoid_mse_vs_shots(learner, shots=(5,), steps=(1,), episodes=50, k_query=20,
                                  tasks=SinusoidTasks(noise_std=2.0))
    assert noisy[5][1][0] > clean[5][1][0] + 2.0  # + noise variance 4, within sampling error


def test_predictors_take_prompts_on_another_device_or_dtype():
    # Prompts are drawn on the CPU in float32 while a trained learner may sit on a GPU (a run
    # on an H100 crashed here); a float64 learner stands in for "another place": the
    # predictors move the prompts to the learner and the prediction back to the prompt's.
    from metattn.meta.baselines import maml_predict_fn
    from metattn.meta.maml import MAML
    from metattn.nn.backbones import MLP

    torch.manual_seed(0)
    icl = InContextLearner(ICLTransformer(4, d_model=16, n_layers=1, n_heads=2,
                                          max_points=8)).double()
    maml = MAML(MLP(4, [16], 1), inner_lr=0.05, eval_inner_steps=2).double()
    b = LinearTasks(d=4, k_shot=6, k_query=1).sample(3, gen(0))
    ints = [t.round().long() for t in (b.support_x, b.support_y, b.query_x)]
    for fn in (icl.predict, maml_predict_fn(maml)):
        out = fn(b.support_x, b.support_y, b.query_x)
        assert out.dtype == torch.float32 and out.shape == (3, 1, 1)
        # integer prompts are read as numbers, and the prediction stays floating
        from_ints = fn(*ints)
        assert from_ints.is_floating_point()
        torch.testing.assert_close(from_ints.float(), fn(*(t.float() for t in ints)))
        curve = error_vs_k(fn, LinearTasks(d=4), ks=[0, 2, 4], n_prompts=20, seed=0)
        assert all(math.isfinite(m) for m in curve.mean)
