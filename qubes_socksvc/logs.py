# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The daemon's log: every line of a call carries the call's journal fields, and a fault that
repeats on every call is logged once a minute, not once a call.

What a caller sends is cut before it is logged (:func:`cut`, :func:`traceback_text`): the
service as called may be 65 000 bytes (qrexec's MAX_SERVICE_NAME_LEN), and a handler's
exception message may quote its input; the log must be bounded by what the operator needs.

The fields live in a context variable: asyncio runs each connection's task in a context of its
own (and handlers.py gives a plain handler's thread a copy), so whatever logs during a call, the
daemon, asyncio or the handler's own ``logging`` calls, is tagged with SERVICE, SOURCE, TARGET
and TARGET_TYPE without passing them around.

Two handlers write the log, both :class:`LineHandler`: :class:`JournalLines` (run by systemd)
sends each line to journald as one native-protocol datagram, :class:`StderrLines` writes it to
stderr.  The line every call logs (:func:`line`) goes straight to them, built once from its
parts: no LogRecord, no filter, no formatter (logging's generic path was 16 µs of a 170 µs warm
call, issue 26).  Any other handler installed (pytest's caplog, a developer's own) gets it
through ``logging`` as before.  While the daemon serves (:func:`lines_held`), a call's line
that follows another by less than HOLD seconds is held and sent with the next ones: journald
then wakes once for a burst of calls, not once for each (:meth:`JournalLines.hold`).
"""

from __future__ import annotations

import array
import contextlib
import contextvars
import errno
import fcntl
import logging
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import NamedTuple, TextIO

#: The journal fields of the call being served in this context (None outside a call).
call_fields: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("call_fields", default=None)

#: Seconds during which a repeated fault is counted rather than logged.
REPEAT_INTERVAL = 60.0
#: Distinct faults remembered at once; beyond that, the oldest are forgotten (logged again).
REPEAT_KEYS = 1024
#: Characters of a caller's string a line or a journal field shows (a qrexec service NAME is at
#: most 255 bytes: a NAME is never cut, a long argument is); the rest is replaced by CUT_MARK.
MAX_LOGGED = 256
#: What replaces the end of a cut string: how many characters were left out.
CUT_MARK = "...[{} more characters not logged]"
#: Lines of a handler's traceback logged (each cut to MAX_LOGGED): the last ones, which end
#: with the exception raised.
MAX_TRACEBACK_LINES = 64
#: Characters of a line logged by anything but the daemon's own code (a handler's ``logging``
#: calls, asyncio): a handler that logs its caller's 65 000-byte argument must not fill the journal.
MAX_OTHER_LINE = 4096


def cut(text: str, limit: int = MAX_LOGGED) -> str:
    """``text``, or its first ``limit`` characters and CUT_MARK."""
    if len(text) <= limit:
        return text
    return text[:limit] + CUT_MARK.format(len(text) - limit)


def traceback_text(error: BaseException) -> str:
    """The traceback ``logging`` would log for ``error``, each line cut, at most
    MAX_TRACEBACK_LINES of them: an exception's message may quote the caller's input."""
    lines = [cut(line) for line in "".join(traceback.format_exception(error)).rstrip("\n").split("\n")]
    if len(lines) > MAX_TRACEBACK_LINES:
        left_out = len(lines) - MAX_TRACEBACK_LINES + 1
        lines = [lines[0], f"  ...[{left_out} lines not logged]", *lines[-(MAX_TRACEBACK_LINES - 2):]]
    return "\n".join(lines)


class CallFields(logging.Filter):
    """Adds the current call's fields to every record that does not set them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("qubes_socksvc"):  # the daemon's own lines are cut already
            _bound(record)
        fields = call_fields.get()
        if fields is not None:
            missing = record.__dict__.keys().isdisjoint  # the usual case: none of them set yet
            if missing(fields):
                record.__dict__.update(fields)
            else:
                for key, value in fields.items():
                    record.__dict__.setdefault(key, value)
        return True


def _bound(record: logging.LogRecord) -> None:
    """Cut a line to MAX_OTHER_LINE characters, and its traceback as the daemon's own."""
    message = record.getMessage()
    if len(message) > MAX_OTHER_LINE:
        record.msg, record.args = cut(message, MAX_OTHER_LINE), None
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text, record.exc_info = traceback_text(record.exc_info[1]), None


def tag_log_handlers(logger: logging.Logger | None = None) -> None:
    """Install :class:`CallFields` on the handlers of ``logger`` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, CallFields) for f in handler.filters):
            handler.addFilter(CallFields())


# --- writing lines: the journal's native protocol, or stderr ---------------------------------

#: Where journald takes native-protocol datagrams: the address libsystemd's sd_journal_sendv
#: sends to (src/libsystemd/sd-journal/journal-send.c), which python-systemd's journal.send calls.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: SO_SNDBUF asked for the journal socket, as journal-send.c does (SNDBUF_SIZE: 8 MiB): a burst
#: of lines waits in the buffer rather than blocking the daemon (the kernel caps it at wmem_max).
JOURNAL_SNDBUF = 8 << 20
#: A field name journald keeps (journal-file.c: journal_field_valid): upper-case letters, digits
#: and "_", not first a digit or "_" (those are journald's trusted fields), at most 64 characters.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
#: Encoded heads of lines (JournalLines._line_head) kept at most: one per level, logger, thread
#: and place that writes lines straight; a thread named anew for each call cannot grow it.
LINE_HEADS = 64
#: Seconds a call's line may be held back (JournalLines.hold): journald wakes for each datagram
#: that finds it waiting (journald-server.c: server_process_datagram, one recvmsg() per wake-up),
#: and that wake-up, not the line, was what a warm call paid over the floor (issue 26).  A line
#: written less than HOLD after the last one sent waits for those that follow, at most HOLD.
HOLD = 0.01
#: Lines held at most: one more sends them all at once (well below journald's receive queue,
#: systemd's net.unix.max_dgram_qlen = 512).
HELD_LINES = 128


class Where(NamedTuple):
    """Where a line is logged from: the journal's CODE_FILE, CODE_LINE and CODE_FUNC."""

    file: str
    line: int
    function: str

    @classmethod
    def of(cls, function: Callable[..., object]) -> Where:
        """The definition of ``function`` (its first line)."""
        code = function.__code__
        return cls(code.co_filename, code.co_firstlineno, code.co_name)


def priority(level: int) -> int:
    """The syslog priority of a ``logging`` level, as python-systemd's JournalHandler.map_priority."""
    if level <= logging.DEBUG:
        return 7  # LOG_DEBUG
    if level <= logging.INFO:
        return 6  # LOG_INFO
    if level <= logging.WARNING:
        return 4  # LOG_WARNING
    if level <= logging.ERROR:
        return 3  # LOG_ERR
    return 2 if level <= logging.CRITICAL else 1  # LOG_CRIT, LOG_ALERT


def journal_field(name: str, value: str) -> bytes:
    r"""One field of a native-protocol datagram (systemd.io/JOURNAL_NATIVE_PROTOCOL):
    ``NAME=value\n``, or, for a value holding a newline, ``NAME\n``, its length as a
    little-endian 64-bit integer, the value and ``\n``."""
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return b"%s\n%s%s\n" % (name.encode("ascii"), len(data).to_bytes(8, "little"), data)
    return b"%s=%s\n" % (name.encode("ascii"), data)


class LineHandler(logging.Handler):
    """A handler that can also write a line from its parts, without a LogRecord (:func:`line`)."""

    def write_line(self, level: int, logger: str, message: str, fields: Mapping[str, str], where: Where) -> None:
        raise NotImplementedError


class JournalLines(LineHandler):
    """Each line to journald, one native-protocol datagram, with the fields python-systemd's
    JournalHandler sends that journald keeps: MESSAGE, PRIORITY, LOGGER, THREAD_NAME,
    PROCESS_NAME, CODE_FILE, CODE_LINE, CODE_FUNC, EXCEPTION_TEXT, the constant ``identifiers``
    (SYSLOG_IDENTIFIER, DAEMON) and the record's upper-case attributes (the call's fields).

    Left out: the record's lower-case attributes, which journald drops anyway (not valid field
    names), CODE_ARGS (the arguments MESSAGE already shows, uncut) and EXCEPTION_INFO (a repr of
    what EXCEPTION_TEXT says).  A datagram too large for the socket goes as a sealed memfd, as
    journal-send.c sends it.
    """

    def __init__(self, path: str | None = None, **identifiers: str) -> None:
        super().__init__()
        self.path = path or JOURNAL_SOCKET
        self._constant = b"".join(journal_field(k, v) for k, v in identifiers.items())
        self._reserved = frozenset({"MESSAGE", "PRIORITY", "LOGGER", "THREAD_NAME", "PROCESS_NAME", "CODE_FILE",
                                    "CODE_LINE", "CODE_FUNC", "EXCEPTION_TEXT", *identifiers})
        self._heads: dict[tuple[int, str, str, Where], bytes] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, JOURNAL_SNDBUF)
        self._holding = False
        self._held: list[tuple[bytes, int, str, str, Mapping[str, str], Where]] = []
        self._sent = -HOLD
        self._due = threading.Condition(self.lock)  # Handler.createLock made it
        self._sender: threading.Thread | None = None

    def hold(self, holding: bool) -> None:
        """From now on (``holding``), a line written with :func:`line` (each call's line) less
        than HOLD seconds after the last one sent is held, and sent with the lines written after
        it at most HOLD seconds later, by a thread of this handler's, started with the first
        line held: a handler that holds the event loop does not hold the lines back.  A line
        that finds nothing sent for HOLD goes at once: a lone call's line is never late.  Any
        other line (a warning, a handler's own) sends the held ones first, so the journal keeps
        the order lines were written in.  ``hold(False)`` sends what is held and holds no more;
        so do flush() and close(), which logging.shutdown() calls at exit.  A daemon killed
        (SIGKILL, a crash in C) loses the lines held: at most the last HOLD seconds' calls, of
        a daemon that logged another line less than HOLD before each of them.
        """
        with self._due:
            self.flush()
            self._holding = holding
            if not holding:  # its thread ends
                self._sender = None
                self._due.notify()

    def flush(self) -> None:
        """Send the lines held (:meth:`hold`), in the order written."""
        with self._due:
            held, self._held = self._held, []
            if held:
                self._sent = time.monotonic()
            for data, *parts in held:
                try:
                    self.send(data)
                except Exception:
                    self.handleError(_record(*parts))  # type: ignore[arg-type]

    def _send_held(self) -> None:
        """The thread that sends held lines when they are due (HOLD after the last line sent)."""
        with self._due:
            while self._holding:
                if not self._held:
                    self._due.wait()
                elif (wait := self._sent + HOLD - time.monotonic()) > 0:
                    self._due.wait(wait)
                else:
                    self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            parts = [journal_field("MESSAGE", message), b"PRIORITY=%d\n" % priority(record.levelno),
                     journal_field("LOGGER", record.name), journal_field("THREAD_NAME", str(record.threadName)),
                     journal_field("PROCESS_NAME", str(record.processName)),
                     journal_field("CODE_FILE", record.pathname), b"CODE_LINE=%d\n" % record.lineno,
                     journal_field("CODE_FUNC", record.funcName)]
            if record.exc_text:
                parts.append(journal_field("EXCEPTION_TEXT", record.exc_text))
            for key, value in record.__dict__.items():
                if key not in self._reserved and _FIELD_NAME.fullmatch(key):
                    parts.append(journal_field(key, str(value)))
            parts.append(self._constant)
            self.flush()  # under the handler's lock (Handler.handle): after the lines held
            self.send(b"".join(parts))
            self._sent = time.monotonic()
        except Exception:
            self.handleError(record)

    def write_line(self, level: int, logger: str, message: str, fields: Mapping[str, str], where: Where) -> None:
        head = self._line_head(level, logger, threading.current_thread().name, where)
        kept = [(k, v) for k, v in fields.items() if k not in self._reserved]
        if "\n" in message or any("\n" in v for _, v in kept):
            data = b"".join([journal_field("MESSAGE", message), head,
                             *[journal_field(k, v) for k, v in kept], self._constant])
        else:  # the usual line: its varying fields encoded at once, as journal_field would
            data = b"".join([f"MESSAGE={message}\n".encode("utf-8", "replace"), head,
                             "".join([f"{k}={v}\n" for k, v in kept]).encode("utf-8", "replace"), self._constant])
        if self._holding:
            with self._due:
                if self._held or time.monotonic() - self._sent < HOLD:
                    self._held.append((data, level, logger, message, fields, where))
                    if len(self._held) == 1:
                        if self._sender is None:
                            self._sender = threading.Thread(target=self._send_held, name="journal", daemon=True)
                            self._sender.start()
                        self._due.notify()
                    elif len(self._held) >= HELD_LINES:
                        self.flush()
                    return
                self._sent = time.monotonic()
        try:
            self.send(data)
        except Exception:
            self.handleError(_record(level, logger, message, fields, where))

    def _line_head(self, level: int, logger: str, thread: str, where: Where) -> bytes:
        """The fields from PRIORITY to CODE_FUNC, encoded once for each place that writes lines
        (the same every call: the daemon's code, not its callers, chooses all of them)."""
        key = (level, logger, thread, where)
        head = self._heads.get(key)
        if head is None:
            head = b"".join([b"PRIORITY=%d\n" % priority(level), journal_field("LOGGER", logger),
                             journal_field("THREAD_NAME", thread), b"PROCESS_NAME=MainProcess\n",
                             journal_field("CODE_FILE", where.file), b"CODE_LINE=%d\n" % where.line,
                             journal_field("CODE_FUNC", where.function)])
            if len(self._heads) >= LINE_HEADS:
                self._heads.clear()
            self._heads[key] = head
        return head

    def send(self, data: bytes) -> None:
        """One datagram to journald; too large for one (EMSGSIZE, ENOBUFS), a sealed memfd
        holding it, passed with SCM_RIGHTS (journald-native.c: server_process_native_file
        accepts a memfd only sealed)."""
        try:
            self._sock.sendto(data, self.path)
            return
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        fd = os.memfd_create("journal-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._due:
            self.hold(False)
            self._sock.close()
        super().close()


class StderrLines(LineHandler, logging.StreamHandler):  # type: ignore[type-arg]
    """Each line to stderr (or ``stream``) as ``PREFIXLEVEL: message``."""

    def __init__(self, prefix: str, stream: TextIO | None = None) -> None:
        logging.StreamHandler.__init__(self, stream or sys.stderr)
        self.prefix = prefix
        self.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(levelname)s: %(message)s"))

    def write_line(self, level: int, logger: str, message: str, fields: Mapping[str, str], where: Where) -> None:
        text = f"{self.prefix}{logging.getLevelName(level)}: {message}{self.terminator}"
        with self.lock:  # type: ignore[union-attr]  # a plain handler's thread may log meanwhile
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(_record(level, logger, message, fields, where))


def line(logger: logging.Logger, level: int, message: str, fields: Mapping[str, str], where: Where) -> None:
    """Log ``message``, formatted already, with a call's ``fields`` (the line every call logs).

    Straight to the handlers when every handler the record would reach is a LineHandler with no
    filter but CallFields (the daemon's own set-up); else through ``logging`` as any line.
    """
    if not logger.isEnabledFor(level):
        return
    handlers = _line_handlers(logger, level)
    if handlers is None:
        logger.handle(_record(level, logger.name, message, fields, where))
        return
    for handler in handlers:
        handler.write_line(level, logger.name, message, fields, where)


@contextlib.contextmanager
def lines_held() -> Iterator[None]:
    """While in the block, the root logger's :class:`JournalLines` hold the calls' lines
    (:meth:`JournalLines.hold`); at its end, what they hold is sent."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, JournalLines)]
    for handler in handlers:
        handler.hold(True)
    try:
        yield
    finally:
        for handler in handlers:
            handler.hold(False)


def _line_handlers(logger: logging.Logger, level: int) -> list[LineHandler] | None:
    """The handlers Logger.callHandlers would call, if each can write a line itself."""
    found: list[LineHandler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if level >= handler.level:
                if not isinstance(handler, LineHandler) or not all(isinstance(f, CallFields)
                                                                   for f in handler.filters):
                    return None
                found.append(handler)
        current = current.parent if current.propagate else None
    return found or None  # none: logging's lastResort, through logging


def _record(level: int, logger: str, message: str, fields: Mapping[str, str], where: Where) -> logging.LogRecord:
    record = logging.LogRecord(logger, level, where.file, where.line, message, None, None, where.function)
    record.__dict__.update(fields)
    return record


class Repeats:
    """Counts repeats of a fault: the first of each REPEAT_INTERVAL is logged, the rest counted.

    ``check(key)`` returns None when the fault must not be logged now, else the number of
    repeats held back since it was last logged (0 the first time).
    """

    def __init__(self, interval: float = REPEAT_INTERVAL) -> None:
        self.interval = interval
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def check(self, key: Hashable) -> int | None:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            self._seen[key] = (seen[0], seen[1] + 1)
            return None
        self._seen.pop(key, None)
        if len(self._seen) >= REPEAT_KEYS:
            del self._seen[next(iter(self._seen))]  # dicts keep insertion order: the oldest
        self._seen[key] = (now, 0)
        return 0 if seen is None else seen[1]
