"""The layers of docs/architecture.md: what may import what (checked on the source, lazy
imports inside functions included), and the MAML algorithm readable in one short file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "metattn"

# package -> metattn modules it may import (prefixes), and other modules it must not
RULES = {
    "data": ({"metattn.data", "metattn.errors"}, {"matplotlib"}),
    "nn": ({"metattn.nn", "metattn.errors"}, set()),
    "meta": ({"metattn.data", "metattn.nn", "metattn.meta", "metattn.errors"},
             {"torch.distributed", "matplotlib", "argparse"}),
    "registry.py": ({"metattn.errors"}, set()),
    "explain": ({"metattn.explain", "metattn.recipe", "metattn.config", "metattn.meta",
                 "metattn.nn", "metattn.data", "metattn.errors"}, {"metattn.cli"}),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_imports_point_one_way(package):
    allowed, banned = RULES[package]
    files = [SRC / package] if package.endswith(".py") else sorted((SRC / package).rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            where = path.relative_to(SRC)
            if name == "metattn" or name.startswith("metattn."):
                assert any(name == a or name.startswith(a + ".") for a in allowed), (where, name)
            assert not any(name == b or name.startswith(b + ".") for b in banned), (where, name)


def test_the_maml_algorithm_is_one_short_file():
    lines = (SRC / "meta" / "maml" / "algorithm.py").read_text().count("\n")
    assert lines < 200, lines


def test_the_core_never_imports_the_text_stack():
    import subprocess
    import sys

    code = ("import sys, metattn.config, metattn.recipe, metattn.cli; "
            "print(any(m.split('.')[0] in ('transformers', 'tokenizers') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
