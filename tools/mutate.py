#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Mutation testing of the trust boundary: do the tests fail when the code is wrong?

Each mutant is one small change to one module (a flipped comparison, a dropped
call or ``raise``, a constant off by one, ``\\Z`` -> ``$``, ``and``/``or``,
``True``/``False``, a flag dropped from ``A | B``, ``return X`` -> ``return None``,
one member of the module's own Enum for another, ``continue``/``break``),
run against the test files that execute its line in a world-readable copy of the
checkout under /tmp (the daemon runs as "nobody"), never in the checkout itself.
Which files execute which line is measured first, with coverage, in every process
a test starts (the daemons too): a mutant runs only those files, fastest first, and
a mutant on a line no test executes survives without a run.  A mutant is killed when the tests fail, timed out when
they run past the timeout, survived when they pass.  Mutants listed in
tools/mutation-equivalent.txt (reviewed: no caller can tell) are counted apart.
The unmutated tests must pass first.  Ctrl-C prints the table of the mutants run so far.

    python3 tools/mutate.py [--jobs 4] [--timeout SECONDS] [--only MODULE ...] [--list] [--again]
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import difflib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PKG = "qubes_socksvc"
EQUIVALENT = REPO / "tools" / "mutation-equivalent.txt"
SURVIVORS = REPO / "build" / "mutation-survivors.txt"
#: Seconds one test may take in a mutant's run (the slowest unmutated one takes 6 s).
PER_TEST_TIMEOUT = 60

# module -> (functions to mutate, or None for all; the tests that exercise it)
MODULES: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {
    "request.py": (None, ("tests/test_testing.py", "tests/test_call_endings.py", "tests/test_server.py",
                          "tests/test_careless_handlers.py")),
    "descriptor.py": (None, ("tests/test_descriptor.py", "tests/test_conformance.py", "tests/test_fuzz.py")),
    "qrexec.py": (None, ("tests/test_descriptor.py", "tests/test_conformance.py", "tests/test_manifest.py",
                         "tests/test_fuzz.py", "tests/test_call.py", "tests/test_forwards.py",
                         "tests/test_policy.py")),
    "rpcconfig.py": (None, ("tests/test_render.py", "tests/test_conformance.py", "tests/test_apply_safety.py",
                            "tests/test_call.py")),
    "handlers.py": (None, ("tests/test_testing.py", "tests/test_server.py", "tests/test_spec.py",
                           "tests/test_careless_handlers.py", "tests/test_hostile.py")),
    "server.py": (("_call", "_connection", "_accept", "_lookup"),
                  ("tests/test_call_endings.py", "tests/test_logging.py", "tests/test_server.py",
                   "tests/test_conformance.py", "tests/test_reload.py", "tests/test_hostile.py",
                   "tests/test_careless_handlers.py")),
    "install.py": (None, ("tests/test_apply.py", "tests/test_apply_safety.py", "tests/test_files.py",
                          "tests/test_render.py")),
    "lookup.py": (None, ("tests/test_call.py", "tests/test_conformance.py", "tests/test_forwards.py")),
    "agent.py": (None, ("tests/test_call.py", "tests/test_forwards.py", "tests/test_client_lib.py")),
    "model.py": (None, ("tests/test_spec.py", "tests/test_testing.py", "tests/test_server.py",
                        "tests/test_render.py", "tests/test_conformance.py")),
    "client.py": (None, ("tests/test_client_lib.py",)),
}

FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
    ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}


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
    def ident(self) -> str:
        return f"{self.module}:{self.line}:{self.kind}: {self.old.strip()} => {self.new.strip()}"

    def diff(self, original: str) -> str:
        return "".join(difflib.unified_diff(original.splitlines(True), self.text.splitlines(True),
                                            f"a/{PKG}/{self.module}", f"b/{PKG}/{self.module}", n=1))


def _enums(tree: ast.Module) -> dict[str, list[str]]:
    """The module's own Enum classes and their members' names."""
    return {c.name: [t.id for a in c.body if isinstance(a, ast.Assign) for t in a.targets
                     if isinstance(t, ast.Name) and not t.id.startswith("_")]  # members, not __hash__
            for c in tree.body if isinstance(c, ast.ClassDef) and any("Enum" in ast.unparse(b) for b in c.bases)}


