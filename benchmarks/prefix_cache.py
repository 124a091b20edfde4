"""Side by side: a meta-training step over all-MiniLM-L6-v2 with its lower layers frozen, with
and without the per-sentence cache of the frozen layers (metattn.nn.prefix_cache).

ProtoNet, 10-way 5-shot 5-query CLINC150 episodes (100 sentences), the top ``--top`` layers
trained. The cached side has seen the episodes' sentences before (a run over a dataset sees
each sentence many times); both sides run the same episodes, alternately, in one process.

    python benchmarks/prefix_cache.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from metattn.builders.text import intents  # noqa: E402
from metattn.meta.metric import ProtoNet  # noqa: E402
from metattn.nn.hf import HFEncoder  # noqa: E402


def main() -> None:
    """Print median seconds per step for both sides and the ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--top", type=int, default=2, help="trained top layers (of 6)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = intents("train", n_way=10, k_shot=5, k_query=5)
    g = torch.Generator().manual_seed(0)
    batches = [tasks.sample(1, g) for _ in range(args.steps)]
    sides = {}
    for name, cache in (("cached", True), ("not cached", False)):
        torch.manual_seed(0)
        learner = ProtoNet(HFEncoder(frozen_layers=6 - args.top, cache=cache, normalize=True),
                           scale=20.0)
        opt = torch.optim.AdamW([q for q in learner.parameters() if q.requires_grad], 5e-5)
        sides[name] = (learner, opt, [])
        if cache:
            for b in batches:  # seen before
                learner.model(b.support_x), learner.model(b.query_x)
    for b in batches:
        for learner, opt, times in sides.values():
            t0 = time.perf_counter()
            loss, _ = learner.meta_loss(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    base = float(np.median(sides["not cached"][2]))
    for name, (_, _, times) in sides.items():
        med = float(np.median(times))
        print(f"{name:>11}: {med * 1000:7.1f} ms per step (median of {len(times)}), "
              f"{base / med:.2f}x")


if __name__ == "__main__":
    main()
