"""Few-shot translation from English into a new language (Django's catalogs, docs/seq2seq.md).

Trains three configs through :func:`metattn.recipe.train` with the same time budget (the
multilingual transfer model, first-order MAML, second-order MAML), then, for each K in
``--shots``, adapts every method (benchmarks/languages.py: copy, from scratch, transfer,
FOMAML, MAML, MAML's own inner loop) to each held-out locale from K pairs (drawn with the
seed) and scores its held-out strings: chrF and BLEU (sacrebleu, corpus level) and
placeholder accuracy (the share of strings with placeholders whose translation keeps exactly
the reference's ``%(name)s`` / ``%s`` / ``{}``), per locale and averaged, mean ± 95% CI over
seeds (each seed draws its own K pairs and fine-tuning order).

    python benchmarks/translation.py --out runs/bench-translation      # ~1 h, 1 core
    python benchmarks/translation.py --quick                           # smoke run, minutes
    python benchmarks/translation.py --reuse --out runs/bench-translation

Tables: ``OUT/translation.md`` and ``OUT/translation.json``.
"""

from __future__ import annotations

import argparse
import time

from languages import configs, evaluate, per_language, start, tables, write

from metattn.data.translation import TranslationTasks, placeholder_match, placeholders
from metattn.meta.seq2seq import bleu, chrf

CONFIGS = configs("translate_cpu")
ANCHOR = {"MAML": "beats transfer at ~16k target tokens (Gu et al. 2018, other data)"}


def score(hyps: list[str], refs: list) -> dict[str, float]:
    """chrF, BLEU and placeholder accuracy (%; NaN when no reference has a placeholder) of
    the hypotheses against the pairs."""
    targets = [r.target for r in refs]
    marked = [(h, t) for h, t in zip(hyps, targets) if placeholders(t)]
    kept = sum(placeholder_match(h, t) for h, t in marked)
    return {"chrF": chrf(hyps, targets), "BLEU": bleu(hyps, targets),
            "placeholders": 100.0 * kept / len(marked) if marked else float("nan")}


def options(p: argparse.ArgumentParser) -> None:
    """Translation's own options: the K values and the locales."""
    p.add_argument("--shots", type=int, nargs="+", default=[50, 100, 300])
    p.add_argument("--locales", nargs="*", default=None, help="held-out locales to score")


def main() -> None:
    t0 = time.perf_counter()
    args, cfg, learners = start(__doc__, "runs/bench-translation", CONFIGS, options)
    task = cfg.task
    locales = args.locales or (["uk", "fi"] if args.quick else None)
    md, js = [], {}
    for k in args.shots:
        def held(seed: int, k: int = k) -> TranslationTasks:
            # the pools are read whole: a task's draw is all K support pairs
            return TranslationTasks("test", locales=locales, shots=k, shots_seed=seed, k_shot=k,
                                    vocab_size=task["vocab_size"], max_src=task["max_src"],
                                    max_tgt=task["max_tgt"])

        res = evaluate(held, learners, cfg.model, lambda r: r.source, score, args)
        langs = list(held(0).languages)
        title = f"English -> X, K = {k}"
        part, js[k] = tables(res, {"all held-out locales": langs},
                             ("chrF", "BLEU", "placeholders"), title, ANCHOR)
        md += [f"### K = {k}", "", *part, *per_language(res, langs, "chrF", title)]
        js[k]["per_language"] = res
    scored = {g: len(t) for g, t in held(0).texts.items()}
    head = (f"Adaptation: {args.steps} AdamW steps of {args.batch} at {args.lr} on the K pairs "
            f"(every method); greedy decoding (beam {args.beam}); test strings scored per "
            f"locale: {scored}; mean ± 95% CI over {args.seeds} seeds.")
    write(args.out, "translation", [head, "", *md], js)
    print(f"total {time.perf_counter() - t0:.0f} s; tables in {args.out}/translation.md")


if __name__ == "__main__":
    main()
