# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A caller's connection (connection.Connection), on both event loops the daemon runs on.

The daemon reads and writes its callers' sockets itself instead of through asyncio's streams;
these hold it to what the streams did, which handlers and the descriptor's limits rely on: the
descriptor read through its NUL exactly as ``StreamReader.readuntil`` read it (the same bytes,
the same refusals, however the caller's bytes are split), ``read(n)`` as ``StreamReader.read``,
output bounded by the high-water mark, a cut read as EOF, a caller's reset raised once met.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from qubes_socksvc import connection
from qubes_socksvc.connection import Connection

#: Runs a coroutine function on the event loop of the test's parameter; its result.
Run = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    """Run a coroutine function on asyncio's loop or uvloop's (the daemon's when installed)."""
    factory = None
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop

    def run(main: Callable[[], Awaitable[Any]]) -> Any:
        async def wrapped() -> Any:
            return await main()

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(wrapped())

    yield run


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4)))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def _outcome(read: Callable[[], Awaitable[bytes]]) -> tuple[str, object]:
    try:
        return "read", await read()
    except asyncio.IncompleteReadError as e:
        return "incomplete", e.partial
    except asyncio.LimitOverrunError:
        return "too long", None


def test_the_descriptor_is_read_as_asyncios_streams_read_it_however_it_is_split(run: Run) -> None:
    """Around the limit (a NUL at the limit, one past it, none within it, EOF before one), each
    input sent in random pieces: the same descriptor, the same refusal, the same bytes left for
    the handler as ``StreamReader(limit).readuntil(b"\\0")`` and ``read()`` gave."""
    limit = 64
    rng = random.Random(25)
    inputs = [b"", b"abc", b"\0", b"x" * limit + b"\0rest", b"x" * (limit + 1) + b"\0rest",
              b"x" * (limit - 1) + b"\0", b"x" * (limit + 1), b"x" * (3 * limit), b"a\0b\0c"]
    inputs += [bytes(rng.choice(b"ab\0") for _ in range(rng.randint(0, 2 * limit))) for _ in range(40)]

    async def both(pieces: list[bytes], early: bool) -> tuple[tuple[str, object, bytes], tuple[str, object, bytes]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        reader = asyncio.StreamReader(limit=limit)
        for piece in pieces:
            reader.feed_data(piece)
        reader.feed_eof()
        call = Connection(ours, loop)

        async def send() -> None:
            for piece in pieces:
                theirs.sendall(piece)
                await asyncio.sleep(0.001)
            theirs.shutdown(socket.SHUT_WR)

        if early:  # all of it there before the read, as qrexec's descriptor usually is at accept
            await send()
            call.receive_now()
        sending = asyncio.ensure_future(asyncio.sleep(0) if early else send())
        got, left = await _outcome(lambda: call.read_until_nul(limit)), b""
        await sending
        if got[0] == "read":
            while chunk := await call.read(7):
                left += chunk
        want, want_left = await _outcome(lambda: reader.readuntil(b"\0")), b""
        if want[0] == "read":
            want_left = await reader.read()
        call.abort()
        theirs.close()
        return (*got, left), (*want, want_left)

    splits = [_split(data, rng) for data in inputs]
    splits += [[b"x" * limit, b"\0rest"], [b"x" * (limit + 1), b"\0"], [b"x" * (limit - 1), b"x\0"]]
    for pieces in splits:
        for early in (False, True):
            got, want = run(lambda: both(pieces, early))  # noqa: B023
            assert got == want, (pieces, early)


def test_read_n_is_up_to_n_bytes_and_b_empty_at_eof(run: Run) -> None:
    async def main() -> list[bytes]:
        ours, theirs = socket.socketpair()
        call = Connection(ours, asyncio.get_running_loop())
        theirs.sendall(b"abcdef")
        theirs.shutdown(socket.SHUT_WR)
        parts = [await call.read(0), await call.read(4), await call.read(100), await call.read(4)]
        call.abort()
        theirs.close()
        return parts

    assert run(main) == [b"", b"abcd", b"ef", b""]


def test_a_descriptor_sent_before_the_accept_is_read_without_the_loop_watching(run: Run) -> None:
    """qrexec sends the descriptor and input as soon as it is connected: such a call is read and
    answered without one event loop round trip (no epoll registration, no wake-up)."""
    async def main() -> tuple[bytes, bytes, int]:
        loop = asyncio.get_running_loop()
        watched = 0
        real_reader, real_writer = loop.add_reader, loop.add_writer

        def add_reader(*args: object) -> None:
            nonlocal watched
            watched += 1
            real_reader(*args)  # type: ignore[arg-type]

        def add_writer(*args: object) -> None:
            nonlocal watched
            watched += 1
            real_writer(*args)  # type: ignore[arg-type]

        loop.add_reader = add_reader  # type: ignore[assignment,method-assign]
        loop.add_writer = add_writer  # type: ignore[assignment,method-assign]
        ours, theirs = socket.socketpair()
        theirs.sendall(b"my.Echo+ work\0input")
        theirs.shutdown(socket.SHUT_WR)
        call = Connection(ours, loop)
        call.receive_now()
        assert not call.waits_for_nul()
        descriptor = await call.read_until_nul(65536)
        data = await call.read(100) + await call.read(100)
        call.write(data)
        await call.close(10)
        reply = theirs.recv(100)
        theirs.close()
        return descriptor, reply, watched

    assert run(main) == (b"my.Echo+ work\0", b"input", 0)


def test_output_is_bounded_by_the_high_water_mark(run: Run) -> None:
    """A caller that does not read: drain() waits once more than HIGH_WATER bytes wait unsent,
    and returns once the caller has taken enough (LOW_WATER or less left)."""
    async def main() -> tuple[bool, bool, int]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        call = Connection(ours, loop)
        while call.pending() <= connection.HIGH_WATER:
            call.write(b"x" * 4096)
        draining = asyncio.ensure_future(call.drain())
        await asyncio.sleep(0.05)
        waited = not draining.done()
        got = 0
        while not draining.done():
            try:
                got += len(theirs.recv(1 << 16))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await draining
        low = call.pending() <= connection.LOW_WATER
        call.abort()
        theirs.close()
        return waited, low, got

    waited, low, got = run(main)
    assert waited and low and got > 0


#: The high-water mark docs/handlers.md promises: a plain handler's writes are held to 64 KiB.
MARK = 64 * 1024


def test_drain_waits_from_the_first_byte_past_the_high_water_mark(run: Run) -> None:
    """Once the caller's socket is full, what the daemon writes waits in the connection:
    drain() returns at once with exactly 64 KiB waiting, and waits with one byte more."""
    async def main() -> tuple[int, bool, bool]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        call = Connection(ours, loop)
        while not call.pending():  # the kernel's buffer first
            call.write(b"f" * 4096)
        call.write(b"h" * (MARK - call.pending()))
        waiting = call.pending()
        at_mark = asyncio.ensure_future(call.drain())
        await asyncio.sleep(0.01)
        returned = at_mark.done()
        call.write(b"!")
        past_mark = asyncio.ensure_future(call.drain())
        await asyncio.sleep(0.01)
        waits = not past_mark.done()
        theirs.close()
        await asyncio.wait_for(asyncio.gather(at_mark, past_mark, return_exceptions=True), 5)  # both end
        return waiting, returned, waits

    assert run(main) == (MARK, True, True)


class _Trickle:
    """A socket whose kernel takes at most ``step`` bytes a send(): how much a real one takes
    cannot be chosen here (it goes by its buffers' skbs), and where drain() resumes can only be
    seen when its output drains in small steps."""

    def __init__(self, sock: socket.socket, step: int) -> None:
        self.sock, self.step = sock, step

    def send(self, data: bytes) -> int:
        return self.sock.send(memoryview(data)[:self.step])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_drain_resumes_once_16_kib_or_less_wait(run: Run) -> None:
    """A slow caller taking 1 KiB a turn: a paused drain() returns once at most 16 KiB wait
    (asyncio's low-water mark, docs/daemon.md), not before, and not only at the end."""
    async def main() -> int:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)

        async def caller() -> None:
            while await loop.sock_recv(theirs, 1 << 16):
                pass

        reading = asyncio.ensure_future(caller())
        call = Connection(_Trickle(ours, 1024), loop)  # type: ignore[arg-type]
        call.write(b"z" * (80 * 1024))
        await call.drain()
        waiting = call.pending()
        call.abort()
        await reading
        theirs.close()
        return waiting

    assert 15 * 1024 < run(main) <= 16 * 1024


