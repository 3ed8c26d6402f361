# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Shared fixtures: manifests on disk, and a real daemon run as an unprivileged user."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.client import BenchError
from bench.processes import Process

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DAEMON_USER = "nobody"


def run_cli(*args: str, check: bool = False, input: bytes | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qubes_socksvc`` from this checkout; text output."""
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "qubes_socksvc", *args], capture_output=True,
                            env=full_env, input=input.decode() if input is not None else None,
                            text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"qubes-socksvc {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def apply(manifest: Path, root: Path, *extra: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``qubes-socksvc apply -c MANIFEST --root ROOT [EXTRA...]`` in a subprocess."""
    return run_cli("apply", "-c", str(manifest), "--root", str(root), *extra, check=check)


def apply_in_process(manifest: Path, root: Path) -> tuple[int, str]:
    """``apply`` through ``cli.main`` in this process (monkeypatches hold): (exit code, its
    stdout and stderr as written, interleaved)."""
    from qubes_socksvc import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["apply", "-c", str(manifest), "--root", str(root)])
    return code, out.getvalue()


@dataclass(frozen=True)
class RpcDirs:
    """Where a qrexec agent looks for a service: qubes-rpc directories (first wins), rpc-config."""

    services: tuple[Path, ...]
    config: Path

    @classmethod
    def under(cls, root: Path) -> RpcDirs:
        """The system directories in a tree ``apply --root ROOT`` staged."""
        return cls((root / "etc/qubes-rpc",), root / "etc/qubes/rpc-config")


