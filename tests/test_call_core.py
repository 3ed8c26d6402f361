# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""One corpus of calls, through the real daemon (real sockets, its log) and through the testing
kit: both run callcore.run, so each call ends the same way, with the same output.

The daemon says how a call ended in its log (one line per callcore.Ending), the kit by what it
raises; the table below names the ending each call must have, and the STATUS= counters must
add up to the same outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import re
import socket
import warnings
from dataclasses import dataclass, field

import pytest

from qubes_socksvc import callcore, testing
from qubes_socksvc.callcore import Ending, Outcome
from qubes_socksvc.connection import Connection
from qubes_socksvc.handlers import HandlerError, Registry
from qubes_socksvc.model import Daemon, Service
from qubes_socksvc.request import InputTooLarge, Request
from tests.conftest import NotifySocket, RunningDaemon


@dataclass(frozen=True)
class Case:
    """A call: the service declared (``declared``: its manifest lines), how it is called, and how it ends."""

    name: str
    declared: str
    handler: str
    called: str
    ending: Ending
    input: bytes = b""
    source: str | None = "work"
    target: tuple[str, str] | None = None
    settings: dict[str, float | bool] = field(default_factory=dict)
    stalls: bool = False


CORPUS = [
    Case("returns, VM descriptor", "c.Fields", "handlers:fields", "c.Fields+arg", Ending.SERVED),
    Case("returns, dom0 descriptor", "c.Fields", "handlers:fields", "c.Fields", Ending.SERVED,
         target=("keyword", "adminvm")),
    Case("NAME+", "c.Fields", "handlers:fields", "c.Fields+", Ending.SERVED, target=("name", "work")),
    Case("argument holding +", "c.Fields", "handlers:fields", "c.Fields+fe80++1+22", Ending.SERVED),
    Case("streams", "c.Echo", "qubes_socksvc.examples:echo", "c.Echo", Ending.SERVED,
         input=bytes(range(256)) * 1200, settings={"max_input": 0}),
    Case("plain function", "c.Upper", "qubes_socksvc.examples:upper", "c.Upper", Ending.SERVED, input=b"abc"),
    Case("no descriptor", "c.Raw", "qubes_socksvc.examples:echo", "c.Raw", Ending.SERVED, input=b"raw\0 bytes",
         source=None, settings={"service_descriptor": False}),
    Case("blocks the loop", "c.Blocks", "handlers:blocks_the_loop", "c.Blocks+0.15", Ending.SERVED, stalls=True),
    Case("raises", "c.Raises", "handlers:raises", "c.Raises", Ending.RAISED),
    Case("SystemExit", "c.Exits", "handlers:exits", "c.Exits", Ending.RAISED),
    Case("returns an int", "c.Int", "handlers:returns_int", "c.Int", Ending.RAISED),
    Case("its own connection fails", "c.Backend", "handlers:backend_down", "c.Backend", Ending.RAISED),
    Case("times out", "c.Slow", "handlers:slow", "c.Slow+5", Ending.TIMED_OUT, settings={"timeout": 0.3}),
    Case("past max_input", "c.Small", "qubes_socksvc.examples:echo", "c.Small", Ending.INPUT_TOO_LARGE,
         input=b"x" * 100, settings={"max_input": 16}),
    Case("cannot be loaded", "c.Missing", "no_such_module:nothing", "c.Missing", Ending.LOAD_FAILED),
    Case("invalid source", "c.Fields", "handlers:fields", "c.Fields", Ending.MALFORMED, source="bad$qube"),
    Case("invalid argument", "c.Fields", "handlers:fields", "c.Fields+a/b", Ending.MALFORMED),
]


