"""The Omniglot configs parse and build, and one runs end to end through benchmarks/omniglot.py."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import metattn.data.omniglot as om
from metattn.config import load
from metattn.meta.maml import MAML
from metattn.meta.metric import FEAT, MatchingNet, ProtoNet
from metattn.recipe import build

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("omniglot_*.yaml"))
SETTINGS = [f"{s}_{m}" for s in ("5w1s", "5w5s", "20w1s", "20w5s")
            for m in ("maml", "protonet", "matching", "feat")]
LEARNERS = {"maml": MAML, "protonet": ProtoNet, "matching": MatchingNet, "feat": FEAT}


def _real_root() -> Path | None:
    candidates = [ROOT.parent / "shared" / "data" / "omniglot"]
    if os.environ.get("METATTN_DATA"):
        candidates.append(Path(os.environ["METATTN_DATA"]) / "omniglot")
    return next((c for c in candidates if c.is_dir()), None)


REAL = _real_root()
needs_data = pytest.mark.skipif(REAL is None, reason="Omniglot data folder not found")


_ORIGINAL_LOAD = om.load_omniglot


@functools.lru_cache(maxsize=1)
def _load_once(root: str) -> om.Omniglot:
    return _ORIGINAL_LOAD(root)


def _cached_load(root=None, *args, **kwargs):
    if args or kwargs:
        return _ORIGINAL_LOAD(root, *args, **kwargs)
    return _load_once(str(root if root is not None else REAL))


@pytest.fixture
def omniglot_data(monkeypatch):
    """Point the loader at the real data, and read it once for all the builds below."""
    monkeypatch.setenv("METATTN_DATA", str(REAL.parent))
    monkeypatch.setattr(om, "load_omniglot", _cached_load)


def test_every_setting_has_a_config():
    names = {p.stem for p in CONFIGS}
    for s in SETTINGS:
        assert f"omniglot_{s}" in names, s
    for extra in ("5w1s_protonet_vit", "5w1s_maml_vit", "5w1s_protonet_cpu"):
        assert f"omniglot_{extra}" in names, extra


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path):
    cfg = load(path)
    assert cfg.name == path.stem
    assert cfg.task["kind"] == "omniglot"
    test = cfg.test_task_spec()
    tag = path.stem.split("_")[1]  # "5w1s"
    n_way, k_shot = (int(x) for x in tag[:-1].split("w"))
    assert (test["n_way"], test["k_shot"]) == (n_way, k_shot)
    assert cfg.eval.episodes == 600
    if cfg.learner["kind"] == "maml":
        # MAML paper protocol: the head has one output per way; 10 inner steps at test
        assert cfg.model["n_classes"] == cfg.task["n_way"] == n_way
        assert cfg.learner["eval_inner_steps"] == 10
        if cfg.model["kind"] == "conv4":
            assert cfg.train.steps == 60000
            want = (1, 0.4, 32) if n_way == 5 else (5, 0.1, 16)
            got = (cfg.learner["inner_steps"], cfg.learner["inner_lr"], cfg.train.meta_batch)
            if cfg.train.max_seconds:  # the timed GPU variant: its own measured settings
                assert path.stem == "omniglot_5w1s_maml_gpu60s"
                want = (1, 0.4, 16)
                assert cfg.learner["learn_inner_lr"] == "per_param" and cfg.train.cuda_graph
                assert cfg.train.max_seconds == 60
            assert got == want
    else:
        assert cfg.task["k_shot"] == k_shot  # trained with the test shot


@needs_data
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path, omniglot_data):
    cfg = load(path)
    train_tasks, test_tasks, learner = build(cfg, torch.device("cpu"))
    assert isinstance(learner, LEARNERS[cfg.learner["kind"]])
    assert train_tasks.num_classes == 4 * 1200 and test_tasks.num_classes == 4 * 423
    test = cfg.test_task_spec()
    assert (test_tasks.n_way, test_tasks.k_shot) == (test["n_way"], test["k_shot"])
    if isinstance(learner, MAML):
        assert learner.eval_inner_steps == 10


def _benchmark():
    spec = importlib.util.spec_from_file_location("bench_omniglot",
                                                  ROOT / "benchmarks" / "omniglot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_data
def test_three_step_run_end_to_end(tmp_path, omniglot_data):
    bench = _benchmark()
    out = tmp_path / "bench"
    rows = bench.main([
        "--configs", str(ROOT / "configs" / "omniglot_5w1s_protonet_cpu.yaml"),
        "--set", "task.n_way=10", "--set", "train.steps=3", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "train.progress=false",
        "--set", "train.tensorboard=false", "--set", "train.plots=false", "--set", "eval.chunk=4",
        "--episodes", "8", "--no-malloc-tune", "--out", str(out)])
    run = out / "omniglot_5w1s_protonet_cpu"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["episodes"] == 8
    # 10-way episodes: chance is 0.1, and a 3-step ProtoNet is far above it
    assert summary["metric"] == "accuracy" and summary["mean"] > 0.3
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.safetensors"):
        assert (run / name).is_file(), name
    assert (out / "table.md").is_file()
    table = json.loads((out / "table.json").read_text())
    assert table[0]["setting"] == "5-way 1-shot" and table[0]["paper"] == "98.8"
    assert rows[0]["steps"] == 3


@pytest.mark.parametrize("changes, name, paper", [
    ([], "MAML (10 test steps)", "95.8 ± 0.3"),
    (["learner.first_order=true"], "FO-MAML (10 test steps)", "89.4 ± 0.5"),
    (["learner.inner_params=[head]"], "ANIL (10 test steps)", "96.2 ± 0.5"),
    (["learner.learn_inner_lr=per_layer_step", "learner.msl_steps=100"],
     "MAML++ (10 test steps)", "97.65 ± 0.05"),
    (["learner.learn_inner_lr=per_param"], "Meta-SGD (10 test steps)", "-"),
    # the presets (YAML kinds of their own) name themselves
    (["learner.kind=anil"], "ANIL (10 test steps)", "96.2 ± 0.5"),
    (["learner.kind=fomaml"], "FO-MAML (10 test steps)", "89.4 ± 0.5"),
    (["learner.kind=metasgd"], "Meta-SGD (10 test steps)", "-"),
    (["learner.kind=mamlpp"], "MAML++ (10 test steps)", "97.65 ± 0.05"),
])
def test_maml_variants_are_printed_beside_their_own_paper_numbers(changes, name, paper):
    bench = _benchmark()
    cfg = load(ROOT / "configs" / "omniglot_20w1s_maml.yaml", changes)
    label, key = bench.learner_name(cfg, {"eval_inner_steps": 10})
    assert label == name
    assert bench.paper_cell(key, (20, 1), "Conv-4 (64 filters)")[0] == paper
