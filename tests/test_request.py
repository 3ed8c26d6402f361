# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What a plain handler's ``request.write()`` does once the daemon's event loop is gone.

A plain handler runs in a thread of its own, and its writes are handed to the daemon's loop.
When the daemon stops (SIGTERM: the loop cancels every call and closes), a write must tell the
handler that its output is lost, as a gone caller's does (``ConnectionError``), never return
as if the bytes had been sent.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

from qubes_socksvc.connection import Connection
from qubes_socksvc.request import Request
from qubes_socksvc.testing import call_handler


async def _request(sock: socket.socket) -> Request:
    return Request(Connection(sock, asyncio.get_running_loop()), "h.Plain", None, "work", max_input=0)


def _in_thread(write: Callable[[], None]) -> BaseException | None:
    """Call ``write()`` from a thread of its own, as a plain handler does; what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "write() still blocks after the daemon stopped"
    return raised[0] if raised else None


def test_a_plain_handlers_write_after_the_loop_closed_raises() -> None:
    ours, caller = socket.socketpair()
    loop = asyncio.new_event_loop()
    try:
        request = loop.run_until_complete(_request(ours))
    finally:
        loop.close()
    error = _in_thread(lambda: request.write(b"lost"))
    assert isinstance(error, ConnectionResetError) and "daemon has stopped" in str(error)
    caller.close()


def test_a_plain_handlers_write_waiting_on_a_slow_caller_raises_when_the_daemon_stops() -> None:
    """The caller reads nothing, so the write waits for room; then the daemon stops."""
    ours, caller = socket.socketpair()
    caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    loop = asyncio.new_event_loop()
    request = loop.run_until_complete(_request(ours))
    waiting = threading.Event()
    outcome: list[BaseException | None] = []

    def handler() -> None:
        waiting.set()
        outcome.append(_in_thread(lambda: request.write(b"x" * (8 << 20))))

    async def stop_while_it_waits() -> None:
        thread = threading.Thread(target=handler)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, waiting.wait)
        while not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            await asyncio.sleep(0.01)  # the write's drain() is a task of this loop now
        await asyncio.sleep(0.1)
        for task in asyncio.all_tasks():  # what the daemon's stop does to every call
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)

    try:
        loop.run_until_complete(stop_while_it_waits())
    finally:
        loop.close()
        caller.close()
    assert len(outcome) == 1
    error = outcome[0]
    assert isinstance(error, ConnectionResetError) and "daemon has stopped" in str(error), error


def test_request_input_is_the_whole_input_for_a_plain_handler_and_none_for_a_coroutine() -> None:
    """docs/handlers.md: ``request.input`` holds the whole input for plain functions; a coroutine
    reads its input itself, and finds ``request.input`` None (never an AttributeError)."""
    def plain(request: Request) -> bytes:
        return repr(request.input).encode()

    async def coroutine(request: Request) -> bytes:
        return repr(request.input).encode()

    assert call_handler(plain, b"whole") == b"b'whole'"
    assert call_handler(coroutine, b"unread") == b"None"
