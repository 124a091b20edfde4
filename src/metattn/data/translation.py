"""Few-shot English -> X translation over Django's UI catalogs: each target locale is a task.

Data
----
The GNU gettext catalogs of Django 5.2.20 (``shared/data/django_locale``, see its README):
``conf/locale/<loc>/LC_MESSAGES/django.po`` and ``contrib/<app>/locale/<loc>/LC_MESSAGES/
{django,djangojs}.po``. :func:`load_catalogs` parses every file with ``polib`` and keeps
the non-fuzzy, non-obsolete, singular entries (no ``msgid_plural``) with a non-empty
``msgstr`` as :class:`Pair` s, deduplicated per locale by ``(msgctxt, msgid)`` (the first
file in path order wins; repeats are counted in ``Catalogs.duplicates``). The English
locales (:data:`ENGLISH`) are skipped: English -> English is not translation.

Split
-----
The English side is the same in every locale, so the held-out strings are chosen by their
English ``msgid`` alone (:func:`is_test_string`: a SHA-256 of the string, ~15% test) and
are held out in EVERY locale, under every ``msgctxt``: a test string's English never
trains anywhere. Tasks drop ``msgctxt`` (source = ``msgid``, target = ``msgstr``) and keep
the first pair of each ``msgid`` (:func:`split_pairs`). Near-duplicates ("Enter a valid
date." / "Enter a valid date/time.") may still fall on both sides.

Locales
-------
:data:`HELD_OUT_LOCALES` (eight locales of seven scripts and eight families) never
meta-train; the meta-train locales are every other non-English locale with at least
:data:`MIN_TRAIN_PAIRS` train pairs (:func:`meta_train_locales`; the smaller ones, e.g.
``fy``, ``am``, ``my``, are left out and logged).

Tokens
------
A byte-level BPE (``tokenizers``) trained only on the meta-train locales' train pairs (each
distinct English source once, plus every target; :func:`tokenizer_texts`), specials at ids
0..3 as in :mod:`metattn.data.seq2seq`, cached as JSON in ``cache_dir("django_locale")``
under a hash of its training text and size (:func:`bpe_vocab`). Pairs longer than
``max_src`` / ``max_tgt`` tokens are dropped everywhere and counted
(``TranslationTasks.dropped``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from metattn.data.paths import CHECKOUT_SHARED, cache_dir, find_data_root
from metattn.data.seq2seq import EOS, SPECIALS, LanguageTasks, Pool, fits, pack
from metattn.errors import DataError, TaskError

LOG = logging.getLogger(__name__)
NAME = "django_locale"
RELEASE = "Django 5.2.20"
ENGLISH = ("en", "en_AU", "en_GB")  # English -> English is not translation
HELD_OUT_LOCALES = (
    "uk",  # Ukrainian: Slavic, Cyrillic
    "el",  # Greek: Hellenic, Greek script
    "he",  # Hebrew: Semitic, Hebrew script (right to left)
    "hi",  # Hindi: Indo-Aryan, Devanagari
    "fi",  # Finnish: Uralic, Latin
    "id",  # Indonesian: Austronesian, Latin
    "tr",  # Turkish: Turkic, Latin
    "ko",  # Korean: Koreanic, Hangul
)
MIN_TRAIN_PAIRS = 300  # a meta-train locale has at least this many train-string pairs
TEST_FRACTION = 0.15
SPLIT_VERSION = "msgid-sha256-v1"  # change it when the split rule changes
# Meta-train train pairs in BPE-4000 tokens: source 99th percentile 64 (max 117), target
# with EOS 99th percentile 84 (max 232), raised to 96 because the held-out scripts (Greek,
# Hebrew, Hangul) have no merges and run long; 1.1% of meta-train pairs are dropped
MAX_SRC, MAX_TGT = 64, 96


class Pair(NamedTuple):
    """One catalog entry: ``msgctxt`` ("" when absent), English ``msgid``, ``msgstr``."""

    context: str
    source: str
    target: str


class Catalogs(dict):
    """``locale -> [Pair]``; ``duplicates[locale]``: entries whose ``(msgctxt, msgid)`` was
    already kept from an earlier file (skipped)."""

    duplicates: dict[str, int]


# ------------------------------------------------------------------ parsing
def default_root() -> Path:
    """``$METATTN_DATA/django_locale``, else ``shared/data/django_locale`` beside the source
    checkout, else ``../shared/data/django_locale``."""
    return find_data_root(NAME, CHECKOUT_SHARED / "data" / NAME,
                          f"pass root=<folder holding conf/locale and contrib/ of the "
                          f"{RELEASE} source tree>")


def _root(root: str | os.PathLike | None) -> Path:
    if root is None:
        return default_root()
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"django_locale: root={path} is not a folder; pass the folder holding "
                        f"conf/locale and contrib/ of the {RELEASE} source tree")
    return path


def _keep(entry) -> bool:
    return (not entry.obsolete and "fuzzy" not in entry.flags and not entry.msgid_plural
            and bool(entry.msgid) and bool(entry.msgstr))


def _read_po(path: Path) -> list[Pair]:
    import polib

    try:
        po = polib.pofile(str(path), encoding="utf-8")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: polib cannot parse it ({e}); restore it from the {RELEASE} "
                        "release (or delete it to skip that catalog)") from e
    return [Pair(e.msgctxt or "", e.msgid, e.msgstr) for e in po if _keep(e)]


@functools.lru_cache(maxsize=4)
def _parse(stamp: tuple[tuple[str, int, int], ...]) -> tuple[dict[str, tuple[Pair, ...]],
                                                              dict[str, int]]:
    pairs: dict[str, dict[tuple[str, str], Pair]] = {}
    duplicates: Counter[str] = Counter()
    for name, _, _ in stamp:
        path = Path(name)
        locale = path.parent.parent.name
        if locale in ENGLISH:
            continue
        seen = pairs.setdefault(locale, {})
        for pair in _read_po(path):
            if (pair.context, pair.source) in seen:
                duplicates[locale] += 1
            else:
                seen[pair.context, pair.source] = pair
    return {loc: tuple(p.values()) for loc, p in sorted(pairs.items())}, dict(duplicates)


def load_catalogs(root: str | os.PathLike | None = None) -> Catalogs:
    """Every non-English locale's kept pairs (module docstring), in file and entry order.

    Parsing all 1,226 files takes ~2.5 s on a 2-core EPYC, so the result is cached in
    process only (``functools.lru_cache``), keyed by every file's path, size and mtime."""
    root = _root(root)
    files = sorted(root.glob("**/locale/*/LC_MESSAGES/*.po"))
    if not files:
        raise DataError(f"django_locale: no <app>/locale/<locale>/LC_MESSAGES/*.po under "
                        f"{root}; pass the folder holding conf/locale and contrib/")
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    pairs, duplicates = _parse(stamp)
    out = Catalogs((loc, list(p)) for loc, p in pairs.items())
    out.duplicates = dict(duplicates)
    return out


