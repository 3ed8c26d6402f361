# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Run by systemd (JOURNAL_STREAM set), each call is logged to the journal with its fields.

journald itself does not run on this machine: the handler sends to a datagram socket of the
test's own standing in for /run/systemd/journal/socket, and the datagrams are parsed as
journald parses the native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL; journald-native.c).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import pytest

from qubes_socksvc import cli, descriptor, logs, manifest, server
from qubes_socksvc.callcore import Ending, Result
from qubes_socksvc.handlers import HandlerError
from qubes_socksvc.model import Daemon, Service
from qubes_socksvc.request import InputTooLarge, Request
from tests.conftest import REPO
from tests.handlers import QUEUED_OUTPUT


def parse_native(datagram: bytes) -> dict[str, str]:
    """One native-protocol entry, parsed as journald does (journald-native.c:
    server_process_native_message): ``NAME=value`` lines, or ``NAME``, a little-endian 64-bit
    length and that many bytes then ``\\n``; a repeated or invalid name fails the test."""
    entry: dict[str, str] = {}
    rest = datagram
    while rest:
        line_end = rest.index(b"\n")
        line = rest[:line_end]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            rest = rest[line_end + 1:]
        else:
            name, size = line, int.from_bytes(rest[line_end + 1:line_end + 9], "little")
            value = rest[line_end + 9:line_end + 9 + size]
            assert rest[line_end + 9 + size:line_end + 10 + size] == b"\n", "binary field not ended by a newline"
            rest = rest[line_end + 10 + size:]
        key = name.decode("ascii")
        assert logs._FIELD_NAME.fullmatch(key), f"journald drops field {key!r}"
        assert key not in entry, f"field {key} sent twice"
        entry[key] = value.decode()
    return entry


class JournalSink(Sequence[dict[str, str]]):
    """A datagram socket standing in for journald's, read by a thread of its own (a full queue
    would block the daemon, as journald's does): the entries sent so far, in order."""

    MARK = b"SINK_MARK=%d\n"

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self._entries: list[dict[str, str]] = []
        self._marks: set[int] = set()
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
            except OSError:  # closed
                return
            if fds:  # too large for a datagram: a sealed memfd (journal-send.c)
                with os.fdopen(fds[0], "rb") as memfd:
                    data = memfd.read()
            with self._seen:
                if data.startswith(b"SINK_MARK="):
                    self._marks.add(int(data[10:]))
                elif data:
                    self._entries.append(parse_native(data))
                self._seen.notify_all()

    def sync(self) -> list[dict[str, str]]:
        """Every entry sent before this call: a mark sent now is read after all of them (one
        receive queue, first in, first out)."""
        mark = len(self._marks) + 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(self.MARK % mark, self.path)
        with self._seen:
            assert self._seen.wait_for(lambda: mark in self._marks, timeout=30), "the sink's reader is stuck"
            return list(self._entries)

    def __len__(self) -> int:
        return len(self.sync())

    @overload
    def __getitem__(self, index: int) -> dict[str, str]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, str]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, str] | list[dict[str, str]]:
        return self.sync()[index]

    def __iter__(self) -> Iterator[dict[str, str]]:
        return iter(self.sync())

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(10)


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JournalSink]:
    """The daemon's logging as serve sets it up under systemd, its journal socket a sink."""
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    sink = JournalSink(tmp_path_factory.mktemp("journal") / "socket")
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", sink.path)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    cli._setup_logging("mydaemon")
    handler = root.handlers[0]
    assert isinstance(handler, logs.JournalLines) and handler.path == sink.path
    yield sink
    handler.close()
    sink.close()
    root.handlers, root.level = saved[0], saved[1]


FIELDS_MANIFEST = """\
version: 1
daemons:
  t:
    idle_exit: 0
    services:
      t.Echo:
        handler: qubes_socksvc.examples:echo
      t.Raises:
        handler: tests.handlers:raises
      t.Logs:
        handler: tests.handlers:logs_itself
      t.PlainLogs:
        handler: tests.handlers:plain_logs_itself
      t.Blocks:
        handler: tests.handlers:blocks_the_loop
      t.Slow:
        handler: tests.handlers:slow
        timeout: 0.2
"""


