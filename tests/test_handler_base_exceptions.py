# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A handler that raises what is no ``Exception`` (``GeneratorExit``, a ``BaseExceptionGroup``):
its own failure, logged as any handler's (cut, counted), never the daemon's internal error,
and the daemon keeps serving.  (SystemExit and KeyboardInterrupt: tests/test_server.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RunningDaemon

MANIFEST = """\
version: 1
daemons:
  b:
    idle_exit: 0
    services:
      b.GeneratorExit:
        handler: handlers:raises_generator_exit
      b.Group:
        handler: handlers:raises_base_group
      b.PlainGroup:
        handler: handlers:plain_raises_base_group
      b.Echo:
        handler: qubes_socksvc.examples:echo
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    running = RunningDaemon(MANIFEST, "b")
    yield running
    running.stop()


@pytest.mark.parametrize("service, raised", [
    ("b.GeneratorExit", "GeneratorExit: a handler's own GeneratorExit"),
    ("b.Group", "BaseExceptionGroup: a handler's group"),
    ("b.PlainGroup", "BaseExceptionGroup: a plain handler's group"),
])
def test_a_handler_raising_a_base_exception_fails_its_call_only(daemon: RunningDaemon, service: str,
                                                                 raised: str) -> None:
    before = daemon.log_text()
    assert daemon.call(f"{service}+{'x' * 200} work\0".encode(), timeout=10) == b""  # cut, not answered
    assert daemon.call(b"b.Echo work\0", b"still serving", timeout=10) == b"still serving"
    logged = daemon.log_text()[len(before):]
    assert f"call {service}+" in logged and "raised" in logged and raised in logged, logged
    assert "internal error" not in logged, logged
    # the message quotes the caller's argument 2000 times (400,000 characters): the log is cut
    assert max(len(line) for line in logged.splitlines()) < 5000, max(len(line) for line in logged.splitlines())