# ------------------------------------------------------------------ placeholders
_PLACEHOLDER = re.compile(r"""
    %% | \{\{ | \}\}                                   # escapes: not placeholders
  | %(?:\(\w+\))?[#0+\-]*(?:\d+|\*)?(?:\.\d+)?[sdifeEgGxXr]   # printf: %s %d %(name)s %.2f
  | \{[^{}\s]*\}                                       # str.format: {} {0} {name} {x:>3}
""", re.VERBOSE)
_ESCAPES = {"%%", "{{", "}}"}


def placeholders(text: str) -> list[str]:
    """The printf (``%s``, ``%(name)s``, ``%d``) and ``str.format`` (``{}``, ``{0}``,
    ``{name}``) placeholders of ``text`` in order; ``%%``, ``{{`` and ``}}`` are not."""
    return [m for m in _PLACEHOLDER.findall(text) if m not in _ESCAPES]


def placeholder_match(hyp: str, ref: str) -> bool:
    """Whether ``hyp`` has the same placeholders as ``ref`` (as a multiset: order may change
    in translation)."""
    return Counter(placeholders(hyp)) == Counter(placeholders(ref))


# ------------------------------------------------------------------ split and locales
@functools.lru_cache(maxsize=1 << 16)  # ~900 distinct strings, asked ~500k times
def is_test_string(source: str) -> bool:
    """Whether the English ``source`` is held out (in every locale): a stable SHA-256 hash of
    the string, ~``TEST_FRACTION`` of the strings."""
    h = hashlib.sha256(f"{SPLIT_VERSION}\n{source}".encode()).digest()
    return int.from_bytes(h[:8], "big") < TEST_FRACTION * 2 ** 64


def split_pairs(pairs: Iterable[Pair]) -> tuple[list[Pair], list[Pair]]:
    """``(train, test)`` pairs of one locale: the first pair of each English ``msgid`` (the
    context dropped), split by :func:`is_test_string`."""
    first: dict[str, Pair] = {}
    for p in pairs:
        first.setdefault(p.source, p)
    train: list[Pair] = []
    test: list[Pair] = []
    for p in first.values():
        (test if is_test_string(p.source) else train).append(p)
    return train, test


