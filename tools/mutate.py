#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Mutation testing of the trust boundary: do the tests fail when the code is wrong?

Each mutant is one small change to one module (OPERATORS lists them all), run against the
tests that execute its line, in a world-readable copy of the checkout under /tmp (the daemon
runs as "nobody"), never in the checkout itself.

Which *tests* execute which line is measured first, with coverage, in every process a test
starts (the daemons too): each line is tagged with the test (pytest node id) that was running
when the process executing it started or switched to it (a daemon's call: the test running when
it started).  A mutant runs those tests, fastest first, stopping at the first failure.  A mutant
that survives them runs again against the whole files of the tests whose processes outlived
them (a daemon a fixture started for one test may serve the next ones): only then is it a
survivor.  A mutant on a line no test executes is a survivor, without
a run.  A mutant is killed when a test fails (the failing test is kept in the log), timed out
when the tests run past the timeout, survived when they pass.

Mutants listed in tools/mutation-equivalent.txt (reviewed: no caller can tell), keyed by module,
line and text, are counted apart and leave the denominator; those in
tools/mutation-untestable.txt (real, but no test can arrange it here, e.g. a power cut) are a
column of their own and stay in it.  The unmutated tests must pass first.  Ctrl-C prints the
table of the mutants run so far.

    python3 tools/mutate.py [--jobs 4] [--timeout SECONDS] [--only MODULE ...] [--list] [--again]
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import difflib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PKG = "qubes_socksvc"
EQUIVALENT = REPO / "tools" / "mutation-equivalent.txt"
UNTESTABLE = REPO / "tools" / "mutation-untestable.txt"
SURVIVORS = REPO / "build" / "mutation-survivors.txt"
LOG = REPO / "build" / "mutation-log.txt"
COVERAGE = REPO / "build" / "mutation-coverage.json"
#: Which test killed each mutant last (by its change, hashed): run first next time, on a fresh
#: clone too, where build/ holds no earlier log (--save-killers writes it from the logs).
KILLERS = REPO / "tools" / "mutation-killers.txt"
#: Seconds one test may take in a mutant's run, at least: twice its time under coverage
#: (itself 2-5 times its plain time) when that is longer.  A hanging mutant costs this, not a
#: minute: the slowest unmutated test takes 6 s, 26 s under coverage.
PER_TEST_TIMEOUT = 10
#: Seconds a mutant's whole run may take, at least (the run's start-up, a daemon's start).
RUN_TIMEOUT = 30
#: Lines apart that a test's kill counts as "near" a mutant's line (CoverageMap.kill_rank).
NEAR = 15

#: The trust boundary: what reads a caller's bytes, what decides who may call (the generated
#: units, qubes-rpc entries, rpc-config and dom0 policy) and what writes them to disk.
MODULES = (
    # a call: descriptor to handler and back, in the daemon and in `call`
    "descriptor.py", "qrexec.py", "connection.py", "request.py", "handlers.py", "callcore.py", "server.py",
    "logs.py", "stalls.py", "lookup.py", "agent.py", "client.py",
    # the manifest and what apply makes of it
    "manifest.py", "model.py", "rpcconfig.py", "policy.py", "effective.py", "layout.py", "install.py",
    "files.py", "features.py",
)
#: Test files that check the code's form, not its behaviour (types, lint, imports, packaging
#: metadata, man pages against the parser): a mutant they alone fail is not killed by a test
#: a user relies on.  And the benchmark's smoke test, which needs the git history, and this
#: tool's own tests.
NOT_BEHAVIOUR = ("tests/test_lint.py", "tests/test_readme_types.py", "tests/test_packaging.py",
                 "tests/test_layering.py", "tests/test_manpages.py", "tests/test_bench_smoke.py",
                 "tests/test_mutate_tool.py")

#: kind: what it does (docs/testing.md shows this table)
OPERATORS = {
    "compare": "a comparison flipped or moved off its boundary (== !=, < <=, in / not in, is / is not)",
    "andor": "and <-> or",
    "not": "a not dropped",
    "cond": "a condition (if, elif, a conditional expression) forced True and False; one that is a comparison, "
            "and/or or not (mutated by its own operators), a while's or a comprehension's, forced False",
    "bool": "True <-> False",
    "const": "an integer constant +1 and -1; a float (a time, an interval) 0 and x1000",
    "arith": "+ <-> -, * <-> //, and the same in augmented assignments (+= <-> -=, |= <-> &=)",
    "flag": "one operand of A | B dropped",
    "regex": "\\Z -> $; one member of a character class dropped, or one of @ : / + added",
    "kwarg": "a keyword argument whose value is not a literal dropped (its default), or 0 for a limit",
    "assign": "an assignment in a function dropped (to an attribute, an item, or a name bound before)",
    "call": "a call or await statement dropped",
    "raise": "a raise dropped",
    "return": "return X -> return None",
    "loop": "continue <-> break",
    "enum": "a member of the module's own Enum for the next one",
}

FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
    ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
ARITH: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
}
AUGMENTED: dict[type[ast.operator], type[ast.operator]] = {**ARITH, ast.BitOr: ast.BitAnd}
#: A keyword argument with one of these in its name is a limit: 0 is its boundary.
LIMIT_WORDS = ("max", "limit", "timeout", "size", "len", "count", "interval", "burst", "budget")
#: What a character class may wrongly let in: qrexec's separators and a path's.
INTRUDERS = "@:/+"
REGEX_CALLS = frozenset({"compile", "match", "fullmatch", "search", "sub", "split", "findall", "finditer"})


@dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    end_line: int
    kind: str
    old: str          # the source line as written
    new: str          # the mutated line(s)
    text: str         # the whole mutated module

    @property
    def key(self) -> str:
        """How the equivalent and untestable lists name it: module, line and text together."""
        return f"{self.module}:{self.line}: {self.old.strip()} => {self.new.strip()}"

    @property
    def change(self) -> str:
        """The change without its line, to find it again once lines move."""
        return f"{self.module}: {self.old.strip()} => {self.new.strip()}"

    @property
    def change_id(self) -> str:
        """The change, hashed: how KILLERS names it."""
        return change_id(self.change)

    def diff(self, original: str) -> str:
        return "".join(difflib.unified_diff(original.splitlines(True), self.text.splitlines(True),
                                            f"a/{PKG}/{self.module}", f"b/{PKG}/{self.module}", n=1))


