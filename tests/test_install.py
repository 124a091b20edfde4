"""A non-editable install in a fresh virtual environment: the package, its shipped configs and
its command line, away from the source checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_fresh_non_editable_install_trains_a_shipped_config_by_name(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    # the dependencies (torch, ...) come from this environment, metattn from the wheel only
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --target and --ignore-installed: into the fresh environment only (this one keeps its
    # editable install)
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                            "--no-build-isolation", "--no-compile", "--quiet",
                            "--ignore-installed", "--target", str(site), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    out = tmp_path / "run"
    where = tmp_path / "elsewhere"  # not the checkout: no configs/ folder beside it
    where.mkdir()
    proc = subprocess.run([str(py), "-m", "metattn", "train", "sinusoid_maml_quick", "--out",
                           str(out), "--set", "train.steps=3", "--set", "eval.episodes=5",
                           "--set", "train.plots=false", "--threads", "1"], cwd=where,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["git_commit"] is None  # a package, no checkout
    installed = subprocess.run([str(py), "-c", "import metattn; print(metattn.__file__)"],
                               cwd=where, capture_output=True, text=True, check=True).stdout
    assert str(venv) in installed and str(ROOT / "src") not in installed
    here = subprocess.run([sys.executable, "-c", "import metattn; print(metattn.__file__)"],
                          capture_output=True, text=True, check=True).stdout
    assert str(ROOT / "src") in here  # this environment's editable install is untouched
    version = subprocess.run([str(py), "-m", "metattn", "--version"], cwd=where,
                             capture_output=True, text=True, check=True).stdout
    assert version.startswith("metattn ")
