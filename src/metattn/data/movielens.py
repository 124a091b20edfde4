"""MovieLens 100K (Harper & Konstan 2015) as cold-start recommendation tasks: users are tasks.

Data
----
The GroupLens ml-100k files (https://grouplens.org/datasets/movielens/100k/; their terms
forbid redistribution, so the data is never shipped with metattn): ``u.data`` (tab-separated
user, item, rating, timestamp), ``u.item`` (``|``-separated, Latin-1), ``u.user``,
``u.genre``, ``u.occupation``. :func:`load_movielens` reads them with every line checked: a
malformed line, a rating outside 1-5 or a rating of an unknown user or item is skipped and
counted (``MovieLens.skipped``, and one warning with the counts); a missing file, or a
``u.item`` / ``u.user`` line that cannot be read, is a :class:`DataError`.

Features
--------
Each rating row becomes a float vector of :data:`N_FEATURES` columns (integers stored
exactly in float32), see :data:`FEATURES`: the item's 19 genres (multi-hot) and release
year (slot ``year - 1919`` clipped to 1..80, 0 = unknown), the user's age bucket (<18,
18-24, 25-34, 35-44, 45-49, 50-55, 56+: MovieLens 1M's groups), gender, occupation and zip
prefix (first digit, 10 = not a digit), and the item id (for the item-mean baseline and to
tell an item from itself; models do not embed it, so a new item is described by its
content only). The rating is the regression target, ``[.., 1]`` float.

Protocol (MeLU, Lee et al. KDD 2019, adapted to 100K)
-----------------------------------------------------
* Items released on or after ``new_items_from`` (1997-01-01: the newest 351 of 1,681 dated
  items, 20.9%) are NEW items, the rest EXISTING; the one item without a release date is
  in neither set (counted in ``skipped``).
* Users are split 80/20 into EXISTING and NEW by a permutation seeded with ``user_seed``.
* Meta-training (``split="train"``): existing users' ratings of existing items. Test
  (``split="test"``) scenarios: ``new_users`` (new users, existing items), ``new_items``
  (existing users, new items), ``both_new`` (new users, new items).
* Within a split and scenario, a user is a task when they have 13 to 100 ratings there
  (MeLU's filter); each task's query set is ``k_query`` = 10 random ratings and its support
  set ``k_shot`` (5, 10 or 20) random others: a fixed K per episode, so tasks stack into a
  :class:`TaskBatch`. Users with fewer than ``k_shot + k_query`` ratings in the scenario are
  left out and counted (``MovieLensTasks.excluded``).
* ``context=True`` appends the task's support set (features and rating of each of its K
  rows, flattened) to every row, support and query alike: a set model then reads the
  support set from any row, and MAML can run it unchanged (:func:`with_context`).

Evaluation is over users: :meth:`MovieLensTasks.every_user` gives each test user once, with
seeded support and query sets; ``sample`` draws users at random (for training and the
recipe's fixed episodes).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from metattn.data.paths import CHECKOUT_SHARED, find_data_root
from metattn.data.tasks import TaskBatch
from metattn.errors import DataError, TaskError

URL = "https://grouplens.org/datasets/movielens/100k/"
CHECKOUT_DATA = CHECKOUT_SHARED / "data" / "movielens100k"
N_GENRES = 19
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # bucket i holds ages in [edge[i-1], edge[i])
FIRST_YEAR, YEAR_SLOTS = 1919, 81
N_OCCUPATIONS, N_ZIP = 21, 11
FEATURES = ([f"genre_{i}" for i in range(N_GENRES)]
            + ["year", "age", "gender", "occupation", "zip", "item_id"])
N_FEATURES = len(FEATURES)
COL = {name: i for i, name in enumerate(FEATURES)}
LOG = logging.getLogger(__name__)
Scenario = Literal["new_users", "new_items", "both_new"]
SCENARIOS: tuple[str, ...] = ("new_users", "new_items", "both_new")


@dataclass
class MovieLens:
    """The ratings and side information of ml-100k, indexed by the original 1-based ids.

    ``ratings`` ``int64 [R, 4]``: user, item, rating, timestamp. Item tables (row = item id,
    row 0 unused): ``genres`` ``[n_items + 1, 19]``, ``release`` (``datetime64[D]``, NaT when
    unknown), ``titles``. User tables (row = user id): ``age``, ``gender`` (1 = M),
    ``occupation`` (index into ``occupations``), ``zip``. ``skipped``: lines left out, by
    reason."""

    ratings: np.ndarray
    genres: np.ndarray
    release: np.ndarray
    titles: list[str]
    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    zip: np.ndarray
    occupations: list[str]
    genre_names: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(len(self.age) - 1)

    @property
    def n_items(self) -> int:
        return int(len(self.titles) - 1)

    def features(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``float32 [n, N_FEATURES]`` rows for (user, item) pairs (see :data:`FEATURES`)."""
        users, items = np.asarray(users), np.asarray(items)
        years = self.release[items].astype("datetime64[Y]").astype(np.int64) + 1970
        known = ~np.isnat(self.release[items])
        year = np.where(known, np.clip(years - FIRST_YEAR, 1, YEAR_SLOTS - 1), 0)
        out = np.zeros((len(users), N_FEATURES), np.float32)
        out[:, :N_GENRES] = self.genres[items]
        out[:, COL["year"]] = year
        out[:, COL["age"]] = np.searchsorted(AGE_EDGES, self.age[users], side="right")
        out[:, COL["gender"]] = self.gender[users]
        out[:, COL["occupation"]] = self.occupation[users]
        out[:, COL["zip"]] = self.zip[users]
        out[:, COL["item_id"]] = items
        return out


