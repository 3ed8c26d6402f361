# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The man pages ``make man`` builds: qubes-socksvc(1) from the argparse parser, qubes-socksvc.yaml(5) from man/.

Every verb, alias, argument and option of ``build_parser()`` and every manifest
key must appear in them; they must be valid man pages (``man --warnings``, as
lintian runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from qubes_socksvc import manifest
from qubes_socksvc.cli import build_parser
from tests.conftest import REPO

pytest.importorskip("docutils", reason="python3-docutils builds the man pages ('make setup-test' installs it)")

#: The manifest's top-level keys (manifest.py checks them in code, not in a table).
TOP_LEVEL_KEYS = ("version", "daemons")


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
    return text.replace("\\-", "-").replace("\\(aq", "'").replace("\\e", "\\")


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
    text = roff_text(pages["5"])
    keys = {*TOP_LEVEL_KEYS, "services", *manifest.DAEMON_FIELDS, *manifest.SERVICE_FIELDS}
    # each key as a term of its own: a bold line ".B key" or "key (type, ...)"
    missing = sorted(k for k in keys if not re.search(rf"^(?:\.B )?{re.escape(k)} \(", text, re.M))
    assert not missing, f"manifest keys not documented in man/qubes-socksvc.yaml.5.rst: {missing}"


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
