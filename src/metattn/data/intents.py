"""Intent classification data (CLINC150, Banking77) and few-shot episodes over intents.

Two protocols (docs/intent.md):

* ``held_out``: N-way K-shot episodes on intents never seen in meta-training. CLINC150 is
  split by domain (:data:`CLINC150_TEST_DOMAINS`: 3 of its 10 domains); Banking77 by a fixed
  list of 27 of its 77 intents (:data:`BANKING77_TEST_INTENTS`). Training episodes draw from
  the official train split of the training intents; test episodes from the official test
  split of the held-out intents.
* ``all_intents``: the few-shot leaderboard protocol. K labelled examples per intent for
  every intent, drawn from the train split with a seed (:func:`few_shot_rows`); training
  episodes use only those; test episodes take their support from them and their queries from
  the official test split.

Sentences are tokenised once, when the sampler is built, by the encoder's own tokenizer
(``tokenizer.json`` of a Hugging Face model folder, read with the ``tokenizers`` library).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from metattn.data.paths import CHECKOUT_SHARED, find_data_root
from metattn.data.tasks import TaskBatch
from metattn.errors import DataError, TaskError

Dataset = Literal["clinc150", "banking77"]
Protocol = Literal["held_out", "all_intents"]

# CLINC150's meta-test domains (the other 7 meta-train): 45 intents never seen in training.
CLINC150_TEST_DOMAINS = ("auto_and_commute", "travel", "utility")
# Banking77's meta-test intents: 27 of the 77, drawn once (random.Random(77).sample of the
# sorted names) and written down here so the split never moves.
BANKING77_TEST_INTENTS = (
    "Refund_not_showing_up", "apple_pay_or_google_pay", "card_acceptance", "card_arrival",
    "card_linking", "card_payment_wrong_exchange_rate", "cash_withdrawal_charge",
    "cash_withdrawal_not_recognised", "contactless_not_working", "country_support",
    "disposable_card_limits", "edit_personal_details", "exchange_charge",
    "extra_charge_on_statement", "fiat_currency_support", "getting_virtual_card",
    "pin_blocked", "request_refund", "reverted_card_payment?", "top_up_failed",
    "top_up_limits", "top_up_reverted", "topping_up_by_card", "transfer_fee_charged",
    "virtual_card_not_working", "visa_or_mastercard", "wrong_exchange_rate_for_cash_withdrawal",
)
_GET = {
    "clinc150": "https://github.com/clinc/oos-eval (data/data_full.json, data/domains.json)",
    "banking77": "https://github.com/PolyAI-LDN/task-specific-datasets (banking_data/)",
}


@dataclass
class IntentData:
    """Sentences and their intents, per official split ("train", "test"; CLINC150 also
    "val"). ``labels[split][i]`` indexes ``intents``; ``domains`` maps a domain to its
    intents (CLINC150 only)."""

    name: str
    intents: list[str]
    texts: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    domains: dict[str, list[str]] | None = None

    def test_intents(self) -> list[int]:
        """The held-out protocol's meta-test intents (indices), as written down above."""
        if self.name == "clinc150":
            assert self.domains is not None
            names = {i for d in CLINC150_TEST_DOMAINS for i in self.domains[d]}
        else:
            names = set(BANKING77_TEST_INTENTS)
        return [i for i, n in enumerate(self.intents) if n in names]

    def train_intents(self) -> list[int]:
        """The held-out protocol's meta-training intents: all the others."""
        held = set(self.test_intents())
        return [i for i in range(len(self.intents)) if i not in held]


def _need(path: Path, name: str) -> Path:
    if not path.is_file():
        raise DataError(f"{name}: {path} not found; get it from {_GET[name]} and put it in "
                        f"{path.parent}, or pass root=<the folder holding it>")
    return path


def _root(root: str | Path | None, name: str) -> Path:
    if root is not None:
        return Path(root).expanduser()
    return find_data_root(name, CHECKOUT_SHARED / "data" / name,
                          f"pass root=<folder with the files>, set METATTN_DATA=<folder "
                          f"containing {name}/>, or get the files from {_GET[name]}")


def _labelled(pairs: list[tuple[str, str]], intents: list[str], where: str
              ) -> tuple[list[str], np.ndarray]:
    index = {n: i for i, n in enumerate(intents)}
    unknown = sorted({n for _, n in pairs if n not in index})
    if unknown:
        raise DataError(f"{where}: intent {unknown[0]!r} is not among the {len(intents)} "
                        "known intents; check that the file belongs to this dataset")
    return [t for t, _ in pairs], np.array([index[n] for _, n in pairs], dtype=np.int64)


