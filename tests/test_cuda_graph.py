"""metattn.recipe.cuda_graph: the CUDA-graph meta-step (its errors here; its replay where a GPU
is)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from metattn import MAML, MLP, SinusoidTasks
from metattn.errors import ConfigError, TaskError
from metattn.recipe import CUDAGraphStep


def _learner() -> MAML:
    torch.manual_seed(0)
    return MAML(MLP(1, [32, 32], 1), inner_lr=0.01, inner_steps=2)


def test_graph_step_needs_a_capturable_optimiser():
    learner = _learner()
    with pytest.raises(ConfigError, match="capturable=True"):
        CUDAGraphStep(learner, torch.optim.Adam(learner.parameters(), 1e-3))


def test_graph_step_refuses_what_a_replay_cannot_do():
    learner = _learner()
    opt = torch.optim.Adam(learner.parameters(), 1e-3, capturable=True)
    with pytest.raises(ConfigError, match="warmup >= 1"):
        CUDAGraphStep(learner, opt, warmup=0)
    for key, match in (("msl_steps", "msl_steps=5"), ("second_order_start", "outer step"),
                       ("checkpoint", "RNG state")):
        other = _learner()
        setattr(other, key, 5 if key != "checkpoint" else True)
        with pytest.raises(ConfigError, match=match):
            CUDAGraphStep(other, torch.optim.Adam(other.parameters(), 1e-3, capturable=True))


def test_graph_step_refuses_a_cpu_batch_and_trains_nothing():
    learner = _learner()
    opt = torch.optim.Adam(learner.parameters(), 1e-3, capturable=True)
    before = [p.detach().clone() for p in learner.parameters()]
    step = CUDAGraphStep(learner, opt)
    batch = SinusoidTasks(k_shot=5, k_query=5).sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="batch.to\\('cuda'\\)"):
        step(batch)
    assert step.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters(), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_step_equals_eager_steps_on_cuda():
    # 2 eager warm-up calls, the capture, then replays: every call is a true meta-step, so
    # the parameters follow the eager loop's (same kernels; TF32 off for a tight match)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _graph_equals_eager()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _graph_equals_eager():
    gen = torch.Generator().manual_seed(0)
    batches = [SinusoidTasks(k_shot=5, k_query=5).sample(8, gen).to("cuda") for _ in range(3)]
    base = _learner().cuda()
    results = []
    for graphed in (False, True):
        learner = copy.deepcopy(base)
        opt = torch.optim.Adam(learner.parameters(), 1e-3, capturable=True)
        step = CUDAGraphStep(learner, opt, warmup=2)
        losses = []
        for i in range(6):
            b = batches[i % 3]
            if graphed:
                loss, _ = step(b)
            else:
                opt.zero_grad(set_to_none=True)
                loss, _ = learner.meta_loss(b)
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
        results.append((losses, [p.detach().clone() for p in learner.parameters()]))
    (l_eager, p_eager), (l_graph, p_graph) = results
    assert step.graph is not None
    torch.testing.assert_close(l_graph, l_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(p_graph, p_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TaskError, match="captured for"):
        step(SinusoidTasks(k_shot=3, k_query=5).sample(8, gen).to("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_step_captures_chunked_classification_on_cuda():
    # vmap in chunks slices the batch inside the captured step; a classification batch's
    # label check would read the GPU there (a review found it before any GPU run did)
    from metattn import TaskBatch

    g = torch.Generator().manual_seed(0)
    T, n, k, q = 8, 3, 2, 4
    batch = TaskBatch(torch.randn(T, n * k, 6, generator=g),
                      torch.arange(n).repeat_interleave(k).repeat(T, 1),
                      torch.randn(T, n * q, 6, generator=g),
                      torch.arange(n).repeat_interleave(q).repeat(T, 1),
                      n_way=n, k_shot=k).to("cuda")
    torch.manual_seed(0)
    learner = MAML(MLP(6, [16], n), inner_lr=0.1, vectorize=True, chunk_size=2).cuda()
    opt = torch.optim.Adam(learner.parameters(), 1e-2, capturable=True)
    step = CUDAGraphStep(learner, opt, warmup=1)
    losses = [float(step(batch)[0]) for _ in range(4)]
    assert step.graph is not None
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_recipe_refuses_cuda_graph_where_it_cannot_run(tmp_path):
    from metattn.config import from_dict
    from metattn.recipe import train

    base = {"name": "g", "task": {"kind": "sinusoid", "k_shot": 5, "k_query": 5},
            "model": {"kind": "mlp", "hidden": [8]},
            "learner": {"kind": "maml", "inner_lr": 0.01},
            "train": {"steps": 2, "meta_batch": 2, "progress": False, "tensorboard": False,
                      "plots": False,
                      "cuda_graph": True, "device": "cpu"}}
    with pytest.raises(ConfigError, match="train.cuda_graph=false on the CPU"):
        train(from_dict(base), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="on the CPU.*\n.*optimizer adam or adamw"):
        train(from_dict({**base, "train": {**base["train"], "optimizer": "sgd"}}),
              tmp_path / "sgd")
    icl = {**base, "task": {"kind": "linear", "d": 4, "k_shot": 8, "k_query": 1,
                            "curriculum": {"d_start": 2, "every": 5}}}
    with pytest.raises(ConfigError, match="task.curriculum"):
        train(from_dict(icl), tmp_path / "icl")
    proto = {**base, "learner": {"kind": "protonet"}}  # checks episodes on the host
    with pytest.raises(ConfigError, match="learner.kind='protonet'"):
        train(from_dict(proto), tmp_path / "proto")
    assert not (tmp_path / "proto").exists()


def test_checkpoint_stores_a_tensor_learning_rate_as_a_number(tmp_path):
    # train.cuda_graph keeps Adam's rate as a tensor (so the schedule reaches the graph);
    # the checkpoint's JSON state holds its value, and the recipe makes it a tensor again
    from metattn import checkpoint

    learner = _learner()
    opt = torch.optim.Adam(learner.parameters(), lr=torch.tensor(0.01), foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    learner.zero_grad()
    sum(p.sum() for p in learner.parameters()).backward()
    opt.step()
    sched.step()
    checkpoint.save(tmp_path, learner, opt, {"step": 1, "scheduler": sched.state_dict()})
    tensors, state = checkpoint.load(tmp_path)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005)
    fresh = _learner()
    opt2 = torch.optim.Adam(fresh.parameters(), lr=torch.tensor(0.01), foreach=False)
    checkpoint.restore(tensors, state, fresh, opt2)
    assert float(opt2.param_groups[0]["lr"]) == pytest.approx(0.005)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recipe_with_cuda_graph_follows_the_eager_run(tmp_path):
    import json

    from metattn.config import from_dict
    from metattn.recipe import train

    def cfg(graph: bool):
        return from_dict({
            "name": "g", "seed": 1, "task": {"kind": "sinusoid", "k_shot": 5, "k_query": 5},
            "model": {"kind": "mlp", "hidden": [32, 32]},
            "learner": {"kind": "maml", "inner_lr": 0.01, "inner_steps": 2},
            "train": {"steps": 12, "meta_batch": 4, "lr": 0.003, "schedule": "cosine",
                      "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                      "checkpoint_every": 6, "progress": False, "tensorboard": False,
                      "cuda_graph": graph, "device": "cuda", "tf32": False},
            "eval": {"episodes": 20}})

    def logged(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["mse"], r["lr"]) for r in recs if r["kind"] == "train"]

    class Crash(Exception):
        pass

    def crash_at_8(step, vals):
        if step == 8:
            raise Crash

    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        train(cfg(False), tmp_path / "eager")
        train(cfg(True), tmp_path / "graph")
        # interrupted after the step-6 checkpoint, then resumed: the rate goes back into
        # the graph as a tensor, and the run continues as the uninterrupted one
        with pytest.raises(Crash):
            train(cfg(True), tmp_path / "resumed", callbacks=[crash_at_8])
        train(cfg(True), tmp_path / "resumed", resume=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    eager = logged(tmp_path / "eager")
    assert len(eager) == 12
    for run in ("graph", "resumed"):
        got = {s: (loss, lr) for s, loss, lr in logged(tmp_path / run)}
        for step, loss, lr in eager:
            assert got[step][1] == pytest.approx(lr)
            # a rate frozen at the capture would move the losses far past this
            assert got[step][0] == pytest.approx(loss, rel=1e-4, abs=1e-6), (run, step)


def test_deferred_nan_check_names_the_first_bad_step(tmp_path):
    from metattn.errors import TrainingError
    from metattn.recipe.step import check_replayed as _check_window

    ok = [torch.tensor(1.0), torch.tensor(0.5)]
    _check_window(ok, 12, tmp_path)
    _check_window([], 12, tmp_path)
    losses = [torch.tensor(1.0), torch.tensor(0.9), torch.tensor(float("nan")),
              torch.tensor(float("inf")), torch.tensor(0.7)]
    # 10 steps taken: the window holds steps 5..9 (0-based, as the eager check names them)
    with pytest.raises(TrainingError, match="at step 7 .*found at step 10"):
        _check_window(losses, 10, tmp_path)
