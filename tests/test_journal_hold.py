# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A busy daemon's call lines reach the journal in bursts, none lost, none late by more than HOLD.

journald wakes for each datagram that finds it waiting (journald-server.c:
server_process_datagram); that wake-up, not the line, was what a warm call paid over the floor
(issue 26).  So a call's line written less than logs.HOLD after the last line sent is held and
sent with the next ones by the handler's own thread: every line still arrives, in the order
written, at most HOLD late, and a lone call's line at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.processes import Process, drop_privileges_argv
from qubes_socksvc import logs
from tests.conftest import REPO, TESTS, world_dir
from tests.test_logging import Clock, JournalSink

WHERE = logs.Where("/daemon.py", 1, "started")
FIELDS = {"SERVICE": "t.Echo", "SOURCE": "work", "TARGET": "", "TARGET_TYPE": ""}


def write(handler: logs.JournalLines, n: int, first: int = 0, level: int = logging.INFO) -> None:
    """``n`` call lines logged as the daemon logs them (logs.line) by a logger whose parent has
    ``handler``, as the daemon's loggers reach the root logger's handler, at the daemon's level
    (INFO): each line goes straight to the handler, which may hold it."""
    parent = logging.getLogger("test_journal_hold")
    parent.propagate, parent.handlers = False, [handler]
    parent.setLevel(logging.INFO)
    if not handler.filters:
        handler.addFilter(logs.CallFields())  # as logs.tag_log_handlers installs it
    try:
        for i in range(first, first + n):
            logs.line(logging.getLogger("test_journal_hold.server"), level, f"call {i}", FIELDS, WHERE)
    finally:
        parent.handlers = []


def messages(sink: JournalSink) -> list[str]:
    return [entry["MESSAGE"] for entry in sink]