# ------------------------------------------------------------------ loading
def default_root() -> Path:
    """``$METATTN_DATA/movielens100k``, else ``shared/data/movielens100k`` beside the source
    checkout, else ``../shared/data/movielens100k``."""
    return find_data_root("movielens100k", CHECKOUT_DATA,
                          f"pass root=<folder with u.data, u.item, u.user> (GroupLens "
                          f"publishes ml-100k at {URL})")


def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    if not path.is_file():
        raise DataError(f"MovieLens: {path} is missing; root must hold the ml-100k files "
                        f"u.data, u.item, u.user, u.genre, u.occupation (from {URL})")
    return [ln for ln in path.read_text(encoding=encoding).splitlines() if ln.strip()]


def _bad_line(path: Path, n: int, line: str, why: str) -> DataError:
    return DataError(f"MovieLens: {path} line {n} ({line[:60]!r}) {why}; the file should be "
                     f"the original ml-100k one from {URL}")


def _read_items(root: Path, n_genres: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    path = root / "u.item"
    lines = _lines(path, "latin-1")
    n = len(lines)
    genres = np.zeros((n + 1, n_genres), np.float32)
    release = np.full(n + 1, np.datetime64("NaT"), "datetime64[D]")
    titles = [""] * (n + 1)
    for i, line in enumerate(lines, 1):
        f = line.split("|")
        if len(f) != 5 + n_genres or not f[0].isdigit() or int(f[0]) != i:
            raise _bad_line(path, i, line, f"is not item {i} with {5 + n_genres} fields")
        titles[i] = f[1]
        if f[2]:
            try:
                release[i] = np.datetime64(datetime.strptime(f[2], "%d-%b-%Y").date())
            except ValueError:
                raise _bad_line(path, i, line, "has a release date not like 01-Jan-1995"
                                ) from None
        try:
            genres[i] = [int(g) for g in f[5:]]
        except ValueError:
            raise _bad_line(path, i, line, "has genre flags that are not 0/1") from None
    return genres, release, titles


def _read_users(root: Path, occupations: list[str]) -> tuple[np.ndarray, ...]:
    path = root / "u.user"
    lines = _lines(path)
    n = len(lines)
    age, gender, occ, zips = (np.zeros(n + 1, np.int64) for _ in range(4))
    index = {o: i for i, o in enumerate(occupations)}
    for i, line in enumerate(lines, 1):
        f = line.split("|")
        if (len(f) != 5 or not f[0].isdigit() or int(f[0]) != i or not f[1].isdigit()
                or f[2] not in ("M", "F") or f[3] not in index):
            raise _bad_line(path, i, line, f"is not user {i} as id|age|M or F|occupation|zip "
                            "with an occupation of u.occupation")
        age[i], gender[i], occ[i] = int(f[1]), f[2] == "M", index[f[3]]
        zips[i] = int(f[4][0]) if f[4][:1].isdigit() else 10
    return age, gender, occ, zips


def _read_ratings(root: Path, n_users: int, n_items: int
                  ) -> tuple[np.ndarray, dict[str, int]]:
    rows, skipped = [], {"malformed": 0, "rating_out_of_range": 0, "unknown_user": 0,
                         "unknown_item": 0}
    for line in _lines(root / "u.data"):
        f = line.split("\t")
        if len(f) != 4 or not all(x.strip().isdigit() for x in f):
            skipped["malformed"] += 1
            continue
        u, i, r, t = (int(x) for x in f)
        if not 1 <= r <= 5:
            skipped["rating_out_of_range"] += 1
        elif not 1 <= u <= n_users:
            skipped["unknown_user"] += 1
        elif not 1 <= i <= n_items:
            skipped["unknown_item"] += 1
        else:
            rows.append((u, i, r, t))
    if not rows:
        raise DataError(f"MovieLens: {root / 'u.data'} holds no valid rating line "
                        "(user<TAB>item<TAB>rating<TAB>timestamp)")
    return np.asarray(rows, np.int64), skipped


def load_movielens(root: str | os.PathLike | None = None) -> MovieLens:
    """Read ml-100k from ``root`` (default :func:`default_root`); bad rating lines are
    skipped, counted in ``skipped`` and reported in one warning."""
    root = Path(root).expanduser() if root is not None else default_root()
    genre_names = [ln.split("|")[0] for ln in _lines(root / "u.genre")]
    occupations = [ln.strip() for ln in _lines(root / "u.occupation")]
    if len(genre_names) != N_GENRES or len(occupations) != N_OCCUPATIONS:
        raise DataError(f"MovieLens: {root} lists {len(genre_names)} genres and "
                        f"{len(occupations)} occupations; ml-100k has {N_GENRES} and "
                        f"{N_OCCUPATIONS}")
    genres, release, titles = _read_items(root, N_GENRES)
    age, gender, occ, zips = _read_users(root, occupations)
    ratings, skipped = _read_ratings(root, len(age) - 1, len(titles) - 1)
    bad = {k: v for k, v in skipped.items() if v}
    if bad:
        warnings.warn(f"MovieLens: skipped {sum(bad.values())} lines of {root / 'u.data'}: "
                      + ", ".join(f"{v} {k}" for k, v in bad.items()), stacklevel=2)
    return MovieLens(ratings, genres, release, titles, age, gender, occ, zips, occupations,
                     genre_names, skipped)


# ------------------------------------------------------------------ protocol
@dataclass
class Split:
    """Which users and items are new (boolean masks indexed by id) and the ratings of one
    split and scenario (row indices into ``MovieLens.ratings``) grouped by user."""

    new_user: np.ndarray
    new_item: np.ndarray
    users: np.ndarray
    rows: list[np.ndarray]
    excluded: dict[str, int]


def split_users_items(data: MovieLens, user_seed: int = 0, new_user_fraction: float = 0.2,
                      new_items_from: str = "1997-01-01") -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``new_user [n_users + 1]``, ``new_item [n_items + 1]`` (row 0 unused):
    a seeded ``new_user_fraction`` of users, and the items released on or after
    ``new_items_from``."""
    perm = np.random.default_rng(user_seed).permutation(np.arange(1, data.n_users + 1))
    new_user = np.zeros(data.n_users + 1, bool)
    new_user[perm[: round(new_user_fraction * data.n_users)]] = True
    new_item = data.release >= np.datetime64(date.fromisoformat(new_items_from))
    return new_user, new_item


def protocol_split(data: MovieLens, split: str, scenario: str, min_ratings: int = 13,
                   max_ratings: int = 100, min_tasks_ratings: int = 0, user_seed: int = 0,
                   new_items_from: str = "1997-01-01") -> Split:
    """The users (tasks) of a split and scenario and each one's ratings (see the module
    docstring). ``min_tasks_ratings``: users with fewer ratings are left out, counted."""
    if split not in ("train", "test"):
        raise TaskError(f"MovieLens: split={split!r}; choose 'train' (existing users and "
                        "items) or 'test' (a scenario's new users and/or items)")
    if scenario not in SCENARIOS:
        raise TaskError(f"MovieLens: scenario={scenario!r}; choose one of {SCENARIOS}")
    new_user, new_item = split_users_items(data, user_seed, new_items_from=new_items_from)
    dated = ~np.isnat(data.release)
    u, i = data.ratings[:, 0], data.ratings[:, 1]
    want_new_user = split == "test" and scenario in ("new_users", "both_new")
    want_new_item = split == "test" and scenario in ("new_items", "both_new")
    keep = (new_user[u] == want_new_user) & (new_item[i] == want_new_item) & dated[i]
    idx = np.flatnonzero(keep)
    order = np.argsort(u[idx], kind="stable")
    idx = idx[order]
    users, starts, counts = np.unique(u[idx], return_index=True, return_counts=True)
    ok_range = (counts >= min_ratings) & (counts <= max_ratings)
    ok = ok_range & (counts >= min_tasks_ratings)
    excluded = {"outside_13_100": int((~ok_range).sum()),
                "fewer_than_k_shot_plus_k_query": int((ok_range & ~ok).sum()),
                "undated_item_ratings": int(((new_user[u] == want_new_user) & ~dated[i]).sum())}
    rows = [idx[s:s + c] for s, c, good in zip(starts, counts, ok, strict=True) if good]
    if not rows:
        raise TaskError(f"MovieLens: no user of split={split!r}, scenario={scenario!r} has "
                        f"{max(min_ratings, min_tasks_ratings)} to {max_ratings} ratings; "
                        "lower k_shot")
    return Split(new_user, new_item, users[ok], rows, excluded)


def with_context(x: torch.Tensor, support_x: torch.Tensor, support_y: torch.Tensor
                 ) -> torch.Tensor:
    """Rows ``x [T, N, F]`` with the task's support set appended to each:
    ``[T, N, F + K * (F + 1)]``, the support's features and rating flattened row by row.
    Without a task dimension (``x [N, F]``, ``support_x [K, F]``, ``support_y [K, 1]``) for
    one user, as :meth:`Learner.adapt` takes it."""
    if x.dim() == 2:
        return with_context(x[None], support_x[None], support_y[None])[0]
    ctx = torch.cat([support_x, support_y.to(support_x.dtype)], -1).flatten(1)  # [T, K(F+1)]
    return torch.cat([x, ctx[:, None].expand(-1, x.shape[1], -1)], -1)


class MovieLensTasks:
    """Users as few-shot regression tasks: ``k_shot`` support ratings, ``k_query`` query
    ratings per user, features as in :data:`FEATURES`, targets ``[T, N, 1]`` (the rating).

    Args:
        split: ``"train"`` (existing users, existing items) or ``"test"``.
        scenario: for ``"test"``: ``"new_users"``, ``"new_items"`` or ``"both_new"``.
        k_shot, k_query: support and query ratings per task (MeLU's query: 10).
        root: the ml-100k folder (default :func:`default_root`).
        context: append the support set to every row (:func:`with_context`).
        user_seed: seed of the 80/20 existing / new user split.
        data: an already loaded :class:`MovieLens` (root is then unused).
    """

    def __init__(self, split: str = "train", scenario: Scenario = "new_users",
                 k_shot: int = 10, k_query: int = 10, root: str | None = None,
                 context: bool = False, user_seed: int = 0, data: MovieLens | None = None):
        if k_shot < 1 or k_query < 1:
            raise TaskError(f"MovieLensTasks: k_shot={k_shot}, k_query={k_query}; both must "
                            "be >= 1")
        self.data = data if data is not None else load_movielens(root)
        self.split, self.scenario = split, scenario
        self.k_shot, self.k_query, self.context = int(k_shot), int(k_query), bool(context)
        s = protocol_split(self.data, split, scenario, min_tasks_ratings=k_shot + k_query,
                           user_seed=user_seed)
        self.users, self.rows, self.excluded = s.users, s.rows, s.excluded
        LOG.info("MovieLens %s/%s, K=%d: %d users; left out: %s", split, scenario, k_shot,
                 len(self.users), ", ".join(f"{v} {k}" for k, v in s.excluded.items()))
        self.new_user, self.new_item = s.new_user, s.new_item
        r = self.data.ratings
        self.x = torch.from_numpy(self.data.features(r[:, 0], r[:, 1]))
        self.y = torch.from_numpy(r[:, 2].astype(np.float32))[:, None]

    def __len__(self) -> int:
        return len(self.users)

    def _tasks(self, which: list[int], g: torch.Generator) -> TaskBatch:
        n = self.k_shot + self.k_query
        picked = torch.stack([torch.from_numpy(self.rows[j])[
            torch.randperm(len(self.rows[j]), generator=g)[:n]] for j in which])
        q, s = picked[:, : self.k_query], picked[:, self.k_query:]
        sx, sy, qx, qy = self.x[s], self.y[s], self.x[q], self.y[q]
        if self.context:
            sx, qx = with_context(sx, sx, sy), with_context(qx, sx, sy)
        users = torch.as_tensor(self.users[which], dtype=torch.long)
        return TaskBatch(sx, sy, qx, qy, info={"user": users})

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` users drawn at random (distinct when there are enough), each with
        random support and query ratings."""
        n = len(self.users)
        if num_tasks <= n:
            which = torch.randperm(n, generator=generator)[:num_tasks]
        else:
            which = torch.randint(n, (num_tasks,), generator=generator)
        return self._tasks(which.tolist(), generator)

    def every_user(self, seed: int = 0) -> TaskBatch:
        """Every user of the split once, in id order, with support and query sets drawn
        from ``seed``: the evaluation over users."""
        return self._tasks(list(range(len(self.users))), torch.Generator().manual_seed(seed))

    def item_means(self) -> torch.Tensor:
        """Mean rating of each item (row = item id) over this split's ratings; NaN for items
        it does not rate (the item-mean baseline's table, from the training split)."""
        idx = np.concatenate(self.rows)
        items, r = self.data.ratings[idx, 1], self.data.ratings[idx, 2].astype(np.float64)
        total = np.bincount(items, r, self.data.n_items + 1)
        count = np.bincount(items, minlength=self.data.n_items + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return torch.from_numpy(total / count).float()
