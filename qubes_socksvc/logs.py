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
"""

from __future__ import annotations

import contextvars
import logging
import time
import traceback
from collections.abc import Hashable, Mapping

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