@dataclass
class _Context:
    """What a node's mutations depend on beyond the node itself."""

    enums: dict[str, list[str]]
    regexes: set[int] = field(default_factory=set)       # string constants that are patterns
    conditions: dict[int, str] = field(default_factory=dict)  # test node -> "if" or "while"
    rebinding: set[int] = field(default_factory=set)     # assignments in a function that can be dropped


def change_id(change: str) -> str:
    return hashlib.sha256(change.encode()).hexdigest()[:16]


def _rebinding(function: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[int]:
    """The assignments of a function whose loss leaves running code: to an attribute or an item,
    augmented, or to a name bound before (a parameter, an earlier line).  Dropping a name's first
    binding only raises NameError at its first use, which any test that runs the line sees."""
    bound = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
    for node in sorted((n for n in ast.walk(function) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))),
                       key=lambda n: (n.lineno, n.col_offset)):
        if getattr(node, "value", None) is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if isinstance(node, ast.AugAssign) or not all(isinstance(t, ast.Name) for t in targets) or names & bound:
            yield id(node)
        bound |= names


def _context(tree: ast.Module) -> _Context:
    enums = {c.name: [t.id for a in c.body if isinstance(a, ast.Assign) for t in a.targets
                      if isinstance(t, ast.Name) and not t.id.startswith("_")]  # members, not __hash__
             for c in tree.body if isinstance(c, ast.ClassDef) and any("Enum" in ast.unparse(b) for b in c.bases)}
    ctx = _Context(enums)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "re" \
                and node.func.attr in REGEX_CALLS and node.args and isinstance(node.args[0], ast.Constant):
            ctx.regexes.add(id(node.args[0]))
        if isinstance(node, (ast.If, ast.IfExp)) and not isinstance(node.test, ast.Constant) \
                and "__name__" not in ast.unparse(node.test):
            # a comparison, and/or or not is mutated by its own operators already: only the check dropped
            ctx.conditions[id(node.test)] = "guard" if isinstance(node.test, (ast.Compare, ast.BoolOp, ast.UnaryOp)) \
                else "if"
        elif isinstance(node, ast.While) and not isinstance(node.test, ast.Constant):
            ctx.conditions[id(node.test)] = "while"
        elif isinstance(node, ast.comprehension):
            ctx.conditions.update((id(test), "if") for test in node.ifs)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            ctx.rebinding.update(_rebinding(node))
    return ctx


def _class_members(pattern: str) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(start of the members, end bracket, [(start, end) of each member]) of each character class."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] != "[":
            i += 1
            continue
        k = i + 1 + (pattern[i + 1:i + 2] == "^")
        start, members = k, []
        while k < len(pattern) and (pattern[k] != "]" or k == start):
            first = k
            k += 2 if pattern[k] == "\\" else 1
            if pattern[k:k + 1] == "-" and pattern[k + 1:k + 2] not in ("]", ""):
                k += 1
                k += 2 if pattern[k] == "\\" else 1
            members.append((first, k))
        yield start, k, members
        i = k + 1


def _regex_mutants(pattern: str) -> list[str]:
    out = []
    if "\\Z" in pattern:
        out.append(pattern.replace("\\Z", "$"))
    for start, end, members in _class_members(pattern):
        if len(members) > 1:
            out += [pattern[:a] + pattern[b:] for a, b in members]
        cls = pattern[start - 1 if pattern[start - 1] == "[" else start - 2:end + 1]
        out += [pattern[:start] + ch + pattern[start:] for ch in INTRUDERS if not re.fullmatch(cls, ch)]
    return out


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))


def _replacements(node: ast.AST, ctx: _Context) -> list[tuple[str, ast.AST | str]]:
    """(kind, replacement node or source) for every mutation of this one node."""
    out: list[tuple[str, ast.AST | str]] = []
    role = ctx.conditions.get(id(node))
    if role is not None:  # `while True` forced would hang: only False
        out += [("cond", ast.Constant(value)) for value in ((True, False) if role == "if" else (False,))]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ctx.enums:
        members = ctx.enums[node.value.id]
        if node.attr in members and len(members) > 1:  # the next member: one mutant, not one per member
            out.append(("enum", ast.Attribute(node.value, members[(members.index(node.attr) + 1) % len(members)])))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in FLIP:
                ops = list(node.ops)
                ops[i] = FLIP[type(op)]()
                out.append(("compare", ast.Compare(node.left, ops, node.comparators)))
    elif isinstance(node, ast.BoolOp):
        out.append(("andor", ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("not", node.operand))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append(("bool", ast.Constant(not node.value)))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        out += [("const", ast.Constant(node.value + 1)), ("const", ast.Constant(node.value - 1))]
    elif isinstance(node, ast.Constant) and type(node.value) is float and node.value:
        out += [("const", ast.Constant(0.0)), ("const", ast.Constant(node.value * 1000))]
    elif isinstance(node, ast.Constant) and id(node) in ctx.regexes and isinstance(node.value, str):
        out += [("regex", ast.Constant(p)) for p in _regex_mutants(node.value)]
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        out += [("flag", node.left), ("flag", node.right)]
    elif isinstance(node, ast.BinOp) and type(node.op) in ARITH and not (_is_text(node.left) or _is_text(node.right)):
        out.append(("arith", ast.BinOp(node.left, ARITH[type(node.op)](), node.right)))
    elif isinstance(node, ast.AugAssign) and type(node.op) in AUGMENTED:
        out.append(("arith", ast.AugAssign(node.target, AUGMENTED[type(node.op)](), node.value)))
    elif isinstance(node, ast.Call):
        for i, kw in enumerate(node.keywords):
            if kw.arg is None or isinstance(kw.value, ast.Constant):
                continue
            rest = node.keywords[:i] + node.keywords[i + 1:]
            out.append(("kwarg", ast.Call(node.func, node.args, rest)))
            if any(word in kw.arg.lower() for word in LIMIT_WORDS):
                zero = ast.keyword(kw.arg, ast.Constant(0))
                out.append(("kwarg", ast.Call(node.func, node.args, [*rest[:i], zero, *rest[i:]])))
    elif isinstance(node, ast.Raise):
        out.append(("raise", "pass"))
    elif isinstance(node, ast.Expr) and isinstance(node.value, (ast.Call, ast.Await)):
        out.append(("call", "pass"))
    elif isinstance(node, ast.Return) and node.value is not None \
            and not (isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return", "return None"))
    elif isinstance(node, (ast.Continue, ast.Break)):
        out.append(("loop", "break" if isinstance(node, ast.Continue) else "continue"))
    if id(node) in ctx.rebinding:
        out.append(("assign", "pass"))
    return out


def _skipped(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, TYPE_CHECKING blocks, __all__, f-strings."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0]))
        annotations = [getattr(node, "returns", None), getattr(node, "annotation", None)]
        if (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)) \
                or isinstance(node, ast.JoinedStr) \
                or (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                          for t in node.targets)):
            annotations.append(node)
        for ann in annotations:
            if ann is not None:
                skip.update(id(n) for n in ast.walk(ann))
    return skip


def mutants(module: str, root: Path = REPO) -> list[Mutant]:
    """Every mutant of one module, each once (two operators making the same text count once)."""
    source = (root / PKG / module).read_text()
    tree = ast.parse(source)
    offsets = [0]
    for line in source.splitlines(True):
        offsets.append(offsets[-1] + len(line))
    skip = _skipped(tree)
    ctx = _context(tree)
    seen: set[str] = set()
    result: list[Mutant] = []
    node: Any  # a node with a position (expr, stmt, keyword)
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "end_col_offset"):
            continue
        for kind, repl in _replacements(node, ctx):
            start = offsets[node.lineno - 1] + node.col_offset
            end = offsets[node.end_lineno - 1] + node.end_col_offset
            # An expression is parenthesized (it may land inside a larger one); a statement (an
            # augmented assignment) cannot be, and would never compile.
            segment = repl if isinstance(repl, str) else ast.unparse(repl) if isinstance(repl, ast.stmt) \
                else f"({ast.unparse(repl)})"
            text = source[:start] + segment + source[end:]
            if text in seen:
                continue
            try:
                compile(text, module, "exec", dont_inherit=True)
            except SyntaxError:  # e.g. `pass` where an expression must stay
                continue
            seen.add(text)
            first = source.splitlines()[node.lineno - 1]
            new_line = text.splitlines()[node.lineno - 1]
            result.append(Mutant(module, node.lineno, node.end_lineno, kind, first, new_line, text))
    return sorted(result, key=lambda m: (m.line, m.kind, m.new))


