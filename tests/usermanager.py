# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A real ``systemd --user`` manager for tests, on machines whose PID 1 is not systemd.

systemd runs a user manager happily without being PID 1 when three things hold:

- ``/run/systemd/system`` exists: that is how systemd (``sd_booted()``) decides
  the machine was booted with systemd;
- the manager starts inside a cgroup its user owns, on every hierarchy it
  uses: on a hybrid layout both ``/sys/fs/cgroup/unified`` (cgroup2) and
  ``/sys/fs/cgroup/systemd`` (``name=systemd``); on a unified layout
  ``/sys/fs/cgroup`` itself.  We create one directory per manager, give it to
  the user, and write the launching shell's PID into each ``cgroup.procs``;
- it runs as that user (``setpriv --reuid --regid --init-groups``) with
  ``XDG_RUNTIME_DIR`` (``/run/user/UID``, 0700, the user's) and ``HOME`` set.

``systemctl --user`` with the same environment then talks to it over
``$XDG_RUNTIME_DIR/systemd/private``: it tries that socket before any D-Bus
session bus, so no ``dbus-daemon`` is involved (``dbus.socket`` still listens
on ``$XDG_RUNTIME_DIR/bus`` when dbus-user-session is installed, for tools
that need the bus).  With no journald on such a machine, the manager is started
with ``--default-standard-output=inherit``, so that units do not try the
journal.  ``inherit`` duplicates a unit's standard input (``/dev/null``), so a
daemon's log lines are lost (seen here: a SIGHUP reload's "reloaded" line
never reached ``UserManager.log``), and so are the manager's own messages (a
user manager logs to the journal or to ``/dev/console``, which it cannot
open): tests observe units through ``systemctl --user show`` (``MainPID``,
``StatusText``, ``Result``) and through calls.

On a machine booted with systemd the same class uses ``user@UID.service``.
Stopping kills whatever is left in the manager's cgroups, so no process
outlives a test.  Each manager's cgroups have a name of their own
(``socksvc-test-USER-PID-RANDOM``), so two runs on one machine (or in a chroot
sharing its /sys/fs/cgroup) never kill each other's managers: the harness kills
and removes only the cgroups it created.  A run that is itself killed leaves
its cgroups (and whatever runs in them) behind, named with its PID, for a
person to remove.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

SYSTEMD = "/usr/lib/systemd/systemd"
BOOTED_FLAG = Path("/run/systemd/system")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """A user manager cannot run here; the message says why (used as a skip reason)."""


def pid1_is_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def cgroup_hierarchies() -> list[Path]:
    """The cgroup roots a user manager needs a delegated directory in."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]  # unified (cgroup2 only)
    hybrid = [CGROUP_ROOT / "unified", CGROUP_ROOT / "systemd"]
    if all((h / "cgroup.procs").exists() for h in hybrid):
        return hybrid
    if (CGROUP_ROOT / "systemd" / "cgroup.procs").exists():
        return [CGROUP_ROOT / "systemd"]  # legacy: name=systemd only
    raise Unavailable("no cgroup hierarchy systemd can use (neither /sys/fs/cgroup/unified nor "
                      "/sys/fs/cgroup/systemd nor a cgroup2 /sys/fs/cgroup)")


def check_available() -> None:
    """Raise Unavailable with the reason when no user manager can be run here."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (creates users, cgroups and /run/user/UID)")
    for tool in (SYSTEMD, shutil.which("setpriv"), shutil.which("systemctl")):
        if tool is None or not os.access(tool, os.X_OK):
            raise Unavailable(f"{tool or 'setpriv/systemctl'} not found: install systemd and util-linux")
    if not pid1_is_systemd():
        for hierarchy in cgroup_hierarchies():
            if not os.access(hierarchy, os.W_OK):
                raise Unavailable(f"{hierarchy} is not writable (a container without cgroup delegation?)")


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    """Create (if missing) groups and a user with a home, member of ``groups``."""
    for group in groups:
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            subprocess.run(["groupadd", "--system", group], check=True)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        cmd = ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group"]
        if groups:
            cmd += ["--groups", ",".join(groups)]
        subprocess.run([*cmd, name], check=True)
        return pwd.getpwnam(name)
    if groups:
        subprocess.run(["usermod", "--append", "--groups", ",".join(groups), name], check=True)
    return pw


@contextlib.contextmanager
def qubes_vm_user(name: str, socket_dir: Path = Path("/run/qubes")) -> Iterator[str]:
    """A user in group ``qubes``, and ``socket_dir`` as in a Qubes VM (2770 root:qubes); what
    this made (the user, the group, the directory) is removed afterwards, nothing else.
    Raises Unavailable where no user manager can run."""
    import grp

    check_available()
    created_group = not any(g.gr_name == "qubes" for g in grp.getgrall())
    created_user = name not in {p.pw_name for p in pwd.getpwall()}
    created_dir = not socket_dir.exists()
    ensure_user(name, groups=("qubes",))
    socket_dir.mkdir(exist_ok=True)
    os.chown(socket_dir, 0, grp.getgrnam("qubes").gr_gid)
    socket_dir.chmod(0o2770)
    try:
        yield name
    finally:
        if created_user:
            subprocess.run(["userdel", "--remove", name], capture_output=True)
        if created_dir:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()
        if created_group:
            subprocess.run(["groupdel", "qubes"], capture_output=True)