def until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` held (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "not within the time"
        time.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logs.JournalLines, JournalSink]]:
    """A JournalLines holding lines (HOLD 0.5 s, long enough to see on a loaded machine)."""
    monkeypatch.setattr(logs, "HOLD", 0.5)
    sink = JournalSink(tmp_path / "socket")
    handler = logs.JournalLines(sink.path, SYSLOG_IDENTIFIER="qubes-socksvc")
    handler.hold(True)
    yield handler, sink
    handler.close()
    sink.close()


def test_a_lone_line_goes_at_once_and_the_next_ones_within_hold_in_order(
        held: tuple[logs.JournalLines, JournalSink]) -> None:
    handler, sink = held
    write(handler, 1)
    assert messages(sink) == ["call 0"]  # nothing was sent for HOLD: not held
    write(handler, 1, first=99, level=logging.DEBUG)  # below the logger's level: not logged at all
    start = time.monotonic()
    write(handler, 4, first=1)
    assert messages(sink) == ["call 0"]  # held: journald is not woken for each
    waited = until(lambda: len(sink) == 5, timeout=10)
    assert time.monotonic() - start >= logs.HOLD * 0.9, "sent before they were due"
    assert waited < logs.HOLD + 2
    assert messages(sink) == [f"call {i}" for i in range(5)]
    # Once nothing was sent for HOLD, a line goes at once again.
    time.sleep(logs.HOLD * 1.2)
    write(handler, 1, first=5)
    assert messages(sink)[-1] == "call 5"


def test_a_handler_set_to_the_lines_level_holds_them_too(held: tuple[logs.JournalLines, JournalSink]) -> None:
    handler, sink = held
    handler.setLevel(logging.INFO)
    write(handler, 3)
    assert messages(sink) == ["call 0"]
    until(lambda: len(sink) == 3, timeout=10)
    handler.setLevel(logging.WARNING)
    write(handler, 1, first=3)
    time.sleep(logs.HOLD * 1.5)
    assert messages(sink) == ["call 0", "call 1", "call 2"]


def test_any_other_line_sends_the_held_ones_before_itself(held: tuple[logs.JournalLines, JournalSink]) -> None:
    handler, sink = held
    write(handler, 3)
    logger = logging.getLogger("test_journal_hold")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("a warning after three calls")
    finally:
        logger.removeHandler(handler)
    assert messages(sink) == ["call 0", "call 1", "call 2", "a warning after three calls"]


def test_flush_close_and_the_end_of_holding_send_every_line_held(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "HOLD", 60.0)
    sink = JournalSink(tmp_path / "socket")
    handler = logs.JournalLines(sink.path)
    try:
        handler.hold(True)
        write(handler, 3)
        assert messages(sink) == ["call 0"]
        handler.flush()  # logging.shutdown() calls it at exit
        assert messages(sink) == ["call 0", "call 1", "call 2"]
        write(handler, 2, first=3)
        handler.hold(False)
        assert len(sink) == 5
        write(handler, 1, first=5)  # no longer held
        write(handler, 1, first=6)
        assert len(sink) == 7
        handler.hold(True)
        write(handler, 2, first=7)
        handler.close()
        assert messages(sink) == [f"call {i}" for i in range(9)]
    finally:
        handler.close()
        sink.close()


def test_at_most_held_lines_are_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst larger than HELD_LINES is sent as it comes, well before HOLD: journald's receive
    queue (512 datagrams under systemd) is never handed more at once."""
    monkeypatch.setattr(logs, "HOLD", 60.0)
    sink = JournalSink(tmp_path / "socket")
    handler = logs.JournalLines(sink.path)
    try:
        handler.hold(True)
        write(handler, 1 + logs.HELD_LINES - 1)
        assert len(sink) == 1
        write(handler, 1, first=logs.HELD_LINES)
        assert messages(sink) == [f"call {i}" for i in range(1 + logs.HELD_LINES)]
    finally:
        handler.close()
        sink.close()


def journal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "journal"]


def test_a_line_held_alone_is_sent_when_due_and_so_is_one_held_after_the_thread_idled(
        held: tuple[logs.JournalLines, JournalSink]) -> None:
    """The handler's thread sends a single held line HOLD after the last sent (not waiting for a
    second one), and a line held once the thread has nothing left wakes it again."""
    handler, sink = held
    write(handler, 2)
    start = time.monotonic()
    assert messages(sink) == ["call 0"]
    # Due at HOLD: late by a scheduler's delay at most, never by a second (a wait of -1 s taken as
    # "not yet" would spin until then).
    assert until(lambda: len(sink) == 2, timeout=10) < logs.HOLD + 0.9
    write(handler, 1, first=2)  # just after the thread sent: held, and the idle thread woken
    assert until(lambda: len(sink) == 3, timeout=10) < logs.HOLD + 0.9
    assert time.monotonic() - start >= 2 * logs.HOLD * 0.9
    assert messages(sink) == ["call 0", "call 1", "call 2"]


def test_holding_stopped_and_started_again_ends_its_thread_and_starts_another(
        held: tuple[logs.JournalLines, JournalSink]) -> None:
    handler, sink = held
    before = journal_threads()
    write(handler, 2)
    until(lambda: len(sink) == 2, timeout=10)
    assert len(journal_threads()) == len(before) + 1
    handler.hold(False)  # a daemon that stops holding leaves no thread behind
    until(lambda: journal_threads() == before, timeout=5)
    handler.hold(True)
    write(handler, 2, first=2)  # the first goes at once only if nothing was sent for HOLD
    until(lambda: len(sink) == 4, timeout=logs.HOLD + 5)  # held ones sent by a new thread
    assert messages(sink) == [f"call {i}" for i in range(4)]
    handler.close()  # close() ends holding, and its thread, too
    until(lambda: journal_threads() == before, timeout=5)


def test_a_line_is_held_when_less_than_hold_after_the_last_line_sent_whatever_sent_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Less than HOLD after the last one sent": the last sent may be a line sent at once, held
    lines sent by flush(), or any other record; a line exactly HOLD after it goes at once."""
    clock = Clock(1000.0)
    monkeypatch.setattr(logs, "time", clock)
    monkeypatch.setattr(logs, "HOLD", 10.0)  # in the test's clock: the thread never finds one due
    sink = JournalSink(tmp_path / "socket")
    handler = logs.JournalLines(sink.path)
    other = logging.getLogger("test_journal_hold.other")
    other.propagate, other.handlers = False, [handler]
    try:
        handler.hold(True)
        write(handler, 1)  # 1000: sent at once
        clock.now = 1001.0
        write(handler, 1, first=1)  # held
        assert len(sink) == 1
        clock.now = 1100.0
        handler.flush()  # sends "call 1": the last sent is now 1100
        clock.now = 1101.0
        write(handler, 1, first=2)
        assert len(sink) == 2, "a line 1 s after flush() sent held lines went at once"
        clock.now = 1150.0
        handler.flush()
        clock.now = 1200.0
        other.warning("another line")  # nothing held: sent, and the last sent is 1200
        clock.now = 1201.0
        write(handler, 1, first=3)
        assert messages(sink) == ["call 0", "call 1", "call 2", "another line"]
        clock.now = 1300.0
        handler.flush()
        clock.now = 1310.0  # exactly HOLD after the last sent: not less, so not held
        write(handler, 1, first=4)
        assert messages(sink)[-2:] == ["call 3", "call 4"]
    finally:
        other.handlers = []
        handler.close()
        sink.close()


def test_the_thread_sends_held_lines_once_due_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Due means HOLD after the last sent, not a moment later: at that instant the thread sends."""
    clock = Clock(1000.0)
    monkeypatch.setattr(logs, "time", clock)
    monkeypatch.setattr(logs, "HOLD", 0.25)  # what the thread waits, in real seconds, before it looks
    sink = JournalSink(tmp_path / "socket")
    handler = logs.JournalLines(sink.path)
    try:
        handler.hold(True)
        write(handler, 1)  # sent at 1000
        clock.now = 1000.125
        write(handler, 1, first=1)  # held; the thread waits 0.125 s
        clock.now = 1000.25  # then finds it due to the instant (1000 + 0.25: exact in binary)
        until(lambda: len(sink) == 2, timeout=5)
    finally:
        handler.close()
        sink.close()


def test_a_held_line_that_cannot_be_sent_is_said_on_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(logs, "HOLD", 60.0)
    sink = JournalSink(tmp_path / "socket")
    handler = logs.JournalLines(sink.path)
    try:
        handler.hold(True)
        write(handler, 2)
        sink.close()
        os.unlink(sink.path)  # journald gone: the held line cannot be sent
        handler.flush()
    finally:
        handler.close()
    said = capsys.readouterr().err
    assert said.count("--- Logging error ---") == 1 and "call 1" in said, said


def test_lines_held_holds_the_root_loggers_journal_lines_for_the_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What serve runs its event loop in: the root logger's JournalLines hold the calls' lines
    during the block, and from its end send what they hold and hold nothing more."""
    monkeypatch.setattr(logs, "HOLD", 60.0)
    sink = JournalSink(tmp_path / "socket")
    handler = logs.JournalLines(sink.path)
    root = logging.getLogger()
    root.addHandler(handler)
    before = journal_threads()
    try:
        with logs.lines_held():
            write(handler, 3)
            assert messages(sink) == ["call 0"]
        assert messages(sink) == ["call 0", "call 1", "call 2"]
        until(lambda: journal_threads() == before, timeout=5)
        write(handler, 2, first=3)  # less than HOLD after the last sent, and sent at once
        assert len(sink) == 5
    finally:
        root.removeHandler(handler)
        handler.close()
        sink.close()


EXITS_HOLDING = """import logging, sys
from qubes_socksvc import logs
handler = logs.JournalLines(sys.argv[1])
logging.getLogger().addHandler(handler)
handler.hold(True)
logger = logging.getLogger("qubes_socksvc.server")
logger.setLevel(logging.INFO)
for i in range(3):
    logs.line(logger, logging.INFO, f"call {i}", {}, logs.Where("/d.py", 1, "d"))
sys.exit(0)  # still holding: no lines_held() block ended
"""


def test_a_daemon_that_exits_while_holding_lines_exits_and_loses_none(tmp_path: Path) -> None:
    """The holding thread never keeps the process alive, and logging.shutdown() at exit sends
    what is held."""
    sink = JournalSink(tmp_path / "socket")
    try:
        done = subprocess.run([sys.executable, "-c", EXITS_HOLDING, sink.path], cwd=REPO, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert messages(sink) == ["call 0", "call 1", "call 2"]
    finally:
        sink.close()


# --- the daemon as its unit runs it ------------------------------------------------------------

MANIFEST = """\
version: 1
daemons:
  h:
    idle_exit: 0
    services:
      test.Echo:
        handler: qubes_socksvc.examples:echo
      test.Blocks:
        handler: handlers:blocks_the_loop
"""


class JournaledDaemon:
    """``serve h`` as nobody with JOURNAL_STREAM set, as systemd runs it, in a mount namespace of
    its own where /run/systemd is a directory holding the test's journal socket."""

    def __init__(self) -> None:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("needs root and unshare(1) for a private mount namespace")
        self.dir = world_dir("socksvc-journaled-")
        (self.dir / "run" / "journal").mkdir(parents=True)
        (self.dir / "run" / "journal").chmod(0o755)
        self.sink = JournalSink(self.dir / "run" / "journal" / "socket")
        os.chmod(self.sink.path, 0o666)
        (self.dir / "sockets").mkdir(mode=0o777)
        (self.dir / "sockets").chmod(0o777)
        manifest = self.dir / "m.yaml"
        manifest.write_text(MANIFEST)
        manifest.chmod(0o644)
        self.socket = str(self.dir / "sockets" / "socksvc-h.sock")
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /run/systemd && exec "$@"', str(self.dir / "run"), *drop_privileges_argv(),
                sys.executable, "-m", "qubes_socksvc", "serve", "h", "-c", str(manifest),
                "--bind-dir", str(self.dir / "sockets")]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": f"{REPO}:{TESTS}", "HOME": "/tmp",
               "JOURNAL_STREAM": "0:0"}
        self.process = Process("daemon h", argv, self.socket, self.dir / "daemon.log", drop=False, env=env)
        self.process.wait_listening()

    def calls(self) -> list[str]:
        return [e["MESSAGE"] for e in self.sink if e["MESSAGE"].startswith("call ")]

    def call(self, service: str, argument: str = "") -> None:
        from tests.conftest import raw_call

        raw_call(self.socket, f"{service}{'+' + argument if argument else ''} work\0".encode() + b"x")

    def close(self) -> None:
        self.process.stop()
        self.sink.close()


@pytest.fixture
def journaled() -> Iterator[JournaledDaemon]:
    daemon = JournaledDaemon()
    yield daemon
    daemon.close()


def test_a_busy_daemons_lines_all_reach_the_journal_in_order_while_it_serves(journaled: JournaledDaemon) -> None:
    for _ in range(50):
        journaled.call("test.Echo")
    # Not at exit: by the handler's thread, within HOLD of the last one sent.
    until(lambda: len(journaled.calls()) == 50, timeout=logs.HOLD + 5)
    assert journaled.calls() == ["call test.Echo from work"] * 50
    for _ in range(20):
        journaled.call("test.Echo")
    journaled.process.proc.send_signal(signal.SIGTERM)
    assert journaled.process.proc.wait(30) == 0
    assert journaled.calls() == ["call test.Echo from work"] * 70  # those held at the stop too


def test_the_line_of_a_call_whose_handler_holds_the_event_loop_is_not_held_with_it(
        journaled: JournaledDaemon) -> None:
    """The line names the call that holds every other one up: it must reach the journal while
    the handler still blocks, not when the loop runs again."""
    journaled.call("test.Echo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as blocked:
        blocked.connect(journaled.socket)  # at once: its line follows the last by less than HOLD
        blocked.sendall(b"test.Blocks+6 work\0")
        blocked.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        until(lambda: "call test.Blocks+6 from work" in journaled.calls(), timeout=3)
        seen = time.monotonic()
        blocked.settimeout(30)
        assert blocked.recv(16) == b"woke\n"
    assert time.monotonic() - started >= 5 > seen - started, "the line was seen only after the handler"