def load_reviewed(path: Path) -> dict[str, str]:
    """'module:LINE: line-text => mutated-text' -> reason, from a reviewed list."""
    known: dict[str, str] = {}
    if path.exists():
        for raw in path.read_text().splitlines():
            if raw.strip() and not raw.startswith("#"):
                key, _, reason = raw.rpartition(" # ")
                known[key.strip()] = reason.strip()
    return known


def _line_of(key: str) -> int:
    return int(key.split(":")[1])


def relist() -> int:
    """Move each reviewed entry whose line moved (an edit above it) to the line its change is
    on now, in the checkout: only where the change occurs as often as it is listed (then the
    n-th entry by line goes to the n-th mutant by line); anything else is printed, not guessed."""
    lists = {path: path.read_text().splitlines() for path in (EQUIVALENT, UNTESTABLE)}
    listed: dict[str, list[tuple[Path, int, str]]] = {}  # change -> (file, line index, key)
    for path, lines in lists.items():
        for index, raw in enumerate(lines):
            if raw.strip() and not raw.startswith("#"):
                key = raw.rpartition(" # ")[0].strip()
                where, _, text = key.partition(": ")
                listed.setdefault(f"{where.split(':')[0]}: {text}", []).append((path, index, key))
    current: dict[str, list[str]] = {}
    for module in sorted({change.split(":")[0] for change in listed}):
        for m in mutants(module):
            current.setdefault(m.change, []).append(m.key)
    unplaced = 0
    for change, entries in listed.items():
        now = current.get(change, [])
        if {key for _, _, key in entries} <= set(now):
            continue
        if len(now) != len(entries):
            unplaced += 1
            print(f"cannot place ({len(entries)} listed, {len(now)} now): {change}")
            continue
        for (path, index, key), moved in zip(sorted(entries, key=lambda e: _line_of(e[2])),
                                             sorted(now, key=_line_of), strict=True):
            if key != moved:
                lists[path][index] = lists[path][index].replace(key, moved, 1)
                print(f"moved {key.split(': ')[0]} -> {moved.split(': ')[0]}: {change}")
    for path, lines in lists.items():
        path.write_text("\n".join(lines) + "\n")
    return 1 if unplaced else 0


def make_copy(rev: str | None) -> Path:
    """A world-readable copy of commit ``rev``, or of the checkout as it is (no .venv, no caches)."""
    copy = Path(tempfile.mkdtemp(prefix="socksvc-mutation-", dir="/tmp"))
    if rev is None:
        ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.pyc", ".mypy_cache",
                                        ".ruff_cache", ".pytest_cache", "pkgs")
        shutil.copytree(REPO, copy / "tree", ignore=ignore, symlinks=True)
    else:
        (copy / "tree").mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(copy / "tree")], input=archive, check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
    return copy / "tree"


_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)  # a node id may hold spaces


