# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The man pages ``make man`` builds: qubes-socksvc(1) from the argparse parser, qubes-socksvc.yaml(5) from man/.

Every verb, alias, argument and option of ``build_parser()`` and every manifest
key must appear in them; they must be valid man pages (``man --warnings``, as
lintian runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qubes_socksvc import manifest, model
from qubes_socksvc.cli import build_parser
from tests.conftest import REPO

pytest.importorskip("docutils", reason="python3-docutils builds the man pages ('make setup-test' installs it)")

#: The manifest's top-level keys (manifest.py checks them in code, not in a table), with their types.
TOP_LEVEL_KEYS = {"version": "integer", "daemons": "mapping", "forwards": "mapping"}
#: How the page names the manifest reader's field kinds; a "node" is a mapping or a list of callers.
KIND_WORDS = {"str": ("string",), "bool": ("boolean",), "int": ("integer",), "number": ("number",),
              "node": ("mapping", "a caller or a list of callers")}


def load_mkman() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkman", REPO / "man/mkman.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mkman = load_mkman()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built the way the packages build them: ``python3 man/mkman.py OUTDIR``."""
    out = tmp_path_factory.mktemp("man")
    subprocess.run([sys.executable, str(REPO / "man/mkman.py"), str(out)], check=True, timeout=120)
    return {"1": out / "qubes-socksvc.1", "5": out / "qubes-socksvc.yaml.5"}


def roff_text(path: Path) -> str:
    """The page's words, without roff's escapes and font changes."""
    text = path.read_text()
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\%", "", text)
    return text.replace("\\-", "-").replace("\\(aq", "'").replace("\\(dq", '"').replace("\\e", "\\")


def sections(text: str) -> dict[str, str]:
    """The page's text by ``.SH`` section title."""
    found = re.findall(r"^\.SH (.*)\n((?:(?!^\.SH ).*\n)*)", text, re.M)
    return {title.strip().strip('"'): body for title, body in found}


def terms(section: str) -> dict[str, str]:
    """Each definition-list term of a section: key -> what the parentheses after it say."""
    return dict(re.findall(r"^(?:\.B )?(\w+) \(([^)\n]*)\)", section, re.M))


def kind(field: Any) -> str:
    """The reader's kind of a field (manifest._Field.kind: a type, None for a node read apart)."""
    return {str: "str", bool: "bool", int: "int", float: "number", None: "node"}[field.kind]


def shown(default: object) -> str:
    """A default as the page writes it."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def cli_words(parser: argparse.ArgumentParser) -> set[str]:
    """Every verb (and alias), every option string and every positional argument's metavar."""
    words: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words.add(name)
                words |= cli_words(sub)
        elif isinstance(action, argparse._HelpAction):
            continue
        elif action.option_strings:
            words.update(action.option_strings)
        else:
            words.add(action.metavar if isinstance(action.metavar, str) else action.dest)
    return words


def test_every_verb_and_option_is_in_qubes_socksvc_1(pages: dict[str, Path]) -> None:
    text = roff_text(pages["1"])
    words = cli_words(build_parser())
    assert {"check", "apply", "list", "status", "call", "serve", "--config", "--dry-run"} <= words  # the walk works
    missing = sorted(w for w in words if not re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text))
    assert not missing, f"not in qubes-socksvc(1): {missing}"


def test_every_manifest_key_is_in_qubes_socksvc_yaml_5(pages: dict[str, Path]) -> None:
    """Every key the reader accepts is a term ``key (type, ...)`` of its own section, with the reader's type."""
    page = sections(roff_text(pages["5"]))
    tables = {"DAEMON KEYS": manifest.DAEMON_FIELDS, "SERVICE KEYS": manifest.SERVICE_FIELDS,
              "FORWARD KEYS": manifest.FORWARD_FIELDS, "POLICY ENTRY": manifest.POLICY_FIELDS}
    expected: dict[tuple[str, str], tuple[str, ...]] = {
        ("TOP-LEVEL KEYS", key): (word,) for key, word in TOP_LEVEL_KEYS.items()}
    expected[("DAEMON KEYS", "services")] = ("mapping",)
    for title, fields in tables.items():
        assert fields, title  # the walk works
        expected |= {(title, key): KIND_WORDS[kind(field)] for key, field in fields.items()}
    problems = []
    for (title, key), words in sorted(expected.items()):
        said = terms(page.get(title, "")).get(key)
        if said is None:
            problems.append(f"{title}: {key} has no term")
        elif not said.startswith(words):
            problems.append(f"{title}: {key} ({said}): expected the type {' or '.join(words)}")
    assert not problems, f"man/qubes-socksvc.yaml.5.rst disagrees with the manifest reader: {problems}"


def test_the_page_states_the_runtime_models_defaults(pages: dict[str, Path]) -> None:
    """The manifest's only reference says the defaults the daemon really uses (model.Daemon, model.Service)."""
    page = sections(roff_text(pages["5"]))
    checked = 0
    for title, cls in (("DAEMON KEYS", model.Daemon), ("SERVICE KEYS", model.Service)):
        said = terms(page[title])
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING or f.default is None or f.name not in said:
                continue  # required, derived from the name, or not a manifest key
            assert re.search(rf"\bdefault \"?{re.escape(shown(f.default))}\"?$", said[f.name]), \
                f"{title}: {f.name} ({said[f.name]}): the model's default is {shown(f.default)}"
            checked += 1
    assert checked >= 10, checked  # the walk works


def test_the_cli_page_follows_the_parser() -> None:
    """A verb or option added to the parser appears in the page without touching man/."""
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = verbs.add_parser("frobnicate", help="a verb added later", aliases=["frob"])
    sub.add_argument("--widget-count", type=int, metavar="N", help="how many widgets (%(default)s)", default=3)
    sub.add_argument("target", metavar="TARGET", nargs="?")
    page = mkman.sources(parser)["qubes-socksvc.1"]
    assert "frobnicate, frob\n" in page and "a verb added later" in page
    assert "**--widget-count** *N*" in page and "how many widgets (3)" in page
    assert "[*TARGET*]" in page
    mkman.to_man(page, "qubes-socksvc.1")  # still valid reStructuredText


def test_help_text_is_escaped_for_restructuredtext() -> None:
    assert mkman.escape("a *b* `c` d_ |e|") == r"a \*b\* \`c\` d\_ \|e\|"
    assert mkman.escape("- not a list") == r"\- not a list"
    assert mkman.escape("1. not a list") == r"\1. not a list"


def test_pages_are_valid_man_pages(pages: dict[str, Path]) -> None:
    for section, path in pages.items():
        text = path.read_text()
        assert re.search(rf'^\.TH "{re.escape(path.stem.upper())}" "?{section}"?', text, re.M), text[:400]
        version = (REPO / "version").read_text().strip()
        assert f'"{version}"' in text.split("\n.TH", 1)[1].splitlines()[0]
    if shutil.which("man") is None:
        pytest.skip("man not installed: cannot check the pages with man --warnings")
    for path in pages.values():
        result = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
                                capture_output=True, text=True, env={"LC_ALL": "C.UTF-8", "MANROFFSEQ": "",
                                                                     "MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0 and not result.stderr, f"{path.name}: {result.stderr}"
