# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""tools/mutate.py itself: the mutants each operator makes, and the bookkeeping of its table.

A mutation score is only worth what the tool counts: these check the operators issue 25 asks for
on a module written here, and that an equivalent is excused only by its exact line and text,
never on a line no test runs, and that an untestable mutant stays in the denominator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutate_tool", REPO / "tools/mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutate = _load_tool()

SAMPLE = '''\
"""A module to mutate."""
import re

PATTERN = re.compile(r"[a-z]+\\Z")
LIMIT = 16


def f(data, n):
    total = 0
    total += n
    n = n - 1
    if data:
        return g(data, limit=n, other=LIMIT)
    while n > 0:
        n -= 1
        if n == 3:
            continue
    flags = 1 | 2
    print(total, flags)
    raise ValueError(n)


def g(data, limit=0, other=None):
    return data, limit, other
'''


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[int, set[str]]:
    """line -> the mutated lines (stripped) of SAMPLE, as the tool makes them."""
    root = tmp_path_factory.mktemp("root")
    (root / mutate.PKG).mkdir()
    (root / mutate.PKG / "sample.py").write_text(SAMPLE)
    found: dict[int, set[str]] = {}
    for m in mutate.mutants("sample.py", root):
        assert m.key == f"sample.py:{m.line}: {m.old.strip()} => {m.new.strip()}"
        assert m.kind in mutate.OPERATORS
        found.setdefault(m.line, set()).add(m.new.strip())
    return found


def test_every_operator_issue_25_asks_for_makes_its_mutants(sample: dict[int, set[str]]) -> None:
    # regex: \Z -> $, and each of @ : / + let into the class
    assert sample[4] == {f"PATTERN = re.compile(({pattern!r}))" for pattern in (
        "[a-z]+$", "[@a-z]+\\Z", "[:a-z]+\\Z", "[/a-z]+\\Z", "[+a-z]+\\Z")}
    assert sample[5] == {"LIMIT = (17)", "LIMIT = (15)"}  # a limit +1 and -1
    assert sample[9] == {"total = (1)", "total = (-1)"}  # a name's first binding is not dropped (NameError)
    assert sample[10] == {"pass", "total -= n"}  # augmented: dropped and flipped
    assert {"pass", "n = (n + 1)"} <= sample[11]  # a name bound before (a parameter): dropped
    assert sample[12] == {"if (True):", "if (False):"}  # a condition forced both ways
    assert sample[13] == {"return (g(data, other=LIMIT))", "return (g(data, limit=0, other=LIMIT))",
                          "return (g(data, limit=n))", "return None"}  # kwargs: their default, 0 for a limit
    assert {"while (False):", "while (n >= 0):"} <= sample[14]
    assert "while (True):" not in sample[14]  # a hang, not a mutant
    assert {"pass", "n += 1"} <= sample[15]
    assert {"if (n != 3):", "if (False):"} <= sample[16]
    assert sample[17] == {"break"}
    assert {"flags = (1)", "flags = (2)"} <= sample[18]
    assert sample[19] == {"pass"} and sample[20] == {"pass"}  # a call dropped, a raise dropped
    assert 1 not in sample  # the docstring


def _tally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log: str, equivalent: str = "",
           untestable: str = "") -> tuple[int, str]:
    for name, text in (("EQUIVALENT", equivalent), ("UNTESTABLE", untestable)):
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        monkeypatch.setattr(mutate, name, path)
    (tmp_path / "log.txt").write_text(textwrap.dedent(log))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        worst = mutate.retally([tmp_path / "log.txt"])
    return worst, out.getvalue()


KEY = "m.py:7: if a: => if (False):"


def _row(table: str) -> list[str]:
    return [cell.strip() for cell in table.splitlines()[-1].strip("|").split("|")]


def test_an_equivalent_is_excused_by_its_line_and_text_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = f"killed     m.py:1: x => y  <- tests/test_a.py::t\nsurvived   {KEY}  <- ran 3 tests\n"
    _, out = _tally(tmp_path, monkeypatch, log, equivalent=f"{KEY} # a reason\n")
    assert _row(out) == ["m.py", "2", "1", "0", "0", "0", "1", "100.0 %"]
    # The same change listed on another line excuses nothing.
    _, out = _tally(tmp_path, monkeypatch, log, equivalent=f"{KEY.replace(':7:', ':8:')} # a reason\n")
    assert _row(out) == ["m.py", "2", "1", "0", "1", "0", "0", "50.0 %"]


