"""benchmarks/inflection.py and benchmarks/translation.py run end to end (--quick) and write
tables with every method, the paired gains and the scores' ranges."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metattn.data.inflection import default_root as inflection_root
from metattn.data.translation import default_root as translation_root
from metattn.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--quick", "--seeds", "2", "--steps", "2", "--max-test", "4", "--threads", "1"]
METHODS = ["copy", "scratch", "transfer", "FOMAML", "MAML", "MAML, inner loop"]


def _run(script: str, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), *FAST, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / script.replace(".py", ".json")).read_text())


def _have(root) -> None:
    try:
        root()
    except DataError:
        pytest.skip("data not found")


def test_inflection_benchmark_writes_every_method(tmp_path):
    _have(inflection_root)
    js = _run("inflection.py", tmp_path)
    table = js["all held-out languages"]
    assert [m for m in table if m in METHODS] == METHODS
    assert "MAML - transfer" in table and "MAML - scratch" in table
    for method in METHODS:
        acc, ci = table[method]["accuracy"]
        assert 0 <= acc <= 100 and table[method]["levenshtein"][0] >= 0
    langs = js["per_language"]["copy"]
    assert len(langs) == 2 and all(len(seeds) == 2 for seeds in langs.values())


def test_translation_benchmark_writes_every_method_at_every_k(tmp_path):
    _have(translation_root)
    js = _run("translation.py", tmp_path, "--shots", "10", "20", "--locales", "uk")
    assert set(js) == {"10", "20"}
    for k in ("10", "20"):
        table = js[k]["all held-out locales"]
        assert [m for m in table if m in METHODS] == METHODS
        kept = table["copy"]["placeholders"][0]  # NaN: no test string had a placeholder
        assert kept == 100.0 or kept != kept  # copying keeps every placeholder
        assert all(0 <= table[m]["chrF"][0] <= 100 for m in METHODS)
