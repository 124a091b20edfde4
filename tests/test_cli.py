"""metattn.cli and the demo's command line: train -> eval, the allocator switch, user mistakes
as one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from models import write_cfg

from metattn import checkpoint
from metattn.cli import main
from metattn.config import load
from metattn.errors import ConfigError


def test_cli_train_then_eval(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=30",
                 "--set", "train.plots=true"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.safetensors",
                 "state.json", "training.png", "adaptation.png"):
        assert (out / name).is_file(), name
    plain = tmp_path / "no_plots"
    assert main(["train", str(cfg), "--out", str(plain), "--set", "train.steps=2"]) == 0
    assert (plain / "summary.json").is_file() and not list(plain.glob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("metric", "mean", "ci95", "episodes", "steps", "seconds"):
        assert key in summary
    assert summary["metric"] == "mse" and summary["episodes"] == 50 and summary["steps"] == 30
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 30
    assert main(["eval", str(out), "--episodes", "30"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["episodes"] == 30 and ev["steps"] == 30
    assert "test mse" in capsys.readouterr().out
    # the same directory is never silently overwritten
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("opt_out", [False, True])
def test_cli_tunes_the_cpu_allocator_unless_told_not_to(tmp_path, opt_out):
    """The command line keeps freed CPU memory in its process (metattn.allocator) and says
    so in summary.json; METATTN_MALLOC_TUNE=0 opts out. A fresh process each: the setting is
    process-wide."""
    env = {**os.environ, "METATTN_MALLOC_TUNE": "0" if opt_out else "1"}
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "metattn", "train", str(write_cfg(tmp_path)),
                           "--out", str(out), "--set", "train.steps=2"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tuned = json.loads((out / "summary.json").read_text())["malloc_tuned"]
    assert tuned is (not opt_out)


def test_eval_cli_options_and_checkpoint_mismatch_detail(tmp_path, capsys, monkeypatch):
    cfg = write_cfg(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=5",
                 "--set", "train.eval_every=0"]) == 0
    with pytest.raises(SystemExit):
        main(["eval", str(out), "--episodes", "0"])
    assert "not a positive integer" in capsys.readouterr().err
    assert main(["eval", str(out), "--episodes", "7", "--device", "cpu", "--threads", "1"]) == 0
    first = json.loads((out / "eval.json").read_text())
    assert first["episodes"] == 7 and "overrides" not in first
    # --set changes the evaluated config (here: no inner steps) and is recorded
    assert main(["eval", str(out), "--episodes", "7", "--set",
                 "learner.eval_inner_steps=0"]) == 0
    changed = json.loads((out / "eval.json").read_text())
    assert changed["overrides"] == ["learner.eval_inner_steps=0"]
    assert changed["eval_inner_steps"] == 0 and first["eval_inner_steps"] == 3
    assert changed["mean"] != first["mean"]
    # a resume may change threads and device (they do not change the maths)
    assert main(["train", str(cfg), "--out", str(out), "--resume", "--set", "train.steps=5",
                 "--set", "train.eval_every=0", "--set", "train.threads=1",
                 "--set", "train.device=cpu"]) == 0
    # a model that does not fit (a checkpoint whose stored config was changed): the error
    # names the mismatching keys
    orig = checkpoint.load

    def changed(d):
        tensors, state = orig(d)
        state["config"]["model"]["hidden"] = [8, 8]
        return tensors, state

    monkeypatch.setattr(checkpoint, "load", changed)
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "size mismatch" in err


def test_demo_refuses_a_non_empty_out(tmp_path, capsys):
    from metattn.demo import main as demo

    (tmp_path / "old.txt").write_text("keep me")
    assert demo(["--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_missing_config_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load(write_cfg(tmp_path), ["train.steps"])
    assert load(write_cfg(tmp_path), ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    # a scalar in place of a section is an error, not a silent reset to the defaults
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load(write_cfg(tmp_path), ["train=0"])


def test_user_mistakes_are_clear_errors_not_tracebacks(tmp_path, capsys):
    """Exit code 2 and one line naming the fix, for mistakes that used to raise tracebacks."""
    cfg = write_cfg(tmp_path, train__steps=2, train__eval_every=0)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    cases = [
        (["train", str(cfg), "--set", "train.steps=[1", "--out", str(tmp_path / "a")],
         "not valid YAML"),
        (["train", str(listed), "--out", str(tmp_path / "b")], "not a mapping"),
        (["train", str(tmp_path), "--out", str(tmp_path / "c")], "is a directory"),
        (["train", str(cfg), "--out", str(a_file)], "is a file"),
        (["train", str(cfg), "--set", "learner.chunk_size=0", "--out", str(tmp_path / "d")],
         "chunk_size=0"),
        (["train", str(cfg), "--set", "model.hidden=[0]", "--out", str(tmp_path / "e")],
         "every size must be >= 1"),
        (["train", str(cfg), "--set", "model.out_features=3", "--out", str(tmp_path / "f")],
         "out_features"),
        (["train", str(cfg), "--set", "model.in_features=2", "--out", str(tmp_path / "g")],
         "in_features"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_demo_checks_both_configs_before_training(tmp_path, capsys):
    from metattn.demo import main as demo

    assert demo(["--out", str(tmp_path / "d"), "--icl-set", "train.stpes=5"]) == 2
    assert "train.stpes" in capsys.readouterr().err
    assert not (tmp_path / "d" / "maml").exists()  # nothing was trained


def test_version_kinds_and_validate(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"metattn {mt_version()}"
    assert main(["kinds"]) == 0
    assert "learner: anil, feat, fomaml" in capsys.readouterr().out
    assert main(["kinds", "learner", "metasgd"]) == 0
    out = capsys.readouterr().out
    assert "learn_inner_lr: one of 'scalar', 'per_param', 'per_layer_step' or null, default " \
           "'per_param'" in out and "inner_lr: a number, default 0.4" in out
    assert main(["kinds", "learner", "mmal"]) == 2
    assert "did you mean 'maml'" in capsys.readouterr().err
    cfg = write_cfg(tmp_path)
    assert main(["validate", str(cfg), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny: valid. MAML (321 parameters)" in out and "a training step runs as: vmap" in out
    assert not (tmp_path / "runs").exists()
    assert main(["validate", str(cfg), "--set", "learner.inner_lr=-1"]) == 2
    assert "learner.inner_lr=-1" in capsys.readouterr().err


def mt_version() -> str:
    import metattn

    return metattn.__version__


def test_train_by_name_and_user_mistakes_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sinusoid_maml_quick", "--set", "train.steps=2", "--set",
                 "eval.episodes=5", "--set", "train.plots=false", "--threads", "1"]) == 0
    assert (tmp_path / "runs" / "sinusoid_maml_quick" / "summary.json").is_file()
    capsys.readouterr()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["train", "sinusoid_maml_quick", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot be created" in err and "Traceback" not in err
    assert main(["eval", "sinusoid_maml_quick.yaml"]) == 2
    assert "takes a run directory" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("task: {kind: sinusoid}")
    assert main(["eval", str(tmp_path / "c.yaml")]) == 2
    assert "metattn train" in capsys.readouterr().err