def _replacements(node: ast.AST, enums: dict[str, list[str]]) -> list[tuple[str, ast.AST | str]]:
    """(kind, replacement node or source) for every mutation of this one node."""
    out: list[tuple[str, ast.AST | str]] = []
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in enums:
        out += [("enum", ast.Attribute(node.value, other)) for other in enums[node.value.id] if other != node.attr]
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
        out += [("const+1", ast.Constant(node.value + 1)), ("const-1", ast.Constant(node.value - 1))]
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\\Z" in node.value:
        out.append(("regex$", ast.Constant(node.value.replace("\\Z", "$"))))
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        out += [("flag", node.left), ("flag", node.right)]
    elif isinstance(node, ast.Raise):
        out.append(("raise", "pass"))
    elif isinstance(node, ast.Expr) and isinstance(node.value, (ast.Call, ast.Await)):
        out.append(("call", "pass"))
    elif isinstance(node, ast.Return) and node.value is not None \
            and not (isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return", "return None"))
    elif isinstance(node, (ast.Continue, ast.Break)):
        out.append(("loop", "break" if isinstance(node, ast.Continue) else "continue"))
    return out


def _skipped(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, TYPE_CHECKING blocks, __all__."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0]))
        annotations = [getattr(node, "returns", None), getattr(node, "annotation", None)]
        if (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)) \
                or isinstance(node, ast.JoinedStr):
            annotations.append(node)
        for ann in annotations:
            if ann is not None:
                skip.update(id(n) for n in ast.walk(ann))
    return skip


def mutants(module: str, functions: tuple[str, ...] | None) -> list[Mutant]:
    source = (REPO / PKG / module).read_text()
    tree = ast.parse(source)
    offsets = [0]
    for line in source.splitlines(True):
        offsets.append(offsets[-1] + len(line))
    skip = _skipped(tree)
    enums = _enums(tree)
    roots: list[ast.AST] = [tree]
    if functions is not None:
        roots = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name in functions]
    seen: set[int] = set()
    result: list[Mutant] = []
    for root in roots:
        node: Any
        for node in ast.walk(root):
            if id(node) in skip or id(node) in seen or not hasattr(node, "end_col_offset"):
                continue
            seen.add(id(node))
            for kind, repl in _replacements(node, enums):
                start = offsets[node.lineno - 1] + node.col_offset
                end = offsets[node.end_lineno - 1] + node.end_col_offset
                segment = repl if isinstance(repl, str) else f"({ast.unparse(repl)})"
                text = source[:start] + segment + source[end:]
                first = source.splitlines()[node.lineno - 1]
                new_line = text.splitlines()[node.lineno - 1]
                result.append(Mutant(module, node.lineno, node.end_lineno, kind, first, new_line, text))
    return sorted(result, key=lambda m: (m.line, m.kind, m.new))


def load_equivalent() -> dict[str, str]:
    """'module:line-text => mutated-text' -> reason, from the reviewed list."""
    known: dict[str, str] = {}
    if EQUIVALENT.exists():
        for raw in EQUIVALENT.read_text().splitlines():
            if raw.strip() and not raw.startswith("#"):
                key, _, reason = raw.rpartition(" # ")
                known[key.strip()] = reason.strip()
    return known


def equivalent_key(m: Mutant) -> str:
    return f"{m.module}: {m.old.strip()} => {m.new.strip()}"


def make_copy() -> Path:
    """A world-readable copy of the checkout (no .venv, no caches)."""
    copy = Path(tempfile.mkdtemp(prefix="socksvc-mutation-", dir="/tmp"))
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.pyc", ".mypy_cache",
                                    ".ruff_cache", ".pytest_cache")
    shutil.copytree(REPO, copy / "tree", ignore=ignore, symlinks=True)
    subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
    return copy / "tree"


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float, log: int = subprocess.DEVNULL,
              stop_at_first: bool = True) -> str:
    """killed (the tests failed), survived (they passed) or timed out."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tree)}
    # A mutant's run stops at the first failure, and a test that hangs fails after PER_TEST_TIMEOUT
    # (pytest-timeout) rather than holding its worker for the whole run's timeout.
    first = ["-x", f"--timeout={PER_TEST_TIMEOUT}"] if stop_at_first else []
    cmd = [sys.executable, "-m", "pytest", *first, "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return "survived" if rc == 0 else "killed"


#: Starts coverage in every Python process of the copy while the rc file exists: the test run
#: itself and each daemon or CLI it starts (as "nobody" too), whatever environment a test gives it.
SITECUSTOMIZE = """\
import os as _os
_rc = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), ".mutation-coveragerc")
if _os.path.exists(_rc):
    try:
        import atexit as _atexit
        import coverage as _coverage
    except ImportError:
        pass
    else:
        _cov = _coverage.Coverage(config_file=_rc, data_suffix=True)
        _cov.start()
        _atexit.register(lambda: (_cov.stop(), _cov.save()))
