"""The package's layers point one way: no import runs back up the data flow, no cycles, every
module imports on its own, and importing headwise changes nothing process-wide."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "headwise"

# Lower layers never import higher ones. One entry per module or package (a package covers its
# modules, which may import each other within it as noted below).
LAYERS: list[set[str]] = [
    {"headwise.errors", "headwise._progress", "headwise._jsonl", "headwise._schema", "headwise._io",
     "headwise.digits", "headwise._plotting", "headwise._memory"},
    {"headwise.geometry", "headwise.roles", "headwise.devices"},  # devices: where each part of a split model runs
    {"headwise.instrument"},  # the one attention function; load attaches every model to it
    {"headwise.vit_digits"},  # trains the bundled image model; load asks for it
    {"headwise.load", "headwise.parts", "headwise.probes"},
    {"headwise.ablation", "headwise.decode"},
    {"headwise.tasks"},  # the in-context task suite: steering fits on it, pruning is scored on it
    {"headwise.scores"},
    {"headwise.atlas"},
    {"headwise.profile"},
    {"headwise.report", "headwise.validate", "headwise.prune", "headwise.steer", "headwise.influence",
     "headwise.compare"},
    {"headwise.kv"},  # `headwise generate --steer` applies a steering
    {"headwise.attribute"},  # registers a validation task per attribution
    {"headwise.cli", "headwise"},
]
# Inside these packages, the files that must not import one another (one method, one file).
SIBLINGS = {
    "headwise.scores": {"autoencoder", "distance", "duo", "importance", "patterns", "razor", "retrieval", "sink",
                        "spatial", "streaming", "successor"},
    "headwise.kv": {"heads", "snapkv"},
    "headwise.validate": {"retrieval", "in_context", "successor", "image_accuracy"},
    "headwise.steer": {"soft_injection", "lofit", "act"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the headwise modules it imports (relative imports resolved)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + [node.module] if node.module else base) if node.level else node.module
                if target and target.split(".")[0] == "headwise":
                    for alias in node.names:  # `from . import x` imports the module x, not the package's API
                        sub = SRC / f"{target}.{alias.name}".replace(".", "/")
                        if sub.with_suffix(".py").exists() or sub.is_dir():
                            found.add(f"{target}.{alias.name}")
                        else:
                            found.add(target)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "headwise"}
        graph[name] = found - {name}
    return graph


def _layer(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    assert best is not None, f"{module} is in no layer of tests/test_layering.py; place it"
    return best[0]


def test_imports_point_down_the_layers():
    wrong = [f"{m} -> {t}" for m, targets in _imports().items() for t in targets
             if _layer(t) > _layer(m)]
    assert wrong == []


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t == m.rpartition(".")[0]:  # a module reading its own package's __init__ is not a cycle of files
                continue
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif state.get(t) is None:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_one_method_one_file():
    graph = _imports()
    wrong = [f"{m} -> {t}" for pkg, files in SIBLINGS.items() for f in files for m in [f"{pkg}.{f}"]
             for t in graph.get(m, ()) if t.rpartition(".")[0] == pkg and t.rpartition(".")[2] in files]
    assert wrong == []
    assert not [t for t in graph["headwise.kv.cache"] if t.rpartition(".")[2] in SIBLINGS["headwise.kv"]]


def test_every_module_imports_alone_and_leaves_the_environment_alone():
    modules = sorted(_imports())
    script = f"""
import importlib, os, sys
import torch, transformers, transformers.cache_utils, transformers.masking_utils  # their own settings are theirs
from transformers import AutoModelForCausalLM  # noqa: F401
before = dict(os.environ)
failed = []
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m == "headwise" or m.startswith("headwise.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(failed, changed)
assert not failed and not changed, (failed, changed)
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
