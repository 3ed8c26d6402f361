# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What a caller sends: bytes, or chunks of them from an iterable or an async iterable.

Shared by :mod:`qubes_socksvc.client` (the input of a qrexec call) and
:mod:`qubes_socksvc.testing` (the input of a handler under test).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable

from .qrexec import CHUNK_SIZE

#: A call's input: bytes, or chunks of it from an iterable or an async iterable.
Input = bytes | Iterable[bytes] | AsyncIterable[bytes]


async def chunks(input: Input) -> AsyncIterator[bytes]:
    """``input`` as chunks; bytes are cut into pieces of at most CHUNK_SIZE."""
    if isinstance(input, (bytes, bytearray, memoryview)):
        for start in range(0, len(input), CHUNK_SIZE):
            yield bytes(input[start:start + CHUNK_SIZE])
    elif isinstance(input, AsyncIterable):
        async for chunk in input:
            yield chunk
    else:
        for chunk in input:
            yield chunk
