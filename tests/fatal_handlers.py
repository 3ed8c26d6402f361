# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Handlers that end the daemon's process, for the availability tests (importable as
``fatal_handlers:NAME`` with tests/ on the daemon's PYTHONPATH; no tests here)."""

from __future__ import annotations

import ctypes
import os

from qubes_socksvc import Request


def crash(request: Request) -> None:
    """What a careless handler does: the process ends at once, no exception, no cleanup."""
    os._exit(7)


def segfault(request: Request) -> None:
    """What a crashing C extension does: SIGSEGV in the daemon's process."""
    ctypes.string_at(0)
