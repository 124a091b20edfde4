"""Few-shot intent classification with a pretrained Transformer, ours beside the published.

Two protocols (docs/intent.md), one encoder (all-MiniLM-L6-v2 from PyPI):

``leaderboard`` (a): K labelled examples per intent for ALL intents (CLINC150: 150, Banking77:
77), accuracy on the official test split, mean and 95% CI (Student t) over 5 seeds of the
K-shot draw. Only the K shots ever train. Learners:

* ``logreg``: frozen sentence embeddings + logistic regression (C=10), the REFERENCES.md
  baseline; ``protonet``: frozen embeddings, nearest prototype (cosine);
* ``finetune``: the top 2 layers + a linear head trained with cross-entropy on the K shots
  (the same steps and sentences per step as ProtoNet's fine-tuning);
* ``protonet_ft``: ProtoNet with episodic fine-tuning (``configs/<dataset>_10shot_protonet``
  through the recipe: its final evaluation IS the protocol); ``protonet_ft+logreg``:
  logistic regression on its fine-tuned embeddings.

``episodes`` (b): N-way K-shot episodes on held-out intents (CLINC150: 3 held-out domains;
Banking77: 27 written-down intents), 600 fixed episodes per setting; see its docstring.

    python benchmarks/intent.py leaderboard --out runs/bench-intent
    python benchmarks/intent.py leaderboard --datasets banking77 --shots 10 --seeds 2 --quick
    python benchmarks/intent.py episodes --out runs/bench-intent
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import metattn.recipe as recipe  # noqa: E402
from metattn.config import load  # noqa: E402
from metattn.data.intents import IntentData, few_shot_rows, load_intents, tokenize  # noqa: E402
from metattn.nn.hf import HFEncoder, pretrained_path  # noqa: E402
from metattn.reports import print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from intent_episodes import run_episodes  # noqa: E402

# /work/shared/REFERENCES.md, "Few-shot intent classification": (dataset, K) -> method -> %.
PUBLISHED = {
    ("clinc150", 5): {"USE+ConveRT": 90.49, "DNNC": 91.02, "CPFT": 92.34},
    ("clinc150", 10): {"USE+ConveRT": 93.26, "DNNC": 93.76, "CPFT": 94.18},
    ("banking77", 5): {"USE+ConveRT": 77.75, "DNNC": 80.40, "CPFT": 80.86},
    ("banking77", 10): {"USE+ConveRT": 85.19, "DNNC": 86.71, "CPFT": 87.20},
}


def t_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (few seeds: not the normal one)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1)
                                  / np.sqrt(len(v)))


def token_ids(texts: list[str]) -> torch.Tensor:
    """MiniLM's token ids of ``texts`` (tokenised once per cell, shared by every learner)."""
    return torch.as_tensor(tokenize(texts, pretrained_path("minilm"))[0])


