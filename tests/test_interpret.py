"""Attention capture (named per-layer maps), rollout, and the faithfulness deletion test."""

from __future__ import annotations

import logging

import pytest
import torch
from models import blob_tasks

import metattn as mt
from metattn.meta.faithfulness import deletion_test, support_deletion
from metattn.meta.metric import FEAT, MatchingNet
from metattn.nn.backbones import Conv4


def _models():
    torch.manual_seed(0)
    vit = mt.ViT(1, 3, image_size=16, patch_size=4, d_model=16, n_heads=2, n_layers=3)
    tok = mt.TokenTransformer(vocab_size=20, max_len=6, n_classes=3, d_model=16, n_heads=4,
                              n_layers=2, d_ff=32)
    icl = mt.ICLTransformer(d_x=2, d_model=16, n_layers=2, n_heads=2, max_points=8,
                            n_loops=2)
    g = torch.Generator().manual_seed(1)
    return [
        (vit, (torch.randn(5, 1, 16, 16, generator=g),), (3, 2, 16, 16)),
        (tok, (torch.randint(0, 20, (5, 6), generator=g),), (2, 4, 6, 6)),
        (icl, (torch.randn(5, 4, 2, generator=g), torch.randn(5, 4, 1, generator=g)),
         (4, 2, 8, 8)),  # 2 layers applied twice (n_loops=2)
    ]


@pytest.mark.parametrize("case", range(3))
def test_capture_keeps_outputs_and_gives_attention_maps(case, caplog):
    model, args, shape = _models()[case]
    with torch.no_grad():
        plain = model(*args)
        assert mt.nn.attention.fused_allowed(False)  # this forward runs the fused kernel
        with caplog.at_level(logging.INFO, logger="metattn.nn.interpret"):
            out, maps = mt.capture_attention(model, *args, root=model)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    assert maps.math_path and "math path" in caplog.text
    w = maps.stack()
    assert w.shape == (5, *shape)  # [batch, layers, heads, queries, keys]
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert all(n.startswith("encoder.layers.") and n.endswith(".attn") or "@" in n
               for n in maps.names)
    assert len(set(maps.names)) == len(maps.names)
    # nothing is recorded once the block is left
    with torch.no_grad():
        model(*args)
    assert len(maps) == shape[0]


def test_capture_inside_double_backward_says_no_math_switch():
    model, args, _ = _models()[0]
    with torch.no_grad(), mt.double_backward():
        _, maps = mt.capture_attention(model, *args)
    assert not maps.math_path and len(maps) == 3
    assert maps.names[0] == "MultiHeadAttention" and maps.names[1] == "MultiHeadAttention@1"


def test_cross_attention_is_captured_queries_by_keys():
    torch.manual_seed(0)
    mha = mt.MultiHeadAttention(8, 2)
    x, ctx = torch.randn(3, 4, 8), torch.randn(3, 7, 8)
    with torch.no_grad():
        plain = mha(x, ctx)
        out, maps = mt.capture_attention(mha, x, ctx)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    assert maps.stack().shape == (3, 1, 2, 4, 7)
    torch.testing.assert_close(maps.weights[0].sum(-1), torch.ones(3, 2, 4))


def test_matching_networks_attention_is_captured_as_one_head():
    torch.manual_seed(0)
    learner = MatchingNet(Conv4(1, 5, hidden=8)).eval()
    b = blob_tasks(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, maps = mt.capture_attention(learner._forward, b, root=learner)
    assert maps.names == [""]  # the learner itself is the root
    w = maps.stack()[:, 0, 0]  # [T, Q, S]
    ref = learner.attention(b.support_x[1], b.support_y[1], b.query_x[1])
    torch.testing.assert_close(w[1], ref)


def test_rollout_of_a_hand_made_two_layer_example():
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    # layer 1 has two heads whose mean is a1
    h1 = torch.stack([torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0],
                                                                            [0.0, 1.0]])])
    w = torch.stack([h1, torch.stack([a2, a2])])  # [layers 2, heads 2, 2, 2]
    # 0.5 A + 0.5 I: [[1, 0], [.25, .75]] then [[.75, .25], [0, 1]]; top layer leftmost
    expected = torch.tensor([[0.8125, 0.1875], [0.25, 0.75]])
    torch.testing.assert_close(mt.attention_rollout(w), expected)
    torch.testing.assert_close(mt.attention_rollout(w, residual=False), a2 @ a1)
    torch.testing.assert_close(mt.attention_rollout(w[None].expand(3, -1, -1, -1, -1)),
                               expected.expand(3, 2, 2))
    with pytest.raises(ValueError, match="self-attention"):
        mt.attention_rollout(torch.ones(2, 1, 2, 3) / 3)