async def call(path: str, wire: bytes) -> bytes:
    """One call on the socket at ``path``: send ``wire``, half-close, read the reply to EOF."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(wire)
    writer.write_eof()
    try:
        return await reader.read()
    finally:
        writer.close()


def serve_calls(daemon: Daemon, bind_dir: Path, wires: Iterable[bytes],
                also: Sequence[logging.Handler] = ()) -> list[bytes]:
    """Serve ``daemon`` in this process (its log lines reach the journal fixture), make each call
    in turn on its shared socket in ``bind_dir``, stop; each call's reply.

    Meanwhile the root logger has the daemon's own handlers only, as under ``serve`` (not pytest's
    capturing handler, which would send the line of each call through ``logging``), and ``also``."""
    async def scenario() -> list[bytes]:
        listeners = server.bind_sockets(daemon, str(bind_dir))
        serving = server.Server(daemon)
        running = asyncio.create_task(serving.run(listeners))
        path = str(bind_dir / f"socksvc-{daemon.name}.sock")
        replies = [await call(path, wire) for wire in wires]
        serving.stop()
        await running
        return replies

    root = logging.getLogger()
    saved = root.handlers
    root.handlers = [*(h for h in saved if isinstance(h, logs.LineHandler)), *also]
    try:
        logs.tag_log_handlers()
        return asyncio.run(scenario())
    finally:
        root.handlers = saved


def test_every_line_of_a_call_carries_its_fields(journal: JournalSink, tmp_path: Path) -> None:
    """The daemon's lines (the call, a fault, a stall, a timeout) and the handler's own, from a
    coroutine or a plain handler's thread, all carry SERVICE/SOURCE/TARGET/TARGET_TYPE: one
    journalctl SERVICE=... query shows everything about a service."""
    daemon = manifest.parse(FIELDS_MANIFEST, str(tmp_path / "m.yaml")).daemons["t"]
    calls = {
        b"t.Echo+x work\0hi": "t.Echo+x", b"t.Raises sys-net name dom0\0": "t.Raises",
        b"t.Logs work\0": "t.Logs", b"t.PlainLogs work\0": "t.PlainLogs", b"t.Blocks+0.15 work\0": "t.Blocks+0.15",
        b"t.Slow+5 work\0": "t.Slow+5",
    }
    serve_calls(daemon, tmp_path, calls)
    by_service: dict[str, list[dict[str, Any]]] = {}
    for entry in journal:
        if "SERVICE" in entry:
            by_service.setdefault(entry["SERVICE"], []).append(entry)
    assert set(by_service) == set(calls.values()), [e["MESSAGE"] for e in journal]
    for service, entries in by_service.items():
        assert entries[0]["MESSAGE"].startswith(f"call {service} from ")
        assert all(e["SOURCE"] in ("work", "sys-net") for e in entries)
    assert by_service["t.Raises"][0]["TARGET"] == "dom0" and by_service["t.Raises"][0]["TARGET_TYPE"] == "name"
    assert "RuntimeError: handler failure on purpose" in by_service["t.Raises"][1]["MESSAGE"]
    assert by_service["t.Logs"][1]["MESSAGE"] == "handler's own line"
    assert by_service["t.PlainLogs"][1]["MESSAGE"] == "plain handler's own line"
    assert by_service["t.PlainLogs"][1]["THREAD_NAME"] == "handler t.PlainLogs"  # its thread, named for its call
    assert "held the event loop for 0.1" in by_service["t.Blocks+0.15"][1]["MESSAGE"]
    assert "timed out after 0.2s" in by_service["t.Slow+5"][1]["MESSAGE"]
    # The record names the daemon's own code (Server.started), not logging's machinery.
    assert by_service["t.Echo+x"][0]["CODE_FUNC"] == "started"
    assert by_service["t.Echo+x"][0]["PRIORITY"] == str(6)  # LOG_INFO
    assert by_service["t.Echo+x"][0]["SYSLOG_IDENTIFIER"] == "qubes-socksvc"
    assert by_service["t.Echo+x"][0]["DAEMON"] == "mydaemon"


class Records(logging.Handler):
    """A handler that is not the daemon's own: with it installed, logs.line goes through logging."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


#: What the line of a call on t.Echo+x from work (in dom0's form, to name dom0) sends to the journal.
CALL_LINE_FIELDS = {"MESSAGE": "call t.Echo+x from work to name dom0", "PRIORITY": "6",
                    "LOGGER": "qubes_socksvc.server", "THREAD_NAME": "MainThread", "PROCESS_NAME": "MainProcess",
                    "CODE_FUNC": "started", "SERVICE": "t.Echo+x", "SOURCE": "work", "TARGET": "dom0",
                    "TARGET_TYPE": "name", "SYSLOG_IDENTIFIER": "qubes-socksvc", "DAEMON": "mydaemon"}


def test_the_call_line_reaches_the_journal_with_journalhandlers_fields(journal: JournalSink, tmp_path: Path) -> None:
    """The line each call logs, written straight by the daemon's journal handler (logs.line), is
    one native-protocol entry with the same fields, and values, as the same line through
    ``logging``; and those are what python-systemd's JournalHandler sent for it, less what
    journald drops (lower-case names) and CODE_ARGS, which repeats MESSAGE."""
    daemon = manifest.parse(FIELDS_MANIFEST, str(tmp_path / "m.yaml")).daemons["t"]
    wire = b"t.Echo+x work name dom0\0hi"
    assert serve_calls(daemon, tmp_path, [wire]) == [b"hi"]
    direct = [e for e in journal if e.get("SERVICE") == "t.Echo+x"]
    assert len(direct) == 1
    code = {k: direct[0].pop(k) for k in ("CODE_FILE", "CODE_LINE")}
    assert direct[0] == CALL_LINE_FIELDS
    assert code["CODE_FILE"] == server.__file__ and int(code["CODE_LINE"]) > 0

    records = Records()  # now logs.line takes logging's path: the journal gets the record too
    serve_calls(daemon, tmp_path, [wire], also=[records])
    through_logging = [e for e in journal if e.get("SERVICE") == "t.Echo+x"][1]
    assert through_logging == {**CALL_LINE_FIELDS, **code}
    record = next(r for r in records.records if r.getMessage().startswith("call t.Echo+x"))

    journal_module = pytest.importorskip("systemd.journal")
    sent: dict[str, Any] = {}
    handler = journal_module.JournalHandler(SYSLOG_IDENTIFIER="qubes-socksvc", DAEMON="mydaemon",
                                            sender_function=lambda MESSAGE, **f: sent.update(MESSAGE=MESSAGE, **f))
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(record)
    kept = {k: str(v) for k, v in sent.items() if logs._FIELD_NAME.fullmatch(k) and k != "CODE_ARGS"}
    assert kept == {**CALL_LINE_FIELDS, **code}


def test_the_stderr_lines_are_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not run by systemd, each line goes to stderr as ``qubes-socksvc[DAEMON]: LEVEL: message``:
    the call's line written straight (logs.line), the handler's own and the daemon's other lines
    through ``logging``; the call's line is the same text when it takes logging's path."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        cli._setup_logging("mydaemon")
        assert isinstance(root.handlers[0], logs.StderrLines)
        daemon = manifest.parse(FIELDS_MANIFEST, str(tmp_path / "m.yaml")).daemons["t"]
        serve_calls(daemon, tmp_path, [b"t.Echo+x work\0hi", b"t.Logs work\0"])
        direct = stderr.getvalue()
        stderr.truncate(0)
        stderr.seek(0)
        serve_calls(daemon, tmp_path, [b"t.Echo+x work\0hi", b"t.Logs work\0"], also=[Records()])
        through_logging = stderr.getvalue()
    finally:
        root.handlers, root.level = saved[0], saved[1]
    lines = [line for line in direct.splitlines() if "call" in line or "own line" in line]
    assert lines == ["qubes-socksvc[mydaemon]: INFO: call t.Echo+x from work",
                     "qubes-socksvc[mydaemon]: INFO: call t.Logs from work",
                     "qubes-socksvc[mydaemon]: WARNING: handler's own line"], direct
    assert through_logging == direct


