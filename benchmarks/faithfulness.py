"""Does the attention matter? The deletion test of :mod:`metattn.meta.faithfulness` on the
attention learners' Omniglot runs (and any run directory given, e.g. an intent run).

For each config it trains a short run (``--seconds`` of training, the cosine schedule fitted
to it) unless ``--runs`` names existing run directories, then, on the run's fixed test
episodes, removes from each query's attention the most attended key, a random one or the
least attended one and prints how often the prediction changes and how much the true
class's probability drops (text runs over a Hugging Face encoder, e.g. configs/
clinc150_heldout_protonet.yaml: also the query token that flows most into the sentence
embedding, a random one or the least, masked with the pad id: ``top token`` etc.;
in-context regression runs: how far the prediction moves and how much its squared error
grows): mean ± 95% CI over the episodes. Also the run's test metric,
for context. The table is written to ``OUT/faithfulness.json`` too.

    python benchmarks/faithfulness.py --seconds 240 --threads 2 --set train.autocast=auto \\
        --set model.channels_last=true --out runs/bench-faith
    python benchmarks/faithfulness.py --runs runs/omniglot_5w1s_matching runs/intents_matching
    python benchmarks/faithfulness.py --configs configs/clinc150_heldout_protonet.yaml \\
        --seconds 120 --episodes 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from metattn.config import load
from metattn.data.tasks import fixed_episodes
from metattn.meta.faithfulness import faithfulness_table, token_deletion
from metattn.meta.metric import MetricLearner, ProtoNet
from metattn.recipe import load_run, train
from metattn.recipe.build import build_tasks
from metattn.reports import fmt, print_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [f"configs/omniglot_{s}_{learner}.yaml" for s in ("5w1s", "5w5s")
           for learner in ("matching", "feat")]


def _train(config: str, args: argparse.Namespace) -> Path:
    out = Path(args.out) / Path(config).stem
    overrides = [f"train.max_seconds={args.seconds}", "train.eval_every=0",
                 "train.checkpoint_every=0", "train.progress=false",
                 "train.tensorboard=false", "train.plots=false", "train.schedule=cosine"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    cfg = load(ROOT / config, overrides + list(args.set))
    if not (out / "summary.json").exists():
        train(cfg, out)
    return out


LABELS = {"changed": "prediction changed", "true_prob_drop": "true-class prob. drop",
          "abs_change": "|prediction change|", "error_increase": "squared error increase"}


def _tests(learner: Any) -> list[tuple[str, Any]]:
    """The deletion tests that apply: the attention over the support set (or the prompt),
    and, over a text encoder, the tokens of the query sentence."""
    text = isinstance(learner, MetricLearner) and hasattr(learner.model, "pad_id")
    out = [] if text and isinstance(learner, ProtoNet) else [("", None)]
    return out + [(" token", token_deletion)] if text else out


def measure(run: Path, episodes: int | None) -> tuple[tuple[str, ...], list[list[Any]]]:
    """The measures' names and the table's rows for one run directory (a text run: one row
    per removal of a support key and of a query token, ``top token`` etc.)."""
    cfg, learner = load_run(run, device="cpu")
    _, test = build_tasks(cfg)
    n = episodes or cfg.eval.episodes
    batches = fixed_episodes(test, n, cfg.eval.seed, cfg.eval.chunk)
    summary = json.loads((run / "summary.json").read_text())
    scale = 100 if summary["metric"] == "accuracy" else 1
    score = f"{summary['metric']} {fmt(scale * summary['mean'], scale * summary['ci95'])}"
    task = cfg.test_task_spec()
    setting = (f"{task.get('n_way')}-way {task.get('k_shot')}-shot" if task.get("n_way")
               else f"{task.get('kind')}, k = {task.get('k_shot')}")
    out: list[list[Any]] = []
    for what, deletion in _tests(learner):
        t0 = time.perf_counter()
        rows = faithfulness_table(learner, batches, cfg.eval.seed, test=deletion)
        seconds = time.perf_counter() - t0
        keys = tuple(k for k in rows[0] if k in LABELS)
        out += [[cfg.name, setting, type(learner).__name__, score, r["removal"] + what,
                  *(fmt(r[k], r[f"{k}_ci95"]) for k in keys), r["episodes"], f"{seconds:.0f}"]
                 for r in rows]
    return keys, out


def main(argv: list[str] | None = None) -> dict[str, list[list[Any]]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=CONFIGS, help="configs to train and test")
    p.add_argument("--runs", nargs="*", default=None,
                   help="existing run directories instead of training the configs")
    p.add_argument("--seconds", type=int, default=120, help="training seconds per config")
    p.add_argument("--episodes", type=int, default=None,
                   help="test episodes (default: each run's eval.episodes)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the trained runs (repeatable)")
    p.add_argument("--out", default="runs/bench-faithfulness")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [Path(r) for r in args.runs] if args.runs else [_train(c, args) for c in args.configs]
    tables: dict[tuple[str, ...], list[list[Any]]] = {}
    for run in runs:
        keys, rows = measure(run, args.episodes)
        tables.setdefault(keys, []).extend(rows)
    for keys, rows in tables.items():
        print_table("Faithfulness: remove one attended key per query (mean ± 95% CI over "
                    "episodes)", ["run", "setting", "learner", "test metric", "removed",
                                  *(LABELS[k] for k in keys), "episodes", "s"], rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = {" / ".join(k): rows for k, rows in tables.items()}
    (Path(args.out) / "faithfulness.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
