# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""`python -m bench --quick` runs and prints every figure of issue 5 (no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

ROWS = ("1a", "1b", "2a", "2b", "2c", "3a", "3b", "4", "5a", "5b", "6a", "6b")


def test_bench_quick_prints_every_row() -> None:
    result = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (\w+\*?) +\|.*$", result.stdout, re.MULTILINE)}
    for row in ROWS:
        assert row in rows, f"row {row} missing:\n{output}"
        assert "| VOID" not in rows[row] or "needs root" in rows[row], output
    assert "jinja2 not imported" in result.stdout or "needs root" in rows["4"], output


def test_bench_against_compares_side_by_side_and_leaves_no_worktree() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.against", "HEAD", "--rounds", "2", "--calls", "5"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"median latency +this \d+ µs +HEAD \d+ µs +floor \d+ µs +this/HEAD \d\.\d{3}$",
                     result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"daemon CPU/call +this [\d.]+ µs +HEAD [\d.]+ µs +this/HEAD \d\.\d{3}$",
                     result.stdout, re.MULTILINE), result.stdout
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert "socksvc-against-" not in worktrees, worktrees
    assert not list(Path("/tmp").glob("socksvc-against-*")), "bench.against left its directory behind"
