"""The encoder-decoder, its decoding, MAML through it, and the sequence metrics."""

import pytest
import torch
import torch.nn.functional as F
from models import meta_grad, meta_train
from torch.func import functional_call

import metattn as mt
from metattn.data.seq2seq import BOS, EOS, IGNORE, PAD, CharVocab, pack
from metattn.meta.seq2seq import (
    Seq2SeqMAML,
    bleu,
    chrf,
    fine_tune,
    levenshtein,
    sequence_accuracy,
    sequence_loss,
    string_scores,
)
from metattn.nn.interpret import capture_attention
from metattn.nn.seq2seq import Seq2SeqTransformer, beam_search, greedy_decode

VOCAB = CharVocab("abcdefgh", symbols=["V", "PST"])


def _pairs(n, seed=0, max_src=8, max_tgt=8):
    """Toy "inflection": the target is the source reversed plus 'h' when the tag PST is set."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = [], []
    for _ in range(n):
        word = "".join("abcdefg"[int(i)] for i in torch.randint(7, (int(torch.randint(2, 5, (1,),
                       generator=g)),), generator=g))
        tag = ["V", "PST"] if int(torch.randint(2, (1,), generator=g)) else ["V"]
        src.append(VOCAB.encode(word, tag))
        tgt.append(VOCAB.encode(word[::-1] + ("h" if "PST" in tag else "")))
    return pack(src, tgt, max_src, max_tgt)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "d_ff": 64, **kw}
    return Seq2SeqTransformer(len(VOCAB), 8, 8, **kw)


def test_pack_layout_and_vocab_round_trip():
    x, y = pack([VOCAB.encode("abc", ["V"])], [VOCAB.encode("cba")], 6, 5)
    assert x.shape == (1, 11) and y.shape == (1, 5)
    assert x[0, 4:6].tolist() == [PAD, PAD] and x[0, 6] == BOS
    assert VOCAB.decode(x[0, 7:]) == "cba" and VOCAB.decode(y[0]) == "cba"
    assert y[0, 3] == EOS and y[0, 4] == IGNORE
    assert VOCAB.decode(VOCAB.encode("chéf")) == "chf"  # unseen characters are <unk>
    with pytest.raises(mt.DataError, match="max_tgt"):
        pack([[4]], [VOCAB.encode("abcde")], 6, 5)


def test_teacher_forcing_is_causal_and_ignores_padding():
    m = _model().eval()
    x, _ = _pairs(4)
    out = m(x)
    changed = x.clone()
    changed[:, 8 + 3:] = 5  # later decoder inputs cannot change earlier positions
    torch.testing.assert_close(m(changed)[:, :3], out[:, :3])
    padded = torch.cat([x[:, :8], torch.full((4, 2), PAD), x[:, 8:]], 1)  # wider source pad
    wide = Seq2SeqTransformer(len(VOCAB), 10, 8, d_model=32, n_heads=2, enc_layers=1,
                              dec_layers=1, d_ff=64)
    wide.load_state_dict({k: (torch.cat([v, torch.zeros(2, 32)]) if k == "src_pos" else v)
                          for k, v in m.state_dict().items()})
    torch.testing.assert_close(wide.eval()(padded), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_src"):
        m(x[:, 1:])


def test_a_memorised_pair_decodes_greedy_and_beam():
    m = _model(d_model=48)
    x, y = _pairs(6)
    tuned = fine_tune(m, x, y, steps=250, lr=3e-3, batch_size=6)
    want = [VOCAB.decode(r) for r in y]
    for ids in (greedy_decode(tuned, x[:, :8]), beam_search(tuned, x[:, :8], beam=3)):
        assert [VOCAB.decode(r) for r in ids] == want
    acc = sequence_accuracy(tuned(x)[None], y[None])
    assert acc["exact_match"].item() == 1.0 and acc["token_accuracy"].item() == 1.0


def test_beam_search_finds_a_likelier_sequence_than_greedy():
    m = _model(seed=3).eval()
    src = _pairs(16, seed=1)[0][:, :8]

    def logp(ids):
        rows = torch.cat([torch.full((len(ids), 1), BOS), ids[:, :-1]], 1)
        lp = m.decode(rows, *m.encode(src)).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        return (lp * (ids != PAD) * (torch.cumsum(ids == EOS, 1) - (ids == EOS).long() == 0)
                ).sum(1)

    n = 8
    g = greedy_decode(m, src, n)
    b = beam_search(m, src, beam=5, max_len=n, length_penalty=0.0)
    g = F.pad(g, (0, n - g.shape[1]), value=PAD)
    b = F.pad(b, (0, n - b.shape[1]), value=PAD)
    with torch.no_grad():
        assert (logp(b) >= logp(g) - 1e-5).all()


def _reference(model, batch, lr, steps):
    """Second-order MAML by hand: per task, autograd.grad with create_graph."""
    base = dict(model.named_parameters())
    losses = []
    for t in range(batch.num_tasks):
        fast = dict(base)
        for _ in range(steps):
            loss = sequence_loss(functional_call(model, fast, (batch.support_x[t],)),
                                 batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        losses.append(sequence_loss(functional_call(model, fast, (batch.query_x[t],)),
                                    batch.query_y[t]))
    loss = torch.stack(losses).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_second_order_meta_gradient_equals_a_plain_loop_in_float64():
    m = _model().double()
    x, y = _pairs(18)
    batch = mt.TaskBatch(x[:9].view(3, 3, -1), y[:9].view(3, 3, -1),
                         x[9:].view(3, 3, -1), y[9:].view(3, 3, -1))
    with mt.double_backward():
        want_loss, want = _reference(m, batch, lr=0.2, steps=2)
    for vectorize in (False, True):
        learner = Seq2SeqMAML(m, inner_lr=0.2, inner_steps=2, vectorize=vectorize)
        loss, got = meta_grad(learner, batch)
        assert loss == pytest.approx(want_loss, abs=1e-12)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    first = Seq2SeqMAML(m, inner_lr=0.2, inner_steps=2, first_order=True)
    assert not torch.allclose(meta_grad(first, batch)[1], want)  # the second order matters


def test_cross_attention_maps_are_recorded():
    m = _model().eval()
    x, _ = _pairs(3)
    _, maps = capture_attention(m, x, root=m)
    maps = maps.select("decoder.0.cross")
    (w,) = maps.weights
    assert w.shape == (3, 2, 8, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 8))
    pad = x[:, :8] == PAD  # padded source characters get no attention
    assert (w.masked_select(pad[:, None, None, :].expand_as(w)) == 0).all()


def test_string_metrics_against_hand_values():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2
    s = string_scores(["walked", "ran", "sing"], ["walked", "run", "sang"])
    assert s["accuracy"] == pytest.approx(100 / 3) and s["levenshtein"] == pytest.approx(2 / 3)
    assert chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    # chrF by hand: "ab" vs "abc": char 1-grams P=2/2 R=2/3, 2-grams P=1/1 R=1/2,
    # n = 3..6 have no reference grams of the hypothesis' length -> averaged over n = 1, 2
    p, r = (1 + 1) / 2, (2 / 3 + 1 / 2) / 2
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r), abs=0.5)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_a_short_maml_run_beats_the_untrained_model_on_held_out_languages():
    from metattn.data.inflection import InflectionTasks, default_root

    try:
        default_root()
    except mt.DataError:
        pytest.skip("sigmorphon2018 data not found")
    train = InflectionTasks("train", families=["turkic"], k_shot=8, k_query=8)
    test = InflectionTasks("test", families=["turkic"], k_shot=16, k_query=16)
    assert not set(train.languages) & set(test.languages)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(len(train.vocab), 32, 32, d_model=32, n_heads=2, enc_layers=1,
                               dec_layers=1, d_ff=64)
    learner = Seq2SeqMAML(model, inner_lr=0.1, inner_steps=1)
    episodes = mt.fixed_episodes(test, 10, seed=0)  # every task a held-out language

    def held_out() -> dict[str, float]:
        res = [learner.evaluate(b) for b in episodes]
        return {k: torch.cat([r[k] for r in res]).mean().item()
                for k in ("loss", "token_accuracy")}

    before = held_out()
    meta_train(learner, train, steps=60, meta_batch=4)
    after = held_out()
    assert after["loss"] < before["loss"] - 1.0
    assert after["token_accuracy"] > before["token_accuracy"] + 0.15
