# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Run by systemd (JOURNAL_STREAM set), each call is logged to the journal with its fields.

journald itself does not run on this machine, so the handler's sender is replaced
by a recorder: what is checked is what the daemon hands to python-systemd.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from qubes_socksvc import cli, server


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    pytest.importorskip("systemd.journal")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    cli._setup_logging("mydaemon")
    sent: list[dict[str, Any]] = []
    handler = root.handlers[0]
    handler.send = lambda MESSAGE, **fields: sent.append({"MESSAGE": MESSAGE, **fields})  # type: ignore[attr-defined]
    yield sent
    root.handlers, root.level = saved[0], saved[1]


def test_call_lines_carry_service_source_and_target_fields(journal: list[dict[str, Any]]) -> None:
    fields = {"SERVICE": "my.Service+arg", "SOURCE": "work", "TARGET": "dom0", "TARGET_TYPE": "name"}
    server._log_info("call %s from %s%s", "my.Service+arg", "work", " to name dom0", extra=fields)
    assert len(journal) == 1
    entry = journal[0]
    assert entry["MESSAGE"] == "call my.Service+arg from work to name dom0"
    assert {k: entry[k] for k in fields} == fields
    assert entry["SYSLOG_IDENTIFIER"] == "qubes-socksvc" and entry["DAEMON"] == "mydaemon"
    assert entry["PRIORITY"] == str(6)  # LOG_INFO
    assert entry["CODE_FUNC"] == "test_call_lines_carry_service_source_and_target_fields"


def test_handler_tracebacks_reach_the_journal(journal: list[dict[str, Any]]) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        server.log.exception("call %s: handler %s raised", "my.Service", "m:f", extra={"SERVICE": "my.Service"})
    entry = journal[0]
    assert entry["SERVICE"] == "my.Service" and entry["PRIORITY"] == str(3)
    assert "RuntimeError: boom" in entry["MESSAGE"]
