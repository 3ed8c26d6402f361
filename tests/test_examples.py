# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The bundled example handlers (qubes_socksvc.examples), tested as a service author would:
with qubes_socksvc.testing, no daemon."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator

import pytest

from qubes_socksvc import InputTooLarge
from qubes_socksvc.testing import CallOptions, call_handler, check_manifest, stream_handler
from tests.conftest import REPO

ECHO, HELLO, SHA256, UPPER = (f"qubes_socksvc.examples:{name}" for name in ("echo", "hello", "sha256", "upper"))


def test_echo_streams_its_input_back() -> None:
    assert call_handler(ECHO, b"hello") == b"hello"
    assert call_handler(ECHO) == b""  # a just-exec call: empty input


def test_echo_answers_while_the_input_still_comes() -> None:
    """Each chunk comes back before the next is sent: echo never waits for the whole input."""
    async def run() -> list[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        replies = []

        async def source() -> AsyncIterator[bytes]:
            for word in (b"one", b"two", b"three"):
                yield word
                replies.append(await queue.get())  # the reply to this word, before the next

        async for chunk in stream_handler(ECHO, source()):
            await queue.put(chunk)
        return replies

    assert asyncio.run(run()) == [b"one", b"two", b"three"]


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"service": "example.Hello+friend", "source": "work"},
     "service=example.Hello+friend\nname=example.Hello\nargument=friend\nsource=work\n"),
    ({"service": "example.Hello", "source": "dom0"},
     "service=example.Hello\nname=example.Hello\nargument=(none)\nsource=dom0\n"),
    ({"service": "example.Hello+", "source": "personal", "target_type": "keyword", "target": "dispvm"},
     "service=example.Hello+\nname=example.Hello\nargument=\nsource=personal\ntarget=keyword:dispvm\n"),
])
def test_hello_shows_the_descriptor(kwargs: CallOptions, expected: str) -> None:
    assert call_handler(HELLO, **kwargs).decode() == expected


def test_sha256_of_a_large_streamed_input() -> None:
    block = bytes(range(256)) * 256

    def blocks() -> Iterator[bytes]:
        for _ in range(256):  # 16 MiB
            yield block

    assert call_handler(SHA256, blocks(), max_input=0) == (
        hashlib.sha256(block * 256).hexdigest().encode() + b"\n")


def test_upper_is_a_plain_function_bounded_by_max_input() -> None:
    _, service = check_manifest(str(REPO / "examples/qubes-socksvc.yaml")).services()["example.Upper"]
    assert call_handler(service.handler, b"shout this\n", max_input=service.max_input) == b"SHOUT THIS\n"
    with pytest.raises(InputTooLarge):
        call_handler(service.handler, b"x" * (service.max_input + 1), max_input=service.max_input)