def call_cli(service: str, *args: str, dirs: RpcDirs, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``qubes-socksvc call SERVICE [ARGS...]`` resolving in ``dirs`` like the agent; bytes in and out."""
    options = [*(arg for d in dirs.services for arg in ("--rpc-dir", str(d))), "--rpc-config-dir", str(dirs.config)]
    return subprocess.run([sys.executable, "-m", "qubes_socksvc", "call", service, *args, *options],
                          input=data, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"})


def fields_of(output: bytes) -> dict[str, str]:
    """What the ``handlers:fields`` handler wrote, as {field: value}."""
    return dict(line.split("=", 1) for line in output.decode().splitlines())


def raw_call(path: str, payload: bytes, *, half_close: bool = True, timeout: float = 30) -> bytes:
    """Connect like qrexec: send ``payload`` (descriptor included), half-close, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def calls_at_once(daemon: RunningDaemon, wire: bytes, callers: int, timeout: float) -> list[bytes]:
    """``callers`` concurrent calls of ``wire``, each in a thread; their replies (every thread joined)."""
    replies: list[bytes] = []
    threads = [threading.Thread(target=lambda: replies.append(daemon.call(wire, timeout=timeout)))
               for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return replies


_WORLD_DIRS: list[Path] = []


def _temporary_dir(prefix: str, parent: str, mode: int) -> Path:
    """A temporary directory in ``parent`` with ``mode``, removed when the test run ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(mode)
    if not _WORLD_DIRS:
        atexit.register(_remove_world_dirs)
    _WORLD_DIRS.append(path)
    return path


def world_dir(prefix: str) -> Path:
    """A temporary directory the daemon's user can use (pytest's tmp_path is root-only)."""
    return _temporary_dir(prefix, "/tmp", 0o777)


def private_dir(prefix: str) -> Path:
    """A temporary directory only root can write, where no user can bind a socket first (a
    forward's target must not be in a world-writable directory such as /tmp)."""
    return _temporary_dir(prefix, "/run", 0o755)


def _remove_world_dirs() -> None:
    for d in _WORLD_DIRS:
        shutil.rmtree(d, ignore_errors=True)


class NotifySocket:
    """A NOTIFY_SOCKET for a daemon under test (Type=notify): the STATUS= lines it sends."""

    def __init__(self) -> None:
        self.path = world_dir("socksvc-notify-") / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.path.chmod(0o777)
        self.statuses: list[str] = []

    def wait_for(self, expected: str, timeout: float = 10) -> str:
        """The first status line holding ``expected`` (AssertionError, with every line, if none)."""
        self._receive(timeout, lambda: bool(self.statuses) and expected in self.statuses[-1])
        assert self.statuses and expected in self.statuses[-1], self.statuses
        return self.statuses[-1]

    def received_within(self, seconds: float) -> list[str]:
        """The status lines that arrive within ``seconds`` (kept in ``statuses`` too)."""
        before = len(self.statuses)
        self._receive(seconds, lambda: False)
        return self.statuses[before:]

    def _receive(self, seconds: float, done: Callable[[], bool]) -> None:
        """Keep the lines received until ``done()`` or ``seconds`` have passed."""
        deadline = time.monotonic() + seconds
        while not done() and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(max(0.01, left))
            with contextlib.suppress(TimeoutError):
                self.statuses.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


class RunningDaemon:
    """``qubes-socksvc serve`` as an unprivileged user, sockets bound in ``bind_dir``: a daemon
    on the bench's process harness (``bench.processes.Process``), with the test's manifest."""

    def __init__(self, manifest_text: str, name: str, user: str = DAEMON_USER,
                 extra_env: dict[str, str] | None = None) -> None:
        self.dir = world_dir("socksvc-daemon-")
        self.bind_dir = self.dir / "sockets"
        self.bind_dir.mkdir()
        self.bind_dir.chmod(0o777)
        self.manifest = self.dir / "manifest.yaml"
        self.manifest.write_text(manifest_text)
        self.manifest.chmod(0o644)
        self.name = name
        self.log = self.dir / "daemon.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": f"{REPO}:{TESTS}",
               "HOME": "/tmp", **(extra_env or {})}
        self.process = Process(
            f"daemon {name}", [sys.executable, "-m", "qubes_socksvc", "serve", name, "-c", str(self.manifest),
                               "--bind-dir", str(self.bind_dir)],
            self.socket(), self.log, env=env, user=user)
        self.proc = self.process.proc
        try:
            self.wait_listening()
        except BaseException:
            self.stop()
            raise

    def socket(self, basename: str | None = None) -> str:
        return str(self.bind_dir / (basename or f"socksvc-{self.name}.sock"))

    def wait_listening(self, timeout: float = 15) -> None:
        def serving() -> bool:
            # run()'s "daemon D serving N services on M sockets" (a warning may say "serving" too)
            return any(p.is_socket() for p in self.bind_dir.iterdir()) and " services on " in self.log_text()

        try:
            self.process.wait_until(serving, "serving", timeout)
        except BenchError as e:
            raise AssertionError(str(e)) from e

    def log_text(self) -> str:
        return self.process.log_text()

    def call(self, descriptor: bytes, data: bytes = b"", *, half_close: bool = True, timeout: float = 30) -> bytes:
        return raw_call(self.socket(), descriptor + data, half_close=half_close, timeout=timeout)

    def fd_count(self) -> int:
        return self.process.fd_count()

    def rss_kib(self) -> int:
        return self.process.rss_kib()

    def stop(self) -> int:
        code = self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


@pytest.fixture
def start_daemon() -> Iterator[type[RunningDaemon]]:
    """Factory: ``start_daemon(manifest_text, name)``; every daemon is stopped afterwards."""
    started: list[RunningDaemon] = []

    class Factory(RunningDaemon):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    yield Factory
    for daemon in started:
        daemon.stop()


TEST_MANIFEST = """\
version: 1
daemons:
  t:
    idle_exit: 0
    max_connections: 64
    services:
      test.Echo:
        handler: qubes_socksvc.examples:echo
        max_input: 0
      test.Fields:
        handler: handlers:fields
      test.Fields+special:
        handler: qubes_socksvc.examples:hello
      test.AfterEof:
        handler: handlers:after_eof
      test.Raises:
        handler: handlers:raises
      test.Exits:
        handler: handlers:exits
      test.PlainExits:
        handler: handlers:plain_exits
      test.Hangs:
        handler: handlers:hangs
        timeout: 1
      test.Huge:
        handler: handlers:huge
      test.Slow:
        handler: handlers:slow
      test.Small:
        handler: qubes_socksvc.examples:echo
        max_input: 1024
      test.ReturnsInt:
        handler: handlers:returns_int
      test.Plain:
        handler: handlers:plain_pid
      test.Missing:
        handler: no_such_module:nothing
      test.Sha256:
        handler: qubes_socksvc.examples:sha256
        max_input: 0
      test.Raw:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
        max_input: 0
"""


@pytest.fixture
def daemon(start_daemon: type[RunningDaemon]) -> RunningDaemon:
    """A daemon serving TEST_MANIFEST's ``t``."""
    return start_daemon(TEST_MANIFEST, "t")


#: apply's file-system operations; a kill comes just before the k-th of them.
APPLY_OPERATIONS = ("rename", "symlink", "unlink", "write", "fsync", "mkdir")


def killed_apply(manifest: Path, root: Path, k: int) -> int | None:
    """Fork an apply (in this process's state: monkeypatches hold) that SIGKILLs itself before
    its k-th file-system operation; None if it was killed, else its exit code (it finished first)."""
    from qubes_socksvc import cli

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            count = 0

            def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
                def operation(*args: Any, **kwargs: Any) -> Any:
                    nonlocal count
                    count += 1
                    if count == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return operation

            for name in APPLY_OPERATIONS:
                setattr(os, name, wrap(getattr(os, name)))
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                code = cli.main(["apply", "-c", str(manifest), "--root", str(root)])
            os._exit(code)
        finally:
            os._exit(99)
    deadline = time.monotonic() + 60
    while True:  # bounded: a child stuck on a lock inherited through fork() is killed
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"apply killed at {k} hung")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return None
    return os.WEXITSTATUS(status)
