# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Build the man pages: ``python3 man/mkman.py OUTDIR`` (``make man`` runs it).

- ``qubes-socksvc.1`` from ``man/qubes-socksvc.1.rst``, whose ``@SYNOPSIS@``,
  ``@DESCRIPTION@`` and ``@COMMANDS@`` are generated from the argparse parser
  itself (``qubes_socksvc.cli.build_parser``): every verb, alias, argument
  and option, with its help text, so the page cannot fall behind the CLI;
- ``qubes-socksvc.yaml.5`` from ``man/qubes-socksvc.yaml.5.rst`` as written.

Both go through docutils' man page writer (what ``rst2man`` runs); any
reStructuredText warning fails the build.  ``@VERSION@`` comes from the
top-level ``version`` file.  Imports nothing of the package but ``cli``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
PAGES = {"qubes-socksvc.1": HERE / "qubes-socksvc.1.rst", "qubes-socksvc.yaml.5": HERE / "qubes-socksvc.yaml.5.rst"}


def escape(text: str, inline: bool = False) -> str:
    """Plain text as reStructuredText: no inline markup, nor (unless ``inline``) a list or other block start."""
    text = re.sub(r"([\\`*_|<>\[\]])", r"\\\1", " ".join(text.split()))
    return "\\" + text if not inline and (text[:1] in "-+#" or re.match(r"\d+[.)] ", text)) else text


def metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if isinstance(action.metavar, tuple):
        return " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def arguments(action: argparse.Action) -> str:
    """The action's value(s) as argparse's usage shows them, in italics."""
    value = f"*{escape(metavar(action), inline=True)}*"
    if action.nargs == 0:
        return ""
    if action.nargs == argparse.OPTIONAL:
        return f"[{value}]"
    if action.nargs == argparse.ZERO_OR_MORE:
        return f"[{value} ...]"
    if action.nargs == argparse.ONE_OR_MORE:
        return f"{value} [{value} ...]"
    if isinstance(action.nargs, int):
        return " ".join([value] * action.nargs)
    return value


def documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.help != argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def usage(words: list[str], parser: argparse.ArgumentParser) -> str:
    """One synopsis line: the command words in bold, then each option and argument."""
    parts = [" ".join(f"**{escape(w, inline=True)}**" for w in words)]
    for action in documented(parser):
        if not action.option_strings:
            parts.append(arguments(action))
            continue
        item = " ".join(filter(None, [f"**{escape(action.option_strings[0], inline=True)}**", arguments(action)]))
        parts.append(item if action.required else f"[{item}]")
    return " ".join(parts)


def help_text(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        params = {**vars(action), "prog": prog}
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        text = text % params
    if action.choices is not None and not action.help:
        text = "one of " + ", ".join(str(c) for c in action.choices)
    return escape(text) if text else "(no description)"


def options(parser: argparse.ArgumentParser) -> list[str]:
    """A definition list: each argument and option with its help."""
    lines: list[str] = []
    for action in documented(parser):
        if not action.option_strings:
            if not action.help:
                continue  # shown in the synopsis; nothing more to say
            term = arguments(action)
        else:
            value = arguments(action)
            term = ", ".join(" ".join(filter(None, [f"**{escape(o, inline=True)}**", value]))
                             for o in action.option_strings)
        lines += [term, f"    {help_text(action, parser.prog)}", ""]
    return lines


def verbs(parser: argparse.ArgumentParser) -> list[tuple[str, list[str], str, argparse.ArgumentParser]]:
    """(name, aliases, help, parser) for each verb, in the parser's order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                aliases = [n for n, p in action.choices.items() if p is sub and n != choice.dest]
                found.append((choice.dest, aliases, choice.help or "", sub))
    return found


def cli_sections(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The generated parts of qubes-socksvc(1): @SYNOPSIS@, @DESCRIPTION@, @COMMANDS@."""
    prog = parser.prog
    synopsis = [usage([prog, name], sub) for name, _, _, sub in verbs(parser)]
    synopsis.append(f"**{escape(prog, inline=True)}** **-h** \\| **--help**")
    commands: list[str] = []
    top = options(parser)
    if top:
        commands += ["Options of every command", "-" * 24, "", *top]
    for name, aliases, help_, sub in verbs(parser):
        title = ", ".join([name, *aliases])
        commands += [title, "-" * len(title), "", usage([prog, name], sub), "", escape(help_ or sub.description or ""),
                     ""]
        if aliases:
            commands += [f"Also called {', '.join(f'**{escape(a, inline=True)}**' for a in aliases)}.", ""]
        commands += options(sub)
    return {"@SYNOPSIS@": "\n\n".join(synopsis), "@DESCRIPTION@": escape(parser.description or ""),
            "@COMMANDS@": "\n".join(commands)}


def render(source: str, replacements: dict[str, str]) -> str:
    for key, value in replacements.items():
        source = source.replace(key, value)
    if leftover := re.findall(r"@[A-Z]+@", source):
        raise SystemExit(f"mkman: unreplaced placeholders {leftover}")
    return source


def to_man(rst: str, name: str) -> bytes:
    from docutils.core import publish_string  # type: ignore[import-untyped,unused-ignore]

    settings = {"report_level": 2, "halt_level": 2, "input_encoding": "unicode", "output_encoding": "utf-8"}
    try:
        result: bytes = publish_string(rst, source_path=name, writer_name="manpage", settings_overrides=settings)
    except Exception as e:  # docutils' SystemMessage: the reST problem, with its line
        raise SystemExit(f"mkman: {name}: {e}") from e
    return result


def sources(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Each page's reStructuredText, placeholders filled (the test reads these)."""
    if parser is None:
        sys.path.insert(0, str(TOP))
        from qubes_socksvc.cli import build_parser

        parser = build_parser()
    common = {"@VERSION@": (TOP / "version").read_text().strip()}
    return {"qubes-socksvc.1": render(PAGES["qubes-socksvc.1"].read_text(), {**common, **cli_sections(parser)}),
            "qubes-socksvc.yaml.5": render(PAGES["qubes-socksvc.yaml.5"].read_text(), common)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: mkman.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, rst in sources().items():
        (out / name).write_bytes(to_man(rst, str(PAGES[name])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
