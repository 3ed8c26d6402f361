# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What a fresh adversary found unbounded after issue 22's first fixes, each against a real
daemon over real sockets: slots held by hung handlers whose callers left, an EMFILE loop,
threads of plain handlers piling up, a handler's own log lines, and numbers past any timer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qubes_socksvc import logs, manifest, model
from tests.conftest import REPO, RunningDaemon, calls_at_once

BASE = """\
version: 1
daemons:
  b:
    idle_exit: 0
    max_connections: {slots}
    services:
      b.Echo:
        handler: qubes_socksvc.examples:echo
      b.Hang:
        handler: handlers_bounded:hang
      b.HangPlain:
        handler: handlers_bounded:hang_plain
        timeout: 0.2
      b.Leak:
        handler: handlers_bounded:leak_fds
      b.Log:
        handler: handlers_bounded:log_argument
"""


def wait_for(condition: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_hung_handler_gives_its_slot_back_when_its_caller_leaves(start_daemon: type[RunningDaemon]) -> None:
    """max_connections 2, both slots held by a handler that never returns (no timeout): once
    the callers close their end (POLLHUP on the daemon's side: net/unix/af_unix.c unix_poll),
    the calls end as 'caller went away' and an honest call is served."""
    daemon = start_daemon(BASE.format(slots=2), "b")
    callers = []
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket())
        sock.sendall(b"b.Hang+ work\0")
        callers.append(sock)
    wait_for(lambda: daemon.log_text().count("call b.Hang+ from work") == 2, "the hung calls did not start")
    for sock in callers:
        sock.close()  # the caller is gone: qrexec closed its end
    assert daemon.call(b"b.Echo+ work\0honest", timeout=20) == b"honest"
    assert daemon.log_text().count("call b.Hang+: caller went away") == 2, daemon.log_text()


def test_a_stopping_daemon_does_not_wait_for_a_call_whose_caller_left(start_daemon: type[RunningDaemon]) -> None:
    """A stop waits STOP_TIMEOUT (20 s) for the calls in flight, but not for one whose caller
    has gone meanwhile: the caller watch goes on while the daemon stops (a `systemctl
    restart` of a unit with a hung handler is not 20 s late for a caller long gone)."""
    daemon = start_daemon(BASE.format(slots=2), "b")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(daemon.socket())
        sock.sendall(b"b.Hang+ work\0")
        wait_for(lambda: "call b.Hang+ from work" in daemon.log_text(), "the call did not start")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping: waiting up to" in daemon.log_text(), "the daemon did not start stopping")
    daemon.proc.wait(timeout=15)  # not STOP_TIMEOUT
    log = daemon.log_text()
    assert "call b.Hang+: caller went away" in log and "still running" not in log, log


def test_a_half_closed_caller_is_not_taken_for_gone(start_daemon: type[RunningDaemon]) -> None:
    """A caller that only half-closes (its stdin ended: the agent's shutdown(SHUT_WR)) still
    waits for the reply: its call is not ended."""
    daemon = start_daemon(BASE.format(slots=2), "b")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(daemon.socket())
        sock.sendall(b"b.Hang+ work\0")
        sock.shutdown(socket.SHUT_WR)
        wait_for(lambda: "call b.Hang+ from work" in daemon.log_text(), "the call did not start")
        time.sleep(5)  # two looks at the callers
        assert "caller went away" not in daemon.log_text()


def test_leaked_descriptors_end_the_daemon_instead_of_a_log_loop(start_daemon: type[RunningDaemon]) -> None:
    """A handler that leaked every descriptor: accept() fails with EMFILE and no call of ours
    holds one.  The daemon logs it once and exits (the next call starts a fresh one), where it
    used to log 'accept failed' ten times a second, serving nothing, for good."""
    daemon = start_daemon(BASE.format(slots=8), "b")
    assert daemon.call(b"b.Leak+ work\0") == b"leaked\n"
    # The descriptor the Leak call held comes free when it ends: the handler's thread takes it
    # within 5 ms, but a caller connecting sooner would get it (then its call, waiting for
    # input, holds one for good and the daemon rightly keeps waiting for it to end).
    wait_for(lambda: all_descriptors_taken(daemon.proc.pid), "the handler did not take every descriptor")
    waiting = []
    deadline = time.monotonic() + 20
    while daemon.proc.poll() is None:  # callers keep coming, as qrexec's would
        assert time.monotonic() < deadline, f"the daemon did not exit:\n{daemon.log_text()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(daemon.socket())
            sock.sendall(b"b.Echo+ work\0waiting")
        except OSError:
            pass
        waiting.append(sock)
        time.sleep(0.2)
    for sock in waiting:
        sock.close()
    assert daemon.proc.returncode == 0, daemon.log_text()
    assert daemon.log_text().count("accept failed") == 1, daemon.log_text()
    assert "no call is in flight: exiting" in daemon.log_text()