def logreg(x: torch.Tensor, y: np.ndarray, xt: torch.Tensor) -> np.ndarray:
    """Logistic regression (C=10) on unit-length embeddings; predictions for ``xt``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=3000)
    model.fit(F.normalize(x, dim=-1).numpy(), y)
    return model.predict(F.normalize(xt, dim=-1).numpy())


def nearest_prototype(x: torch.Tensor, y: np.ndarray, xt: torch.Tensor, n: int) -> np.ndarray:
    """The class whose mean unit embedding is most cosine-similar."""
    protos = torch.stack([F.normalize(x, dim=-1)[torch.as_tensor(y == c)].mean(0)
                          for c in range(n)])
    return (F.normalize(xt, dim=-1) @ F.normalize(protos, dim=-1).T).argmax(1).numpy()


def finetune(data: IntentData, rows: np.ndarray, ids: torch.Tensor, steps: int, batch: int,
             lr: float, seed: int) -> HFEncoder:
    """The non-meta baseline: top 2 layers + a linear head, cross-entropy on the K shots."""
    torch.manual_seed(seed)
    enc = HFEncoder(n_classes=len(data.intents), frozen_layers=4)
    y = torch.as_tensor(data.labels["train"][rows])
    body = [p for n, p in enc.named_parameters() if p.requires_grad and not n.startswith("head")]
    # a new head starts from random: it needs a larger rate than the pretrained layers
    opt = torch.optim.AdamW([{"params": body, "lr": lr},
                             {"params": enc.head.parameters(), "lr": 1e-2}])
    g = torch.Generator().manual_seed(seed)
    enc.train()
    for _ in range(steps):
        pick = torch.randperm(len(rows), generator=g)[:batch]
        width = int((ids[pick] != enc.pad_id).sum(1).max())
        loss = F.cross_entropy(enc(ids[pick, :width]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc.eval()


def leaderboard_cell(data: IntentData, k: int, seed: int, out: Path, quick: bool
                     ) -> dict[str, float]:
    """Every learner's test accuracy (%) for one K-shot draw."""
    n, y_test = len(data.intents), data.labels["test"]
    shots = few_shot_rows(data.labels["train"], range(n), k, seed, data.intents)
    rows = np.concatenate([shots[c] for c in range(n)])
    y = data.labels["train"][rows]
    train_ids = token_ids([data.texts["train"][i] for i in rows])
    test_ids = token_ids(data.texts["test"])
    res: dict[str, float] = {}
    frozen = HFEncoder(frozen_layers=4).eval()  # pretrained; shares the fine-tuned runs' memo
    x, xt = frozen.encode(train_ids), frozen.encode(test_ids)
    res["logreg"] = 100 * float((logreg(x, y, xt) == y_test).mean())
    res["protonet"] = 100 * float((nearest_prototype(x, y, xt, n) == y_test).mean())
    overrides = [f"seed={seed}", f"task.seed={seed}", f"task.shots_per_intent={k}",
                 f"task.k_shot={k // 2}", f"task.k_query={k - k // 2}", f"eval.task.k_shot={k}",
                 "train.progress=false", "train.plots=false"]
    if quick:
        overrides.append("train.steps=3")
    cfg = load(ROOT / "configs" / f"{data.name}_10shot_protonet.yaml", overrides)
    run = out / f"{data.name}_{k}shot_protonet_seed{seed}"
    summary = (json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists()
               else recipe.train(cfg, run))
    res["protonet_ft"] = 100 * summary["mean"]
    _, learner = recipe.load_run(run)
    enc = learner.model
    res["protonet_ft+logreg"] = 100 * float(
        (logreg(enc.encode(train_ids), y, enc.encode(test_ids)) == y_test).mean())
    t = cfg.train
    clf = finetune(data, rows, train_ids, t.steps, cfg.task["n_way"] * k, t.lr, seed)
    pred = clf.encode(test_ids).argmax(-1)
    res["finetune"] = 100 * float((pred.numpy() == y_test).mean())
    return res


def leaderboard(args: argparse.Namespace) -> None:
    """Protocol (a): the table, per dataset and K, over seeds."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "leaderboard.json"
    done: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.exists() else {}
    datasets = {name: load_intents(name) for name in args.datasets}
    for k in args.shots:
        for name, data in datasets.items():
            cells = []
            for seed in range(args.seeds):
                key = f"{name}/{k}/{seed}"
                if key not in done:
                    t0 = time.perf_counter()
                    done[key] = leaderboard_cell(data, k, seed, out, args.quick)
                    done[key]["seconds"] = time.perf_counter() - t0
                    cache.write_text(json.dumps(done, indent=1))  # resumable, cell by cell
                    print(f"[intent] {key}: " + ", ".join(f"{m} {v:.2f}" for m, v in
                                                         done[key].items()), flush=True)
                cells.append(done[key])
            rows = []
            for method in [m for m in cells[0] if m != "seconds"]:
                mean, ci = t_ci95([c[method] for c in cells])
                rows.append([method, f"{mean:.2f} ± {ci:.2f}", ""])
            rows += [[m, "", f"{v:.2f}"] for m, v in PUBLISHED[(name, k)].items()]
            print_table(f"{name}, {k}-shot, all {len(data.intents)} intents, official test set "
                        f"({args.seeds} seeds, 95% t-CI)", ["learner", "ours (%)", "paper (%)"],
                        rows)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``leaderboard`` or ``episodes``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("protocol", choices=["leaderboard", "episodes"])
    p.add_argument("--datasets", nargs="+", default=["clinc150", "banking77"])
    p.add_argument("--shots", nargs="+", type=int, default=[5, 10])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--maml-episodes", type=int, default=100,
                   help="episodes: how many of them MAML and first-order MAML run")
    p.add_argument("--budget", type=float, default=240.0,
                   help="episodes: training seconds per meta-trained learner")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps each")
    p.add_argument("--out", default="runs/bench-intent")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.protocol == "leaderboard":
        leaderboard(args)
    else:
        run_episodes(args)


if __name__ == "__main__":
    main()
