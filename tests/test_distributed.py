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
from metattn.train import train

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
              "tensorboard": False, "dtype": "float64"},
    "eval": {"episodes": 8, "chunk": 8},
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
    return [r["loss"] for r in recs if r["kind"] == "train"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _torchrun(cfg_path: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    src = str(Path(metattn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "metattn", "train", str(cfg_path), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_equal_one_and_resume_on_one(tmp_path):
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    two = tmp_path / "two"
    proc = _torchrun(cfg_path, two)
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("test loss") == 1  # only rank 0 reports

    one = tmp_path / "one"
    train(_cfg(3), one)
    _assert_same(_model(two), _model(one))
    # rank 0 logs whole-batch metrics (averaged over the ranks' slices)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-9, abs=1e-12)

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
    train(from_dict(data), tmp_path / "one")
    # Conv biases feed BatchNorm, which removes them: their true gradient is 0, so Adam turns
    # rounding noise into full-size steps; they cannot change any output and are left out.
    conv_bias = {f"model/model.body.{i}.bias" for i in (0, 4, 8, 12)}
    two, one = _model(tmp_path / "two"), _model(tmp_path / "one")
    _assert_same({k: v for k, v in two.items() if k not in conv_bias},
                 {k: v for k, v in one.items() if k not in conv_bias})
    assert len(two) - len(conv_bias) >= 10