def all_descriptors_taken(pid: int) -> bool:
    """Whether process ``pid`` has as many descriptors open as its soft RLIMIT_NOFILE allows."""
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    soft = next(int(line.split()[3]) for line in limits if line.startswith("Max open files"))
    return len(os.listdir(f"/proc/{pid}/fd")) >= soft


def test_orphaned_handler_threads_are_bounded(start_daemon: type[RunningDaemon]) -> None:
    """A plain handler that outlives its timeout keeps its thread (a thread cannot be stopped):
    past server.MAX_ORPHANED_THREADS of them the daemon exits and the next call starts a fresh
    one, where 500 calls used to leave 500 threads, counted against the user's TasksMax."""
    from qubes_socksvc import server

    daemon = start_daemon(BASE.format(slots=256), "b")
    calls_at_once(daemon, b"b.HangPlain+ work\0", server.MAX_ORPHANED_THREADS + 8, timeout=20)
    wait_for(lambda: daemon.proc.poll() is not None, "the daemon did not exit", timeout=40)
    assert "plain handlers' threads still run after their calls ended" in daemon.log_text(), daemon.log_text()


def test_the_daemon_keeps_serving_with_exactly_max_orphaned_threads(start_daemon: type[RunningDaemon]) -> None:
    """The limit is a count the daemon may hold: with MAX_ORPHANED_THREADS orphans it serves on,
    the one more past it makes it exit."""
    from qubes_socksvc import server

    daemon = start_daemon(BASE.format(slots=256), "b")
    calls_at_once(daemon, b"b.HangPlain+ work\0", server.MAX_ORPHANED_THREADS, timeout=20)
    wait_for(lambda: daemon.log_text().count("call b.HangPlain+ timed out") == server.MAX_ORPHANED_THREADS,
             "the hung calls did not time out")
    assert daemon.call(b"b.Echo+ work\0", b"still here", timeout=20) == b"still here"
    assert daemon.proc.poll() is None and "threads still run" not in daemon.log_text()
    daemon.call(b"b.HangPlain+ work\0", timeout=20)
    wait_for(lambda: daemon.proc.poll() is not None, "the daemon did not exit", timeout=40)


#: Run in a fresh interpreter (no other test's threads counted): plain handlers' threads counted
#: as orphans while they outlive their call, and only then.
ORPHANS_SCRIPT = """
import asyncio, threading, time
from qubes_socksvc import handlers, testing

counts = [handlers.orphaned_threads()]
release = threading.Event()

def slow(request):
    release.wait(20)
    return b"late"

for _ in range(3):
    try:
        testing.call_handler(slow, timeout=0.05)
    except TimeoutError:
        pass
counts.append(handlers.orphaned_threads())  # three threads outlive their calls
release.set()
while threading.active_count() > 1:
    time.sleep(0.01)
counts.append(handlers.orphaned_threads())  # they returned: none left

started, go = threading.Event(), threading.Event()

def quick(request):
    started.set()
    go.wait(20)
    return b"done"

async def cancelled_just_after_it_returned():
    task = asyncio.ensure_future(testing.async_call_handler(quick))
    while not started.is_set():
        await asyncio.sleep(0.001)
    go.set()
    time.sleep(0.2)  # the loop held: the thread returns before the call is cancelled
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

asyncio.run(cancelled_just_after_it_returned())
counts.append(handlers.orphaned_threads())
print(counts)
"""


