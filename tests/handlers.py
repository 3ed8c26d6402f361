# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Handlers the tests declare in their manifests (imported by the daemon under test)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import subprocess
import sys
import time

from qubes_socksvc import Request


async def fields(request: Request) -> str:
    """Every descriptor field, one per line, for exact assertions."""
    return (
        f"service={request.service}\nname={request.name}\nargument={request.argument!r}\n"
        f"source={request.source!r}\ntarget_type={request.target_type!r}\ntarget={request.target!r}\n"
    )


async def fields_later(request: Request) -> str:
    """:func:`fields`, after awaiting 0.1 s."""
    await asyncio.sleep(0.1)
    return await fields(request)


async def after_eof(request: Request) -> bytes:
    """Reads to EOF first (the caller's half-close), then answers."""
    data = await request.read()
    return b"got %d bytes after EOF\n" % len(data)


async def raises(request: Request) -> None:
    raise RuntimeError("handler failure on purpose")


async def exits(request: Request) -> None:
    sys.exit(3)


def plain_exits(request: Request) -> None:
    sys.exit(4)


async def hangs(request: Request) -> None:
    await asyncio.sleep(3600)


CLEANED_UP: list[str] = []
"""The calls of hangs_then_cleans_up whose cleanup finished (read by in-process tests)."""


async def hangs_then_cleans_up(request: Request) -> None:
    """Hangs; once cancelled, its cleanup takes 0.2 s (a finally block that awaits)."""
    try:
        await asyncio.sleep(3600)
    finally:
        await asyncio.sleep(0.2)
        CLEANED_UP.append(request.service)


async def huge(request: Request) -> None:
    """64 MiB of output (or ARG MiB), with backpressure."""
    block = b"x" * 65536
    for _ in range(16 * int(request.argument or "64")):
        request.write(block)
        await request.drain()


async def slow(request: Request) -> str:
    await asyncio.sleep(float(request.argument or "1"))
    return "done\n"


async def returns_int(request: Request) -> int:
    return 42


def plain_pid(request: Request) -> str:
    return f"{os.getpid()} {len(request.input or b'')}\n"


_active = 0
_peak = 0


async def concurrency(request: Request) -> str:
    """Reports the most calls seen in this handler at once (to prove max_connections)."""
    global _active, _peak
    _active += 1
    _peak = max(_peak, _active)
    try:
        await asyncio.sleep(0.2)
    finally:
        _active -= 1
    return f"{_peak}\n"


# --- for the hostile-caller, soak and privilege suites ---


def plain_hangs(request: Request) -> None:
    """A plain function stuck far beyond its timeout (a thread cannot be cancelled)."""
    time.sleep(3600)


async def huge_return(request: Request) -> bytes:
    """32 MiB returned at once: written before the connection is closed."""
    return b"y" * (32 << 20)


async def keyboard_interrupt(request: Request) -> None:
    raise KeyboardInterrupt


async def cancels_itself(request: Request) -> None:
    raise asyncio.CancelledError


async def leaks_nothing(request: Request) -> str:
    """Opens and closes a file: a handler's own fds must not count as the daemon's leaks."""
    with open("/dev/null", "rb"):
        pass
    return f"{os.getpid()}\n"


async def lingering_reply(request: Request) -> bytes:
    """More than a Unix socket's buffer takes, less than the daemon's high-water mark beyond it:
    the call ends normally while part of its output still waits for the caller."""
    return b"r" * (int(request.argument or "262144"))


def _via(entry: str) -> object:
    async def handler(request: Request) -> str:
        return f"via={entry}\n" + await fields(request)

    return handler


#: Which declared key served a call: the conformance tests declare NAME, NAME+ and NAME+ARG
#: with these, so the answer names the qubes-rpc entry the daemon matched.
via_name = _via("NAME")
via_empty = _via("NAME+")
via_argument = _via("NAME+ARG")


# --- careless handlers (issue 11) ---


def plain_floods(request: Request) -> None:
    """A plain function writing 64 KiB blocks in a loop, whether the caller reads or not
    (``+N``: N blocks, 4096 = 256 MiB by default)."""
    for i in range(int(request.argument or "4096")):
        request.write(b"%65535d\n" % i)  # a new object each time, as real output is


async def blocks_the_loop(request: Request) -> str:
    """An async handler that blocks the event loop (``+SECONDS``): every other call waits."""
    time.sleep(float(request.argument or "1"))
    return "woke\n"


async def writes_without_drain(request: Request) -> None:
    """Writes small pieces in a loop without ever draining, yielding to the loop in between,
    long after its caller has gone (``+N`` writes)."""
    for _ in range(int(request.argument or "100000")):
        request.write(b"w" * 1024)
        await asyncio.sleep(0)


async def yields_forever(request: Request) -> None:
    """Never awaits anything but the loop's next turn (``asyncio.sleep(0)``): busy, yet yielding."""
    while True:
        await asyncio.sleep(0)


async def writes_with_drain(request: Request) -> None:
    """Writes and drains in a loop (``+N`` writes of 64 KiB), the way a handler should."""
    block = b"d" * 65536
    for _ in range(int(request.argument or "100000")):
        request.write(block)
        await request.drain()


