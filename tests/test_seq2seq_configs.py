"""The shipped inflection and translation configs: their model fits their task, the recipe
trains one, and ``metattn explain`` draws its cross-attention."""

import json
import math

import pytest

from metattn import registry
from metattn.config import load, shipped_configs
from metattn.errors import DataError

NAMES = [n for n in shipped_configs() if n.startswith(("sigmorphon_", "translate_"))]


def _test_tasks(cfg):
    try:
        return registry.build("task", cfg.test_task_spec(), "test")
    except DataError as e:
        pytest.skip(f"data not found: {e}")


def test_every_seq2seq_config_is_shipped():
    assert {"sigmorphon_cpu_maml", "sigmorphon_cpu_fomaml", "sigmorphon_cpu_transfer",
            "translate_cpu_maml", "translate_cpu_fomaml", "translate_cpu_transfer"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_model_fits_the_task(name):
    cfg = load(name)
    tasks = _test_tasks(cfg)
    assert cfg.model["vocab_size"] == len(tasks.vocab)
    assert (cfg.model["max_src"], cfg.model["max_tgt"]) == (tasks.max_src, tasks.max_tgt)


def test_the_recipe_trains_an_inflection_config_and_explain_draws_it(tmp_path):
    from metattn.explain import explain_run
    from metattn.recipe import train

    cfg = load("sigmorphon_cpu_maml", [
        "task.families=[celtic]", "train.steps=2", "train.max_seconds=null",
        "train.meta_batch=2", "train.checkpoint_every=2", "eval.episodes=4",
        "train.progress=false", "train.tensorboard=false", "model.d_model=32",
        "model.d_ff=64", "model.enc_layers=1", "model.dec_layers=1", "task.k_shot=4",
        "task.k_query=4"])
    tasks = _test_tasks(cfg)
    cfg.model["vocab_size"] = len(tasks.vocab)  # celtic's vocabulary only
    summary = train(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "summary.json").read_text())["results"]
    assert summary["episodes"] == 4
    for key in ("exact_match", "token_accuracy", "loss"):
        assert math.isfinite(res[key]) and f"{key}_ci95" in res
    report = explain_run(tmp_path / "run", episodes=2, faith_episodes=2)
    html = report.read_text()
    assert "Cross-attention: what each output token reads" in html
    assert (report.parent / "cross_attention_0.png").is_file()