class UserManager:
    """``systemd --user`` for ``user``; ``start()``, ``systemctl(...)``, ``stop()``."""

    _running: ClassVar[set[UserManager]] = set()
    _created_booted_flag: ClassVar[bool] = False

    def __init__(self, user: str, log: Path, start_timeout: float = 30) -> None:
        pw = pwd.getpwnam(user)
        self.user, self.uid, self.gid, self.home = user, pw.pw_uid, pw.pw_gid, pw.pw_dir
        self.runtime_dir = Path(f"/run/user/{self.uid}")
        self.log = log
        self.start_timeout = start_timeout
        self.cgroups: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._created_runtime_dir = False
        self._created_runtime_parent = False
        self._unit: str | None = None  # user@UID.service when PID 1 is systemd

    # --- environment ------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": PATH, "HOME": self.home, "USER": self.user, "LOGNAME": self.user,
                "XDG_RUNTIME_DIR": str(self.runtime_dir), "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                "SYSTEMD_COLORS": "0"}

    def as_user(self, *argv: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command as the user, in the manager's environment."""
        result = subprocess.run(self.as_user(*argv), env=self.env, capture_output=True, text=True,
                                timeout=timeout, cwd="/")
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} (as {self.user}) exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}\n--- manager log ---\n{self.log_text()[-4000:]}")
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--user", "--no-pager", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "--property", prop, "--value", unit).stdout.strip()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # --- start ------------------------------------------------------------

    def start(self) -> UserManager:
        check_available()
        if not self.runtime_dir.parent.exists():
            self.runtime_dir.parent.mkdir(mode=0o755, parents=True)
            self._created_runtime_parent = True
        if not self.runtime_dir.exists():
            self.runtime_dir.mkdir(mode=0o700)
            self._created_runtime_dir = True
        os.chown(self.runtime_dir, self.uid, self.gid)
        self.runtime_dir.chmod(0o700)
        UserManager._running.add(self)
        try:
            if pid1_is_systemd():
                self._unit = f"user@{self.uid}.service"
                subprocess.run(["systemctl", "start", self._unit], check=True, timeout=60)
            else:
                self._start_unbooted()
            self.wait_running()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_unbooted(self) -> None:
        if not BOOTED_FLAG.exists():
            BOOTED_FLAG.mkdir(parents=True)
            UserManager._created_booted_flag = True
        name = cgroup_name(self.user)
        self.cgroups = []
        for hierarchy in cgroup_hierarchies():
            path = hierarchy / name
            try:
                path.mkdir()  # a fresh name: never another run's cgroup
                self.cgroups.append(path)
                for entry in (path, *path.iterdir()):
                    os.chown(entry, self.uid, self.gid)
            except OSError as e:
                raise Unavailable(f"cannot create a delegated cgroup {path}: {e.strerror}") from e
        procs = " ".join(f"{c}/cgroup.procs" for c in self.cgroups)
        script = f'for f in {procs}; do echo $$ > "$f" || exit 1; done; exec "$@"'
        command = self.as_user(SYSTEMD, "--user", "--default-standard-output=inherit",
                               "--default-standard-error=inherit")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *command], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd="/")

    def wait_running(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"systemd --user for {self.user} exited {self.proc.returncode}:\n"
                                     f"{self.log_text()[-4000:]}")
            if (self.runtime_dir / "systemd/private").exists():
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        raise AssertionError(f"systemd --user for {self.user} not running after {self.start_timeout}s "
                             f"(state {state!r}):\n{self.log_text()[-4000:]}")

    # --- stop -------------------------------------------------------------

    def stop(self, timeout: float = 20) -> None:
        """Stop the manager (its units stop with it), then kill anything left behind."""
        if self._unit is not None:
            subprocess.run(["systemctl", "stop", self._unit], timeout=60)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # a user manager's "exit"
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        for cgroup in reversed(self.cgroups):
            kill_cgroup(cgroup)
        self.cgroups = []
        UserManager._running.discard(self)
        if self._created_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self._created_runtime_dir = False
        if self._created_runtime_parent:
            with contextlib.suppress(OSError):  # another manager may still use it
                self.runtime_dir.parent.rmdir()
            self._created_runtime_parent = False
        if UserManager._created_booted_flag and not UserManager._running:
            with contextlib.suppress(OSError):
                BOOTED_FLAG.rmdir()
            UserManager._created_booted_flag = False

    def __enter__(self) -> UserManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


CGROUP_PREFIX = "socksvc-test-"


def cgroup_name(user: str) -> str:
    """A cgroup name of this run's own: the test process's PID (to find a killed run's leftovers) and a random part."""
    return f"{CGROUP_PREFIX}{user}-{os.getpid()}-{secrets.token_hex(4)}"


def cgroup_pids(cgroup: Path) -> set[int]:
    pids: set[int] = set()
    for directory, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(directory, "cgroup.procs").read_text().split())
    return pids


def kill_cgroup(cgroup: Path, timeout: float = 10) -> None:
    """SIGKILL every process in ``cgroup`` and below, then remove the directories."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(cgroup)) and time.monotonic() < deadline:
        kill_file = cgroup / "cgroup.kill"
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if pids:
        raise AssertionError(f"processes {sorted(pids)} survived in {cgroup}")
    while cgroup.exists() and time.monotonic() < deadline:
        for directory, _, _ in os.walk(cgroup, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        if cgroup.exists():
            time.sleep(0.05)
