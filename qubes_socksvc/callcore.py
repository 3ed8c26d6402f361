# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""One call, from its connection to its outcome: the daemon's code, and the testing kit's.

server.py hands this module each accepted connection; testing.py hands it one end of a
socketpair.  Both run :func:`run`, in named steps: whose call it is (the descriptor read within
its deadline, validated and looked up as qrexec looks it up, or the socket's own service), the
:class:`~qubes_socksvc.request.Request` built, the handler run (handlers.invoke), the
connection ended by the outcome.  They differ only in their :class:`Reporter`: the daemon
counts and logs how each call ended, the kit raises it in the test that made the call.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import socket
from dataclasses import dataclass
from typing import Protocol

from . import descriptor, handlers, logs, qrexec
from .connection import Connection
from .handlers import HandlerError, Registry
from .model import Daemon, Service
from .request import InputTooLarge, Request

#: Seconds a finished call's unread output may linger before the connection is cut.
LINGER_TIMEOUT = 10.0
#: The message of a call task's cancellation when its caller is gone (server._watch_callers).
CALLER_GONE = "caller went away"


class Outcome(enum.Enum):
    """How a call ended: what STATUS= counts, and whether its output may still be flushed."""

    SERVED = "served"
    REJECTED = "rejected"
    """Refused before any handler ran: a bad or late descriptor, an unknown service."""
    FAILED = "failed"
    """The handler raised, timed out, exceeded max_input, or its caller went away."""


class Ending(enum.Enum):
    """How a call ended, in detail: one member for each line the daemon logs about it."""

    SERVED = "served"
    LATE = "no descriptor within descriptor_timeout"
    CUT_SHORT = "closed before the descriptor's NUL"
    EMPTY = "closed before sending anything"
    TOO_LONG = "descriptor too long"
    MALFORMED = "malformed descriptor"
    UNKNOWN = "service not handled here"
    UNDECLARED = "service no longer declared"
    LOAD_FAILED = "handler cannot be loaded"
    INPUT_TOO_LARGE = "input exceeds max_input"
    TIMED_OUT = "timed out"
    CALLER_GONE = "caller went away"
    RAISED = "handler raised"
    INTERNAL = "internal error"

    @property
    def outcome(self) -> Outcome:
        if self is Ending.SERVED:
            return Outcome.SERVED
        return Outcome.REJECTED if self in _REJECTIONS else Outcome.FAILED


_REJECTIONS = frozenset({Ending.LATE, Ending.CUT_SHORT, Ending.EMPTY, Ending.TOO_LONG, Ending.MALFORMED,
                         Ending.UNKNOWN, Ending.UNDECLARED})


@dataclass(frozen=True, slots=True)
class Result:
    """How one call ended, with what its report needs."""

    ending: Ending
    called: str = ""
    """The service as called, cut for the log (logs.cut); "" until a descriptor named it."""
    service: Service | None = None
    """The declared service that served (or was to serve) the call."""
    error: BaseException | None = None
    """What ended it: the handler's exception, TimeoutError, InputTooLarge, the descriptor's fault."""


_SERVED = Result(Ending.SERVED)


class Reporter(Protocol):
    """What the daemon and the testing kit each do with a call's events."""

    def started(self, request: Request, called: str) -> None:
        """The call is known (``called``: its service as called, cut for the log); its handler runs next."""

    def stalled(self, service: Service, called: str, seconds: float) -> None:
        """The handler held the event loop for ``seconds`` in one step (handlers.watch_stalls)."""

    def ended(self, daemon: Daemon, result: Result) -> None:
        """The call is over; its connection is ended next (flushed when SERVED, else cut)."""

    def cancelled(self) -> None:
        """The call's task was cancelled (the daemon is stopping); the connection is cut."""


# --- what a listening socket serves: how a call on it finds its service ---------------


class Serves(abc.ABC):
    """What a listening socket serves; :meth:`identify` is the first step of each call on it."""

    @abc.abstractmethod
    async def identify(self, daemon: Daemon, call: Connection) -> tuple[Service, Request] | Result:
        """The service and request of this call, or how it ended before a handler was found."""


@dataclass(frozen=True)
class ByDescriptor(Serves):
    """The daemon's shared socket: every declared service that reads a descriptor; each call's
    descriptor names its own."""

    async def identify(self, daemon: Daemon, call: Connection) -> tuple[Service, Request] | Result:
        untrusted_descriptor = await _read_descriptor(daemon, call)
        if isinstance(untrusted_descriptor, Result):
            return untrusted_descriptor
        try:
            desc = descriptor.parse(untrusted_descriptor[:-1])
        except descriptor.DescriptorError as e:
            return Result(Ending.MALFORMED, error=e)
        service = lookup(daemon, desc.service)
        if service is None:
            return Result(Ending.UNKNOWN, logs.cut(desc.service))
        return service, Request(call, desc.name, desc.argument, desc.source, desc.target_type, desc.target,
                                max_input=service.max_input)


@dataclass(frozen=True)
class OneService(Serves):
    """A ``service_descriptor: false`` service's own socket: its calls send no descriptor."""

    service: Service

    async def identify(self, daemon: Daemon, call: Connection) -> tuple[Service, Request] | Result:
        bound = self.service
        current = daemon.services.get(bound.full_name)
        if current is None or current.socket != bound.socket:  # removed (or moved) by a reload
            return Result(Ending.UNDECLARED, service=bound)
        name, argument = qrexec.split_service(current.full_name)
        return current, Request(call, name, argument, None, max_input=current.max_input)


def lookup(daemon: Daemon, service: str) -> Service | None:
    """The declared service whose qubes-rpc link qrexec matched for this call.

    qrexec tries key 1 (the service as called, ``+`` appended if it has none), then
    NAME, and stops at the first file it finds (libqrexec/exec.c: find_qrexec_service).
    The first declared key is therefore the one whose link brought the call here; a
    ``service_descriptor: false`` service found that way listens on its own socket,
    so a descriptor naming it on this one is refused, never passed on to NAME.
    """
    for key in qrexec.lookup_keys(service):
        found = daemon.services.get(key)
        if found is not None:
            return found if found.service_descriptor else None
    return None


# --- one call ---------------------------------------------------------------------------


async def run(sock: socket.socket, daemon: Daemon, serves: Serves, registry: Registry,
              reporter: Reporter) -> None:
    """Serve one call on the accepted connection ``sock`` with ``daemon``'s spec, and tell
    ``reporter`` how it ended.  Only a SERVED call's output is flushed (a rejected or failed one
    is cut: the caller sees the connection reset, not a clean end)."""
    call = Connection(sock, asyncio.get_running_loop())
    try:
        result = await _serve(daemon, call, serves, registry, reporter)
    except ConnectionError as e:  # BrokenPipeError and resets too, before a handler ran
        result = Result(Ending.CALLER_GONE, error=e)
    except asyncio.CancelledError as e:
        if not _caller_gone(e):
            call.abort()
            reporter.cancelled()
            raise  # the task ends cancelled, as asked
        result = Result(Ending.CALLER_GONE, error=ConnectionResetError(CALLER_GONE))
    except BaseException as e:  # a handler's SystemExit must not end the daemon
        result = Result(Ending.INTERNAL, error=e)
    try:
        reporter.ended(daemon, result)
    finally:
        await _end(call, result.ending is Ending.SERVED)


async def _serve(daemon: Daemon, call: Connection, serves: Serves, registry: Registry,
                 reporter: Reporter) -> Result:
    found = await serves.identify(daemon, call)
    if isinstance(found, Result):
        return found
    service, request = found
    # The service as called, cut for the log (its argument may be 65 000 bytes); source and
    # target are short already (descriptor.parse: at most 31 and 63 characters).
    called = logs.cut(request.service)
    reporter.started(request, called)
    return await _handle(call, service, request, called, registry, reporter)


async def _read_descriptor(daemon: Daemon, call: Connection) -> bytes | Result:
    """The descriptor with its NUL, received within ``descriptor_timeout``.

    qrexec sends the descriptor as soon as it has connected, so it is usually there when the
    call is accepted: read at once, without a timer.  Otherwise a timer cuts the connection at
    the deadline (a third of asyncio.timeout()'s cost), which ends the read with
    IncompleteReadError; see :class:`_Deadline` for why a descriptor that came in time is never
    refused.
    """
    call.receive_now()
    if not call.waits_for_nul():
        return _descriptor_or_ending(await _until_nul(call), None)
    deadline = _Deadline(call)
    timer = asyncio.get_running_loop().call_later(daemon.descriptor_timeout, deadline.expired)
    try:
        found = await _until_nul(call)
    finally:
        timer.cancel()
    deadline.received = True
    return _descriptor_or_ending(found, deadline)


async def _until_nul(call: Connection) -> bytes | asyncio.IncompleteReadError | asyncio.LimitOverrunError:
    try:
        return await call.read_until_nul(qrexec.MAX_DESCRIPTOR_LEN)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        return e


def _descriptor_or_ending(found: bytes | asyncio.IncompleteReadError | asyncio.LimitOverrunError,
                          deadline: _Deadline | None) -> bytes | Result:
    if isinstance(found, asyncio.LimitOverrunError):
        return Result(Ending.TOO_LONG)
    if deadline is not None and deadline.cut:  # never serve a connection the deadline has cut
        return Result(Ending.LATE)  # for a descriptor read: a net, as _Deadline orders the cut after it
    if isinstance(found, asyncio.IncompleteReadError):
        if found.partial:
            return Result(Ending.CUT_SHORT, error=found)
        return Result(Ending.EMPTY)  # a connect and nothing else: a probe, e.g. a second 'serve'
    return found


async def _handle(call: Connection, service: Service, request: Request, called: str, registry: Registry,
                  reporter: Reporter) -> Result:
    """Run the service's handler (loaded on its first call), and say how that ended."""

    def stalled(seconds: float) -> None:
        reporter.stalled(service, called, seconds)

    try:
        await handlers.invoke(registry.get(service.handler), request, service.timeout, stalled)
    except HandlerError as e:
        return Result(Ending.LOAD_FAILED, called, service, e)
    except InputTooLarge as e:
        return Result(Ending.INPUT_TOO_LARGE, called, service, e)
    except TimeoutError as e:
        return Result(Ending.TIMED_OUT, called, service, e)
    except ConnectionError as e:  # BrokenPipeError and resets too
        if not call.is_closing():  # not the caller's connection: one of the handler's own
            return Result(Ending.RAISED, called, service, e)
        return Result(Ending.CALLER_GONE, called, service, e)
    except asyncio.CancelledError as e:
        if _caller_gone(e):
            return Result(Ending.CALLER_GONE, called, service, ConnectionResetError(CALLER_GONE))
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the task itself is cancelled: run() says so
            raise
        return Result(Ending.RAISED, called, service, e)  # the handler's own CancelledError
    except BaseException as e:  # SystemExit, GeneratorExit, a BaseExceptionGroup: the handler's failure too
        return Result(Ending.RAISED, called, service, e)
    return _SERVED


def _caller_gone(e: asyncio.CancelledError) -> bool:
    """Whether this task was cancelled because its caller is gone (then it is taken back: the
    call ends as CALLER_GONE, its task is not cancelled)."""
    task = asyncio.current_task()
    if task is None or not task.cancelling() or e.args[:1] != (CALLER_GONE,):
        return False
    task.uncancel()
    return True


async def _end(call: Connection, served: bool) -> None:
    """Flush a served call's output (LINGER_TIMEOUT at most); cut any other.

    A lingering connection keeps its call's slot: it still holds an fd and up to the high-water
    mark of output, and max_connections must bound both.
    """
    if served:
        await call.close(LINGER_TIMEOUT)
    else:
        call.abort()


class _Deadline:
    """``descriptor_timeout``, measured honestly.

    The deadline is a timer.  When a handler held the event loop past it, the timer fires once
    the loop is free again, and by then the caller's descriptor may have arrived in time: both
    loops run the callbacks of the sockets that became readable during a stall before they run
    the timers that expired during it (asyncio's queues I/O callbacks first; libuv compares
    timers with the time cached when the iteration began), so the task that reads the NUL has
    been woken but not run.  So the timer cuts the connection one loop turn later, and only if
    the descriptor has still not been received: callbacks run in the order they were
    scheduled, so every task woken before the timer fired has run by then.
    """

    __slots__ = ("call", "cut", "received")

    def __init__(self, call: Connection) -> None:
        self.call = call
        self.received = False
        """The whole descriptor has been read (set by the reading task)."""
        self.cut = False
        """The deadline cut this connection: no handler may run for it."""

    def expired(self) -> None:
        if not self.received:
            asyncio.get_running_loop().call_soon(self._cut_unless_received)

    def _cut_unless_received(self) -> None:
        if not self.received:
            self.cut = True
            self.call.abort()
