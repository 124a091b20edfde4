"""Few-shot morphological inflection (CoNLL-SIGMORPHON 2018 task 1, docs/seq2seq.md).

Trains three configs through :func:`metattn.recipe.train` with the same time budget (the
multilingual transfer model, first-order MAML, second-order MAML), then adapts every method
(benchmarks/languages.py: copy, from scratch, transfer, FOMAML, MAML, MAML's own inner loop)
to each held-out language's 100-line train-low and scores its test file: exact-match
accuracy (%) and mean Levenshtein distance, per language and macro-averaged per family and
overall, mean ± 95% CI over fine-tuning seeds, beside Kann et al. (2020).

    python benchmarks/inflection.py --out runs/bench-inflection      # ~45 min, 1 core
    python benchmarks/inflection.py --quick                          # smoke run, minutes
    python benchmarks/inflection.py --reuse --out runs/bench-inflection

Tables: ``OUT/inflection.md`` and ``OUT/inflection.json``.
"""

from __future__ import annotations

import time

from languages import configs, evaluate, per_language, start, tables, write

from metattn.data.inflection import FAMILIES, InflectionTasks
from metattn.meta.seq2seq import string_scores

CONFIGS = configs("sigmorphon_cpu")
# Kann, Bowman & Cho 2020 (/work/shared/REFERENCES.md): their gain, not their accuracy
ANCHOR = {"MAML": "+31.7 over transfer (Kann et al. 2020, 29 targets)"}


def main() -> None:
    t0 = time.perf_counter()
    args, cfg, learners = start(__doc__, "runs/bench-inflection", CONFIGS)
    task = cfg.task
    held = InflectionTasks("test", families=task.get("families"), max_src=task["max_src"],
                           max_tgt=task["max_tgt"])
    if args.quick:
        held.languages = held.languages[:2]
    res = evaluate(lambda seed: held, learners, cfg.model, lambda e: e.lemma,
                   lambda hyps, refs: string_scores(hyps, [e.form for e in refs]), args)
    langs = list(held.languages)
    groups = {f: [g for g in langs if g in FAMILIES[f]] for f in FAMILIES}
    groups = {"all held-out languages": langs, **{f: g for f, g in groups.items() if g}}
    title = "SIGMORPHON 2018 inflection, held-out languages"
    md, js = tables(res, groups, ("accuracy", "levenshtein"), title, ANCHOR)
    md += per_language(res, langs, "accuracy", title)
    js["per_language"] = res
    head = (f"Adaptation: {args.steps} AdamW steps of {args.batch} at {args.lr} on the 100-line "
            f"train-low (every method); greedy decoding (beam {args.beam}); first "
            f"{args.max_test or 'all'} test lines; mean ± 95% CI over {args.seeds} seeds.")
    write(args.out, "inflection", [head, "", *md], js)
    print(f"total {time.perf_counter() - t0:.0f} s; tables in {args.out}/inflection.md")


if __name__ == "__main__":
    main()