def _kill_left_behind(tree: Path) -> None:
    """SIGKILL every process still running with ``tree`` on its PYTHONPATH: a daemon a test started
    in a session of its own (as nobody) outlives a run killed at its timeout, its fixture's stop
    never run, and a mutant that makes it spin takes a core from every later mutant."""
    path = str(tree).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as environ:
                variables = environ.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(v.startswith(b"PYTHONPATH=") and path in v for v in variables):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float, stop_at_first: bool = True,
              plugin: str | None = None, per_test: float = PER_TEST_TIMEOUT) -> tuple[str, str]:
    """(verdict, the first failing test): killed (the tests failed), survived (they passed) or timed out."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tree)}
    # A mutant's run stops at the first failure, and a test that hangs fails after ``per_test``
    # seconds (pytest-timeout) rather than holding its worker for the whole run's timeout.
    first = ["-x", f"--timeout={per_test:.0f}"] if stop_at_first else []
    plugins = ["-p", plugin] if plugin else []
    # Hypothesis's pytest plugin imports all of hypothesis at start-up: 0.45 s of a 0.65 s run of
    # one quick test file, paid by every mutant.  The tests that use hypothesis import it themselves.
    cmd = [sys.executable, "-m", "pytest", *first, *plugins, "-q", "-rfE", "-m", "not slow",
           "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *tests]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return "timed out", ""
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
            _kill_left_behind(tree)
        log.seek(0)
        output = log.read().decode(errors="replace")
    if rc == 4 and "ERROR: not found:" in output:
        # A node id whose parameters the mutant changed (a limit in a parametrize list: its id
        # names the value) is not found, and pytest runs nothing: run every parameter instead.
        whole = tuple(dict.fromkeys(t.partition("[")[0] if "::" in t else t for t in tests))
        if whole == tests:
            raise RuntimeError(f"pytest found no such test: {output.strip()[-300:]}")
        return run_tests(tree, whole, timeout, stop_at_first, plugin, per_test)
    if rc in (0, 5):  # 5: no test collected (a file of slow tests only)
        return "survived", ""
    failed = _FAILED.search(output)
    return "killed", failed.group(1) if failed else output.strip()[-300:].replace("\n", " | ")


#: Starts coverage in every Python process of the copy while the rc file exists: the test run
#: itself and each daemon or CLI it starts (as "nobody" too), whatever environment a test gives
#: it.  What a process runs is tagged "proc|" and the test running when it started (the context
#: file CONTEXT_PLUGIN writes): it may outlive that test (a daemon a fixture started serves the
#: next tests), so tests_for adds the whole files of such tests.  Two exceptions make most of a
#: daemon's lines exact: each call (callcore.run) is tagged with the test running when it starts,
#: without "proc|" (the test that made it), and what runs between calls is tagged as the process
#: again; and a process that exits while the test it started in still runs (a CLI, a daemon a
#: test or its fixture stopped) had every line in that test: its tags lose "proc|" at exit.
SITECUSTOMIZE = """\
import os as _os
_here = _os.path.dirname(_os.path.abspath(__file__))
_rc = _os.path.join(_here, ".mutation-coveragerc")
if _os.path.exists(_rc):
    try:
        import atexit as _atexit
        import coverage as _coverage
    except ImportError:
        _coverage = None
    if _coverage is not None:
        def _test():
            try:
                with open(_os.path.join(_here, ".mutation-context")) as _f:
                    return _f.read()
            except OSError:
                return ""
        _started = _test()
        _proc = "proc|" + _started if _started else ""
        _cov = _coverage.Coverage(config_file=_rc, data_suffix=True)
        _cov.start()
        if _proc:
            _cov.switch_context(_proc)

        def _exit():
            _cov.stop()
            _cov.save()
            if _started and _test() == _started:  # it ran within its test only
                open(_cov.get_data().data_filename() + ".within", "w").close()
        _atexit.register(_exit)

        if _started:  # a process a test started (the test run itself tags each test already)
            import sys as _sys

            class _CallContext:
                def find_spec(self, name, path=None, target=None):
                    if name != "qubes_socksvc.callcore":
                        return None
                    _sys.meta_path.remove(self)
                    import importlib.util
                    spec = importlib.util.find_spec(name)
                    load = spec.loader.exec_module

                    def exec_module(module):
                        load(module)
                        run = module.run

                        async def tagged(*args, **kwargs):  # each call: the test that made it
                            test = _test()
                            if test:
                                _cov.switch_context(test)
                            try:
                                return await run(*args, **kwargs)
                            finally:
                                _cov.switch_context(_proc)
                        module.run = tagged
                    spec.loader.exec_module = exec_module
                    return spec
            _sys.meta_path.insert(0, _CallContext())
"""

#: The pytest plugin of the coverage run: tags what each test executes with its node id, in
#: the test process (a dynamic context) and in the processes it starts (the context file), and
#: records how long each test takes.
CONTEXT_PLUGIN = """\
import json, os, time
import pytest
_here = os.path.dirname(os.path.abspath(__file__))
_took = {}

def _switch(name):
    with open(os.path.join(_here, ".mutation-context"), "w") as f:
        f.write(name)
    import coverage
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(name)

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _switch(item.nodeid)
    started = time.monotonic()
    yield
    _took[item.nodeid] = time.monotonic() - started
    _switch("")

def pytest_sessionfinish(session):
    with open(os.path.join(_here, ".mutation-took"), "w") as f:
        json.dump(_took, f)
"""


def use_sites(root: Path) -> dict[tuple[str, int], set[tuple[str, int]]]:
    """For each line of a statement run on import, the lines that run what it defines at call time.

    A function's signature and decorators: its body.  A class's header and decorators: every
    line naming the class, and its methods.  Anything else (a constant, a pattern, a class
    body's field or member): every line, in any module of the package, naming what it binds.
    An over-approximation by name, which only chooses which tests a mutant runs.
    """
    sources = {p.name: p.read_text() for p in sorted((root / PKG).glob("*.py"))}
    named: dict[str, set[tuple[str, int]]] = {}
    for module, source in sources.items():
        for number, text in enumerate(source.splitlines(), 1):
            for word in set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)):
                named.setdefault(word, set()).add((module, number))
    result: dict[tuple[str, int], set[tuple[str, int]]] = {}

    def lines_of(nodes: Sequence[ast.stmt], module: str) -> set[tuple[str, int]]:
        return {(module, n) for s in nodes for n in range(s.lineno, (s.end_lineno or s.lineno) + 1)}

    def visit(body: list[ast.stmt], module: str) -> None:
        for stmt in body:
            span = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside = lines_of(stmt.body, module)
                head = range(min([stmt.lineno, *(d.lineno for d in stmt.decorator_list)]), stmt.body[0].lineno)
                result.update(((module, n), inside) for n in head)
                continue
            if isinstance(stmt, ast.ClassDef):
                users = {site for site in named.get(stmt.name, set()) if site[0] != module or site[1] not in span}
                methods = [s for s in stmt.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
                head = range(min([stmt.lineno, *(d.lineno for d in stmt.decorator_list)]), stmt.body[0].lineno)
                result.update(((module, n), users | lines_of(methods, module)) for n in head)
                visit(stmt.body, module)
                continue
            names = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            names |= {a.asname or a.name for a in getattr(stmt, "names", ()) if isinstance(a, ast.alias)}
            users = {site for name in names for site in named.get(name, set())
                     if site[0] != module or site[1] not in span}
            result.update(((module, n), users) for n in span)

    for module, source in sources.items():
        visit(ast.parse(source).body, module)
    return result


def readers(root: Path) -> dict[tuple[str, int], set[str]]:
    """For each line of a module-level assignment of the package, the tests whose own source
    names what it binds (``logs.MAX_LOGGED``, or ``MAX_LOGGED`` imported from ``logs``).

    A test that pins a limit to the documentation reads the constant and runs no line of its
    module, so the lines that use the constant (use_sites) never choose it.  A test function's
    id (``tests/test_x.py::test_y``, ``...::Class::test_y``; its decorators count), or the whole
    file for a name its module level uses.  Names imported from the package itself (re-exports)
    match every module that binds them.
    """
    bound: dict[tuple[str, str], set[int]] = {}  # (module stem, name) -> its lines
    for path in sorted((root / PKG).glob("*.py")):
        for stmt in ast.parse(path.read_text()).body:
            if not isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                continue  # a function's or class's own tests run it
            for name in {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}:
                lines = bound.setdefault((path.stem, name), set())
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    result: dict[tuple[str, int], set[str]] = {}
    for path in sorted((root / "tests").glob("test_*.py")):
        file = f"tests/{path.name}"
        if file in NOT_BEHAVIOUR:
            continue
        tree = ast.parse(path.read_text())
        names = _Imported(root, {stem for stem, _ in bound}, tree)
        for stmt in tree.body:
            members, prefix = [stmt], f"{file}::"
            if isinstance(stmt, ast.ClassDef) and stmt.name.startswith("Test"):
                members, prefix = stmt.body, f"{file}::{stmt.name}::"
            for member in members:
                if isinstance(member, (ast.Import, ast.ImportFrom)):
                    continue
                test = file
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and member.name.startswith("test"):
                    test = prefix + member.name
                for stem, name in names.named(member):
                    for line in bound.get((stem, name), ()):
                        result.setdefault((f"{stem}.py", line), set()).add(test)
    return result


class _Imported:
    """What a test file's imports of the package make its names stand for."""

    def __init__(self, root: Path, stems: set[str], tree: ast.Module) -> None:
        self.modules: dict[str, str] = {}  # a local name -> the package module it is
        self.names: dict[str, set[tuple[str, str]]] = {}  # a local name -> (module, name) it was imported as
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PKG:
                for alias in node.names:
                    local = alias.asname or alias.name
                    if node.module == PKG and (root / PKG / f"{alias.name}.py").exists():
                        self.modules[local] = alias.name
                    else:  # from the package itself: a re-export of any module's name
                        where = stems if node.module == PKG else {node.module.rpartition(".")[2]}
                        self.names[local] = {(stem, alias.name) for stem in where}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PKG + "."):
                        self.modules[alias.asname or alias.name] = alias.name.rpartition(".")[2]

    def named(self, top: ast.AST) -> set[tuple[str, str]]:
        """(module, name) of each of the package's names ``top`` reads."""
        found: set[tuple[str, str]] = set()
        for node in ast.walk(top):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in self.modules:
                found.add((self.modules[ast.unparse(node.value)], node.attr))
            elif isinstance(node, ast.Name) and node.id in self.names:
                found |= self.names[node.id]
        return found