def manifest() -> str:
    lines = ["version: 1", "daemons:", "  c:", "    idle_exit: 0", "    services:"]
    declared: dict[str, Case] = {}
    for case in CORPUS:
        if declared.setdefault(case.declared, case).handler != case.handler:
            raise AssertionError(f"{case.declared} declared twice")
    for name, case in declared.items():
        lines += [f"      {name}:", f"        handler: {case.handler}"]
        lines += [f"        {key}: {str(value).lower()}" for key, value in case.settings.items()]
    return "\n".join(lines) + "\n"


#: The daemon's line for each way a call fails (a served call logs only its "call ..." line).
DAEMON_LINES = {
    Ending.MALFORMED: r": rejected call: ",
    Ending.RAISED: r": call \S+: handler \S+ raised",
    Ending.TIMED_OUT: r": call \S+ timed out after ",
    Ending.INPUT_TOO_LARGE: r": call \S+ rejected: input exceeds max_input",
    Ending.LOAD_FAILED: r": call \S+ failed: handler \S+ cannot be loaded",
}


def through_daemon(daemon: RunningDaemon, case: Case) -> tuple[Ending, bytes, bool, str]:
    """The ending the daemon logged, the caller's output, whether a stall was logged, the new log."""
    before = len(daemon.log_text())
    if case.source is None:
        path, wire = daemon.socket(f"socksvc-{case.declared}.sock"), b""
    else:
        path = daemon.socket()
        wire = " ".join([case.called, case.source, *(case.target or ())]).encode() + b"\0"
    output = exchange(path, wire + case.input)
    logged = daemon.log_text()[before:]
    endings = [ending for ending, line in DAEMON_LINES.items() if re.search(line, logged)]
    assert len(endings) <= 1, logged
    return (endings[0] if endings else Ending.SERVED), output, "held the event loop" in logged, logged


def exchange(path: str, payload: bytes) -> bytes:
    """A qrexec caller: send, half-close, read until the end (a cut connection ends it too)."""
    received = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                received.append(data)
    return b"".join(received)


def through_kit(case: Case) -> tuple[Ending, bytes, bool, BaseException | None]:
    """The ending the kit's exception stands for, the output, whether a stall was warned of."""
    options: testing.CallOptions = {"service": case.called, "source": case.source}
    if case.target is not None:
        options["target_type"], options["target"] = case.target
    if "max_input" in case.settings:
        options["max_input"] = int(case.settings["max_input"])
    if "timeout" in case.settings:
        options["timeout"] = float(case.settings["timeout"])
    received: list[bytes] = []

    async def call() -> None:
        async for chunk in testing.stream_handler(in_process(case.handler), case.input, **options):
            received.append(chunk)

    error: BaseException | None = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            asyncio.run(call())
        except BaseException as e:  # SystemExit too: the handler's
            error = e
    stalled = any(issubclass(w.category, testing.HandlerStalled) for w in seen)
    return kit_ending(error), b"".join(received), stalled, error


def in_process(handler: str) -> str:
    """The daemon finds tests/handlers.py as ``handlers`` (its PYTHONPATH), pytest as ``tests.handlers``."""
    return f"tests.{handler}" if handler.startswith("handlers:") else handler


def kit_ending(error: BaseException | None) -> Ending:
    if error is None:
        return Ending.SERVED
    if isinstance(error, InputTooLarge):
        return Ending.INPUT_TOO_LARGE
    if isinstance(error, TimeoutError):
        return Ending.TIMED_OUT
    if isinstance(error, HandlerError):
        return Ending.LOAD_FAILED
    if isinstance(error, ValueError):  # the kit refuses what the daemon would reject (no handler here raises it)
        return Ending.MALFORMED
    return Ending.RAISED


