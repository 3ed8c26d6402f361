# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What is said of a handler that held the event loop (``handlers.watch_stalls`` finds it).

One text for the daemon's log and for the testing kit's warning, so that a service
author sees in a test exactly the line the daemon would log.  Imports nothing.
"""

from __future__ import annotations

#: %-format arguments: the call's service (as called), the handler's ``module:callable``, seconds held.
MESSAGE = ("call %s: handler %s held the event loop for %.2fs: every other call waited; an async "
           "handler must not block (await, asyncio.to_thread(), or a plain def handler)")


def message(service: str, handler: str, seconds: float) -> str:
    """:data:`MESSAGE` filled in."""
    return MESSAGE % (service, handler, seconds)