def test_repeated_faults_are_counted_then_logged_once_per_interval() -> None:
    repeats = logs.Repeats(interval=0.2)
    assert repeats.check("a") == 0
    assert [repeats.check("a") for _ in range(3)] == [None, None, None]
    assert repeats.check("b") == 0  # another fault is not held back by the first
    time.sleep(0.25)
    assert repeats.check("a") == 3  # logged again, saying how many were held back
    assert repeats.check("a") is None


class Clock:
    """logs.time as Repeats and the journal handler (its thread too) see it, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_a_fault_is_logged_again_once_its_interval_has_passed_to_the_instant(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1000.0)
    monkeypatch.setattr(logs, "time", clock)
    repeats = logs.Repeats(interval=60.0)
    assert repeats.check("a") == 0
    clock.now = 1059.5
    assert repeats.check("a") is None
    clock.now = 1060.0  # the interval has passed: logged, saying one was held back
    assert repeats.check("a") == 1
    clock.now = 1119.75
    assert repeats.check("a") is None


def test_at_most_repeat_keys_faults_are_remembered_the_oldest_logged_forgotten_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller varying its fault cannot grow the daemon's memory: REPEAT_KEYS faults are
    remembered (each still counted); one more forgets the one logged longest ago, which is not
    the one first seen when that was logged again since."""
    clock = Clock(1000.0)
    monkeypatch.setattr(logs, "time", clock)
    repeats = logs.Repeats(interval=60.0)
    assert repeats.check("a") == 0
    clock.now = 1030.0
    assert repeats.check("b") == 0
    clock.now = 1060.0
    assert repeats.check("a") == 0  # logged again: "b" is now the one logged longest ago
    clock.now = 1061.0
    others = range(logs.REPEAT_KEYS - 2)
    assert [repeats.check(i) for i in others] == [0] * len(others)
    assert [repeats.check(k) for k in ("a", "b", *others)] == [None] * logs.REPEAT_KEYS  # all remembered
    assert repeats.check("new") == 0  # one more: "b" is forgotten
    assert repeats.check("a") is None, "a fault logged a second ago was forgotten"
    assert repeats.check("b") == 0, "the fault logged longest ago was still remembered"


def test_handler_tracebacks_reach_the_journal(journal: JournalSink) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        server.log.exception("call %s: handler %s raised", "my.Service", "m:f", extra={"SERVICE": "my.Service"})
    entry = journal[0]
    assert entry["SERVICE"] == "my.Service" and entry["PRIORITY"] == str(3)
    assert "RuntimeError: boom" in entry["MESSAGE"]
    # as python-systemd's JournalHandler sends it: the traceback alone, a field of its own
    assert entry["EXCEPTION_TEXT"].startswith("Traceback (most recent call last):")
    assert entry["EXCEPTION_TEXT"].endswith("RuntimeError: boom") and entry["MESSAGE"].endswith(entry["EXCEPTION_TEXT"])


def test_stopping_cuts_a_call_that_outlives_the_stop_timeout(journal: JournalSink, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Server.stop: running calls get STOP_TIMEOUT to finish; one still running then is cancelled,
    the log says why, the caller's connection is cut, and the daemon's run() ends."""
    monkeypatch.setattr(server, "STOP_TIMEOUT", 0.3)
    text = FIELDS_MANIFEST.replace("        timeout: 0.2\n", "")  # t.Slow without its timeout
    daemon = manifest.parse(text, str(tmp_path / "m.yaml")).daemons["t"]

    async def scenario() -> bytes:
        listeners = server.bind_sockets(daemon, str(tmp_path))
        serving = server.Server(daemon)
        running = asyncio.create_task(serving.run(listeners))
        call_task = asyncio.create_task(call(str(tmp_path / "socksvc-t.sock"), b"t.Slow+30 work\0"))
        await asyncio.sleep(0.3)  # the call is running
        serving.stop()
        await asyncio.wait_for(running, 10)
        return await asyncio.wait_for(call_task, 10)

    logs.tag_log_handlers()
    assert asyncio.run(scenario()) == b""  # cut, not "done"
    messages = [entry["MESSAGE"] for entry in journal]
    assert "call cancelled: the daemon is stopping" in messages, messages
    assert "stopping: cancelled 1 calls still running" in messages, messages


def test_a_call_cut_by_the_stop_drops_its_queued_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call the stop cancels ends like a failed one (Server._connection: abort unless SERVED):
    the output it had queued is dropped, so its caller cannot take a cut call for a whole one."""
    monkeypatch.setattr(server, "STOP_TIMEOUT", 0.3)
    text = ("version: 1\ndaemons:\n  t:\n    idle_exit: 0\n    services:\n"
            "      t.Writes:\n        handler: tests.handlers:writes_then\n")
    daemon = manifest.parse(text, str(tmp_path / "m.yaml")).daemons["t"]

    async def scenario() -> int:
        listeners = server.bind_sockets(daemon, str(tmp_path))
        serving = server.Server(daemon)
        running = asyncio.create_task(serving.run(listeners))
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "socksvc-t.sock"))
        try:
            writer.write(b"t.Writes+hang work\0")  # queues QUEUED_OUTPUT, then waits forever
            writer.write_eof()
            await asyncio.sleep(0.3)
            serving.stop()
            await asyncio.sleep(0.3 + 0.5)  # past STOP_TIMEOUT: the call has been cancelled
            received = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        await asyncio.wait_for(running, 10)
        return len(received)

    assert asyncio.run(scenario()) < QUEUED_OUTPUT


