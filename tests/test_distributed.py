"""Multi-process meta-training (DDP, gloo, 2 CPU processes) gives the single-process run.

Every rank draws the same meta-batch, keeps its slice of tasks and DistributedDataParallel
averages the meta-gradients, so after the same steps the parameters are the single-process
run's; a checkpoint written by 2 ranks resumes on 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import metattn
from metattn import checkpoint
from metattn.config import from_dict
from metattn.meta.maml import MAML
from metattn.recipe import train

CFG = {
    "name": "ddp",
    "seed": 5,
    "task": {"kind": "sinusoid", "k_shot": 5, "k_query": 5},
    "model": {"kind": "mlp", "hidden": [16, 16]},
    # the loop path: per-task backward inside DDP's forward (vmap == loop is tested elsewhere)
    "learner": {"kind": "maml", "inner_lr": 0.01, "inner_steps": 2, "eval_inner_steps": 2,
                "vectorize": False},
    "train": {"steps": 3, "meta_batch": 4, "lr": 0.01, "log_every": 1, "eval_every": 0,
              "eval_episodes": 4, "checkpoint_every": 0, "progress": False,
              "tensorboard": False, "plots": False, "dtype": "float64"},
    "eval": {"episodes": 8, "chunk": 4},
}


def _cfg(steps: int):
    data = json.loads(json.dumps(CFG))
    data["train"]["steps"] = steps
    return from_dict(data)


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.load(run_dir)
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["mse"] for r in recs if r["kind"] == "train"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# Run under torchrun instead of ``-m metattn``: records, per rank and step, the tasks that
# rank's MAML.meta_loss received (count and a fingerprint of each task's support set), then
# runs the CLI as ``python -m metattn`` would.
SPY = """
import json, os, sys
import torch
from metattn.cli import main
from metattn.meta.maml import MAML

seen, evals = [], []
_meta_loss, _evaluate = MAML.meta_loss, MAML.evaluate

def meta_loss(self, batch, *args, **kwargs):
    if self.training:
        seen.append([float(x.sum()) for x in batch.support_x])
    return _meta_loss(self, batch, *args, **kwargs)

def evaluate(self, batch, *args, **kwargs):
    evals.append([float(x.sum()) for x in batch.support_x])
    return _evaluate(self, batch, *args, **kwargs)

