# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The daemon under careless handlers, a stalled event loop and operator mistakes (issue 11).

Daemon cases run on uvloop's event loop and on asyncio's own (``bench/no_uvloop`` hides uvloop),
and end like the hostile-caller suite: a normal call answered correctly, file descriptors and
RSS back to their baseline (tests/test_hostile.py's :func:`assert_recovered`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, TESTS, RunningDaemon, world_dir
from tests.test_hostile import (
    DESCRIPTOR_TIMEOUT,
    HOSTILE_MANIFEST,
    Baseline,
    assert_recovered,
    connect,
    read_until_closed,
    send_ignoring_reset,
    settle,
    wait_for_log,
)


def honest_service(i: int) -> bytes:
    """Half the honest callers' handlers answer at once, half after awaiting (past the loop turn
    in which a deadline that fired during the stall would cut their connection)."""
    return b"h.FieldsLater" if i % 2 else b"h.Fields"


NO_UVLOOP = REPO / "bench" / "no_uvloop"

CARELESS_MANIFEST = HOSTILE_MANIFEST + """\
      h.PlainFloods:
        handler: handlers:plain_floods
        timeout: 3
      h.PlainStream:
        handler: handlers:plain_floods
      h.Blocks:
        handler: handlers:blocks_the_loop
      h.BlocksLater:
        handler: handlers:blocks_the_loop_later
      h.FieldsLater:
        handler: handlers:fields_later
      h.WritesWithoutDrain:
        handler: handlers:writes_without_drain
      h.WritesWithDrain:
        handler: handlers:writes_with_drain
      h.YieldsForever:
        handler: handlers:yields_forever
        timeout: 0.5
      h.PlainLate:
        handler: handlers:plain_writes_after_timeout
        timeout: 0.3
      h.PlainBlocked:
        handler: handlers:plain_write_when_the_call_ends
        timeout: 1
      h.Concurrency:
        handler: handlers:concurrency
      h.BackendDown:
        handler: handlers:backend_down
      h.FailingCallback:
        handler: handlers:schedules_a_failing_callback
"""

#: What the log must never hold after a careless handler or a vanished caller.
NOISE = ("Traceback", "Exception in callback", "socket.send() raised exception", "RuntimeError", "ERROR")


def loop_env(loop: str) -> dict[str, str]:
    """The daemon's environment for ``loop``: asyncio's own loop when uvloop is hidden."""
    hide = f"{NO_UVLOOP}:" if loop == "asyncio" else ""
    return {"PYTHONPATH": f"{hide}{REPO}:{TESTS}"}


def start(start_daemon: type[RunningDaemon], loop: str, manifest: str = CARELESS_MANIFEST,
          env: dict[str, str] | None = None) -> RunningDaemon:
    daemon = start_daemon(manifest, "h", extra_env=env or loop_env(loop))
    # The socket is bound before the "serving" line is logged: wait for the line, not just the socket.
    wait_for_log(daemon, f"({loop} event loop)")
    return daemon


@pytest.fixture(params=["uvloop", "asyncio"])
def careless(request: pytest.FixtureRequest,
             start_daemon: type[RunningDaemon]) -> Iterator[tuple[RunningDaemon, Baseline]]:
    daemon = start(start_daemon, request.param)
    yield daemon, settle(daemon)


def assert_quiet(daemon: RunningDaemon) -> None:
    text = daemon.log_text()
    for noise in NOISE:
        assert noise not in text, f"{noise!r} logged:\n{text[-3000:]}"


def rss_peak_while(daemon: RunningDaemon, seconds: float) -> int:
    peak, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, daemon.rss_kib())
        time.sleep(0.05)
    return peak


# --- 1. backpressure for plain handlers ----------------------------------------------------------

def test_plain_handler_writing_to_a_non_reader_is_held_back(careless: tuple[RunningDaemon, Baseline]) -> None:
    """A plain handler writes 256 MiB in 64 KiB blocks to a caller that never reads: its thread
    waits at the high-water mark instead of queueing everything (was: 24 -> 280 MiB of RSS)."""
    daemon, base = careless
    with connect(daemon) as sock:
        sock.sendall(b"h.PlainFloods work\0")
        sock.shutdown(socket.SHUT_WR)
        peak = rss_peak_while(daemon, 2.5)
        wait_for_log(daemon, "call h.PlainFloods timed out after 3s")
    assert peak <= base.rss_kib + 8 * 1024, f"RSS {peak} KiB with a non-reader, baseline {base.rss_kib}"
    assert_quiet(daemon)
    assert_recovered(daemon, base)