def _wakes(loop: asyncio.AbstractEventLoop, method: str) -> list[int]:
    """Count the runs of every callback ``loop.<method>`` (add_reader, add_writer) registers
    from now on: the count is the list's one item."""
    wakes = [0]
    real = getattr(loop, method)

    def add(fd: int, callback: Callable[[], None]) -> None:
        def counted() -> None:
            wakes[0] += 1
            callback()
        real(fd, counted)

    setattr(loop, method, add)
    return wakes


def test_input_the_handler_does_not_read_yet_wakes_the_loop_once(run: Run) -> None:
    """A handler that read part of its input and does something else meanwhile: the rest
    waiting in the socket wakes the event loop once, not at every turn (it would spin a core
    for as long as the handler does not read)."""
    async def main() -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        wakes = _wakes(loop, "add_reader")
        ours, theirs = socket.socketpair()
        call = Connection(ours, loop)
        reading = asyncio.ensure_future(call.read(1))
        await asyncio.sleep(0.01)
        theirs.sendall(b"ab")  # "a" read, "b" left waiting
        first = await reading
        for _ in range(100):  # the loop turns while the handler does other things
            await asyncio.sleep(0)
        rest = await call.read(10)
        call.abort()
        theirs.close()
        return wakes[0], first + rest

    wakes, got = run(main)
    assert got == b"ab" and wakes <= 2


