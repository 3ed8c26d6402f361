# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qubes_socksvc.testing: a handler called in-process behaves as under the daemon."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import re
import sys
import threading
import tracemalloc
import types
import warnings
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from qubes_socksvc import InputTooLarge, Request, handlers
from qubes_socksvc.handlers import HandlerError
from qubes_socksvc.manifest import ManifestError
from qubes_socksvc.testing import (
    DEFAULT_MAX_INPUT,
    CallOptions,
    HandlerStalled,
    async_call_handler,
    call_handler,
    check_manifest,
    stream_handler,
)
from tests.conftest import REPO, RunningDaemon, fields_of
from tests.handlers import blocks_the_loop
from tests.test_hostile import wait_for_log

FIELDS = "tests.handlers:fields"


# --- the same Request as the daemon builds ---------------------------------------


@pytest.mark.parametrize(("wire", "kwargs"), [
    (b"test.Fields+abc work\0", {"service": "test.Fields+abc", "source": "work"}),
    (b"test.Fields+ work\0", {"service": "test.Fields+", "source": "work"}),
    (b"test.Fields sys-usb\0", {"service": "test.Fields", "source": "sys-usb"}),
    (b"test.Fields+x work keyword dispvm\0",
     {"service": "test.Fields+x", "source": "work", "target_type": "keyword", "target": "dispvm"}),
    (b"test.Fields+x personal name dom0\0",
     {"service": "test.Fields+x", "source": "personal", "target_type": "name", "target": "dom0"}),
])
def test_same_output_as_the_daemon(daemon: RunningDaemon, wire: bytes, kwargs: CallOptions) -> None:
    """The daemon (tests/conftest.py TEST_MANIFEST, test.Fields) and call_handler agree, byte for byte."""
    assert call_handler(FIELDS, **kwargs) == daemon.call(wire)


def test_service_forms_split_at_the_first_plus() -> None:
    """libqrexec/exec.c parse_qubes_rpc_command: NAME, NAME+ (empty argument), NAME+ARG."""
    assert fields_of(call_handler(FIELDS, service="x.Test"))["argument"] == "None"
    assert fields_of(call_handler(FIELDS, service="x.Test+"))["argument"] == "''"
    assert fields_of(call_handler(FIELDS, service="x.Test+arg")) == {
        "service": "x.Test+arg", "name": "x.Test", "argument": "'arg'", "source": "'work'",
        "target_type": "None", "target": "None"}


def test_argument_may_contain_plus() -> None:
    """parse_qubes_rpc_command splits at the first '+': qubes.ConnectTCP+fe80++1+22 is a real form."""
    out = fields_of(call_handler(FIELDS, service="x.Test+fe80++1+22"))
    assert (out["name"], out["argument"]) == ("x.Test", "'fe80++1+22'")


def test_without_descriptor() -> None:
    """source=None: a service_descriptor: false call (the service as declared, no source)."""
    assert fields_of(call_handler(FIELDS, service="x.Raw", source=None))["source"] == "None"


@pytest.mark.parametrize("kwargs", [
    {"service": "x Test"}, {"service": "x.Test+a b"}, {"service": "../x"}, {"service": ""},
    {"source": "bad qube"}, {"source": "é"}, {"source": "x" * 32},
    {"target_type": "other", "target": "dom0"}, {"target_type": "name"}, {"target": "dom0"},
    {"source": None, "target_type": "name", "target": "dom0"},
])
def test_descriptors_the_daemon_rejects_are_refused(kwargs: CallOptions) -> None:
    with pytest.raises(ValueError):
        call_handler(FIELDS, **kwargs)


# --- the same adaptation ---------------------------------------------------------


def test_plain_function_runs_in_a_thread_with_the_whole_input() -> None:
    seen: list[object] = []

    def plain(request: Request) -> bytes:
        seen.append(threading.current_thread() is threading.main_thread())
        assert request.input is not None
        return request.input[::-1]

    assert call_handler(plain, [b"abc", b"def"]) == b"fedcba"
    assert seen == [False]


