"""metattn.recipe.budget: a run's time budget, on a clock the tests control (each meta-step
takes exactly ``dt`` seconds of it), so no test here depends on the machine's speed."""

from __future__ import annotations

import json
import os
import signal

import pytest
from models import CONFIGS, DT, TINY, Clock, write_cfg

from metattn import checkpoint
from metattn.cli import main
from metattn.config import from_dict, load
from metattn.errors import ConfigError
from metattn.recipe import TimeBudget, train


def test_budget_stops_and_fits_the_schedule():
    cfg = load(CONFIGS / "omniglot_5w1s_protonet_cpu.yaml",
               ["train.steps=1000", "train.schedule=cosine"])
    cb = TimeBudget(cfg, seconds=100.0, fit_schedule=True)
    cb(10, {"seconds": 2.0})  # before a tenth of the budget: no fit yet
    assert cfg.train.steps == 1000
    cb(50, {"seconds": 10.0})  # the reference point for the time per step
    cb(60, {"seconds": 12.0})  # 0.2 s/step since then -> 60 + 88 / 0.2 = 500
    assert cfg.train.steps == 500 and cb.stopped_by_budget
    cb(110, {"seconds": 16.0})  # faster now: 0.1 s/step since step 50 -> 110 + 84 / 0.1
    assert cfg.train.steps == 950
    cb(150, {"seconds": 30.0})  # slower again: 0.2 s/step -> 150 + 70 / 0.2 = 500
    assert cfg.train.steps == 500
    cb(300, {"seconds": 55.0})  # faster (-> 550), but past half the budget: no growing
    assert cfg.train.steps == 500
    cb(490, {"seconds": 98.0})  # the horizon is the end: never pushed past the budget
    assert cfg.train.steps == 490 + int(2.0 / (88.0 / 440))
    cb(500, {"seconds": 100.5})
    assert cfg.train.steps == 500
    # a horizon reached with time left still ends the run (the rate has reached zero)
    cfg = load(CONFIGS / "omniglot_5w1s_protonet_cpu.yaml",
               ["train.steps=1000", "train.schedule=cosine"])
    cb = TimeBudget(cfg, seconds=100.0)
    cb(50, {"seconds": 10.0})
    cb(100, {"seconds": 20.0})  # 0.2 s/step -> 100 + 80 / 0.2 = 500
    assert cfg.train.steps == 500
    cb(500, {"seconds": 40.0})  # much faster since, but step 500 is the end
    assert cfg.train.steps == 500
    cfg = load(CONFIGS / "omniglot_5w1s_protonet_cpu.yaml", ["train.steps=300"])
    cb = TimeBudget(cfg, seconds=100.0, fit_schedule=True)
    cb(50, {"seconds": 10.0})
    cb(60, {"seconds": 12.0})  # never above the config's steps
    assert cfg.train.steps == 300 and not cb.stopped_by_budget
    cb(300, {"seconds": 60.0})  # the config's length reached: the run ends, budget or not
    assert cfg.train.steps == 300 and not cb.stopped_by_budget


def test_budget_ignores_a_slow_start_and_never_overruns():
    cfg = load(CONFIGS / "omniglot_5w1s_protonet_cpu.yaml",
               ["train.steps=100000", "train.schedule=cosine", "train.log_every=10"])
    cb = TimeBudget(cfg, seconds=100.0, fit_schedule=True)
    cb(10, {"seconds": 12.0})  # a 12 s warm-up in the first 10 steps, then 0.1 s/step
    cb(20, {"seconds": 13.0})
    assert cfg.train.steps in (889, 890)  # 20 + 87 / 0.1, not 10 + 88 / 1.2 = 83
    # a constant schedule: the run ends where the budget runs out, not up to log_every later
    cfg = load(CONFIGS / "omniglot_5w1s_protonet_cpu.yaml",
               ["train.steps=100000", "train.schedule=constant", "train.log_every=10"])
    cb = TimeBudget(cfg, seconds=100.0, fit_schedule=True)
    cb(10, {"seconds": 10.0})
    cb(20, {"seconds": 20.0})
    cb(90, {"seconds": 90.0})
    assert cfg.train.steps == 100000
    cb(95, {"seconds": 95.5})  # 1 s/step: 4 steps left, the next call would be at 105
    assert cfg.train.steps == 99 and cb.stopped_by_budget


