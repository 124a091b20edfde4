"""What benchmarks/inflection.py and benchmarks/translation.py share: train the configs
through the recipe, adapt every method to each held-out language, decode, score, and print
the tables (mean ± 95% CI over seeds, per language, per group and overall).

Methods, each adapted to a held-out language's support pairs with the same budget (``steps``
AdamW minibatches of ``batch`` pairs at rate ``lr``, drawn with the seed):

* ``copy``: the output is the input (the lemma; the English string);
* ``scratch``: a fresh model (initialised with the seed) trained on the support pairs only;
* ``transfer``: the multilingual model (trained on every meta-training language, no inner
  loop) fine-tuned;
* ``FOMAML`` / ``MAML``: the first- / second-order meta-learned initialisation, adapted by
  its own inner loop (``eval_inner_steps`` SGD steps on the whole support set), then
  fine-tuned (the inner loop is part of the method: a meta-learned initialisation is the
  point it adapts FROM, and its own loss there can be high);
* ``MAML, inner loop``: MAML's inner loop alone, no fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

import metattn.recipe as recipe
from metattn import registry
from metattn.config import RunConfig, load
from metattn.data.tasks import mean_ci95
from metattn.meta.seq2seq import Seq2SeqMAML, fine_tune
from metattn.nn.seq2seq import beam_search
from metattn.reports import fmt, print_table

TRAINED = ("transfer", "FOMAML", "MAML")
METHODS = ("copy", "scratch", *TRAINED, "MAML, inner loop")
Score = Callable[[list[str], list], dict[str, float]]


def add_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """The options both benchmarks take."""
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per language")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps (every method)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning rate (every method)")
    p.add_argument("--batch", type=int, default=20, help="fine-tuning minibatch")
    p.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--max-test", type=int, default=200,
                   help="score the first N test pairs of each language (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke run: minutes, not numbers")
    p.add_argument("--reuse", action="store_true", help="load finished runs in --out")
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every config")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="the methods to score (default: all)")


def configs(prefix: str) -> dict[str, str]:
    """The three trained methods' shipped configs: ``<prefix>_{transfer,fomaml,maml}``."""
    return {m: f"{prefix}_{m.lower()}" for m in TRAINED}


def start(doc: str, out: str, configs: dict[str, str],
          more: Callable[[argparse.ArgumentParser], None] = lambda p: None
          ) -> tuple[argparse.Namespace, RunConfig, dict[str, Seq2SeqMAML]]:
    """Parse the options (``more`` adds a benchmark's own), set the threads, train or load
    the configs: (options, the MAML config, the learners by method)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_arguments(p, out)
    more(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args, load(configs["MAML"], args.set), train_runs(configs, args)


def train_runs(configs: dict[str, str], args: argparse.Namespace) -> dict[str, Seq2SeqMAML]:
    """Train (or, with --reuse, load) each config; the trained learners by method name."""
    out = {}
    for method, name in configs.items():
        run = args.out / name
        sets = ["train.progress=false", f"train.threads={args.threads}", *args.set]
        if args.quick:
            sets += ["train.max_seconds=8", "train.checkpoint_every=1000000",
                     "eval.episodes=4"]
        if not (args.reuse and (run / "summary.json").is_file()):
            shutil.rmtree(run, ignore_errors=True)
            t = time.perf_counter()
            recipe.train(load(name, sets), run)
            print(f"{name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
        out[method] = recipe.load_run(run)[1].eval()
    return out


def decode(model: nn.Module, x: torch.Tensor, vocab, beam: int, chunk: int = 200
           ) -> list[str]:
    """The model's output text for each packed row of ``x`` (its source part)."""
    texts = []
    for i in range(0, len(x), chunk):
        ids = beam_search(model, x[i: i + chunk, : model.max_src], beam=beam)
        texts += [vocab.decode(r) for r in ids]
    return texts


def adapted(method: str, learners: dict[str, Seq2SeqMAML], model: dict, sx: torch.Tensor,
            sy: torch.Tensor, seed: int, args: argparse.Namespace) -> nn.Module:
    """``method``'s model adapted to one language's support pairs; ``model`` is the configs'
    model section (scratch builds a fresh one from it)."""
    ft = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch, "seed": seed}
    if method == "MAML, inner loop":
        return learners["MAML"].adapt(sx, sy).to_module()
    if method == "scratch":
        torch.manual_seed(seed)
        return fine_tune(registry.build("model", model), sx, sy, **ft)
    if method in ("FOMAML", "MAML"):  # the meta-learned inner loop, then fine-tuning
        return fine_tune(learners[method].adapt(sx, sy).to_module(), sx, sy, **ft)
    return fine_tune(learners[method].model, sx, sy, **ft)