"""


@dataclass
class CoverageMap:
    """Which test files execute which line of each module, and how long each file takes."""

    lines: dict[tuple[str, int], set[str]]
    seconds: dict[str, float]
    failed: set[str]
    """Test files that failed without any mutant (under coverage: perhaps only slowed down)."""

    def tests_for(self, m: Mutant) -> tuple[str, ...]:
        """The module's own test files (MODULES) that execute the mutated line, fastest first;
        else any file that does.  A module's top level runs on import, in every file."""
        files = set(self.failed)  # a file that failed under coverage may have stopped short: it may run any line
        for line in range(m.line, m.end_line + 1):
            files |= self.lines.get((m.module, line), set())
        own = files & set(MODULES[m.module][1])
        return tuple(sorted(own or files, key=lambda f: self.seconds.get(f, 0.0)))


def measure_coverage(trees: list[Path], tests: tuple[str, ...], timeout: float) -> CoverageMap:
    """Run each test file once under coverage (in its own data directory), in parallel trees."""
    import coverage  # requirements-test.txt

    def one(test: str) -> tuple[str, float, bool, dict[tuple[str, int], None]]:
        tree = free.get()
        data = Path(tempfile.mkdtemp(prefix="socksvc-mutation-cov-", dir="/tmp"))
        try:
            data.chmod(0o1777)
            (tree / ".mutation-coveragerc").write_text(
                f"[run]\ndata_file = {data}/.coverage\nparallel = True\nsource = {tree / PKG}\n")
            started = time.monotonic()
            passed = run_tests(tree, (test,), timeout, stop_at_first=False) == "survived"
            took = time.monotonic() - started
            combined = coverage.Coverage(data_file=str(data / ".coverage"))
            combined.combine([str(data)], keep=False)
            found = combined.get_data()
            lines: dict[tuple[str, int], None] = {}
            for filename in found.measured_files():
                for line in found.lines(filename) or ():
                    lines[(Path(filename).name, line)] = None
            return test, took, passed, lines
        finally:
            (tree / ".mutation-coveragerc").unlink(missing_ok=True)
            shutil.rmtree(data, ignore_errors=True)
            free.put(tree)

    free: queue.Queue[Path] = queue.Queue()
    for tree in trees:
        (tree / "sitecustomize.py").write_text(SITECUSTOMIZE)
        subprocess.run(["chmod", "-R", "a+rX", str(tree)], check=True)
        free.put(tree)
    result = CoverageMap({}, {}, set())
    with concurrent.futures.ThreadPoolExecutor(len(trees)) as pool:
        for test, took, passed, lines in pool.map(one, tests):
            result.seconds[test] = took
            if not passed:
                result.failed.add(test)
            for key in lines:
                result.lines.setdefault(key, set()).add(test)
            failed = "" if passed else "; it failed under coverage: taken to execute every line"
            print(f"coverage: {test} ({took:.0f}s{failed})", flush=True)
    for tree in trees:
        (tree / "sitecustomize.py").unlink()
    return result


