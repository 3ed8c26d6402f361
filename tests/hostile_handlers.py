"""Handlers for the hostile-caller, soak and privilege suites (imported by the daemon under test)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from qubes_socksvc import Request


def plain_hangs(request: Request) -> None:
    """A plain function stuck far beyond its timeout (a thread cannot be cancelled)."""
    time.sleep(3600)


async def huge_return(request: Request) -> bytes:
    """32 MiB returned at once: written before the connection is closed."""
    return b"y" * (32 << 20)


async def huge(request: Request) -> None:
    """64 MiB written with backpressure."""
    block = b"x" * 65536
    for _ in range(1024):
        request.write(block)
        await request.drain()


async def exits(request: Request) -> None:
    sys.exit(3)


def plain_exits(request: Request) -> None:
    sys.exit(4)


async def raises(request: Request) -> None:
    raise RuntimeError("handler failure on purpose")


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