def test_output_the_caller_took_wakes_the_loop_no_more(run: Run) -> None:
    """Output the socket did not take at once is sent when it has room; once all of it is sent,
    the loop stops watching the socket for room (it would spin a core until the call ends)."""
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        wakes = _wakes(loop, "add_writer")
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        call = Connection(ours, loop)
        size = 1 << 20
        call.write(b"w" * size)  # more than the socket takes at once
        got = 0
        while got < size:
            try:
                got += len(theirs.recv(1 << 16))
            except BlockingIOError:
                await asyncio.sleep(0)
        settled = wakes[0]
        for _ in range(100):  # the loop turns while the handler does other things
            await asyncio.sleep(0)
        call.abort()
        theirs.close()
        return got, wakes[0] - settled

    got, more = run(main)
    assert got == 1 << 20 and more <= 1


def test_output_written_after_the_call_ended_is_dropped(run: Run) -> None:
    """A handler's thread writing on after its call ended (timed out, say) while the reply still
    lingers: the late bytes never reach the caller, and the reply arrives whole."""
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        call = Connection(ours, loop)
        reply = b"r" * (1 << 20)
        call.write(reply)
        closing = asyncio.ensure_future(call.close(5))
        await asyncio.sleep(0)
        call.write(b"LATE")
        with pytest.raises(ConnectionResetError):  # a plain handler's write() raises it
            await call.drain()
        got = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 1 << 16), 5):
            got += chunk
        await closing
        theirs.close()
        return got

    assert run(main) == b"r" * (1 << 20)


def test_a_cut_ends_a_waiting_read_with_eof_and_a_waiting_drain_with_a_reset(run: Run) -> None:
    """The descriptor's deadline and the daemon's stop cut a connection while its call waits:
    the read ends as at EOF (a descriptor read, IncompleteReadError with what came), a drain
    raises ConnectionResetError, and the socket is closed."""
    async def cut_while_reading_the_descriptor() -> tuple[str, object]:
        ours, theirs = socket.socketpair()
        call = Connection(ours, asyncio.get_running_loop())
        theirs.sendall(b"my.Serv")
        reading = asyncio.ensure_future(_outcome(lambda: call.read_until_nul(100)))
        await asyncio.sleep(0.01)
        call.abort()
        got = await reading
        theirs.close()
        return got

    assert run(cut_while_reading_the_descriptor) == ("incomplete", b"my.Serv")

    async def main() -> tuple[bytes, BaseException | None, int]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        call = Connection(ours, loop)
        while call.pending() <= connection.HIGH_WATER:
            call.write(b"x" * 65536)
        reading = asyncio.ensure_future(call.read(10))
        draining = asyncio.ensure_future(call.drain())
        await asyncio.sleep(0.01)
        call.abort()
        got = await reading
        error = None
        try:
            await draining
        except ConnectionResetError as e:
            error = e
        theirs.close()
        return got, error, call.pending() + ours.fileno()

    got, error, dropped_and_closed = run(main)
    assert got == b"" and isinstance(error, ConnectionResetError) and dropped_and_closed == -1


def test_a_callers_reset_is_raised_by_the_read_that_meets_it_and_ends_the_connection(run: Run) -> None:
    """The caller closes with input of ours unread: the kernel resets our side
    (net/unix/af_unix.c: unix_release_sock); the read raises it, later reads again, writes are
    dropped, and the socket is closed."""
    async def main() -> tuple[list[str], bool, int]:
        ours, theirs = socket.socketpair()
        call = Connection(ours, asyncio.get_running_loop())
        call.write(b"unread by the caller")
        theirs.close()
        raised = []
        for _ in range(2):
            try:
                await call.read(10)
            except ConnectionResetError as e:
                raised.append(type(e).__name__)
        call.write(b"dropped")
        return raised, call.is_closing(), ours.fileno()

    assert run(main) == (["ConnectionResetError", "ConnectionResetError"], True, -1)


def test_a_served_calls_output_is_flushed_within_the_linger_then_cut(run: Run) -> None:
    """close(): output still waiting reaches a caller that reads late, and the connection ends
    as soon as all of it is sent; one that never reads is cut at the linger's end; one that
    goes away meanwhile ends it at once (a lingering call holds its slot)."""
    size = 1 << 20

    async def main(linger: float, read_after: float | None) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        call = Connection(ours, loop)
        call.write(b"y" * size)
        closing = asyncio.ensure_future(call.close(linger))
        got = 0
        if read_after is not None:
            await asyncio.sleep(read_after)
            while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 1 << 16), 5):
                got += len(chunk)
        await asyncio.wait_for(closing, 5)  # ended by the flush, or by the linger
        theirs.close()
        return got, ours.fileno()

    assert run(lambda: main(60, 0.05)) == (size, -1)
    assert run(lambda: main(0.05, None)) == (0, -1)

    async def gone() -> int:
        ours, theirs = socket.socketpair()
        call = Connection(ours, asyncio.get_running_loop())
        call.write(b"y" * size)
        closing = asyncio.ensure_future(call.close(60))
        await asyncio.sleep(0.05)
        theirs.close()
        await asyncio.wait_for(closing, 5)
        return ours.fileno()

    assert run(gone) == -1
