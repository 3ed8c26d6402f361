# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The one process harness, for the benchmarks and the tests: servers started as an unprivileged user.

``Process`` starts a server with its output in a log, waits until it listens (or until
its log or a check says it is ready), reads its memory and file descriptors from /proc and
stops it; ``tests/conftest.py``'s ``RunningDaemon`` is a daemon on a ``Process``.

Run as root (``make bench``, the test suite), every server runs as ``nobody`` like a user's
daemon would; run as a user, they run as that user.  The bench starts every server with the
system interpreter (what the package uses), the checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import compileall
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .client import BenchError, wait_listening

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
#: The interpreter the package runs under (Debian's), else ours.
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
UNPRIVILEGED = "nobody"


def as_root() -> bool:
    return os.geteuid() == 0


def account(user: str = UNPRIVILEGED) -> tuple[int, int]:
    """(uid, gid) the servers run as: ``user``'s when run as root, else ours."""
    if as_root():
        pw = pwd.getpwnam(user)
        return pw.pw_uid, pw.pw_gid
    return os.getuid(), os.getgid()


def drop_privileges_argv() -> list[str]:
    """A prefix that execs the rest as the unprivileged account (same pid, so LISTEN_PID holds)."""
    if not as_root():
        return []
    uid, gid = account()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def child_env(**extra: str) -> dict[str, str]:
    """A small, fixed environment: no JOURNAL_STREAM, NOTIFY_SOCKET or LISTEN_* leaks in."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(REPO), "HOME": "/tmp", "LANG": "C.UTF-8", **extra}


#: First on PYTHONPATH, it hides uvloop: the daemon then runs on asyncio's own loop.
NO_UVLOOP = BENCH / "no_uvloop"


def uvloop_version() -> str | None:
    """The uvloop the system interpreter would give the daemon, if any."""
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import uvloop; print(uvloop.__version__)"], env=child_env(),
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def precompile() -> None:
    """Byte-compile the package as its installation would, so no run pays for compiling."""
    compileall.compile_dir(str(REPO / "qubes_socksvc"), quiet=1)
    if sys.executable != SYSTEM_PYTHON:
        subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", str(REPO / "qubes_socksvc")],
                       check=True, stdout=subprocess.DEVNULL)


def raise_fd_limit() -> None:
    """Room for a thousand callers in this process and the servers it starts."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Workdir:
    """A temporary directory the unprivileged servers can use."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="socksvc-bench-", dir="/tmp"))
        self.path.chmod(0o777)

    def file(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Process:
    """A server under test: its pid, its log, and its memory from /proc."""

    def __init__(self, name: str, argv: Sequence[str], socket_path: str, log: Path, drop: bool = True,
                 env: dict[str, str] | None = None, pass_fds: Sequence[int] = (), user: str = UNPRIVILEGED,
                 preexec_fn: Callable[[], object] | None = None) -> None:
        """``drop``: run as ``user`` when we are root (False: ``argv`` drops privileges itself);
        ``preexec_fn`` runs in the child before the exec (e.g. to set a resource limit)."""
        self.name = name
        self.socket = socket_path
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        uid, gid = account(user)
        privileges: dict[str, object] = {}
        if drop and as_root():
            privileges = {"user": uid, "group": gid, "extra_groups": []}
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                list(argv), env=env or child_env(), stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT, cwd="/", pass_fds=pass_fds, preexec_fn=preexec_fn,
                **privileges)  # type: ignore[call-overload]
        except BaseException:
            self._log_file.close()
            raise
        self.pid = self.proc.pid

    def wait_listening(self) -> Process:
        try:
            wait_listening(self.socket, alive=lambda: self.proc.poll() is None)
        except BenchError as e:
            raise BenchError(f"{self.name}: {e}\n{self.log_text()}") from e
        return self

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 30) -> Process:
        """Until ``ready()`` (``what`` it means, for the error); BenchError, with the log, if the
        server exits first or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode} before {what}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: not {what} after {timeout:g} s:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        raise BenchError(f"no {key} for {self.name}")

    def rss_kib(self) -> int:
        return self._status("VmRSS:")

    def rss_pss_kib(self) -> tuple[int, int]:
        """Resident and proportional set size (/proc/PID/smaps_rollup, Linux >= 4.14): PSS
        charges each shared page to its sharers in equal parts, so pages shared with other
        processes (libpython, libc) weigh as they do on a machine running several daemons."""
        found: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                found[key] = int(rest.split()[0])
        if len(found) != 2:
            raise BenchError(f"no Rss/Pss in /proc/{self.pid}/smaps_rollup for {self.name}")
        return found["Rss"], found["Pss"]

    def peak_rss_kib(self) -> int:
        return self._status("VmHWM:")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0; needs to own the process or be root)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def stop(self) -> int:
        """SIGTERM (in-flight calls finish), SIGKILL after 30 s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def compile_spec(work: Workdir, manifest: Path, daemon: str) -> Path:
    """``apply`` the manifest into a staging root of the work dir: the compiled spec a unit runs."""
    root = work.path / "applied"
    subprocess.run([SYSTEM_PYTHON, "-m", "qubes_socksvc", "apply", "-c", str(manifest),
                    "--root", str(root)], env=child_env(PYTHONPATH=str(REPO)), check=True, capture_output=True)
    return root / f"var/lib/qubes-socksvc/daemons/{daemon}.json"


#: What the rendered unit runs: safe-path mode, the compiled spec (render.default_exec_start).
def serve_argv(daemon: str, spec: Path, *python_options: str) -> list[str]:
    return [SYSTEM_PYTHON, *python_options, "-P", "-m", "qubes_socksvc", "serve", daemon, "--spec", str(spec)]


class Journal:
    """Where the daemons log: to the journal as their units do, through a stand-in for journald.

    journald does not run here (no systemd as PID 1), so bench/journal_sink.py binds a
    datagram socket at ``DIR/journal/socket`` and each daemon runs in a mount namespace of its
    own (unshare(1), as root) where ``DIR`` is mounted over /run/systemd: it sends to
    /run/systemd/journal/socket, unchanged, with ``JOURNAL_STREAM`` set as systemd sets it.
    Not root (no mount namespace): the daemons log to stderr, a file, and ``how`` says so.
    """

    def __init__(self, work: Workdir) -> None:
        self.sinks: list[Process] = []
        self.work = work
        self.usable = as_root() and shutil.which("unshare") is not None and os.path.isdir("/run/systemd") \
            and subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
        self.how = ("journal (native protocol) to a datagram sink standing in for /run/systemd/journal/socket"
                    if self.usable else "stderr to a file (not root: no mount namespace for a journal sink)")

    def sink(self, tag: str) -> Path | None:
        """A new sink's directory, its socket listening (None when not usable)."""
        if not self.usable:
            return None
        directory = self.work.path / f"journal-{tag}"
        directory.mkdir()
        directory.chmod(0o755)
        # In a network namespace of its own, where its receive queue holds 512 datagrams as
        # systemd's sysctl.d/50-default.conf sets net.unix.max_dgram_qlen (the kernel's 10 here).
        argv = ["unshare", "--net", "sh", "-c", 'echo 512 > /proc/sys/net/unix/max_dgram_qlen && exec "$@"', "sh",
                SYSTEM_PYTHON, str(BENCH / "journal_sink.py"), str(directory)]
        process = Process(f"journal sink {tag}", argv, "", self.work.path / f"journal-{tag}.log", drop=False)
        self.sinks.append(process)
        process.wait_until(lambda: (directory / "journal/socket").exists(), "listening")
        return directory

    @staticmethod
    def argv(directory: Path | None, argv: Sequence[str]) -> list[str]:
        """``argv`` (as root, still) run with ``directory`` over /run/systemd, then as nobody."""
        if directory is None:
            return [*drop_privileges_argv(), *argv]
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /run/systemd && exec "$@"', str(directory), *drop_privileges_argv(), *argv]

    @staticmethod
    def env(directory: Path | None, **extra: str) -> dict[str, str]:
        return child_env(**extra) if directory is None else child_env(JOURNAL_STREAM="0:0", **extra)


