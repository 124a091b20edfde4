"""Morphological inflection (CoNLL-SIGMORPHON 2018 Task 1) with each language as a task.

A task maps a lemma and a feature bundle to the inflected form (``vapiti`` + ``N;PRIV;PL`` ->
``vapiteitta``). The data folder (``shared/data/sigmorphon2018``, its README) keeps 69
languages from six families (:data:`FAMILIES`); each language has ``train-high`` (up to
10,000 lines; twelve languages have none), ``train-medium``, ``train-low`` (100 lines, a
subset of the others), ``dev`` and ``test`` files.

The protocol:

* :data:`HELD_OUT` is written down per family: every language without ``train-high`` plus two
  chosen languages per family, 24 in all. The other 45 are the meta-training languages.
* Meta-training draws tasks from the ``train-high`` file of every language not held out.
* A held-out language adapts on its ``train-low`` (100 examples) and is scored on its whole
  ``test`` file (exact match and Levenshtein distance, macro-averaged over languages, as the
  shared task's scorer does).
* ``dev`` is never used for training; split ``"dev"`` scores held-out languages on it instead
  of ``test`` (for choosing settings).

The vocabulary (characters of lemmas and forms, feature tags as whole symbols) is built only
from the training files the protocol uses: meta-training languages' ``train-high`` and
held-out languages' ``train-low``, so split ``"train"`` and ``"test"`` share it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from metattn.data.paths import CHECKOUT_SHARED, find_data_root
from metattn.data.seq2seq import UNK, CharVocab, LanguageTasks, Pool, fits, pack
from metattn.errors import ConfigError, DataError

LOG = logging.getLogger(__name__)

NAME = "sigmorphon2018"
SOURCE = "https://github.com/sigmorphon/conll2018 (task1/all and task1/surprise)"
SPLITS = ("train-high", "train-medium", "train-low", "dev", "test")
FOLDERS = ("all", "surprise")

FAMILIES: dict[str, tuple[str, ...]] = {
    "romance": ("asturian", "catalan", "french", "friulian", "galician", "italian", "ladin",
                "latin", "middle-french", "neapolitan", "norman", "occitan", "old-french",
                "portuguese", "romanian", "spanish", "venetian"),
    "slavic": ("belarusian", "bulgarian", "czech", "kashubian", "lower-sorbian", "macedonian",
               "old-church-slavonic", "polish", "russian", "serbo-croatian", "slovak",
               "slovene", "ukrainian"),
    "uralic": ("estonian", "finnish", "hungarian", "ingrian", "karelian", "livonian",
               "northern-sami", "votic"),
    "germanic": ("danish", "dutch", "english", "faroese", "german", "icelandic",
                 "middle-high-german", "middle-low-german", "north-frisian",
                 "norwegian-bokmaal", "norwegian-nynorsk", "old-english", "old-saxon",
                 "swedish", "west-frisian", "yiddish"),
    "turkic": ("azeri", "bashkir", "crimean-tatar", "kazakh", "khakas", "tatar", "turkish",
               "turkmen", "uzbek"),
    "celtic": ("breton", "cornish", "irish", "old-irish", "scottish-gaelic", "welsh"),
}

# Per family: the languages with no train-high, then two with train-high chosen once and
# written down here so the split never moves; every family has meta-training and held-out
# members.
HELD_OUT: dict[str, tuple[str, ...]] = {
    "romance": ("norman", "catalan", "romanian"),
    "slavic": ("kashubian", "czech", "ukrainian"),
    "uralic": ("ingrian", "karelian", "estonian", "votic"),
    "germanic": ("middle-high-german", "middle-low-german", "danish", "west-frisian"),
    "turkic": ("kazakh", "khakas", "turkmen", "azeri", "uzbek"),
    "celtic": ("cornish", "old-irish", "scottish-gaelic", "breton", "welsh"),
}

# Measured over the held-out languages' dev and test files: the longest source is 28 tokens
# (lemma characters + feature tags) and the longest target 27 (form + EOS), so 32/32 scores
# every evaluation line (one that did not fit would be a DataError). Training lines: 99.9%
# are within 26 tokens; the longest (46 / 63, train-high) are dropped, counted and logged.
MAX_SRC = 32
MAX_TGT = 32


class Example(NamedTuple):
    """One line: ``lemma<TAB>form<TAB>features`` with the features split on ';'."""

    lemma: str
    form: str
    features: tuple[str, ...]


def default_root() -> Path:
    """``$METATTN_DATA/sigmorphon2018``, else ``shared/data/sigmorphon2018`` beside the
    source checkout, else ``../shared/data/sigmorphon2018``."""
    return find_data_root(NAME, CHECKOUT_SHARED / "data" / NAME,
                          f"pass root=<folder holding task1/all and task1/surprise> (from "
                          f"{SOURCE})")


def language_file(root: str | Path, language: str, split: str) -> Path:
    """``<root>/task1/{all,surprise}/<language>-<split>``, whichever folder holds it."""
    if split not in SPLITS:
        raise DataError(f"sigmorphon2018: split={split!r}; choose one of {', '.join(SPLITS)}")
    base = Path(root).expanduser() / "task1"
    for folder in FOLDERS:
        path = base / folder / f"{language}-{split}"
        if path.is_file():
            return path
    hint = (" (this language has no train-high: the protocol holds it out and adapts on "
            "train-low)" if split == "train-high" and language in _held_out_set() else "")
    raise DataError(f"sigmorphon2018: {language}-{split} is in neither {base / 'all'} nor "
                    f"{base / 'surprise'}{hint}; check the language name and split, or pass "
                    f"root=<folder holding task1/> (from {SOURCE})")


@functools.cache
def _read(path: str) -> tuple[Example, ...]:
    """The parsed file, cached in-process: the train and test splits read the same files."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3 or not all(fields):
                raise DataError(f"{path}:{n}: expected lemma<TAB>form<TAB>features (three "
                                f"non-empty fields), got {line.rstrip()!r}; fix or remove "
                                "the line, or restore the file from the source")
            out.append(Example(fields[0], fields[1], tuple(fields[2].split(";"))))
    return tuple(out)