def test_callable_and_spec_give_the_same_result() -> None:
    from qubes_socksvc import examples

    assert call_handler(examples.upper, b"x") == call_handler("qubes_socksvc.examples:upper", b"x") == b"X"


def test_returned_str_is_written_after_streamed_output() -> None:
    async def both(request: Request) -> str:
        request.write(b"streamed ")
        await request.drain()
        return "returned"

    assert call_handler(both) == b"streamed returned"


# --- the same limits and exceptions ----------------------------------------------


def test_max_input_default_is_the_manifests() -> None:
    echo = "qubes_socksvc.examples:echo"
    assert call_handler(echo, b"x" * DEFAULT_MAX_INPUT) == b"x" * DEFAULT_MAX_INPUT
    with pytest.raises(InputTooLarge):
        call_handler(echo, b"x" * (DEFAULT_MAX_INPUT + 1))
    with pytest.raises(InputTooLarge):
        call_handler("qubes_socksvc.examples:upper", b"x" * 1025, max_input=1024)  # plain: read up front
    assert len(call_handler(echo, b"x" * (DEFAULT_MAX_INPUT + 1), max_input=0)) == DEFAULT_MAX_INPUT + 1


def test_read_n_returns_at_most_n_bytes_and_read_0_none() -> None:
    """Request.read(n) is StreamReader.read(n): up to n bytes, b"" for n == 0 without consuming
    input; read() and text() take the rest, whole."""
    async def reads(request: Request) -> str:
        parts = [await request.read(0), await request.read(3), await request.read(0)]
        return repr(parts) + await request.text()

    assert call_handler(reads, b"abcdef") == b"[b'', b'abc', b'']def"


def test_max_input_bounds_whole_reads_to_the_byte() -> None:
    """max_input counts every byte however it is read: read(), text(), read(n), async for and a
    plain handler's request.input; max_input bytes pass, one more fails the call."""
    async def whole(request: Request) -> bytes:
        return await request.read()

    async def text(request: Request) -> str:
        return await request.text()

    async def pieces(request: Request) -> bytes:
        return b"".join([chunk async for chunk in request])

    def plain(request: Request) -> bytes:
        assert request.input is not None
        return request.input

    for handler in (whole, text, pieces, plain):
        data = b"y" * 70_000  # more than one CHUNK_SIZE read
        assert call_handler(handler, [data[:100], data[100:]], max_input=len(data)) == data, handler
        with pytest.raises(InputTooLarge):
            call_handler(handler, [data, b"y"], max_input=len(data))


def test_after_input_too_large_the_input_is_over() -> None:
    """A handler that catches InputTooLarge and reads on gets EOF (b"") from then on, at once:
    it ends instead of spinning on the event loop (before: every read raised again, even at
    EOF, without ever awaiting).  The read that crossed max_input returns nothing."""
    async def reads_on(request: Request) -> str:
        seen: list[object] = []
        for _ in range(100):  # bounded: the unfixed read() never returns b""
            try:
                chunk = await request.read(8)
            except InputTooLarge:
                seen.append("InputTooLarge")
                continue
            seen.append(chunk)
            if not chunk:
                break
        seen += [await request.read(), [chunk async for chunk in request], await request.text()]
        return repr(seen)

    out = call_handler(reads_on, b"x" * 100, max_input=10, timeout=5)
    assert out == repr([b"x" * 8, "InputTooLarge", b"", b"", [], ""]).encode()


def test_a_whole_read_past_max_input_raises_once_then_eof() -> None:
    async def whole_then_again(request: Request) -> str:
        with pytest.raises(InputTooLarge):
            await request.read()
        return repr([await request.read(), await request.read(1)])

    assert call_handler(whole_then_again, [b"y" * 70_000, b"y"], max_input=70_000) == b"[b'', b'']"