def start_daemon(work: Workdir, spec: Path, daemon: str, socket_path: str, tag: str,
                 pythonpath: str = str(REPO), name: str = "qubes-socksvc", journal: Path | None = None) -> Process:
    """``qubes-socksvc serve`` binding the spec's ``socket_path`` in a directory of its own; logging
    to the journal sink at ``journal`` (Journal.sink) when given, else to its log file."""
    bind_dir = work.path / f"daemon-{tag}"
    bind_dir.mkdir()
    bind_dir.chmod(0o777)
    argv = Journal.argv(journal, [*serve_argv(daemon, spec), "--bind-dir", str(bind_dir)])
    return Process(name, argv, str(bind_dir / os.path.basename(socket_path)), work.path / f"daemon-{tag}.log",
                   drop=False, env=Journal.env(journal, PYTHONPATH=pythonpath)).wait_listening()


def start_floor(work: Workdir, tag: str, pythonpath: str = f"{NO_UVLOOP}:{REPO}") -> Process:
    """The floor (bench/floor.py) binding a socket of its own; on asyncio's loop unless
    ``pythonpath`` lets it import uvloop."""
    path = str(work.path / f"floor-{tag}.sock")
    return Process("floor", floor_argv(path), path, work.path / f"floor-{tag}.log",
                   env=child_env(PYTHONPATH=pythonpath)).wait_listening()