def train_pair_counts(root: str | os.PathLike | None = None) -> dict[str, int]:
    """Each non-English locale's number of train pairs (after :func:`split_pairs`)."""
    return {loc: len(split_pairs(p)[0]) for loc, p in load_catalogs(root).items()}


def meta_train_locales(root: str | os.PathLike | None = None) -> list[str]:
    """Locales that meta-train: not held out, at least ``MIN_TRAIN_PAIRS`` train pairs."""
    counts = train_pair_counts(root)
    missing = [loc for loc in HELD_OUT_LOCALES if loc not in counts]
    if missing:
        raise DataError(f"django_locale: held-out locales {missing} have no catalog under "
                        f"{_root(root)}; pass the full {RELEASE} locale tree")
    rest = {loc: n for loc, n in counts.items() if loc not in HELD_OUT_LOCALES}
    small = {loc: n for loc, n in rest.items() if n < MIN_TRAIN_PAIRS}
    if small:
        _log_once(f"django_locale: {len(small)} locales with < {MIN_TRAIN_PAIRS} train pairs "
                  f"do not meta-train: {small}")
    return sorted(loc for loc in rest if loc not in small)


@functools.lru_cache(maxsize=64)
def _log_once(message: str) -> None:
    LOG.info(message)


# ------------------------------------------------------------------ tokens
class BPEVocab:
    """A byte-level BPE with :class:`metattn.data.seq2seq.CharVocab`'s surface: ids 0..3 are
    ``<pad> <s> </s> <unk>``; any text encodes (bytes never go unknown) and decodes back
    exactly."""

    def __init__(self, tokenizer):
        ids = [tokenizer.token_to_id(s) for s in SPECIALS]
        if ids != list(range(len(SPECIALS))):
            raise DataError(f"BPEVocab: special tokens {SPECIALS} have ids {ids}, not 0..3; "
                            "delete the cached tokenizer json and retrain")
        tokenizer.encode_special_tokens = True  # a literal "<s>" in a string is text
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPEVocab:
        """A tokenizer saved with :meth:`save`."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer json atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        self.tokenizer.save(tmp)
        os.replace(tmp, path)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (no BOS/EOS added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of many texts at once."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts),
                                                            add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first EOS; specials are dropped."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS):
                kept.append(i)
        return self.tokenizer.decode(kept, skip_special_tokens=True)


def train_bpe(texts: Iterable[str], vocab_size: int = 4000) -> BPEVocab:
    """A byte-level BPE of at most ``vocab_size`` ids trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise TaskError(f"train_bpe: vocab_size={vocab_size}; at least 300 (256 bytes, 4 "
                        "specials and some merges)")
    tok = Tokenizer(models.BPE(unk_token=SPECIALS[3]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return BPEVocab(tok)


def tokenizer_texts(root: str | os.PathLike | None = None) -> list[str]:
    """What the BPE trains on: each distinct English train string once (sorted; repeating it
    per locale would let English dominate the merges), then every meta-train locale's train
    targets. Never a test string, never a held-out locale's text."""
    catalogs = load_catalogs(root)
    train = {loc: split_pairs(catalogs[loc])[0] for loc in meta_train_locales(root)}
    english = sorted({p.source for pairs in train.values() for p in pairs})
    return english + [p.target for loc in sorted(train) for p in train[loc]]


def bpe_vocab(vocab_size: int = 4000, root: str | os.PathLike | None = None) -> BPEVocab:
    """The BPE of :func:`tokenizer_texts`, trained once (~2 s) and then read from
    ``cache_dir("django_locale")/bpe-<size>-<hash>.json``; the hash covers the training text
    (so the locale list, the split rule and the data) and ``vocab_size``."""
    texts = tokenizer_texts(root)
    key = hashlib.sha256(json.dumps([SPLIT_VERSION, vocab_size, texts]).encode()).hexdigest()
    path = cache_dir(NAME) / f"bpe-{vocab_size}-{key[:16]}.json"
    if path.is_file():
        return BPEVocab.load(path)
    vocab = train_bpe(texts, vocab_size)
    vocab.save(path)
    LOG.info("django_locale: trained a %d-id BPE on %d strings -> %s", len(vocab),
             len(texts), path)
    return vocab


# ------------------------------------------------------------------ tasks
class TranslationTasks(LanguageTasks):
    """English -> locale translation tasks (module docstring).

    ``split="train"``: the meta-train locales (or the subset ``locales``); each task draws
    ``k_shot`` support and ``k_query`` query pairs from the locale's train pairs.
    ``split="test"``: :data:`HELD_OUT_LOCALES` (or a subset); the support pool is ``shots``
    train pairs drawn with ``shots_seed`` (``None``: all; the draws are a prefix of one
    seeded permutation, so 50 ⊂ 100 ⊂ 300), the query pool ALL the locale's test pairs in
    catalog order, their raw pairs in ``texts[locale]`` (``support_texts`` likewise).

    Pairs longer than ``max_src`` / ``max_tgt`` BPE tokens (EOS counted) are dropped from
    every pool and counted: ``dropped[locale] = {"train": n}``, plus ``"test": n`` in the test
    split, so a benchmark reports how many test strings it scored (``len(texts[locale])``)
    out of how many.
    """

    def __init__(self, split: str = "train", locales: Sequence[str] | None = None,
                 k_shot: int = 16, k_query: int = 16, shots: int | None = None,
                 shots_seed: int = 0, root: str | os.PathLike | None = None,
                 vocab_size: int = 4000, max_src: int = MAX_SRC, max_tgt: int = MAX_TGT):
        catalogs = load_catalogs(root)
        langs = _choose(split, locales, meta_train_locales(root))
        self.vocab = bpe_vocab(vocab_size, root)
        self.max_tgt = int(max_tgt)
        self.dropped: dict[str, dict[str, int]] = {}
        self.texts: dict[str, list[Pair]] = {}
        self.support_texts: dict[str, list[Pair]] = {}
        support: dict[str, Pool] = {}
        query: dict[str, Pool] = {}
        for lang in langs:
            train, test = split_pairs(catalogs[lang])
            train, tr_src, tr_tgt, tr_lost = self._fitting(train, max_src)
            self.dropped[lang] = {"train": tr_lost}
            if split == "test":  # a meta-train locale's test pairs are never used
                test, te_src, te_tgt, self.dropped[lang]["test"] = self._fitting(test, max_src)
                keep = _shots(len(train), shots, shots_seed, lang)
                train = [train[i] for i in keep]
                tr_src, tr_tgt = [tr_src[i] for i in keep], [tr_tgt[i] for i in keep]
                query[lang] = pack(te_src, te_tgt, max_src, self.max_tgt)
                self.texts[lang] = test
            support[lang] = pack(tr_src, tr_tgt, max_src, self.max_tgt)
            self.support_texts[lang] = train
        super().__init__(support, query if split == "test" else None, k_shot, k_query, max_src)
        lost = {k: sum(d[k] for d in self.dropped.values()) for k in self.dropped[langs[0]]}
        LOG.info("django_locale %s: %d locales, vocabulary %d (the model's vocab_size), "
                 "median %s support pairs; dropped as longer than %d/%d tokens: %s", split,
                 len(langs), len(self.vocab),
                 statistics.median(len(p) for p in self.support_texts.values()),
                 max_src, self.max_tgt, lost)

    def _fitting(self, pairs: list[Pair], max_src: int
                 ) -> tuple[list[Pair], list[list[int]], list[list[int]], int]:
        """The pairs that fit, their source and target ids, and how many did not fit."""
        src = self.vocab.encode_batch([p.source for p in pairs])
        tgt = self.vocab.encode_batch([p.target for p in pairs])
        ok = [i for i, (s, t) in enumerate(zip(src, tgt)) if fits(s, t, max_src, self.max_tgt)]
        return ([pairs[i] for i in ok], [src[i] for i in ok], [tgt[i] for i in ok],
                len(pairs) - len(ok))


def _choose(split: str, locales: Sequence[str] | None, meta_train: list[str]) -> list[str]:
    if split not in ("train", "test"):
        raise TaskError(f"TranslationTasks: split={split!r}; use 'train' or 'test'")
    valid = meta_train if split == "train" else list(HELD_OUT_LOCALES)
    if locales is None:
        return list(valid)
    unknown = [loc for loc in locales if loc not in valid]
    if unknown or not locales:
        raise TaskError(f"TranslationTasks: locales={list(locales)}; split={split!r} takes a "
                        f"non-empty subset of {valid}")
    return sorted(set(locales))


def _shots(n: int, shots: int | None, seed: int, lang: str) -> list[int]:
    if shots is None:
        return list(range(n))
    if not 1 <= shots <= n:
        raise TaskError(f"TranslationTasks: shots={shots}; {lang} has {n} train pairs that "
                        f"fit, so 1 <= shots <= {n}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:shots].tolist()
