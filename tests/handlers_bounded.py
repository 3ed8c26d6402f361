# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Careless handlers for tests/test_bounded.py: each does what a fresh adversary found the
daemon could not bound (issue 22)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import threading
import time

from qubes_socksvc import Request

_kept: list[int] = []


async def hang(request: Request) -> None:
    """Never returns, never reads or writes: only its caller's leaving can end the call."""
    await asyncio.sleep(10**6)


def hang_plain(request: Request) -> None:
    """A plain function that never returns: its thread outlives any timeout."""
    time.sleep(3600)


def _grab() -> None:
    while True:  # every descriptor that comes free, kept
        try:
            _kept.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            time.sleep(0.005)


def leak_fds(request: Request) -> bytes:
    """Lowers the daemon's soft file limit near what is open, then, in a thread of its own, takes
    every descriptor that comes free, for good: the daemon cannot accept another call."""
    # The interpreter's exit ends this daemon thread with pthread_exit, which loads libgcc_s
    # the first time it unwinds: with no descriptor left, glibc aborts ("libgcc_s.so.1 must be
    # installed for pthread_exit to work").  Loaded now, the daemon's exit stays the clean one
    # under test.
    ctypes.CDLL("libgcc_s.so.1")
    in_use = len(os.listdir("/proc/self/fd"))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 16, hard))
    threading.Thread(target=_grab, daemon=True).start()
    return b"leaked\n"


async def log_argument(request: Request) -> bytes:
    """Logs the caller's argument, whole, with the handler's own logger."""
    logging.getLogger("mine").info("got %s", request.argument)
    return b"ok\n"
