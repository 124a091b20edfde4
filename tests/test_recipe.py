"""metattn.recipe: train -> summary, resume equals an uninterrupted run, atomic checkpoints,
Ctrl-C, schedules, config errors before anything is written."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from models import TINY, Clock, tiny, write_cfg

from metattn import checkpoint
from metattn.cli import main
from metattn.config import from_dict, load
from metattn.errors import CheckpointError, ConfigError, TrainingError
from metattn.recipe import train


def load_tiny(**changes):
    return from_dict(tiny(**changes))


def _tiny_learner():
    from metattn.meta.maml import MAML
    from metattn.nn.backbones import MLP

    return MAML(MLP(1, [4], 1), inner_lr=0.01)


def losses(run_dir: Path) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["mse"] for r in recs if r["kind"] == "train"]


@pytest.mark.parametrize("log_every, schedule, optimizer, ema", [
    (1, "constant", "adam", None), (3, "constant", "adam", None), (1, "cosine", "adam", None),
    (1, "cosine", "muon", None), (1, "constant", "adam", 0.9)])
def test_resume_after_a_crash_gives_the_same_losses(tmp_path, log_every, schedule, optimizer,
                                                    ema):
    """Also when the checkpoint (step 20) is not on a log boundary (every 3 steps): the
    steps of the interrupted window are saved with the checkpoint; and under a warm-up +
    cosine schedule, whose position must be restored too; and with Muon's momentum; and
    the weight average (train.ema) continues where it was."""
    cfg = load(write_cfg(tmp_path, train__log_every=log_every, train__schedule=schedule,
                         train__warmup_steps=5 if schedule == "cosine" else 0,
                         train__optimizer=optimizer, train__ema=ema))
    full = tmp_path / "full"
    train(cfg, full)

    class Crash(Exception):
        pass

    def crash_at_24(step, metrics):  # callbacks run at log steps
        if step == 24:
            raise Crash

    part = tmp_path / "part"
    with pytest.raises(Crash):
        train(cfg, part, callbacks=[crash_at_24])
    tensors, state = checkpoint.load(part)
    assert state["step"] == 20  # last checkpoint before the crash
    seen: list[int] = []
    train(cfg, part, resume=True, callbacks=[lambda step, m: seen.append(step)])
    assert seen and min(seen) > 20  # it continued from the checkpoint, not from scratch
    assert losses(part) == losses(full)
    assert len(losses(full)) == -(-40 // log_every)
    a = checkpoint.load(full)[0]
    b = checkpoint.load(part)[0]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model/", "extra/ema")))
    assert any(k.startswith("extra/ema/") for k in a) == (ema is not None)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, part)]
    assert summaries[0]["mean"] == summaries[1]["mean"]


def test_ema_run_is_evaluated_with_the_average(tmp_path, capsys):
    cfg = write_cfg(tmp_path, train__ema=0.9, train__eval_every=0)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=30"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    live = summary["without_ema"]
    assert live["mean"] != summary["mean"]
    tensors = checkpoint.load(out)[0]
    assert int(tensors["extra/ema_updates"]) == 30
    name = next(k for k in tensors if k.startswith("model/") and k.endswith("weight"))
    assert not torch.equal(tensors[name], tensors["extra/ema/" + name[len("model/"):]])
    # metattn eval scores the average (same episodes, same number); without it, the live
    # weights, as the run's own second evaluation did
    assert main(["eval", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["mean"] == pytest.approx(summary["mean"])
    assert main(["eval", str(out), "--set", "train.ema=null"]) == 0
    assert json.loads((out / "eval.json").read_text())["mean"] == pytest.approx(live["mean"])
    # a run without an average cannot be evaluated as if it had one
    plain = tmp_path / "plain"
    assert main(["train", str(cfg), "--out", str(plain), "--set", "train.steps=5",
                 "--set", "train.ema=null"]) == 0
    capsys.readouterr()
    assert main(["eval", str(plain), "--set", "train.ema=0.9"]) == 2
    assert "holds no weight average" in capsys.readouterr().err


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = load(write_cfg(tmp_path))
    train(cfg, tmp_path / "r")
    changed = load(write_cfg(tmp_path, learner__inner_lr=0.5))
    with pytest.raises(ConfigError, match="learner.inner_lr"):
        train(changed, tmp_path / "r", resume=True)
    longer = load(write_cfg(tmp_path, train__steps=50))
    assert train(longer, tmp_path / "r", resume=True)["steps"] == 50
    # eval.chunk picks the test episodes: not resumable
    with pytest.raises(ConfigError, match="eval.chunk"):
        train(load(write_cfg(tmp_path, train__steps=50, eval__chunk=7)), tmp_path / "r",
              resume=True)


def test_resume_checks_the_checkpoints_own_config(tmp_path, monkeypatch):
    """Without config.yaml the checkpoint's config decides; a failed resume keeps the run's
    config.yaml; a half-written last log line does not stop a resume."""
    cfg = load(write_cfg(tmp_path, train__steps=10))
    run = tmp_path / "r"
    train(cfg, run)
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="train.lr"):
        train(load(write_cfg(tmp_path, train__steps=10, train__lr=0.5)), run, resume=True)
    train(load(write_cfg(tmp_path, train__steps=12)), run, resume=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 12
    # a model the checkpoint does not fit: refused, and config.yaml is left as it was
    bad = load(write_cfg(tmp_path, train__steps=14, model__hidden=[8, 8]))
    state = checkpoint.load(run)[1]
    state["config"] = bad.to_dict()  # as if the checkpoint had come from elsewhere
    orig = checkpoint.load
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "load", lambda d: (orig(d)[0], state))
        with pytest.raises(CheckpointError, match="does not fit"):
            train(bad, run, resume=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["hidden"] == [16, 16]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 13, "lo')
    train(load(write_cfg(tmp_path, train__steps=14)), run, resume=True)
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"] == list(range(1, 15))


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    cfg = load(write_cfg(tmp_path, train__steps=6, train__warmup_steps=4,
                         train__checkpoint_every=0, train__eval_every=0))
    train(cfg, tmp_path / "r")
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if r["kind"] == "train"]
    assert lrs == pytest.approx([0.003 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])


def test_cosine_starts_at_the_base_rate_after_the_warm_up(tmp_path):
    # linear warm-up to the base rate, then a half cosine from it to zero at train.steps
    # (the warm-up used to multiply a cosine begun at step 0: 0.75 of the base rate here)
    cfg = load(write_cfg(tmp_path, train__steps=12, train__warmup_steps=4,
                         train__schedule="cosine", train__checkpoint_every=0,
                         train__eval_every=0))
    train(cfg, tmp_path / "r")
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if r["kind"] == "train"]
    cos = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs == pytest.approx([0.003 * f for f in (0.25, 0.5, 0.75, 1.0, *cos)])
    assert max(lrs) == pytest.approx(0.003)


def test_cosine_warm_up_never_fills_the_horizon():
    # a warm-up as long as the run (or a time budget that shrank the horizon below it) would
    # end the run at its highest rate: the warm-up takes at most half a cosine horizon
    from metattn.recipe import make_optimizer

    for steps, warm in ((6, 10), (7, 6), (100, 10)):
        cfg = load_tiny(train__steps=steps, train__warmup_steps=warm, train__schedule="cosine")
        opt, sched = make_optimizer(cfg, _tiny_learner())
        f = [sched.lr_lambdas[0](i) for i in range(steps + 1)]
        w = min(warm, steps // 2)
        assert f[w - 1] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
        assert all(a >= b for a, b in zip(f[w - 1:], f[w:]))  # decays after the warm-up
        assert f[steps] == pytest.approx(0.0, abs=1e-12)  # to zero at the horizon


def test_resume_restores_the_optimisers_capturable_flag_as_configured(tmp_path):
    # a checkpoint written with train.cuda_graph (Adam capturable, its step on the GPU)
    # resumes eagerly on the CPU: the saved capturable flag must not come back with it
    import safetensors.torch

    cfg_path = write_cfg(tmp_path, train__steps=4, train__checkpoint_every=2,
                         train__eval_every=0)
    run = tmp_path / "run"
    train(load(cfg_path), run)
    tensors, state = checkpoint.load(run)
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = True
    safetensors.torch.save_file(tensors, str(run / checkpoint.WEIGHTS),
                                metadata={"metattn_state": json.dumps(state)})
    summary = train(load(write_cfg(tmp_path, train__steps=6, train__checkpoint_every=2,
                                   train__eval_every=0)), run, resume=True)
    assert summary["steps"] == 6


def test_run_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    os.umask(old)
    train(load(write_cfg(tmp_path, train__steps=2, train__eval_every=0)), tmp_path / "r")
    for name in ("checkpoint.safetensors", "state.json", "config.yaml", "summary.json"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o666 & ~old, name


def test_resume_refuses_a_longer_cosine_schedule(tmp_path):
    cfg = load(write_cfg(tmp_path, train__schedule="cosine", train__steps=20))
    train(cfg, tmp_path / "c")
    longer = load(write_cfg(tmp_path, train__schedule="cosine", train__steps=40))
    with pytest.raises(ConfigError, match="train.steps 20 -> 40.*cosine"):
        train(longer, tmp_path / "c", resume=True)


def test_eval_task_may_not_change_the_split():
    data = json.loads(json.dumps(TINY))
    data["task"] = {"kind": "omniglot", "protocol": "maml"}
    data["eval"]["task"] = {"protocol": "background"}
    with pytest.raises(ConfigError, match="eval.task.protocol='background'"):
        from_dict(data)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = load(write_cfg(tmp_path))
    out = tmp_path / "r"
    train(cfg, out)
    before = (out / checkpoint.WEIGHTS).read_bytes()

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", torn_write)
    longer = load(write_cfg(tmp_path, train__steps=50))
    with pytest.raises(OSError, match="disk full"):
        train(longer, out, resume=True)
    assert (out / checkpoint.WEIGHTS).read_bytes() == before
    assert checkpoint.load(out)[1]["step"] == 40
    assert not list(out.glob("*.tmp"))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nowhere")


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = load(write_cfg(tmp_path))
    out = tmp_path / "r"
    import metattn.recipe.loop as recipe

    real_build = recipe.build
    holder = {}

    def spy_build(*a, **k):
        res = real_build(*a, **k)
        holder["learner"] = res[2]
        return res

    monkeypatch.setattr(recipe, "build", spy_build)

    def diverge(step, metrics):  # the run "diverges" after the checkpoint at step 10
        if step == 15:
            with torch.no_grad():
                next(holder["learner"].parameters()).fill_(float("nan"))

    with pytest.raises((TrainingError, FloatingPointError), match="inner_lr"):
        train(cfg, out, callbacks=[diverge])
    tensors, state = checkpoint.load(out)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


@pytest.mark.parametrize("change, message", [
    ({"learner": {"kind": "maml", "inner_lrr": 0.1}}, "learner.inner_lrr.*did you mean 'inner_lr'"),
    ({"train": {"stpes": 3}}, "train.stpes.*did you mean 'steps'"),
    ({"train": {"steps": "many"}}, "train.steps: got 'many'"),
    ({"model": {"kind": "mpl"}}, "model.kind: unknown value 'mpl'; did you mean 'mlp'"),
    ({"taks": {}}, "taks: unknown key; did you mean 'task'"),
    ({"eval": {"task": {"k_qeury": 3}}}, "task.k_qeury.*did you mean 'k_query'"),
    ({"eval": {"episodes": 0}}, "eval.episodes=0; it must be >= 1"),
    ({"eval": {"chunk": -1}}, "eval.chunk=-1"),
    ({"train": {"log_every": 0}}, "train.log_every=0"),
    ({"train": {"eval_every": 2, "eval_episodes": 0}}, "train.eval_episodes=0"),
    ({"train": {"threads": -1}}, "train.threads=-1"),
    ({"train": {"device": "gpu"}}, "train.device='gpu' is not a device"),
    ({"train": {"autocast": "fp16"}}, "fp16.*use 'bf16'"),
    ({"train": {"grad_clip": -1.0}}, "train.grad_clip=-1.0"),
    ({"train": {"ema": 1.0}}, "train.ema=1.0; give the average's decay in \\(0, 1\\)"),
    ({"train": {"lr": -0.001}}, "train.lr=-0.001"),
    ({"train": {"lr": float("nan")}}, "train.lr=nan"),
    ({"train": {"weight_decay": -1.0}}, "train.weight_decay=-1.0"),
    ({"task": {"kind": ["sinusoid"]}}, "task.kind: got \\['sinusoid'\\]"),
    ({"train": {"autocast": "bf16", "dtype": "float64"}}, "does nothing to float64"),
    ({"model": {"kind": "mlp", "hidden": [40.5]}},
     "model.hidden: got \\[40.5\\] \\(a list\\), expected a list of integers"),
    ({"train": {"optimizer": "adm"}}, "expected one of 'adam', .*did you mean 'adam'"),
    ({"learner": {"kind": "maml", "learn_inner_lr": "per_parm"}},
     "learner.learn_inner_lr: .*or null; did you mean 'per_param'"),
])
def test_config_errors_name_the_key(change, message):
    data = json.loads(json.dumps(TINY))
    for section, value in change.items():
        if isinstance(data.get(section), dict) and section in ("train", "eval"):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


@pytest.mark.parametrize("change, message", [
    ({"learner": {"kind": "maml", "inner_lr": -0.1}}, "^learner.inner_lr=-0.1; give a step size"),
    ({"learner": {"kind": "maml", "inner_steps": -2}}, "^learner.inner_steps=-2; it must be"),
    ({"learner": {"kind": "maml", "task_threads": 0}}, "^learner.task_threads=0"),
    ({"learner": {"kind": "maml", "inner_params": ["haed"]}},
     "^learner.inner_params: .*named 'haed'; did you mean \\['head'"),
    ({"learner": {"kind": "fomaml", "chunk_size": 0}}, "^learner.chunk_size=0"),
])
def test_errors_from_building_name_the_config_key_and_leave_nothing_behind(tmp_path, change,
                                                                          message):
    data = json.loads(json.dumps(TINY))
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        train(from_dict(data), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_numbers_read_the_same_from_a_file_and_from_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY).replace("lr: 0.003", "lr: 5e-3"))
    assert "lr: 5e-3" in path.read_text()
    assert load(path).train.lr == 0.005 == load(path, ["train.lr=5e-3"]).train.lr


def test_checkpoints_come_by_training_time_too_and_sigterm_stops_like_ctrl_c(tmp_path,
                                                                           monkeypatch):
    from metattn.recipe import run_dir

    saved = []
    real = run_dir.checkpoint.save
    monkeypatch.setattr(run_dir.checkpoint, "save",
                        lambda d, m, o, state, *a: saved.append(state["step"]) or
                        real(d, m, o, state, *a))
    # no step-count checkpoints; one every 0.5 s of training, and each step takes 1/64 s
    cfg = load(write_cfg(tmp_path, train__steps=100, train__checkpoint_every=0,
                         train__eval_every=0, train__checkpoint_minutes=0.5 / 60))
    train(cfg, tmp_path / "timed", clock=Clock())
    assert saved == [32, 64, 96, 100]
    saved.clear()

    def term(step, vals):  # what a scheduler or `timeout` sends
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(load(write_cfg(tmp_path, train__checkpoint_every=0, train__eval_every=0)),
              tmp_path / "term", callbacks=[term], clock=Clock())
    assert saved == [7] and checkpoint.load(tmp_path / "term")[1]["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back


def test_training_lowers_test_mse_far_below_the_untrained_model(tmp_path):
    changes = dict(train__meta_batch=25, train__log_every=50, train__eval_every=0,
                   train__checkpoint_every=0, model__hidden=[40, 40],
                   learner__eval_inner_steps=5, task__k_shot=10)
    untrained = train(load(write_cfg(tmp_path, train__steps=0, **changes)), tmp_path / "zero")
    cfg = load(write_cfg(tmp_path, train__steps=500, **changes))
    trained = train(cfg, tmp_path / "r")
    assert trained["mean"] < 0.5 * untrained["mean"], (untrained["mean"], trained["mean"])


def test_ctrl_c_writes_a_checkpoint_and_resume_continues(tmp_path):
    cfg = write_cfg(tmp_path, train__steps=100000, train__checkpoint_every=0,
                    train__eval_every=0)
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "metattn", "train", str(cfg), "--out",
                             str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    def logged() -> int:  # the log is being written: a half-written last line is not yet
        try:
            return len(losses(out)) if (out / "metrics.jsonl").is_file() else 0
        except json.JSONDecodeError:
            return 0

    try:
        deadline = time.time() + 60
        while time.time() < deadline and logged() < 5:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave a 100000-step run behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted: checkpoint at step" in output
    step = checkpoint.load(out)[1]["step"]
    assert step >= 5
    cont = load(cfg, [f"train.steps={step + 5}"])
    assert train(cont, out, resume=True)["steps"] == step + 5


def test_eval_uses_the_checkpoints_own_config(tmp_path, capsys):
    cfg = write_cfg(tmp_path, train__steps=3, train__eval_every=0)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 0
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace(
        "k_shot: 5", "k_shot: 2"))  # an edited config.yaml does not change what is evaluated
    assert main(["eval", str(out), "--episodes", "10"]) == 0
    a = json.loads((out / "eval.json").read_text())["mean"]
    (out / "config.yaml").unlink()  # nor does a missing one stop the evaluation
    assert main(["eval", str(out), "--episodes", "10"]) == 0
    assert json.loads((out / "eval.json").read_text())["mean"] == a
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 50


def test_tensorboard_asked_for_and_missing_is_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    train(load(write_cfg(tmp_path, train__steps=2, train__tensorboard=True)), tmp_path / "r")
    assert "tensorboard is not installed" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.jsonl").is_file()


def test_the_recipe_reference_lists_every_key_with_its_default():
    import dataclasses

    from metattn.config import EvalConfig, TrainConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipe.md").read_text()
    for section, cls in (("train", TrainConfig), ("eval", EvalConfig)):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "null" if default is None else (
                json.dumps(default) if not isinstance(default, str) else default)
            assert f"| `{section}.{f.name}` | `{shown}` |" in doc, (section, f.name)


@pytest.mark.parametrize("learner, model, message", [
    ({"kind": "protonet", "scale": -1.0}, None, "^learner.scale=-1.0; it must be > 0"),
    ({"kind": "matching", "temperature": 0.0}, None, "^learner.temperature=0.0"),
    ({"kind": "incontext"}, {"kind": "icl_transformer", "d_x": 1, "token_layout": "mixed"},
     "^model.token_layout: got 'mixed' .*one of 'shared', 'disjoint', 'paired'"),
    ({"kind": "maml"}, {"kind": "token_transformer", "d_model": 10, "n_heads": 4},
     "^model.n_heads=4 does not divide d_model=10"),
])
def test_model_and_learner_errors_name_their_config_key(tmp_path, learner, model, message):
    data = json.loads(json.dumps(TINY))
    data["learner"] = learner
    if model is not None:
        data["model"] = model
    with pytest.raises(ConfigError, match=message):
        train(from_dict(data), tmp_path / "run")
    assert not (tmp_path / "run").exists()
