"""Sinusoid regression table of the MAML paper (Finn et al. 2017), reproduced with the recipe.

Trains three learners on K = 10 tasks with the same budget and evaluates each on 600 FIXED
seeded test tasks (100 query points each) with K = 5, 10, 20 support points, after 1 and 10
inner gradient steps (at the inner rate each run learned, one scalar from 0.01: see
``configs/sinusoid_maml.yaml`` for this and its other departures from the paper):

* MAML (second order), first-order MAML;
* "pretrained": one model trained on all tasks jointly (MAML with 0 inner steps in training),
  then fine-tuned by gradient steps at test time, the paper's baseline;
* the oracle that knows amplitude and phase (zero error: the data are noiseless).

    python benchmarks/sinusoid.py                       # paper length, configs/sinusoid_maml.yaml
    python benchmarks/sinusoid.py --steps 20000 --out runs/bench-sinusoid-short
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metattn import checkpoint
from metattn.config import config_diff, load
from metattn.recipe import build_tasks, load_run, train
from metattn.reports import fmt, print_table, sinusoid_mse_vs_shots

ROOT = Path(__file__).resolve().parents[1]
LEARNERS = {
    "MAML": [],
    "first-order MAML": ["learner.first_order=true"],
    "pretrained + fine-tune": ["learner.inner_steps=0"],
}
# A 40-line torch.func script on this machine, 41k meta-iterations (issue 3):
SCRIPT = {5: (0.595, 0.309), 10: (0.340, 0.100), 20: (0.196, 0.042)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "sinusoid_maml.yaml"))
    p.add_argument("--steps", type=int, default=None, help="meta-iterations (default: config)")
    p.add_argument("--out", default="runs/bench-sinusoid")
    p.add_argument("--only", nargs="*", default=None, help="subset of learners")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every learner (repeatable)")
    args = p.parse_args()
    out = Path(args.out)
    rows, record = [], {}
    for name, sets in LEARNERS.items():
        if args.only and name not in args.only:
            continue
        extra = [f"train.steps={args.steps}"] if args.steps else []
        cfg = load(args.config, args.set + sets + extra + ["train.progress=false"])
        run_dir = out / name.replace(" ", "_").replace("+", "plus")
        t0 = time.time()
        if (run_dir / "summary.json").is_file():
            # a finished run is reused only for the same config (--steps, --set included)
            done = load(run_dir / "config.yaml").to_dict()
            changed = config_diff(done, cfg.to_dict(), ignore={"train.progress"})
            if changed:
                raise SystemExit(f"{run_dir} holds a finished run with another config "
                                 f"({', '.join(changed)}); pass another --out, or delete it")
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            summary = train(cfg, run_dir, resume=(run_dir / checkpoint.WEIGHTS).is_file())
        _, learner = load_run(run_dir)
        _, test_tasks = build_tasks(cfg)
        table = sinusoid_mse_vs_shots(learner, shots=(5, 10, 20), steps=(1, 10),
                                      seed=cfg.eval.seed, tasks=test_tasks)
        record[name] = {"steps": summary["steps"], "train_seconds": summary["seconds"],
                        "mse": {k: {s: list(v) for s, v in d.items()} for k, d in table.items()}}
        for k, d in table.items():
            ref = SCRIPT[k] if name == "MAML" else None
            rows.append([name, summary["steps"], f"K={k}", fmt(*d[1]), fmt(*d[10]),
                         f"{ref[0]:.3f} / {ref[1]:.3f}" if ref else "-", "0"])
        print(f"{name}: {summary['steps']} steps, {summary['seconds']:.0f} s training, "
              f"{time.time() - t0:.0f} s in all", flush=True)
    cols = ["learner", "meta-iters", "support K", "MSE after 1 step", "MSE after 10 steps",
            "script 41k its (1 / 10)", "oracle"]
    print_table("Sinusoid regression, test MSE on 600 fixed tasks (mean ± 95% CI), "
                "trained with K=10; learned scalar inner rate (see the config)", cols, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(record, indent=1))
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'table.md'}")


if __name__ == "__main__":
    main()
