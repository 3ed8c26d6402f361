# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""How a call ends (flushed, or cut off), what STATUS= counts, and how a busy daemon waits.

A served call's output reaches its caller in full before the connection closes; a call that
failed (the handler raised, timed out or overran ``max_input``) is aborted: output it had
queued is dropped, so a caller never mistakes a failed call's partial output for a whole reply.
With every ``max_connections`` slot taken, or no file descriptor left, the daemon stops
watching its sockets (callers wait in the backlog) instead of spinning, and tries again by itself.
Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_socksvc import server
from tests.conftest import NotifySocket, RunningDaemon, calls_at_once
from tests.handlers import QUEUED_OUTPUT
from tests.test_hostile import connect, read_until_closed, wait_for_log

MANIFEST = """\
version: 1
daemons:
  e:
    idle_exit: 0
    max_connections: 2
    descriptor_timeout: 1
    services:
      e.Writes:
        handler: handlers:writes_then
        timeout: 0.5
        max_input: 1024
      e.Slow:
        handler: handlers:slow
      e.Echo:
        handler: qubes_socksvc.examples:echo
      e.Exhaust:
        handler: handlers:exhausts_fds
      e.Missing:
        handler: handlers:no_such_handler
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def daemon(start_daemon: type[RunningDaemon]) -> RunningDaemon:
    return start_daemon(MANIFEST, "e")


@pytest.mark.parametrize(("ending", "data", "complete"), [
    ("return", b"", True),
    ("raise", b"", False),
    ("hang", b"", False),             # past its timeout
    ("read", b"x" * 5000, False),     # past its max_input
    ("cancel", b"", False),           # its own CancelledError
    ("refused", b"", False),          # its own ConnectionError, not the caller's
])
def test_only_a_served_call_delivers_its_queued_output(daemon: RunningDaemon, ending: str, data: bytes,
                                                       complete: bool) -> None:
    """The caller reads nothing until the call has ended, then everything there is: all the output
    of a served call, a cut-off part of a failed one's (Server._connection: abort unless SERVED)."""
    with connect(daemon) as sock:
        sock.sendall(f"e.Writes+{ending} work\0".encode() + data)
        sock.shutdown(socket.SHUT_WR)
        wait_for_log(daemon, "call e.Writes+" + ending + {"return": " from work", "hang": " timed out",
                                                          "read": " rejected"}.get(ending, ": handler"))
        time.sleep(0.3)  # the daemon has closed or aborted the connection by now
        received = read_until_closed(sock)
    if complete:
        assert received == b"o" * QUEUED_OUTPUT
    else:
        assert len(received) < QUEUED_OUTPUT, f"a failed call ({ending}) delivered all its output"


def test_status_counts_each_kind_of_call(start_daemon: type[RunningDaemon]) -> None:
    """STATUS= (what ``systemctl --user status`` and ``list`` show) counts served calls, calls
    rejected before any handler ran, and calls whose handler failed, each apart."""
    notify = NotifySocket()
    try:
        daemon = start_daemon(MANIFEST, "e", extra_env={"NOTIFY_SOCKET": str(notify.path)})
        # Type=notify: systemd counts the start done at READY=1, which comes with the first status
        ready = notify.wait_for("READY=1")
        assert ready.startswith("READY=1\nSTATUS=spec ") and ready.endswith("calls: 0 served, 0 rejected, 0 failed")
        assert notify.statuses == [ready]
        # STATUS= only when it changed: an idle daemon repeats nothing (the status timer has run)
        assert notify.received_within(server.STATUS_INTERVAL * 1.5) == []
        assert daemon.call(b"e.Echo work\0", b"hi", timeout=10) == b"hi"
        # A bad descriptor, an unknown service, no NUL before EOF, no NUL within the limit, nothing.
        for wire in (b"e.Echo bad qube\0", b"e.Nothing work\0", b"e.Echo work", b"e" * 70000, b""):
            assert daemon.call(wire, timeout=10) == b""
        # what came before the EOF is counted in the log line
        wait_for_log(daemon, "rejected call: connection closed before the descriptor's NUL (11 bytes)")
        with connect(daemon) as sock:  # no NUL within descriptor_timeout
            sock.sendall(b"e.Echo wo")
            wait_for_log(daemon, "rejected call: no descriptor within 1s")
        for wire in (b"e.Writes+raise work\0", b"e.Writes+hang work\0", b"e.Writes+read work\0" + b"x" * 5000,
                     b"e.Writes+cancel work\0", b"e.Writes+refused work\0",
                     b"e.Missing work\0"):  # a handler that cannot be loaded fails the call
            daemon.call(wire, timeout=10)
        with connect(daemon) as sock:  # a caller that goes away while its call still answers
            sock.settimeout(1)
            with contextlib.suppress(TimeoutError):
                sock.sendall(b"e.Echo work\0" + b"x" * (4 << 20))  # echoed back, never read
        wait_for_log(daemon, "call e.Echo: caller went away")
        notify.wait_for("calls: 1 served, 6 rejected, 7 failed")
        later = notify.statuses[1:]  # READY=1 once: later lines are STATUS= alone, each a change
        assert later and not any("READY=1" in line for line in later), later
        assert all(a != b for a, b in itertools.pairwise(notify.statuses)), notify.statuses
    finally:
        notify.close()


