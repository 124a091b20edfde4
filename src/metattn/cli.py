"""Command line: ``metattn train | eval | explain | validate | kinds``.

    metattn train sinusoid_maml_quick --set train.steps=2000 --out runs/x
    metattn train sinusoid_maml_quick --out runs/x --resume
    metattn eval runs/x --episodes 600 [--set learner.test_shift=1]
    metattn explain runs/x --episodes 4 --out runs/x/explain   # figures + report.html
    metattn validate configs/my.yaml      # build everything, train nothing
    metattn kinds learner maml             # a kind's options, defaults and docs

Only argparse is imported up front, so ``--help`` answers at once; torch loads with the
command that needs it. The CLI owns its process, so it keeps freed CPU memory in it
(:func:`metattn.allocator.tune_cpu_allocator`; ``METATTN_MALLOC_TUNE=0`` opts out).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metattn import __version__
from metattn.errors import ConfigError, MetattnError

GROUPS = ("task", "model", "learner")


def _tune_allocator() -> None:
    if os.environ.get("METATTN_MALLOC_TUNE", "1") != "0":
        from metattn.allocator import tune_cpu_allocator

        tune_cpu_allocator()


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, with ``--device`` and ``--threads`` as the train keys they set."""
    extra = [f"train.device={args.device}"] if args.device else []
    extra += [f"train.threads={args.threads}"] if args.threads else []
    return extra + list(args.set)


def _cmd_train(args: argparse.Namespace) -> int:
    from metattn.config import load
    from metattn.recipe import train

    cfg = load(args.config, _overrides(args))
    _tune_allocator()
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    summary = train(cfg, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    res = summary["results"]
    lines = [f"[metattn] {summary['name']}: test {summary['metric']} "
             f"{summary['mean']:.4f} ± {summary['ci95']:.4f} (95% CI, {summary['episodes']} "
             f"episodes) after {summary['steps']} steps, {summary['seconds']:.0f} s of training"]
    curve = res.get(f"{summary['metric']}_per_step")
    if curve:
        shown = ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(curve)
                          if i in (0, 1, 5, 10) or i == len(curve) - 1)
        lines.append(f"  test {summary['metric']} after k inner steps: {shown}")
    lines.append(f"  run directory: {out}")
    print("\n".join(lines), flush=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    from metattn.recipe import evaluate_run

    run = Path(args.run_dir)
    if run.is_file() or run.suffix in (".yaml", ".yml"):
        raise ConfigError(f"metattn eval takes a run directory (what metattn train --out "
                          f"wrote), not {str(run)!r}; to train this config: metattn train "
                          f"{args.run_dir}")
    _tune_allocator()
    summary = evaluate_run(run, args.episodes, args.device, args.threads, args.set)
    _print_summary(summary, run)
    print(f"  wrote {run / 'eval.json'}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from metattn.explain import explain_run

    report = explain_run(args.run_dir, args.episodes, args.out, args.faith_episodes,
                         args.device or "cpu", args.set)
    print(f"[metattn] wrote {report} and its figures in {report.parent}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import torch

    from metattn.config import load
    from metattn.recipe import build, pick_device

    cfg = load(args.config, _overrides(args))
    device = pick_device(cfg.train.device)
    train_tasks, _, learner = build(cfg, device)
    n = sum(p.numel() for p in learner.parameters())
    batch = train_tasks.sample(1, torch.Generator().manual_seed(cfg.seed))
    print(f"[metattn] {cfg.name}: valid. {type(learner).__name__} ({n:,} parameters) on "
          f"{device}; episodes of {batch.support_x.shape[1]} support and "
          f"{batch.query_x.shape[1]} query examples, input {tuple(batch.support_x.shape[2:])}")
    if hasattr(learner, "plan"):
        print(f"  a training step runs as: {learner.plan(batch.to(device))}")
    return 0


def _cmd_kinds(args: argparse.Namespace) -> int:
    import inspect

    import metattn.builders  # noqa: F401  (registers the built-in kinds)
    from metattn import registry

    if args.group is None:
        for g in GROUPS:
            print(f"{g}: {', '.join(registry.kinds(g))}")
        print("options of one kind: metattn kinds GROUP KIND")
        return 0
    if args.group not in GROUPS:
        raise ConfigError(f"kinds: unknown group {args.group!r}; choose one of {GROUPS}")
    if args.kind is None:
        print("\n".join(registry.kinds(args.group)))
        return 0
    builder = registry.get_builder(args.group, args.kind)
    keys, _ = registry.schema(args.group, args.kind)
    doc = inspect.getdoc(builder) or ""
    print(f"{args.group}: {{kind: {args.kind}}}  {doc.splitlines()[0] if doc else ''}")
    for key, (ann, default) in keys.items():
        shown = "(required)" if default is registry.REQUIRED else f"default {default!r}"
        print(f"  {key}: {registry.ann_name(ann)}, {shown}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metattn", description="Meta-learning attention models.")
    p.add_argument("--version", action="version", version=f"metattn {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="meta-train from a config (a YAML path or a shipped name)")
    t.add_argument("config", help="a YAML file, or a shipped config's name (see configs/)")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.set_defaults(fn=_cmd_train)
    v = sub.add_parser("validate", help="build a config's tasks, model and learner; train "
                                        "nothing")
    v.add_argument("config", help="a YAML file, or a shipped config's name")
    v.set_defaults(fn=_cmd_validate)
    e = sub.add_parser("eval", help="re-evaluate a run's checkpoint on fixed test episodes")
    e.add_argument("run_dir", help="a run directory (what metattn train --out wrote)")
    e.add_argument("--episodes", type=_positive, default=None,
                   help="test episodes (default: the run's eval.episodes)")
    e.set_defaults(fn=_cmd_eval)
    for cmd in (t, v, e):
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set train.steps=500 (repeatable)")
        cmd.add_argument("--device", default=None,
                         help="auto, cpu, cuda or cuda:N (default: the config's)")
        cmd.add_argument("--threads", type=_positive, default=None, help="CPU threads")
    x = sub.add_parser("explain", help="attention figures, faithfulness and one offline HTML "
                                       "report of a run (on the CPU by default)")
    x.add_argument("run_dir", help="a run directory (what metattn train --out wrote)")
    x.add_argument("--episodes", type=_positive, default=4,
                   help="fixed test episodes drawn in the figures (default 4)")
    x.add_argument("--faith-episodes", type=_positive, default=100,
                   help="fixed test episodes of the faithfulness table (default 100)")
    x.add_argument("--out", default=None, help="output folder (default RUN_DIR/explain)")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the run (repeatable)")
    x.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    x.set_defaults(fn=_cmd_explain)
    k = sub.add_parser("kinds", help="the registered kinds; a kind's options with defaults")
    k.add_argument("group", nargs="?", help="task, model or learner")
    k.add_argument("kind", nargs="?", help="a kind of that group, e.g. maml")
    k.set_defaults(fn=_cmd_kinds)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metattn`` console script."""
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except MetattnError as err:
        print(f"metattn: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder the user named (unwritable, a disk full)
        print(f"metattn: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
