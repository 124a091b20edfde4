"""Protocol (b) of benchmarks/intent.py: N-way K-shot episodes on held-out intents.

Every learner over the same encoder (all-MiniLM-L6-v2), evaluated on the same 600 fixed,
seeded episodes of each setting (5/10-way, 1/5-shot, 5 queries per intent) drawn from the
official test split of intents never seen in meta-training (CLINC150: 3 held-out domains;
Banking77: 27 written-down intents):

* no meta-training: ``protonet (frozen)`` (nearest prototype of the pretrained embeddings)
  and ``logreg (frozen)`` (logistic regression fitted on each episode's support);
* meta-trained on the other intents' train split, ``--budget`` seconds each through the
  recipe: ``protonet``, ``matching``, ``feat`` (the top 2 layers train;
  ``configs/<dataset>_heldout_protonet.yaml``) and ``maml``, ``fomaml``, ``anil`` (the top
  layer and a 5-way head; ``configs/<dataset>_heldout_maml.yaml``; a 5-way head gives no
  10-way numbers). MAML and first-order MAML adapt a Transformer layer in every test episode
  (about 0.5 s each on 2 CPU cores): they run on the first ``--maml-episodes`` of the same
  fixed episodes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import metattn.recipe as recipe
from metattn import registry
from metattn.config import load
from metattn.data.tasks import TaskBatch, fixed_episodes, mean_ci95
from metattn.recipe.build import build_learner
from metattn.recipe.evaluation import evaluate
from metattn.reports import print_table

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(5, 1), (5, 5), (10, 1), (10, 5)]
# name -> (base config, overrides)
LEARNERS: dict[str, tuple[str, list[str]]] = {
    "protonet": ("protonet", []),
    "matching": ("protonet", ["learner={kind: matching}"]),
    "feat": ("protonet", ["learner={kind: feat}"]),
    "maml": ("maml", []),
    "fomaml": ("maml", ["learner.kind=fomaml"]),
    "anil": ("maml", ["learner.kind=anil", "learner.inner_params=head"]),
}


def _config(dataset: str, base: str) -> Path:
    return ROOT / "configs" / f"{dataset}_heldout_{base}.yaml"


def episodes_of(dataset: str, n: int, k: int, episodes: int) -> list[TaskBatch]:
    """The fixed test episodes of one setting (the configs' eval seed and chunking)."""
    cfg = load(_config(dataset, "protonet"), [f"eval.task.n_way={n}", f"eval.task.k_shot={k}",
                                              "eval.task.k_query=5"])
    sampler = registry.build("task", cfg.test_task_spec(), "test")
    return fixed_episodes(sampler, episodes, cfg.eval.seed, cfg.eval.chunk)


def logreg_episodes(encoder: torch.nn.Module, eps: list[TaskBatch]) -> tuple[float, float]:
    """Logistic regression (C=10) on each episode's frozen support embeddings."""
    from sklearn.linear_model import LogisticRegression

    accs = []
    with torch.no_grad():
        for batch in eps:
            zs, zq = encoder(batch.support_x), encoder(batch.query_x)
            for t in range(batch.num_tasks):
                model = LogisticRegression(C=10.0, max_iter=2000)
                model.fit(zs[t].numpy(), batch.support_y[t].numpy())
                accs.append(float((model.predict(zq[t].numpy()) == batch.query_y[t].numpy())
                                  .mean()))
    return mean_ci95(accs)


def trained(dataset: str, name: str, out: Path, budget: float, quick: bool) -> Any:
    """The learner ``name`` meta-trained on the dataset's training intents (cached run)."""
    base, overrides = LEARNERS[name]
    run = out / f"{dataset}_heldout_{name}"
    if not (run / "summary.json").exists():
        extra = [f"train.max_seconds={budget}", "train.progress=false", "train.plots=false",
                 "eval.episodes=50"] + (["train.steps=3"] if quick else [])
        recipe.train(load(_config(dataset, base), overrides + extra), run)
    _, learner = recipe.load_run(run)
    if name not in ("maml", "fomaml"):  # nothing below the head adapts: cache every layer
        learner.model.freeze()
    return learner


def run_episodes(args: argparse.Namespace) -> None:
    """Protocol (b): every learner, ``args.episodes`` fixed episodes per setting."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "episodes.json"
    done: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
    for dataset in args.datasets:
        eps = {s: episodes_of(dataset, *s, args.episodes) for s in SETTINGS}
        frozen = build_learner(load(_config(dataset, "protonet")))
        frozen.model.freeze()
        for name in ["protonet (frozen)", "logreg (frozen)", *LEARNERS]:
            key = f"{dataset}/{name}"
            if key in done:
                continue
            learner = (frozen if name == "protonet (frozen)" else None if name.startswith(
                "logreg") else trained(dataset, name, out, args.budget, args.quick))
            row = {}
            for (n, k), batches in eps.items():
                if name in ("maml", "fomaml", "anil") and n != 5:
                    continue  # a 5-way head
                if name in ("maml", "fomaml"):  # the top layer adapts in every episode
                    batches = _first(batches, args.maml_episodes)
                if learner is None:
                    row[f"{n}w{k}s"] = logreg_episodes(frozen.model, batches)
                else:
                    res = evaluate(learner, batches, torch.device("cpu"), torch.float32)
                    row[f"{n}w{k}s"] = (res["accuracy"], res["accuracy_ci95"])
            done[key] = row
            cache.write_text(json.dumps(done, indent=1))
            print(f"[intent] {key}: {row}", flush=True)
        cols = [f"{n}w{k}s" for n, k in SETTINGS]
        rows = [[name] + [_fmt(done[f"{dataset}/{name}"].get(c)) for c in cols]
                for name in ["protonet (frozen)", "logreg (frozen)", *LEARNERS]]
        print_table(f"{dataset}: held-out intents, accuracy % over {args.episodes} fixed "
                    "episodes (95% CI), 5 queries per intent", ["learner", *cols], rows)


def _first(batches: list[TaskBatch], n: int) -> list[TaskBatch]:
    """The first ``n`` episodes of a fixed list (the same for every learner)."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b if b.num_tasks <= left else TaskBatch(
            b.support_x[:left], b.support_y[:left], b.query_x[:left], b.query_y[:left],
            n_way=b.n_way, k_shot=b.k_shot, check_labels=False))
        left -= out[-1].num_tasks
    return out


def _fmt(cell: Any) -> str:
    return "—" if cell is None else f"{100 * cell[0]:.2f} ± {100 * cell[1]:.2f}"