def test_the_daemon_and_the_kit_end_every_call_alike(start_daemon: type[RunningDaemon]) -> None:
    notify = NotifySocket()
    try:
        daemon = start_daemon(manifest(), "c", extra_env={"NOTIFY_SOCKET": str(notify.path)})
        counts = dict.fromkeys(Outcome, 0)
        for case in CORPUS:
            d_ending, d_output, d_stalled, logged = through_daemon(daemon, case)
            k_ending, k_output, k_stalled, error = through_kit(case)
            assert (d_ending, d_output, d_stalled) == (k_ending, k_output, k_stalled) == \
                (case.ending, d_output, case.stalls), f"{case.name}: daemon logged\n{logged}kit raised {error!r}"
            if case.ending is Ending.SERVED:
                assert d_output, case.name
            elif case.ending is Ending.RAISED:  # the same exception: the daemon's traceback ends with it
                assert f"{type(error).__name__}" in logged, case.name
            counts[case.ending.outcome] += 1
        notify.wait_for("calls: " + ", ".join(f"{counts[o]} {o.value}" for o in Outcome))
    finally:
        notify.close()


# --- the nets around a call: what ends it before any handler ran ----------------------------


class _Ends:
    """A Reporter that keeps how each call ended."""

    def __init__(self) -> None:
        self.results: list[callcore.Result] = []
        self.cancelled_calls = 0
        self.task_cancelling = 0
        """The call task's pending cancellations once it ended (Task.cancelling())."""

    @property
    def endings(self) -> list[Ending]:
        return [result.ending for result in self.results]

    def started(self, request: object, called: str) -> None:
        raise AssertionError("no handler may start")

    def stalled(self, service: object, called: str, seconds: float) -> None:
        raise AssertionError("no handler may start")

    def ended(self, daemon: object, result: callcore.Result) -> None:
        self.results.append(result)

    def cancelled(self) -> None:
        self.cancelled_calls += 1


class _Failing(callcore.Serves):
    """A socket whose first step fails as given: the caller's connection breaking under it, or
    the task waiting there until it is cancelled."""

    def __init__(self, failure: BaseException | None) -> None:
        self.failure = failure

    async def identify(self, daemon: Daemon, call: object) -> callcore.Result:
        if self.failure is not None:
            raise self.failure
        await asyncio.sleep(3600)
        raise AssertionError("not cancelled")


def _run_call(serves: callcore.Serves, cancel_with: str | None = None) -> tuple[_Ends, bytes, bool]:
    """One call through callcore.run on a socket pair: the reporter, what the caller got, and
    whether the call's task ended cancelled."""
    reporter = _Ends()

    async def main() -> tuple[bytes, bool]:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        task = asyncio.ensure_future(callcore.run(ours, Daemon("d", "", "/s"), serves, Registry(), reporter))
        await asyncio.sleep(0.05)
        if cancel_with is not None:
            task.cancel(cancel_with)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        got = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(theirs, 100), 5)
        theirs.close()
        reporter.task_cancelling = task.cancelling()
        return got, task.cancelled()

    got, cancelled = asyncio.run(main())
    return reporter, got, cancelled


class _FillsTheSocket(callcore.Serves):
    """A socket whose calls all go to one handler, which writes until the caller's socket is
    full, then 32 KiB more (less than drain() waits for): that much is left unsent when the
    handler returns."""

    written = 0

    async def identify(self, daemon: Daemon, call: Connection) -> tuple[Service, Request]:
        self.call = call
        return Service("t.Fill", "t:fill"), Request(call, "t.Fill", None, "work", max_input=0)

    async def fill(self, request: Request) -> None:
        while not self.call.pending():
            request.write(b"f" * 4096)
            self.written += 4096
        request.write(b"t" * 32768)
        self.written += 32768


def test_a_served_reply_the_caller_reads_after_the_call_ended_arrives_whole() -> None:
    """Output still unsent when the handler returns, read by the caller only once the call has
    ended: a served call's connection lingers until all of it is sent (a rejected or failed
    one is cut at once)."""
    serves = _FillsTheSocket()

    class Started(_Ends):
        def started(self, request: object, called: str) -> None:
            pass

    async def main() -> tuple[list[Ending], int]:
        reporter = Started()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        registry = Registry(loader=lambda spec: serves.fill)
        call = asyncio.ensure_future(callcore.run(ours, Daemon("d", "", "/s"), serves, registry, reporter))
        while not reporter.results:  # the handler has returned: the call has ended
            await asyncio.sleep(0.01)
        loop, got = asyncio.get_running_loop(), 0
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 5):
            got += len(chunk)
        await call
        theirs.close()
        return reporter.endings, got - serves.written

    assert asyncio.run(main()) == ([Ending.SERVED], 0)