def evaluate(make_tasks: Callable[[int], object], learners: dict[str, Seq2SeqMAML],
             model: dict, sources: Callable[[object], str], score: Score,
             args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """``res[method][language]`` = one score dict per seed; ``make_tasks(seed)`` gives the
    held-out tasks of that seed (their support pools may differ by seed); ``model``: the
    configs' model section."""
    res: dict[str, dict[str, list[dict]]] = {m: {} for m in args.methods}
    for seed in range(args.seeds):
        tasks = make_tasks(seed)
        for lang in tasks.languages:
            sx, sy = tasks.support[lang]
            qx, refs = tasks.query[lang][0], tasks.texts[lang]
            if args.max_test:
                qx, refs = qx[: args.max_test], refs[: args.max_test]
            t = time.perf_counter()
            for method in args.methods:
                if method == "copy":
                    hyps = [sources(r) for r in refs]
                else:
                    tuned = adapted(method, learners, model, sx, sy, seed, args)
                    hyps = decode(tuned, qx, tasks.vocab, args.beam)
                res[method].setdefault(lang, []).append(score(hyps, refs))
            first = {m: next(iter(res[m][lang][-1].values())) for m in args.methods}
            print(f"seed {seed} {lang}: {len(sx)} support, {len(qx)} test pairs, "
                  f"{time.perf_counter() - t:.0f} s; "
                  + ", ".join(f"{m} {v:.1f}" for m, v in first.items()), flush=True)
    return res


def per_seed(res: dict[str, dict[str, list[dict]]], method: str, langs: Sequence[str],
             metric: str) -> torch.Tensor:
    """``[seeds]``: the metric averaged over ``langs``, one value per seed."""
    return torch.tensor([[r[metric] for r in res[method][g]] for g in langs],
                        dtype=torch.float64).mean(0)


def tables(res: dict, groups: dict[str, list[str]], metrics: Sequence[str], title: str,
           anchor: dict[str, str]) -> tuple[list[str], dict]:
    """Print per-group tables (mean ± 95% CI over seeds of the group's macro average) and
    the paired gains of MAML over transfer and scratch; return markdown lines and JSON."""
    md, js = [], {}
    for group, langs in groups.items():
        rows, js[group] = [], {}
        for method in res:
            stats = {k: mean_ci95(per_seed(res, method, langs, k)) for k in metrics}
            js[group][method] = stats
            rows.append([method, *(fmt(*stats[k], digits=2) for k in metrics),
                         anchor.get(method, "")])
        for other in ("transfer", "scratch") if "MAML" in res else ():
            if other not in res:
                continue
            k = metrics[0]
            gain = mean_ci95(per_seed(res, "MAML", langs, k) - per_seed(res, other, langs, k))
            js[group][f"MAML - {other}"] = gain
            rows.append([f"MAML - {other} (paired, {k})", fmt(*gain, digits=2),
                         *[""] * (len(metrics) - 1), ""])
        head = ["method", *metrics, "published"]
        print_table(f"{title}: {group} ({len(langs)}: {', '.join(langs)})", head, rows)
        md += [f"**{group}** ({', '.join(langs)})", "", "| " + " | ".join(head) + " |",
               "|" + "---|" * len(head), *("| " + " | ".join(map(str, r)) + " |" for r in rows),
               ""]
    return md, js


def per_language(res: dict, langs: Sequence[str], metric: str, title: str) -> list[str]:
    """Print one row per language (``metric``, mean ± 95% CI over seeds, every method);
    return it as markdown lines."""
    head = ["language", *res]
    rows = [[g, *(fmt(*mean_ci95(per_seed(res, m, [g], metric)), digits=1) for m in res)]
            for g in langs]
    print_table(f"{title}: {metric} per language", head, rows)
    return [f"{metric} per language", "", "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def write(out: Path, name: str, md: list[str], js: dict) -> None:
    """``out/<name>.md`` and ``out/<name>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    (out / f"{name}.json").write_text(json.dumps(js, indent=1))
