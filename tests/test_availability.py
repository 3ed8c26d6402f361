# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A daemon that a handler kills says why, and what the manifest accepts keeps the daemon startable.

Under a real user manager: tests/test_availability_systemd.py.
"""

from __future__ import annotations

import shutil

import pytest

from qubes_socksvc import manifest, model
from tests.conftest import apply, world_dir
from tests.test_spec import SpecDaemon

CRASHING = """\
version: 1
daemons:
  c:
    idle_exit: 0
    services:
      c.Segfault:
        handler: fatal_handlers:segfault
"""


def test_a_crashing_c_extension_leaves_its_cause_in_the_log() -> None:
    """SIGSEGV in a handler (a C extension's crash) ends the daemon; its log (the journal, under
    systemd) names the handler that was running: faulthandler's stack of every thread."""
    root = world_dir("socksvc-avail-")
    path = root / "manifest.yaml"
    path.write_text(CRASHING)
    apply(path, root, check=True)
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/c.json", world_dir("socksvc-avail-bind-"), "c")
    try:
        assert daemon.call(b"c.Segfault+ work\0") == b""
        assert daemon.proc.wait(timeout=30) < 0  # killed by the signal
        log = daemon.log.read_text()
        assert log.count("Fatal Python error: Segmentation fault") == 1, log
        assert "fatal_handlers.py\", line" in log and "in segfault" in log, log
        assert "Current thread 0x" in log, log  # every thread's stack (all_threads), the crashing one named
        assert "call c.Segfault+ from work" in log  # the call it served, logged before
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(daemon.bind_dir, ignore_errors=True)


@pytest.mark.parametrize("idle_exit, accepted", [
    (0, True), (model.MIN_IDLE_EXIT, True), (300, True), (0.5, False), (0.001, False), (-1, False),
])
def test_idle_exit_is_never_or_at_least_the_minimum(idle_exit: float, accepted: bool) -> None:
    """0 (never) or at least model.MIN_IDLE_EXIT: a daemon that idles out sooner would be started
    again for nearly every call (templates/socket.j2: TriggerLimitBurst=)."""
    text = f"version: 1\ndaemons:\n  d:\n    idle_exit: {idle_exit}\n    services:\n      d.X:\n        handler: a:b\n"
    if accepted:
        assert manifest.parse(text, "/m.yaml").daemons["d"].idle_exit == idle_exit
        return
    with pytest.raises(manifest.ManifestError) as e:
        manifest.parse(text, "/m.yaml")
    expected = f"must be 0 (never exit) or at least {model.MIN_IDLE_EXIT} seconds"
    assert f"/m.yaml:4:16: daemons.d.idle_exit: {expected}" in str(e.value)