def test_a_connection_breaking_before_any_handler_is_the_caller_gone() -> None:
    """A reset under the descriptor's read (the caller's end broke) ends the call as its caller
    going away, not as an internal error of the daemon."""
    reporter, got, cancelled = _run_call(_Failing(ConnectionResetError("reset by peer")))
    assert reporter.endings == [Ending.CALLER_GONE] and got == b"" and not cancelled
    error = reporter.results[0].error  # what ended it: what the testing kit raises in the test
    assert isinstance(error, ConnectionResetError) and error.args == ("reset by peer",)


def test_a_caller_gone_before_any_handler_ends_the_call_not_the_task() -> None:
    """The daemon's watch cancels the task of a caller that left (callcore.CALLER_GONE): the
    call ends as CALLER_GONE and its task is not cancelled; any other cancellation (the
    daemon stopping) cancels the task and is reported as such."""
    reporter, _, cancelled = _run_call(_Failing(None), cancel_with=callcore.CALLER_GONE)
    assert reporter.endings == [Ending.CALLER_GONE] and not cancelled and reporter.cancelled_calls == 0
    # Taken back, not left pending: an asyncio.timeout() or TaskGroup in whatever runs next in
    # the task would take a pending cancellation for its own.
    assert reporter.task_cancelling == 0
    error = reporter.results[0].error
    assert isinstance(error, ConnectionResetError) and error.args == (callcore.CALLER_GONE,)
    reporter, _, cancelled = _run_call(_Failing(None), cancel_with="the daemon is stopping")
    assert reporter.endings == [] and cancelled and reporter.cancelled_calls == 1


def test_a_lingering_reply_cancelled_is_cut_and_stays_cancelled() -> None:
    """A served call's unread reply lingers (Connection.close); when the daemon cancels it (its
    stop timeout ran out), the connection is cut at once, the rest of the reply dropped, and the
    task ends cancelled, as asked."""
    size = 4 << 20

    async def main() -> tuple[bool, int, int]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        call = Connection(ours, loop)
        call.write(b"x" * size)  # more than the socket takes: the rest waits in the connection
        task = asyncio.ensure_future(call.close(callcore.LINGER_TIMEOUT))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        got = 0
        theirs.setblocking(False)
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 5):
            got += len(chunk)
        theirs.close()
        return task.cancelled(), got, ours.fileno()

    cancelled, got, fileno = asyncio.run(main())
    assert cancelled and got < size and fileno == -1


def test_a_connection_the_event_loop_cannot_watch_is_closed_and_reported() -> None:
    """When the loop refuses to watch a connection whose descriptor has not come yet (epoll_ctl
    fails: ENOSPC past the user's fs.epoll.max_user_watches, ENOMEM), the call ends there: its
    descriptor is closed, so the caller sees its end, and the daemon's error is reported with
    it.  The refusal is made by replacing the loop's method: the kernel's limit is global here
    and cannot be lowered for one test."""
    reporter = _Ends()

    async def main() -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        loop.add_reader = refuse  # type: ignore[method-assign]
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        await callcore.run(ours, Daemon("d", "", "/s"), callcore.ByDescriptor(), Registry(), reporter)
        del loop.add_reader  # the instance's own again: sock_recv below waits with it
        got = await asyncio.wait_for(loop.sock_recv(theirs, 100), 5)
        theirs.close()
        return ours.fileno(), got

    fileno, got = asyncio.run(main())
    assert fileno == -1 and got == b"" and reporter.endings == [Ending.INTERNAL]
    error = reporter.results[0].error
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC


def test_a_call_that_ended_holds_nothing_of_its_connection_until_its_descriptor_deadline() -> None:
    """The descriptor's deadline timer is cancelled once the descriptor came: a finished call's
    connection is freed at once, not descriptor_timeout later (at a thousand calls a second,
    ten thousand connections' objects held for the default 10 s)."""

    async def main() -> tuple[list[Ending], int]:
        reporter = _Ends()
        ours, theirs = socket.socketpair()
        call = asyncio.ensure_future(
            callcore.run(ours, Daemon("d", "", "/s"), callcore.ByDescriptor(), Registry(), reporter))
        await asyncio.sleep(0.05)  # the call waits for its descriptor, under its deadline
        theirs.sendall(b"nobody.Here+ work\0")
        await call
        theirs.close()
        gc.collect()
        return reporter.endings, sum(isinstance(o, (Connection, callcore._Deadline)) for o in gc.get_objects())

    endings, alive = asyncio.run(main())
    assert endings == [Ending.UNKNOWN] and alive == 0


def test_a_descriptor_sent_before_the_accept_needs_no_timer_and_no_watch() -> None:
    """qrexec sends the descriptor as soon as it has connected: such a call is read at once,
    without arming the descriptor's deadline or asking the loop to watch its socket (the warm
    call's cost, bench/RESULTS.md); one whose descriptor comes later gets both."""

    async def main(early: bool) -> tuple[list[Ending], int, int]:
        loop = asyncio.get_running_loop()
        reporter = _Ends()
        ours, theirs = socket.socketpair()
        counts = {"call_later": 0, "add_reader": 0}
        for name in counts:
            real = getattr(loop, name)

            def counted(*args: object, _name: str = name, _real: object = real) -> object:
                ours_now = args[0] == ours.fileno() or isinstance(getattr(args[1], "__self__", None),
                                                                  callcore._Deadline)
                counts[_name] += ours_now  # the call's deadline, its socket: not the test's sleep
                return _real(*args)  # type: ignore[operator]

            setattr(loop, name, counted)
        if early:
            theirs.sendall(b"nobody.Here+ work\0")
        call = asyncio.ensure_future(
            callcore.run(ours, Daemon("d", "", "/s"), callcore.ByDescriptor(), Registry(), reporter))
        await asyncio.sleep(0.01)
        if not early:
            theirs.sendall(b"nobody.Here+ work\0")
        await call
        theirs.close()
        return reporter.endings, counts["call_later"], counts["add_reader"]

    assert asyncio.run(main(early=True)) == ([Ending.UNKNOWN], 0, 0)
    assert asyncio.run(main(early=False)) == ([Ending.UNKNOWN], 1, 1)


def test_a_connection_its_deadline_cut_is_never_served_though_its_descriptor_came(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline's cut comes a loop turn after the timer, so a descriptor that arrived in time
    is read first (callcore._Deadline); should a loop ever run them the other way round, the call
    whose connection was cut still ends LATE, its descriptor read but never looked up."""

    class CutFirst(callcore._Deadline):
        def __init__(self, call: Connection) -> None:
            super().__init__(call)
            self.cut = True  # as the deadline would have, had it come first

    monkeypatch.setattr(callcore, "_Deadline", CutFirst)

    async def main() -> callcore.Result | bytes:
        ours, theirs = socket.socketpair()
        call = Connection(ours, asyncio.get_running_loop())
        reading = asyncio.ensure_future(callcore._read_descriptor(Daemon("d", "", "/s"), call))
        await asyncio.sleep(0.01)
        theirs.sendall(b"my.Service work\0")
        try:
            return await reading
        finally:
            call.abort()
            theirs.close()

    assert asyncio.run(main()) == callcore.Result(Ending.LATE)
