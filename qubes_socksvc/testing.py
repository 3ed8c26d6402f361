# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Run a handler in-process, as the daemon would, for a service author's tests.

No daemon, root, systemd or qrexec needed: each call runs through the daemon's own
call core (callcore.run) on a real Unix socket pair, from the descriptor it reads and
validates to the end of the connection: the same :class:`~qubes_socksvc.Request`,
the handler adapted exactly as the daemon adapts it (a plain function runs in a
thread of its own with ``request.input``), and the same ``max_input`` and ``timeout``
rules.
What the daemon would log and cut off is raised here instead: ``InputTooLarge``,
``TimeoutError``, ``HandlerError`` (a ``module:callable`` that cannot be
loaded), ``TypeError`` (a wrong return type) or the handler's own exception.
What the daemon would only log is reported as it would log it: an async handler
that holds the event loop (``time.sleep``, blocking I/O) for ``STALL_THRESHOLD``
seconds or more at a time is a :class:`HandlerStalled` warning with the daemon's
own text (pytest lists it; ``-W error::qubes_socksvc.testing.HandlerStalled`` makes
it fail the test), and a WARNING on the ``qubes_socksvc.testing`` logger.

    from qubes_socksvc.testing import call_handler

    def test_greet() -> None:
        assert call_handler("mypkg.rpc:greet", b"Ann", source="work") == b"hello Ann from work\\n"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import warnings
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from . import callcore, descriptor, handlers, qrexec, stalls
from .callcore import ByDescriptor, Ending, OneService, Result
from .chunks import Input, chunks
from .handlers import HandlerError
from .model import Daemon, Manifest, ManifestError, Service
from .qrexec import CHUNK_SIZE
from .request import Request

if TYPE_CHECKING:
    from .handlers import Handler

__all__ = [
    "DEFAULT_MAX_INPUT",
    "STALL_THRESHOLD",
    "CallOptions",
    "HandlerLike",
    "HandlerStalled",
    "Input",
    "async_call_handler",
    "call_handler",
    "check_manifest",
    "stream_handler",
]

#: The manifest's default ``max_input`` (bytes); pass ``max_input=0`` for no limit.
DEFAULT_MAX_INPUT: int = Service.max_input

#: A handler: ``"module:callable"`` as in a manifest, or the function itself.
HandlerLike = str | Callable[[Request], Any]

#: Seconds a handler may hold the event loop at a time before it is reported, as the daemon does.
STALL_THRESHOLD: float = handlers.STALL_THRESHOLD

log = logging.getLogger("qubes_socksvc.testing")


class HandlerStalled(UserWarning):
    """The handler held the event loop: in the daemon every other call would have waited."""


class CallOptions(TypedDict, total=False):
    """The keyword arguments of every call here; see :func:`stream_handler` for their defaults."""

    service: str
    source: str | None
    target_type: str | None
    target: str | None
    max_input: int
    timeout: float


def call_handler(handler: HandlerLike, input: Input = b"", **options: Unpack[CallOptions]) -> bytes:
    """One call of ``handler``; returns all it wrote.  Not for code already in an event loop:
    use :func:`async_call_handler` there."""
    return asyncio.run(async_call_handler(handler, input, **options))


async def async_call_handler(handler: HandlerLike, input: Input = b"", **options: Unpack[CallOptions]) -> bytes:
    """:func:`call_handler` for tests that already run an event loop."""
    return b"".join([chunk async for chunk in stream_handler(handler, input, **options)])


async def stream_handler(
    handler: HandlerLike,
    input: Input = b"",
    *,
    service: str = "x.Test",
    source: str | None = "work",
    target_type: str | None = None,
    target: str | None = None,
    max_input: int = DEFAULT_MAX_INPUT,
    timeout: float = 0,
) -> AsyncGenerator[bytes, None]:
    """One call of ``handler``, its output in chunks as the handler writes them.

    The input is sent as the caller's stdin would be, chunk by chunk with backpressure,
    then half-closed; output is read only as fast as you consume it, so a handler that
    ``await request.drain()``s waits for you, and memory stays bounded on both sides.

    ``service`` is ``NAME``, ``NAME+`` or ``NAME+ARG`` as qrexec passes it; ``source``,
    ``target_type`` and ``target`` are the descriptor's other fields (a keyword target
    without its ``@``).  ``source=None`` is a ``service_descriptor: false`` call.  Invalid
    values raise ``ValueError``, as the daemon would reject the descriptor.
    """
    wire = _descriptor(service, source, target_type, target)
    handler_name = handler if isinstance(handler, str) else _spec_of(handler)
    daemon, serves = _one_service(service, handler_name, wire is not None, max_input, timeout)
    registry = handlers.Registry(lambda _: _adapt(handler))
    reporter = _Reporter()
    loop = asyncio.get_running_loop()
    daemon_end, caller_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    caller_end.setblocking(False)
    tasks: list[asyncio.Task[Any]] = []
    try:
        call = loop.create_task(callcore.run(daemon_end, daemon, serves, registry, reporter))
        sender = loop.create_task(_send(loop, wire or b"", input, caller_end))
        tasks = [call, sender]
        while chunk := await _receive(loop, caller_end):
            yield chunk
        await call
        error = reporter.error()
        if error is not None:
            raise error  # where the daemon would log it and cut the connection
        failure = sender.exception() if sender.done() and not sender.cancelled() else None
        if failure is not None:
            raise failure  # the test's own input failed
    finally:
        for task in tasks:
            task.cancel()
        # Let a cancelled handler run its own finally blocks; their outcome is already known.
        await asyncio.gather(*tasks, return_exceptions=True)
        daemon_end.close()
        caller_end.close()


