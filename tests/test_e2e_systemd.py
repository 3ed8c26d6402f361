# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""End to end, the way a template maintainer and qrexec use it, under a real ``systemd --user``.

Builds the .deb (``make deb``), installs it with apt, writes /etc/qubes-socksvc.yaml
with two daemons, runs the installed ``qubes-socksvc apply``, lets a real user
manager (tests/usermanager.py) activate the sockets, and calls every service
through its /etc/qubes-rpc symlink as the qrexec agent does (connect as root,
descriptor, stdin, half-close, read to EOF).  Then it edits the manifest, and
removes, reinstalls and purges the package.  The tests run in file order and
share one installation; everything is undone at the end, the package purged.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.packages import Built, build, missing_tools
from tests.test_reload import Stream
from tests.usermanager import (
    Unavailable,
    UserManager,
    cgroup_hierarchies,
    check_available,
    ensure_user,
    kill_cgroup,
    pid1_is_systemd,
)

pytestmark = pytest.mark.slow

USER = "socksvc-e2e"
MANIFEST = Path("/etc/qubes-socksvc.yaml")
RPC_DIR = Path("/etc/qubes-rpc")
RPC_CONFIG_DIR = Path("/etc/qubes/rpc-config")
UNIT_DIR = Path("/etc/systemd/user")
STATE_DIR = Path("/var/lib/qubes-socksvc")
SOCKET_DIR = Path("/run/qubes")
GLOBAL_WANTS = UNIT_DIR / "sockets.target.wants"
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages/qubes_socksvc")
MAN_PAGES = (Path("/usr/share/man/man1/qubes-socksvc.1.gz"), Path("/usr/share/man/man5/qubes-socksvc.yaml.5.gz"))
# The AppVM-persistent manifest renders under /usr/local.
LOCAL_MANIFEST = Path("/usr/local/etc/qubes-socksvc.yaml")
LOCAL_RPC_DIR = Path("/usr/local/etc/qubes-rpc")
LOCAL_UNIT_DIR = Path("/usr/local/lib/systemd/user")
LOCAL_STATE_DIR = Path("/usr/local/var/lib/qubes-socksvc")
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
              "DEBIAN_FRONTEND": "noninteractive"}
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "-o", "Dpkg::Options::=--force-confdef",
       "-o", "Dpkg::Options::=--force-confold"]

IDLE_EXIT = 2
MAIN, RAW = "e2etest", "e2eraw"  # daemons -> qubes-socksvc-e2etest.*, qubes-socksvc-e2eraw.*
MANIFEST_TEXT = f"""\
version: 1
daemons:
  {MAIN}:
    description: "qubes-socksvc end-to-end test: 100% $HOME; \\"quoted\\" #not-a-comment"
    idle_exit: {IDLE_EXIT}
    services:
      e2e.Echo:
        handler: qubes_socksvc.examples:echo
        max_input: 0
        wait_for_session: true
      e2e.Hello:
        handler: qubes_socksvc.examples:hello
      e2e.Hello+friend:
        handler: qubes_socksvc.examples:hello
      e2e.Sha256:
        handler: qubes_socksvc.examples:sha256
        max_input: 0
      e2e.Upper:
        handler: qubes_socksvc.examples:upper
  {RAW}:
    description: qubes-socksvc end-to-end test, no descriptor
    idle_exit: {IDLE_EXIT}
    services:
      e2e.RawEcho:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
        max_input: 0
"""
LOCAL = "e2elocal"
LOCAL_TEXT = f"""\
version: 1
daemons:
  {LOCAL}:
    description: qubes-socksvc end-to-end test, /usr/local manifest
    idle_exit: {IDLE_EXIT}
    services:
      e2e.Local:
        handler: qubes_socksvc.examples:upper
"""
#: The edit: e2e.Upper and e2e.Hello+friend go, e2e.Added comes.
EDITED_TEXT = (MANIFEST_TEXT
               .replace("      e2e.Hello+friend:\n        handler: qubes_socksvc.examples:hello\n", "")
               .replace("      e2e.Upper:\n", "      e2e.Added:\n"))

#: From EDITED_TEXT: e2e.Added removed, e2e.Reloaded added, e2e.Echo given a 1 s timeout.
RELOADED_TEXT = (EDITED_TEXT.replace("      e2e.Added:\n", "      e2e.Reloaded:\n")
                 .replace("        max_input: 0\n        wait_for_session: true\n",
                          "        max_input: 0\n        wait_for_session: true\n        timeout: 1\n", 1))


