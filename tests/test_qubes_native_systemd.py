# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``qubes_service`` and ``enable`` under a real ``systemd --user`` manager (tests/usermanager.py).

What apply writes (units, the ``sockets.target.wants`` link) goes to the test user's
``~/.config/systemd/user`` through the real plan and execute; a manager started afterwards
is what a qube's user session is.  ``/run/qubes-service/NAME`` is what the qube's
``qubes-sysinit.sh`` creates when dom0 turned the qvm-service on (a unique NAME per run).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_socksvc import install, manifest, model, render
from qubes_socksvc.layout import Layout
from tests.conftest import REPO, TESTS, raw_call, world_dir
from tests.usermanager import Unavailable, UserManager, qubes_vm_user

pytestmark = pytest.mark.slow

USER = "socksvc-native"


class Template:
    """One daemon applied for the test user, as apply would for the template."""

    def __init__(self, user: str, name: str, qubes_service: str | None) -> None:
        pw = pwd.getpwnam(user)
        self.name = name
        self.dir = world_dir("socksvc-native-")
        self.unit_dir = Path(pw.pw_dir, ".config/systemd/user")
        self.layout = Layout(unit_dir=str(self.unit_dir), rpc_dir=str(self.dir / "rpc"),
                             rpc_config_dir=str(self.dir / "rpc-config"), state_file=str(self.dir / "owned.json"),
                             spec_dir=str(self.dir / "specs"))
        self.qubes_service = qubes_service
        self.unit = f"qubes-socksvc-{name}"
        self.socket = f"/run/qubes/socksvc-{name}.sock"
        self.link = self.unit_dir / "sockets.target.wants" / f"{self.unit}.socket"
        dropin = self.unit_dir / f"{self.unit}.service.d"  # this checkout's package, not an installed one
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "checkout.conf").write_text(f"[Service]\nEnvironment=PYTHONPATH={REPO}:{TESTS}\n")
        for path in (self.unit_dir, *self.unit_dir.parents):
            if path == Path(pw.pw_dir):
                break
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def apply(self, declared: bool) -> None:
        service = f"    qubes_service: {self.qubes_service}\n" if self.qubes_service else ""
        text = (f"version: 1\ndaemons:\n  {self.name}:\n{service}    enable: true\n    services:\n"
                f"      ntv.Echo:\n        handler: qubes_socksvc.examples:echo\n") if declared \
            else "version: 1\ndaemons: {}\n"
        path = self.dir / "manifest.yaml"
        path.write_text(text)
        parsed = manifest.parse(text, str(path))
        artifacts = render.render(parsed, self.layout, exec_start=[sys.executable, "-P", "-m", "qubes_socksvc"])
        plan = install.plan(artifacts, self.layout)
        assert not plan.conflicts, plan.conflicts
        install.execute(plan)

    def remove(self) -> None:
        self.apply(False)
        shutil.rmtree(self.unit_dir / f"{self.unit}.service.d", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def user() -> Iterator[str]:
    try:
        with qubes_vm_user(USER) as name:
            yield name
    except Unavailable as e:
        pytest.skip(f"no systemd user manager here: {e}")


@contextlib.contextmanager
def session(user: str, log: Path) -> Iterator[UserManager]:
    """The user's manager, started now (a login in the qube), stopped at the end."""
    manager = UserManager(user, log)
    try:
        manager.start()
    except Unavailable as e:
        pytest.skip(f"no systemd user manager here: {e}")
    try:
        yield manager
    finally:
        manager.stop()


def served(path: str) -> bytes:
    return raw_call(path, b"ntv.Echo+ dom0\0hello from dom0")


def test_socket_listens_only_where_the_qubes_service_is_on(user: str, tmp_path: Path) -> None:
    """Enabled by apply and conditioned on /run/qubes-service/NAME: off -> the manager skips the
    socket (nothing listens); on -> it listens from the next session, and a call is served."""
    name = f"nt{secrets.token_hex(4)}"
    flag = Path(model.QUBES_SERVICE_DIR, f"socksvc-{name}")
    template = Template(user, name, f"socksvc-{name}")
    made_dir = not flag.parent.exists()
    try:
        template.apply(True)
        assert os.readlink(template.link) == f"{template.unit_dir}/{template.unit}.socket"
        with session(user, tmp_path / "off.log") as manager:
            assert manager.show(f"{template.unit}.socket", "ConditionResult") == "no"
            assert manager.show(f"{template.unit}.socket", "ActiveState") == "inactive"
            assert not os.path.exists(template.socket)
        flag.parent.mkdir(exist_ok=True)
        flag.touch()
        with session(user, tmp_path / "on.log") as manager:
            assert manager.show(f"{template.unit}.socket", "ActiveState") == "active"
            assert served(template.socket) == b"hello from dom0"
            assert manager.show(f"{template.unit}.service", "ConditionResult") == "yes"
    finally:
        flag.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                flag.parent.rmdir()
        template.remove()


def test_enable_link_starts_the_socket_with_the_session_and_goes_with_the_daemon(user: str, tmp_path: Path) -> None:
    """``enable: true`` alone: the next session's manager listens without any systemctl; once the
    daemon is gone from the manifest, apply removes the link and the next session has no socket."""
    name = f"nt{secrets.token_hex(4)}"
    template = Template(user, name, None)
    try:
        template.apply(True)
        with session(user, tmp_path / "enabled.log") as manager:
            assert manager.show(f"{template.unit}.socket", "ActiveState") == "active"
            assert served(template.socket) == b"hello from dom0"
        template.apply(False)
        assert not os.path.lexists(template.link)
        assert not (template.unit_dir / f"{template.unit}.socket").exists()
        with session(user, tmp_path / "removed.log") as manager:
            assert manager.show(f"{template.unit}.socket", "LoadState") == "not-found"
            assert not os.path.exists(template.socket)
    finally:
        template.remove()
