"""Languages as sequence-to-sequence tasks: token ids, packing, and the task sampler shared by
inflection (:mod:`metattn.data.inflection`) and translation (:mod:`metattn.data.translation`).

One example is packed into a single integer row so that every learner (MAML's vmap over tasks
included) sees a plain ``[T, N, L]`` input:

* ``x = [source ids, PAD ... | BOS, target ids, PAD ...]``, ``max_src + max_tgt`` long
  (the model splits it at ``max_src``: teacher forcing feeds the target shifted right);
* ``y = [target ids, EOS, IGNORE ...]``, ``max_tgt`` long (IGNORE = -100, which
  ``F.cross_entropy`` skips).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from metattn.data.tasks import TaskBatch
from metattn.errors import DataError, TaskError

LOG = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
IGNORE = -100


class CharVocab:
    """Characters plus whole-word symbols (e.g. inflection's feature tags), ids after the four
    specials; built from training text only, so unseen characters become ``<unk>``. A symbol
    spelled like a character (the tag ``N``, the letter N) keeps its own id."""

    def __init__(self, chars: Iterable[str], symbols: Iterable[str] = ()):
        self.symbols = sorted(set(symbols))
        self.chars = sorted(set(chars))
        self.itos = list(SPECIALS) + self.symbols + self.chars
        first = len(SPECIALS) + len(self.symbols)
        self.symbol_ids = {s: len(SPECIALS) + i for i, s in enumerate(self.symbols)}
        self.stoi = {c: first + i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, symbols: Sequence[str] = ()) -> list[int]:
        """The ids of ``text``'s characters followed by those of ``symbols``."""
        return ([self.stoi.get(c, UNK) for c in text]
                + [self.symbol_ids.get(s, UNK) for s in symbols])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first EOS; specials and symbols are dropped."""
        out = []
        first = len(SPECIALS) + len(self.symbols)
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if first <= i < len(self.itos):
                out.append(self.itos[i])
        return "".join(out)


def pack(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], max_src: int,
         max_tgt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack pairs as the module docstring says: ``x [N, max_src + max_tgt]``, ``y [N,
    max_tgt]``. A pair that does not :func:`fits` (an empty or too long source, a target
    longer than ``max_tgt - 1``) is a DataError: filter with :func:`fits` first."""
    if len(src) != len(tgt):
        raise DataError(f"pack: {len(src)} sources but {len(tgt)} targets")
    width = max_src + max_tgt
    # rows are filled in Python lists and converted once: per-row tensor writes cost ~10x
    xs, ys = [], []
    for i, (s, t) in enumerate(zip(src, tgt)):
        if not fits(s, t, max_src, max_tgt):
            raise DataError(f"pack: pair {i} has {len(s)} source / {len(t)} target tokens; "
                            f"max_src={max_src}, max_tgt={max_tgt} (EOS included); raise them "
                            "or drop long pairs with fits()")
        row = [*s, *[PAD] * (max_src - len(s)), BOS, *t]
        xs.append(row + [PAD] * (width - len(row)))
        ys.append([*t, EOS, *[IGNORE] * (max_tgt - len(t) - 1)])
    x = torch.tensor(xs, dtype=torch.long).view(len(xs), width)
    return x, torch.tensor(ys, dtype=torch.long).view(len(ys), max_tgt)


def fits(src: Sequence[int], tgt: Sequence[int], max_src: int, max_tgt: int) -> bool:
    """Whether a pair packs within ``max_src`` / ``max_tgt`` (the target's EOS counted)."""
    return 0 < len(src) <= max_src and len(tgt) + 1 <= max_tgt


Pool = tuple[torch.Tensor, torch.Tensor]


class LanguageTasks:
    """Each language is a task. ``support[lang]`` is the pool a task's support set is drawn
    from; ``query[lang]`` the query pool, or ``None`` to draw both (disjoint) from the
    support pool (meta-training). ``sample`` picks languages uniformly.

    ``info["language"]`` gives each task's index in :attr:`languages`.
    """

    def __init__(self, support: dict[str, Pool], query: dict[str, Pool] | None,
                 k_shot: int, k_query: int, max_src: int):
        if k_shot < 1 or k_query < 1:
            raise TaskError(f"LanguageTasks: k_shot={k_shot}, k_query={k_query}; both >= 1")
        if not support:
            raise TaskError("LanguageTasks: no languages; check the split's language list")
        self.languages = sorted(support)
        self.support, self.query = support, query
        self.k_shot, self.k_query, self.max_src = int(k_shot), int(k_query), int(max_src)
        for lang in self.languages:
            need = self.k_shot + (self.k_query if query is None else 0)
            have = len(support[lang][0])
            if have < need:
                raise TaskError(f"LanguageTasks: {lang} has {have} training pairs, fewer than "
                                f"the {need} a task draws; lower k_shot/k_query")
            if query is not None and len(query[lang][0]) < 1:
                raise TaskError(f"LanguageTasks: {lang} has no query pairs")

    def __len__(self) -> int:
        return len(self.languages)

    def _draw(self, lang: str, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        sx, sy = self.support[lang]
        order = torch.randperm(len(sx), generator=g)
        s = order[: self.k_shot]
        if self.query is None:
            q = order[self.k_shot: self.k_shot + self.k_query]
            qx, qy = sx[q], sy[q]
        else:
            px, py = self.query[lang]
            q = torch.randint(len(px), (self.k_query,), generator=g) \
                if len(px) < self.k_query else torch.randperm(len(px), generator=g)[: self.k_query]
            qx, qy = px[q], py[q]
        return sx[s], sy[s], qx, qy

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` languages (distinct when there are enough), each with ``k_shot``
        support and ``k_query`` query pairs."""
        n = len(self.languages)
        which = (torch.randperm(n, generator=generator)[:num_tasks] if num_tasks <= n
                 else torch.randint(n, (num_tasks,), generator=generator))
        parts = [self._draw(self.languages[j], generator) for j in which.tolist()]
        sx, sy, qx, qy = (torch.stack(p) for p in zip(*parts))
        return TaskBatch(sx, sy, qx, qy, info={"language": which.clone()})
