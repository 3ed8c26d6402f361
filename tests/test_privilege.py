# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Privilege (issue 6, part 4): the daemon refuses root, its sockets are never open to others,
and the rendered units carry the hardening directives SECURITY.md documents.

Whether each directive is accepted and in force under a real ``systemd --user`` is
checked by tests/test_e2e_systemd.py; here we check that it is rendered at all.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qubes_socksvc import manifest, render, server
from qubes_socksvc.layout import File, Layout
from qubes_socksvc.manifest import ManifestError
from tests.conftest import REPO, TESTS, RunningDaemon, raw_call, world_dir

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")

PRIV_MANIFEST = """\
version: 1
daemons:
  p:
    idle_exit: 0
    socket_mode: "{mode}"
    services:
      p.Echo:
        handler: qubes_socksvc.examples:echo
      p.Marker:
        handler: handlers:leaks_nothing
      p.Raw:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
"""

#: What templates/service.j2 renders into [Service]; SECURITY.md explains each, and the ones left out.
HARDENING = {
    "NoNewPrivileges": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
}


def serve(manifest_path: Path, bind_dir: Path, preexec: Callable[[], None] | None = None,
          **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qubes_socksvc", "serve", "p", "-c", str(manifest_path), "--bind-dir", str(bind_dir)],
        env={"PYTHONPATH": f"{REPO}:{TESTS}", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        capture_output=True, text=True, timeout=30, preexec_fn=preexec, cwd="/", **kwargs)


# --- the daemon refuses root ---------------------------------------------------------------

@needs_root
@pytest.mark.parametrize("uids", [(0, 0, 0), (65534, 0, 0), (0, 65534, 65534)],
                         ids=["root", "effective-root", "real-root"])
def test_daemon_refuses_any_root_uid(uids: tuple[int, int, int]) -> None:
    """Refused before binding anything, for a root real or effective UID: with a root real UID a
    handler could take root back (setresuid).  (exec copies the effective UID to the saved one.)"""
    bind_dir = world_dir("socksvc-priv-")
    manifest_path = bind_dir / "m.yaml"
    manifest_path.write_text(PRIV_MANIFEST.format(mode="0660"))
    try:
        result = serve(manifest_path, bind_dir, preexec=lambda: os.setresuid(*uids))
        assert result.returncode == 1, result.stderr
        assert "refusing to run as root" in result.stderr
        assert sorted(p.name for p in bind_dir.iterdir()) == ["m.yaml"], "bound a socket before refusing"
    finally:
        subprocess.run(["rm", "-rf", str(bind_dir)], check=True)


# --- sockets -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["0666", "0662", "0661", "0664", "0777", "0707", "0601", "666", "4660", "0o660",
                                  "660 ", "-1", "0660\n"])
def test_manifest_refuses_world_accessible_or_odd_modes(mode: str) -> None:
    with pytest.raises(ManifestError, match="socket_mode"):
        manifest.parse(PRIV_MANIFEST.format(mode=mode.replace("\n", "\\n")), "/etc/qubes-socksvc.yaml")


@pytest.mark.parametrize("path", ["/tmp/x.sock", "/run/user/1000/x.sock", "/run/qubes/../x.sock",
                                  "/var/run/qubes/x.sock", "run/qubes/x.sock", "/run/qubes/sub/x.sock", "/run/qubes/x"])
def test_manifest_refuses_sockets_outside_qrexecs_directory(path: str) -> None:
    """Outside /run/qubes (2770 root:qubes) another user could squat the path or reach the socket."""
    text = PRIV_MANIFEST.format(mode="0660").replace('    socket_mode: "0660"\n', f"    socket: '{path}'\n")
    with pytest.raises(ManifestError, match="socket"):
        manifest.parse(text, "/etc/qubes-socksvc.yaml")


@needs_root
@pytest.mark.parametrize("mode", ["0660", "0600", "0640", "0770"])
def test_bound_sockets_have_the_declared_mode_and_nothing_for_others(
        start_daemon: type[RunningDaemon], mode: str) -> None:
    daemon = start_daemon(PRIV_MANIFEST.format(mode=mode), "p")
    sockets = sorted(daemon.bind_dir.iterdir())
    assert [p.name for p in sockets] == ["socksvc-p.Raw.sock", "socksvc-p.sock"]
    for path in sockets:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == int(mode, 8), (path, oct(st.st_mode))
        assert st.st_mode & 0o007 == 0
        assert st.st_uid == pwd.getpwnam("nobody").pw_uid