# --- logs bounded by what the operator needs, not by what a caller sends (issue 22.3) ---------------

VARYING_MANIFEST = """\
version: 1
daemons:
  t:
    idle_exit: 0
    services:
      t.Int:
        handler: tests.handlers:huge
"""
#: The longest argument a caller can send: qrexec's MAX_SERVICE_NAME_LEN (65000) for the whole
#: service part, minus "t.Int+".
LONGEST_ARGUMENT = 65000 - len("t.Int+")


def test_200_varying_faults_log_one_traceback_and_bounded_lines(journal: JournalSink,
                                                                tmp_path: Path) -> None:
    """``int(request.argument)`` (tests.handlers:huge) fails with a message quoting the argument,
    different on every call: the fault is still one (service, exception type), logged once per
    logs.REPEAT_INTERVAL; each call's line and fields show the argument cut to logs.MAX_LOGGED
    characters with logs.CUT_MARK, whatever its length (up to 65 000 bytes, MAX_SERVICE_NAME_LEN)."""
    daemon = manifest.parse(VARYING_MANIFEST, str(tmp_path / "m.yaml")).daemons["t"]
    arguments = [f"x{i:04d}" + ("y" * (LONGEST_ARGUMENT - 5) if i % 10 == 0 else "") for i in range(200)]
    unknown = "u" * (65000 - len("t.Nope+"))  # an undeclared service: its rejection quotes it
    wires = [f"t.Int+{argument} work\0".encode() for argument in arguments] + [f"t.Nope+{unknown} work\0".encode()]
    assert serve_calls(daemon, tmp_path, wires) == [b""] * len(wires)
    messages = [entry["MESSAGE"] for entry in journal if "SERVICE" in entry or "rejected" in entry["MESSAGE"]]
    faults = [m for m in messages if "handler tests.handlers:huge raised" in m]
    assert len(faults) == 1, f"{len(faults)} tracebacks for one fault"
    assert "ValueError: invalid literal for int()" in faults[0]
    calls = [m for m in messages if m.startswith("call t.Int+") and m.endswith(" from work")]
    assert len(calls) == 200
    assert len(messages) == 200 + 1 + 1, messages[-5:]  # the calls, one traceback, the rejection
    cut = logs.CUT_MARK.format(LONGEST_ARGUMENT - logs.MAX_LOGGED + len("t.Int+"))
    assert sum(cut in m for m in calls) == 20
    assert any(m.startswith("rejected call: service t.Nope+uuu") and "more characters not logged" in m
               for m in messages)
    # Every line, and every field python-systemd sends with it, is bounded; not by the caller.
    bound = logs.MAX_LOGGED + 200
    for entry in journal:
        for key, value in entry.items():
            limit = bound * logs.MAX_TRACEBACK_LINES if key in ("MESSAGE", "EXCEPTION_TEXT", "CODE_ARGS", "args",
                                                                 "exc_text") else bound
            assert len(str(value)) < limit, (key, len(str(value)))
    total = sum(len(str(value)) for entry in journal for value in entry.values())
    assert total < 200 * 4 * bound, total  # was ~40 MB: 20 arguments of 65 KB in 6 fields each


def test_cut_says_how_much_it_left_out() -> None:
    assert logs.cut("a" * logs.MAX_LOGGED) == "a" * logs.MAX_LOGGED
    assert logs.cut("a" * (logs.MAX_LOGGED + 7)) == "a" * logs.MAX_LOGGED + logs.CUT_MARK.format(7)


def test_a_traceback_is_cut_line_by_line_and_keeps_its_end() -> None:
    """A handler's exception message may quote the caller's input, newlines included."""
    try:
        raise ValueError("\n".join(f"line {i}" for i in range(500)) + "\n" + "q" * 10000)
    except ValueError as e:
        text = logs.traceback_text(e)
        whole = len("".join(traceback.format_exception(e)).rstrip("\n").split("\n"))
    lines = text.split("\n")
    assert len(lines) == logs.MAX_TRACEBACK_LINES
    # The count is honest: the lines shown (all but this one) and those left out are the whole.
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1] == f"  ...[{whole - (logs.MAX_TRACEBACK_LINES - 1)} lines not logged]"
    assert lines[-2] == "line 499"
    assert lines[-1] == "q" * logs.MAX_LOGGED + logs.CUT_MARK.format(10000 - logs.MAX_LOGGED)