def test_saturated_daemon_accepts_no_more_and_does_not_spin(daemon: RunningDaemon) -> None:
    """With both slots busy, three more callers wait in the kernel's backlog: the daemon holds no
    more connections (its fd count stays put) and burns no CPU while it waits (Server._accept
    unwatches its listeners); once a slot frees, the waiting callers are served."""
    busy = [connect(daemon) for _ in range(2)]
    for sock in busy:
        sock.sendall(b"e.Slow+2.5 work\0")
    wait_for_log(daemon, "call e.Slow+2.5 from work")
    time.sleep(0.2)
    fds = daemon.fd_count()
    waiting = [connect(daemon) for _ in range(3)]
    for sock in waiting:
        sock.sendall(b"e.Echo work\0queued")
        sock.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    before = cpu_seconds(daemon.proc.pid)
    time.sleep(1.5)
    spent = cpu_seconds(daemon.proc.pid) - before
    assert daemon.fd_count() == fds, "the daemon accepted callers beyond max_connections"
    assert spent < 0.3, f"the saturated daemon used {spent:.2f}s of CPU in 1.5s: it spins"
    assert [read_until_closed(sock) for sock in busy] == [b"done\n", b"done\n"]
    assert [read_until_closed(sock) for sock in waiting] == [b"queued"] * 3
    for sock in busy + waiting:
        sock.close()


@pytest.fixture
def exhausted(daemon: RunningDaemon) -> Iterator[socket.socket]:
    """A call that leaves the daemon without file descriptors for 0.5 s, then holds on 3 s more."""
    with connect(daemon) as hog:
        hog.sendall(b"e.Exhaust+0.5 work\0")
        hog.shutdown(socket.SHUT_WR)
        assert hog.recv(100) == b"exhausted\n"
        yield hog


def test_accept_failing_for_want_of_fds_is_retried_without_flooding(daemon: RunningDaemon,
                                                                    exhausted: socket.socket) -> None:
    """accept() failing with EMFILE pauses the listeners and retries 0.1 s later (Server._accept):
    the caller who arrived meanwhile is served as soon as descriptors are free again, long before
    any call ends, and the failure is logged a few times, not once per loop turn; meanwhile the
    daemon waits, it does not spin on a listener it cannot accept from."""
    start, cpu = time.monotonic(), cpu_seconds(daemon.proc.pid)
    assert daemon.call(b"e.Echo work\0", b"patient caller", timeout=10) == b"patient caller"
    assert time.monotonic() - start < 2.5, "served only when a call ended: accept() was never retried"
    assert cpu_seconds(daemon.proc.pid) - cpu < 0.2, "the daemon spun while accept() failed"
    failures = daemon.log_text().count("accept failed: [Errno 24] Too many open files")
    assert 1 <= failures <= 15, f"{failures} accept failures logged in about 0.5 s"
    assert read_until_closed(exhausted) == b"released\n"
    assert daemon.proc.poll() is None
    assert daemon.call(b"e.Echo work\0", b"after", timeout=10) == b"after"


def test_waiting_callers_are_served_in_turn_by_a_saturated_daemon(daemon: RunningDaemon) -> None:
    """Ten callers for two slots: every one answered, none refused."""
    assert calls_at_once(daemon, b"e.Slow+0.2 work\0", 10, timeout=15) == [b"done\n"] * 10
