"""``make demo``: meta-train MAML and an in-context Transformer on the MAML paper's sinusoids.

Runs the recipe on ``configs/sinusoid_maml_quick.yaml`` (embedded default: no data files),
then on ``configs/sinusoid_icl_quick.yaml`` (a small causal Transformer that learns from the
support points in its prompt: no gradient step at test time), and prints one table: the test
MSE on the same 600 fixed tasks against the number of support points K, for MAML after 1 and
10 inner gradient steps and for the in-context learner after one forward pass. Writes PNG
plots of adapted curves against the ground truth (each learner's, and both side by side).
"""

from __future__ import annotations

import argparse
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

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG = CONFIGS / "sinusoid_maml_quick.yaml"
ICL_CONFIG = CONFIGS / "sinusoid_icl_quick.yaml"


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
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--set", action="append", default=[], help="override in the MAML config")
    p.add_argument("--icl-config", default=str(ICL_CONFIG))
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
    summary = train(cfg, out / "maml")
    device = pick_device(cfg.train.device)
    maml_seconds = time.time() - t0
    _, learner = load_run(out / "maml")
    shots = (5, 10, 20)
    table = sinusoid_mse_vs_shots(learner, shots=shots, steps=(1, 10))
    columns = ["support K", "MAML: after 1 step", "MAML: after 10 steps"]
    rows = [[f"K={k}", fmt(*table[k][1]), fmt(*table[k][10])] for k in table]
    title = (f"MAML: MLP 2x40, K=10 training, {summary['steps']} meta-steps "
             f"({maml_seconds:.0f} s)")
    plots = [out / "maml" / "adaptation.png", out / "maml" / "training.png"]
    if not args.no_icl:
        t1 = time.time()
        assert icfg is not None
        isum = train(icfg, out / "icl")
        _, icl = load_run(out / "icl")
        icl_seconds = time.time() - t1
        itable = sinusoid_mse_vs_shots(icl, shots=shots, steps=(1,))
        columns.append("in-context: forward pass")
        for r, k in zip(rows, shots, strict=True):
            r.append(fmt(*itable[k][1]))
        m = icfg.model
        title += (f"; in-context: Transformer {m.get('n_layers')}x{m.get('d_model')}, "
                  f"prompts of <= {icfg.task.get('k_shot', 10)} points, {isum['steps']} steps "
                  f"({icl_seconds:.0f} s)")
        plots = [plot_maml_vs_icl(learner, icl, out / "maml_vs_icl.png"),
                 *plots, out / "icl" / "adaptation.png"]
    columns.append("oracle")
    for r in rows:
        r.append("0")
    print_table("Sinusoid regression: test MSE on 600 fixed tasks (mean ± 95% CI)",
                columns, rows)
    print(title)
    print("plots: " + ", ".join(str(x) for x in plots))
    print(f"demo finished in {time.time() - t0:.0f} s on {device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