#: How a line run by a process that a test started is tagged, before the test's node id.
PROC = "proc|"


def _file_of(test: str) -> str:
    return test.split("::", 1)[0]


@dataclass
class CoverageMap:
    """Which tests execute which line of each module, and how long each test takes."""

    lines: dict[tuple[str, int], set[str]]
    seconds: dict[str, float]
    failed: set[str]
    """Test files that failed without any mutant (under coverage: perhaps only slowed down)."""
    _runs: dict[tuple[str, str], int] = field(default_factory=dict)
    uses: dict[tuple[str, int], set[tuple[str, int]]] = field(default_factory=dict)
    """For a line run on import: the lines that use what it defines (use_sites)."""
    reads: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    """For a module-level assignment: the tests (functions, or whole files) naming what it binds."""
    killers: dict[str, dict[str, set[int]]] = field(default_factory=dict)
    """module -> test -> the lines of the mutants it killed (earlier runs' logs, and this run)."""
    recorded: dict[str, str] = field(default_factory=dict)
    """A mutant's change_id -> the test that killed it last (KILLERS)."""

    def killed(self, module: str, line: int, test: str) -> None:
        self.killers.setdefault(module, {}).setdefault(test, set()).add(line)

    def kill_rank(self, module: str, line: int, test: str) -> int:
        """3: ``test`` killed a mutant of this line; 2: one near it; 1: one of the module; 0: none."""
        lines = self.killers.get(module, {}).get(test)
        if not lines:
            return 0
        return 3 if line in lines else 2 if any(abs(k - line) <= NEAR for k in lines) else 1

    def tests_for(self, m: Mutant) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The tests (node ids, or whole files) that execute the mutated line, fastest first; and
        the whole files of those among them that ran it in a process of their own (which may
        outlive its test: a daemon a fixture started for one test serves the next ones too)."""
        # A file that failed under coverage (a timing-sensitive test, slowed down) keeps the lines
        # its tests were seen to run: a lower bound, so at worst a mutant survives it wrongly.
        found: set[str] = set()
        for line in range(m.line, m.end_line + 1):
            found |= self.lines.get((m.module, line), set())
        if found and (m.module, m.line) in self.uses:
            # A line run on import (a constant, a pattern, a default, a decorator) runs in every
            # test, or in the process a test started; what it changes shows where it is used.
            used = {t for site in self.used_at_call_time((m.module, m.line)) for t in self.lines.get(site, ())
                    if "::" in t}
            # And the tests that read it themselves (a limit pinned to the docs runs none of its uses).
            readers = self.readers_of(m)
            found = (used | readers) or found
        else:
            readers = set()
        later = {_file_of(t.removeprefix(PROC)) for t in found if t.startswith(PROC)}
        tests = {t.removeprefix(PROC) for t in found}
        tests = {t for t in tests if "::" not in t or _file_of(t) not in tests}
        # A whole file among tests (a process started outside any test ran the line) comes last.
        def order(t: str) -> tuple[bool, int, bool, float, float, str]:
            # The tests that killed mutants of this line, near it, or of this module first (a
            # mutant is most often killed by what killed its neighbours); then the tests most
            # about this module: the largest share of the lines they run is the module's (a
            # unit's own tests before the end-to-end ones that pass through it).
            # Among killers of one rank, the fastest first (a fuzz test that killed before
            # takes 10 s; a unit test that did too, 10 ms).
            rank = 4 if self.recorded.get(m.change_id) == t else self.kill_rank(m.module, m.line, t)
            return ("::" not in t and len(tests) > 1, -rank, t not in readers,
                    -self.focus(m.module, t) if not rank else 0.0, self.seconds.get(t, 0.0), t)

        return (tuple(sorted(tests, key=order)),
                tuple(sorted(later - tests, key=lambda f: (self.seconds.get(f, 0.0), f))))

    def readers_of(self, m: Mutant) -> set[str]:
        """The node ids of the tests (each parameter) or the files that name what ``m``'s line binds."""
        found: set[str] = set()
        for reader in self.reads.get((m.module, m.line), ()):
            ids = {t for t in self.seconds if t == reader or t.startswith(reader + "[")} if "::" in reader else set()
            found |= ids or {reader}
        return found

    def used_at_call_time(self, line: tuple[str, int]) -> set[tuple[str, int]]:
        """The lines, run when something is called, that use what ``line`` (run on import)
        defines: a use that is itself run on import (a pattern in a table of fields, the table
        in a constant) stands for its own uses, so a test is chosen by what it calls, not by
        importing the package, which every test does."""
        found: set[tuple[str, int]] = set()
        seen, todo = {line}, [line]
        while todo:
            for site in self.uses.get(todo.pop(), ()):
                if site not in self.uses:
                    found.add(site)
                elif site not in seen:
                    seen.add(site)
                    todo.append(site)
        return found

    def focus(self, module: str, test: str) -> float:
        """The share of the package's lines ``test`` runs that are ``module``'s."""
        if not self._runs:
            for (mod, _), tags in self.lines.items():
                for t in {t.removeprefix(PROC) for t in tags}:
                    self._runs[(mod, t)] = self._runs.get((mod, t), 0) + 1
                    self._runs[("", t)] = self._runs.get(("", t), 0) + 1
        return self._runs.get((module, test), 0) / max(1, self._runs.get(("", test), 0))


