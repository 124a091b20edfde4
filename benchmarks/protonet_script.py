"""The reference point for the ProtoNet CPU config: a plain script, no library.

The Omniglot issue measured "a 60-line ProtoNet script (Conv-4, 60-way 1-shot 5-query
training episodes, Adam 1e-3, no augmentation)" against a 10-minute budget on 2 CPU cores.
This is such a script, written from that description, so the comparison can be rerun on any
machine: standard ``nn.BatchNorm2d`` (eval mode at test), squared Euclidean distances,
constant learning rate, no tuning. metattn supplies only the data (the same MAML-protocol
split) and the fixed, seeded test episodes of ``configs/omniglot_5w1s_protonet_cpu.yaml``
(its ``eval`` section: 600 5-way 1-shot episodes), so this number and
``benchmarks/omniglot.py``'s for that config are over identical episodes.

    OMP_NUM_THREADS=2 python benchmarks/protonet_script.py --threads 2 --budget 600
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metattn import registry
from metattn.allocator import tune_cpu_allocator
from metattn.config import load
from metattn.data.omniglot import OmniglotTasks
from metattn.data.tasks import TaskBatch, fixed_episodes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniglot_5w1s_protonet_cpu.yaml"


def block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                         nn.ReLU(), nn.MaxPool2d(2))


def logits(net: nn.Module, b: TaskBatch) -> torch.Tensor:
    """-squared distance of each query to each class mean: ``[T, Q, n_way]``."""
    T, S = b.support_x.shape[:2]
    z = net(torch.cat([b.support_x, b.query_x], 1).flatten(0, 1)).unflatten(0, (T, -1))
    zs, zq = z[:, :S], z[:, S:]
    onehot = F.one_hot(b.support_y, b.n_way).float()
    protos = onehot.transpose(1, 2) @ zs / onehot.sum(1)[..., None]
    return -torch.cdist(zq, protos).pow(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=600.0, help="training seconds")
    p.add_argument("--way", type=int, default=60, help="training episodes' N-way")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)
    train = OmniglotTasks("train", n_way=args.way, k_shot=1, k_query=5)
    cfg = load(CONFIG)  # only for its test episodes
    test = registry.build("task", cfg.test_task_spec(), "test")
    net = nn.Sequential(block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten())
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.budget:
        b = train.sample(1, g)
        loss = F.cross_entropy(logits(net, b).flatten(0, 1), b.query_y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    net.eval()
    episodes = fixed_episodes(test, cfg.eval.episodes, cfg.eval.seed, cfg.eval.chunk)
    with torch.no_grad():
        acc = torch.cat([(logits(net, b).argmax(-1) == b.query_y).float().mean(1)
                         for b in episodes])
    ci = 1.96 * acc.std().item() / math.sqrt(len(acc))
    print(f"plain ProtoNet script: {steps} steps of {args.way}-way 1-shot in "
          f"{args.budget:.0f} s, {args.threads} threads: test accuracy "
          f"{100 * acc.mean().item():.2f} ± {100 * ci:.2f}% over {len(acc)} episodes of "
          f"{CONFIG.name}")


if __name__ == "__main__":
    main()