def test_an_endless_caller_is_cut_off_once_past_max_input() -> None:
    """read() and text() count chunk by chunk: a caller that never stops sending fails the call
    as soon as it passes max_input, instead of filling memory first (the wait is bounded)."""
    def endless() -> Iterator[bytes]:
        while True:
            yield b"z" * 65536

    async def whole(request: Request) -> bytes:
        return await request.read()

    async def run() -> bytes:
        return await asyncio.wait_for(async_call_handler(whole, endless(), max_input=1 << 20), 20)

    with pytest.raises(InputTooLarge):
        asyncio.run(run())


def test_timeout_raises_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        call_handler("tests.handlers:hangs", timeout=0.2)
    with pytest.raises(TimeoutError):  # a plain function: the call ends, its thread finishes alone
        call_handler(lambda request: __import__("time").sleep(1), timeout=0.2)
    assert call_handler("tests.handlers:slow", service="x.Test+0.01", timeout=5) == b"done\n"


def test_handler_errors_are_raised() -> None:
    with pytest.raises(HandlerError, match="cannot be loaded"):
        call_handler("no_such_module:nothing")
    with pytest.raises(HandlerError, match="not callable"):
        call_handler("qubes_socksvc.qrexec:RPC_SEARCH_PATH")
    with pytest.raises(TypeError, match="handler returned int"):
        call_handler("tests.handlers:returns_int")
    with pytest.raises(RuntimeError, match="on purpose"):
        call_handler("tests.handlers:raises")


def test_system_exit_reaches_the_test_not_the_loop() -> None:
    with pytest.raises(SystemExit):
        call_handler("tests.handlers:exits")
    with pytest.raises(SystemExit):
        call_handler("tests.handlers:plain_exits")
    assert call_handler("qubes_socksvc.examples:echo", b"still fine") == b"still fine"


def test_handler_that_stops_reading_early_still_delivers_its_output() -> None:
    """A reply before reading 8 MiB of input: the caller gets all of it, like from the daemon."""
    async def early(request: Request) -> bytes:
        return b"r" * 300_000

    assert call_handler(early, b"x" * (8 << 20), max_input=0) == b"r" * 300_000


def test_failing_input_is_raised_and_the_handler_sees_eof() -> None:
    def broken() -> Iterator[bytes]:
        yield b"part"
        raise OSError("the test's input failed")

    with pytest.raises(OSError, match="input failed"):
        call_handler("tests.handlers:after_eof", broken())


# --- streaming ---------------------------------------------------------------------


