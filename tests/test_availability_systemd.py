# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""No permanent outage, under a real ``systemd --user`` manager (tests/usermanager.py).

The units are the ones ``render`` writes, with this checkout's interpreter and package (a
drop-in sets PYTHONPATH), installed in the test user's ``~/.config/systemd/user``.  What is
checked is systemd's own bookkeeping: a socket unit whose service hits its start limit fails
for good with ``service-start-limit-hit`` (systemd.unit(5), StartLimitIntervalSec=;
src/core/socket.c: socket_trigger_notify), one whose own trigger limit is hit fails with
``trigger-limit-hit`` (systemd.socket(5), TriggerLimitIntervalSec=); either way its socket
file is removed (RemoveOnStop=yes) and every later call gets nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_socksvc import manifest, model, render
from qubes_socksvc.layout import File, Layout
from tests.conftest import REPO, TESTS, world_dir
from tests.usermanager import Unavailable, UserManager, qubes_vm_user

pytestmark = pytest.mark.slow

USER = "socksvc-avail"


class Units:
    """One daemon's units under a user manager; ``call()`` connects as the qrexec agent does."""

    def __init__(self, um: UserManager, text: str, name: str) -> None:
        self.um, self.name = um, name
        self.dir = world_dir("socksvc-avail-")
        path = self.dir / "manifest.yaml"
        path.write_text(text)
        parsed = manifest.parse(text, str(path))
        self.daemon = parsed.daemons[name]
        unit_dir = Path(um.home, ".config/systemd/user")
        layout = Layout(unit_dir=str(unit_dir), rpc_dir=str(self.dir), rpc_config_dir=str(self.dir),
                        state_file=str(self.dir / "owned.json"), spec_dir=str(self.dir))
        self.paths: list[Path] = []
        for artifact in render.render(parsed, layout, exec_start=[sys.executable, "-P", "-m", "qubes_socksvc"]):
            if not isinstance(artifact, File) or not artifact.path.startswith((str(unit_dir), str(self.dir))):
                continue  # qubes-rpc links: the test connects to the socket itself
            target = Path(artifact.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(artifact.content)
            target.chmod(0o644)
            self.paths.append(target)
        dropin = unit_dir / f"{self.daemon.unit}.service.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "checkout.conf").write_text(f"[Service]\nEnvironment=PYTHONPATH={REPO}:{TESTS}\n")
        self.paths.append(dropin / "checkout.conf")
        self.paths.append(dropin)
        for path in (unit_dir, *unit_dir.parents):
            if path == Path(um.home):
                break
            os.chown(path, um.uid, um.gid)
        um.systemctl("daemon-reload")
        um.systemctl("start", f"{self.daemon.unit}.socket")
        self.socket = self.daemon.socket

    def show(self, kind: str, prop: str) -> str:
        return self.um.show(f"{self.daemon.unit}.{kind}", prop)

    def call(self, payload: bytes, timeout: float = 30) -> bytes:
        """Connect, send, half-close, read to EOF; b"" when the connection is refused or cut."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(self.socket)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while data := sock.recv(65536):
                    chunks.append(data)
            except (FileNotFoundError, ConnectionError):
                return b""
            return b"".join(chunks)

    def remove(self) -> None:
        with contextlib.suppress(AssertionError):
            self.um.systemctl("stop", f"{self.daemon.unit}.socket", f"{self.daemon.unit}.service", check=False)
        for path in self.paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def um(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserManager]:
    try:
        with qubes_vm_user(USER):
            manager = UserManager(USER, tmp_path_factory.mktemp("usermanager") / f"{USER}.log")
            manager.start()
            try:
                yield manager
            finally:
                manager.stop()
    except Unavailable as e:
        pytest.skip(f"no systemd user manager here: {e}")


def daemon_text(name: str, idle_exit: float) -> str:
    return f"""\
version: 1
daemons:
  {name}:
    idle_exit: {idle_exit}
    services:
      av.Echo:
        handler: qubes_socksvc.examples:echo
      av.Crash:
        handler: fatal_handlers:crash
"""


@pytest.fixture
def units(um: UserManager, request: pytest.FixtureRequest) -> Iterator[Units]:
    name = f"av{secrets.token_hex(4)}"  # unique per run: units, socket, cgroup
    idle_exit = getattr(request, "param", 300)
    made = Units(um, daemon_text(name, idle_exit), name)
    try:
        yield made
    finally:
        made.remove()


#: More crashes than systemd's default start limit allows (DefaultStartLimitBurst=5 per 10 s,
#: systemd-system.conf(5)), and than the socket's default trigger limit (20 per 2 s for
#: Accept=no, systemd.socket(5)).
CRASHES = 40


def test_crashing_calls_never_fail_the_socket(units: Units) -> None:
    """N calls whose handler ends the daemon's process (os._exit), as fast as a caller can make
    them: each is logged once by systemd (the unit's Result and exit status), the socket stays
    listening, and an honest call right after is served."""
    started = time.monotonic()
    for i in range(CRASHES):  # back to back: as fast as the daemon can start and crash
        assert units.call(b"av.Crash+ work\0") == b"", f"crash {i}"
    elapsed = time.monotonic() - started
    state = units.show("socket", "ActiveState")
    assert state == "active", (f"after {CRASHES} crashes in {elapsed:.1f}s the socket is {state} "
                               f"({units.show('socket', 'Result')}): a permanent outage")
    # The last crash, as systemd records (and logs) it: the service failed with the handler's status.
    deadline = time.monotonic() + 10
    while units.show("service", "ActiveState") != "failed":
        assert time.monotonic() < deadline, units.show("service", "ActiveState")
        time.sleep(0.02)
    assert units.show("service", "Result") == "exit-code"
    assert units.show("service", "ExecMainStatus") == "7"  # os._exit(7): the cause
    assert units.call(b"av.Echo+ work\0honest") == b"honest"
    assert units.show("socket", "ActiveState") == "active"
    print(f"{CRASHES} crashing calls in {elapsed:.2f}s")  # -s shows the rate the limits must allow


@pytest.mark.parametrize("units", [model.MIN_IDLE_EXIT], indirect=True)
def test_steady_calls_with_the_shortest_idle_exit(units: Units) -> None:
    """With the shortest idle_exit the manifest accepts, a call just after each idle exit starts
    the daemon again, for longer than systemd's start-limit interval: every call is served."""
    deadline = time.monotonic() + 12  # past DefaultStartLimitIntervalSec=10s
    starts = 0
    while time.monotonic() < deadline:
        assert units.call(b"av.Echo+ work\0steady") == b"steady", f"call {starts + 1}"
        wait_until = time.monotonic() + 20
        while units.show("service", "ActiveState") != "inactive":  # idled out: the next call starts it
            assert time.monotonic() < wait_until, "the daemon did not idle out"
            time.sleep(0.02)
        starts += 1
        assert units.show("socket", "ActiveState") == "active", units.show("socket", "Result")
    assert starts > 5, starts  # more starts than systemd's default burst (5) allows in 10 s