def load_clinc150(root: str | Path | None = None) -> IntentData:
    """CLINC150 "full" (150 intents x 100/20/30 train/val/test; out-of-scope left out),
    from ``data_full.json`` and ``domains.json`` in ``root`` (default: the shared data)."""
    folder = _root(root, "clinc150")
    path = _need(folder / "data_full.json", "clinc150")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        domains = json.loads(_need(folder / "domains.json", "clinc150").read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"clinc150: {path} is not valid JSON ({err}); restore "
                        f"the original file from {_GET['clinc150']}") from err
    intents = sorted(i for d in domains.values() for i in d)
    texts, labels = {}, {}
    for split in ("train", "val", "test"):
        if split not in raw:
            raise DataError(f"clinc150: {path} has no {split!r} key; restore the original "
                            f"file from {_GET['clinc150']}")
        pairs = []
        for n, row in enumerate(raw[split]):
            if (not isinstance(row, list) or len(row) != 2 or not all(isinstance(c, str)
                                                                      for c in row)
                    or not row[0].strip()):
                raise DataError(f"clinc150: {path} [{split!r}][{n}] is {row!r}; every row "
                                "must be a [text, intent] pair with non-empty text")
            pairs.append((row[0], row[1]))
        texts[split], labels[split] = _labelled(pairs, intents, f"clinc150: {path} {split!r}")
    return IntentData("clinc150", intents, texts, labels, domains)


def load_banking77(root: str | Path | None = None) -> IntentData:
    """Banking77 (77 intents; 10,003 train and 3,080 test rows), from ``train.csv`` and
    ``test.csv`` (header ``text,category``) in ``root`` (default: the shared data)."""
    folder = _root(root, "banking77")
    rows = {}
    for split in ("train", "test"):
        path = _need(folder / f"{split}.csv", "banking77")
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != ["text", "category"]:
                raise DataError(f"banking77: {path} starts with {header!r}, expected the "
                                "header 'text,category'; restore the original file from "
                                f"{_GET['banking77']}")
            pairs = []
            for row in reader:
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise DataError(f"banking77: {path} line {reader.line_num} is {row!r}; "
                                    "every row must be 'text,category' with both non-empty "
                                    "(quote a text that holds a comma)")
                pairs.append((row[0], row[1]))
        rows[split] = pairs
    intents = sorted({n for _, n in rows["train"]})
    texts, labels = {}, {}
    for split, pairs in rows.items():
        texts[split], labels[split] = _labelled(pairs, intents, f"banking77: {split}.csv")
    return IntentData("banking77", intents, texts, labels)


def load_intents(dataset: Dataset, root: str | Path | None = None) -> IntentData:
    """:func:`load_clinc150` or :func:`load_banking77` by name."""
    loaders = {"clinc150": load_clinc150, "banking77": load_banking77}
    if dataset not in loaders:
        raise DataError(f"dataset={dataset!r}; choose one of {sorted(loaders)}")
    return loaders[dataset](root)