def test_a_mutant_no_test_runs_is_a_survivor_even_when_listed(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    log = f"killed     m.py:1: x => y  <- tests/test_a.py::t\nsurvived   {KEY}  <- no test executes the line\n"
    worst, out = _tally(tmp_path, monkeypatch, log, equivalent=f"{KEY} # a reason\n")
    assert _row(out) == ["m.py", "2", "1", "0", "1", "0", "0", "50.0 %"] and worst == 1
    assert f"survived: {KEY}" in out


def test_an_untestable_mutant_stays_in_the_denominator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = "".join(f"killed     m.py:{i}: x => y  <- tests/test_a.py::t\n" for i in range(1, 20))
    log += f"survived   {KEY}  <- ran 3 tests\n"
    worst, out = _tally(tmp_path, monkeypatch, log, untestable=f"{KEY} # only a power cut tells\n")
    assert _row(out) == ["m.py", "20", "19", "0", "0", "1", "0", "95.0 %"] and worst == 0


def test_a_listed_entry_is_noted_only_when_this_run_could_have_used_it(tmp_path: Path) -> None:
    # An entry whose mutant ran and survived nothing is stale; under --again, an entry whose
    # mutant was not among the last run's survivors was simply not run: no "no such mutant".
    (tmp_path / mutate.PKG).mkdir()
    (tmp_path / mutate.PKG / "sample.py").write_text(SAMPLE)
    every = list(mutate.mutants("sample.py", tmp_path))
    ran, other = every[0], every[1]
    gone = "sample.py:99: x = 1 => x = 2"
    listed = [ran.key, other.key, gone]

    def notes(work: list[object], again: bool) -> list[str]:
        found: list[str] = mutate.unmatched_entries(listed, set(), ["sample.py"], work, again)
        return found

    assert set(notes(every, again=False)) == {f"note: listed entry matched no surviving mutant: {ran.key}",
                                              f"note: listed entry matched no surviving mutant: {other.key}",
                                              f"note: listed entry matched no surviving mutant (no such "
                                              f"mutant): {gone}"}
    assert notes([ran], again=True) == [f"note: listed entry matched no surviving mutant: {ran.key}"]
    assert mutate.unmatched_entries(listed, {ran.key}, ["sample.py"], [ran], True) == []
    assert mutate.unmatched_entries(listed, set(), ["other.py"], every, False) == []


def test_a_limit_is_tried_against_the_tests_that_read_it(tmp_path: Path) -> None:
    # A test pinning a limit to the docs runs no line of its module: the lines using the limit
    # would never choose it.  A test naming it (through its module, or imported) is chosen first.
    (tmp_path / mutate.PKG).mkdir()
    (tmp_path / mutate.PKG / "sample.py").write_text(SAMPLE)
    (tmp_path / mutate.PKG / "other.py").write_text("LIMIT = 3\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_docs.py").write_text(textwrap.dedent("""\
        from qubes_socksvc import sample
        from qubes_socksvc.sample import PATTERN as P

        TABLE = [P]

        def test_limit():
            assert sample.LIMIT == 16

        class TestPattern:
            def test_pattern(self):
                assert P.match("a")

        def test_f():
            sample.f(b"", 0)
        """))
    reads = mutate.readers(tmp_path)
    assert reads[("sample.py", 5)] == {"tests/test_docs.py::test_limit"}  # not other.py's LIMIT
    assert reads[("sample.py", 4)] == {"tests/test_docs.py", "tests/test_docs.py::TestPattern::test_pattern"}
    assert ("other.py", 1) not in reads and ("sample.py", 8) not in reads  # a function: its own tests run it

    limit = next(m for m in mutate.mutants("sample.py", tmp_path) if m.line == 5)
    covered = mutate.CoverageMap(
        lines={("sample.py", 5): {"tests/test_docs.py::test_f", "tests/test_docs.py::test_limit"},
               ("sample.py", 13): {"tests/test_docs.py::test_f"}},
        seconds={"tests/test_docs.py::test_limit": 1.0, "tests/test_docs.py::test_f": 0.1}, failed=set(),
        uses=mutate.use_sites(tmp_path), reads=reads)
    assert covered.tests_for(limit)[0] == ("tests/test_docs.py::test_limit", "tests/test_docs.py::test_f")
    covered.reads = {}  # what the tool chose before: the uses alone
    assert covered.tests_for(limit)[0] == ("tests/test_docs.py::test_f",)


@pytest.mark.parametrize(("check", "verdict"), [("n == 16", "killed"), ("n > 0", "survived")])
def test_a_test_whose_parameters_name_the_mutated_limit_is_still_run(tmp_path: Path, check: str,
                                                                     verdict: str) -> None:
    # The node ids come from the unmutated run: test_limit[16].  Under LIMIT = 15 pytest finds no
    # such id and runs nothing; that is no kill, and the test is run with every parameter.
    (tmp_path / mutate.PKG).mkdir()
    (tmp_path / mutate.PKG / "__init__.py").write_text("")
    (tmp_path / mutate.PKG / "sample.py").write_text(SAMPLE.replace("LIMIT = 16", "LIMIT = 15"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_p.py").write_text(textwrap.dedent(f"""\
        import pytest
        from qubes_socksvc import sample

        @pytest.mark.parametrize("n", [sample.LIMIT])
        def test_limit(n):
            assert {check}
        """))
    result = mutate.run_tests(tmp_path, ("tests/test_p.py::test_limit[16]",), 60)
    assert result[0] == verdict
    assert result[1] == ("tests/test_p.py::test_limit[15]" if verdict == "killed" else "")


def test_the_test_that_killed_a_mutant_last_runs_first_on_a_fresh_clone(tmp_path: Path) -> None:
    # --save-killers keeps, by the mutant's change (lines move), the test that killed it in the
    # latest log naming it; a change the code no longer has is dropped.  tests_for runs that
    # test first, however slow, ahead of the killers of neighbouring lines.
    (tmp_path / mutate.PKG).mkdir()
    (tmp_path / mutate.PKG / "sample.py").write_text(SAMPLE)
    limit = next(m for m in mutate.mutants("sample.py", tmp_path) if m.line == 5)
    older, newer = tmp_path / "log-1.txt", tmp_path / "log-2.txt"
    older.write_text(f"killed     {limit.key}  <- tests/test_a.py::test_old [0.5s]\n"
                     "killed     sample.py:99: gone => (gone)  <- tests/test_a.py::test_gone [0.1s]\n")
    newer.write_text(f"killed     {limit.key.replace(':5:', ':6:')}  <- tests/test_b.py::test_slow [9.0s]\n"
                     f"survived   {limit.key}  <- ran 2 tests\n")
    record = tmp_path / "killers.txt"
    assert mutate.save_killers([older, newer], record, tmp_path, ["sample.py"]) == 0
    assert mutate.load_killers(record) == {limit.change_id: "tests/test_b.py::test_slow"}

    covered = mutate.CoverageMap(
        lines={("sample.py", 5): {"tests/test_a.py::test_fast", "tests/test_b.py::test_slow"}},
        seconds={"tests/test_a.py::test_fast": 0.1, "tests/test_b.py::test_slow": 9.0}, failed=set())
    covered.killed("sample.py", 5, "tests/test_a.py::test_fast")
    assert covered.tests_for(limit)[0][0] == "tests/test_a.py::test_fast"
    covered.recorded = mutate.load_killers(record)
    assert covered.tests_for(limit)[0] == ("tests/test_b.py::test_slow", "tests/test_a.py::test_fast")


def test_a_process_a_test_left_behind_is_killed_with_its_run(tmp_path: Path) -> None:
    # A daemon started in a session of its own survives a run killed at its timeout (killpg
    # reaches only pytest's group); spinning, it would slow every later mutant.  Whatever
    # still runs with the copy on its PYTHONPATH once the run ends is killed.
    tree = tmp_path / "tree"
    (tree / "tests").mkdir(parents=True)
    pid_file = tmp_path / "pid"
    (tree / "tests" / "test_spawn.py").write_text(textwrap.dedent(f"""\
        import subprocess, sys

        def test_spawn():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                     start_new_session=True)
            open({str(pid_file)!r}, "w").write(str(child.pid))
        """))
    assert mutate.run_tests(tree, ("tests/test_spawn.py",), 60) == ("survived", "")
    pid = int(pid_file.read_text())
    for _ in range(100):  # reaped by init once killed
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"process {pid} left running")