def try_connect(path: str, uid: int, gid: int, groups: list[int]) -> str:
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n"
            "else:\n    s.sendall(b'p.Echo work\\0hello'); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())\n")
    result = subprocess.run([sys.executable, "-c", code, path], user=uid, group=gid, extra_groups=groups,
                            capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@needs_root
def test_only_owner_and_group_can_connect(start_daemon: type[RunningDaemon]) -> None:
    """0660: a user outside the socket's group is refused by the kernel; a member gets through."""
    daemon = start_daemon(PRIV_MANIFEST.format(mode="0660"), "p")
    socket_gid = daemon.bind_dir.joinpath("socksvc-p.sock").lstat().st_gid
    outsider = pwd.getpwnam("daemon")
    assert socket_gid not in (outsider.pw_gid, *os.getgrouplist(outsider.pw_name, outsider.pw_gid))
    assert try_connect(daemon.socket(), outsider.pw_uid, outsider.pw_gid, []) == "refused"
    assert try_connect(daemon.socket("socksvc-p.Raw.sock"), outsider.pw_uid, outsider.pw_gid, []) == "refused"
    assert try_connect(daemon.socket(), outsider.pw_uid, outsider.pw_gid, [socket_gid]) == "hello"


@needs_root
def test_socket_is_never_world_accessible_not_even_while_binding(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The umask is narrowed before bind(): the socket is born with the declared mode, so there is
    no window between bind() and chmod() in which others could connect (here with umask 0)."""
    daemon = manifest.parse(PRIV_MANIFEST.format(mode="0660"), "/etc/qubes-socksvc.yaml").daemons["p"]
    seen: list[tuple[str, int]] = []
    real_chmod, real_listen = os.chmod, socket.socket.listen

    def chmod(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        seen.append((str(path), os.lstat(path).st_mode))
        real_chmod(path, mode, *args, **kwargs)

    def listen(self: socket.socket, *args: Any) -> None:
        name = self.getsockname()
        seen.append((name, os.lstat(name).st_mode))
        real_listen(self, *args)

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(socket.socket, "listen", listen)
    old_umask = os.umask(0)
    try:
        listeners = server.bind_sockets(daemon, str(tmp_path))
        assert os.umask(0) == 0, "bind_sockets did not restore the umask"
    finally:
        os.umask(old_umask)
    for listener in listeners:
        listener.sock.close()
    assert len(seen) >= 4, seen  # chmod and listen, for both sockets
    for path, mode in seen:
        assert mode & 0o007 == 0, f"{path} was {oct(mode)} at some point"


def test_rendered_socket_units_keep_others_out() -> None:
    parsed = manifest.parse(PRIV_MANIFEST.format(mode="0660"), "/etc/qubes-socksvc.yaml")
    units = {a.path: a.content for a in render.render(parsed, Layout.for_manifest(parsed))
             if isinstance(a, File)}
    text = units["/etc/systemd/user/qubes-socksvc-p.socket"]
    assert text is not None
    directives = unit_directives(text, "Socket")
    assert directives["SocketMode"] == ["0660"] and directives["SocketGroup"] == ["qubes"]
    assert sorted(directives["ListenStream"]) == ["/run/qubes/socksvc-p.Raw.sock", "/run/qubes/socksvc-p.sock"]
    assert "SocketUser" not in directives  # the user manager's own user owns it
    assert unit_directives(text, "Unit")["ConditionUser"] == ["!root"]


# --- hardening in the rendered units ---------------------------------------------------------

def unit_directives(text: str, section: str) -> dict[str, list[str]]:
    body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
    result: dict[str, list[str]] = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            result.setdefault(key, []).append(value)
    return result


@pytest.mark.parametrize("local", [False, True], ids=["etc", "usr-local"])
def test_rendered_service_units_carry_the_hardening(local: bool) -> None:
    path = "/usr/local/etc/qubes-socksvc.yaml" if local else "/etc/qubes-socksvc.yaml"
    parsed = manifest.parse(PRIV_MANIFEST.format(mode="0660"), path)
    layout = Layout.for_manifest(parsed)
    units = {a.path: a.content for a in render.render(parsed, layout) if isinstance(a, File)}
    text = units[f"{layout.unit_dir}/qubes-socksvc-p.service"]
    assert text is not None
    service = unit_directives(text, "Service")
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{key}={value} missing from the rendered unit"
    assert unit_directives(text, "Unit")["ConditionUser"] == ["!root"]
    # Nothing that would run the daemon with more privilege than the user manager's user.
    for key in ("User", "Group", "SupplementaryGroups", "AmbientCapabilities", "CapabilityBoundingSet",
                "PermissionsStartOnly", "ExecStartPre", "ExecStartPost"):
        assert key not in service, f"{key}= in a user unit"
    (exec_start,) = service["ExecStart"]
    assert exec_start[0] not in "+!@-:", f"ExecStart= with a privilege prefix: {exec_start}"
    assert exec_start.split()[1:6] == ["-P", "-m", "qubes_socksvc", "serve", "p"]  # -P: no cwd on sys.path
    assert service["WorkingDirectory"] == ["/"]



def test_hardening_table_in_security_md_matches_the_template() -> None:
    """SECURITY.md documents exactly the directives the template renders."""
    text = (REPO / "SECURITY.md").read_text()
    template = (REPO / "templates/service.j2").read_text()
    for key, value in HARDENING.items():
        assert f"{key}={value}" in template
        assert f"`{key}={value}`" in text, f"SECURITY.md does not document {key}={value}"


def test_security_md_names_only_existing_tests() -> None:
    """The hostile-case tables of SECURITY.md point at tests that exist (and there are many)."""
    text = (REPO / "SECURITY.md").read_text()
    named = set(re.findall(r"`(tests/[a-z0-9_]+\.py)::(test_[a-z0-9_]+)`", text))
    assert len(named) >= 50, len(named)
    for path, name in sorted(named):
        source = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"SECURITY.md names {path}::{name}, which does not exist"


@needs_root
def test_a_socket_group_the_daemon_is_not_in_is_said_and_the_socket_kept_private(
        start_daemon: type[RunningDaemon]) -> None:
    """socket_group names a group the daemon's user is not in (chown(2): EPERM): the daemon says
    so for each socket, in words that name the group, and serves with the sockets left in its
    own group, mode unchanged: never wider than declared."""
    text = PRIV_MANIFEST.format(mode="0660").replace("    socket_mode:", "    socket_group: root\n    socket_mode:")
    daemon = start_daemon(text, "p")
    nobody = pwd.getpwnam("nobody")
    for name in ("socksvc-p.sock", "socksvc-p.Raw.sock"):
        path = daemon.bind_dir / name
        st = path.lstat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_gid, 0o660), (name, st)
        assert f"cannot give {path} to group root: not a member" in daemon.log_text(), daemon.log_text()
    assert daemon.call(b"p.Echo work\0served") == b"served"


@needs_root
def test_a_socket_group_that_does_not_exist_is_said_and_the_socket_kept_private(
        start_daemon: type[RunningDaemon]) -> None:
    """socket_group names no group of this qube (a manifest written for another template): the
    daemon says so, naming the group, and serves with the sockets in its own group."""
    text = PRIV_MANIFEST.format(mode="0660").replace("    socket_mode:", "    socket_group: nogrp\n    socket_mode:")
    daemon = start_daemon(text, "p")
    st = (daemon.bind_dir / "socksvc-p.sock").lstat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam("nobody").pw_gid, 0o660), st
    assert "group nogrp does not exist; socket left in the daemon's own group" in daemon.log_text()
    assert daemon.call(b"p.Echo work\0served") == b"served"


def test_a_start_that_fails_binding_leaves_none_of_its_sockets_listening(tmp_path: Path) -> None:
    """bind_sockets failing at its second socket (a file in the way) closes the first before the
    error reaches its caller: no caller connects to a daemon that is not starting."""
    daemon = manifest.parse(PRIV_MANIFEST.format(mode="0660"), "/etc/qubes-socksvc.yaml").daemons["p"]
    (tmp_path / "socksvc-p.Raw.sock").write_text("in the way")
    try:
        server.bind_sockets(daemon, str(tmp_path))
    except server.ServeError as e:  # the error, and its traceback's frames, still held here
        assert "socksvc-p.Raw.sock exists and is not a socket" in str(e)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as caller, pytest.raises(ConnectionRefusedError):
            caller.connect(str(tmp_path / "socksvc-p.sock"))
    else:
        raise AssertionError("bind_sockets bound over a file")


#: The environment of a ``serve`` started by hand in these tests.
SERVE_ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{TESTS}"}


def serve_argv(bind_dir: Path, manifest_text: str = PRIV_MANIFEST.format(mode="0660")) -> list[str]:
    """``serve p`` as nobody, binding in ``bind_dir``, its manifest written beside that directory."""
    manifest_path = bind_dir.parent / "m.yaml"
    manifest_path.write_text(manifest_text)
    manifest_path.chmod(0o644)
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "qubes_socksvc",
            "serve", "p", "-c", str(manifest_path), "--bind-dir", str(bind_dir)]


def serve_as_nobody(bind_dir: Path) -> subprocess.CompletedProcess[str]:
    """``serve p`` (PRIV_MANIFEST) as nobody, binding in ``bind_dir``: a start that fails."""
    return subprocess.run(serve_argv(bind_dir), env=SERVE_ENV, capture_output=True, text=True, timeout=60)


@needs_root
def test_a_socket_directory_the_daemon_cannot_write_fails_the_start_in_one_line() -> None:
    """``serve`` as a user who cannot write the socket directory: one line naming the socket and
    the reason, exit 1, no traceback and no socket."""
    closed = world_dir("socksvc-nobind-") / "closed"
    closed.mkdir(mode=0o755)  # root's: nobody may not create the socket there
    result = serve_as_nobody(closed)
    assert result.returncode == 1, result
    assert f"cannot bind {closed}/socksvc-p" in result.stderr and "Permission denied" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and list(closed.iterdir()) == []


@needs_root
def test_serve_takes_its_turn_at_the_socket_directorys_lock() -> None:
    """Two daemons started at once for one socket: each binds under flock(2) on the socket's
    directory (whatever their working directories), so one binds and the other finds it
    listening.  Here the test holds that lock: serve waits, and binds once it is released."""
    shared = world_dir("socksvc-lock-") / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    lock = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    log = shared.parent / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(serve_argv(shared), env=SERVE_ENV, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    try:
        time.sleep(1.5)
        assert proc.poll() is None and not (shared / "socksvc-p.sock").exists(), log.read_text()
        os.close(lock)
        lock = -1
        deadline = time.monotonic() + 30
        while " services on " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert raw_call(str(shared / "socksvc-p.sock"), b"p.Echo work\0after the lock") == b"after the lock"
    finally:
        if lock >= 0:
            os.close(lock)
        proc.terminate()
        proc.wait(timeout=30)


@needs_root
def test_a_daemon_too_busy_to_accept_is_still_found_listening() -> None:
    """A socket whose listen backlog is full (its daemon stalled, callers queued): the probe's
    connect would block, so it does not wait: EAGAIN says someone listens, and serve refuses
    at once instead of hanging until a caller is accepted."""
    shared = world_dir("socksvc-busy-") / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(shared / "socksvc-p.sock"))
    (shared / "socksvc-p.sock").chmod(0o777)
    busy.listen(0)
    queued: list[socket.socket] = []
    try:
        while True:  # callers until the backlog is full
            caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            caller.setblocking(False)
            queued.append(caller)
            try:
                caller.connect(str(shared / "socksvc-p.sock"))
            except BlockingIOError:
                break
        started = time.monotonic()
        result = serve_as_nobody(shared)
        assert result.returncode == 1 and "a daemon is already listening on this socket" in result.stderr, result
        assert time.monotonic() - started < 30
    finally:
        for caller in queued:
            caller.close()
        busy.close()


@needs_root
def test_a_socket_in_the_way_the_daemon_cannot_probe_is_left_alone() -> None:
    """A socket at the path that the daemon may not connect to (root's, 0600): whether a daemon
    listens there cannot be told, so it is neither removed nor bound over; one line says so."""
    shared = world_dir("socksvc-probe-") / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    in_the_way = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    in_the_way.bind(str(shared / "socksvc-p.sock"))  # root's, not listening
    (shared / "socksvc-p.sock").chmod(0o600)
    try:
        result = serve_as_nobody(shared)
    finally:
        in_the_way.close()
    assert result.returncode == 1, result
    assert (f"{shared}/socksvc-p.sock: cannot tell whether a daemon listens on it (Permission denied); "
            "remove it if it is stale") in result.stderr, result.stderr
    assert (shared / "socksvc-p.sock").is_socket() and (shared / "socksvc-p.sock").stat().st_uid == 0


@needs_root
def test_the_sockets_go_to_a_socket_group_the_daemon_is_in() -> None:
    """socket_group names the daemon's own group: each socket is given to it (chown), whatever
    group the directory would give (here a setgid directory of root's group), at the declared
    mode; nothing is said."""
    shared = world_dir("socksvc-group-") / "shared"
    shared.mkdir()
    shared.chmod(0o2777)  # setgid, group root: a socket born here is root's group until given away
    text = PRIV_MANIFEST.format(mode="0660").replace("    socket_mode:", "    socket_group: nogroup\n    socket_mode:")
    log = shared.parent / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(serve_argv(shared, text), env=SERVE_ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while " services on " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for name in ("socksvc-p.sock", "socksvc-p.Raw.sock"):
            st = (shared / name).lstat()
            assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam("nobody").pw_gid, 0o660), (name, st)
        assert "cannot give" not in log.read_text() and "does not exist" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