def unit(daemon: str, kind: str) -> str:
    return f"qubes-socksvc-{daemon}.{kind}"


def system(*argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run as root with the distribution's PATH and no PYTHONPATH: the installed package, not the checkout."""
    result = subprocess.run(argv, env=SYSTEM_ENV, capture_output=True, text=True, timeout=timeout, cwd="/")
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def package_state() -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "qubes-socksvc"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "not-installed"


def qrexec_call(path: str, payload: bytes, timeout: float = 60) -> bytes:
    """Like conftest.raw_call, but sending and reading at once, as qrexec does: a streaming
    service answers before its input ends, and the payload may exceed the socket buffers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # a refused call may be cut off mid-input
            while data := sock.recv(1 << 16):
                chunks.append(data)
        sender.join(timeout)
        return b"".join(chunks)


def call(service: str, data: bytes = b"", source: str = "work", link: str | None = None) -> bytes:
    """Call like the qrexec agent in a VM: connect to the qubes-rpc link, descriptor, data, half-close."""
    return qrexec_call(str(RPC_DIR / (link or service)), f"{service} {source}\0".encode() + data)


@contextlib.contextmanager
def keep_running() -> Iterator[None]:
    """An e2e.Echo call held open: the daemon cannot idle out (IDLE_EXIT is short) while a test
    compares PIDs across a reload."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(RPC_DIR / "e2e.Echo"))
        sock.sendall(b"e2e.Echo+ work\0")
        yield
        sock.shutdown(socket.SHUT_WR)


def generated_paths() -> list[Path]:
    return [*RPC_DIR.glob("e2e.*"), *RPC_CONFIG_DIR.glob("e2e.*"), *UNIT_DIR.glob("qubes-socksvc-e2e*"),
            *(STATE_DIR / "daemons").glob("e2e*.json")]


def local_paths() -> list[Path]:
    return [*LOCAL_RPC_DIR.glob("e2e.*"), *LOCAL_UNIT_DIR.glob("qubes-socksvc-e2e*"),
            *(LOCAL_STATE_DIR / "daemons").glob("e2e*.json")]


# --- fixtures ------------------------------------------------------------------------


class Host:
    """What this module changed on the machine, so that teardown can undo exactly that."""

    def __init__(self) -> None:
        self.created_group = subprocess.run(["getent", "group", "qubes"], capture_output=True).returncode != 0
        self.created_user = subprocess.run(["getent", "passwd", USER], capture_output=True).returncode != 0
        self.created_dirs = [p for p in (SOCKET_DIR, RPC_DIR, RPC_CONFIG_DIR.parent, RPC_CONFIG_DIR,
                                          *parents(LOCAL_RPC_DIR), *parents(LOCAL_UNIT_DIR),
                                          *parents(LOCAL_STATE_DIR)) if not p.exists()]


def parents(path: Path) -> list[Path]:
    """``path`` and its ancestors below /usr/local, outermost first."""
    chain = [path, *path.parents]
    return list(reversed(chain[:chain.index(Path("/usr/local"))]))


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    try:
        check_available()
    except Unavailable as e:
        pytest.skip(f"no systemd user manager here: {e}")
    if missing := missing_tools():
        pytest.skip(f"package tools missing: {', '.join(missing)} ('make setup-test' installs them)")
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get not found: the end-to-end test installs the .deb with apt")
    if package_state() != "not-installed" or MANIFEST.exists() or LOCAL_MANIFEST.exists():
        pytest.skip("qubes-socksvc is installed here (or a qubes-socksvc.yaml exists): this test installs "
                    "and purges the package and will not touch a real installation; purge it to run the test")
    state = Host()
    ensure_user(USER, groups=("qubes",))
    SOCKET_DIR.mkdir(exist_ok=True)
    os.chown(SOCKET_DIR, 0, grp.getgrnam("qubes").gr_gid)
    SOCKET_DIR.chmod(0o2770)  # as in a Qubes VM
    try:
        yield state
    finally:
        if package_state() != "not-installed":
            system(*APT, "purge", "qubes-socksvc", check=False)
        for path in [*generated_paths(), *local_paths()]:
            path.unlink(missing_ok=True)
        for link in GLOBAL_WANTS.glob("qubes-socksvc-e2e*"):
            link.unlink()
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        shutil.rmtree(LOCAL_STATE_DIR, ignore_errors=True)
        MANIFEST.unlink(missing_ok=True)
        LOCAL_MANIFEST.unlink(missing_ok=True)
        if state.created_user:
            subprocess.run(["userdel", "--remove", USER], capture_output=True)
        for path in reversed(state.created_dirs):
            with contextlib.suppress(OSError):  # not empty: something else uses it now
                path.rmdir()
        if state.created_group:
            subprocess.run(["groupdel", "qubes"], capture_output=True)


@pytest.fixture(scope="module")
def packages(host: Host) -> Built:
    return build()


@pytest.fixture(scope="module")
def installed(packages: Built) -> str:
    """apt-get install ./pkgs/qubes-socksvc_*.deb, as a template maintainer would."""
    result = subprocess.run([*APT, "install", f"./pkgs/{packages.deb.name}"], env=SYSTEM_ENV, cwd=packages.dir,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def applied(installed: str) -> str:
    """The manifest written and applied; the no-descriptor daemon enabled for every user (--global)."""
    MANIFEST.write_text(MANIFEST_TEXT)
    output = system("qubes-socksvc", "apply").stdout
    system("systemctl", "--global", "enable", unit(RAW, "socket"))
    return output


@pytest.fixture(scope="module")
def manager(applied: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserManager]:
    """The user logs in: a user manager starts (and starts the globally enabled socket)."""
    log = tmp_path_factory.mktemp("usermanager") / f"{USER}.log"
    try:
        um = UserManager(USER, log).start()
    except Unavailable as e:
        pytest.skip(f"no systemd user manager here: {e}")
    try:
        um.systemctl("daemon-reload")
        um.systemctl("enable", "--now", unit(MAIN, "socket"))
        yield um
    finally:
        um.stop()


def wait_inactive(um: UserManager, daemon: str = MAIN) -> None:
    wait_for(f"{unit(daemon, 'service')} to exit", lambda: um.show(unit(daemon, "service"), "ActiveState")
             == "inactive", timeout=IDLE_EXIT + 20)


def main_pid(um: UserManager, daemon: str = MAIN) -> int:
    return int(um.show(unit(daemon, "service"), "MainPID"))


# --- install, apply, enable -----------------------------------------------------------


def test_installed_package_is_what_runs(installed: str) -> None:
    assert package_state() == "install ok installed"
    assert "/etc/qubes-socksvc.yaml: up to date, nothing to do" in installed, installed  # postinst applied the conffile
    where = system("python3", "-c", "import qubes_socksvc; print(qubes_socksvc.__file__)").stdout.strip()
    assert where == f"{DIST_PACKAGES}/__init__.py"
    assert Path("/usr/bin/qubes-socksvc").is_file()
    assert system("qubes-socksvc", "--help").returncode == 0
    for page in MAN_PAGES:
        assert page.is_file(), page


def test_apply_writes_units_links_and_rpc_config(applied: str) -> None:
    assert "applied" in applied
    service = (UNIT_DIR / unit(MAIN, "service")).read_text()
    spec = f"/var/lib/qubes-socksvc/daemons/{MAIN}.json"
    assert f"\nExecStart=/usr/bin/python3 -P -m qubes_socksvc serve {MAIN} --spec {spec}\n" in service
    assert "\nWorkingDirectory=/\n" in service
    assert Path(spec).stat().st_mode & 0o777 == 0o644
    for kind in ("socket", "service"):
        text = (UNIT_DIR / unit(MAIN, kind)).read_text()
        assert "\nConditionUser=!root\n" in text and "\nConditionGroup=qubes\n" in text
    for name in ("e2e.Echo", "e2e.Hello", "e2e.Hello+friend", "e2e.Sha256", "e2e.Upper"):
        assert os.readlink(RPC_DIR / name) == f"/run/qubes/socksvc-{MAIN}.sock"
    assert (RPC_DIR / "e2e.RawEcho").is_symlink()
    assert "wait-for-session=true" in (RPC_CONFIG_DIR / "e2e.Echo").read_text()
    assert "skip-service-descriptor=true" in (RPC_CONFIG_DIR / "e2e.RawEcho").read_text()
    owned = json.loads((STATE_DIR / "owned.json").read_text())["owned"]
    assert {str(p) for p in generated_paths()} == set(owned)


def test_the_post_install_hook_announces_what_was_applied(applied: str, tmp_path: Path) -> None:
    """The installed hook, as qubes.PostInstall runs it after an update, against stand-ins for the
    two dom0 tools only (qvm-features-request, qubesdb-read): every applied NAME, once, without +ARG."""
    hook = Path("/etc/qubes/post-install.d/20-qubes-socksvc.sh")
    assert hook.is_file() and os.access(hook, os.X_OK)
    requests = tmp_path / "requests"
    (tmp_path / "qvm-features-request").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {requests}\n')
    (tmp_path / "qubesdb-read").write_text("#!/bin/sh\necho full\n")
    for tool in ("qvm-features-request", "qubesdb-read"):
        (tmp_path / tool).chmod(0o755)
    result = subprocess.run([str(hook)], env={**SYSTEM_ENV, "PATH": f"{tmp_path}:{SYSTEM_ENV['PATH']}"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result
    assert requests.read_text().splitlines() == [f"supported-rpc.e2e.{name}=1" for name in
                                                 ("Echo", "Hello", "RawEcho", "Sha256", "Upper")]


def test_sockets_listen_0660_group_qubes(manager: UserManager) -> None:
    uid, qubes_gid = pwd.getpwnam(USER).pw_uid, grp.getgrnam("qubes").gr_gid
    sockets = {os.readlink(RPC_DIR / name) for name in ("e2e.Echo", "e2e.RawEcho")}
    assert len(sockets) == 2
    for path in sockets:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o660, f"{path}: {oct(st.st_mode)}"
        assert (st.st_uid, st.st_gid) == (uid, qubes_gid), path
    assert manager.show(unit(MAIN, "socket"), "ActiveState") == "active"
    assert manager.show(unit(RAW, "socket"), "ActiveState") == "active"  # --global, started at "login"
    assert Path(manager.home, ".config/systemd/user/sockets.target.wants", unit(MAIN, "socket")).is_symlink()
    status = system("qubes-socksvc", "list").stdout
    assert f"socket /run/qubes/socksvc-{MAIN}.sock: listening" in status
    assert f"enabled for {USER}" in status and "enabled globally" in status


def test_first_call_socket_activates_the_daemon(manager: UserManager) -> None:
    wait_inactive(manager)
    assert main_pid(manager) == 0
    assert call("e2e.Echo", b"first call") == b"first call"
    assert manager.show(unit(MAIN, "service"), "ActiveState") in ("active", "deactivating")
    pid = main_pid(manager)
    if pid:  # unless it already idled out
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(USER).pw_uid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:6] == [b"/usr/bin/python3", b"-P", b"-m", b"qubes_socksvc", b"serve", MAIN.encode()]


def test_every_service_through_its_qubes_rpc_link(manager: UserManager) -> None:
    big = os.urandom(3 << 20)
    assert call("e2e.Echo", big) == big
    assert hashlib.sha256(big).hexdigest().encode() + b"\n" == call("e2e.Sha256", big)
    assert call("e2e.Upper", b"shout") == b"SHOUT"
    hello = call("e2e.Hello").decode()
    assert "service=e2e.Hello\n" in hello and "argument=(none)" in hello and "source=work" in hello
    # NAME+ARG is looked up first, then NAME: qrexec's order, through the same links
    assert "argument=friend" in call("e2e.Hello+friend", source="personal").decode()
    assert "argument=other" in call("e2e.Hello+other", link="e2e.Hello").decode()
    # dom0's four-field descriptor, a keyword target arrives without its "@"
    dom0 = qrexec_call(str(RPC_DIR / "e2e.Hello"), b"e2e.Hello+x dom0 keyword dispvm\0").decode()
    assert "source=dom0" in dom0 and "target=keyword:dispvm" in dom0
    # skip-service-descriptor: the socket gets the caller's bytes only
    assert qrexec_call(str(RPC_DIR / "e2e.RawEcho"), b"no descriptor") == b"no descriptor"
    # an undeclared service on the daemon's socket is refused, and the daemon keeps serving
    assert call("e2e.Nope", b"x", link="e2e.Echo") == b""
    assert call("e2e.Echo", b"still here") == b"still here"
    # the installed client resolves the qubes-rpc path and the rpc-config like qrexec
    upper = subprocess.run(["qubes-socksvc", "call", "e2e.Upper", "--source", "work"], input=b"abc",
                           env=SYSTEM_ENV, capture_output=True, timeout=60, cwd="/")
    assert (upper.returncode, upper.stdout) == (0, b"ABC"), upper.stderr
    raw = subprocess.run(["qubes-socksvc", "call", "e2e.RawEcho"], input=b"raw", env=SYSTEM_ENV,
                         capture_output=True, timeout=60, cwd="/")
    assert (raw.returncode, raw.stdout) == (0, b"raw"), raw.stderr


def test_hardening_directives_hold_under_the_user_manager(manager: UserManager) -> None:
    """Every sandboxing directive in the rendered unit is accepted and in force in a real user manager."""
    text = (UNIT_DIR / unit(MAIN, "service")).read_text()
    section = text.split("[Service]", 1)[1].split("\n[", 1)[0]
    directives = dict(line.split("=", 1) for line in section.splitlines() if "=" in line)
    verify = manager.run("systemd-analyze", "--user", "verify", str(UNIT_DIR / unit(MAIN, "service")),
                         check=False)
    assert verify.returncode == 0 and not re.search(r"[Uu]nknown|ignoring|[Ii]nvalid",
                                                    verify.stdout + verify.stderr), verify
    assert call("e2e.Echo", b"x") == b"x"
    pid = main_pid(manager)
    assert pid, "the daemon is not running right after a call"
    proc_status = Path(f"/proc/{pid}/status").read_text()
    if directives.get("NoNewPrivileges") == "yes":
        assert re.search(r"^NoNewPrivs:\s+1$", proc_status, re.M)
    seccomp_based = {"SystemCallArchitectures", "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID",
                     "SystemCallFilter", "MemoryDenyWriteExecute", "RestrictNamespaces", "RestrictAddressFamilies"}
    if seccomp_based & set(directives):
        assert re.search(r"^Seccomp:\s+2$", proc_status, re.M), "no seccomp filter installed"
    for name, value in directives.items():  # systemd took every directive as written
        shown = manager.show(unit(MAIN, "service"), name)
        if value in ("yes", "no") and shown in ("yes", "no"):
            assert shown == value, f"{name}={value} but the manager has {shown}"
    assert manager.show(unit(MAIN, "service"), "Result") == "success"


def test_condition_user_keeps_it_out_of_roots_manager(manager: UserManager,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    log = tmp_path_factory.mktemp("usermanager") / "root.log"
    with UserManager("root", log) as root:
        # --global enabled the no-descriptor socket for root's manager too: its condition refused it
        assert root.show(unit(RAW, "socket"), "ConditionResult") == "no"
        root.systemctl("start", unit(MAIN, "socket"))  # a failed condition is not an error...
        assert root.show(unit(MAIN, "socket"), "ConditionResult") == "no"
        assert root.show(unit(MAIN, "socket"), "ActiveState") == "inactive"  # ...and nothing listens
        assert root.show(unit(MAIN, "service"), "ActiveState") == "inactive"
    # the user's sockets were never touched
    assert os.stat(f"/run/qubes/socksvc-{MAIN}.sock").st_uid == pwd.getpwnam(USER).pw_uid
    assert call("e2e.Echo", b"after root") == b"after root"


def test_the_harness_leaves_no_process_behind(host: Host, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stopping a manager also kills what escaped its units (here: a process put into its cgroup)."""
    if pid1_is_systemd():
        pytest.skip("PID 1 is systemd: user@.service manages the cgroups, not the harness")
    log = tmp_path_factory.mktemp("usermanager") / "root-harness.log"
    # Another run's cgroup, under the name every run used to share: the harness must leave it alone.
    others = [h / "socksvc-test-root" for h in cgroup_hierarchies()]
    other = subprocess.Popen(["sleep", "600"])
    try:
        for cgroup in others:
            cgroup.mkdir(exist_ok=True)
            (cgroup / "cgroup.procs").write_text(str(other.pid))
        with UserManager("root", log) as root:
            assert all(f"-{os.getpid()}-" in c.name for c in root.cgroups), root.cgroups  # a name of its own
            root.run("systemd-run", "--user", "--unit=socksvc-harness-sleep", "sleep", "600")
            unit_pid = int(root.show("socksvc-harness-sleep.service", "MainPID"))
            stray = subprocess.Popen(["sleep", "600"])
            for cgroup in root.cgroups:
                (cgroup / "cgroup.procs").write_text(str(stray.pid))
            cgroups = list(root.cgroups)
        assert stray.wait(timeout=10) == -9  # SIGKILLed by the harness
        assert not Path(f"/proc/{unit_pid}").exists()
        assert not any(c.exists() for c in cgroups)
        assert other.poll() is None and all(c.is_dir() for c in others)  # the other run's: untouched
    finally:
        other.kill()
        other.wait()
        for cgroup in others:
            kill_cgroup(cgroup)


def test_idle_exit_stops_the_daemon_and_the_next_call_starts_it(manager: UserManager) -> None:
    assert call("e2e.Echo", b"one") == b"one"
    first = main_pid(manager)
    started = time.monotonic()
    wait_inactive(manager)
    assert time.monotonic() - started < IDLE_EXIT + 10
    service = unit(MAIN, "service")
    assert manager.show(service, "Result") == "success" and manager.show(service, "ExecMainStatus") == "0"
    assert manager.show(unit(MAIN, "socket"), "SubState") == "listening"  # systemd kept the socket
    assert Path(f"/run/qubes/socksvc-{MAIN}.sock").is_socket()
    assert call("e2e.Echo", b"two") == b"two"
    second = main_pid(manager)
    assert second and second != first
    assert manager.show(service, "NRestarts") == "0"


def test_manifest_edit_adds_and_removes_services(manager: UserManager) -> None:
    """apply adds and removes services; the running daemon serves them from its next call."""
    with keep_running():
        MANIFEST.write_text(EDITED_TEXT)
        output = system("qubes-socksvc", "apply").stdout
        assert re.search(r"^create +/etc/qubes-rpc/e2e\.Added ", output, re.M), output
        assert re.search(r"^remove +/etc/qubes-rpc/e2e\.Upper$", output, re.M), output
        assert re.search(r"^remove +/etc/qubes-rpc/e2e\.Hello\+friend$", output, re.M), output
        assert (RPC_DIR / "e2e.Added").is_symlink()
        assert not (RPC_DIR / "e2e.Upper").exists() and not (RPC_DIR / "e2e.Upper").is_symlink()
        pid = main_pid(manager)
        assert pid  # running: the next call reloads its spec, no restart
        assert call("e2e.Added", b"new") == b"NEW"
        assert main_pid(manager) == pid
        assert "argument=friend" in call("e2e.Hello+friend", link="e2e.Hello").decode()  # falls back to e2e.Hello
        assert call("e2e.Upper", b"gone", link="e2e.Echo") == b""  # refused by the daemon
        gone = subprocess.run(["qubes-socksvc", "call", "e2e.Upper"], input=b"", env=SYSTEM_ENV,
                              capture_output=True, timeout=60, cwd="/")
        assert gone.returncode != 0 and b"e2e.Upper" in gone.stderr
        assert call("e2e.Echo", b"still") == b"still"


def test_systemd_reads_the_declared_values_back(manager: UserManager) -> None:
    """Ask systemd how it parsed the rendered units: exactly the manifest's description (with %, $,
    quotes and #), both conditions, and the ExecStart= argv apply meant."""
    service = unit(MAIN, "service")
    declared = 'qubes-socksvc end-to-end test: 100% $HOME; "quoted" #not-a-comment'
    assert manager.show(service, "Description") == declared
    assert manager.show(unit(MAIN, "socket"), "Description") == f"{declared} (socket)"
    conditions = manager.systemctl("show", "-p", "Conditions", service, check=False).stdout
    exec_start = manager.show(service, "ExecStart")
    assert f"argv[]=/usr/bin/python3 -P -m qubes_socksvc serve {MAIN} --spec " in exec_start, exec_start
    unit_text = manager.systemctl("cat", service).stdout
    assert "ConditionUser=!root" in unit_text and "ConditionGroup=qubes" in unit_text, conditions


def test_the_daemon_serves_what_was_applied_not_the_yaml(manager: UserManager) -> None:
    """An edited but unapplied manifest, valid or broken, changes nothing: the unit runs the spec."""
    applied_text = MANIFEST.read_text()
    try:
        for edit in (applied_text.replace("e2e.Added", "e2e.Unapplied"), "daemons: [broken\n"):
            MANIFEST.write_text(edit)
            pid = main_pid(manager)
            manager.systemctl("restart", unit(MAIN, "service"))
            assert call("e2e.Added", b"new") == b"NEW"
            assert main_pid(manager) not in (0, pid)
            assert call("e2e.Echo", b"kept") == b"kept"
    finally:
        MANIFEST.write_text(applied_text)


def slow_echo(data: bytes = b"slow", pause: float = 2) -> bytes:
    """An e2e.Echo call whose caller takes ``pause`` seconds between two writes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(RPC_DIR / "e2e.Echo"))
        sock.sendall(b"e2e.Echo+ work\0" + data[:1])
        time.sleep(pause)
        with contextlib.suppress(OSError):
            sock.sendall(data[1:])
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def test_apply_reaches_the_running_daemon_without_a_restart(manager: UserManager) -> None:
    """A long streaming call is in flight while apply adds a service, removes one and gives
    e2e.Echo a timeout: the stream, started without one, completes byte-exact; the next calls get
    the new spec; the daemon's PID is unchanged; STATUS= and list name the applied spec."""
    with keep_running():
        assert call("e2e.Echo", b"warm") == b"warm"
        assert slow_echo() == b"slow"  # no timeout yet
        pid = main_pid(manager)
        stream = Stream(str(RPC_DIR / "e2e.Echo"), b"e2e.Echo+ work\0")
        time.sleep(0.5)
        MANIFEST.write_text(RELOADED_TEXT)
        try:
            output = system("qubes-socksvc", "apply").stdout
            assert f"daemon {MAIN}: running daemons pick the new spec up at their next call" in output, output
            assert call("e2e.Reloaded", b"new") == b"NEW"
            assert call("e2e.Added", b"gone", link="e2e.Echo") == b""
            assert stream.writer.is_alive(), "the stream ended before the reload: it proves nothing"
            assert slow_echo() == b"s"  # cut by the new 1 s timeout
            received = stream.finish()
            assert hashlib.sha256(received).digest() == hashlib.sha256(stream.data).digest()
            assert main_pid(manager) == pid
            spec_id = json.loads((STATE_DIR / "daemons" / f"{MAIN}.json").read_text())["manifest_sha256"][:12]
            wait_for("STATUS= to name the new spec", lambda: manager.show(unit(MAIN, "service"), "StatusText")
                     .startswith(f"spec {spec_id}: "))
            assert " served" in manager.show(unit(MAIN, "service"), "StatusText")
            listing = manager.run("qubes-socksvc", "list").stdout
            assert f"running: yes (pid {pid}), serving spec {spec_id}, the applied one" in listing, listing
        finally:
            MANIFEST.write_text(EDITED_TEXT)
            system("qubes-socksvc", "apply")
        # The daemon watches its spec's directory (inotify): the renamed-in spec is loaded without
        # waiting for a call, and list names it as the applied one.
        restored = json.loads((STATE_DIR / "daemons" / f"{MAIN}.json").read_text())["manifest_sha256"][:12]
        assert restored != spec_id
        wait_for("list to name the restored spec", lambda: f"serving spec {restored}, the applied one"
                 in manager.run("qubes-socksvc", "list").stdout)
        assert call("e2e.Added", b"back") == b"BACK"
        assert main_pid(manager) == pid


def test_systemctl_reload_reloads_the_spec(manager: UserManager) -> None:
    """ExecReload= sends SIGHUP: the daemon loads its spec again, same PID.  The spec is rewritten
    in place with the same size and mtime (e2e.Echo gets a 1 s timeout), the mtime put back before
    the file is closed, so neither the watch (IN_ATTRIB, IN_CLOSE_WRITE: the stamp looks unchanged)
    nor the timer sees it: only the reload makes the timeout take effect."""
    with keep_running():
        spec = STATE_DIR / "daemons" / f"{MAIN}.json"
        original = spec.read_text()
        echo = original.index('"e2e.Echo": {')
        at = original.index('"timeout": 0', echo)
        rewritten = original[:at] + '"timeout": 1' + original[at + len('"timeout": 0'):]
        before = spec.stat()
        assert slow_echo() == b"slow"
        pid = main_pid(manager)
        try:
            fd = os.open(spec, os.O_WRONLY)
            try:
                os.write(fd, rewritten.encode())
                os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
            finally:
                os.close(fd)
            assert slow_echo() == b"slow"  # not reloaded yet
            manager.systemctl("reload", unit(MAIN, "service"))
            assert slow_echo() == b"s"  # the spec read again: cut by the 1 s timeout
            assert main_pid(manager) == pid
        finally:
            fresh = spec.with_name("restore.tmp")
            fresh.write_text(original)
            fresh.chmod(0o644)
            fresh.rename(spec)  # a new inode: the next call reloads it
        assert slow_echo() == b"slow" and main_pid(manager) == pid


# --- remove, reinstall, purge -----------------------------------------------------------


def test_remove_keeps_the_manifest_and_takes_back_generated_files(manager: UserManager) -> None:
    assert generated_paths()
    result = system(*APT, "remove", "qubes-socksvc")
    assert package_state() == "deinstall ok config-files"
    assert re.search(r"^remove +/etc/systemd/user/qubes-socksvc-e2etest\.socket$", result.stdout, re.M)
    assert not Path("/usr/bin/qubes-socksvc").exists()
    assert not DIST_PACKAGES.exists()
    assert not Path("/usr/share/qubes-socksvc").exists()
    assert not any(page.exists() for page in MAN_PAGES)
    assert MANIFEST.read_text() == EDITED_TEXT  # a conffile: kept on remove
    assert generated_paths() == []  # units, qubes-rpc links and rpc-config all went with the code
    assert json.loads((STATE_DIR / "owned.json").read_text())["owned"] == {}
    # enable links stay until purge, as with any Debian unit; they dangle meanwhile
    assert (GLOBAL_WANTS / unit(RAW, "socket")).is_symlink()
    assert Path(manager.home, ".config/systemd/user/sockets.target.wants", unit(MAIN, "socket")).is_symlink()


def test_reinstall_applies_the_kept_manifest_and_the_local_one(packages: Built, manager: UserManager) -> None:
    LOCAL_MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    LOCAL_MANIFEST.write_text(LOCAL_TEXT)  # an AppVM's persistent manifest, there before the install
    result = subprocess.run([*APT, "install", f"./pkgs/{packages.deb.name}"], env=SYSTEM_ENV, cwd=packages.dir,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^create +/etc/qubes-rpc/e2e\.Added ", result.stdout, re.M), result.stdout
    assert re.search(r"^create +/usr/local/etc/qubes-rpc/e2e\.Local ", result.stdout, re.M), result.stdout
    local_service = (LOCAL_UNIT_DIR / unit(LOCAL, "service")).read_text()
    assert f" serve {LOCAL} --spec /usr/local/var/lib/qubes-socksvc/daemons/{LOCAL}.json\n" in local_service
    assert (LOCAL_STATE_DIR / "owned.json").is_file()
    manager.systemctl("daemon-reload")
    manager.systemctl("try-restart", unit(MAIN, "service"))
    assert call("e2e.Added", b"back") == b"BACK"
    manager.systemctl("start", unit(LOCAL, "socket"))  # /usr/local/lib/systemd/user is on the user search path
    assert qrexec_call(str(LOCAL_RPC_DIR / "e2e.Local"), b"e2e.Local work\0local") == b"LOCAL"


def test_a_bad_manifest_never_fails_the_install(packages: Built) -> None:
    before = {p: p.read_bytes() if not p.is_symlink() else os.readlink(p) for p in generated_paths()}
    MANIFEST.write_text(EDITED_TEXT + "    unknown_key: 1\n")
    result = subprocess.run([*APT, "install", "--reinstall", f"./pkgs/{packages.deb.name}"], env=SYSTEM_ENV,
                            cwd=packages.dir, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert package_state() == "install ok installed"
    assert "/etc/qubes-socksvc.yaml:" in output and "unknown_key" in output  # the error, with its place
    assert "WARNING: 'qubes-socksvc apply -c /etc/qubes-socksvc.yaml' failed" in output
    after = {p: p.read_bytes() if not p.is_symlink() else os.readlink(p) for p in generated_paths()}
    assert after == before  # an invalid manifest changes nothing


def test_purge_leaves_nothing_of_ours(manager: UserManager, host: Host) -> None:
    assert local_paths()
    made_by_apply = [p for p in host.created_dirs if p != SOCKET_DIR and p.exists()]
    system(*APT, "purge", "qubes-socksvc")
    # the directories apply created, emptied by remove and purge, go with the package (issue 22)
    assert made_by_apply and [p for p in made_by_apply if p.exists()] == []
    assert package_state() == "not-installed"
    assert not MANIFEST.exists()
    assert not STATE_DIR.exists() and not LOCAL_STATE_DIR.exists()
    assert generated_paths() == [] and local_paths() == []
    assert LOCAL_MANIFEST.read_text() == LOCAL_TEXT  # the administrator's file, not the package's
    assert not DIST_PACKAGES.exists() and not Path("/usr/bin/qubes-socksvc").exists()
    assert not (GLOBAL_WANTS / unit(RAW, "socket")).is_symlink()  # the dangling --global link went too
    assert not Path("/usr/share/doc/qubes-socksvc").exists()
    # a user's own enable link is in their home: theirs to remove (systemd ignores it, dangling)
    user_link = Path(manager.home, ".config/systemd/user/sockets.target.wants", unit(MAIN, "socket"))
    assert user_link.is_symlink() and not user_link.exists()
