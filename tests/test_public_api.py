"""A real public API: every public module says what it exports, and bench/ uses only that."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "src" / "headwise").rglob("*.py"))
PUBLIC = [m for m in MODULES if not any(part.startswith("_") for part in m.split("."))]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_modules_declare_their_exports(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert all(hasattr(module, x) for x in exported), [x for x in exported if not hasattr(module, x)]


def test_bench_uses_only_the_public_api():
    wrong = []
    for script in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "headwise":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in MODULES:  # `from headwise import kv`: a module
                        continue
                    if any(p.startswith("_") for p in node.module.split(".")) or \
                            alias.name not in getattr(module, "__all__", ()):
                        wrong.append(f"{script.name}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                wrong += [f"{script.name}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] == "headwise" and any(p.startswith("_") for p in a.name.split("."))]
    assert wrong == []
