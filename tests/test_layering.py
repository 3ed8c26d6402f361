# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The house's layering: which module may import which, and what each one loads.

Only manifest.py reads YAML and only render.py uses Jinja2; the daemon's start-up loads
neither; no module imports one above it, and there is no import cycle (STYLE.md).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qubes_socksvc"

#: Lowest first; a module imports only modules of its own layer or below.
LAYERS: list[tuple[str, set[str]]] = [
    ("qrexec's rules and small helpers", {"errors", "qrexec", "rpcconfig", "files", "logs", "stalls", "unixdiag"}),
    ("the model and one call's pieces", {"model", "connection", "request", "descriptor", "chunks", "handlers",
                                         "lookup"}),
    ("the runtime, where artifacts go, dom0's policy", {"callcore", "server", "client", "agent", "examples",
                                                          "examples_notes", "layout", "policy"}),
    ("the tools: YAML in, artifacts out, the disk judged", {"manifest", "render", "install", "effective", "testing",
                                                           "features"}),
    ("what list shows", {"status"}),
    ("the front", {"cli", "__main__", "__init__"}),
]

#: Modules that load PyYAML or Jinja2 by design, and which.
HEAVY_BY_DESIGN = {
    "manifest": {"yaml"},
    "render": {"jinja2"},
}
#: What ``serve`` may load of ours (cli imports the rest per verb).
SERVE_MODULES = {"__init__", "cli", "model", "descriptor", "connection", "request", "handlers", "server",
                 "qrexec", "callcore", "errors", "files", "logs", "stalls"}


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def imports(source: str) -> set[str]:
    """The package's modules that ``source`` imports, anywhere in it (lazy and TYPE_CHECKING ones too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qubes_socksvc."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("qubes_socksvc."))
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports((PACKAGE / f"{name}.py").read_text()) - {name} for name in modules()}


def upward(imported: dict[str, set[str]], layers: list[tuple[str, set[str]]]) -> list[str]:
    """Every import of a module above the importer, and every module no layer names."""
    level = {name: i for i, (_, names) in enumerate(layers) for name in names}
    problems = [f"{name}: in no layer" for name in imported if name not in level]
    for name, deps in imported.items():
        problems += [f"{name} ({layers[level[name]][0]}) imports {dep} ({layers[level[dep]][0]})"
                     for dep in sorted(deps) if name in level and dep in level and level[dep] > level[name]]
    return problems


def cycles(imported: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, each as the path that closes it (depth-first)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            found.append([*path[path.index(name):], name])
            return
        if name in done:
            return
        for dep in sorted(imported.get(name, ())):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(imported):
        visit(name, [])
    return found


def test_no_module_imports_one_above_it() -> None:
    assert upward(graph(), LAYERS) == []


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_checks_can_fail() -> None:
    """The same checks on a made-up package: an upward import, a module in no layer, a cycle."""
    made_up = {"low": {"high"}, "high": {"low"}, "stray": set()}
    layers = [("bottom", {"low"}), ("top", {"high"})]
    assert upward(made_up, layers) == ["stray: in no layer", "low (bottom) imports high (top)"]
    assert cycles(made_up) == [["high", "low", "high"]]
    assert imports("from . import a\nfrom .b import c\nimport qubes_socksvc.d\n"
                   "def f():\n    from qubes_socksvc.e import g\n") == {"a", "b", "d", "e"}


def loaded(statement: str) -> dict[str, list[str]]:
    """What a fresh interpreter has loaded after ``statement``: PyYAML, Jinja2, and our modules."""
    code = (f"import sys\n{statement}\nimport json\n"
            "print(json.dumps({'heavy': sorted(m for m in ('yaml', 'jinja2') if m in sys.modules),"
            " 'ours': sorted(m.partition('.')[2] or '__init__' for m in sys.modules"
            " if m.split('.')[0] == 'qubes_socksvc')}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                            check=True)
    return dict(json.loads(result.stdout))


@pytest.mark.parametrize("name", [m for m in modules() if m != "__main__"])  # __main__ runs the cli
def test_only_the_yaml_and_template_modules_load_them(name: str) -> None:
    heavy = set(loaded(f"import qubes_socksvc.{name}" if name != "__init__" else "import qubes_socksvc")["heavy"])
    assert heavy <= HEAVY_BY_DESIGN.get(name, set())


def test_the_heavy_check_can_fail() -> None:
    assert loaded("import qubes_socksvc.install\nimport yaml")["heavy"] == ["yaml"]


def test_serve_loads_only_the_runtime() -> None:
    """What ``qubes-socksvc serve`` imports before its first call (cli.main's serve path)."""
    found = loaded("from qubes_socksvc import cli, model, server")
    assert found["heavy"] == []
    assert set(found["ours"]) <= SERVE_MODULES, set(found["ours"]) - SERVE_MODULES


def test_the_version_is_written_once() -> None:
    """``__version__`` is the top-level version file's (setup.cfg, debian/changelog and the RPM
    spec follow it), and importing the package for ``serve`` does not look it up."""
    import qubes_socksvc

    assert qubes_socksvc.__version__ == (PACKAGE.parent / "version").read_text().strip()
    probe = "import sys, qubes_socksvc; print('importlib.metadata' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PACKAGE.parent,
                            check=True)
    assert result.stdout.strip() == "False", result.stdout