def measure_coverage(trees: list[Path], tests: tuple[str, ...], timeout: float) -> CoverageMap:
    """Run each test file once under coverage (in its own data directory), in parallel trees."""
    import coverage  # requirements-test.txt

    def one(test: str) -> tuple[str, float, bool, dict[str, float], dict[tuple[str, int], set[str]]]:
        tree = free.get()
        data = Path(tempfile.mkdtemp(prefix="socksvc-mutation-cov-", dir="/tmp"))
        try:
            data.chmod(0o1777)
            (tree / ".mutation-coveragerc").write_text(
                f"[run]\ndata_file = {data}/.coverage\nparallel = True\nsource = {tree / PKG}\n")
            started = time.monotonic()
            verdict, _ = run_tests(tree, (test,), timeout, stop_at_first=False, plugin="mutation_context")
            took = time.monotonic() - started
            lines: dict[tuple[str, int], set[str]] = {}
            for path in data.glob(".coverage.*"):  # one per process
                if path.suffix == ".within":
                    continue
                found = coverage.CoverageData(str(path))
                found.read()
                # A process that exited within the test it started in: its lines are that test's.
                within = path.with_name(path.name + ".within").exists()
                for filename in found.measured_files():
                    for line, contexts in found.contexts_by_lineno(filename).items():
                        # a process started outside any test (a session's set-up): the whole file
                        tags = {(c.removeprefix(PROC) if within else c) or test for c in contexts} or {test}
                        lines.setdefault((Path(filename).name, line), set()).update(tags)
            per_test = json.loads((tree / ".mutation-took").read_text()) if verdict != "timed out" else {}
            return test, took, verdict == "survived", per_test, lines
        finally:
            for name in (".mutation-coveragerc", ".mutation-context", ".mutation-took"):
                (tree / name).unlink(missing_ok=True)
            shutil.rmtree(data, ignore_errors=True)
            free.put(tree)

    free: queue.Queue[Path] = queue.Queue()
    for tree in trees:
        (tree / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tree / "mutation_context.py").write_text(CONTEXT_PLUGIN)
        subprocess.run(["chmod", "-R", "a+rX", str(tree)], check=True)
        free.put(tree)
    result = CoverageMap({}, {}, set())
    with concurrent.futures.ThreadPoolExecutor(len(trees)) as pool:
        for test, took, passed, per_test, lines in pool.map(one, tests):
            result.seconds[test] = took
            result.seconds.update(per_test)
            if not passed:
                result.failed.add(test)
            for key, tags in lines.items():
                result.lines.setdefault(key, set()).update(tags)
            failed = "" if passed else "; it failed under coverage: run again without it below"
            print(f"coverage: {test} ({took:.0f}s, {len(per_test)} tests{failed})", flush=True)
    for tree in trees:
        (tree / "sitecustomize.py").unlink()
        (tree / "mutation_context.py").unlink()
    return result


def _kills(log: str) -> Iterator[tuple[str, int, str]]:
    """(module, line, test) of each killed mutant in a run log's lines."""
    for key, test in _killed(log):
        yield key.split(":")[0], int(key.split(":")[1]), test


def _killed(log: str) -> Iterator[tuple[str, str]]:
    """(key, test) of each mutant a run log's lines say a test killed."""
    for line in log.splitlines():
        if line.startswith("killed "):
            key, _, why = line.removeprefix("killed").strip().partition("  <- ")
            test = why.rsplit(" [", 1)[0] if why.endswith("s]") else why
            if test.startswith("tests/") and "::" in test:
                yield key, test


def _change_of(key: str) -> str:
    """A mutant's change from its key ("module:line: old => new")."""
    module, _, rest = key.partition(":")
    return f"{module}: {rest.partition(': ')[2]}"