def test_a_plain_handlers_blocked_write_raises_when_the_call_ends(
        careless: tuple[RunningDaemon, Baseline]) -> None:
    """A plain handler blocked in write() for a caller that does not read learns at once that its
    timeout ended the call: that write() raises ConnectionError, it does not return as if the
    data had been taken."""
    daemon, base = careless
    with connect(daemon) as sock:
        sock.sendall(b"h.PlainBlocked work\0")
        sock.shutdown(socket.SHUT_WR)
        wait_for_log(daemon, "writes ended: ")
    assert "writes ended: ConnectionResetError after 0 late returns" in daemon.log_text(), daemon.log_text()
    assert_recovered(daemon, base)


def test_plain_handler_output_reaches_a_slow_reader_whole(careless: tuple[RunningDaemon, Baseline]) -> None:
    """The same handler, read slowly to the end: every block arrives, in order, memory stays flat."""
    daemon, base = careless
    blocks = 512
    with connect(daemon, timeout=60) as sock:
        sock.sendall(b"h.PlainStream+%d work\0" % blocks)
        sock.shutdown(socket.SHUT_WR)
        received, peak = bytearray(), 0
        while data := sock.recv(1 << 20):
            received += data
            if len(received) % (4 << 20) < len(data):
                peak = max(peak, daemon.rss_kib())
                time.sleep(0.05)
    assert bytes(received) == b"".join(b"%65535d\n" % i for i in range(blocks))
    assert peak <= base.rss_kib + 8 * 1024, f"RSS {peak} KiB while streaming, baseline {base.rss_kib}"
    assert_quiet(daemon)
    assert_recovered(daemon, base)


# --- 2. time limits measured honestly -------------------------------------------------------------

@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("blocker, reply", [(b"h.Blocks+4", b"woke\n"), (b"h.BlocksLater+4", b"later\n")])
def test_descriptor_sent_in_time_is_never_cut_by_a_busy_loop(start_daemon: type[RunningDaemon], loop: str,
                                                             blocker: bytes, reply: bytes) -> None:
    """An async handler blocks the loop for 4 s (descriptor_timeout 2 s), in its own step or in a
    callback it leaves to the loop (then the deadlines fire before the loop reads the sockets, on
    uvloop): the 20 callers that sent their descriptor within 0.5 s are all served, also those
    whose handler awaits (was: all 20 cut, and their handlers run on the cut connections); 5
    callers that sent nothing are cut, and never served later."""
    daemon = start(start_daemon, loop, CARELESS_MANIFEST.replace(
        f"descriptor_timeout: {DESCRIPTOR_TIMEOUT}", "descriptor_timeout: 2"))
    base = settle(daemon)
    honest = [connect(daemon, timeout=30) for _ in range(20)]
    idle = [connect(daemon, timeout=30) for _ in range(5)]
    try:
        deadline = time.monotonic() + 10
        while daemon.fd_count() < base.fds + 25 and time.monotonic() < deadline:
            time.sleep(0.02)  # all 25 accepted: their deadlines run
        with connect(daemon, timeout=30) as sock:
            sock.sendall(blocker + b" work\0")
            sock.shutdown(socket.SHUT_WR)
            time.sleep(0.2)  # the loop is held from here on
            start_sending = time.monotonic()
            for i, caller in enumerate(honest):
                caller.sendall(b"%s+%d work\0" % (honest_service(i), i))
                caller.shutdown(socket.SHUT_WR)
            assert time.monotonic() - start_sending < 0.5
            assert read_until_closed(sock) == reply
        replies = [read_until_closed(caller) for caller in honest]
        served = sum(reply.startswith(b"service=%s+%d\n" % (honest_service(i), i)) for i, reply in enumerate(replies))
        assert served == 20, f"{served} of 20 callers served:\n{daemon.log_text()[-3000:]}"
        for caller in idle:
            send_ignoring_reset(caller, b"h.Fields+late work\0")
            with contextlib.suppress(OSError):
                caller.shutdown(socket.SHUT_WR)
            assert read_until_closed(caller) == b""
    finally:
        for caller in honest + idle:
            caller.close()
    wait_for_log(daemon, "rejected call: no descriptor within 2s", 5)
    assert "h.Fields+late" not in daemon.log_text(), "a handler ran for a connection the deadline had cut"
    if blocker == b"h.Blocks+4":
        assert daemon.log_text().count("held the event loop for 4.") == 1
    assert_quiet(daemon)
    assert_recovered(daemon, base)


# --- 3. finding the culprit ---------------------------------------------------------------------