def test_a_lines_datagram_is_its_fields_each_encoded_as_the_protocol_says(tmp_path: Path) -> None:
    """JournalLines.write_line encodes the fields that are the same every call once, and the
    rest of a plain line at once: the datagram is still, byte for byte, each field encoded on
    its own (logs.journal_field), in the same order, whatever the message and values hold
    (newlines, non-ASCII, a lone surrogate), from whichever thread and place the line is written,
    and once many places have written lines (the encoded heads kept are bounded)."""
    handler = logs.JournalLines(str(tmp_path / "socket"), SYSLOG_IDENTIFIER="qubes-socksvc", DAEMON="d")
    sent: list[bytes] = []
    handler.send = sent.append  # type: ignore[method-assign,assignment]

    def expected(level: int, message: str, fields: dict[str, str], where: logs.Where, thread: str) -> bytes:
        return b"".join([logs.journal_field("MESSAGE", message), b"PRIORITY=%d\n" % logs.priority(level),
                         logs.journal_field("LOGGER", "qubes_socksvc.server"),
                         logs.journal_field("THREAD_NAME", thread), b"PROCESS_NAME=MainProcess\n",
                         logs.journal_field("CODE_FILE", where.file), b"CODE_LINE=%d\n" % where.line,
                         logs.journal_field("CODE_FUNC", where.function),
                         *[logs.journal_field(k, v) for k, v in fields.items()],
                         logs.journal_field("SYSLOG_IDENTIFIER", "qubes-socksvc"), logs.journal_field("DAEMON", "d")])

    here = logs.Where.of(test_a_lines_datagram_is_its_fields_each_encoded_as_the_protocol_says)
    cases = [("call t.Echo from work", {"SERVICE": "t.Echo", "SOURCE": "work", "TARGET": "", "TARGET_TYPE": ""}),
             ("two\nlines", {"SERVICE": "t.Echo"}), ("one", {"SERVICE": "t.Echo+a\nb", "SOURCE": "work"}),
             ("one", {"SERVICE": "t.Echo+a\nb"}),
             ("café \udcff", {"SERVICE": "t.É", "SOURCE": "\udcff"}), ("", {}),
             ("fields the handler keeps for itself", {"MESSAGE": "x", "PRIORITY": "1", "SERVICE": "s"})]
    wanted: list[bytes] = []
    try:
        for level in (logging.INFO, logging.WARNING):
            for message, fields in cases:
                kept = {k: v for k, v in fields.items() if k not in ("MESSAGE", "PRIORITY")}
                for where in (here, logs.Where("/f.py", 7, "f"), here):
                    handler.write_line(level, "qubes_socksvc.server", message, fields, where)
                    wanted.append(expected(level, message, kept, where, "MainThread"))
                thread = threading.Thread(target=handler.write_line, name="plain-handler-1",
                                          args=(level, "qubes_socksvc.server", message, fields, here))
                thread.start()
                thread.join()
                wanted.append(expected(level, message, kept, here, "plain-handler-1"))
        for line in range(logs.LINE_HEADS * 2):
            where = logs.Where("/g.py", line, "g")
            handler.write_line(logging.INFO, "qubes_socksvc.server", "m", {}, where)
            wanted.append(expected(logging.INFO, "m", {}, where, "MainThread"))
            assert len(handler._heads) <= logs.LINE_HEADS
        handler.write_line(logging.INFO, "qubes_socksvc.server", "m", {}, here)
        wanted.append(expected(logging.INFO, "m", {}, here, "MainThread"))
        assert sent == wanted
        assert all(parse_native(d) for d in sent)  # journald reads each as one entry of valid fields
    finally:
        handler.close()


