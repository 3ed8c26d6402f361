# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``module:callable`` -> a coroutine function taking a Request.

Handlers are imported on their first call, so a daemon starts without paying for
(or failing on) handlers nobody calls.  Plain functions run in a thread of
their own with the whole input already read into ``request.input``; coroutines
run on the event loop, watched for steps that hold it (:func:`watch_stalls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import threading
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .request import Request

if TYPE_CHECKING:  # what mypy checks handlers against; nothing at run time
    Result = bytes | str | None
    Handler = Callable[[Request], Coroutine[Any, Any, Result]]
T = TypeVar("T")

#: Seconds a handler may hold the event loop in one step before it is reported.
STALL_THRESHOLD = 0.1


class HandlerError(Exception):
    """A handler spec that cannot be imported or is not callable."""


def load(spec: str) -> Handler:
    """Import ``module:callable`` and adapt it to ``async (Request) -> Result``."""
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except Exception as e:  # an import can raise anything
        raise HandlerError(f"handler {spec!r} cannot be loaded: {e!r}") from e
    return adapt(target, spec)


def adapt(target: object, name: str = "") -> Handler:
    """A callable as the daemon runs it: a coroutine function as it is, a plain one in a thread."""
    if not callable(target):
        raise HandlerError(f"handler {name or target!r} is not callable")
    if inspect.iscoroutinefunction(target):
        return cast("Handler", target)
    return _threaded(target)


async def invoke(handler: Handler, request: Request, timeout: float,
                 on_stall: Callable[[float], None] | None = None) -> None:
    """One call of an adapted handler, as the daemon makes it: within ``timeout`` (0: none),
    a returned ``bytes``/``str`` written, the output drained.  Raises what the handler
    raised, TimeoutError, or TypeError for a result of another type."""
    if timeout:
        async with asyncio.timeout(timeout):
            await _run(handler, request, on_stall)
    else:
        await _run(handler, request, on_stall)


async def _run(handler: Handler, request: Request, on_stall: Callable[[float], None] | None) -> None:
    call = handler(request)
    result = await (watch_stalls(call, on_stall) if on_stall is not None else call)
    if result is not None:
        if not isinstance(result, (bytes, str)):
            raise TypeError(f"handler returned {type(result).__name__}, expected bytes, str or None")
        request.write(result)
    await request.drain()


_orphans = 0
_orphans_lock = threading.Lock()


def orphaned_threads() -> int:
    """Plain handlers' threads still running after their call ended (timed out, cancelled)."""
    return _orphans


def _orphaned(delta: int) -> None:
    """Count orphans (the caller holds _orphans_lock)."""
    global _orphans
    _orphans += delta


def _threaded(function: Callable[[Request], Any]) -> Handler:
    """Run a plain function in a thread of its own, a daemon thread.

    Not a pool: a thread cannot be cancelled, so a call that outlives its
    ``timeout`` keeps its thread.  In a pool such threads would starve every
    later plain call, and would keep the daemon from exiting on SIGTERM.
    """

    async def run(request: Request) -> Result:
        request.input = await request.read()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # the call timed out or was cancelled meanwhile
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        abandoned = threading.Event()  # set when the call ended without the thread: it is an orphan

        def target() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (function(request), None)
            except BaseException as e:  # SystemExit too: it belongs to the call, not the thread
                outcome = (None, e)
            finally:
                with _orphans_lock:
                    finished.set()
                    if abandoned.is_set():
                        _orphaned(-1)
            with contextlib.suppress(RuntimeError):  # the loop is gone: the daemon stopped
                loop.call_soon_threadsafe(settle, *outcome)

        # In a copy of the call's context: the handler's own log lines carry the call's fields.
        context = contextvars.copy_context()
        finished = threading.Event()
        threading.Thread(target=context.run, args=(target,), name=f"handler {request.service}", daemon=True).start()
        try:
            result = await future
        except asyncio.CancelledError:  # a timeout or a caller gone: the thread runs on
            with _orphans_lock:
                if not finished.is_set():
                    abandoned.set()
                    _orphaned(1)
            raise
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]

    return run


@types.coroutine
def watch_stalls(coro: Coroutine[Any, Any, T], on_stall: Callable[[float], None],
                 threshold: float = STALL_THRESHOLD) -> Generator[Any, Any, T]:
    """Await ``coro``, timing each of its steps: a step is the time it holds the event loop.

    ``on_stall(seconds)`` is called after each step that took ``threshold`` or longer: a
    handler that blocks (``time.sleep``, blocking I/O, long computation) delays every other
    call of the daemon, and this names it.  Costs two clock reads per step.
    """
    clock = time.perf_counter
    send, throw = coro.send, coro.throw
    value: Any = None
    error: BaseException | None = None
    while True:
        start = clock()
        try:
            step = send(value) if error is None else throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            if (held := clock() - start) >= threshold:
                on_stall(held)
        try:
            value, error = (yield step), None
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # cancellation and timeouts go to the handler, as without us
            value, error = None, e


class Registry:
    """Handlers by spec, loaded once each (by ``loader``: :func:`load` unless told)."""

    def __init__(self, loader: Callable[[str], Handler] | None = None) -> None:
        self._loaded: dict[str, Handler] = {}
        self._loader = loader or load

    def get(self, spec: str) -> Handler:
        handler = self._loaded.get(spec)
        if handler is None:
            handler = self._loaded[spec] = self._loader(spec)
        return handler
