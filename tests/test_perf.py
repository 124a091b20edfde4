"""metattn.perf: the CUDA-graph meta-step (its errors here; its replay where a GPU is)."""

from __future__ import annotations

import copy

import pytest
import torch

from metattn import MAML, MLP, SinusoidTasks
from metattn.errors import ConfigError, TaskError
from metattn.perf import CUDAGraphStep


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
    torch.backends.cuda.matmul.allow_tf32 = False
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
            losses.append(float(loss))
        results.append((losses, [p.detach().clone() for p in learner.parameters()]))
    (l_eager, p_eager), (l_graph, p_graph) = results
    assert step.graph is not None
    torch.testing.assert_close(l_graph, l_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(p_graph, p_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TaskError, match="captured for"):
        step(SinusoidTasks(k_shot=3, k_query=5).sample(8, gen).to("cuda"))