def load_killers(path: Path = KILLERS) -> dict[str, str]:
    if not path.exists():
        return {}
    return dict(line.split(" ", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def save_killers(logs: list[Path], path: Path = KILLERS, root: Path = REPO, modules: Sequence[str] = MODULES) -> int:
    """Write ``path`` from run logs (a later log's verdict wins; killers already recorded stay
    unless a log names another): the test that killed each mutant the code still has."""
    current = {m.change_id for module in modules for m in mutants(module, root)}
    killers = {k: t for k, t in load_killers(path).items() if k in current}
    for log in logs:
        for key, test in _killed(log.read_text()):
            found = change_id(_change_of(key))
            if found in current:
                killers[found] = test
    path.write_text("# SPDX-License-Identifier: GPL-2.0-or-later\n# Copyright (C) 2026 qubes-socksvc developers\n"
                    "# tools/mutate.py --save-killers: the test that last killed each mutant (sha256 of its\n"
                    "# change, 16 hex digits), run first; only an order, never a verdict.\n"
                    + "".join(f"{k} {t}\n" for k, t in sorted(killers.items())))
    print(f"{path}: {len(killers)} mutants' killers ({len(current)} mutants)")
    return 0


def _within(tests: list[str], seconds: dict[str, float], budget: float) -> tuple[str, ...]:
    """The first tests whose unmutated time adds up to ``budget`` at most (the first one always)."""
    chosen: list[str] = []
    spent = 0.0
    for test in tests:
        spent += seconds.get(test, 10.0)
        if chosen and spent > budget:
            break
        chosen.append(test)
    return tuple(chosen)


def run_mutant(tree: Path, m: Mutant, tests: tuple[str, ...], seconds: dict[str, float],
               timeout: float) -> tuple[str, str]:
    """Run ``tests`` on mutant ``m``; a hang is twice the tests' time under coverage (``seconds``)."""
    target = tree / PKG / m.module
    original = target.read_text()
    target.write_text(m.text)
    per_test = max(PER_TEST_TIMEOUT, 2 * max(seconds.get(t, 30.0) for t in tests))
    timeout = timeout or max(RUN_TIMEOUT, 2 * sum(seconds.get(t, 30.0) for t in tests))
    try:
        return run_tests(tree, tests, timeout, per_test=per_test)
    finally:
        target.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="mutants at once (their tests mostly wait: 4 suit 2 cores)")
    parser.add_argument("--timeout", type=float, default=0,
                        help="seconds per mutant's test run (default: twice its tests' time under coverage, at least "
                             f"{RUN_TIMEOUT}; a test alone: twice its own, at least {PER_TEST_TIMEOUT})")
    parser.add_argument("--only", nargs="*", default=None, choices=MODULES, metavar="MODULE",
                        help="modules (e.g. request.py)")
    parser.add_argument("--kind", nargs="*", default=None, choices=OPERATORS, help="only these operators")
    parser.add_argument("--rev", default="HEAD", help="the commit to test (default HEAD: what is committed)")
    parser.add_argument("--worktree", action="store_true", help="test the checkout as it is, uncommitted changes too")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--again", action="store_true", help="only the survivors of the last run (--survivors)")
    parser.add_argument("--survivors", type=Path, default=SURVIVORS,
                        help=f"the survivors file written, and read by --again (default {SURVIVORS})")
    parser.add_argument("--budget", type=float, default=0,
                        help="seconds of (unmutated) test time a mutant runs at most, fastest tests first; "
                             "a survivor within the budget says so (default: no budget, every test)")
    parser.add_argument("--relist", action="store_true",
                        help="move the reviewed lists' entries to the lines their changes moved to; run nothing")
    parser.add_argument("--recheck-lists", action="store_true",
                        help="run the mutants listed as equivalent or untestable too (default: counted as "
                             "listed, not run), to find entries a new test now kills")
    parser.add_argument("--reuse-coverage", action="store_true",
                        help=f"take which tests execute which line from the last run ({COVERAGE}), not measure it")
    parser.add_argument("--log", type=Path, default=LOG, help=f"every verdict and its failing test (default {LOG})")
    parser.add_argument("--retally", type=Path, nargs="+", metavar="LOG",
                        help="print the table from run logs and the reviewed lists as they are now; run nothing")
    parser.add_argument("--save-killers", type=Path, nargs="+", metavar="LOG",
                        help=f"record in {KILLERS.relative_to(REPO)} which test killed each mutant in these run "
                             "logs (later logs win), to run it first next time; run nothing")
    args = parser.parse_args()
    if args.retally:
        return retally(args.retally)
    if args.save_killers:
        return save_killers(args.save_killers)
    if args.relist:
        return relist()
    # Started in the background by a shell, SIGINT is ignored, and children inherit that: the
    # tests that interrupt a child with SIGINT would fail for a reason no mutant caused.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chosen = args.only or list(MODULES)
    rev = None if args.worktree else subprocess.run(["git", "-C", str(REPO), "rev-parse", args.rev], check=True,
                                                    capture_output=True, text=True).stdout.strip()
    trees: queue.Queue[Path] = queue.Queue()
    for _ in range(args.jobs):
        trees.put(make_copy(rev))
    source = trees.queue[0]
    try:
        return _run(args, chosen, trees, source)
    finally:
        while not trees.empty():
            shutil.rmtree(trees.get().parent, ignore_errors=True)


COLUMNS = ("killed", "timed out", "survived", "untestable", "equivalent")


def print_table(results: dict[str, dict[str, int]], planned: dict[str, int]) -> float:
    """The table of verdicts by module; the worst score (0 for a module not run whole)."""
    print("| module | mutants | killed | timed out | survived | untestable | equivalent | score |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 100.0
    for module, r in results.items():
        ran = sum(r.values())
        live = ran - r["equivalent"]
        score = 100.0 * (r["killed"] + r["timed out"]) / live if live else 100.0
        worst = min(worst, score if ran == planned[module] else 0.0)
        shown = f"{score:.1f} %" if ran else "not run"
        print(f"| {module} | {ran if ran == planned[module] else f'{ran} of {planned[module]} (interrupted)'} "
              + " ".join(f"| {r[c]}" for c in COLUMNS) + f" | {shown} |")
    return worst


def retally(logs: list[Path]) -> int:
    """The table again from run logs (a later log's verdict on a mutant wins), with the reviewed
    lists as they are now: a survivor listed since counts as equivalent or untestable."""
    equivalent, untestable = load_reviewed(EQUIVALENT), load_reviewed(UNTESTABLE)
    verdicts: dict[str, tuple[str, str]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            verdict = "timed out" if line.startswith("timed out") else line.split(" ", 1)[0]
            key, _, why = line[len(verdict):].strip().partition("  <- ")
            verdicts[key] = (verdict, why)
    results: dict[str, dict[str, int]] = {}
    for key, (verdict, why) in sorted(verdicts.items()):
        if verdict in ("survived", "equivalent", "untestable") and why != "no test executes the line":
            verdict = "equivalent" if key in equivalent else "untestable" if key in untestable else "survived"
        results.setdefault(key.split(":")[0], dict.fromkeys(COLUMNS, 0))[verdict] += 1
        if verdict == "survived":
            print(f"survived: {key}  <- {why}")
    worst = print_table(results, {module: sum(r.values()) for module, r in results.items()})
    return 0 if worst >= 95.0 else 1


def _run(args: argparse.Namespace, chosen: list[str], trees: queue.Queue[Path], source: Path) -> int:
    equivalent, untestable = load_reviewed(EQUIVALENT), load_reviewed(UNTESTABLE)
    work = [m for module in chosen for m in mutants(module, source) if args.kind is None or m.kind in args.kind]
    if args.again:  # by the change, not the line number: lines move as tests lead to fixes
        prefix = "# change: "
        last = {line.removeprefix(prefix) for line in args.survivors.read_text().splitlines()
                if line.startswith(prefix)}
        work = [m for m in work if m.change in last]
    if args.list:
        for m in work:
            print(m.key)
        return 0
    results: dict[str, dict[str, int]] = {m: dict.fromkeys(COLUMNS, 0) for m in chosen}
    survivors: list[tuple[Mutant, str]] = []
    used: set[str] = set()

    def one(m: Mutant) -> tuple[Mutant, str, str]:
        begun = time.monotonic()
        m, verdict, why = judge(m)
        took = time.monotonic() - begun
        return m, verdict, f"{why} [{took:.1f}s]" if took > 0.1 else why

    def judge(m: Mutant) -> tuple[Mutant, str, str]:
        tests, later = covered.tests_for(m)
        if not tests:  # no test executes the line: nothing can fail
            return m, "survived", "no test executes the line"
        if not args.recheck_lists and (m.key in equivalent or m.key in untestable):
            # Reviewed, and it survived every test of its line when it was listed: running them
            # again (hundreds, for a line every test runs) would only confirm it.
            return m, "survived", "listed: not run (--recheck-lists runs it)"
        every = len(tests)
        if args.budget:  # the fastest tests, up to the budget of their unmutated time
            tests = _within(list(tests), covered.seconds, args.budget)
            later = later if len(tests) == every else ()
        cut = "" if len(tests) == every else f" (the first {len(tests)} of {every} tests running the line: --budget)"
        tree = trees.get()
        try:
            verdict, killer = run_mutant(tree, m, tests, covered.seconds, args.timeout)
            if verdict == "survived" and later:  # the whole files: a daemon may serve later tests
                verdict, killer = run_mutant(tree, m, later, covered.seconds, args.timeout)
                shown = " ".join(later) if len(later) < 6 else f"{len(later)} files"
                return m, verdict, killer or f"ran {len(tests)} tests, then {shown}"
            return m, verdict, killer or f"ran {' '.join(tests) if len(tests) < 6 else f'{len(tests)} tests'}{cut}"
        finally:
            trees.put(tree)

    started = time.monotonic()
    everything = tuple(sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                              if str(p.relative_to(REPO)) not in NOT_BEHAVIOUR))
    if args.reuse_coverage:  # the map the last run measured (after a change to tests only, say)
        saved = json.loads(COVERAGE.read_text())
        covered = CoverageMap({(k.split(":")[0], int(k.split(":")[1])): set(v) for k, v in saved["lines"].items()},
                              saved["seconds"], set(saved["failed"]))
    else:  # every file once, unmutated, under coverage: which lines each test executes, and that it passes
        copies = [trees.get() for _ in range(args.jobs)]
        covered = measure_coverage(copies, everything, 1800)
        for copy in copies:
            trees.put(copy)
        COVERAGE.parent.mkdir(exist_ok=True)
        COVERAGE.write_text(json.dumps({"lines": {f"{k[0]}:{k[1]}": sorted(v) for k, v in covered.lines.items()},
                                        "seconds": covered.seconds, "failed": sorted(covered.failed)}))
    covered.uses = use_sites(source)
    covered.reads = readers(source)
    covered.recorded = load_killers()
    for earlier in sorted(LOG.parent.glob("mutation-log*.txt")):  # which tests killed what before
        if earlier.resolve() != args.log.resolve():
            for module, at, test in _kills(earlier.read_text()):
                covered.killed(module, at, test)
    tree = trees.get()
    trees.put(tree)
    for test in sorted(covered.failed):  # the suite has timing-sensitive tests: retried without coverage
        for _attempt in range(2):
            verdict, failure = run_tests(tree, (test,), 1800, per_test=1800)
            if verdict == "survived":
                break
        else:
            print(f"the tests fail without any mutant (python: {sys.executable}): {test}: {failure}")
            return 2
    print(f"unmutated: {len(everything)} test files pass; coverage measured ({time.monotonic() - started:.0f}s); "
          f"{len(work)} mutants", flush=True)
    done = 0
    args.log.parent.mkdir(exist_ok=True)
    log = args.log.open("w")
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        for future in concurrent.futures.as_completed([pool.submit(one, m) for m in work]):
            m, verdict, why = future.result()
            done += 1
            if verdict == "survived" and why != "no test executes the line":  # an unreached line is never excused
                for listed, name in ((equivalent, "equivalent"), (untestable, "untestable")):
                    if m.key in listed:
                        verdict = name
                        used.add(m.key)
            results[m.module][verdict] += 1
            if verdict == "killed":
                covered.killed(m.module, m.line, why.rsplit(" [", 1)[0])
            if verdict == "survived":
                survivors.append((m, why))
            line = f"{verdict:10} {m.key}  <- {why}"
            log.write(line + "\n")
            log.flush()
            print(f"[{done}/{len(work)} {time.monotonic() - started:.0f}s] {line}", flush=True)
    except KeyboardInterrupt:  # the table of what has run so far
        print(f"interrupted after {done} of {len(work)} mutants; waiting for the running ones")
    finally:
        pool.shutdown(cancel_futures=True)
        log.close()
    originals = {module: (source / PKG / module).read_text() for module in chosen}

    args.survivors.parent.mkdir(exist_ok=True)
    with args.survivors.open("w") as out:
        for m, why in survivors:
            out.write(f"# {m.key}\n# ({why})\n# change: {m.change}\n{m.diff(originals[m.module])}\n")
    print(f"\nmutation run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{time.monotonic() - started:.0f}s, operators: {' '.join(args.kind or OPERATORS)}; "
          f"survivors with diffs: {args.survivors}; every verdict: {args.log}\n")
    worst = print_table(results, {module: sum(m.module == module for m in work) for module in chosen})
    for note in unmatched_entries([*equivalent, *untestable], used, chosen, work, args.again):
        print(note)
    return 0 if worst >= 95.0 else 1


def unmatched_entries(listed: Iterable[str], used: set[str], chosen: list[str], work: list[Mutant],
                      again: bool) -> list[str]:
    """A note for each reviewed entry of the chosen modules that excused no mutant of this run.

    Under ``--again`` only the last run's survivors run, so an entry is judged only when its
    mutant ran: the others are neither stale nor missing, merely not part of this run.
    """
    ran_keys = {m.key for m in work}
    changes = {m.change: m.key for m in work}
    notes = []
    for key in sorted(k for k in listed if k.split(":")[0] in chosen and k not in used):
        moved = changes.get(_change_of(key))
        if again and key not in ran_keys and not moved:
            continue
        hint = " (its change is on another line now: --relist moves it)" if moved and moved != key else ""
        where = "" if key in ran_keys or moved else " (no such mutant)"
        notes.append(f"note: listed entry matched no surviving mutant{where}{hint}: {key}")
    return notes


if __name__ == "__main__":
    sys.exit(main())