def test_a_bug_in_the_daemon_costs_only_the_call_it_hit(journal: JournalSink, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No caller or handler reaches it (a handler's own failure is RAISED, whatever it raises):
    a fault in the daemon's own code while serving one call is logged as an internal error with
    its traceback, that call is cut, and the next call is served."""
    daemon = manifest.parse(FIELDS_MANIFEST, str(tmp_path / "m.yaml")).daemons["t"]
    started = server.Server.started

    def faulty(self: server.Server, request: Request, called: str) -> None:
        if request.argument == "bug":
            raise RuntimeError("a bug in the daemon on purpose")
        started(self, request, called)

    monkeypatch.setattr(server.Server, "started", faulty)
    replies = serve_calls(daemon, tmp_path, [b"t.Echo+bug work\0hi", b"t.Echo work\0after"])
    assert replies == [b"", b"after"]
    errors = [e for e in journal if e.get("PRIORITY") == "3"]
    assert [e["MESSAGE"].split("\n")[0] for e in errors] == ["internal error while serving a call"], errors
    assert "RuntimeError: a bug in the daemon on purpose" in errors[0]["MESSAGE"], errors[0]


def test_a_traceback_of_exactly_the_bound_is_logged_whole() -> None:
    """logs.MAX_TRACEBACK_LINES lines are logged as they are; one more, and the middle is cut."""
    def lines_of(extra: int) -> tuple[list[str], list[str]]:
        try:
            raise ValueError("\n".join(["first", *(f"line {i}" for i in range(extra))]))
        except ValueError as e:
            return (logs.traceback_text(e).split("\n"),
                    "".join(traceback.format_exception(e)).rstrip("\n").split("\n"))

    base = len(lines_of(0)[1])
    shown, whole = lines_of(logs.MAX_TRACEBACK_LINES - base)
    assert len(whole) == logs.MAX_TRACEBACK_LINES and shown == whole
    shown, whole = lines_of(logs.MAX_TRACEBACK_LINES - base + 1)
    assert len(shown) == logs.MAX_TRACEBACK_LINES and shown[1] == "  ...[2 lines not logged]"


def test_a_handlers_record_keeps_its_own_fields_and_gets_the_calls() -> None:
    """CallFields adds the call's journal fields to a record from a handler's own logging, except
    those the record set itself (``extra=``): a handler may name its own TARGET, say."""
    fields = logs.CallFields()
    token = logs.call_fields.set({"SERVICE": "t.Echo", "SOURCE": "work"})
    try:
        own = logging.LogRecord("mine", logging.INFO, __file__, 1, "its own", None, None)
        own.SOURCE = "as the handler says"
        plain = logging.LogRecord("mine", logging.INFO, __file__, 1, "plain", None, None)
        assert fields.filter(own) and fields.filter(plain)
    finally:
        logs.call_fields.reset(token)
    assert (own.SERVICE, own.SOURCE) == ("t.Echo", "as the handler says")  # type: ignore[attr-defined]
    assert (plain.SERVICE, plain.SOURCE) == ("t.Echo", "work")  # type: ignore[attr-defined]


@pytest.mark.parametrize(("length", "cut"), [(logs.MAX_OTHER_LINE, False), (logs.MAX_OTHER_LINE + 1, True)])
def test_a_handlers_line_of_exactly_the_bound_is_kept_whole(length: int, cut: bool) -> None:
    """A line from a handler's own logging: 4096 characters are kept, one more and it is cut."""
    record = logging.LogRecord("mine", logging.INFO, __file__, 1, "%s", ("a" * length,), None)
    logs.CallFields().filter(record)
    assert (record.getMessage() != "a" * length) is cut


def test_the_log_bounds_are_those_docs_daemon_md_states() -> None:
    """What a user reads about the journal is what the daemon does."""
    text = " ".join((REPO / "docs" / "daemon.md").read_text().split())
    for words in ("cut to 256 characters", "at most 64 lines", "lines are cut to 4096 characters",
                  "logged once a minute", "than 10 ms (`logs.HOLD`) after", "at most 128 are held",
                  "At most 1024 such faults are remembered", "kept (at most 64 such heads)"):
        assert words in text, words
    assert (logs.MAX_LOGGED, logs.MAX_TRACEBACK_LINES, logs.MAX_OTHER_LINE, logs.REPEAT_INTERVAL,
            logs.HOLD, logs.HELD_LINES, logs.REPEAT_KEYS, logs.LINE_HEADS) == (256, 64, 4096, 60, 0.01, 128, 1024, 64)


def test_the_daemons_bounds_are_those_the_docs_state() -> None:
    """What a user reads about stopping, reload, status, descriptors and threads is what the
    daemon does."""
    daemon_md = " ".join((REPO / "docs" / "daemon.md").read_text().split())
    handlers_md = " ".join((REPO / "docs" / "handlers.md").read_text().split())
    for words in ("SIGTERM stops accepting and gives in-flight calls 20 s", "**Also every 2 s**",
                  "updated every 2 s when it changes", "needs (2 per call + 64)"):
        assert words in daemon_md, words
    assert "Past 64 such threads still running the daemon exits" in handlers_md
    assert (server.STOP_TIMEOUT, server.SPEC_CHECK_INTERVAL, server.STATUS_INTERVAL, server.FDS_PER_CALL,
            server.FDS_RESERVED, server.MAX_ORPHANED_THREADS) == (20, 2, 2, 2, 64, 64)


def test_a_records_attributes_become_fields_only_under_names_journald_keeps(tmp_path: Path) -> None:
    """journal_field_valid (journal-file.c): upper-case letters, digits and "_", not first a digit
    or "_", at most 64 characters.  A record's other attributes (a handler's ``extra=`` may hold
    any name) are not sent as fields."""
    handler = logs.JournalLines(str(tmp_path / "socket"), SYSLOG_IDENTIFIER="qubes-socksvc")
    sent: list[bytes] = []
    handler.send = sent.append  # type: ignore[method-assign,assignment]
    record = logging.LogRecord("mine", logging.INFO, __file__, 1, "m", None, None, "its_function")
    names = ["KEPT", "K" * 64, "K9_2", "K" * 65, "_TRUSTED", "9LIVES", "lower", "A+B", "A/B", "A:B", "A@B", "+A",
             "/A", ":A", "@A"]
    for name in names:
        setattr(record, name, "v")
    handler.emit(record)
    fields = {line.split(b"=", 1)[0].decode() for line in sent[0].split(b"\n") if b"=" in line}
    assert {name for name in names if name in fields} == {"KEPT", "K" * 64, "K9_2"}


def test_each_level_maps_to_the_priority_python_systemd_gives_it() -> None:
    """The daemon's own journal handler sends PRIORITY= as python-systemd's JournalHandler
    (map_priority) would, for every level, custom ones between and beyond included."""
    from systemd.journal import JournalHandler

    for level in range(0, 80):
        assert logs.priority(level) == JournalHandler.map_priority(level), level


def test_a_line_too_large_for_a_datagram_reaches_journald_in_a_sealed_memfd(tmp_path: Path) -> None:
    """journald-native.c (server_process_native_file) takes a message too large for one datagram
    as a memfd passed with SCM_RIGHTS, and only a sealed one: the line arrives whole, sealed
    against shrinking, growing and writing."""
    import array
    import fcntl

    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "journal"))
    handler = logs.JournalLines(str(tmp_path / "journal"), SYSLOG_IDENTIFIER="qubes-socksvc")
    handler._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a datagram holds ~4 KiB now
    message = "m" * 100_000
    try:
        fds = os.listdir("/proc/self/fd")
        handler.write_line(logging.INFO, "qubes_socksvc.server", message, {"SERVICE": "t.Echo"},
                           logs.Where("f.py", 1, "f"))
        assert sorted(os.listdir("/proc/self/fd")) == sorted(fds)  # the daemon's memfd closed once sent: no fd per line
        sink.settimeout(5)
        data, ancillary, _, _ = sink.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        assert data == b"" and len(ancillary) == 1 and ancillary[0][:2] == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fd = array.array("i", ancillary[0][2][:4])[0]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            assert seals & wanted == wanted
            content = os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)
        assert content.startswith(f"MESSAGE={message}\n".encode()) and b"SERVICE=t.Echo\n" in content
    finally:
        handler.close()
        sink.close()


