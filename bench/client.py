# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A client that behaves like qrexec: connect, descriptor, stdin, half-close, read to EOF.

Kept lean (blocking sockets, or a bare epoll loop for many callers) so that the
load generator costs less than the servers it measures.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RECV_SIZE = 65536


class BenchError(Exception):
    """A server answered wrongly or not at all: the figure is void."""


def call(path: str, payload: bytes) -> bytes:
    """One call: ``payload`` is the descriptor plus stdin; returns stdout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(RECV_SIZE):
            chunks.append(data)
        return b"".join(chunks)
    finally:
        sock.close()


def sequential(path: str, payload: bytes, expect: bytes, calls: int) -> list[float]:
    """Latency in seconds of ``calls`` back-to-back calls, each checked."""
    latencies = []
    clock = time.perf_counter
    for _ in range(calls):
        start = clock()
        reply = call(path, payload)
        latencies.append(clock() - start)
        if reply != expect:
            raise BenchError(f"{path}: wrong reply {reply[:60]!r}")
    return latencies


def first_reply(path: str, payload: bytes, expect: bytes, timeout: float = 30) -> float:
    """Seconds from connect to the first byte of the reply (the rest is read and checked)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        start = time.perf_counter()
        sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        first = sock.recv(RECV_SIZE)
        elapsed = time.perf_counter() - start
        chunks = [first]
        while first and (data := sock.recv(RECV_SIZE)):
            chunks.append(data)
    finally:
        sock.close()
    if b"".join(chunks) != expect:
        raise BenchError(f"{path}: wrong reply to the cold call {b''.join(chunks)[:60]!r}")
    return elapsed


@dataclass
class LoadResult:
    calls: int
    correct: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def concurrent(path: str, descriptor: bytes, callers: int, calls_each: int) -> LoadResult:
    """``callers`` callers at once, each making ``calls_each`` calls in a row (closed loop).

    One epoll loop drives every caller: non-blocking connect, send, half-close,
    read to EOF, check, next call.  Each caller's input names it, so a reply
    sent to the wrong caller counts as wrong.
    """
    poller = select.epoll()
    clock = time.perf_counter
    socks: dict[int, tuple[socket.socket, int, bytes, float, list[bytes]]] = {}
    remaining = [calls_each] * callers
    latencies: list[float] = []
    correct = 0

    def start(caller: int) -> None:
        data = b"caller %d call %d\n" % (caller, remaining[caller])
        remaining[caller] -= 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        began = clock()
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:  # the listen backlog is full: retry, as qrexec would block
                time.sleep(0.001)
        sock.send(descriptor + data)
        sock.shutdown(socket.SHUT_WR)
        socks[sock.fileno()] = (sock, caller, data, began, [])
        poller.register(sock.fileno(), select.EPOLLIN)

    t0 = clock()
    for caller in range(callers):
        start(caller)
    while socks:
        for fd, _ in poller.poll():
            sock, caller, data, began, chunks = socks[fd]
            try:
                chunk = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if chunk:
                chunks.append(chunk)
                continue
            latencies.append(clock() - began)
            poller.unregister(fd)
            del socks[fd]
            sock.close()
            if b"".join(chunks) == data:
                correct += 1
            if remaining[caller]:
                start(caller)
    seconds = clock() - t0
    poller.close()
    return LoadResult(callers * calls_each, correct, seconds, latencies)


def pattern_block(size: int = 1 << 20) -> bytes:
    """A block of random bytes, repeated to make the stream (generated on the fly)."""
    return os.urandom(size)


def stream(path: str, prefix: bytes, total: int, block: bytes, relay: socket.socket | None = None,
           timeout: float = 300) -> float:
    """Send ``prefix`` then ``total`` bytes (``block`` repeated) to ``path``; read them back; bytes/s.

    The bytes come back on the same connection (an echo), or, with ``relay``,
    on the first connection accepted there (a relay such as socat forwarding
    to us).  A sender thread writes while this thread reads and checks every
    byte against the pattern, so nothing holds more than a block or two.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    source = sock
    size = len(block)
    failure: list[BaseException] = []

    def sender() -> None:
        try:
            sock.sendall(prefix)
            view = memoryview(block)
            left = total
            while left:
                n = min(left, size)
                sock.sendall(view[:n])
                left -= n
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the reader
            failure.append(e)

    doubled = block + block  # any window of the pattern is one contiguous slice
    buf = bytearray(4 * RECV_SIZE)
    view = memoryview(buf)
    start = time.perf_counter()
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    received = 0
    try:
        if relay is not None:
            relay.settimeout(timeout)
            source, _ = relay.accept()
            source.settimeout(timeout)
        while True:
            n = source.recv_into(buf)
            if not n:
                break
            offset = received % size
            if bytes(view[:n]) != doubled[offset:offset + n]:  # bytes: memcmp, not per item
                raise BenchError(f"{path}: stream corrupted near byte {received}")
            received += n
    finally:
        elapsed = time.perf_counter() - start
        if failure or received != total:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the sender
        thread.join()
        sock.close()
        source.close()
    if failure:
        raise BenchError(f"{path}: sending failed: {failure[0]!r}")
    if received != total:
        raise BenchError(f"{path}: got back {received} of {total} bytes")
    return total / elapsed


def listening(path: str) -> bool:
    """Whether a socket bound at ``path`` is listening (from /proc/net/unix: no connection made)."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_listening(path: str, alive: Callable[[], bool], timeout: float = 20) -> None:
    """Until a socket listens at ``path``; fails early when ``alive()`` turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(path):
            return
        if not alive():
            raise BenchError(f"the server for {path} exited before listening")
        time.sleep(0.005)
    raise BenchError(f"nothing listens on {path} after {timeout}s")
