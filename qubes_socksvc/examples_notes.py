# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The worked example of the README: a notes qube, both ends.

Service side (in the ``notes`` qube, declared in ``examples/notes.yaml``): one
handler for ``my.Notes+add``, ``my.Notes+list`` and ``my.Notes+delete``; the
qrexec argument picks the action, so dom0's policy can allow each action to
different qubes.  A request is one JSON object on stdin, the reply one JSON
object on stdout (``{"error": ...}`` on failure: a socket service has no exit
code).  Notes are shared; each records the qube that added it, and only that
qube may delete it.

Caller side (in any qube the policy allows): :func:`add`, :func:`list_notes`
and :func:`delete` over :mod:`qubes_socksvc.client`, and a command line::

    python3 -m qubes_socksvc.examples_notes --target notes add "buy milk"
    python3 -m qubes_socksvc.examples_notes --target notes list
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from .request import Request

SERVICE = "my.Notes"
#: At most this many characters per note, and this many notes: the qube's disk is not the callers'.
MAX_TEXT = 4096
MAX_NOTES = 1000


class Note(TypedDict):
    id: int
    text: str
    source: str
    """The qube that added the note, as qrexec named it."""
    created: str


class NotesError(Exception):
    """The notes service refused a request; the message is its ``error``."""


# --- service side -----------------------------------------------------------------


async def handle(request: Request) -> str:
    """``my.Notes+ACTION``: one JSON object in, one JSON object (and a newline) out."""
    action = _ACTIONS.get(request.argument or "")
    if action is None:
        return _reply({"error": f"unknown action {request.service!r}; call {SERVICE}+"
                                + f", {SERVICE}+".join(_ACTIONS)})
    if request.source is None:
        return _reply({"error": "my.Notes needs the service descriptor (the calling qube's name)"})
    untrusted_input = await request.read()  # bounded by the manifest's max_input
    # --- sanitize start ---
    try:
        untrusted_body = json.loads(untrusted_input or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return _reply({"error": "the input is not JSON"})
    if not isinstance(untrusted_body, dict):
        return _reply({"error": "the input is not a JSON object"})
    # --- sanitize end (each action validates its own fields) ---
    try:
        # No await from here on: the read-modify-write below is atomic within the daemon.
        return _reply(action(request.source, untrusted_body))
    except NotesError as e:
        return _reply({"error": str(e)})


def _add(source: str, untrusted_body: dict[str, Any]) -> dict[str, Any]:
    _no_other_keys(untrusted_body, {"text"})
    untrusted_text = untrusted_body.get("text")
    if not isinstance(untrusted_text, str) or not 0 < len(untrusted_text) <= MAX_TEXT:
        raise NotesError(f'"text" must be a string of 1 to {MAX_TEXT} characters')
    if not all(c.isprintable() or c in "\n\t" for c in untrusted_text):
        raise NotesError('"text" may not contain control characters')
    text = untrusted_text
    notes = _load()
    if len(notes) >= MAX_NOTES:
        raise NotesError(f"the notes are full ({MAX_NOTES}); delete some first")
    note = Note(id=max((n["id"] for n in notes), default=0) + 1, text=text, source=source,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _save([*notes, note])
    return {"id": note["id"]}


def _list(source: str, untrusted_body: dict[str, Any]) -> dict[str, Any]:
    _no_other_keys(untrusted_body, set())
    return {"notes": _load()}


def _delete(source: str, untrusted_body: dict[str, Any]) -> dict[str, Any]:
    _no_other_keys(untrusted_body, {"id"})
    untrusted_id = untrusted_body.get("id")
    if not isinstance(untrusted_id, int) or isinstance(untrusted_id, bool):
        raise NotesError('"id" must be an integer')
    note_id = untrusted_id
    notes = _load()
    note = next((n for n in notes if n["id"] == note_id), None)
    if note is None:
        raise NotesError(f"no note {note_id}")
    if note["source"] != source:
        raise NotesError(f"note {note_id} was added by {note['source']}; only that qube may delete it")
    _save([n for n in notes if n["id"] != note_id])
    return {"deleted": note_id}


_ACTIONS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    "add": _add, "list": _list, "delete": _delete,
}


def _no_other_keys(untrusted_body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(untrusted_body) - allowed)
    if unknown:
        raise NotesError(f"unknown keys {', '.join(unknown)}; expected {', '.join(sorted(allowed)) or 'none'}")


def _reply(body: dict[str, Any]) -> str:
    return json.dumps(body) + "\n"


def notes_file() -> Path:
    """``$QUBES_SOCKSVC_NOTES_DIR/notes.json``, by default in the user's data directory."""
    base = os.environ.get("QUBES_SOCKSVC_NOTES_DIR") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "qubes-socksvc-notes")
    return Path(base) / "notes.json"


def _load() -> list[Note]:
    try:
        notes: list[Note] = json.loads(notes_file().read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return notes


def _save(notes: list[Note]) -> None:
    """Write the whole file anew and rename it over the old one: a crash leaves one or the other."""
    path = notes_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(notes, indent=1) + "\n", encoding="utf-8")
    os.replace(temp, path)


# --- caller side ------------------------------------------------------------------


def add(target: str, text: str) -> int:
    """Add a note in ``target``'s notes; returns its id."""
    reply = _call(target, "add", {"text": text})
    return int(reply["id"])


def list_notes(target: str) -> list[Note]:
    """Every note in ``target``."""
    notes: list[Note] = _call(target, "list", {})["notes"]
    return notes


def delete(target: str, note_id: int) -> None:
    """Delete one of this qube's notes in ``target``."""
    _call(target, "delete", {"id": note_id})


def _call(target: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
    from . import client  # here: the service side never needs it

    output = client.call(target, f"{SERVICE}+{action}", json.dumps(body).encode(), timeout=30)
    try:
        reply: dict[str, Any] = json.loads(output)
    except ValueError as e:
        raise NotesError(f"{target} answered {SERVICE}+{action} with something other than JSON") from e
    if "error" in reply:
        raise NotesError(f"{target}: {reply['error']}")
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m qubes_socksvc.examples_notes",
                                     description=f"call the {SERVICE} service of a notes qube")
    parser.add_argument("--target", default="notes", help="the notes qube (default: notes)")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("add", help="add a note").add_argument("text")
    actions.add_parser("list", help="list the notes")
    actions.add_parser("delete", help="delete one of this qube's notes").add_argument("id", type=int)
    args = parser.parse_args(argv)
    from .client import QrexecError

    try:
        if args.action == "add":
            print(f"added note {add(args.target, args.text)}")
        elif args.action == "list":
            for note in list_notes(args.target):
                print(f"{note['id']:>4}  {note['created']}  {note['source']:<12}  {note['text']}")
        else:
            delete(args.target, args.id)
            print(f"deleted note {args.id}")
    except (NotesError, QrexecError) as e:
        print(f"notes: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, QrexecError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