def test_streaming_backpressure_and_bounded_memory() -> None:
    """32 MiB through echo: the input source never runs more than the sockets' buffers ahead of
    what the test consumed, and Python's allocations stay far below the data's size."""
    total, block = 32 << 20, b"s" * 65536
    produced = consumed = 0
    ahead = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(total // len(block)):
            produced += len(block)
            yield block

    async def run() -> str:
        nonlocal consumed, ahead
        digest = hashlib.sha256()
        async for chunk in stream_handler("qubes_socksvc.examples:echo", source(), max_input=0):
            consumed += len(chunk)
            ahead = max(ahead, produced - consumed)
            digest.update(chunk)
            await asyncio.sleep(0)
        return digest.hexdigest()

    tracemalloc.start()
    try:
        digest = asyncio.run(run())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(block * (total // len(block))).hexdigest()
    assert ahead < 4 << 20, f"the input ran {ahead} bytes ahead of the output"
    assert peak < 8 << 20, f"{peak} bytes allocated at once for {total} streamed"


def test_output_waits_for_a_slow_consumer() -> None:
    """A handler that drains is held back while nobody reads its output."""
    written = 0

    async def producer(request: Request) -> None:
        nonlocal written
        for _ in range(1024):  # 64 MiB if nothing held it back
            request.write(b"p" * 65536)
            written += 65536
            await request.drain()

    async def run() -> int:
        calls = stream_handler(producer)
        first = await calls.__anext__()
        await asyncio.sleep(0.3)  # the handler runs on meanwhile, until the buffers are full
        held_at = written
        await calls.aclose()  # abandoning the call cancels the handler
        assert first
        return held_at

    assert asyncio.run(run()) < 4 << 20


def test_plain_handler_writes_reach_the_caller_in_order() -> None:
    """request.write() from a plain handler's thread: every piece arrives, in order, before what
    it returns."""
    def plain(request: Request) -> str:
        for i in range(100):
            request.write(f"{i},")
        request.write(b"bytes too;")
        return "returned"

    assert call_handler(plain) == ("".join(f"{i}," for i in range(100)) + "bytes too;returned").encode()


def test_plain_handler_write_waits_for_a_slow_consumer() -> None:
    """From a thread, write() itself waits while the caller is behind: output stays bounded."""
    written = 0

    def producer(request: Request) -> None:
        nonlocal written
        for _ in range(1024):  # 64 MiB if nothing held it back
            request.write(b"p" * 65536)
            written += 65536

    async def run() -> int:
        calls = stream_handler(producer)
        assert await calls.__anext__()
        await asyncio.sleep(0.3)
        held_at = written
        await calls.aclose()
        return held_at

    assert asyncio.run(run()) < 4 << 20


def test_plain_handler_write_once_the_call_has_ended_raises() -> None:
    """A plain handler outliving its call (here, its timeout) gets ConnectionError from its writes
    once the call has ended, and after the event loop has closed too: it learns to stop."""
    errors: list[BaseException] = []
    finished = threading.Event()
    loop_closed = threading.Event()

    def producer(request: Request) -> None:
        try:
            for _ in range(1024):  # nobody reads: the buffers fill, and a write blocks
                request.write(b"p" * 65536)
        except ConnectionError as e:
            errors.append(e)
        try:
            loop_closed.wait(10)
            request.write(b"after the end")
        except ConnectionError as e:
            errors.append(e)
        finished.set()

    async def run() -> None:
        calls = stream_handler(producer, timeout=0.5)
        await calls.__anext__()
        await asyncio.sleep(1)  # read nothing more: the call times out meanwhile
        await calls.aclose()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(run())
        loop_closed.set()
        assert finished.wait(10), "the plain handler's write never returned, or raised something else"
        assert len(errors) == 2, errors
        errors.clear()  # their tracebacks hold the writes' frames
        gc.collect()
    # The write after the loop closed never ran: it is closed, not reported "never awaited" by the
    # daemon's log as if the daemon had a bug.
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]


def test_async_call_handler_inside_a_running_loop() -> None:
    async def run() -> bytes:
        return await async_call_handler("qubes_socksvc.examples:sha256", [b"a", b"b"])

    assert asyncio.run(run()) == hashlib.sha256(b"ab").hexdigest().encode() + b"\n"


# --- check_manifest ----------------------------------------------------------------


def test_check_manifest_accepts_the_bundled_examples() -> None:
    assert set(check_manifest(str(REPO / "examples/qubes-socksvc.yaml")).daemons) == {"example", "raw"}
    assert set(check_manifest(str(REPO / "examples/notes.yaml")).daemons) == {"notes"}


def test_check_manifest_lists_every_handler_that_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\ndaemons:\n  d:\n    services:\n"
                    "      a.Missing:\n        handler: no_such_module:handle\n"
                    "      a.NotCallable:\n        handler: qubes_socksvc.qrexec:SOCKET_DIR\n"
                    "      a.Fine:\n        handler: qubes_socksvc.examples:echo\n")
    with pytest.raises(ManifestError) as error:
        check_manifest(str(path))
    assert [p.split(": ", 2)[:2] for p in error.value.problems] == [
        [str(path), "daemons.d.services.a.Missing.handler"], [str(path), "daemons.d.services.a.NotCallable.handler"]]
    assert "No module named 'no_such_module'" in str(error.value)
    assert "is not callable" in str(error.value)


def test_check_manifest_reports_schema_errors_with_their_position(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\ndaemons:\n  d:\n    services:\n      a.X:\n        handlr: m:f\n")
    with pytest.raises(ManifestError, match=r"m\.yaml:6:9: .*handlr"):
        check_manifest(str(path))


def test_the_module_imports_nothing_heavy() -> None:
    """testing is for service authors' tests: no Jinja2 (PyYAML comes with the manifest)."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", "import sys, qubes_socksvc.testing; print('jinja2' in sys.modules)"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_closing_a_watched_call_closes_the_handler() -> None:
    """handlers.watch_stalls: when the call is closed while the handler waits (the loop dropped
    it), the handler's coroutine is closed too: its finally blocks run, nothing is left unawaited."""
    cleaned: list[str] = []

    @types.coroutine
    def suspend() -> Generator[None, None, None]:
        yield

    async def handler() -> None:
        try:
            await suspend()
        finally:
            cleaned.append("finally ran")

    call = handler()  # held, as handlers.invoke holds it
    watched = handlers.watch_stalls(call, lambda seconds: None)
    watched.send(None)  # the handler is now waiting
    watched.close()
    assert cleaned == ["finally ran"]


# --- a handler that holds the event loop: reported as the daemon reports it (issue 22, point 8) ---

BLOCKS = "tests.handlers:blocks_the_loop"  # async, time.sleep(+SECONDS)


def stall_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, HandlerStalled)]