def few_shot_rows(labels: np.ndarray, intents: Sequence[int], k: int, seed: int,
                  names: Sequence[str] | None = None) -> dict[int, np.ndarray]:
    """The leaderboard protocol's K-shot draw: ``k`` rows of each intent, chosen by ``seed``
    (the same seed gives the same draw). An intent with fewer than ``k`` rows is an error."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in intents:
        rows = np.flatnonzero(labels == c)
        if len(rows) < k:
            name = names[c] if names is not None else c
            raise DataError(f"intent {name!r} has {len(rows)} training examples, fewer than "
                            f"k={k}; lower the shots per intent")
        out[c] = np.sort(rng.choice(rows, size=k, replace=False))
    return out


def tokenize(texts: Sequence[str], tokenizer: str | Path, max_len: int = 64
             ) -> tuple[np.ndarray, int]:
    """Token ids ``[N, L]`` (int64, right-padded to the longest, at most ``max_len``) and the
    pad id, from the ``tokenizer.json`` in the model folder ``tokenizer``."""
    from tokenizers import Tokenizer

    path = Path(tokenizer) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer: {path} not found; pass the folder of a Hugging Face "
                        "model that has a fast tokenizer (tokenizer.json)")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_len)
    pad = tok.token_to_id("[PAD]")
    pad = tok.token_to_id("<pad>") if pad is None else pad
    enc = tok.encode_batch(list(texts))
    L = max(len(e.ids) for e in enc)
    ids = np.full((len(enc), L), 0 if pad is None else pad, dtype=np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
    return ids, 0 if pad is None else pad


class IntentTasks:
    """N-way K-shot episodes of tokenised sentences: ``x`` is token ids ``[T, N, L]`` (padded
    with ``pad_id``, trimmed to the episode's longest sentence), ``y`` the episode's labels.

    ``support`` maps each intent to the rows its support may use; ``query`` to the rows its
    queries use (``None``: the same rows, the two sets disjoint). ``info`` carries the
    intents (``classes``) and the rows drawn (``support_rows``, ``query_rows``).
    """

    def __init__(self, ids: np.ndarray, pad_id: int, support: dict[int, np.ndarray],
                 query: dict[int, np.ndarray] | None = None, n_way: int = 5, k_shot: int = 5,
                 k_query: int = 15, names: Sequence[str] | None = None):
        if min(n_way, k_shot, k_query) < 1:
            raise TaskError(f"IntentTasks: n_way={n_way}, k_shot={k_shot}, k_query={k_query};"
                            " all must be >= 1")
        if n_way > len(support):
            raise TaskError(f"IntentTasks: n_way={n_way} but the split has {len(support)} "
                            "intents; lower n_way")
        need = {c: (k_shot + k_query if query is None else k_shot) for c in support}
        pools = [(support, need)] + ([] if query is None else [(query, dict.fromkeys(
            query, k_query))])
        for pool, counts in pools:
            for c, rows in pool.items():
                if len(rows) < counts[c]:
                    name = names[c] if names is not None else c
                    raise TaskError(f"IntentTasks: intent {name!r} has {len(rows)} examples, "
                                    f"fewer than the {counts[c]} an episode needs (k_shot="
                                    f"{k_shot}, k_query={k_query}); lower k_shot/k_query")
        self.ids = torch.as_tensor(ids)
        self.lengths = (self.ids != pad_id).sum(1)
        self.pad_id = pad_id
        self.classes = sorted(support)
        self.support = [torch.as_tensor(support[c]) for c in self.classes]
        self.query = None if query is None else [torch.as_tensor(query[c])
                                                 for c in self.classes]
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query

    def _draw(self, pool: list[torch.Tensor], classes: torch.Tensor, k: int,
              g: torch.Generator) -> torch.Tensor:
        return torch.stack([torch.stack([pool[c][torch.randperm(len(pool[c]), generator=g)[:k]]
                                         for c in task]) for task in classes.tolist()])

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``num_tasks`` episodes (the same generator state gives the same)."""
        T, n, k, q = int(num_tasks), self.n_way, self.k_shot, self.k_query
        if T < 1:
            raise TaskError(f"IntentTasks.sample: num_tasks={num_tasks}; it must be >= 1")
        g = generator
        classes = torch.rand(T, len(self.classes), generator=g).topk(n, dim=1).indices
        if self.query is None:
            both = self._draw(self.support, classes, k + q, g)  # [T, n, k+q]
            srows, qrows = both[..., :k], both[..., k:]
        else:
            srows = self._draw(self.support, classes, k, g)
            qrows = self._draw(self.query, classes, q, g)
        srows, qrows = srows.flatten(1), qrows.flatten(1)  # [T, n*k], [T, n*q]
        L = int(torch.maximum(self.lengths[srows].max(), self.lengths[qrows].max()))
        y = torch.arange(n).view(1, n, 1)
        return TaskBatch(
            support_x=self.ids[srows][..., :L], support_y=y.expand(T, n, k).reshape(T, n * k),
            query_x=self.ids[qrows][..., :L], query_y=y.expand(T, n, q).reshape(T, n * q),
            n_way=n, k_shot=k,
            info={"classes": torch.as_tensor(self.classes)[classes], "support_rows": srows,
                  "query_rows": qrows},
            check_labels=False)


def intent_tasks(data: IntentData, split: str, protocol: Protocol, tokenizer: str | Path,
                 n_way: int = 5, k_shot: int = 5, k_query: int = 15,
                 shots_per_intent: int = 10, seed: int = 0, max_len: int = 64
                 ) -> IntentTasks:
    """The episodes of ``protocol`` for ``split`` ("train" or "test"); see the module
    docstring. ``shots_per_intent`` and ``seed``: the all-intents protocol's K-shot draw."""
    if split not in ("train", "test"):
        raise TaskError(f"intent episodes: split={split!r}; use 'train' or 'test'")
    if protocol == "held_out":
        intents = data.train_intents() if split == "train" else data.test_intents()
        rows = _by_intent(data.labels[split], intents)
        texts, query = data.texts[split], None
    elif protocol == "all_intents":
        intents = list(range(len(data.intents)))
        rows = few_shot_rows(data.labels["train"], intents, shots_per_intent, seed,
                             data.intents)
        texts, query = data.texts["train"], None
        if split == "test":  # support: the K shots; queries: the official test split
            n_train = len(texts)
            texts = texts + data.texts["test"]
            query = {c: r + n_train for c, r in _by_intent(data.labels["test"],
                                                           intents).items()}
    else:
        raise TaskError(f"intent episodes: protocol={protocol!r}; use 'held_out' or "
                        "'all_intents'")
    ids, pad = tokenize(texts, tokenizer, max_len)
    return IntentTasks(ids, pad, rows, query, n_way, k_shot, k_query, data.intents)


def _by_intent(labels: np.ndarray, intents: Sequence[int]) -> dict[int, np.ndarray]:
    return {c: np.flatnonzero(labels == c) for c in intents}
