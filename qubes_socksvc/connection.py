# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A caller's connection: the accepted socket, read and written with its own non-blocking calls.

An asyncio transport with its protocol and streams cost a call more than everything else the
call does: a transport, a protocol, a StreamReader, a StreamWriter and three futures per
connection, the peer's and the socket's own address fetched, three callbacks scheduled and an
epoll registration before the first byte is read (bench/RESULTS.md, "the call path without
transports").  A call needs less: read up to a NUL, read on to EOF, write with a bound on what
waits unsent, end flushed or cut.  So each is tried on the socket first (``recv()``/``send()``),
and the event loop is asked to watch it (``add_reader``/``add_writer``) only when the kernel
says EAGAIN.  A caller that sent its descriptor and input before the call was accepted, as
qrexec does, is then served without an event loop round trip.

The semantics are those of the streams the daemon used before, which handlers and tests rely on:
``read(n)`` returns up to ``n`` buffered or received bytes (``b""`` at EOF), output waits in a
buffer past what the socket takes and :meth:`drain` waits while more than :data:`HIGH_WATER`
bytes wait (until :data:`LOW_WATER`), an error of the socket ends the connection and is raised
by the read or drain that meets it, and a connection the daemon cut reads as EOF.
"""

from __future__ import annotations

import asyncio
import socket

#: Output queued past what the socket took before drain() waits, and where it resumes:
#: asyncio's transports' defaults (selector_events: _FlowControlMixin), so handlers see the
#: backpressure they saw before.
HIGH_WATER = 64 * 1024
LOW_WATER = HIGH_WATER // 4
#: Bytes asked of the kernel at once while looking for the descriptor's NUL: an asyncio socket
#: transport's read size (selector_events: _SelectorSocketTransport.max_size).
RECV_SIZE = 256 * 1024


class Connection:
    """One accepted connection (``sock``, made non-blocking); see the module's docstring."""

    __slots__ = ("_buffer", "_closing", "_drained", "_eof", "_error", "_fd", "_flushed", "_loop", "_out",
                 "_paused", "_readable", "_reading", "_sock")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = loop
        self._buffer = bytearray()  # received, not yet read
        self._eof = False
        self._error: OSError | None = None
        self._closing = False  # no more output is taken: the call ended, or the connection is lost
        self._out = bytearray()  # output the socket has not taken yet
        self._paused = False  # more than HIGH_WATER waits: drain() waits until LOW_WATER
        self._readable: asyncio.Future[None] | None = None
        self._reading = False  # the loop watches the socket for input (for room for output: while _out holds any)
        self._drained: list[asyncio.Future[None]] = []
        self._flushed: asyncio.Future[None] | None = None

    # --- input -----------------------------------------------------------------------------

    def receive_now(self) -> None:
        """Take what the caller has sent so far into the buffer, without waiting."""
        self._buffer += self._recv(RECV_SIZE)

    def waits_for_nul(self) -> bool:
        """Whether :meth:`read_until_nul` would wait: no NUL received yet, and no EOF."""
        return not self._eof and b"\0" not in self._buffer

    async def read_until_nul(self, limit: int) -> bytes:
        """Through the first NUL, as ``StreamReader(limit=limit).readuntil(b"\\0")`` reads it:
        LimitOverrunError once more than ``limit`` bytes came without one or the NUL lies past
        ``limit``, IncompleteReadError (with what came) at EOF without one."""
        start = 0
        while (end := self._buffer.find(b"\0", start)) < 0:
            start = len(self._buffer)
            if start > limit:
                raise asyncio.LimitOverrunError("no NUL within the limit", start)
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buffer), None)
            await self._wait_readable()
            self._buffer += self._recv(RECV_SIZE)
        if end > limit:
            raise asyncio.LimitOverrunError("the NUL lies past the limit", end)
        found = bytes(self._buffer[:end + 1])
        del self._buffer[:end + 1]
        return found

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of input (``b""`` at EOF, and for ``n == 0``)."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
            return data
        while n and not self._eof:
            if data := self._recv(n):
                return data
            await self._wait_readable()
        return b""

    def _recv(self, n: int) -> bytes:
        """What one recv() gave: b"" at EOF (or once the connection ended) and when nothing
        waits.  An error of the socket ends the connection and is raised."""
        if self._eof:
            return b""
        try:
            data = self._sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:
            self._lose(e)
            raise
        if not data:  # a socket watched for input stops being watched at its next turn (_on_readable)
            self._eof = True
        return data

    async def _wait_readable(self) -> None:
        if self._eof:  # the recv() before found it
            return
        self._readable = self._loop.create_future()
        if not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        try:
            await self._readable
        finally:
            self._readable = None

    def _on_readable(self) -> None:
        if self._readable is None:  # nobody reads now: stop watching until someone does
            self._stop_reading()
        elif not self._readable.done():
            self._readable.set_result(None)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    # --- output ----------------------------------------------------------------------------

    def is_closing(self) -> bool:
        """The connection takes no more output: the call ended, or the caller is gone."""
        return self._closing

    def write(self, data: bytes) -> None:
        """Send ``data``, or what the socket does not take yet once it has room; dropped once
        :meth:`is_closing`."""
        if self._closing or not data:
            return
        if not self._out:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._lose(e)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._loop.add_writer(self._fd, self._on_writable)
        self._out += data
        if len(self._out) > HIGH_WATER:
            self._paused = True

    def pending(self) -> int:
        """Bytes of output the socket has not taken yet."""
        return len(self._out)

    async def drain(self) -> None:
        """Wait while more than HIGH_WATER bytes of output wait (until LOW_WATER do); raise
        ConnectionResetError once the connection takes no more output (its call ended, or the
        connection is lost)."""
        if self._closing:
            raise ConnectionResetError("the call has ended or its caller has gone: output is dropped")
        if not self._paused:
            return
        waiter = self._loop.create_future()
        self._drained.append(waiter)  # a cancelled one stays until the resume or the cut: done, skipped
        await waiter

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(e)
            return
        del self._out[:sent]
        if len(self._out) <= LOW_WATER and self._paused:
            self._paused = False
            self._wake_drained(None)
        if not self._out:
            self._loop.remove_writer(self._fd)
            if self._closing:  # close() waits for this: the call's output is all sent
                self.abort()

    def _wake_drained(self, error: BaseException | None) -> None:
        waiters, self._drained = self._drained, []
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    # --- the end ---------------------------------------------------------------------------

    async def close(self, linger: float) -> None:
        """End a served call: the output still waiting is given ``linger`` seconds to reach the
        caller, then the connection is cut (at once when cancelled)."""
        self._closing = True
        try:
            if self._out:
                self._flushed = self._loop.create_future()
                async with asyncio.timeout(linger):
                    await self._flushed
        except TimeoutError:  # the caller did not take it in time
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Cut the connection: the output still waiting is dropped, a read waiting reads EOF
        and a drain waiting raises ConnectionResetError."""
        self._closing = True
        self._eof = True
        self._stop_reading()
        if self._out:
            self._loop.remove_writer(self._fd)
        self._out.clear()
        self._sock.close()
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)
        if self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)
        self._wake_drained(ConnectionResetError("Connection lost"))

    def _lose(self, error: OSError) -> None:
        """The socket failed (the caller reset it, EPIPE): the connection ends with ``error``."""
        self._error = error
        self.abort()
