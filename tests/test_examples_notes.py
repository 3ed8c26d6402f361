# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The worked example's unit tests: the notes handler with qubes_socksvc.testing, no daemon,
no root, no qrexec (what the README shows a service author)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qubes_socksvc import InputTooLarge
from qubes_socksvc.model import Service
from qubes_socksvc.testing import call_handler, check_manifest
from tests.conftest import REPO


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Service:
    """my.Notes as examples/notes.yaml declares it, its notes in a fresh directory."""
    monkeypatch.setenv("QUBES_SOCKSVC_NOTES_DIR", str(tmp_path))
    return check_manifest(str(REPO / "examples/notes.yaml")).services()["my.Notes"][1]


def notes(service: Service, action: str, body: object = None, *, source: str = "work") -> Any:
    """Call my.Notes+ACTION as qube ``source``, with the manifest's limits; the decoded reply."""
    data = b"" if body is None else json.dumps(body).encode()
    out = call_handler(service.handler, data, service=f"my.Notes+{action}", source=source,
                       max_input=service.max_input, timeout=service.timeout)
    assert out.endswith(b"\n")
    return json.loads(out)


def test_add_then_list(service: Service) -> None:
    assert notes(service, "add", {"text": "buy milk"}) == {"id": 1}
    assert notes(service, "add", {"text": "call Ann"}, source="personal") == {"id": 2}
    listed = notes(service, "list")["notes"]
    assert [(n["id"], n["text"], n["source"]) for n in listed] == [(1, "buy milk", "work"), (2, "call Ann", "personal")]


def test_only_the_qube_that_added_a_note_may_delete_it(service: Service) -> None:
    notes(service, "add", {"text": "mine"})
    assert notes(service, "delete", {"id": 1}, source="personal") == {
        "error": "note 1 was added by work; only that qube may delete it"}
    assert notes(service, "delete", {"id": 1}) == {"deleted": 1}
    assert notes(service, "list") == {"notes": []}
    assert notes(service, "delete", {"id": 1}) == {"error": "no note 1"}


@pytest.mark.parametrize(("action", "body", "error"), [
    ("add", {}, '"text" must be a string of 1 to 4096 characters'),
    ("add", {"text": ""}, '"text" must be a string'),
    ("add", {"text": 5}, '"text" must be a string'),
    ("add", {"text": "x" * 4097}, '"text" must be a string'),
    ("add", {"text": "\x1b[31mred"}, "control characters"),
    ("add", {"text": "a", "extra": 1}, "unknown keys extra; expected text"),
    ("add", [1, 2], "not a JSON object"),
    ("delete", {"id": "1"}, '"id" must be an integer'),
    ("delete", {"id": True}, '"id" must be an integer'),
    ("list", {"all": True}, "unknown keys all; expected none"),
])
def test_invalid_requests_get_an_error_reply(service: Service, action: str, body: object, error: str) -> None:
    assert error in notes(service, action, body)["error"]


def test_input_that_is_not_json(service: Service) -> None:
    for data in (b"{", b"\xff", b"[" * 10000):
        out = call_handler(service.handler, data, service="my.Notes+add", max_input=service.max_input)
        assert json.loads(out) == {"error": "the input is not JSON"}


def test_the_argument_picks_the_action(service: Service) -> None:
    """qrexec appends '+' to calls through dom0 (my.Notes -> my.Notes+): no action, an error reply."""
    for called in ("my.Notes", "my.Notes+", "my.Notes+drop"):
        reply = json.loads(call_handler(service.handler, service=called))
        assert reply["error"].startswith(f"unknown action '{called}'; call my.Notes+add, my.Notes+list")


def test_max_input_from_the_manifest_cuts_off_large_requests(service: Service) -> None:
    assert service.max_input == 16384
    with pytest.raises(InputTooLarge):
        notes(service, "add", {"text": "x" * service.max_input})


def test_the_notes_file_is_replaced_whole(service: Service, tmp_path: Path) -> None:
    notes(service, "add", {"text": "one"})
    notes(service, "add", {"text": "two"})
    assert [n["text"] for n in json.loads((tmp_path / "notes.json").read_text())] == ["one", "two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]  # no temporary left behind


def test_the_manifest_asks_for_wait_for_session(service: Service) -> None:
    assert service.rpc_config().options() == {"wait-for-session": True}


def test_the_number_of_notes_is_bounded(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    from qubes_socksvc import examples_notes

    monkeypatch.setattr(examples_notes, "MAX_NOTES", 2)
    notes(service, "add", {"text": "one"})
    notes(service, "add", {"text": "two"})
    assert notes(service, "add", {"text": "three"}) == {"error": "the notes are full (2); delete some first"}