def test_a_handler_holding_the_loop_is_named_once(careless: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = careless
    assert daemon.call(b"h.Blocks+0.3 work\0") == b"woke\n"
    wait_for_log(daemon, "held the event loop")
    lines = [line for line in daemon.log_text().splitlines() if "held the event loop" in line]
    assert len(lines) == 1
    assert re.search(r"WARNING: call h\.Blocks\+0\.3: handler handlers:blocks_the_loop held the event loop "
                     r"for 0\.[345]\ds", lines[0]), lines[0]
    assert daemon.call(b"h.Blocks+0.3 work\0") == b"woke\n"  # the same stall again: counted, not logged
    assert daemon.call(b"h.Blocks+0.02 work\0") == b"woke\n"  # under the threshold
    assert_recovered(daemon, base)  # honest handlers: no warning
    assert daemon.log_text().count("held the event loop") == 1


# --- 4. quiet, precise logs ---------------------------------------------------------------------

def reset_after_some_output(daemon: RunningDaemon, wire: bytes) -> None:
    """Read a little of the reply, then close with data unread: the daemon's next writes fail."""
    with connect(daemon) as sock:
        sock.sendall(wire)
        sock.shutdown(socket.SHUT_WR)
        got = 0
        while got < 256 << 10:
            got += len(sock.recv(65536))


@pytest.mark.parametrize("wire", [b"h.WritesWithDrain work\0", b"h.WritesWithoutDrain+5000 work\0",
                                  b"h.PlainStream work\0"])
def test_caller_going_away_is_one_info_line(careless: tuple[RunningDaemon, Baseline], wire: bytes) -> None:
    """The caller resets while a handler writes (with drain, without, from a thread): one INFO line
    per call, the handler's later writes dropped in silence (was: RuntimeError tracebacks on
    uvloop, 600,031 "socket.send() raised exception." lines on asyncio's loop)."""
    daemon, base = careless
    service = wire.split(b" ")[0].decode()
    for _ in range(5):
        reset_after_some_output(daemon, wire)
    wait_for_log(daemon, f"INFO: call {service}: caller went away", 5)
    time.sleep(0.5)  # time for anything else a careless handler would make the daemon log
    assert daemon.log_text().count("caller went away") == 5
    assert_quiet(daemon)
    assert_recovered(daemon, base)


def test_plain_handler_writing_after_its_timeout_is_silent(careless: tuple[RunningDaemon, Baseline]) -> None:
    """The call ends at its timeout; the thread wakes up and writes to it: its first write raises
    in the thread, which ends; nothing is logged (was: one traceback per write)."""
    daemon, base = careless
    for _ in range(3):
        assert daemon.call(b"h.PlainLate work\0") == b""
    wait_for_log(daemon, "call h.PlainLate timed out after 0.3s", 3)
    time.sleep(1.5)  # the threads wake after 1 s and write
    assert daemon.log_text().count("h.PlainLate") == 6  # "call ... from work" and "timed out", 3 times
    assert_quiet(daemon)
    assert_recovered(daemon, base)


def test_a_handler_that_only_yields_is_still_ended_by_its_timeout(careless: tuple[RunningDaemon, Baseline]) -> None:
    """A handler busy in a loop of ``await asyncio.sleep(0)`` is cancelled at its timeout like any
    other (the cancellation reaches it at a turn where it awaits no future: handlers.watch_stalls
    passes it on), its call cut and logged as timed out."""
    daemon, base = careless
    for _ in range(3):
        assert daemon.call(b"h.YieldsForever work\0") == b""
    wait_for_log(daemon, "call h.YieldsForever timed out after 0.5s", 3)
    assert_quiet(daemon)
    assert_recovered(daemon, base)


def test_a_handlers_own_connection_error_is_its_fault_not_the_callers(
        careless: tuple[RunningDaemon, Baseline]) -> None:
    """A ConnectionError from the handler's own connection (its backend) while the caller is still
    there is the handler's fault, with its traceback: "caller went away" would send the operator
    looking in the wrong place."""
    daemon, base = careless
    for _ in range(3):
        assert daemon.call(b"h.BackendDown work\0") == b""
    wait_for_log(daemon, "call h.BackendDown from work", 3)
    wait_for_log(daemon, "ConnectionRefusedError: backend down")
    assert "ERROR: call h.BackendDown: handler handlers:backend_down raised" in daemon.log_text()
    assert "caller went away" not in daemon.log_text()
    assert daemon.log_text().count("Traceback") == 1  # the same fault again: counted, not logged
    assert_recovered(daemon, base)


def test_the_loops_own_reports_are_limited_too(careless: tuple[RunningDaemon, Baseline]) -> None:
    """A handler leaves the loop a callback that raises, on every call: asyncio reports each; the
    daemon logs the first with its traceback and holds back the repeats, however the report's
    message varies (it quotes the callback's arguments: here each caller's own)."""
    daemon, base = careless
    for n in range(5):
        assert daemon.call(b"h.FailingCallback+%d work\0" % n) == b"scheduled\n"
    wait_for_log(daemon, "ValueError: a callback of the handler failed")
    time.sleep(0.3)
    assert daemon.log_text().count("Exception in callback") == 1
    assert daemon.log_text().count("Traceback") == 1
    assert_recovered(daemon, base)


# --- 5. socket ownership ------------------------------------------------------------------------

def serve_by_hand(manifest: Path, bind_dir: Path, timeout: float = 30) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qubes_socksvc", "serve", "h", "-c", str(manifest), "--bind-dir", str(bind_dir)],
        env={"PYTHONPATH": f"{REPO}:{TESTS}", "PATH": "/usr/bin:/bin"}, user="nobody", group="nogroup",
        extra_groups=[], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def connect_when_listening(path: Path, timeout: float = 15) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_second_serve_refuses_a_live_socket(start_daemon: type[RunningDaemon]) -> None:
    """Was: a second 'serve' unlinked the live socket and took it over."""
    daemon = start(start_daemon, "uvloop")
    base = settle(daemon)
    before = os.stat(daemon.socket())
    second = serve_by_hand(daemon.manifest, daemon.bind_dir)
    output, _ = second.communicate(timeout=30)
    assert second.returncode == 1, output
    assert f"{daemon.socket()}: a daemon is already listening on this socket" in output
    assert "systemctl --user stop qubes-socksvc-h.socket" in output
    after = os.stat(daemon.socket())
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
    wait_for_log(daemon, "connection closed before sending anything")  # the probe, at INFO
    assert_quiet(daemon)
    assert_recovered(daemon, base)


def test_two_serves_started_at_once_one_wins(start_daemon: type[RunningDaemon]) -> None:
    work = world_dir("socksvc-race-")
    try:
        manifest = work / "m.yaml"
        manifest.write_text(CARELESS_MANIFEST)
        manifest.chmod(0o644)
        bind_dir = work / "sockets"
        bind_dir.mkdir(mode=0o777)
        bind_dir.chmod(0o777)
        rivals = [serve_by_hand(manifest, bind_dir) for _ in range(3)]
        try:
            deadline = time.monotonic() + 30
            while sum(p.poll() is not None for p in rivals) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            running = [p for p in rivals if p.poll() is None]
            assert len(running) == 1, [p.returncode for p in rivals]
            for loser in rivals:
                if loser is not running[0]:
                    assert loser.returncode == 1 and "already listening" in loser.communicate()[0]
            with connect_when_listening(bind_dir / "socksvc-h.sock") as sock:
                sock.sendall(b"h.Upper work\0still one daemon")
                sock.shutdown(socket.SHUT_WR)
                assert read_until_closed(sock) == b"STILL ONE DAEMON"
        finally:
            for rival in rivals:
                if rival.poll() is None:
                    rival.send_signal(signal.SIGTERM)
                rival.communicate(timeout=30)
        assert list(bind_dir.iterdir()) == [], "the winner left its sockets behind"
    finally:
        shutil.rmtree(work)


def test_serve_replaces_a_stale_socket_and_removes_its_own_at_exit(start_daemon: type[RunningDaemon]) -> None:
    work = world_dir("socksvc-stale-")
    try:
        bind_dir = work / "sockets"
        bind_dir.mkdir()
        bind_dir.chmod(0o777)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(bind_dir / "socksvc-h.sock"))  # a killed daemon's: the file, nobody listening
        stale.close()
        (bind_dir / "socksvc-h.sock").chmod(0o666)
        manifest = work / "m.yaml"
        manifest.write_text(CARELESS_MANIFEST)
        manifest.chmod(0o644)
        daemon = serve_by_hand(manifest, bind_dir)
        try:
            with connect_when_listening(bind_dir / "socksvc-h.sock") as sock:
                sock.sendall(b"h.Upper work\0served")
                sock.shutdown(socket.SHUT_WR)
                assert read_until_closed(sock) == b"SERVED"
            # Someone replaces the daemon's raw socket meanwhile: that file is not the daemon's to remove.
            raw = bind_dir / "socksvc-h.Raw.sock"
            raw.unlink()
            replacement = socket.socket(socket.AF_UNIX)
            replacement.bind(str(raw))
            replacement.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            output, _ = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, output
        assert sorted(p.name for p in bind_dir.iterdir()) == ["socksvc-h.Raw.sock"], output
    finally:
        shutil.rmtree(work)