def check_manifest(path: str) -> Manifest:
    """Validate a manifest like ``qubes-socksvc check``, and import every handler it names.

    Returns the manifest; raises :class:`~qubes_socksvc.manifest.ManifestError` listing
    every problem, one per line.
    """
    from .manifest import load  # PyYAML only for the test that reads a manifest

    manifest = load(path)
    problems = []
    for daemon in manifest.daemons.values():
        for full_name, service in daemon.services.items():
            try:
                handlers.load(service.handler)
            except HandlerError as e:
                problems.append(f"{manifest.path}: daemons.{daemon.name}.services.{full_name}.handler: {e}; "
                                "make the module importable (installed, or on PYTHONPATH) and the name callable")
    if problems:
        raise ManifestError(problems)
    return manifest


# --- the daemon's side of one call ---------------------------------------------


def _descriptor(service: str, source: str | None, target_type: str | None, target: str | None) -> bytes | None:
    """The descriptor the caller sends, NUL included (None: a ``service_descriptor: false``
    call); ValueError where the daemon would reject it."""
    if not qrexec.is_service(service):
        raise ValueError(f"invalid service {service!r}; expected NAME, NAME+ or NAME+ARG in qrexec's charset")
    if (target_type is None) != (target is None):
        raise ValueError("target_type and target go together (the dom0 descriptor form), or neither")
    if source is None:  # service_descriptor: false: the daemon knows the service, nothing else
        if target is not None:
            raise ValueError("a call without descriptor (source=None) has no target")
        return None
    wire = " ".join([service, source] + ([target_type, target] if target_type and target else []))
    try:
        descriptor.parse(wire.encode())
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid descriptor {wire!r}: not ASCII") from e
    except descriptor.DescriptorError as e:
        raise ValueError(f"the daemon would reject the descriptor {wire!r}: {e}") from e
    return wire.encode() + b"\0"


def _one_service(service: str, handler: str, reads_descriptor: bool, max_input: int,
                 timeout: float) -> tuple[Daemon, callcore.Serves]:
    """A daemon declaring the one service called, and what the call's socket serves.

    With a descriptor the service is declared as its NAME (any argument reaches it: qrexec's
    lookup, callcore.lookup); without one, as called, on a socket of its own.
    """
    if reads_descriptor:
        declared = Service(qrexec.split_service(service)[0], handler, max_input=max_input, timeout=timeout)
        serves: callcore.Serves = ByDescriptor()
    else:
        declared = Service(service, handler, service_descriptor=False, socket=_OWN_SOCKET, max_input=max_input,
                           timeout=timeout)
        serves = OneService(declared)
    daemon = Daemon("testing", "the testing kit's", _SHARED_SOCKET, services={declared.full_name: declared})
    return daemon, serves


_SHARED_SOCKET = "(the testing kit's descriptor socket)"
_OWN_SOCKET = "(the testing kit's socket for the service)"


class _Reporter:
    """The kit's callcore.Reporter: a stall is warned of and logged as the daemon logs it (every
    one: the daemon holds back repeats within a minute, and a test is one call); the call's end
    is kept, for the test to raise what the daemon would have logged."""

    def __init__(self) -> None:
        self.result: Result | None = None

    def started(self, request: Request, called: str) -> None:
        pass

    def stalled(self, service: Service, called: str, seconds: float) -> None:
        text = stalls.message(called, service.handler, seconds)
        log.warning("%s", text)
        warnings.warn(HandlerStalled(text), stacklevel=2)

    def ended(self, daemon: Daemon, result: Result) -> None:
        self.result = result

    def cancelled(self) -> None:
        pass

    def error(self) -> BaseException | None:
        """What the test gets instead of the daemon's log line: None for a served call."""
        result = self.result
        if result is None or result.ending is Ending.SERVED:
            return None
        if result.ending.outcome is callcore.Outcome.FAILED and result.error is not None:
            return result.error
        return ValueError(f"the daemon would reject the call: {result.ending.value}"
                          + (f": {result.error}" if result.error is not None else ""))


def _spec_of(function: Callable[[Request], Any]) -> str:
    """``module:callable`` of a function, as a manifest would name it."""
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', None) or type(function).__qualname__}"


def _adapt(handler: HandlerLike) -> Handler:
    """What ``handlers.load`` does, for a spec or for the function itself."""
    return handlers.load(handler) if isinstance(handler, str) else handlers.adapt(handler)


# --- the caller's side: qrexec's agent, as agent.call does it ---------------------
# Raw socket operations, not a stream pair: a failed send (the handler stopped reading)
# must not cost the output still buffered for the caller.


async def _receive(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The caller's next chunk of stdout; ``b""`` at its end.  A daemon that closes with
    unread input pending resets the connection (after all its output): that ends it too."""
    try:
        return await loop.sock_recv(sock, CHUNK_SIZE)
    except ConnectionResetError:
        return b""


async def _send(loop: asyncio.AbstractEventLoop, wire: bytes, input: Input, sock: socket.socket) -> None:
    """The descriptor, then the caller's stdin: every chunk as the socket takes it (backpressure),
    then half-close.  A handler that stops reading ends it quietly, as it ends qrexec's agent."""
    try:
        if wire:
            await loop.sock_sendall(sock, wire)
        async for chunk in chunks(input):
            try:
                await loop.sock_sendall(sock, chunk)
            except OSError:  # broken pipe, reset: the handler closed without reading everything
                return
    finally:  # also when the input itself fails: the handler must not wait for more
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
