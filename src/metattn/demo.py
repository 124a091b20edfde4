"""``make demo``: meta-train MAML and an in-context Transformer on the MAML paper's sinusoids.

Runs the recipe on the shipped ``sinusoid_maml_quick`` config (no data files), then on
``sinusoid_icl_quick`` (a small causal Transformer that learns from the support points in its
prompt: no gradient step at test time), and prints one table: the test MSE against the number
of support points K, for MAML after 1 and 10 inner steps and for the in-context learner after
one forward pass. Each K's 600 test tasks are the recipe's test episodes at that K (seed and
chunk of the configs' ``eval`` sections), so the table's MAML K=10 / 10 steps cell is the MAML
run's ``summary.json`` and its in-context K=20 cell the in-context run's. Writes the table
(``results.md``, ``results.json``) beside PNG plots of adapted curves against the ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metattn.config import load
from metattn.data.synthetic import SinusoidTasks
from metattn.errors import MetattnError
from metattn.plots import learner_curves, sinusoid_panels
from metattn.recipe import load_run, pick_device, train
from metattn.reports import fmt, print_table, sinusoid_mse_vs_shots

CONFIG, ICL_CONFIG = "sinusoid_maml_quick", "sinusoid_icl_quick"
SHOTS = (5, 10, 20)
NEXT = """next:
  metattn train sinusoid_maml --out runs/sin               # MAML at paper length (~10 min)
  metattn train omniglot_5w1s_protonet_cpu --threads 2     # Omniglot, 99% in 10 min on a CPU
  metattn kinds learner maml                               # every option of the MAML family
  docs: README.md, docs/recipe.md, docs/benchmarks.md"""


def plot_maml_vs_icl(maml: Any, icl: Any, path: Path, k_shot: int = 10,
                     seed: int = 20240) -> Path:
    """PNG: on seeded test sinusoids with ``k_shot`` support points, the ground truth, MAML's
    initialisation and adapted curve, and the in-context learner's prediction."""
    curves = learner_curves(maml, "MAML") + learner_curves(icl, "in-context")
    return sinusoid_panels(SinusoidTasks(k_shot=k_shot, k_query=1), curves, path, seed)


def main(argv: list[str] | None = None) -> int:
    """``make demo``: meta-train MAML and the in-context learner on sinusoids, compare them
    on the same test tasks and write the plots; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=CONFIG, help="MAML config (a path or a shipped name)")
    p.add_argument("--set", action="append", default=[], help="override in the MAML config")
    p.add_argument("--icl-config", default=ICL_CONFIG, help="in-context config")
    p.add_argument("--icl-set", action="append", default=[],
                   help="override in the in-context config")
    p.add_argument("--no-icl", action="store_true", help="MAML only")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except MetattnError as err:
        print(f"metattn demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"metattn demo: error: {out} is not an empty folder; pass --out NEW_DIR (the "
              "default `make demo` names a new folder by the time)", file=sys.stderr)
        return 2
    t0 = time.time()
    cfg = load(args.config, args.set)
    # both configs are checked before any training (a typo must not cost the MAML half)
    icfg = None if args.no_icl else load(args.icl_config, args.icl_set)
    runs = {"maml": (cfg, train(cfg, out / "maml"))}
    if icfg is not None:
        runs["icl"] = (icfg, train(icfg, out / "icl"))
    learners = {name: load_run(out / name)[1] for name in runs}
    results = _table(runs, learners)
    _write(out, results)
    columns = ["support K", *results["columns"]]
    rows = [[f"K={k}", *(fmt(m, c) for m, c in cells)] for k, cells in results["rows"].items()]
    print_table("Sinusoid regression: test MSE on 600 fixed tasks per K (mean ± 95% CI; a "
                "model that knew the sinusoid would score 0)", columns, rows)
    print("\n".join(results["notes"]))
    plots = [out / "maml" / "adaptation.png", out / "maml" / "training.png"]
    if "icl" in learners:
        plots = [plot_maml_vs_icl(learners["maml"], learners["icl"], out / "maml_vs_icl.png"),
                 *plots, out / "icl" / "adaptation.png"]
    print("plots: " + ", ".join(str(x) for x in plots))
    print(f"table: {out / 'results.md'}, {out / 'results.json'}")
    print(f"demo finished in {time.time() - t0:.0f} s on {pick_device(cfg.train.device)} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(NEXT)
    return 0


def _table(runs: dict[str, tuple[Any, dict]], learners: dict[str, Any]) -> dict[str, Any]:
    """The test MSE per K of each learner, on each K's recipe test episodes; and which cell
    each run's summary.json holds."""
    cfg, summary = runs["maml"]
    tasks = SinusoidTasks(**{k: v for k, v in cfg.task.items() if k != "kind"})
    common = {"shots": SHOTS, "seed": cfg.eval.seed, "chunk": cfg.eval.chunk,
              "episodes": cfg.eval.episodes, "k_query": cfg.test_task_spec()["k_query"],
              "tasks": tasks}
    maml = sinusoid_mse_vs_shots(learners["maml"], steps=(1, 10), **common)
    columns = ["MAML: after 1 step", "MAML: after 10 steps"]
    cells = {k: [maml[k][1][:2], maml[k][10][:2]] for k in SHOTS}
    notes = [f"MAML: MLP 2x40 trained at K={cfg.task['k_shot']}, {summary['steps']} "
             f"meta-steps ({summary['seconds']:.0f} s); its summary.json: "
             f"{summary['mean']:.3f} at K={cfg.task['k_shot']} after "
             f"{summary['eval_inner_steps']} steps"]
    if "icl" in runs:
        icfg, isum = runs["icl"]
        icl = sinusoid_mse_vs_shots(learners["icl"], steps=(1,), **common)
        columns.append("in-context: forward pass")
        for k in SHOTS:
            cells[k].append(icl[k][1][:2])
        m = icfg.model
        notes.append(f"in-context: Transformer {m['n_layers']}x{m['d_model']}, "
                     f"{m['token_layout']} tokens, prompts of <= {icfg.task['k_shot']} points, "
                     f"{isum['steps']} steps ({isum['seconds']:.0f} s); its summary.json: "
                     f"{isum['mean']:.3f} at K={icfg.task['k_shot']}")
    return {"columns": columns, "rows": cells, "notes": notes,
            "episodes": cfg.eval.episodes, "seed": cfg.eval.seed}


def _write(out: Path, results: dict[str, Any]) -> None:
    """results.json (the numbers) and results.md (the table) in the demo's folder."""
    (out / "results.json").write_text(json.dumps(
        {**results, "rows": {str(k): v for k, v in results["rows"].items()}}, indent=1))
    lines = ["# Sinusoid regression: test MSE (mean ± 95% CI), 600 fixed tasks per K", "",
             "| support K | " + " | ".join(results["columns"]) + " |",
             "|---" * (len(results["columns"]) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(fmt(m, c) for m, c in cells) + " |"
              for k, cells in results["rows"].items()]
    (out / "results.md").write_text("\n".join([*lines, "", *results["notes"], ""]))


if __name__ == "__main__":
    raise SystemExit(main())