def start_socat(work: Workdir, tag: str, block: int, forward_to: str) -> Process:
    """socat relaying one connection to ``forward_to``: raw byte relaying, in C.

    (An echo through socat's ``PIPE`` deadlocks on large streams: socat blocks
    writing into its own full pipe.  Relaying to a second socket carries the
    same bytes in and out without that trap.)
    """
    socat = shutil.which("socat")
    if socat is None:
        raise BenchError("socat is not installed (apt-get install socat, or make setup-test)")
    path = str(work.path / f"socat-{tag}.sock")
    argv = [socat, "-b", str(block), f"UNIX-LISTEN:{path}", f"UNIX-CONNECT:{forward_to}"]
    return Process("socat", argv, path, work.path / f"socat-{tag}.log").wait_listening()


def start_activated(work: Workdir, argv: Sequence[str], socket_path: str, tag: str, name: str,
                    pythonpath: str = str(REPO), fdname: str | None = None) -> Process:
    """``argv`` socket-activated as systemd does it, by ``systemd-socket-activate``: the socket
    listens at ``socket_path`` and the first connection starts the server, exec'd through
    setpriv as the unprivileged account (the same pid throughout, so ``LISTEN_PID`` holds and
    the Process's pid is the server's once a call has started it)."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        raise BenchError("systemd-socket-activate is not installed (Debian package systemd)")
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    fdname = fdname or os.path.basename(socket_path).removesuffix(".sock")
    full = [activate, "-l", socket_path, f"--fdname={fdname}", "-E", f"PYTHONPATH={pythonpath}", "--",
            *drop_privileges_argv(), *argv]
    return Process(name, full, socket_path, work.path / f"{name.replace(' ', '-')}-{tag}.log", drop=False,
                   env=child_env(PYTHONPATH=pythonpath)).wait_listening()


def floor_argv(socket_path: str, *python_options: str) -> list[str]:
    """The floor (bench/floor.py, the seed document's example server) on ``socket_path``."""
    return [SYSTEM_PYTHON, *python_options, str(BENCH / "floor.py"), socket_path]