# --- 6. resource limits -------------------------------------------------------------------------

#: Runs the sitecustomize this one shadows on the path, if any (the mutation run's coverage
#: hook, tools/mutate.py), so the daemon's lines are seen as run.
NEXT_SITECUSTOMIZE = """\
import os as _os, sys as _sys
_here = _os.path.dirname(_os.path.abspath(__file__))
for _entry in _sys.path[1:]:
    _next = _os.path.join(_os.path.abspath(_entry or "."), "sitecustomize.py")
    if _os.path.dirname(_next) != _here and _os.path.exists(_next):
        with open(_next) as _f:
            exec(compile(_f.read(), _next, "exec"), {"__file__": _next, "__name__": "sitecustomize"})
        break
"""


@contextlib.contextmanager
def nofile_limit(soft: int, hard: int) -> Iterator[dict[str, str]]:
    """The environment of a daemon that starts with RLIMIT_NOFILE ``soft:hard``: a sitecustomize
    sets it as the interpreter starts (this process's own hard limit is out of reach: lowering it
    cannot be undone without CAP_SYS_RESOURCE)."""
    work = world_dir("socksvc-nofile-")
    try:
        (work / "sitecustomize.py").write_text(
            f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n" + NEXT_SITECUSTOMIZE)
        (work / "sitecustomize.py").chmod(0o644)
        yield {"PYTHONPATH": f"{work}:{REPO}:{TESTS}"}
    finally:
        shutil.rmtree(work)


def daemon_nofile(daemon: RunningDaemon) -> tuple[int, int]:
    for line in Path(f"/proc/{daemon.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_soft_fd_limit_is_raised_to_the_hard_limit(start_daemon: type[RunningDaemon]) -> None:
    with nofile_limit(100, 4096) as env:
        daemon = start(start_daemon, "uvloop", CARELESS_MANIFEST.replace("max_connections: 32", "max_connections: 256"),
                       env)
    assert daemon_nofile(daemon) == (4096, 4096)
    assert "RLIMIT_NOFILE" not in daemon.log_text()
    assert_recovered(daemon, settle(daemon))


def test_a_fd_limit_too_short_for_two_calls_still_serves_one_at_a_time() -> None:
    """Fewer descriptors than FDS_RESERVED + 2 * FDS_PER_CALL: one call at a time, never none
    (a daemon that accepted nothing would leave every caller hanging in the backlog); exactly
    what max_connections needs: all of them, and no warning."""
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d))\n"
              "from qubes_socksvc import server\nprint(server.fd_budget(256))\n")
    for limit, allowed in ((64, 1), (66, 1), (67, 1), (68, 2), (200, 68), (575, 255), (576, 256)):
        done = subprocess.run([sys.executable, "-c", script % (limit, limit)], capture_output=True, text=True,
                              env={"PYTHONPATH": str(REPO)}, timeout=60)
        assert done.returncode == 0 and done.stdout == f"{allowed}\n", (limit, done)
        warned = f"RLIMIT_NOFILE is {limit} (hard limit {limit}): max_connections 256 needs 576" in done.stderr
        assert warned is (limit < 576), done.stderr  # exactly enough: nothing to say