def run_mutant(tree: Path, m: Mutant, tests: tuple[str, ...], timeout: float) -> str:
    target = tree / PKG / m.module
    original = target.read_text()
    target.write_text(m.text)
    try:
        return run_tests(tree, tests, timeout)
    finally:
        target.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="mutants at once (their tests mostly wait: 4 suit 2 cores)")
    parser.add_argument("--timeout", type=float, default=0,
                        help="seconds per mutant's test run (default: 3x its files' unmutated time, at least 60)")
    parser.add_argument("--only", nargs="*", default=None, help="modules (e.g. request.py)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--again", action="store_true", help="only the survivors of the last run (--survivors)")
    parser.add_argument("--survivors", type=Path, default=SURVIVORS,
                        help=f"the survivors file written, and read by --again (default {SURVIVORS})")
    args = parser.parse_args()
    # Started in the background by a shell, SIGINT is ignored, and children inherit that: the
    # tests that interrupt a child with SIGINT would fail for a reason no mutant caused.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chosen = args.only or list(MODULES)
    known = load_equivalent()
    work: list[tuple[Mutant, tuple[str, ...]]] = []
    for module in chosen:
        functions, tests = MODULES[module]
        work += [(m, tests) for m in mutants(module, functions)]
    if args.again:  # by the change, not the line number: lines move as tests lead to fixes
        prefix = "# equivalent-list key: "
        last = {line.removeprefix(prefix) for line in args.survivors.read_text().splitlines()
                if line.startswith(prefix)}
        work = [(m, tests) for m, tests in work if equivalent_key(m) in last]
    if args.list:
        for m, _ in work:
            print(m.ident)
        return 0
    trees: queue.Queue[Path] = queue.Queue()
    for _ in range(args.jobs):
        trees.put(make_copy())
    results: dict[str, dict[str, int]] = {m: dict.fromkeys(
        ("killed", "survived", "timed out", "equivalent"), 0) for m in chosen}
    survivors: list[Mutant] = []
    used_equivalent: set[str] = set()

    def one(item: tuple[Mutant, tuple[str, ...]]) -> tuple[Mutant, str]:
        m, _ = item
        tests = covered.tests_for(m)
        if not tests:  # no test executes the line: nothing can fail
            uncovered.add(m.ident)
            return m, "survived"
        # A hang, not a slow run: three times the files' unmutated time (measured under coverage).
        timeout = args.timeout or max(60.0, 3 * sum(covered.seconds[t] for t in tests))
        tree = trees.get()
        try:
            return m, run_mutant(tree, m, tests, timeout)
        finally:
            trees.put(tree)

    started = time.monotonic()
    everything = tuple(sorted({t for module in chosen for t in MODULES[module][1]}))
    # Every file once, unmutated, under coverage: which lines it executes, and that it passes.
    copies = [trees.get() for _ in range(args.jobs)]
    covered = measure_coverage(copies, everything, 1800)
    for copy in copies:
        trees.put(copy)
    tree = trees.get()
    trees.put(tree)
    for test in sorted(covered.failed):  # the suite has timing-sensitive tests: retried without coverage
        for _attempt in range(2):
            with tempfile.TemporaryFile() as log:
                if run_tests(tree, (test,), 1800, log.fileno()) == "survived":
                    break
                log.seek(0)
                failure = log.read().decode(errors="replace")[-4000:]
        else:
            print(f"{failure}\nthe tests fail without any mutant (python: {sys.executable}): {test}")
            return 2
    print(f"unmutated: {' '.join(everything)} pass; coverage measured ({time.monotonic() - started:.0f}s)",
          flush=True)
    uncovered: set[str] = set()
    done = 0
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        for m, verdict in pool.map(one, work):
            done += 1
            if verdict == "survived" and equivalent_key(m) in known:
                verdict = "equivalent"
                used_equivalent.add(equivalent_key(m))
            results[m.module][verdict] += 1
            if verdict == "survived":
                survivors.append(m)
            unrun = " (no test executes the line)" if m.ident in uncovered else ""
            print(f"[{done}/{len(work)} {time.monotonic() - started:.0f}s] {verdict:9} {m.ident}{unrun}", flush=True)
    except KeyboardInterrupt:  # the table of what has run so far
        print(f"interrupted after {done} of {len(work)} mutants; waiting for the running ones")
    finally:
        pool.shutdown(cancel_futures=True)
    while not trees.empty():
        shutil.rmtree(trees.get().parent, ignore_errors=True)

    args.survivors.parent.mkdir(exist_ok=True)
    with args.survivors.open("w") as out:
        for m in survivors:
            if m.ident in uncovered:
                out.write("# (no test executes this line)\n")
            out.write(f"# {m.ident}\n# equivalent-list key: {equivalent_key(m)}\n"
                      f"{m.diff((REPO / PKG / m.module).read_text())}\n")
    print(f"\nmutation run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{time.monotonic() - started:.0f}s; survivors with diffs: {args.survivors}\n")
    print("| module | mutants | killed | timed out | survived | equivalent | score |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 100.0
    for module, r in results.items():
        live = r["killed"] + r["timed out"] + r["survived"]
        score = 100.0 * (r["killed"] + r["timed out"]) / live if live else 100.0
        ran, planned = live + r["equivalent"], sum(m.module == module for m, _ in work)
        worst = min(worst, score if ran == planned else 0.0)
        shown = f"{score:.1f} %" if ran else "not run"
        print(f"| {module} | {ran if ran == planned else f'{ran} of {planned} (interrupted)'} | {r['killed']} "
              f"| {r['timed out']} | {r['survived']} | {r['equivalent']} | {shown} |")
    stale = {k for k in known if k.split(":")[0] in chosen} - used_equivalent
    for key in sorted(stale):
        print(f"note: equivalent-list entry matched no surviving mutant: {key}")
    return 0 if worst >= 95.0 else 1


if __name__ == "__main__":
    sys.exit(main())
