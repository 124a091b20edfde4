"""Attention equals softmax(QK^T/sqrt(d_k))V, masks work, and it is twice differentiable."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import make

import metattn as mt
from metattn.nn import attention as A


def reference(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("fused", [True, False])
def test_matches_reference_with_and_without_masks(fused, fp64):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    causal = torch.ones(5, 7, dtype=torch.bool).tril()  # top-left aligned, as PyTorch
    ctx = A.double_backward() if not fused else torch.enable_grad()
    with ctx:
        assert A.fused_allowed(False) == fused
        for m in (None, mask):
            out, _ = A.scaled_dot_product_attention(q, k, v, mask=m)
            torch.testing.assert_close(out, reference(q, k, v, m))
        out, _ = A.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, reference(q, k, v, causal))
    out, w = A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)
    torch.testing.assert_close(out, reference(q, k, v, mask))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    assert bool((w[..., ~mask] == 0).all())


def test_scale_is_float_sqrt_of_dk(fp64):
    """The classic bug computes an integer sqrt of d_k; d_k = 8 -> 2.828..., not 2 or 3."""
    q = torch.ones(1, 1, 8)
    k = torch.stack([torch.zeros(8), torch.ones(8)]).unsqueeze(0)
    v = torch.tensor([[[0.0], [1.0]]])
    _, w = A.scaled_dot_product_attention(q, k, v, need_weights=True)
    expected = torch.softmax(torch.tensor([0.0, 8 / math.sqrt(8)]), 0)
    torch.testing.assert_close(w[0, 0], expected)


def test_gradgradcheck_attention_module(fp64):
    mha = mt.MultiHeadAttention(8, 2)
    x = torch.randn(2, 4, 8, requires_grad=True)
    with A.double_backward():
        assert torch.autograd.gradcheck(lambda t: mha(t), (x,))
        assert torch.autograd.gradgradcheck(lambda t: mha(t), (x,))
        assert torch.autograd.gradgradcheck(lambda t: mha(t, is_causal=True), (x,))


def test_multihead_equals_per_head_reference(fp64):
    mha = mt.MultiHeadAttention(8, 2)
    x = torch.randn(3, 5, 8)
    out, w = mha(x, need_weights=True)
    q, k, v = mha.q_proj(x), mha.k_proj(x), mha.v_proj(x)
    heads = [reference(q[..., h * 4:(h + 1) * 4], k[..., h * 4:(h + 1) * 4],
                       v[..., h * 4:(h + 1) * 4]) for h in range(2)]
    torch.testing.assert_close(out, mha.out_proj(torch.cat(heads, -1)))
    assert w.shape == (3, 2, 5, 5)
    torch.testing.assert_close(mha(x), out)  # fused path agrees with the math path


def test_fused_kernel_is_what_fails_double_backward_and_maml_avoids_it(fp64):
    """Why the rule exists: the fused CPU kernel has no double backward on this torch."""
    m = mt.TokenTransformer(vocab_size=10, max_len=4, n_classes=2, d_model=8, n_heads=2,
                            n_layers=1, d_ff=16).double()
    x = torch.randint(0, 10, (6, 4))
    y = torch.randint(0, 2, (6,))
    loss = F.cross_entropy(m(x), y)  # fused path
    g = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum(gi.pow(2).sum() for gi in g), list(m.parameters()))
    # metattn's second-order MAML switches to the math path on its own
    batch = mt.TaskBatch(x.view(2, 3, 4), y.view(2, 3), x.view(2, 3, 4), y.view(2, 3), n_way=2)
    mt.MAML(m, inner_lr=0.1, vectorize=False).meta_loss(batch)[0].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_torch_multiheadattention_in_a_user_model_gets_second_order_maml(fp64):
    class UserModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    m = UserModel().double()
    batch = mt.TaskBatch(torch.randn(2, 4, 5, 8), torch.randint(0, 3, (2, 4)),
                         torch.randn(2, 3, 5, 8), torch.randint(0, 3, (2, 3)), n_way=3)
    loss, _ = mt.MAML(m, inner_lr=0.1, vectorize=False).meta_loss(batch)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_record_attention_reads_out_maps():
    m = mt.ViT(1, 3, image_size=8, patch_size=4, d_model=8, n_heads=2, n_layers=2)
    with mt.record_attention() as maps:
        m(torch.randn(5, 1, 8, 8))
    assert len(maps) == 2
    for module, w in maps:
        assert isinstance(module, mt.MultiHeadAttention)
        assert w.shape == (5, 2, 4, 4)
        torch.testing.assert_close(w.sum(-1), torch.ones(5, 2, 4))


def test_fully_masked_query_gives_zeros_on_both_paths(fp64):
    """A query that may attend to nothing: zero output (no NaN) on the fused and the math
    path alike, and finite gradients on the math path (used for second-order MAML)."""
    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False  # query 1 sees no key
    fused, _ = A.scaled_dot_product_attention(q, k, v, mask=mask)
    with A.double_backward():
        math_out, w = A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)
    torch.testing.assert_close(fused, math_out)
    assert torch.equal(math_out[..., 1, :], torch.zeros_like(math_out[..., 1, :]))
    assert torch.equal(w[..., 1, :], torch.zeros_like(w[..., 1, :]))
    (g,) = torch.autograd.grad(math_out.sum(), q)
    assert torch.isfinite(g).all()


def test_record_attention_under_vmap_maml_gives_usable_maps():
    """Recording inside MAML's evaluation makes it loop over tasks (weights recorded in vmap
    could not leave it): one usable map per task and attention module, rows summing to 1."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))

    m, batch = make("vit", T=2)
    learner = mt.MAML(m, inner_lr=0.3, inner_steps=1, vectorize=True)
    with A.record_attention() as rec:
        learner.evaluate(batch, steps=1)
    assert rec
    for _, w in rec:
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_maps_recorded_during_adapt_can_be_saved(tmp_path):
    """Maps recorded in MAML.adapt's support passes (inside torch.func) are plain tensors."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))

    m, batch = make("vit", T=1)
    learner = mt.MAML(m, inner_lr=0.3, inner_steps=1, vectorize=False)
    with A.record_attention() as rec:
        adapted = learner.adapt(batch.support_x[0], batch.support_y[0], steps=1)
        adapted(batch.query_x[0])
    assert len(rec) >= 2
    torch.save([w for _, w in rec], tmp_path / "maps.pt")
    for w in torch.load(tmp_path / "maps.pt"):
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_hooks_on_projections_fire():
    """Projections with hooks (module backward hooks, global hooks) run as modules."""
    from torch import nn

    torch.manual_seed(0)
    mha = mt.MultiHeadAttention(8, 2)
    calls = []
    mha.q_proj.register_full_backward_hook(lambda m, gi, go: calls.append("q"))
    mha(torch.randn(2, 3, 8, requires_grad=True)).sum().backward()
    assert calls == ["q"]
    seen = []
    h = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        mt.MultiHeadAttention(8, 2)(torch.randn(2, 3, 8))
    finally:
        h.remove()
    assert sum(isinstance(m, nn.Linear) for m in seen) == 4


def test_integer_masks_are_rejected_on_the_math_path():
    q = torch.randn(1, 2, 4, 8)
    keep = torch.ones(4, 4, dtype=torch.uint8).tril()
    with pytest.raises(TypeError, match="bool mask"):
        A.scaled_dot_product_attention(q, q, q, mask=keep, need_weights=True)
    out, w = A.scaled_dot_product_attention(q, q, q, mask=keep.bool(), need_weights=True)
    assert torch.all(w[..., 0, 1:] == 0)


def test_compiles_without_graph_breaks():
    """torch.compile traces a whole Transformer as one graph (the recording and
    double-backward switches are not read inside compiled code), with eager's numbers."""
    torch.manual_seed(0)
    enc = mt.TransformerEncoder(d_model=16, n_heads=4, n_layers=2)
    x = torch.randn(3, 5, 16)
    explained = torch._dynamo.explain(enc)(x, is_causal=True)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(enc, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, is_causal=True), enc(x, is_causal=True))
    with mt.record_attention() as maps:  # eager code still records
        enc(x)
    assert len(maps) == 2
