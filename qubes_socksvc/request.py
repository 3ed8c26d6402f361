# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The public handler API: one :class:`Request` per qrexec call.

A handler is ``async def handler(request)`` or a plain ``def handler(request)``
(run in a worker thread).  It reads the caller's stdin with :meth:`Request.read`
or ``async for chunk in request``, writes the caller's stdout with
:meth:`Request.write` (then ``await request.drain()`` for backpressure; from a
plain handler's thread, ``write()`` waits by itself), and may return ``bytes``
or ``str``, written before the connection is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator

from . import qrexec
from .connection import Connection
from .qrexec import CHUNK_SIZE


class InputTooLarge(Exception):
    """The caller sent more than the service's ``max_input``.

    Raised once, by the read that crosses the limit; the input is then over for the
    handler: every later read returns ``b""`` (see :meth:`Request.read`).  Let it out and
    the daemon fails the call (logged, connection cut); catch it to answer the caller
    yourself, knowing that what was read is not the whole input.
    """


class Request:
    """One call: the validated descriptor fields plus the caller's streams.

    ``service``, ``argument``, ``source``, ``target_type`` and ``target`` mean
    what qrexec's ``QREXEC_SERVICE_FULL_NAME``, ``QREXEC_SERVICE_ARGUMENT``,
    ``QREXEC_REMOTE_DOMAIN``, ``QREXEC_REQUESTED_TARGET_TYPE`` and
    ``QREXEC_REQUESTED_TARGET`` (or ``..._KEYWORD``, without ``@``) mean to an
    executable service.  A ``service_descriptor: false`` service receives no
    descriptor: there ``service`` is the declared name and ``source`` is None.
    """

    __slots__ = (
        "_connection",
        "_loop",
        "_max_input",
        "_over",
        "_received",
        "_thread",
        "argument",
        "input",
        "name",
        "source",
        "target",
        "target_type",
    )

    def __init__(
        self,
        connection: Connection,
        name: str,
        argument: str | None,
        source: str | None,
        target_type: str | None = None,
        target: str | None = None,
        *,
        max_input: int,
    ) -> None:
        self.name = name
        """The service name without argument, e.g. ``qubes.Filecopy``."""
        self.argument = argument
        """``None`` when called without ``+``, ``""`` for ``NAME+``, else the argument."""
        self.source = source
        self.target_type = target_type
        self.target = target
        self.input: bytes | None = None
        """For plain (non-async) handlers: the whole input, read before the call."""
        self._connection = connection
        self._max_input = max_input
        self._received = 0
        self._over = False
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    @property
    def service(self) -> str:
        """``NAME``, ``NAME+`` or ``NAME+ARG``, exactly as called."""
        return qrexec.full_name(self.name, self.argument)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of input (``b""`` at EOF); with ``n < 0`` all of it.

        Past ``max_input`` the read that crosses it raises :class:`InputTooLarge` and returns
        nothing of what it read; from then on the input is over: every read returns ``b""``
        at once, ``async for`` ends, and ``text()`` is ``""``.  A handler that catches the
        error and reads on thus ends its loop instead of holding the event loop.
        """
        if self._over:
            return b""
        if n >= 0:
            data = await self._connection.read(n)
            self._count(len(data))
            return data
        chunks = []
        while chunk := await self._connection.read(CHUNK_SIZE):
            self._count(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)

    async def text(self, encoding: str = "utf-8") -> str:
        """The whole input decoded: the convenience for small requests."""
        return (await self.read()).decode(encoding)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read(CHUNK_SIZE):
            yield chunk

    def _count(self, size: int) -> None:
        self._received += size
        if self._max_input and self._received > self._max_input:
            self._over = True
            raise InputTooLarge(f"input exceeds max_input ({self._max_input} bytes)")

    def write(self, data: bytes | str) -> None:
        """Queue output for the caller.

        In a coroutine, ``await request.drain()`` afterwards waits for a slow caller.  From a
        plain handler's thread, ``write()`` itself waits while the caller is behind (more than
        connection.HIGH_WATER bytes queued), so output is bounded either way, and it raises
        ``ConnectionError`` once the caller has gone or the call has ended.  Output queued after
        that is dropped: there is nobody left to read it.
        """
        if isinstance(data, str):
            data = data.encode()
        if threading.get_ident() == self._thread:
            self._connection.write(data)  # dropped once the call ended or the caller went away
            return
        write = self._write_and_drain(data)
        try:
            future = asyncio.run_coroutine_threadsafe(write, self._loop)
        except RuntimeError as e:  # the loop is closed: the daemon has stopped
            write.close()  # never to run: not "never awaited"
            raise ConnectionResetError("the daemon has stopped") from e
        try:
            future.result()
        except concurrent.futures.CancelledError as e:  # the daemon stopped while we waited
            raise ConnectionResetError("the daemon has stopped") from e

    async def _write_and_drain(self, data: bytes) -> None:
        self._connection.write(data)
        await self.drain()  # raises once the call has ended: the write was dropped

    async def drain(self) -> None:
        """Wait until the caller has taken enough output (backpressure); raises
        ``ConnectionError`` when the caller has gone."""
        await self._connection.drain()
