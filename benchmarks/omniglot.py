"""Few-shot Omniglot table (MAML paper protocol), reproduced with the recipe.

Runs each selected config (``configs/omniglot_*.yaml``) through :func:`metattn.recipe.train`,
evaluates on the config's 600 FIXED seeded test episodes and prints, per config: the setting
(N-way K-shot), learner (with the number of test-time inner steps for MAML), backbone, our
accuracy (mean ± 95% CI over the episodes), the published number beside it (with its source,
from /work/shared/REFERENCES.md), the meta-training steps, the training time, the wall time and
the device. The table is also written to ``OUT/table.json`` and ``OUT/table.md``; each run
directory is ``OUT/<config name>``.

    python benchmarks/omniglot.py --configs 'configs/omniglot_5w1s_protonet_cpu.yaml' \\
        --threads 2 --budget 600 --out runs/bench-omniglot-cpu
    python benchmarks/omniglot.py --configs 'configs/omniglot_*_maml.yaml' --max-steps 2000
    python benchmarks/omniglot.py --set train.device=cuda --out runs/bench-omniglot-gpu

Time budget (``--budget SECONDS``): each run gets a :class:`metattn.recipe.TimeBudget`
callback, which ends training within that many TRAINING seconds (the recipe's ``seconds``:
meta-steps, sampling included; periodic evaluation, data loading and the final evaluation
excluded); with a cosine schedule, ``--fit-schedule`` (the default) also fits the schedule's
horizon to the budget, so the learning rate reaches zero when time runs out on any machine
(see its docstring). The benchmark lowers ``log_every`` to 10 when a budget is given, since
the callback runs at log steps.

CPU speed-up (same maths): glibc hands the large activation buffers back to the OS after every
step and page-faults them in again; ``--malloc-tune`` (default) keeps freed memory in the
process with :func:`metattn.allocator.tune_cpu_allocator` (``mallopt``: blocks up to 1 GiB from the
heap, heap never trimmed). Measured for Conv-4 forward + backward on 360 images, one thread,
torch 2.13, with the equivalent earlier setting (no mmap at all, trimming above 1 GiB): 1.57 ->
0.89 CPU-seconds per step (system time 0.65 -> 0.01 s).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

import metattn.recipe as recipe
from metattn import registry
from metattn.allocator import tune_cpu_allocator
from metattn.config import RunConfig, load
from metattn.reports import print_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    f"configs/omniglot_{s}_{learner}.yaml"
    for learner in ("maml", "protonet", "matching", "feat")
    for s in ("5w1s", "5w5s", "20w1s", "20w5s")
]
# Published accuracies (%), Conv-4 backbones: /work/shared/REFERENCES.md, "Few-shot Omniglot".
# (n_way, k_shot) -> "number"; "source" says where REFERENCES.md has it from.
PAPER: dict[str, dict[Any, str]] = {
    "maml": {(5, 1): "98.7 ± 0.4", (5, 5): "99.9 ± 0.1", (20, 1): "95.8 ± 0.3",
             (20, 5): "98.9 ± 0.2", "source": "Finn et al. 2017, Table 1"},
    "fomaml": {(5, 1): "98.3 ± 0.5", (5, 5): "99.2 ± 0.2", (20, 1): "89.4 ± 0.5",
               (20, 5): "97.9 ± 0.1", "source": "Finn et al. 2017, Table 1"},
    "protonet": {(5, 1): "98.8", (5, 5): "99.7", (20, 1): "96.0", (20, 5): "98.9",
                 "source": "Snell et al. 2017 (secondary)"},
    "mamlpp": {(5, 1): "99.47", (5, 5): "99.93", (20, 1): "97.65 ± 0.05", (20, 5): "99.33 ± 0.03",
               "source": "Antoniou et al. 2019 (secondary)"},
    "anil": {(20, 1): "96.2 ± 0.5", (20, 5): "98.0 ± 0.3", "source": "Raghu et al. 2020, Table 2"},
    "matching": {(5, 1): "98.1", (5, 5): "98.9", (20, 1): "93.8", (20, 5): "98.5",
                 "source": "Vinyals et al. 2016 (secondary, via MAML paper)"},
}


# ---------------------------------------------------------------------- rows
def backbone_name(model: dict[str, Any]) -> str:
    kind = model.get("kind", "?")
    if kind == "conv4":
        return f"Conv-4 ({model.get('hidden', 64)} filters)"
    if kind == "vit":
        return (f"ViT (patch {model.get('patch_size', 7)}, d {model.get('d_model', 64)}, "
                f"{model.get('n_layers', 2)} layers)")
    return str(kind)


def learner_name(cfg: RunConfig, summary: dict[str, Any]) -> tuple[str, str]:
    """(display name, key into PAPER)."""
    spec = cfg.learner
    kind = spec.get("kind", "?")
    if kind in ("maml", "fomaml", "anil", "metasgd", "mamlpp"):  # presets of one learner
        keys, _ = registry.schema("learner", kind)
        spec = {**{k: default for k, (_, default) in keys.items()}, **spec}
        steps = summary.get("eval_inner_steps")
        fo = bool(spec.get("first_order", False))
        # variants have their own published rows (or none): never Finn et al.'s numbers
        lr = spec.get("learn_inner_lr")
        if spec.get("inner_params"):
            base, key = "ANIL", "anil"
        elif spec.get("msl_steps") or spec.get("second_order_start") or lr == "per_layer_step":
            base, key = "MAML++", "mamlpp"
        elif lr == "per_param":
            base, key = "Meta-SGD", "metasgd"
        elif lr == "scalar":
            base, key = "MAML, learned inner lr", "maml-learned-lr"
        else:
            base, key = "MAML", "maml"
        if fo:
            base, key = f"FO-{base}", "fomaml" if key == "maml" else f"fo-{key}"
        return f"{base} ({steps} test steps)", key
    if kind == "matching":
        return ("Matching Nets" + (" (FCE)" if spec.get("fce") else "")), "matching"
    return {"protonet": "ProtoNet", "feat": "FEAT"}.get(kind, kind), kind


def device_name(summary: dict[str, Any], threads: int) -> str:
    dev = str(summary.get("device", "cpu"))
    if dev.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(dev))
    return f"{dev} ({threads} thread{'s' if threads != 1 else ''})"


def paper_cell(key: str, setting: tuple[int, int], backbone: str) -> tuple[str, str]:
    table = PAPER.get(key)
    if table is None or setting not in table:
        return "-", "-"
    note = "" if backbone.startswith("Conv-4") else " (Conv-4)"
    return table[setting] + note, table["source"]


# ---------------------------------------------------------------------- main
def run_one(path: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    overrides = list(args.set)
    if args.episodes:
        overrides.append(f"eval.episodes={args.episodes}")
    cfg = load(path, overrides)
    if args.max_steps is not None:
        cfg.train.steps = min(cfg.train.steps, args.max_steps)
    callbacks = []
    if args.budget or cfg.train.max_seconds:  # a time budget acts at log steps
        cfg.train.log_every = min(cfg.train.log_every, 10)
    if args.budget:
        callbacks.append(recipe.TimeBudget(cfg, args.budget, args.fit_schedule))
    run_dir = out / cfg.name
    t0 = time.perf_counter()
    if args.skip_done and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        wall = summary.get("bench_wall_seconds", float("nan"))
    else:
        if run_dir.exists():
            if not args.overwrite:
                sys.exit(f"{run_dir} exists; pass --overwrite (or --skip-done to reuse it)")
            shutil.rmtree(run_dir)
        summary = recipe.train(cfg, run_dir, callbacks=callbacks)
        wall = time.perf_counter() - t0
        summary["bench_wall_seconds"] = round(wall, 1)
        # (the recipe's summary says whether a time budget, --budget or the config's
        # train.max_seconds, ended the run)
        summary["bench_stopped_by_budget"] = bool(summary.get("stopped_by_budget"))
        summary["bench_threads"] = torch.get_num_threads()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    test = cfg.test_task_spec()
    setting = (int(test.get("n_way", 5)), int(test.get("k_shot", 1)))
    learner, key = learner_name(cfg, summary)
    backbone = backbone_name(cfg.model)
    paper, source = paper_cell(key, setting, backbone)
    acc, ci = 100 * summary["mean"], 100 * summary["ci95"]
    return {
        "config": str(path),
        "name": cfg.name,
        "setting": f"{setting[0]}-way {setting[1]}-shot",
        "learner": learner,
        "backbone": backbone,
        "accuracy": acc,
        "ci95": ci,
        "episodes": summary["episodes"],
        "eval_inner_steps": summary.get("eval_inner_steps"),
        "paper": paper,
        "paper_source": source,
        "steps": summary["steps"],
        "train_seconds": summary["seconds"],
        "wall_seconds": round(wall, 1),
        "stopped_by_budget": summary.get("bench_stopped_by_budget", False),
        "device": device_name(summary, summary.get("bench_threads", torch.get_num_threads())),
        "torch": summary.get("torch"),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, metavar="GLOB",
                   help="config files or globs (default: the 16 Conv-4 omniglot configs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every config, e.g. --set train.device=cuda (repeatable)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="training-time budget per config (see the module doc)")
    p.add_argument("--fit-schedule", action=argparse.BooleanOptionalAction, default=True,
                   help="with --budget and a cosine schedule, end the schedule at the budget")
    p.add_argument("--max-steps", type=int, default=None, help="cap train.steps")
    p.add_argument("--episodes", type=int, default=None,
                   help="test episodes (default: the config's eval.episodes, 600)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--malloc-tune", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc mallopt: keep freed memory (faster big CPU tensors)")
    p.add_argument("--out", default="runs/bench-omniglot")
    p.add_argument("--overwrite", action="store_true", help="replace existing run directories")
    p.add_argument("--skip-done", action="store_true",
                   help="reuse run directories that already hold summary.json")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_tune:
        tune_cpu_allocator()
    paths: list[Path] = []
    for pattern in args.configs or DEFAULT_CONFIGS:
        hits = sorted(glob.glob(pattern)) or sorted(glob.glob(str(ROOT / pattern)))
        if not hits:
            sys.exit(f"--configs {pattern!r}: no such file")
        paths += [Path(h) for h in hits if Path(h) not in paths]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    for path in paths:
        row = run_one(path, args, out)
        rows.append(row)
        print(f"{row['name']}: {row['accuracy']:.2f} ± {row['ci95']:.2f} % after "
              f"{row['steps']} steps, {row['train_seconds']:.0f} s training, "
              f"{row['wall_seconds']:.0f} s in all", flush=True)
        (out / "table.json").write_text(json.dumps(rows, indent=1))

    cols = ["setting", "learner", "backbone", "ours (%)", "paper (%)", "steps", "train s",
            "wall s", "device"]
    table = [[r["setting"], r["learner"], r["backbone"],
              f"{r['accuracy']:.2f} ± {r['ci95']:.2f}", r["paper"], r["steps"],
              f"{r['train_seconds']:.0f}", f"{r['wall_seconds']:.0f}", r["device"]]
             for r in rows]
    episodes = sorted({r["episodes"] for r in rows})
    title = (f"Few-shot Omniglot, test accuracy on {'/'.join(map(str, episodes))} fixed seeded "
             "episodes (mean ± 95% CI)")
    print_table(title, cols, table)
    sources = sorted({(r["learner"].split(" (")[0], r["paper_source"]) for r in rows
                      if r["paper_source"] != "-"})
    notes = ["paper: " + "; ".join(f"{n}: {s}" for n, s in sources)] if sources else []
    notes.append("train s: meta-training seconds (the recipe's clock); wall s: the whole run "
                 "(data loading, training, final evaluation)")
    for n in notes:
        print(n)
    md = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(x) for x in r) + " |" for r in table]
    md += [""] + notes
    (out / "table.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}")
    return rows


if __name__ == "__main__":
    main()
