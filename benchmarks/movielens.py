"""Cold-start recommendation on MovieLens 100K (MeLU's protocol, docs/recommendation.md).

Trains the four shipped configs through :func:`metattn.recipe.train` (the global model,
MeLU-style MAML, the attention learner, the attention learner with MAML on top), then scores
every test user of each scenario (new users, new items, both new) with K support and 10
query ratings, and prints one table per scenario: MAE, RMSE, nDCG@1 and nDCG@3, each the
mean ± 95% CI over users (each user's value averaged over ``--draws`` seeded draws of its
support and query sets), beside MeLU's MovieLens-1M MAE (indicative only: another data set).
Non-meta baselines: the item mean (over the meta-training ratings; the global mean for an
item they do not rate), the user mean (of the support ratings), the global model, and the
global model fine-tuned on the support set (MeLU's local update: 5 steps of 0.01 on the
decision layers). Last, the paired per-user differences of the attention learners against
MeLU-style MAML and the fine-tuned global model (per-user differences cancel the spread
between users, so a paired CI that excludes 0 is a difference the table's CIs can hide).

    python benchmarks/movielens.py --out runs/bench-movielens          # ~10 min, 2 cores
    python benchmarks/movielens.py --quick                             # smoke run, ~1 min
    python benchmarks/movielens.py --reuse --out runs/bench-movielens  # re-score the runs

The table is also written to ``OUT/table.json`` and ``OUT/table.md``; each run directory is
``OUT/<config name>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import metattn.recipe as recipe
from metattn.config import load
from metattn.data.movielens import COL, SCENARIOS, MovieLensTasks, load_movielens
from metattn.data.tasks import TaskBatch, mean_ci95
from metattn.meta.ranking import RatingMAML, rating_metrics
from metattn.reports import fmt, print_table

CONFIGS = {"global model": "movielens_global", "MeLU-style MAML": "movielens_melu",
           "attention": "movielens_attention", "attention + MAML": "movielens_attention_maml"}
# MeLU-5 MAE on MovieLens-1M (Lee et al. KDD 2019; /work/shared/REFERENCES.md)
ANCHOR = {"new_users": "0.7854 (MeLU-5, ML-1M)", "new_items": "0.9275 (MeLU-5, ML-1M)",
          "both_new": "0.9235 (MeLU-5, ML-1M)"}
METRICS = ("mae", "rmse", "ndcg@1", "ndcg@3")
# per-user differences printed under each table (lower MAE / higher nDCG is better)
PAIRS = [(a, b) for a in ("attention", "attention + MAML")
         for b in ("MeLU-style MAML", "global model, fine-tuned")]


def train_runs(args: argparse.Namespace) -> dict[str, RatingMAML]:
    """Train (or, with --reuse, load) each config; the trained learners by method name."""
    out: dict[str, RatingMAML] = {}
    for method, name in CONFIGS.items():
        run = args.out / name
        sets = [f"task.k_shot={args.k_shot}", "train.progress=false",
                f"train.threads={args.threads}", *args.set]
        if args.root:
            sets.append(f"task.root={args.root}")
        if args.quick:
            sets += ["train.steps=30", "train.checkpoint_every=30", "eval.episodes=20"]
        if not (args.reuse and (run / "summary.json").is_file()):
            shutil.rmtree(run, ignore_errors=True)
            t = time.perf_counter()
            recipe.train(load(name, sets), run)
            print(f"{name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
        out[method] = recipe.load_run(run)[1]
    glob = out["global model"]
    out["global model, fine-tuned"] = RatingMAML(
        glob.model, inner_lr=0.01, inner_steps=5, inner_params=["fc1", "fc2", "out"]).eval()
    return out


def baselines(batch: TaskBatch, item_means: torch.Tensor, global_mean: float
              ) -> dict[str, torch.Tensor]:
    """Item-mean and user-mean predictions ``[T, Q, 1]``."""
    means = item_means[batch.query_x[..., COL["item_id"]].long()]
    item = torch.where(means.isnan(), torch.full_like(means, global_mean), means)[..., None]
    user = batch.support_y.mean(1, keepdim=True).expand_as(batch.query_y)
    return {"item mean": item, "user mean": user}


def score(learners: dict[str, RatingMAML], data, args: argparse.Namespace, scenario: str,
          item_means: torch.Tensor, global_mean: float) -> dict[str, dict[str, torch.Tensor]]:
    """Per-user metrics ``[users]`` of every method, averaged over the seeded draws."""
    plain = MovieLensTasks("test", scenario, k_shot=args.k_shot, data=data)
    ctx = MovieLensTasks("test", scenario, k_shot=args.k_shot, data=data, context=True)
    per: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(method: str, metrics: dict[str, torch.Tensor]) -> None:
        for k in METRICS:
            per.setdefault(method, {}).setdefault(k, []).append(metrics[k].double())

    for d in range(args.draws):
        b, bc = plain.every_user(args.seed + d), ctx.every_user(args.seed + d)
        for method, pred in baselines(b, item_means, global_mean).items():
            add(method, rating_metrics(pred, b.query_y))
        for method, learner in learners.items():
            with torch.no_grad():
                add(method, learner.evaluate(bc if "attention" in method else b))
    return {m: {k: torch.stack(v).mean(0) for k, v in ks.items()} for m, ks in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-movielens"))
    p.add_argument("--root", default=None, help="the ml-100k folder (default: shared data)")
    p.add_argument("--k-shot", type=int, default=10)
    p.add_argument("--draws", type=int, default=5, help="support/query draws per test user")
    p.add_argument("--seed", type=int, default=0, help="seed of the first draw")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="30 training steps: a smoke run")
    p.add_argument("--reuse", action="store_true", help="load finished runs in --out")
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every config")
    args = p.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_movielens(args.root)
    learners = train_runs(args)
    train = MovieLensTasks("train", k_shot=args.k_shot, data=data)
    item_means = train.item_means()
    global_mean = float(train.y[torch.from_numpy(np.concatenate(train.rows))].mean())
    table: dict[str, dict] = {}
    md = [f"K = {args.k_shot} support ratings, 10 query ratings, {args.draws} draws per "
          "user; mean ± 95% CI over users", ""]
    for scenario in SCENARIOS:
        res = score(learners, data, args, scenario, item_means, global_mean)
        users = len(next(iter(res.values()))["mae"])
        rows, table[scenario] = [], {"users": users}
        for method, m in res.items():
            stats = {k: mean_ci95(m[k]) for k in METRICS}
            table[scenario][method] = stats
            rows.append([method, *(fmt(*stats[k]) for k in METRICS),
                         ANCHOR[scenario] if method == "MeLU-style MAML" else ""])
        md += [f"**{scenario}** ({users} users)", "",
               "| method | MAE | RMSE | nDCG@1 | nDCG@3 | paper MAE |", "|---|---|---|---|---|---|",
               *("| " + " | ".join(r) + " |" for r in rows), ""]
        left = MovieLensTasks("test", scenario, k_shot=args.k_shot, data=data).excluded
        print(f"{scenario}: left out " + ", ".join(f"{v} {k}" for k, v in left.items()))
        print_table(f"MovieLens 100K, {scenario}: {users} users, K = {args.k_shot} support, "
                    f"10 query ratings, {args.draws} draws per user",
                    ["method", "MAE", "RMSE", "nDCG@1", "nDCG@3", "paper MAE"], rows)
        for ours, other in PAIRS:
            diff = {k: mean_ci95(res[ours][k] - res[other][k]) for k in METRICS}
            table[scenario][f"{ours} - {other} (paired)"] = diff
            line = (f"{ours} - {other}, paired over users: "
                    + ", ".join(f"{k} {fmt(*v)}" for k, v in diff.items()))
            print("  " + line)
            md.append(f"- {line}")
        md.append("")
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s, {args.threads} thread(s), torch {torch.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(
        {"k_shot": args.k_shot, "draws": args.draws, "seconds": round(seconds, 1),
         "table": table}, indent=1))
    (args.out / "table.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