def test_a_line_that_cannot_be_written_is_said_on_stderr_and_the_daemon_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No journald at the address, or stderr closed: the line is lost, logging says so on stderr
    (Handler.handleError), and nothing is raised into the call that logged it."""
    where = logs.Where("f.py", 1, "f")
    journal = logs.JournalLines(str(tmp_path / "no-journald-here"), SYSLOG_IDENTIFIER="qubes-socksvc")
    closed = io.StringIO()
    closed.close()
    stderr = logs.StderrLines("qubes-socksvc[t]: ", closed)
    record = logging.LogRecord("qubes_socksvc.server", logging.INFO, __file__, 1, "via emit", None, None, "f")
    try:
        journal.write_line(logging.INFO, "qubes_socksvc.server", "the lost line", {}, where)
        journal.emit(record)
        stderr.write_line(logging.INFO, "qubes_socksvc.server", "the other lost line", {}, where)
    finally:
        journal.close()
    said = capsys.readouterr().err
    assert said.count("--- Logging error ---") == 3, said
    assert "the lost line" in said and "via emit" in said and "the other lost line" in said


def test_a_handlers_own_traceback_is_cut_as_the_daemons() -> None:
    """A handler's ``log.exception()`` (a record from outside the daemon, with exc_info) has its
    traceback cut to MAX_TRACEBACK_LINES lines of MAX_LOGGED characters, as the daemon's own."""
    try:
        raise ValueError("\n".join("q" * 1000 for _ in range(500)))
    except ValueError:
        record = logging.LogRecord("mine", logging.ERROR, __file__, 1, "it failed", None, sys.exc_info(), "f")
    logs.CallFields().filter(record)
    assert record.exc_info is None and record.exc_text is not None
    lines = record.exc_text.split("\n")
    assert len(lines) == logs.MAX_TRACEBACK_LINES and "lines not logged]" in lines[1]
    assert all(len(line) <= logs.MAX_LOGGED + len(logs.CUT_MARK) + 10 for line in lines)


def test_an_exception_a_handler_logs_without_raising_it_is_cut_too() -> None:
    """``log.error(..., exc_info=error)`` with an error never raised: no traceback object, and
    its message (which may quote the caller) still cut as a raised one's."""
    error = ValueError("q" * 100_000)
    record = logging.LogRecord("mine", logging.ERROR, __file__, 1, "it failed", None,
                               (type(error), error, error.__traceback__), "f")
    assert record.exc_info is not None and record.exc_info[2] is None
    logs.CallFields().filter(record)
    assert record.exc_info is None and record.exc_text == logs.traceback_text(error)
    assert len(record.exc_text) < logs.MAX_LOGGED + 100


def test_a_line_to_a_stream_is_written_out_at_once(tmp_path: Path) -> None:
    """StderrLines given a buffered stream (a file): each line is out of the process when
    written, as on stderr, not when the buffer fills or the daemon exits."""
    with open(tmp_path / "log", "w", buffering=1 << 16) as stream:
        handler = logs.StderrLines("qubes-socksvc[t]: ", stream)
        handler.write_line(logging.INFO, "qubes_socksvc.server", "call t.Echo from work", {},
                           logs.Where("f.py", 1, "f"))
        assert (tmp_path / "log").read_text() == "qubes-socksvc[t]: INFO: call t.Echo from work\n"