def test_time_budget_ends_a_run_on_time_and_it_is_evaluated(tmp_path):
    cfg = from_dict(json.loads(json.dumps(TINY)))
    cfg.train.steps, cfg.train.eval_every, cfg.train.schedule = 100_000, 0, "cosine"
    cfg.train.checkpoint_every = 50
    cfg.train.max_seconds = 100.0  # a TimeBudget passed in takes the config's place
    budget = TimeBudget(cfg, seconds=1.0)
    run = tmp_path / "run"
    summary = train(cfg, run, callbacks=[budget], clock=Clock())
    # 64 steps of 1/64 s fill the budget; the fitted horizon ends the run there
    assert budget.stopped_by_budget and summary["steps"] == 64
    assert summary["seconds"] == 1.0 and summary["max_seconds"] == 1.0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in lines if x["kind"] == "train"]
    # the schedule followed the fitted horizon: the rate ran down to (almost) zero
    assert lrs[-1] < 0.05 * cfg.train.lr < max(lrs)
    # config.yaml holds the fitted horizon, so --resume from it is accepted
    saved = load(run / "config.yaml")
    assert saved.train.steps == summary["steps"]
    train(saved, run, resume=True, clock=Clock())
    with pytest.raises(ConfigError, match="seconds"):
        TimeBudget(cfg, seconds=0)


def test_budget_ends_the_run_between_log_steps(tmp_path):
    # log_every 1000: the budget's callback would first run at step 1000 (seconds late);
    # in one process the recipe ends the run at the first step past the budget
    cfg = load(write_cfg(tmp_path, train__steps=100_000, train__eval_every=0,
                         train__checkpoint_every=0, train__log_every=1000,
                         train__max_seconds=0.3))
    summary = train(cfg, tmp_path / "run", clock=Clock())
    assert summary["stopped_by_budget"] and summary["steps"] == 20  # 20 / 64 s >= 0.3 s
    assert summary["seconds"] == round(20 * DT, 2)  # (summary.json rounds to 0.01 s)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [20]
    assert load(tmp_path / "run" / "config.yaml").train.steps == 20


def test_max_seconds_ends_on_time_and_resumes(tmp_path):
    cfg = write_cfg(tmp_path, train__steps=100_000, train__eval_every=0,
                    train__schedule="cosine", train__checkpoint_every=100, train__log_every=5)
    out = tmp_path / "run"
    summary = train(load(cfg, ["train.max_seconds=1.0"]), out, clock=Clock())
    assert summary["steps"] == 64 and summary["seconds"] == 1.0
    # the same config resumes: the fitted horizon is the schedule's, and the time is spent
    again = train(load(cfg, ["train.max_seconds=1.0"]), out, resume=True, clock=Clock())
    assert again["steps"] == 64
    # more time: the run continues on the same (fitted) horizon, never past it
    more = train(load(cfg, ["train.max_seconds=3.0"]), out, resume=True, clock=Clock())
    assert more["steps"] == 64
    with pytest.raises(ConfigError, match="max_seconds"):
        load(cfg, ["train.max_seconds=0"])


def test_max_seconds_reaches_the_budget_from_the_cli(tmp_path):
    cfg = write_cfg(tmp_path, train__steps=100_000, train__eval_every=0,
                    train__checkpoint_every=0, train__log_every=5)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.max_seconds=0.2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_budget"] and summary["max_seconds"] == 0.2


def test_max_seconds_run_interrupted_and_resumed_with_more_time(tmp_path):
    """Ctrl-C early in a budgeted cosine run (its horizon fitted to 0.6 s), then --resume
    with 2 s: the horizon may still grow (the first half of the budget) up to the steps asked
    for, so the run uses its new budget; summary.json says the budget ended it."""
    cfg = write_cfg(tmp_path, train__steps=100_000, train__eval_every=0,
                    train__schedule="cosine", train__checkpoint_every=0, train__log_every=5)
    out = tmp_path / "run"

    def interrupt(step, vals):
        if vals["seconds"] >= 0.2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(load(cfg, ["train.max_seconds=0.6"]), out, callbacks=[interrupt], clock=Clock())
    cut = checkpoint.load(out)[1]
    # interrupted at the first log step past 0.2 s; the horizon fitted to 0.6 s
    assert cut["step"] == 15 and cut["seconds"] == 15 * DT
    assert cut["config"]["train"]["steps"] == 38
    summary = train(load(cfg, ["train.max_seconds=2.0"]), out, resume=True, clock=Clock())
    assert summary["seconds"] == 2.0 and summary["steps"] == 128
    assert summary["stopped_by_budget"] is True and summary["max_seconds"] == 2.0