MAML.meta_loss, MAML.evaluate = meta_loss, evaluate
rc = main(sys.argv[1:])
with open(os.path.join(os.environ["SPY_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({"train": seen, "eval": evals}, f)
sys.exit(rc)
"""


# A training script whose callback asks rank 0 for 3 steps and rank 1 for 5: rank 0's
# decision must hold on both (else rank 1 would wait alone in a collective).
DISAGREE = """
import json, os, sys
from metattn.config import from_dict
from metattn.recipe import train

cfg = from_dict(json.load(open(sys.argv[1])))
rank = int(os.environ["RANK"])

def callback(step, vals):
    if step == 1:
        cfg.train.steps = 3 if rank == 0 else 5

summary = train(cfg, sys.argv[2], callbacks=[callback])
with open(os.path.join(sys.argv[3], "rank%d.json" % rank), "w") as f:
    json.dump(summary["steps"], f)
"""


# Split evaluation: rank 1's BatchNorm statistics differ from rank 0's (as they drift under
# DDP); every rank must score rank 0's model, as one process would.
SPLIT_EVAL = """
import json, sys
import torch
import torch.distributed as dist
from metattn.meta.metric import ProtoNet
from metattn.recipe import evaluate

def setup(rank):
    # a ProtoNet whose encoder evaluates with running BatchNorm statistics, and 4 chunks of
    # 5-way episodes; the statistics are set per rank, as DDP training leaves them
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 8))
    enc[1].running_mean.fill_(0.5 * rank)
    enc[1].running_var.fill_(1.0 + rank)
    g = torch.Generator().manual_seed(3)
    y = torch.arange(5).repeat(2, 1)
    episodes = [TaskBatch(torch.randn(2, 5, 6, generator=g), y, torch.randn(2, 5, 6, generator=g),
                          y, n_way=5) for _ in range(4)]
    return ProtoNet(enc), episodes

from metattn.data.tasks import TaskBatch

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    learner, episodes = setup(rank)
    res = evaluate(learner, episodes, torch.device("cpu"), torch.float32, None, rank, world)
    json.dump([res["cross_entropy"], res["accuracy"]],
              open(sys.argv[1] + "/rank%d.json" % rank, "w"))
    dist.destroy_process_group()
"""


def test_split_evaluation_scores_rank_zeros_model(tmp_path):
    import importlib.util

    from metattn.recipe import evaluate

    (tmp_path / "split.py").write_text(SPLIT_EVAL)
    _launch([str(tmp_path / "split.py"), str(tmp_path)], timeout=120)
    spec = importlib.util.spec_from_file_location("split_eval", tmp_path / "split.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    learner, episodes = mod.setup(0)  # one process with rank 0's model
    res = evaluate(learner, episodes, torch.device("cpu"), torch.float32)
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got == pytest.approx([res["cross_entropy"], res["accuracy"]])


def test_ranks_follow_rank_zeros_callback(tmp_path):
    data = json.loads(json.dumps(CFG))
    data["train"]["steps"] = 10
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    (tmp_path / "disagree.py").write_text(DISAGREE)
    _launch([str(tmp_path / "disagree.py"), str(tmp_path / "cfg.json"), str(tmp_path / "run"),
             str(tmp_path)], timeout=90)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [3, 3]
    assert _losses(tmp_path / "run") and len(_losses(tmp_path / "run")) == 3


def _launch(args: list[str], env_extra: dict[str, str] | None = None, timeout: int = 180
            ) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 ARGS`` on CPU (one thread per process)."""
    # (faulthandler: a rank that dies on a signal prints its Python stack into the report)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1", **(env_extra or {})}
    src = str(Path(metattn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _torchrun(cfg_path: Path, out: Path, spy: Path | None = None
              ) -> subprocess.CompletedProcess:
    target, extra = ["-m", "metattn"], {}
    if spy is not None:
        spy.mkdir()
        (spy / "spy.py").write_text(SPY)
        extra["SPY_DIR"] = str(spy)
        target = [str(spy / "spy.py")]
    return _launch([*target, "train", str(cfg_path), "--out", str(out)], extra)


def test_two_processes_equal_one_and_resume_on_one(tmp_path, monkeypatch):
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    two = tmp_path / "two"
    proc = _torchrun(cfg_path, two, spy=tmp_path / "spy")
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("run directory:") == 1  # only rank 0 reports
    # the work is split: each rank trains on its own half of every meta-batch of 4
    spied = [json.loads((tmp_path / "spy" / f"rank{r}.json").read_text()) for r in (0, 1)]
    ranks = [r["train"] for r in spied]
    assert [len(r) for r in ranks] == [3, 3]  # one training meta_loss per step
    # and the final evaluation too: 2 chunks of 4 test episodes, one chunk per rank
    assert [[len(c) for c in r["eval"]] for r in spied] == [[4], [4]]
    assert not set(spied[0]["eval"][0]) & set(spied[1]["eval"][0])
    for r0, r1 in zip(*ranks):
        assert len(r0) == len(r1) == 2
        assert not set(r0) & set(r1)

    one = tmp_path / "one"
    seen: list[list[float]] = []
    meta_loss = MAML.meta_loss

    def spy(self, batch, *args, **kwargs):
        if self.training:
            seen.append([float(x.sum()) for x in batch.support_x])
        return meta_loss(self, batch, *args, **kwargs)

    monkeypatch.setattr(MAML, "meta_loss", spy)
    train(_cfg(3), one)
    monkeypatch.undo()
    # rank 0 took the first half of the single process's meta-batch, rank 1 the second
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == seen
    _assert_same(_model(two), _model(one))
    # rank 0 logs whole-batch metrics (averaged over the ranks' slices)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-9, abs=1e-12)
    # the evaluation split over the ranks gives the single process's summary
    s2, s1 = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert s2["episodes"] == s1["episodes"] == 8
    assert s2["results"]["mse"] == pytest.approx(s1["results"]["mse"], rel=1e-6)
    assert s2["results"]["mse_ci95"] == pytest.approx(s1["results"]["mse_ci95"], rel=1e-6)

    # a 2-process checkpoint resumes in 1 process and continues as the 1-process run does
    # (resumed == uninterrupted is tested in test_recipe.py)
    train(_cfg(5), two, resume=True)
    train(_cfg(5), one, resume=True)
    _assert_same(_model(two), _model(one))
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-9, abs=1e-12)
    assert len(_losses(two)) == 5


OMNIGLOT = (Path(metattn.__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot")


@pytest.mark.skipif(not OMNIGLOT.is_dir() and not os.environ.get("METATTN_DATA"),
                    reason="Omniglot data folder not found")
def test_protonet_on_two_processes_equals_one(tmp_path):
    """A metric learner never uses Conv4's head: DDP must not wait for its gradient. With
    each task normalised on its own, 2 ranks x 1 task equal 1 process x 2 tasks."""
    data = json.loads(json.dumps(CFG))
    data["task"] = {"kind": "omniglot", "n_way": 5, "k_shot": 1, "k_query": 2}
    data["model"] = {"kind": "conv4", "hidden": 8}
    data["learner"] = {"kind": "protonet", "scale": 0.05}
    data["train"].update({"meta_batch": 2, "dtype": "float32"})
    data["eval"] = {"episodes": 4, "chunk": 4}
    cfg_path = tmp_path / "pn.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    _torchrun(cfg_path, tmp_path / "two")
    # one thread here as in torchrun's ranks (OMP_NUM_THREADS=1): float32 reductions then add
    # in the same order (MKL splits a long matmul reduction by the thread count)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(from_dict(data), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    # Conv biases feed BatchNorm, which removes them: their true gradient is 0, so Adam turns
    # rounding noise into full-size steps; they cannot change any output and are left out.
    conv_bias = {f"model/model.body.{i}.bias" for i in (0, 4, 8, 12)}
    two, one = _model(tmp_path / "two"), _model(tmp_path / "one")
    _assert_same({k: v for k, v in two.items() if k not in conv_bias},
                 {k: v for k, v in one.items() if k not in conv_bias})
    assert len(two) - len(conv_bias) >= 10
