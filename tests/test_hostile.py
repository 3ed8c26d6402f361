# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Adversarial callers against a running daemon (issue 6, part 2).

Every case ends with :func:`assert_recovered`: the daemon is alive, answers a
normal call (async and plain handlers) correctly, holds exactly the file
descriptors it held before (``/proc/PID/fd``), and its RSS is back near its
baseline.  The daemon runs as ``nobody``, serving HOSTILE_MANIFEST from a
world-readable temporary directory; handlers come from tests/handlers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qubes_socksvc import callcore
from tests.conftest import RunningDaemon, calls_at_once, raw_call

DESCRIPTOR_TIMEOUT = 1.0
MAX_CONNECTIONS = 32

HOSTILE_MANIFEST = f"""\
version: 1
daemons:
  h:
    idle_exit: 0
    max_connections: {MAX_CONNECTIONS}
    descriptor_timeout: {DESCRIPTOR_TIMEOUT}
    services:
      h.Echo:
        handler: qubes_socksvc.examples:echo
        max_input: 0
      h.Upper:
        handler: qubes_socksvc.examples:upper
      h.Fields:
        handler: handlers:fields
      h.Small:
        handler: qubes_socksvc.examples:sha256
      h.Raises:
        handler: handlers:raises
      h.Exits:
        handler: handlers:exits
      h.PlainExits:
        handler: handlers:plain_exits
      h.KeyboardInterrupt:
        handler: handlers:keyboard_interrupt
      h.CancelsItself:
        handler: handlers:cancels_itself
      h.Hangs:
        handler: handlers:hangs
        timeout: 0.5
      h.PlainHangs:
        handler: handlers:plain_hangs
        timeout: 0.5
      h.Huge:
        handler: handlers:huge
        timeout: 20
      h.HugeReturn:
        handler: handlers:huge_return
        timeout: 2
      h.HugeStuck:
        handler: handlers:huge
        timeout: 2
      h.Files:
        handler: handlers:leaks_nothing
      h.Linger:
        handler: handlers:lingering_reply
      h.Raw:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
"""

#: How far RSS may stay above the baseline once a case is over (allocator slack).
RSS_SLACK_KIB = 24 * 1024


@dataclass
class Baseline:
    fds: int
    rss_kib: int


def fd_targets(daemon: RunningDaemon) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(f"{fd} -> {os.readlink(f'/proc/{daemon.proc.pid}/fd/{fd}')}")
    return sorted(targets)


def normal_calls(daemon: RunningDaemon) -> None:
    payload = os.urandom(100_000)
    assert daemon.call(b"h.Echo+check work\0", payload) == payload
    assert daemon.call(b"h.Upper work\0", b"still here") == b"STILL HERE"
    assert daemon.call(b"h.Fields+x sys-net name dom0\0").startswith(b"service=h.Fields+x\n")


def settle(daemon: RunningDaemon) -> Baseline:
    """Warm the daemon up (handlers imported, allocator primed), then measure it."""
    for _ in range(3):
        normal_calls(daemon)
    time.sleep(0.2)
    return Baseline(daemon.fd_count(), daemon.rss_kib())


def assert_recovered(daemon: RunningDaemon, base: Baseline, timeout: float = 10) -> None:
    assert daemon.proc.poll() is None, f"daemon died:\n{daemon.log_text()[-3000:]}"
    normal_calls(daemon)
    deadline = time.monotonic() + timeout
    while daemon.fd_count() != base.fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.fd_count() == base.fds, f"fd leak: {base.fds} before, now\n" + "\n".join(fd_targets(daemon))
    while daemon.rss_kib() > base.rss_kib + RSS_SLACK_KIB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.rss_kib() <= base.rss_kib + RSS_SLACK_KIB, f"RSS {daemon.rss_kib()} KiB, baseline {base.rss_kib}"
    assert "internal error while serving a call" not in daemon.log_text()


@pytest.fixture
def hostile(start_daemon: type[RunningDaemon]) -> Iterator[tuple[RunningDaemon, Baseline]]:
    daemon = start_daemon(HOSTILE_MANIFEST, "h")
    yield daemon, settle(daemon)


