# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Every Python example in README.md and docs/*.md passes mypy --strict as a user's code would see the package.

The package is put where an installed one would be (a directory on the interpreter's
path, not mypy's source path), so mypy types it only through its py.typed marker;
the same examples against a copy without the marker must fail, or the check proves nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

#: Where the examples live, and how many each must keep at least (the API, the kit, the client, the notes example).
EXAMPLE_FILES = {"README.md": 2, "docs/handlers.md": 2, "docs/calling.md": 1, "docs/example-notes.md": 1}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)


def readme_examples() -> dict[str, str]:
    """Every Python block of the README and of docs/, named after its file."""
    examples: dict[str, str] = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        name = str(path.relative_to(REPO))
        blocks = python_blocks(path)
        assert len(blocks) >= EXAMPLE_FILES.get(name, 0), f"{name} lost its Python examples"
        for number, block in enumerate(blocks):
            examples[f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}_{number}.py"] = block
    assert len(examples) >= sum(EXAMPLE_FILES.values())
    return examples


def mypy_as_user(tmp_path: Path, site: Path) -> subprocess.CompletedProcess[str]:
    project = tmp_path / "project"
    project.mkdir()
    for name, block in readme_examples().items():
        (project / name).write_text(block)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MYPYPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", os.devnull, "--config-file", os.devnull,
         *sorted(p.name for p in project.iterdir())],
        cwd=project, env=env, capture_output=True, text=True, timeout=300)


def installed_copy(site: Path, typed: bool) -> Path:
    shutil.copytree(REPO / "qubes_socksvc", site / "qubes_socksvc",
                    ignore=shutil.ignore_patterns("__pycache__", *([] if typed else ["py.typed"])))
    return site


def test_readme_examples_pass_mypy_strict(tmp_path: Path) -> None:
    result = mypy_as_user(tmp_path, installed_copy(tmp_path / "site", typed=True))
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_py_typed_the_package_is_untyped(tmp_path: Path) -> None:
    result = mypy_as_user(tmp_path, installed_copy(tmp_path / "site", typed=False))
    assert result.returncode != 0 and "missing library stubs or py.typed marker" in result.stdout, result.stdout


def test_py_typed_is_shipped() -> None:
    assert (REPO / "qubes_socksvc/py.typed").is_file()
    assert re.search(r"^\[options\.package_data\]\nqubes_socksvc = .*\bpy\.typed\b", (REPO / "setup.cfg").read_text(),
                     re.MULTILINE), "setup.cfg no longer ships qubes_socksvc/py.typed"
