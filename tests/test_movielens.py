"""MovieLens cold-start tasks: the loader (counts, bad lines), the MeLU protocol split (no new
user in meta-training, no query rating in a support set), the rating metrics against hand
values, the set model's leave-one-out, and a short run against the item-mean baseline."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from metattn.data import movielens as ml
from metattn.data.tasks import TaskBatch
from metattn.errors import DataError, TaskError
from metattn.meta.ranking import RatingMAML, mae, ndcg_at_k, rating_metrics, rmse
from metattn.nn.recsys import MeLU, RatingSetTransformer


def _real_root() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    candidates = [here.parent / "shared" / "data" / "movielens100k"]
    if os.environ.get("METATTN_DATA"):
        candidates.append(Path(os.environ["METATTN_DATA"]) / "movielens100k")
    return next((c for c in candidates if (c / "u.data").is_file()), None)


REAL = _real_root()
needs_data = pytest.mark.skipif(REAL is None, reason="MovieLens 100K data folder not found")


@pytest.fixture(scope="module")
def real() -> ml.MovieLens:
    return ml.load_movielens(REAL)


# ------------------------------------------------------------------ a tiny fake release
def _fake(root: Path, data_lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.genre").write_text("".join(f"g{i}|{i}\n" for i in range(19)))
    occ = [f"occ{i}" for i in range(21)]
    (root / "u.occupation").write_text("\n".join(occ) + "\n")
    flags = "|".join(["0"] * 18 + ["1"])
    (root / "u.item").write_bytes("".join(
        f"{i}|Caf\u00e9 {i} (1996)|01-Jan-199{5 + i % 3}||http://x|{flags}\n"
        for i in range(1, 5)).encode("latin-1"))
    (root / "u.user").write_text("1|24|M|occ0|85711\n2|53|F|occ3|T8H1N\n")
    (root / "u.data").write_text("".join(line + "\n" for line in data_lines))
    return root


def test_bad_rating_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = ["1\t1\t5\t881250949", "1\t2\t3\t881250950", "2\t3\t4\t881250951",
             "1\t2", "x\t1\t4\t1", "1\t1\t9\t1", "7\t1\t4\t1", "1\t99\t4\t1"]
    with pytest.warns(UserWarning, match="skipped 5 lines"):
        d = ml.load_movielens(_fake(tmp_path / "ml", lines))
    assert len(d.ratings) == 3
    assert d.skipped == {"malformed": 2, "rating_out_of_range": 1, "unknown_user": 1,
                         "unknown_item": 1}
    assert d.titles[1].startswith("Caf\u00e9")  # Latin-1 read as such
    f = d.features(np.array([1, 2]), np.array([1, 3]))
    assert f.shape == (2, ml.N_FEATURES)
    assert f[1, ml.COL["zip"]] == 10 and f[0, ml.COL["zip"]] == 8  # non-digit zip, first digit
    assert f[0, ml.COL["age"]] == 1 and f[1, ml.COL["age"]] == 5  # 24 -> 18-24, 53 -> 50-55
    assert f[0, ml.COL["year"]] == 1996 - ml.FIRST_YEAR and f[1, ml.COL["item_id"]] == 3


def test_missing_or_broken_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="u.genre is missing.*grouplens"):
        ml.load_movielens(tmp_path / "nothing")
    root = _fake(tmp_path / "ml", ["1\t1\t5\t1"])
    (root / "u.user").write_text("1|24|M|astronaut|85711\n")
    with pytest.raises(DataError, match="u.user line 1"):
        ml.load_movielens(root)


@needs_data
def test_loader_counts(real: ml.MovieLens) -> None:
    assert real.ratings.shape == (100_000, 4)
    assert len(np.unique(real.ratings[:, 0])) == real.n_users == 943
    assert len(np.unique(real.ratings[:, 1])) == real.n_items == 1682
    assert set(np.unique(real.ratings[:, 2])) == {1, 2, 3, 4, 5}
    assert not any(real.skipped.values())
    assert int(np.isnat(real.release[1:]).sum()) == 1  # item 267 has no release date


@needs_data
@pytest.mark.parametrize("scenario", ml.SCENARIOS)
def test_split_is_disjoint(real: ml.MovieLens, scenario: str) -> None:
    train = ml.MovieLensTasks("train", k_shot=5, data=real)
    test = ml.MovieLensTasks("test", scenario, k_shot=5, data=real)
    new_users = scenario in ("new_users", "both_new")
    new_items = scenario in ("new_items", "both_new")
    # no new user, and no new item, in meta-training
    assert not train.new_user[train.users].any()
    train_items = real.ratings[np.concatenate(train.rows), 1]
    assert not train.new_item[train_items].any()
    assert bool(test.new_user[test.users].all()) == new_users
    assert not new_users or not set(test.users) & set(train.users)
    test_items = real.ratings[np.concatenate(test.rows), 1]
    assert test.new_item[test_items].all() == new_items
    # every user has 13-100 ratings in the scenario, and at least K + 10
    counts = np.array([len(r) for r in test.rows])
    assert counts.min() >= 15 and counts.max() <= 100
    # every user with a rating in the scenario is a task or counted as left out
    u, i = real.ratings[:, 0], real.ratings[:, 1]
    seen = (test.new_user[u] == new_users) & (test.new_item[i] == new_items) & \
        ~np.isnat(real.release[i])
    left = test.excluded["outside_13_100"] + test.excluded["fewer_than_k_shot_plus_k_query"]
    assert len(np.unique(u[seen])) == len(test.users) + left
    # no query rating in any support set (a user rates an item once)
    b = test.every_user(seed=3)
    assert b.num_tasks == len(test.users) and b.support_x.shape[1:] == (5, ml.N_FEATURES)
    col = ml.COL["item_id"]
    for t in range(b.num_tasks):
        assert not set(b.support_x[t, :, col].tolist()) & set(b.query_x[t, :, col].tolist())
    assert torch.equal(b.info["user"], torch.as_tensor(test.users))
    # fixed episodes: the same seed draws the same sets
    assert torch.equal(test.every_user(seed=3).query_x, b.query_x)


@needs_data
def test_context_rows_carry_the_support_set(real: ml.MovieLens) -> None:
    tasks = ml.MovieLensTasks("train", k_shot=5, data=real, context=True)
    b = tasks.sample(3, torch.Generator().manual_seed(0))
    F = ml.N_FEATURES
    assert b.query_x.shape == (3, 10, F + 5 * (F + 1))
    ctx = b.query_x[1, 4, F:].unflatten(-1, (5, F + 1))
    assert torch.equal(ctx[:, :F], b.support_x[1, :, :F])
    assert torch.equal(ctx[:, F:], b.support_y[1])
    one = ml.with_context(b.query_x[1, :, :F], b.support_x[1, :, :F], b.support_y[1])
    assert torch.equal(one, b.query_x[1])


def test_unknown_split_or_scenario_is_refused(tmp_path: Path) -> None:
    d = ml.load_movielens(_fake(tmp_path / "ml", ["1\t1\t5\t1"]))
    with pytest.raises(TaskError, match="scenario"):
        ml.protocol_split(d, "test", "cold")
    with pytest.raises(TaskError, match="no user"):
        ml.protocol_split(d, "train", "new_users")


# ------------------------------------------------------------------ metrics
def test_metrics_against_hand_values() -> None:
    pred = torch.tensor([[3.0, 2.0, 1.0], [4.0, 4.0, 4.0]])
    true = torch.tensor([[1.0, 5.0, 3.0], [4.0, 2.0, 5.0]])
    assert torch.allclose(mae(pred, true), torch.tensor([(2 + 3 + 2) / 3, (0 + 2 + 1) / 3],
                                                        dtype=torch.float64))
    assert rmse(pred, true)[0].item() == pytest.approx(math.sqrt((4 + 9 + 4) / 3))
    # task 0: gains 2^r - 1 = 1, 31, 7 in predicted order; ideal order 31, 7, 1
    dcg3 = 1 + 31 / math.log2(3) + 7 / 2
    idcg3 = 31 + 7 / math.log2(3) + 1 / 2
    assert ndcg_at_k(pred, true, 3)[0].item() == pytest.approx(dcg3 / idcg3)
    assert ndcg_at_k(pred, true, 1)[0].item() == pytest.approx(1 / 31)
    # task 1: a constant prediction ties everything: each position gets the mean gain
    # (15 + 3 + 31) / 3; ideal 31, 15, 3
    mean_gain = (15 + 3 + 31) / 3
    assert ndcg_at_k(pred, true, 1)[1].item() == pytest.approx(mean_gain / 31)
    ideal = 31 + 15 / math.log2(3) + 3 / 2
    assert ndcg_at_k(pred, true, 3)[1].item() == pytest.approx(
        mean_gain * (1 + 1 / math.log2(3) + 1 / 2) / ideal)
    # a perfect ranking scores 1 at any k; k beyond the set counts the whole set
    assert torch.allclose(ndcg_at_k(true, true, 2), torch.ones(2, dtype=torch.float64))
    assert ndcg_at_k(pred, true, 10)[0].item() == pytest.approx(dcg3 / idcg3)
    m = rating_metrics(pred[..., None], true[..., None])
    assert set(m) == {"mae", "rmse", "ndcg@1", "ndcg@3"} and m["mae"].shape == (2,)


# ------------------------------------------------------------------ models
def _rows(T: int, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.zeros(T, n, ml.N_FEATURES)
    x[..., :19] = (torch.rand(T, n, 19, generator=g) < 0.2).float()
    for name, hi in (("year", 81), ("age", 7), ("gender", 2), ("occupation", 21), ("zip", 11)):
        x[..., ml.COL[name]] = torch.randint(hi, (T, n), generator=g).float()
    x[..., ml.COL["item_id"]] = torch.randperm(1682, generator=g)[: T * n].view(T, n) + 1.0
    return x


def test_set_model_predicts_a_support_rating_from_the_others_only() -> None:
    g = torch.Generator().manual_seed(0)
    sx, qx = _rows(1, 5, g), _rows(1, 3, g)
    sy = torch.randint(1, 6, (1, 5, 1), generator=g).float()
    model = RatingSetTransformer(dim=8, d_model=16, n_heads=2, n_layers=1, hidden=16,
                                 n_items=1682)
    with torch.no_grad():
        model.out.weight.normal_()  # a non-trivial correction to the support mean

        def run(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (model(ml.with_context(sx, sx, y)), model(ml.with_context(qx, sx, y)))

        s0, q0 = run(sy)
        changed = sy.clone()
        changed[0, 2, 0] = 6 - changed[0, 2, 0] if changed[0, 2, 0] != 3 else 5
        s1, q1 = run(changed)
    assert s0.shape == (1, 5, 1) and q0.shape == (1, 3, 1)
    assert torch.equal(s0[0, 2], s1[0, 2])  # its own rating is not seen
    assert not torch.allclose(s0[0, [0, 1, 3, 4]], s1[0, [0, 1, 3, 4]])
    assert not torch.allclose(q0, q1)
    with pytest.raises(TaskError, match="context=True"):
        model(sx)


def test_unseen_item_ids_keep_a_zero_embedding() -> None:
    model = MeLU(dim=4, hidden=8, n_items=10)
    x = _rows(1, 4, torch.Generator().manual_seed(1))
    x[..., ml.COL["item_id"]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    batch = TaskBatch(x, torch.full((1, 4, 1), 4.0), x, torch.full((1, 4, 1), 4.0))
    learner = RatingMAML(model, inner_steps=0)
    opt = torch.optim.Adam(learner.parameters(), 0.01)
    for _ in range(3):
        opt.zero_grad()
        learner.meta_loss(batch)[0].backward()
        opt.step()
    w = model.embed.item_id.weight
    assert w[1:5].abs().sum() > 0 and w[5:].abs().sum() == 0


# ------------------------------------------------------------------ learning
@pytest.fixture
def one_thread():
    """Small models train fastest on one thread (and do not fight other processes)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@needs_data