def test_short_fd_limit_lowers_concurrency_instead_of_failing_calls(start_daemon: type[RunningDaemon]) -> None:
    """max_connections 256 needs 576 fds; with 200, the daemon says so and serves 68 calls at once:
    every caller is answered, none gets EMFILE (was: accepted up to the limit, handlers failed)."""
    with nofile_limit(200, 200) as env:
        daemon = start(start_daemon, "uvloop", CARELESS_MANIFEST.replace("max_connections: 32", "max_connections: 256"),
                       env)
    base = settle(daemon)
    assert ("WARNING: RLIMIT_NOFILE is 200 (hard limit 200): max_connections 256 needs 576 file descriptors; "
            "serving at most 68 calls at once") in daemon.log_text()
    replies: list[bytes] = []

    def caller() -> None:
        with connect(daemon, timeout=60) as sock:
            sock.sendall(b"h.Concurrency work\0")
            sock.shutdown(socket.SHUT_WR)
            replies.append(read_until_closed(sock))

    callers = [threading.Thread(target=caller) for _ in range(300)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(60)
    assert len(replies) == 300 and all(replies), f"{sum(map(bool, replies))} of 300 answered"
    assert max(int(reply) for reply in replies) <= 68
    assert "Too many open files" not in daemon.log_text() and "accept failed" not in daemon.log_text()
    assert_quiet(daemon)
    assert_recovered(daemon, base)
