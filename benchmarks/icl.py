"""In-context learning benchmark (Garg et al. 2022) and in-context learner vs MAML on sinusoids.

``linear``: the error-vs-k table of an in-context Transformer against least squares, ridge,
Lasso (sparse tasks only), 3-nearest neighbours, averaging and MAML (an MLP meta-trained with
the same wall-clock budget through the same recipe). The error of a prompt at k is the
squared error of predicting point k+1 from the first k, divided by d (by the sparsity s for
sparse tasks, as in Garg et al.; the zero predictor scores 1); mean ± 95% CI over a FIXED
seeded set of prompts shared by every learner. Prints the table at k = 0, d/2, d, 2d and
writes ``error_vs_k.png`` (all curves, every k), ``icl_linear.json`` and ``icl_linear.md``
into ``--out``.

``sinusoid``: the in-context learner's K-shot test MSE (one forward pass) against MAML's after
1 and 10 inner steps, on the same 600 fixed test tasks (:func:`metattn.reports.
sinusoid_mse_vs_shots`); writes ``icl_sinusoid.json``/``.md`` and ``maml_vs_icl.png``.

Trained runs are read from run directories (``--run``, ``--icl-run``, ``--maml-run``) or
trained here by the recipe (``--steps N`` or ``--minutes M``: M minutes of training time,
ended on time by :class:`metattn.recipe.TimeBudget`, which fits the cosine schedule to it).

    python benchmarks/icl.py linear --config configs/icl_linear_d5_cpu.yaml --run runs/icl-d5
    python benchmarks/icl.py linear --config configs/icl_linear_d5_cpu.yaml --minutes 10 \\
        --threads 2 --out runs/bench-icl-d5
    python benchmarks/icl.py sinusoid --icl-run runs/demo/icl --maml-run runs/demo/maml
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metattn import checkpoint
from metattn.allocator import tune_cpu_allocator
from metattn.config import RunConfig, from_dict, load
from metattn.meta import baselines as bl
from metattn.meta.baselines import error_vs_k
from metattn.recipe import TimeBudget, build, pick_device, train
from metattn.reports import fmt, print_table

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ runs
def trained_run(run_dir: Path) -> tuple[RunConfig, Any, dict[str, Any]]:
    """(config, trained learner in eval mode, summary) of a run directory."""
    cfg, learner = trained_run(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        state = checkpoint.load(run_dir)[1]
        summary = {"steps": state["step"], "seconds": state["seconds"]}
    return cfg, learner, summary


def seconds_per_step(cfg: RunConfig, n: int = 12) -> float:
    """Median seconds of one meta-step (sampling, forward, backward, Adam) of ``cfg``'s
    learner, timed at the curriculum's LAST stage (the longest prompts): a conservative rate
    for sizing a time budget."""
    if cfg.train.threads:  # timed on the threads the run will train on (the recipe sets them)
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    train_tasks, _, learner = build(cfg, device)
    if hasattr(train_tasks, "set_step"):
        train_tasks.set_step(10**9)
    opt = torch.optim.Adam(learner.parameters(), 1e-12)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        batch = train_tasks.sample(cfg.train.meta_batch, g)
        batch = batch.to(device, getattr(torch, cfg.train.dtype))
        loss, _ = learner.meta_loss(batch, None, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def with_steps(cfg: RunConfig, steps: int) -> RunConfig:
    """``cfg`` with ``train.steps = steps`` (logging/eval/checkpoint periods scaled down, and a
    curriculum's period scaled by the same factor, so that a shorter run still reaches the
    final dimension and prompt length at the same fraction of training)."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    old_steps = max(t.steps, 1)
    t.steps = max(int(steps), 1)
    cur = cfg.task.get("curriculum")
    if isinstance(cur, dict) and "every" in cur:
        cur["every"] = max(1, round(cur["every"] * t.steps / old_steps))
    t.warmup_steps = min(t.warmup_steps, t.steps // 5)
    t.log_every = max(1, min(t.log_every, t.steps // 20 or 1))
    t.eval_every = min(t.eval_every, max(t.steps // 4, 1)) if t.eval_every else 0
    t.checkpoint_every = min(t.checkpoint_every, max(t.steps // 4, 1))
    return cfg


def train_for(cfg: RunConfig, out: Path, steps: int | None, seconds: float | None,
              ) -> tuple[Any, dict[str, Any]]:
    """Train ``cfg`` by the recipe for ``steps``, or for ``seconds`` of training time: the
    step count is calibrated from timed steps (with a 30% margin) and a
    :class:`~metattn.recipe.TimeBudget` ends the run on time, fitting the cosine schedule's
    horizon to the budget, so the learning rate reaches zero when time runs out."""
    callbacks = []
    if seconds is not None:
        rate = seconds_per_step(cfg)
        steps = int(1.3 * seconds / rate)
        print(f"[bench] {cfg.name}: {rate * 1000:.1f} ms/step -> at most {steps} steps for "
              f"{seconds:.0f} s (the budget fits the schedule)", flush=True)
    if steps is not None:
        cfg = with_steps(cfg, steps)
        cfg.train.max_seconds = None  # the length asked for here replaces the config's
    if seconds is not None:
        cfg.train.log_every = min(cfg.train.log_every, 10)  # the budget acts at log steps
        callbacks.append(TimeBudget(cfg, seconds))
    summary = train(cfg, out, callbacks=callbacks)
    _, learner, _ = trained_run(out)
    return learner, summary


# ------------------------------------------------------------------ linear
def maml_config(icl_cfg: RunConfig) -> RunConfig:
    """MAML on the same task family: an MLP (2 x 64 ReLU), 1 inner step in training
    (10 at test), meta-batch 25, Adam 1e-3; support k = d and d query points per task."""
    task = {k: v for k, v in icl_cfg.task.items() if k != "curriculum"}
    d = int(task.get("d", 20))
    task.update(k_shot=d, k_query=d)
    return from_dict({
        "name": f"{icl_cfg.name}_maml",
        "seed": icl_cfg.seed,
        "task": task,
        "model": {"kind": "mlp", "in_features": d, "hidden": [64, 64], "out_features": 1},
        "learner": {"kind": "maml", "inner_lr": 0.01, "inner_steps": 1,
                    "eval_inner_steps": 10},
        "train": {"steps": icl_cfg.train.steps, "meta_batch": 25, "lr": 1e-3,
                  "log_every": 200, "eval_every": 0, "eval_episodes": 100,
                  "checkpoint_every": 10**9, "progress": icl_cfg.train.progress,
                  "device": icl_cfg.train.device},
        "eval": {"episodes": 500, "task": {}},
    })


def linear(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        cfg, icl, summary = trained_run(Path(args.run))
        icl_dir = Path(args.run)
    else:
        cfg = load(args.config, args.set)
        icl_dir = out / "icl"
        icl, summary = train_for(cfg, icl_dir, args.steps,
                                 args.minutes * 60 if args.minutes else None)
    budget = float(summary["seconds"])
    spec = cfg.test_task_spec()
    if spec.get("kind") != "linear":
        raise SystemExit(f"linear: the run's task is {spec.get('kind')!r}; this part needs "
                         "kind: linear (use the sinusoid part for sinusoids)")
    spec = {k: v for k, v in spec.items() if k != "curriculum"}
    sampler = build_task(spec)
    d = sampler.d
    k_max = min(2 * d, icl.model.max_points - 1)
    ks = list(range(k_max + 1))
    table_ks = sorted({0, d // 2, min(d, k_max), k_max})

    learners: dict[str, Any] = {"in-context Transformer": icl.predict}
    lam = sampler.noise_std**2 if sampler.noise_std > 0 else 0.1
    learners["least squares"] = bl.least_squares
    learners[f"ridge (lam={lam:g})"] = lambda sx, sy, qx: bl.ridge(sx, sy, qx, lam=lam)
    if sampler.sparsity is not None:
        learners["Lasso (alpha=0.01)"] = bl.lasso
    learners["3-nearest neighbours"] = bl.nearest_neighbours
    learners["averaging"] = bl.averaging
    maml_info = None
    if not args.no_maml:
        if args.maml_run:
            _, maml, msum = trained_run(Path(args.maml_run))
        else:
            mcfg = maml_config(cfg)
            maml, msum = train_for(mcfg, out / "maml", None, budget)
        learners[f"MAML (MLP, {maml.eval_inner_steps} steps)"] = bl.maml_predict_fn(maml)
        maml_info = {"steps": msum["steps"], "seconds": msum["seconds"],
                     "run": str(args.maml_run or out / "maml")}

    curves: dict[str, bl.ErrorCurve] = {}
    for name, fn in learners.items():
        t0 = time.time()
        curves[name] = error_vs_k(fn, sampler, ks, n_prompts=args.prompts, seed=args.seed)
        print(f"[bench] {name}: error-vs-k on {args.prompts} prompts in "
              f"{time.time() - t0:.1f} s", flush=True)

    cols = ["learner", *[f"k={k}" for k in table_ks]]
    rows = [[name, *[fmt(*c.as_dict()[k]) for k in table_ks]] for name, c in curves.items()]
    title = (f"In-context linear regression, d={d}{_task_note(sampler)}: normalised squared "
             f"error (/{'s' if getattr(sampler, 'sparsity', None) else 'd'}) at k points, "
             f"mean ± 95% CI over {args.prompts} fixed prompts")
    print_table(title, cols, rows)
    note = (f"in-context: {cfg.name}, {summary['steps']} steps, {budget:.0f} s of training"
            + (f"; MAML: {maml_info['steps']} steps, {maml_info['seconds']:.0f} s"
               if maml_info else "")
            + f"; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(note)
    gap = {k: curves["in-context Transformer"].as_dict()[k][0]
           - curves["least squares"].as_dict()[k][0] for k in ks}
    worst = max(gap, key=lambda k: gap[k])
    print(f"largest gap to least squares: {gap[worst]:+.3f} at k={worst}")

    result = {
        "task": spec, "d": d, "ks": ks, "table_ks": table_ks, "prompts": args.prompts,
        "seed": args.seed, "icl_run": str(icl_dir), "icl_steps": summary["steps"],
        "icl_seconds": budget, "maml": maml_info, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "max_gap_to_least_squares": {"k": worst, "gap": gap[worst]},
        "curves": {n: {"mean": c.mean, "ci95": c.ci95} for n, c in curves.items()},
    }
    (out / "icl_linear.json").write_text(json.dumps(result, indent=1))
    md = [f"# {title}", "", "| " + " | ".join(cols) + " |",
          "|" + "---|" * len(cols), *["| " + " | ".join(r) + " |" for r in rows], "", note, ""]
    (out / "icl_linear.md").write_text("\n".join(md))
    plot_curves(curves, d, out / "error_vs_k.png", title=f"d={d}{_task_note(sampler)}")
    print(f"wrote {out / 'icl_linear.json'}, {out / 'icl_linear.md'}, {out / 'error_vs_k.png'}")
    return 0


def build_task(spec: dict[str, Any]) -> Any:
    from metattn import registry

    return registry.build("task", spec, "test")


def _task_note(sampler: Any) -> str:
    note = f", sparsity {sampler.sparsity}" if getattr(sampler, "sparsity", None) else ""
    if getattr(sampler, "noise_std", 0):
        note += f", noise {sampler.noise_std:g}"
    return note


def plot_curves(curves: dict[str, bl.ErrorCurve], d: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, c in curves.items():
        m, ci = torch.tensor(c.mean), torch.tensor(c.ci95)
        lw = 2.5 if name.startswith("in-context") else 1.5
        ax.plot(c.ks, m, lw=lw, label=name)
        ax.fill_between(c.ks, m - ci, m + ci, alpha=0.2)
    ax.axvline(d, color="k", ls=":", lw=1)
    ax.set_xlabel("in-context examples k")
    ax.set_ylabel("normalised squared error (/ d; / s if sparse)")
    ax.set_ylim(-0.02, 1.25)
    ax.set_title(f"In-context linear regression, {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ sinusoid
def sinusoid(args: argparse.Namespace) -> int:
    from metattn.demo import plot_maml_vs_icl
    from metattn.reports import sinusoid_mse_vs_shots

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = {}
    for name, run, config, sets in (("icl", args.icl_run, args.icl_config, args.icl_set),
                                    ("maml", args.maml_run, args.maml_config, args.maml_set)):
        if run:
            _, learner, summary = trained_run(Path(run))
        else:
            # both learners on --threads threads (the configs' own counts differ), so an
            # equal time budget is an equal compute budget
            cfg = load(config, [f"train.threads={args.threads}", *sets])
            learner, summary = train_for(cfg, out / name, args.steps,
                                         args.minutes * 60 if args.minutes else None)
        trained[name] = (learner, summary)
    icl, isum = trained["icl"]
    maml, msum = trained["maml"]
    max_k = icl.model.max_points - 1
    shots = [k for k in (5, 10, 20) if k <= max_k]
    ti = sinusoid_mse_vs_shots(icl, shots=shots, steps=(1,), episodes=args.episodes)
    tm = sinusoid_mse_vs_shots(maml, shots=shots, steps=(1, 10), episodes=args.episodes)
    cols = ["learner", *[f"{k}-shot" for k in shots]]
    rows = [[f"MAML, 1 step ({msum['steps']} meta-steps, {msum['seconds']:.0f} s)",
             *[fmt(*tm[k][1]) for k in shots]],
            ["MAML, 10 steps", *[fmt(*tm[k][10]) for k in shots]],
            [f"in-context, forward pass ({isum['steps']} steps, {isum['seconds']:.0f} s)",
             *[fmt(*ti[k][1]) for k in shots]]]
    title = (f"Sinusoids: test MSE on {args.episodes} fixed tasks (mean ± 95% CI), "
             "same tasks for both learners")
    print_table(title, cols, rows)
    result = {"episodes": args.episodes, "shots": shots,
              "maml": {"steps": msum["steps"], "seconds": msum["seconds"],
                       "after_1_step": {k: tm[k][1] for k in shots},
                       "after_10_steps": {k: tm[k][10] for k in shots}},
              "icl": {"steps": isum["steps"], "seconds": isum["seconds"],
                      "forward_pass": {k: ti[k][1] for k in shots}},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "icl_sinusoid.json").write_text(json.dumps(result, indent=1))
    md = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
          *["| " + " | ".join(r) + " |" for r in rows], ""]
    (out / "icl_sinusoid.md").write_text("\n".join(md))
    plot_maml_vs_icl(maml, icl, out / "maml_vs_icl.png")
    print(f"wrote {out / 'icl_sinusoid.json'}, {out / 'icl_sinusoid.md'}, "
          f"{out / 'maml_vs_icl.png'}")
    return 0


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    common.add_argument("--steps", type=int, help="train this many steps (runs not given)")
    common.add_argument("--minutes", type=float,
                        help="train this many minutes (a TimeBudget ends the run on time)")
    common.add_argument("--malloc-tune", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc mallopt: keep freed memory, as `metattn train` does")
    lin = sub.add_parser("linear", parents=[common], help="error-vs-k table and plot")
    lin.add_argument("--config", default=str(ROOT / "configs" / "icl_linear_d5_cpu.yaml"))
    lin.add_argument("--set", action="append", default=[], help="config override key=value")
    lin.add_argument("--run", help="a trained in-context run directory (skips training)")
    lin.add_argument("--maml-run", help="a trained MAML run directory on the same task")
    lin.add_argument("--no-maml", action="store_true")
    lin.add_argument("--prompts", type=int, default=1000)
    lin.add_argument("--seed", type=int, default=20240)
    lin.add_argument("--out", default="runs/bench-icl-linear")
    sin = sub.add_parser("sinusoid", parents=[common], help="in-context vs MAML on sinusoids")
    sin.add_argument("--icl-run")
    sin.add_argument("--maml-run")
    sin.add_argument("--icl-config", default=str(ROOT / "configs" / "sinusoid_icl_quick.yaml"))
    sin.add_argument("--maml-config",
                     default=str(ROOT / "configs" / "sinusoid_maml_quick.yaml"))
    sin.add_argument("--icl-set", action="append", default=[])
    sin.add_argument("--maml-set", action="append", default=[])
    sin.add_argument("--episodes", type=int, default=600)
    sin.add_argument("--out", default="runs/bench-icl-sinusoid")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.malloc_tune:
        tune_cpu_allocator()
    return linear(args) if args.part == "linear" else sinusoid(args)


if __name__ == "__main__":
    sys.exit(main())
