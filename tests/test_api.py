"""The public API: what the README names is exported by metattn, help(metattn) lists it, and
importing metattn loads no torch (the command line's --help stays fast)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import metattn

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_name_the_readme_uses_is_exported_and_listed_by_help():
    used = set(re.findall(r"\bmt\.([A-Za-z_][A-Za-z_0-9]*)", README))
    assert {"MAML", "ProtoNet", "MatchingNet", "FEAT", "InContextLearner", "ICLTransformer",
            "OmniglotTasks", "load_run", "TaskBatch"} <= used
    for name in used:
        assert name in metattn.__all__, name
        assert getattr(metattn, name) is not None
    doc = metattn.__doc__
    for name in metattn.__all__:
        if name not in ("errors", "__version__"):
            assert re.search(rf"\b{name}\b", doc), f"{name} missing from help(metattn)"


def test_importing_metattn_loads_no_torch():
    code = "import sys, metattn, metattn.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