def load_language(root: str | Path | None, language: str, split: str) -> list[Example]:
    """The examples of ``<language>-<split>`` in file order (``root=None``: the default data
    folder). A missing file or a malformed line is a DataError naming it."""
    return list(_read(str(language_file(root or default_root(), language, split))))


def _held_out_set() -> set[str]:
    return {lang for langs in HELD_OUT.values() for lang in langs}


def split_languages(families: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(meta-training languages, held-out languages) of ``families`` (default: all six), in
    :data:`FAMILIES` order."""
    names = list(FAMILIES) if families is None else [str(f).lower() for f in families]
    bad = [f for f in names if f not in FAMILIES]
    if bad or not names:
        raise ConfigError(f"families={list(families or [])!r}: unknown or empty; choose from "
                          f"{', '.join(FAMILIES)}", key="families")
    held = _held_out_set()
    train = [lang for f in dict.fromkeys(names) for lang in FAMILIES[f] if lang not in held]
    test = [lang for f in dict.fromkeys(names) for lang in FAMILIES[f] if lang in held]
    return train, test


def training_files(families: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The (language, split) pairs training may read: meta-training languages' train-high,
    held-out languages' train-low. The vocabulary is built from these alone."""
    train, test = split_languages(families)
    return [(lang, "train-high") for lang in train] + [(lang, "train-low") for lang in test]


def build_vocab(examples: Iterable[Example]) -> CharVocab:
    """Characters of lemmas and forms plus feature tags as symbols. Pass training examples
    only (:func:`training_files`): characters first seen in dev/test become ``<unk>``."""
    chars: set[str] = set()
    tags: set[str] = set()
    for ex in examples:
        chars.update(ex.lemma)
        chars.update(ex.form)
        tags.update(ex.features)
    return CharVocab(chars, tags)


@functools.cache
def _vocab(root: str, families: tuple[str, ...] | None) -> CharVocab:
    return build_vocab(ex for lang, split in training_files(families)
                       for ex in load_language(root, lang, split))


def _encode(vocab: CharVocab, examples: Sequence[Example]) -> tuple[list, list]:
    return ([vocab.encode(ex.lemma, ex.features) for ex in examples],
            [vocab.encode(ex.form) for ex in examples])


class InflectionTasks(LanguageTasks):
    """Languages as inflection tasks (module docstring: the protocol).

    ``split="train"``: the meta-training languages; support and query are drawn, disjoint,
    from ``train-high``; lines longer than ``max_src``/``max_tgt`` are dropped and logged.
    ``split="test"`` (or ``"dev"``): the held-out languages; support from ``train-low``,
    query from every line of the ``test`` (``dev``) file in file order, none dropped.

    ``texts[lang]`` holds the raw :class:`Example` of each row of the query pool (split
    test/dev) or of the support pool (split train, whose queries come from it), for scoring.
    ``families`` restricts the languages to some of :data:`FAMILIES` (a small CPU config).
    """

    def __init__(self, split: str = "train", families: Sequence[str] | None = None,
                 k_shot: int = 16, k_query: int = 16, root: str | Path | None = None,
                 max_src: int = MAX_SRC, max_tgt: int = MAX_TGT):
        if split not in ("train", "dev", "test"):
            raise ConfigError(f"split={split!r}; choose train, dev or test", key="split")
        root = Path(root).expanduser() if root is not None else default_root()
        fams = None if families is None else tuple(str(f).lower() for f in families)
        train, held = split_languages(fams)
        self.split, self.families = split, fams
        self.vocab = _vocab(str(root), fams)
        self.max_src, self.max_tgt = int(max_src), int(max_tgt)
        self.texts: dict[str, list[Example]] = {}
        support: dict[str, Pool] = {}
        query: dict[str, Pool] | None = None
        if split == "train":
            for lang in train:
                self.texts[lang], support[lang] = self._pool(lang, "train-high", root, True)
        else:
            query = {}
            for lang in held:
                support[lang] = self._pool(lang, "train-low", root, True)[1]
                self.texts[lang], query[lang] = self._pool(lang, split, root, False)
        super().__init__(support, query, k_shot, k_query, self.max_src)
        LOG.info("inflection %s: %d languages, vocabulary %d (the model's vocab_size), "
                 "max_src=%d, max_tgt=%d", split, len(self.languages), len(self.vocab),
                 self.max_src, self.max_tgt)

    def _pool(self, lang: str, split: str, root: Path, drop: bool
              ) -> tuple[list[Example], Pool]:
        """The file's examples that fit and their packed pool. Training lines longer than
        max_src/max_tgt are dropped, counted and logged (``drop``); an evaluation line that
        does not fit is a DataError, since the score is over the whole file."""
        rows = load_language(root, lang, split)
        src, tgt = _encode(self.vocab, rows)
        ok = [fits(s, t, self.max_src, self.max_tgt) for s, t in zip(src, tgt)]
        if not all(ok) and not drop:
            n = ok.index(False)
            raise DataError(f"inflection: {lang}-{split} line {n + 1} has {len(src[n])} "
                            f"source / {len(tgt[n]) + 1} target tokens, over max_src="
                            f"{self.max_src} / max_tgt={self.max_tgt}; raise them (the "
                            f"defaults {MAX_SRC}/{MAX_TGT} fit every dev/test line)")
        if not all(ok):
            LOG.info("inflection: dropped %d of %d %s-%s lines longer than max_src=%d / "
                     "max_tgt=%d", ok.count(False), len(rows), lang, split, self.max_src,
                     self.max_tgt)
            rows, src, tgt = ([v for v, k in zip(seq, ok) if k] for seq in (rows, src, tgt))
        unseen = sum(UNK in t for t in tgt)
        if unseen and not drop:
            LOG.info("inflection: %d of %d %s-%s forms have characters unseen in training",
                     unseen, len(rows), lang, split)
        return rows, pack(src, tgt, self.max_src, self.max_tgt)