def test_a_line_handler_that_cannot_write_lines_says_so() -> None:
    class Plain(logs.LineHandler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

    with pytest.raises(NotImplementedError):
        Plain().write_line(logging.INFO, "l", "m", {}, logs.Where("f.py", 1, "f"))


def test_the_journal_socket_asks_for_the_send_buffer_journal_send_c_asks_for(tmp_path: Path) -> None:
    """SNDBUF_SIZE (8 MiB) as sd_journal_sendv asks: a burst of lines waits in the buffer rather
    than blocking the daemon.  The kernel caps the ask at net.core.wmem_max and doubles it."""
    cap = int(Path("/proc/sys/net/core/wmem_max").read_text())
    handler = logs.JournalLines(str(tmp_path / "socket"))
    try:
        given = handler._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    finally:
        handler.close()
    assert given == 2 * min(logs.JOURNAL_SNDBUF, cap)


def test_a_closed_journal_handler_leaves_no_socket_open(tmp_path: Path) -> None:
    fds = sorted(os.listdir("/proc/self/fd"))
    handler = logs.JournalLines(str(tmp_path / "socket"))
    assert len(os.listdir("/proc/self/fd")) == len(fds) + 1
    handler.close()
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_a_call_line_reaches_other_handlers_and_filters_through_logging(tmp_path: Path) -> None:
    """logs.line writes a call's line straight to the daemon's own handlers; a handler or filter
    anyone else set up (pytest's caplog, a developer's own, a filter on a logger on the way) gets
    the line through ``logging`` as any other, with the call's fields on its record."""
    fields = {"SERVICE": "t.Echo", "SOURCE": "work", "TARGET": "", "TARGET_TYPE": ""}
    where = logs.Where("/daemon.py", 7, "started")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    parent, child = logging.getLogger("test_line_path"), logging.getLogger("test_line_path.server")
    parent.propagate = False
    parent.setLevel(logging.INFO)
    sink = JournalSink(tmp_path / "journal")
    journal = logs.JournalLines(sink.path)
    try:
        parent.handlers = [journal, Keep()]
        logs.line(child, logging.INFO, "call one", fields, where)
        assert [(r.name, r.getMessage(), r.__dict__["SERVICE"], r.__dict__["SOURCE"], r.pathname, r.lineno,
                 r.funcName) for r in records] == \
            [("test_line_path.server", "call one", "t.Echo", "work", "/daemon.py", 7, "started")]
        assert sink[-1]["MESSAGE"] == "call one" and sink[-1]["SERVICE"] == "t.Echo"
        # A filter on a logger the line passes applies to it: nothing written where it says no.
        parent.handlers = [journal]
        child.addFilter(lambda record: "secret" not in record.getMessage())
        logs.line(child, logging.INFO, "call secret", fields, where)
        logs.line(child, logging.INFO, "call two", fields, where)
        assert [entry["MESSAGE"] for entry in sink] == ["call one", "call two"]
    finally:
        child.filters.clear()
        parent.handlers = []
        journal.close()
        sink.close()


def _ending_table() -> dict[str, str]:
    """docs/daemon.md's table "How each call ends, in the journal": each ending's level ("" for none)."""
    text = (REPO / "docs" / "daemon.md").read_text()
    table = text.split("### How each call ends, in the journal", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {ending.strip(): level.strip() for ending, level, _ in rows[1:]}


_SERVICE = Service("my.Service+arg", "handlers:h", timeout=2.5, socket="/run/my.sock")
#: (the row of docs/daemon.md's table, the Result, the level and message Server.ended logs for it)
_ENDINGS: list[tuple[str, Result, str, str]] = [
    ("served", Result(Ending.SERVED, "my.Service+arg", _SERVICE), "", ""),
    ("no descriptor within `descriptor_timeout`", Result(Ending.LATE), "WARNING",
     "rejected call: no descriptor within 10s"),
    ("closed before the descriptor's NUL", Result(Ending.CUT_SHORT, error=asyncio.IncompleteReadError(b"my.Se", None)),
     "WARNING", "rejected call: connection closed before the descriptor's NUL (5 bytes)"),
    ("closed before sending anything", Result(Ending.EMPTY), "INFO",
     "rejected call: connection closed before sending anything"),
    ("descriptor too long", Result(Ending.TOO_LONG), "WARNING", "rejected call: descriptor longer than 65535 bytes"),
    ("malformed descriptor", Result(Ending.MALFORMED, error=descriptor.DescriptorError("invalid source")), "WARNING",
     "rejected call: invalid source"),
    ("service not handled here", Result(Ending.UNKNOWN, "my.Other"), "WARNING",
     "rejected call: service my.Other is not handled by daemon d"),
    ("caller gone before its descriptor was read", Result(Ending.CALLER_GONE, error=ConnectionResetError()), "INFO",
     "caller went away"),
    ("internal error", Result(Ending.INTERNAL, error=RuntimeError("a bug")), "ERROR",
     "internal error while serving a call"),
    ("service no longer declared (its own socket, after a reload)", Result(Ending.UNDECLARED, service=_SERVICE),
     "WARNING", "rejected call: service my.Service+arg on /run/my.sock is no longer declared"),
    ("handler cannot be loaded (*limited*)",
     Result(Ending.LOAD_FAILED, "my.Service+arg", _SERVICE, HandlerError("no module named 'handlers'")), "ERROR",
     "call my.Service+arg failed: no module named 'handlers'"),
    ("input exceeds `max_input`", Result(Ending.INPUT_TOO_LARGE, "my.Service+arg", _SERVICE,
                                         InputTooLarge("input exceeds max_input (100 bytes)")), "WARNING",
     "call my.Service+arg rejected: input exceeds max_input (100 bytes)"),
    ("timed out", Result(Ending.TIMED_OUT, "my.Service+arg", _SERVICE, TimeoutError()), "WARNING",
     "call my.Service+arg timed out after 2.5s"),
    ("caller went away", Result(Ending.CALLER_GONE, "my.Service+arg", _SERVICE, ConnectionResetError()), "INFO",
     "call my.Service+arg: caller went away"),
    ("handler raised (*limited*)", Result(Ending.RAISED, "my.Service+arg", _SERVICE, ValueError("bad")), "ERROR",
     "call my.Service+arg: handler handlers:h raised"),
]


@pytest.mark.parametrize(("row", "result", "level", "message"), _ENDINGS, ids=[e[0] for e in _ENDINGS])
def test_each_way_a_call_ends_is_logged_as_the_manual_says(row: str, result: Result, level: str, message: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """How a call ended is one line at the level docs/daemon.md's table gives (a served call's
    line is its start line: none more), with the traceback where the table says so."""
    assert _ending_table()[row] == level
    serving = server.Server(Daemon("d", "", "/s"))
    with caplog.at_level(logging.DEBUG, logger="qubes_socksvc"):
        serving.ended(serving.daemon, result)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert logged == ([(level, message)] if level else [])
    if level == "ERROR" and result.ending is not Ending.LOAD_FAILED:
        assert caplog.records[0].exc_text or caplog.records[0].exc_info


def test_the_manuals_table_has_a_row_for_every_ending() -> None:
    """Every callcore.Ending has its row (a new one cannot go unlogged, or undocumented)."""
    assert {e[1].ending for e in _ENDINGS} == set(Ending)
    assert set(_ending_table()) == {e[0] for e in _ENDINGS}


def test_a_call_that_ends_naming_no_service_where_one_is_needed_is_a_bug_said_aloud() -> None:
    """Server.ended refuses a Result that needs its service (to name its socket, handler or
    timeout) and has none: a bug in callcore, raised, never a line with a blank in it."""
    serving = server.Server(Daemon("d", "", "/s"))
    with pytest.raises(AssertionError, match="names no service"):
        serving.ended(serving.daemon, Result(Ending.TIMED_OUT, "my.Service"))


def test_a_fault_with_its_traceback_is_logged_like_one_without(caplog: pytest.LogCaptureFixture) -> None:
    """A handler's fault with its traceback (raised) and one without (cannot be loaded) come from
    the same place (their journal CODE_FILE, CODE_LINE's function and CODE_FUNC: Server._fault),
    and both obey the logging configuration: disabled at ERROR, neither is logged."""
    serving = server.Server(Daemon("d", "", "/s"))
    raised = Result(Ending.RAISED, "my.Service+arg", _SERVICE, ValueError("bad"))
    unloadable = Result(Ending.LOAD_FAILED, "my.Service+arg", _SERVICE, HandlerError("no module"))
    with caplog.at_level(logging.DEBUG, logger="qubes_socksvc"):
        logging.disable(logging.ERROR)
        try:
            serving.ended(serving.daemon, raised)
            serving.ended(serving.daemon, unloadable)
        finally:
            logging.disable(logging.NOTSET)
        assert caplog.records == []
        serving = server.Server(Daemon("d", "", "/s"))  # its faults are new to it (not repeats)
        serving.ended(serving.daemon, raised)
        serving.ended(serving.daemon, unloadable)
    assert [(r.pathname, r.funcName) for r in caplog.records] == [(server.__file__, "_fault")] * 2
    with_traceback, without = caplog.records
    assert with_traceback.exc_text is not None and with_traceback.exc_text.endswith("ValueError: bad")
    assert without.exc_text is None  # no "NoneType: None" under a fault that has no exception