def test_a_handler_holding_the_loop_is_reported_with_the_daemons_line(
        start_daemon: type[RunningDaemon], caplog: pytest.LogCaptureFixture) -> None:
    """handlers.watch_stalls, as server.Server._call uses it: the kit reports what the daemon
    logs, word for word (before: the kit passed it with no word at all)."""
    daemon = start_daemon(f"version: 1\ndaemons:\n  b:\n    idle_exit: 0\n    services:\n"
                          f"      h.Blocks:\n        handler: {BLOCKS}\n", "b")
    assert daemon.call(b"h.Blocks+0.3 work\0") == b"woke\n"
    wait_for_log(daemon, "held the event loop")
    logged = next(line for line in daemon.log_text().splitlines() if "held the event loop" in line)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert call_handler(BLOCKS, service="h.Blocks+0.3") == b"woke\n"
    [warned] = stall_warnings(record)
    assert re.search(r"^call h\.Blocks\+0\.3: handler tests\.handlers:blocks_the_loop held the event loop "
                     r"for 0\.[3-9]\ds: every other call waited; an async handler must not block ", warned), warned
    def seconds_out(text: str) -> str:
        return re.sub(r"for \d+\.\d\ds", "for Ns", text)

    assert seconds_out(logged).endswith("WARNING: " + seconds_out(warned)), (logged, warned)
    assert [r.getMessage() for r in caplog.records if r.name == "qubes_socksvc.testing"] == [warned]


def test_a_stall_fails_the_test_when_warnings_are_errors() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", HandlerStalled)
        with pytest.raises(HandlerStalled, match=r"handler tests\.handlers:blocks_the_loop held the event loop"):
            call_handler(blocks_the_loop, service="h.Blocks+0.2")  # the function itself: named module:callable


def test_no_stall_is_reported_for_a_plain_handler_or_a_short_step() -> None:
    """A plain function runs in a thread of its own (its time.sleep holds no loop); an async
    step under handlers.STALL_THRESHOLD is within what the daemon tolerates."""
    def plain_sleeps(request: Request) -> bytes:
        __import__("time").sleep(0.3)
        return b"slept"

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert call_handler(plain_sleeps) == b"slept"
        assert call_handler(BLOCKS, service="h.Blocks+0.01") == b"woke\n"
    assert stall_warnings(record) == []


def test_a_plain_handler_may_return_an_awaitable() -> None:
    """A plain function's result that is awaitable (a coroutine it made) is awaited in the
    event loop, and what that gives is the reply."""
    async def later() -> bytes:
        await asyncio.sleep(0)
        return b"awaited"

    def plain(request: Request) -> object:
        return later()

    assert call_handler(plain) == b"awaited"
