"""benchmarks/throughput.py's compute floor: the FLOPs it counts are the second-order maths."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import metattn as mt

ROOT = Path(__file__).resolve().parents[1]


def _throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput",
                                                  ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_floor_counts_nine_matmuls_per_inner_step_and_prints_a_share_of_peak(tmp_path, capsys):
    """Second-order MAML costs 9 forward passes' worth of matmuls per inner step (forward,
    2 for the backward, 6 for the backward through it) and 3 for the query pass; a
    first-order or graph-less inner step would count fewer."""
    tp = _throughput()
    wl = tp.WORKLOADS["transformer"]
    torch.manual_seed(0)
    model = wl.make_model()
    batch = wl.make_batch(1, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fwd, mt.double_backward():  # the math attention
        model(batch.support_x[0])
    out = tmp_path / "t.json"
    threads = torch.get_num_threads()
    try:  # --threads sets the process's torch threads: the next tests get theirs back
        tp.main(["--workload", "transformer", "--meta-batch", "1", "--iters", "1",
                 "--warmup", "0", "--methods", "loop", "--check-tasks", "1", "--threads", "1",
                 "--malloc", "default", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())["results"][0]
    floor = res["floor"]
    want = (9 * wl.inner_steps + 3) * fwd.get_total_flops()
    assert floor["gflop"] * 1e9 == pytest.approx(want, rel=1e-12)
    assert floor["s_per_it"] == pytest.approx(floor["gflop"] / floor["peak_gflops"])
    for row in res["rows"]:  # a meta-iteration cannot beat its own matmuls at peak
        assert 0 < row["of_peak"] < 1
    text = capsys.readouterr().out
    assert "compute floor:" in text and "| of peak |" in text
