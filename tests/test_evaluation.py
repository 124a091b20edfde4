"""metattn.recipe.evaluation: episodes are independent, evaluation leaves the training run's
random stream alone, diverged tasks leave every metric, accuracy keeps its precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import blob_tasks
from torch import nn

import metattn.builders  # noqa: F401  (registers the built-in kinds)
from metattn.meta.metric import ProtoNet
from metattn.nn.backbones import Conv4
from metattn.registry import build


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
    assert a["cross_entropy"] == pytest.approx(b["cross_entropy"], rel=1e-6)
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