def test_plain_handlers_threads_count_as_orphans_only_while_they_outlive_their_call() -> None:
    """The count the daemon exits on (server.MAX_ORPHANED_THREADS) is exact: a thread counts
    from its call's end while it still runs, stops counting when it returns, and one that
    returned just before its call was cancelled never counts."""
    result = subprocess.run([sys.executable, "-c", ORPHANS_SCRIPT], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout.strip() == "[0, 3, 0, 0]", result


def test_a_handlers_own_log_lines_are_cut(start_daemon: type[RunningDaemon]) -> None:
    """A handler logging its caller's 65 000-byte argument: its line is cut to logs.MAX_OTHER_LINE
    with the mark (the daemon's own lines are cut to logs.MAX_LOGGED)."""
    daemon = start_daemon(BASE.format(slots=8), "b")
    argument = "a" * (65000 - len("b.Log+"))
    for _ in range(3):
        assert daemon.call(f"b.Log+{argument} work\0".encode()) == b"ok\n"
    lines = [line for line in daemon.log_text().splitlines() if "got a" in line]
    assert len(lines) == 3, daemon.log_text()[:2000]
    assert all(len(line) < logs.MAX_OTHER_LINE + 200 and "more characters not logged]" in line for line in lines)


@pytest.mark.parametrize("key, value, problem", [
    ("timeout", "1000000000", None),
    ("timeout", "1000000001", "must be at most 1000000000 seconds"),
    ("descriptor_timeout", "1000000000.0", None),
    ("max_input", "9223372036854775807", None),
    ("max_input", "9223372036854775808", "must be at most 9223372036854775807"),
    ("max_connections", "9223372036854775808", "must be at most 9223372036854775807"),
    ("descriptor_timeout", "1.0e+999", "must be a finite number"),  # YAML reads it as float("inf")
    ("idle_exit", "1000000000", None),
    ("idle_exit", "1000000001", "must be at most 1000000000 seconds"),
])
def test_the_largest_numbers_are_those_the_manual_states(key: str, value: str, problem: str | None) -> None:
    """man/qubes-socksvc.yaml.5.rst: a time is at most 1000000000 seconds, any other number at
    most 9223372036854775807 (2**63 - 1); the bound itself is taken."""
    manual = (REPO / "man/qubes-socksvc.yaml.5.rst").read_text()
    assert "1000000000 seconds" in manual and "9223372036854775807" in manual
    if key in ("timeout", "max_input"):  # a service's
        text = BASE.format(slots=4).replace("examples:echo\n", f"examples:echo\n        {key}: {value}\n")
    elif key == "idle_exit":
        text = BASE.format(slots=4).replace("    idle_exit: 0\n", f"    {key}: {value}\n")
    else:  # the daemon's
        text = BASE.format(slots=4).replace("    max_connections: 4\n", f"    {key}: {value}\n")
    assert f"{key}: {value}\n" in text
    if problem is None:
        manifest.parse(text, "/m.yaml")
    else:
        with pytest.raises(manifest.ManifestError, match=problem):
            manifest.parse(text, "/m.yaml")


@pytest.mark.parametrize("key, value, words", [
    ("timeout", "9" * 400, "must be at most"),
    ("timeout", "2000000000", f"must be at most {model.MAX_SECONDS} seconds"),
    ("descriptor_timeout", "1.0e+300", f"must be at most {model.MAX_SECONDS} seconds"),
    ("idle_exit", "9" * 400, "must be at most"),
    ("max_connections", "9" * 400, "must be at most"),
])
def test_numbers_no_timer_takes_are_refused(key: str, value: str, words: str) -> None:
    """A 400-digit timeout passed check and overflowed every call's timer (OverflowError); a
    huge idle_exit silently killed the idle watch.  Times are at most model.MAX_SECONDS."""
    indent = "        " if key == "timeout" else "    "
    text = BASE.format(slots=4)
    if key == "timeout":
        text = text.replace("        timeout: 0.2\n", f"{indent}timeout: {value}\n")
    else:
        text = text.replace("    idle_exit: 0\n", f"    idle_exit: 0\n{indent}{key}: {value}\n") if key != "idle_exit" \
            else text.replace("    idle_exit: 0\n", f"    idle_exit: {value}\n")
        if key == "max_connections":
            text = text.replace("    max_connections: 4\n", "")
    with pytest.raises(manifest.ManifestError, match=words):
        manifest.parse(text, "/m.yaml")