def plain_writes_after_timeout(request: Request) -> None:
    """Outlives its timeout, then writes to the call that has ended (``+N`` writes)."""
    time.sleep(1)
    for _ in range(int(request.argument or "1000")):
        request.write(b"late\n")


def plain_write_when_the_call_ends(request: Request) -> None:
    """Writes 64 KiB blocks to a caller that never reads, until a write raises; logs how many
    writes returned after its 1 s timeout had ended the call (there should be none).  The caller
    never reads, so once the socket and the transport's buffer are full (in milliseconds) no write
    returns until the call ends: one returning after 0.5 s returned after the end (a 1.0 s mark
    would count on this thread's clock, started a little after the call's timeout was)."""
    start = time.monotonic()
    late = 0
    try:
        for i in range(100000):
            request.write(b"%65535d\n" % i)
            late += time.monotonic() - start >= 0.5
    except ConnectionError as e:
        logging.getLogger("my.service").warning("writes ended: %s after %d late returns", type(e).__name__, late)


async def logs_itself(request: Request) -> str:
    """Logs through the standard logging module, as a service author would."""
    logging.getLogger("my.service").warning("handler's own line")
    return "logged\n"


def plain_logs_itself(request: Request) -> str:
    logging.getLogger("my.service").warning("plain handler's own line")
    return "logged\n"


async def backend_down(request: Request) -> None:
    """The handler's own connection fails: its fault, not the caller's."""
    raise ConnectionRefusedError("backend down")


def _failing_callback(argument: str | None) -> None:
    raise ValueError("a callback of the handler failed")


async def schedules_a_failing_callback(request: Request) -> str:
    """Leaves the event loop a callback that raises: the loop reports it ("Exception in callback
    _failing_callback('ARGUMENT')", quoting the caller's argument), the daemon logs it."""
    asyncio.get_running_loop().call_soon(_failing_callback, request.argument)
    return "scheduled\n"


async def reports_to_the_loop(request: Request) -> str:
    """Reports to the loop as libraries do without an exception (aiohttp: "Unclosed client
    session", on every call that forgets to close one), and a connection error of its own."""
    loop = asyncio.get_running_loop()
    loop.call_exception_handler({"message": "Unclosed client session", "client_session": object()})
    loop.call_exception_handler({"message": "Fatal read error on socket transport",
                                 "exception": ConnectionResetError("reset by its peer")})
    loop.call_exception_handler({})
    loop.call_exception_handler({"message": "an exception that is none", "exception": "a string"})
    # A fault is known by its message's first 64 characters (a message may grow without bound).
    for message in ("x" * 63 + "a", "x" * 63 + "b", "y" * 64 + "a", "y" * 64 + "b"):
        loop.call_exception_handler({"message": message})
    return "reported\n"


async def blocks_the_loop_later(request: Request) -> str:
    """Leaves the loop a callback that blocks it (``+SECONDS``), in 50 ms: not in a handler's step."""
    asyncio.get_running_loop().call_later(0.05, time.sleep, float(request.argument or "1"))
    return "later\n"


#: What writes_then queues before it ends (far more than a socket's buffer holds).
QUEUED_OUTPUT = 4 << 20


async def writes_then(request: Request) -> None:
    """Queues QUEUED_OUTPUT bytes without draining, then ends as its argument says: ``return``,
    ``raise``, ``hang`` (past its timeout), ``read`` (the whole input, past its max_input),
    ``cancel`` (its own CancelledError) or ``refused`` (a connection of its own refused)."""
    request.write(b"o" * QUEUED_OUTPUT)
    if request.argument == "raise":
        raise RuntimeError("failed after writing")
    if request.argument == "cancel":
        raise asyncio.CancelledError
    if request.argument == "refused":
        raise ConnectionRefusedError("the handler's own backend is down")
    if request.argument == "hang":
        await asyncio.Event().wait()
    if request.argument == "read":
        await request.read()


async def exhausts_fds(request: Request) -> str:
    """Leaves the daemon no free file descriptor for ``+SECONDS``, then keeps the call open 3 s
    more: callers meanwhile are accepted only if the daemon retries accept() by itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
    try:
        with contextlib.suppress(OSError):  # fill the holes below the new limit: EMFILE from here on
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        request.write(b"exhausted\n")
        await request.drain()
        await asyncio.sleep(float(request.argument or "1"))
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await asyncio.sleep(3)
    return "released\n"


async def raises_generator_exit(request: Request) -> None:
    raise GeneratorExit("a handler's own GeneratorExit " + (request.argument or "") * 2000)


async def raises_base_group(request: Request) -> None:
    raise BaseExceptionGroup("a handler's group " + (request.argument or "") * 2000, [KeyboardInterrupt()])


def plain_raises_base_group(request: Request) -> None:
    raise BaseExceptionGroup("a plain handler's group " + (request.argument or "") * 2000, [GeneratorExit()])


def plain_child_listen_variables(request: Request) -> str:
    """The LISTEN_* variables a child process of the handler's is started with."""
    env = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    return "".join(sorted(f"{line.split('=')[0]}\n" for line in env.splitlines() if line.startswith("LISTEN_")))