def test_a_short_run_beats_the_item_mean(real: ml.MovieLens, one_thread: None) -> None:
    torch.manual_seed(0)
    train = ml.MovieLensTasks("train", k_shot=10, data=real)
    test = ml.MovieLensTasks("test", "new_users", k_shot=10, data=real)
    learner = RatingMAML(MeLU(), inner_lr=0.01, inner_steps=1, inner_params=["fc1", "fc2", "out"])
    opt = torch.optim.Adam(learner.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):  # (about 5 s on one thread)
        opt.zero_grad()
        learner.meta_loss(train.sample(32, g))[0].backward()
        opt.step()
    batch = test.every_user(seed=0)
    ours = learner.eval().evaluate(batch)["mae"].mean()
    means = train.item_means()[batch.query_x[..., ml.COL["item_id"]].long()]
    fallback = torch.nanmean(means)
    baseline = mae(torch.where(means.isnan(), fallback, means), batch.query_y[..., 0]).mean()
    assert ours < baseline


@needs_data
def test_the_recipe_trains_a_shipped_config(tmp_path: Path) -> None:
    from metattn.config import load
    from metattn.recipe import train

    cfg = load("movielens_attention_maml", [
        "train.steps=2", "train.meta_batch=4", "train.checkpoint_every=2",
        "eval.episodes=8", "train.progress=false", "train.tensorboard=false",
        f"task.root={REAL}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real data skips no line
        summary = train(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "summary.json").read_text())["results"]
    assert summary["episodes"] == 8
    for key in ("mae", "rmse", "ndcg@1", "ndcg@3", "mse"):
        assert math.isfinite(res[key]) and f"{key}_ci95" in res
