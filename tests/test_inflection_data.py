"""SIGMORPHON 2018 inflection as language tasks: file counts and nesting, the held-out split
(no test line in training, every low-resource-only language held out), the samplers' pools,
the vocabulary, and malformed files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metattn.data import inflection as inf
from metattn.errors import ConfigError, DataError


def _real_root() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    candidates = [here.parent / "shared" / "data" / "sigmorphon2018"]
    if os.environ.get("METATTN_DATA"):
        candidates.append(Path(os.environ["METATTN_DATA"]) / "sigmorphon2018")
    return next((c for c in candidates if (c / "task1" / "all").is_dir()), None)


REAL = _real_root()
needs_data = pytest.mark.skipif(REAL is None, reason="sigmorphon2018 data folder not found")
SMALL = ("uralic",)  # 4 meta-training languages: builds in seconds


@pytest.fixture(scope="module")
def small_train() -> inf.InflectionTasks:
    return inf.InflectionTasks("train", families=SMALL, root=REAL)


@pytest.fixture(scope="module")
def small_test() -> inf.InflectionTasks:
    return inf.InflectionTasks("test", families=SMALL, root=REAL)


@needs_data
@pytest.mark.parametrize("language, counts", [
    ("finnish", {"train-high": 10000, "train-medium": 1000, "train-low": 100, "test": 1000}),
    ("norman", {"train-medium": 180, "train-low": 100, "dev": 50, "test": 50}),
    ("welsh", {"train-high": 10000, "train-low": 100, "dev": 100, "test": 100}),
    ("french", {"train-high": 10000, "test": 1000}),  # in task1/surprise
])
def test_line_counts(language, counts):
    for split, n in counts.items():
        assert len(inf.load_language(REAL, language, split)) == n, (language, split)


@needs_data
def test_missing_train_high_names_the_file():
    with pytest.raises(DataError, match="norman-train-high.*no train-high"):
        inf.load_language(REAL, "norman", "train-high")


@needs_data
@pytest.mark.parametrize("language", ["finnish", "azeri", "breton", "russian"])
def test_training_splits_are_nested(language):
    low, medium, high = (set(inf.load_language(REAL, language, s))
                         for s in ("train-low", "train-medium", "train-high"))
    assert low and low <= medium <= high


def test_split_languages():
    train, held = inf.split_languages()
    assert len(held) == 24 and len(train) == 45 and not set(train) & set(held)
    assert set(train) | set(held) == {lang for ls in inf.FAMILIES.values() for lang in ls}
    assert sum(len(ls) for ls in inf.FAMILIES.values()) == 69
    assert set(held) == {lang for ls in inf.HELD_OUT.values() for lang in ls}
    small_train, small_held = inf.split_languages(["Uralic"])
    assert set(small_train) == {"finnish", "hungarian", "livonian", "northern-sami"}
    assert set(small_held) == {"ingrian", "karelian", "estonian", "votic"}
    with pytest.raises(ConfigError, match="romance") as err:
        inf.split_languages(["klingon"])
    assert err.value.key == "families"


@needs_data
def test_every_language_without_train_high_is_held_out():
    train, held = inf.split_languages()
    for lang in train:
        assert inf.language_file(REAL, lang, "train-high").is_file()
    no_high = []
    for lang in held:
        try:
            inf.language_file(REAL, lang, "train-high")
        except DataError:
            no_high.append(lang)
    assert len(no_high) == 12


@needs_data
def test_no_test_line_in_training_files():
    _, held = inf.split_languages()
    for lang in held:
        test = set(inf.load_language(REAL, lang, "test"))
        for split in ("train-high", "train-medium", "train-low"):
            try:
                train = inf.load_language(REAL, lang, split)
            except DataError:  # no train-high
                continue
            assert not test & set(train), (lang, split)


@needs_data
def test_train_sample_draws_meta_training_forms(small_train):
    train, held = inf.split_languages(SMALL)
    assert sorted(small_train.languages) == sorted(train)
    batch = small_train.sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 16, small_train.max_src + small_train.max_tgt)
    assert batch.support_y.shape == (4, 16, small_train.max_tgt)
    names = [small_train.languages[i] for i in batch.info["language"].tolist()]
    assert set(names) <= set(train) and not set(names) & set(held)
    for t, lang in enumerate(names):
        forms = {ex.form for ex in inf.load_language(REAL, lang, "train-high")}
        assert small_train.vocab.decode(batch.support_y[t, 0]) in forms
        # the query set is drawn from the same pool, disjoint from the support set
        s = {tuple(r) for r in batch.support_x[t].tolist()}
        assert not s & {tuple(r) for r in batch.query_x[t].tolist()}


@needs_data
def test_test_split_pools_and_shared_vocab(small_train, small_test):
    _, held = inf.split_languages(SMALL)
    assert sorted(small_test.languages) == sorted(held)
    assert small_test.vocab is small_train.vocab
    for lang in held:
        test = inf.load_language(REAL, lang, "test")
        qx, qy = small_test.query[lang]
        assert len(qx) == len(test) == len(small_test.texts[lang])
        assert small_test.texts[lang] == test
        assert len(small_test.support[lang][0]) == 100  # train-low
        ex, row = test[-1], qy[-1]
        if all(c in small_test.vocab.stoi for c in ex.form):
            assert small_test.vocab.decode(row) == ex.form


@needs_data
def test_vocab_round_trip_and_tags_apart_from_chars(small_train):
    vocab = small_train.vocab
    ex = small_train.texts["finnish"][0]
    assert vocab.decode(vocab.encode(ex.form)) == ex.form
    src = vocab.encode(ex.lemma, ex.features)
    assert len(src) == len(ex.lemma) + len(ex.features)
    assert vocab.decode(src) == ex.lemma  # tags are symbols, dropped by decode
    # "N" is a feature tag and also a character: they get different ids
    assert "N" in vocab.symbols
    vocab_n = inf.build_vocab([inf.Example("Nx", "Ny", ("N",))])
    assert vocab_n.encode("", ["N"]) != vocab_n.encode("N")
    assert vocab_n.decode(vocab_n.encode("N", ["N"])) == "N"


def test_malformed_line_names_file_and_line(tmp_path):
    folder = tmp_path / "task1" / "all"
    folder.mkdir(parents=True)
    (folder / "xx-train-low").write_text("a\tb\tN;SG\nc\t\tN;PL\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"xx-train-low:2:.*three"):
        inf.load_language(tmp_path, "xx", "train-low")
    (folder / "yy-train-low").write_text("a\tb\tN;SG\nc d N;PL\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"yy-train-low:2:"):
        inf.load_language(tmp_path, "yy", "train-low")
    with pytest.raises(DataError, match="zz-test"):
        inf.load_language(tmp_path, "zz", "test")


def test_long_lines_dropped_in_training_but_not_in_test(tmp_path, caplog):
    folder = tmp_path / "task1" / "all"
    folder.mkdir(parents=True)
    short = "".join(f"ab{i}\tab{i}x\tN;SG\n" for i in range(40))
    (folder / "irish-train-high").write_text(short + "a\t" + "b" * 30 + "\tN\n")
    for lang in ("cornish", "old-irish", "scottish-gaelic", "breton", "welsh"):
        (folder / f"{lang}-train-low").write_text(short)
        (folder / f"{lang}-test").write_text(short + "a\t" + "b" * 30 + "\tN\n")
    with caplog.at_level("INFO", logger="metattn.data.inflection"):
        tasks = inf.InflectionTasks("train", ["celtic"], 4, 4, root=tmp_path, max_tgt=20)
    assert len(tasks.support["irish"][0]) == 40 and "dropped 1 of 41" in caplog.text
    with pytest.raises(DataError, match=r"breton-test line 41 .*max_tgt=20"):
        inf.InflectionTasks("test", ["celtic"], 4, 4, root=tmp_path, max_tgt=20)
