"""Django catalogs as translation tasks: .po parsing, placeholders, the held-out split (never
trains, in any locale, nor in the tokenizer), BPEVocab and the task pools."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

polib = pytest.importorskip("polib")
pytest.importorskip("tokenizers")

from metattn.data import translation as T  # noqa: E402
from metattn.data.seq2seq import BOS, EOS, PAD  # noqa: E402
from metattn.errors import DataError, TaskError  # noqa: E402


def _real_root() -> Path | None:
    try:
        return T.default_root()
    except DataError:
        return None


REAL = _real_root()
needs_data = pytest.mark.skipif(REAL is None or not (REAL / "conf").is_dir(),
                                reason="django_locale data folder not found")

PO_HEAD = 'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\n'
PO = PO_HEAD + textwrap.dedent('''\
    msgid "Save"
    msgstr "Tallenna"

    msgctxt "month"
    msgid "May"
    msgstr "toukokuu"

    msgid "May"
    msgstr "saattaa"

    #, fuzzy
    msgid "Delete"
    msgstr "Poista?"

    msgid "Empty"
    msgstr ""

    msgid "%(count)s item"
    msgid_plural "%(count)s items"
    msgstr[0] "%(count)s kohde"
    msgstr[1] "%(count)s kohdetta"

    #~ msgid "Old"
    #~ msgstr "Vanha"
    ''')


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_po_parsing_keeps_only_reviewed_singular_translations(tmp_path):
    _write(tmp_path, "conf/locale/fi/LC_MESSAGES/django.po", PO)
    _write(tmp_path, "contrib/admin/locale/fi/LC_MESSAGES/djangojs.po",
           PO_HEAD + 'msgid "Save"\nmsgstr "Tallenna nyt"\n\nmsgid "Add"\nmsgstr "Lisää"\n')
    _write(tmp_path, "conf/locale/en/LC_MESSAGES/django.po",
           PO_HEAD + 'msgid "Save"\nmsgstr "Save"\n')
    cats = T.load_catalogs(tmp_path)
    assert set(cats) == {"fi"}  # English skipped
    assert cats["fi"] == [T.Pair("", "Save", "Tallenna"), T.Pair("month", "May", "toukokuu"),
                          T.Pair("", "May", "saattaa"), T.Pair("", "Add", "Lisää")]
    assert cats.duplicates == {"fi": 1}  # the second "Save": the first file wins
    train, test = T.split_pairs(cats["fi"])  # context dropped: one "May"
    assert sorted(p.source for p in train + test) == ["Add", "May", "Save"]


def test_unparsable_po_is_a_data_error_naming_the_file(tmp_path):
    _write(tmp_path, "conf/locale/fi/LC_MESSAGES/django.po", 'msgid "a\nmsgstr "b"\nzzz\n')
    with pytest.raises(DataError, match=r"fi/LC_MESSAGES/django.po.*restore"):
        T.load_catalogs(tmp_path)
    with pytest.raises(DataError, match="no <app>/locale"):
        T.load_catalogs(tmp_path / "conf" / "locale" / "fi" / "LC_MESSAGES")


def test_placeholders():
    text = "%(count)s of %(total)d: %s, %d%% done; {0} {name} {} {{literal}} 100% sure"
    assert T.placeholders(text) == ["%(count)s", "%(total)d", "%s", "%d", "{0}", "{name}",
                                    "{}"]
    assert T.placeholders('<a href="%(url)s">%(name)s</a>') == ["%(url)s", "%(name)s"]
    assert T.placeholders("Plain text, 50% off.") == []
    assert T.placeholder_match("%(b)s ja %(a)s", "%(a)s and %(b)s")  # reordered: fine
    assert not T.placeholder_match("%(a)s", "%(a)s and %(b)s")
    assert not T.placeholder_match("%(a)s %(a)s", "%(a)s")
    assert not T.placeholder_match("{name}", "%(name)s")


def test_split_is_stable_and_about_15_percent():
    words = [f"String number {i}" for i in range(4000)]
    share = sum(map(T.is_test_string, words)) / len(words)
    assert 0.12 < share < 0.18
    assert [T.is_test_string(w) for w in words[:50]] == [T.is_test_string(w) for w in words[:50]]


@needs_data
@pytest.mark.parametrize("locale", ["fi", "kab"])
def test_real_counts_match_a_direct_polib_count(locale):
    keys = set()
    for path in sorted(REAL.glob(f"**/locale/{locale}/LC_MESSAGES/*.po")):
        keys |= {(e.msgctxt or "", e.msgid) for e in polib.pofile(str(path))
                 if not e.obsolete and "fuzzy" not in e.flags and not e.msgid_plural
                 and e.msgstr}
    pairs = T.load_catalogs(REAL)[locale]
    assert len(pairs) == len(keys) and {(p.context, p.source) for p in pairs} == keys
    assert 200 < len(pairs) < 1200


@needs_data
def test_no_test_string_trains_in_any_locale():
    cats = T.load_catalogs(REAL)
    assert not set(T.ENGLISH) & set(cats)
    test = {p.source for pairs in cats.values() for p in pairs if T.is_test_string(p.source)}
    assert len(test) > 50
    for locale, pairs in cats.items():
        train, held = T.split_pairs(pairs)
        assert not {p.source for p in train} & test, locale
        assert {p.source for p in held} <= test


@needs_data
def test_locale_lists():
    counts = T.train_pair_counts(REAL)
    meta = T.meta_train_locales(REAL)
    assert not set(meta) & set(T.HELD_OUT_LOCALES)
    cats = T.load_catalogs(REAL)
    assert all(len(cats[loc]) >= 500 for loc in T.HELD_OUT_LOCALES)
    assert set(meta) == {loc for loc, n in counts.items()
                         if n >= T.MIN_TRAIN_PAIRS and loc not in T.HELD_OUT_LOCALES}
    assert "fy" not in meta and "de" in meta


def test_tokenizer_text_has_no_test_string_and_no_held_out_locale(monkeypatch):
    sources = [f"Source {i}" for i in range(500)]
    locales = list(T.HELD_OUT_LOCALES) + ["de", "fr", "tiny"]
    cats = T.Catalogs((loc, [T.Pair("", s, f"{loc}:{s}") for s in
                             (sources if loc != "tiny" else sources[:100])])
                      for loc in locales)
    cats.duplicates = {}
    monkeypatch.setattr(T, "load_catalogs", lambda root=None: cats)
    assert T.meta_train_locales() == ["de", "fr"]  # held out and too small: excluded
    train = [s for s in sources if not T.is_test_string(s)]
    texts = T.tokenizer_texts()
    assert sorted(texts) == sorted(train + [f"{loc}:{s}" for loc in ("de", "fr") for s in train])


@needs_data
def test_real_tokenizer_text_has_no_test_string():
    texts = T.tokenizer_texts(REAL)
    cats = T.load_catalogs(REAL)
    test = {p.source for pairs in cats.values() for p in pairs if T.is_test_string(p.source)}
    n_english = len({p.source for loc in T.meta_train_locales(REAL)
                     for p in T.split_pairs(cats[loc])[0]})
    assert not set(texts[:n_english]) & test
    meta_targets = {p.target for loc in T.meta_train_locales(REAL) for p in cats[loc]}
    meta_targets |= set(texts[:n_english])  # a held-out target may be the English unchanged
    held_only = {p.target for loc in T.HELD_OUT_LOCALES for p in cats[loc]} - meta_targets
    assert held_only and not set(texts) & held_only


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    words = ["hello world", "Привет мир", "%(name)s saved", "<a href='x'>link</a>"] * 50
    return T.train_bpe(words, vocab_size=320)


def test_bpe_vocab_round_trip(bpe, tmp_path):
    text = 'Welcome, %(name)s! <a href="x">Изменить</a> 변경 내역  ({0}) 🎉 <s>'
    ids = bpe.encode(text)
    assert all(i > EOS for i in ids) and max(ids) < len(bpe)
    assert bpe.decode(ids) == text
    assert bpe.decode([BOS] + ids + [EOS, 7, 8, PAD]) == text  # stops at EOS, no specials
    bpe.save(tmp_path / "t.json")
    again = T.BPEVocab.load(tmp_path / "t.json")
    assert again.encode(text) == ids and again.encode_batch([text, "a"])[0] == ids
    with pytest.raises(TaskError, match="vocab_size"):
        T.train_bpe(["x"], vocab_size=100)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METATTN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@needs_data
def test_meta_train_sampler_never_draws_a_held_out_locale(cache):
    tasks = T.TranslationTasks("train", k_shot=4, k_query=4, root=REAL, vocab_size=400)
    assert tasks.query is None and not set(tasks.languages) & set(T.HELD_OUT_LOCALES)
    batch = tasks.sample(200, torch.Generator().manual_seed(0))
    drawn = {tasks.languages[i] for i in batch.info["language"].tolist()}
    assert len(drawn) > 20 and not drawn & set(T.HELD_OUT_LOCALES)
    assert batch.support_x.shape == (200, 4, tasks.max_src + tasks.max_tgt)
    with pytest.raises(TaskError, match="subset of .*'de'"):
        T.TranslationTasks("train", locales=["uk"], root=REAL, vocab_size=400)


@needs_data
def test_test_split_pools(cache):
    tasks = T.TranslationTasks("test", locales=["fi", "ko"], shots=50, root=REAL,
                               vocab_size=400, max_src=24, max_tgt=32)
    cats = T.load_catalogs(REAL)
    for loc in ("fi", "ko"):
        train, test = T.split_pairs(cats[loc])
        assert len(tasks.support[loc][0]) == 50 == len(tasks.support_texts[loc])
        assert set(tasks.support_texts[loc]) <= set(train)
        kept = [p for p in test if len(tasks.vocab.encode(p.source)) <= 24
                and len(tasks.vocab.encode(p.target)) + 1 <= 32]
        assert tasks.texts[loc] == kept and len(kept) + tasks.dropped[loc]["test"] == len(test)
        assert tasks.dropped[loc]["test"] > 0  # the small limits drop some, counted
        qx, qy = tasks.query[loc]
        assert [tasks.vocab.decode(row) for row in qy] == [p.target for p in kept]
        assert (qx[:, tasks.max_src] == BOS).all()
    more = T.TranslationTasks("test", locales=["fi"], shots=100, root=REAL, vocab_size=400,
                              max_src=24, max_tgt=32)
    assert more.support_texts["fi"][:50] == tasks.support_texts["fi"]  # 50 within 100
    with pytest.raises(TaskError, match="shots=5000"):
        T.TranslationTasks("test", locales=["fi"], shots=5000, root=REAL, vocab_size=400)