def test_stack_refuses_maps_of_different_shapes():
    maps = mt.AttentionMaps(["a", "b"], [torch.ones(1, 2, 2) / 2, torch.ones(1, 3, 3) / 3])
    with pytest.raises(ValueError, match="select"):
        maps.stack()
    assert maps.select("b").stack().shape == (1, 1, 3, 3)


# ---------------------------------------------------------------- faithfulness
def _toy(decides: bool, n: int = 400, k: int = 6, c: int = 3):
    """Queries attending over ``k`` keys with labels; a learner that predicts the label of
    its most attended remaining key (the attention decides), or one that ignores it."""
    g = torch.Generator().manual_seed(0)
    weights = torch.softmax(3 * torch.randn(n, k, generator=g), -1)
    labels = torch.randint(0, c, (n, k), generator=g)
    other = torch.randint(0, c, (n,), generator=g)
    y = labels.gather(1, weights.argmax(-1, keepdim=True)).squeeze(1)

    def predict(drop):
        if not decides:
            return torch.nn.functional.one_hot(other, c).float()
        top = weights.masked_fill(drop, -1).argmax(-1, keepdim=True)
        return torch.nn.functional.one_hot(labels.gather(1, top).squeeze(1), c).float()

    return weights, predict, y, g


def test_deletion_separates_deciding_attention_from_idle_attention():
    res = deletion_test(*_toy(decides=True))
    top, rnd, low = (res[h]["changed"].mean().item() for h in ("top", "random", "lowest"))
    assert top > rnd + 0.3 and low == 0.0
    assert res["top"]["true_prob_drop"].mean() > res["random"]["true_prob_drop"].mean()
    idle = deletion_test(*_toy(decides=False))
    for h in ("top", "random", "lowest"):
        assert idle[h]["changed"].sum() == 0 and idle[h]["true_prob_drop"].abs().sum() == 0


@pytest.mark.parametrize("cls", [MatchingNet, FEAT])
def test_support_deletion_on_the_attention_learners(cls):
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=8)
    learner = cls(model, dim=model.feature_dim) if cls is FEAT else cls(model)
    b = blob_tasks(4, torch.Generator().manual_seed(1), k=2, q=3)
    res = support_deletion(learner, b, torch.Generator().manual_seed(0))
    assert learner.training  # its mode is given back
    for how in ("top", "random", "lowest"):
        for key in ("changed", "true_prob_drop"):
            v = res[how][key]
            assert v.shape == (4,) and bool(torch.isfinite(v).all())
        assert bool(((res[how]["changed"] >= 0) & (res[how]["changed"] <= 1)).all())
    if cls is MatchingNet:  # the top support example weighs most: removing it costs most
        assert res["top"]["true_prob_drop"].mean() >= res["lowest"]["true_prob_drop"].mean()


def test_prompt_deletion_on_in_context_regression():
    """Removing a prompt point changes an in-context prediction; removing none would not
    (the base prediction is the learner's own)."""
    from metattn.meta.faithfulness import faithfulness_table, prompt_deletion

    torch.manual_seed(0)
    learner = mt.InContextLearner(mt.ICLTransformer(d_x=1, d_model=16, n_layers=2, n_heads=2,
                                                    max_points=6))
    b = mt.SinusoidTasks(k_shot=5, k_query=4).sample(3, torch.Generator().manual_seed(1))
    res = prompt_deletion(learner, b, torch.Generator().manual_seed(0))
    for how in ("top", "random", "lowest"):
        assert res[how]["abs_change"].shape == (3,) and bool((res[how]["abs_change"] > 0).all())
        assert bool(torch.isfinite(res[how]["error_increase"]).all())
    rows = faithfulness_table(learner, [b, b], seed=0)
    assert [r["removal"] for r in rows] == ["top", "random", "lowest"]
    assert rows[0]["episodes"] == 6