def connect(daemon: RunningDaemon, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(daemon.socket())
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes (a reset counts as a close)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def handler_calls(daemon: RunningDaemon) -> int:
    """Calls dispatched to a handler so far (each is logged as "call SERVICE from SOURCE")."""
    return daemon.log_text().count("INFO: call ")


def wait_for_log(daemon: RunningDaemon, text: str, count: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while daemon.log_text().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.log_text().count(text) >= count, f"{text!r} x{count} not logged:\n{daemon.log_text()[-3000:]}"


# --- malformed descriptors -----------------------------------------------------------------

def test_no_nul_ever(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    # Ends without a NUL: refused as soon as the caller half-closes.
    assert daemon.call(b"h.Echo work", b" and some data, but never a NUL") == b""
    wait_for_log(daemon, "connection closed before the descriptor's NUL")
    # Never ends: cut off after descriptor_timeout even while bytes keep coming.
    with connect(daemon) as sock:
        start = time.monotonic()
        sock.sendall(b"h.Echo work")
        assert read_until_closed(sock) == b""
        assert DESCRIPTOR_TIMEOUT * 0.9 <= time.monotonic() - start < DESCRIPTOR_TIMEOUT + 3
    wait_for_log(daemon, f"no descriptor within {DESCRIPTOR_TIMEOUT}s")
    assert_recovered(daemon, base)


@pytest.mark.parametrize("wire", [b"\0", b"\0h.Echo work\0", b"\0\0\0\0", b" \0", b"h.Echo work\0\0"])
def test_nul_at_byte_0_and_stray_nuls(hostile: tuple[RunningDaemon, Baseline], wire: bytes) -> None:
    daemon, base = hostile
    reply = daemon.call(wire, b"payload")
    if wire == b"h.Echo work\0\0":
        assert reply == b"\0payload"  # after the descriptor's NUL, bytes are the caller's data
    else:
        assert reply == b"", "a handler ran for a descriptor starting with NUL"
        wait_for_log(daemon, "rejected call")
    assert_recovered(daemon, base)


@pytest.mark.parametrize("size", [64_999, 65_000, 65_001, 70_000, 1 << 20, 8 << 20])
def test_oversized_descriptor(hostile: tuple[RunningDaemon, Baseline], size: int) -> None:
    daemon, base = hostile
    with connect(daemon) as sock:
        sender = threading.Thread(target=send_ignoring_reset, args=(sock, b"h.Echo " + b"a" * size + b"\0"))
        sender.start()
        assert read_until_closed(sock) == b""
        sender.join(10)
        assert not sender.is_alive()
    wait_for_log(daemon, "rejected call")
    assert daemon.rss_kib() <= base.rss_kib + RSS_SLACK_KIB  # the flood was not buffered
    assert_recovered(daemon, base)


NASTY = [
    b"h.Echo w\xffrk\0",
    b"h.Ech\xc3\xa9 work\0",
    b"h.Echo\twork\0",
    b"h.Echo work\n\0",
    b"h.Echo\r\nwork\0",
    b"h.E\x1b[2Jcho work\0",
    b"h.Echo wo\x1b]0;owned\x07rk\0",
    b"h.Echo \x7fwork\0",
    b"h.Echo  work\0",
    b"h.Echo work name\0",
    b"h.Echo work name dom0 extra\0",
    b"h.Echo work bogus dom0\0",
    b"h.Echo " + b"q" * 32 + b"\0",
    b"a" * 256 + b"+h work\0",  # NAME beyond NAME_MAX (a long argument is fine: test_conformance)
    b"h.Echo%n%s work\0",
    b"h.Echo+$(id) work\0",
    b"h.Echo+a+b wo/rk\0",
    b"+h.Echo work\0",
]


def test_non_ascii_control_and_malformed_bytes(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    calls = handler_calls(daemon)
    for wire in NASTY:
        assert daemon.call(wire, b"payload") == b"", wire
    wait_for_log(daemon, "rejected call", len(NASTY))
    assert handler_calls(daemon) == calls, "a malformed descriptor reached a handler"
    log = daemon.log.read_bytes()
    for raw in (b"\x1b", b"\xff", b"\xc3", b"\r", b"\t", b"\x07", b"\x7f", b"$(id)"):
        assert raw not in log, f"raw caller bytes {raw!r} written to the log"
    assert_recovered(daemon, base)


TRAVERSAL = [
    b"../h.Echo work\0", b"h.Echo/../h.Echo work\0", b"/h.Echo work\0", b"/etc/passwd work\0", b". work\0",
    b".. work\0", b"h.Echo+../../etc/passwd work\0", b"h.Echo+a/b work\0", b"h.Echo+/ work\0", b"h.Echo ../dom0\0",
    b"h.Echo dom0/x\0", b"h.Echo work name ../x\0", b"h.Echo work keyword /\0",
]


def test_path_separators_and_traversal_are_refused(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    calls = handler_calls(daemon)
    for wire in TRAVERSAL:
        assert daemon.call(wire, b"payload") == b"", wire
    wait_for_log(daemon, "rejected call", len(TRAVERSAL))
    assert handler_calls(daemon) == calls, "a descriptor with a path reached a handler"
    assert "invalid service name or argument" in daemon.log_text()
    assert_recovered(daemon, base)


def test_no_descriptor_service_cannot_be_reached_through_the_descriptor_socket(
        hostile: tuple[RunningDaemon, Baseline]) -> None:
    """A service_descriptor: false service has its own socket; naming it in a descriptor on the
    daemon's socket (with any argument) reaches nothing."""
    daemon, base = hostile
    calls = handler_calls(daemon)
    for wire in (b"h.Raw work\0", b"h.Raw+ work\0", b"h.Raw+x work name dom0\0"):
        assert daemon.call(wire, b"payload") == b"", wire
    wait_for_log(daemon, "service h.Raw", 3)
    assert handler_calls(daemon) == calls
    assert raw_call(daemon.socket("socksvc-h.Raw.sock"), b"h.Echo work\0data") == b"h.Echo work\0data"
    assert_recovered(daemon, base)


def test_random_bytes_on_the_wire(hostile: tuple[RunningDaemon, Baseline]) -> None:
    """Seeded random garbage, some of it descriptor-shaped, from many callers: each gets an answer
    only if its descriptor was valid, and the daemon stays whole."""
    daemon, base = hostile
    rng = random.Random(6)
    pieces = [b"h.Echo", b"h.Fields", b"+", b" ", b"\0", b"work", b"dom0", b"name", b"keyword", b"..", b"/",
              b"\xff", b"\x1b", b"\n"]
    for i in range(300):
        if i % 2:
            wire = rng.randbytes(rng.randrange(0, 200))
        else:
            wire = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
        reply = raw_call(daemon.socket(), wire, timeout=10)
        head, nul, data = wire.partition(b"\0")
        if reply:  # only a valid descriptor naming a declared service gets one
            assert nul and head.split(b" ")[0].split(b"+")[0] in (b"h.Echo", b"h.Fields"), wire
            if head.startswith(b"h.Echo"):
                assert reply == data, wire
    assert_recovered(daemon, base)


# --- slow and idle callers -----------------------------------------------------------------

def test_descriptor_in_one_byte_writes_with_pauses(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    wire = b"h.Fields+abc work name dom0\0"
    with connect(daemon) as sock:
        for byte in wire:
            sock.send(bytes([byte]))
            time.sleep(DESCRIPTOR_TIMEOUT / len(wire) / 3)
        sock.shutdown(socket.SHUT_WR)
        assert read_until_closed(sock).startswith(b"service=h.Fields+abc\nname=h.Fields\nargument='abc'\n")
    assert_recovered(daemon, base)


def test_slowloris_idle_and_dripping_callers_are_cut_off_and_slots_return(
        hostile: tuple[RunningDaemon, Baseline]) -> None:
    """Every slot taken by idle or dripping callers: they are cut at descriptor_timeout, then a
    normal caller (waiting in the backlog meanwhile) is served."""
    daemon, base = hostile
    idle = [connect(daemon) for _ in range(MAX_CONNECTIONS)]
    drip = [connect(daemon) for _ in range(MAX_CONNECTIONS // 2)]
    stop = threading.Event()

    def dripper() -> None:
        while not stop.wait(DESCRIPTOR_TIMEOUT / 5):
            for sock in drip:
                send_ignoring_reset(sock, b"a")

    threading.Thread(target=dripper, daemon=True).start()
    try:
        start = time.monotonic()
        assert daemon.call(b"h.Echo work\0", b"patient") == b"patient"
        waited = time.monotonic() - start
        assert DESCRIPTOR_TIMEOUT * 0.8 <= waited < 3 * DESCRIPTOR_TIMEOUT + 3, waited
        for sock in idle + drip:
            sock.settimeout(3 * DESCRIPTOR_TIMEOUT + 5)
            assert read_until_closed(sock) == b""
        assert time.monotonic() - start < 3 * DESCRIPTOR_TIMEOUT + 5
    finally:
        stop.set()
        for sock in idle + drip:
            sock.close()
    wait_for_log(daemon, "no descriptor within", len(idle) + len(drip))
    assert_recovered(daemon, base)


# --- callers that misbehave while the reply flows ----------------------------------------------

def test_reset_in_the_middle_of_a_reply(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    for _ in range(10):
        with connect(daemon) as sock:
            sock.sendall(b"h.Huge work\0")
            sock.shutdown(socket.SHUT_WR)
            got = 0
            while got < 1 << 20:
                got += len(sock.recv(65536))
            # closing with unread data resets the connection under the daemon's writes
    wait_for_log(daemon, "caller went away", 10)
    assert_recovered(daemon, base)


def test_reader_that_never_reads(hostile: tuple[RunningDaemon, Baseline]) -> None:
    """Backpressure: 64 MiB of output to a caller that never reads is not buffered; the call
    ends at its timeout, and a caller stuck this way does not block other callers."""
    daemon, base = hostile
    stuck = []
    for _ in range(4):
        sock = connect(daemon)
        sock.sendall(b"h.HugeStuck work\0")
        sock.shutdown(socket.SHUT_WR)
        stuck.append(sock)
    try:
        time.sleep(1)
        normal_calls(daemon)  # others are served meanwhile
        assert daemon.rss_kib() <= base.rss_kib + RSS_SLACK_KIB, "output to a non-reader was buffered"
        wait_for_log(daemon, "call h.HugeStuck timed out after 2", 4)
        for sock in stuck:  # the daemon cut them: what was in flight, then EOF
            sock.settimeout(10)
            assert len(read_until_closed(sock)) < 8 << 20
    finally:
        for sock in stuck:
            sock.close()
    assert_recovered(daemon, base)


def test_unread_output_of_finished_calls_counts_against_max_connections(
        hostile: tuple[RunningDaemon, Baseline]) -> None:
    """Regression: a call whose output the caller had not read yet released its slot when the
    handler returned, while its connection lingered (fd and output buffer) for 10 s: callers that
    never read made the daemon hold any number of connections, beyond max_connections."""
    daemon, base = hostile
    size = 262_144
    callers = []
    try:
        for _ in range(3 * MAX_CONNECTIONS):
            sock = connect(daemon, timeout=20)
            sock.sendall(b"h.Linger+%d work\0" % size)
            sock.shutdown(socket.SHUT_WR)
            callers.append(sock)
        wait_for_log(daemon, "call h.Linger", MAX_CONNECTIONS)
        most = 0
        for _ in range(20):
            most = max(most, daemon.fd_count())
            time.sleep(0.05)
        assert most <= base.fds + MAX_CONNECTIONS, f"{most - base.fds} connections held, limit {MAX_CONNECTIONS}"
        for sock in callers:  # nothing is lost: every caller, served in turn, gets all its output
            assert len(read_until_closed(sock)) == size
    finally:
        for sock in callers:
            sock.close()
    assert_recovered(daemon, base)


def test_a_reply_nobody_reads_holds_its_connection_for_the_linger_time_only(
        hostile: tuple[RunningDaemon, Baseline]) -> None:
    """A served call whose caller never reads the rest of its reply keeps its connection (and
    slot) for callcore.LINGER_TIMEOUT, so a slow reader still gets it whole, and no longer: then
    the connection is cut, so not reading cannot hold a slot for good."""
    daemon, base = hostile
    with connect(daemon, timeout=60) as sock:
        sock.sendall(b"h.Linger+262144 work\0")
        sock.shutdown(socket.SHUT_WR)
        wait_for_log(daemon, "call h.Linger+262144")
        returned = time.monotonic()
        deadline = returned + callcore.LINGER_TIMEOUT + 20
        while daemon.fd_count() != base.fds:
            assert time.monotonic() < deadline, "the unread reply's connection was never cut"
            time.sleep(0.05)
        held = time.monotonic() - returned
        assert len(read_until_closed(sock)) < 262144  # cut: the rest of the reply never came
    assert held >= callcore.LINGER_TIMEOUT - 0.5, f"cut after {held:.1f}s, before the linger time"
    assert_recovered(daemon, base)


def test_huge_returned_reply_to_a_non_reader_is_released(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    with connect(daemon) as sock:
        sock.sendall(b"h.HugeReturn work\0")
        sock.shutdown(socket.SHUT_WR)
        wait_for_log(daemon, "call h.HugeReturn timed out after 2")
    assert_recovered(daemon, base)


def test_huge_output_read_slowly_keeps_memory_flat(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    with connect(daemon, timeout=60) as sock:
        sock.sendall(b"h.Huge work\0")
        sock.shutdown(socket.SHUT_WR)
        total, peak = 0, 0
        while data := sock.recv(1 << 20):
            total += len(data)
            if total % (8 << 20) < len(data):
                peak = max(peak, daemon.rss_kib())
                time.sleep(0.05)
    assert total == 64 << 20
    assert peak <= base.rss_kib + 16 * 1024, f"RSS {peak} KiB while streaming, baseline {base.rss_kib}"
    assert_recovered(daemon, base)


def test_input_flood_beyond_max_input(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile
    with connect(daemon) as sock:
        sock.sendall(b"h.Small work\0")
        sender = threading.Thread(target=send_ignoring_reset, args=(sock, b"z" * (16 << 20)))
        sender.start()
        assert read_until_closed(sock) == b""
        sender.join(10)
    wait_for_log(daemon, "input exceeds max_input")
    assert_recovered(daemon, base)


# --- many callers at once ----------------------------------------------------------------------

def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_2000_connections_at_once(hostile: tuple[RunningDaemon, Baseline]) -> None:
    """2000 callers connect before any is served (they wait in the backlog while the daemon
    serves MAX_CONNECTIONS at a time); half of them are hostile.  Every honest one is answered."""
    daemon, base = hostile
    raise_fd_limit(2000 + 256)

    async def scenario() -> list[bytes]:
        pairs = await asyncio.gather(*(asyncio.open_unix_connection(daemon.socket()) for _ in range(2000)))

        async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            hostile_kind = i % 4
            if hostile_kind == 1:
                writer.write(b"../h.Echo work\0junk")
            elif hostile_kind == 3:
                writer.write(b"h.Echo w\xffrk")  # no NUL, and then EOF
            else:
                writer.write(b"h.Echo+%d work\0caller %d" % (i, i))
            writer.write_eof()
            try:
                return await reader.read()
            except ConnectionResetError:
                return b""
            finally:
                writer.close()

        return await asyncio.wait_for(asyncio.gather(*(one(i, *pair) for i, pair in enumerate(pairs))), 120)

    replies = asyncio.run(scenario())
    for i, reply in enumerate(replies):
        assert reply == (b"caller %d" % i if i % 2 == 0 else b""), i
    assert_recovered(daemon, base)


SEVERAL_SOCKETS = """\
version: 1
daemons:
  s:
    idle_exit: 0
    max_connections: 2
    services:
      s.Slow:
        handler: handlers:slow
      s.RawA:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
      s.RawB:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
"""


def test_idle_listeners_hold_no_slots(start_daemon: type[RunningDaemon]) -> None:
    """Regression: each socket's accept loop took a max_connections slot before waiting for a
    caller, so idle sockets held slots: with max_connections 2 and three sockets, calls to the
    third socket were never accepted, and the daemon's socket served one call at a time."""
    daemon = start_daemon(SEVERAL_SOCKETS, "s")
    assert raw_call(daemon.socket("socksvc-s.RawB.sock"), b"b", timeout=5) == b"b"
    assert raw_call(daemon.socket("socksvc-s.RawA.sock"), b"a", timeout=5) == b"a"
    start = time.monotonic()
    assert calls_at_once(daemon, b"s.Slow+2 work\0", 2, timeout=10) == [b"done\n", b"done\n"]
    assert time.monotonic() - start < 3.5, "the two slots were not both available to the daemon's socket"


# --- handlers that misbehave ------------------------------------------------------------------

@pytest.mark.parametrize("service, logged", [
    ("h.Raises", "RuntimeError: handler failure on purpose"),
    ("h.Exits", "SystemExit: 3"),
    ("h.PlainExits", "SystemExit: 4"),
    ("h.KeyboardInterrupt", "KeyboardInterrupt"),
    ("h.CancelsItself", "CancelledError"),
])
def test_handler_that_raises_or_exits(hostile: tuple[RunningDaemon, Baseline], service: str, logged: str) -> None:
    """Each call fails and is logged; the traceback of a fault that repeats on every call is logged
    once a minute, not once a call (issue 11: a careless handler must not flood the journal)."""
    daemon, base = hostile
    for _ in range(20):
        assert daemon.call(f"{service} work\0".encode()) == b""
    wait_for_log(daemon, logged)
    wait_for_log(daemon, f"call {service} from work", 20)
    assert daemon.log_text().count("Traceback") == 1, daemon.log_text()[-3000:]
    assert daemon.log_text().count(f"call {service}: handler") == 1
    assert_recovered(daemon, base)


def test_async_handler_hanging_past_its_timeout(hostile: tuple[RunningDaemon, Baseline]) -> None:
    daemon, base = hostile

    def one() -> float:
        start = time.monotonic()
        assert daemon.call(b"h.Hangs work\0", timeout=10) == b""
        return time.monotonic() - start

    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(one())) for _ in range(MAX_CONNECTIONS * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == MAX_CONNECTIONS * 2 and max(results) < 5, results
    wait_for_log(daemon, "call h.Hangs timed out after 0.5s", MAX_CONNECTIONS * 2)
    assert_recovered(daemon, base)


def test_plain_handler_hanging_past_its_timeout_starves_nothing(hostile: tuple[RunningDaemon, Baseline]) -> None:
    """Regression: plain handlers ran in asyncio's default pool (min(32, cpus + 4) threads); a
    few calls stuck past their timeout took every worker, so every later plain call hung, and
    SIGTERM could not stop the daemon (the pool's threads are joined at exit)."""
    daemon, base = hostile
    for _ in range(12):
        start = time.monotonic()
        assert daemon.call(b"h.PlainHangs work\0", timeout=10) == b""
        assert time.monotonic() - start < 3
    assert daemon.call(b"h.Upper work\0", b"plain calls still run", timeout=5) == b"PLAIN CALLS STILL RUN"
    assert daemon.call(b"h.Files work\0", timeout=5).strip() == str(daemon.proc.pid).encode()
    assert_recovered(daemon, base)
    start = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=10) == 0, daemon.log_text()[-3000:]
    assert time.monotonic() - start < 5


def test_just_exec_storm(hostile: tuple[RunningDaemon, Baseline]) -> None:
    """MSG_JUST_EXEC: descriptor then close, many times, also for handlers that fail."""
    daemon, base = hostile
    for i in range(200):
        with connect(daemon) as sock:
            sock.sendall([b"h.Echo work\0", b"h.Raises work\0", b"h.Upper work\0", b"h.Nothing work\0"][i % 4])
    wait_for_log(daemon, "call h.Upper from work", 50)
    assert_recovered(daemon, base)


def test_log_names_no_unvalidated_field(hostile: tuple[RunningDaemon, Baseline], tmp_path: Path) -> None:
    """What the daemon logs about a rejected call comes from validated fields or fixed text."""
    daemon, base = hostile
    marker = b"INJECTED-MARKER"
    for wire in (b"h.Nothing " + marker + b"!\0", b"h.Echo+" + marker + b"/ work\0", marker + b"\xff work\0",
                 b"h.Echo work keyword " + marker + b"@" * 60 + b"\0"):
        assert raw_call(daemon.socket(), wire) == b""
    wait_for_log(daemon, "rejected call", 4)
    assert marker not in daemon.log.read_bytes()
    assert_recovered(daemon, base)
