# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``call``: what the qrexec agent does towards a socket or TCP service, as a local tool.

Resolves the call's qubes-rpc file and, independently, its rpc-config like the
agent (lookup.py), connects, sends the descriptor unless the config says
``skip-service-descriptor=true``, streams stdin, half-closes, and streams the
reply to stdout.  Exit codes are qrexec's (libqrexec/qrexec.h): 127 when no
service file is found, 125 when the call cannot be made or is cut off (stdin
or stdout fails).  A non-blocking stdin or stdout is waited for, as qrexec's
own data loop waits for the descriptors it sets non-blocking.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO

from . import lookup, qrexec
from .errors import SocksvcError
from .qrexec import CHUNK_SIZE

#: libqrexec/qrexec.h: QREXEC_EXIT_SERVICE_NOT_FOUND, QREXEC_EXIT_PROBLEM.
EXIT_SERVICE_NOT_FOUND = 127
EXIT_PROBLEM = 125


class CallError(SocksvcError):
    """The call could not be made; ``exit_code`` is qrexec's (127: no service, 125: cannot call)."""

    def __init__(self, message: str, exit_code: int = EXIT_PROBLEM) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve(service: str, search_path: Sequence[str] = qrexec.RPC_SEARCH_PATH) -> lookup.Entry:
    """The socket or TCP service qrexec would connect to for a call of ``service``."""
    try:
        entry = lookup.find_service(service, search_path)
    except lookup.LookupFailed as e:
        raise CallError(f"{e}; qrexec fails the call") from e
    if entry is None:
        tried = " then ".join(qrexec.lookup_keys(service))
        raise CallError(f"service {service} not found: no {tried} in {':'.join(search_path)}",
                        EXIT_SERVICE_NOT_FOUND)
    if entry.kind is lookup.Kind.EXECUTABLE:
        raise CallError(f"{entry.path} is an executable service, not a socket; run it with qrexec-client-vm")
    if entry.kind in (lookup.Kind.DIRECTORY, lookup.Kind.OTHER):
        raise CallError(f"{entry.path} is {entry.kind.value}; qrexec fails the call (125)")
    return entry


def tcp_address(link_target: str, service: str) -> tuple[str, str]:
    """(host, port) of a ``/dev/tcp[/HOST[/PORT]]`` service for this call
    (libqrexec/exec.c: find_qrexec_service, TCP branch; see qrexec.tcp_address)."""
    try:
        return qrexec.tcp_address(link_target, qrexec.split_service(service)[1])
    except ValueError as e:
        raise CallError(str(e)) from e


def connect(entry: lookup.Entry, service: str) -> socket.socket:
    """Connect like the agent: the Unix socket, or the numeric TCP address (no name lookup)."""
    if entry.kind is lookup.Kind.SOCKET:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[Any, ...] = entry.path
        hint = " (is the socket unit running?)"
    else:
        assert entry.link_target is not None
        host, port = tcp_address(entry.link_target, service)
        try:
            family, address = qrexec.tcp_sockaddr(host, port)
        except ValueError as e:
            raise CallError(f"{entry.path} -> {e}") from e
        sock = socket.socket(family, socket.SOCK_STREAM)
        hint = ""
    try:
        sock.connect(address)
    except OSError as e:
        sock.close()
        raise CallError(f"cannot connect to {entry.path}: {e.strerror}{hint}") from e
    return sock


def call(sock: socket.socket, descriptor: bytes | None, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Run one call on a connected socket: the descriptor (unless None), stdin until EOF
    then half-close, stdout until EOF.  Raises CallError (125) when the descriptor cannot be
    sent, or stdin or stdout fails: the call is then cut off, with no end of input sent."""
    with sock:
        if descriptor is not None:
            try:
                sock.sendall(descriptor)
            except OSError as e:  # libqrexec/exec.c: the descriptor is the socket's first data; qrexec fails with 125
                raise CallError(f"cannot send the service descriptor: {e.strerror}") from e
        _pump(sock, stdin.fileno(), stdout.fileno())


def _pump(sock: socket.socket, stdin_fd: int, stdout_fd: int) -> None:
    """Copy stdin -> socket (in a thread) while copying socket -> stdout, like qrexec's
    data loop: the two directions never wait for each other."""
    failures: list[CallError] = []

    def cut(failure: CallError) -> None:
        """End the call now, without the half-close that would tell the service the input is
        whole: the receiving loop (and a send blocked on a full socket) wake up at once."""
        failures.append(failure)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def send() -> None:
        while True:
            try:
                data = _read(stdin_fd)
            except OSError as e:
                cut(CallError(f"cannot read standard input: {e.strerror}; the call was cut off"))
                return
            if not data:
                break
            try:
                sock.sendall(data)
            except OSError:  # the service stopped reading, or the call ended: its output still counts
                return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while True:
        try:
            data = sock.recv(CHUNK_SIZE)
        except ConnectionResetError:
            break
        if not data:
            break
        try:
            _write_all(stdout_fd, data)
        except OSError as e:
            cut(CallError(f"cannot write the reply to standard output: {e.strerror}; the call was cut off"))
            break
    if failures:
        raise failures[0]


def _read(fd: int) -> bytes:
    """The next chunk of ``fd``, ``b""`` at its end; waits on a non-blocking ``fd``
    (libqrexec/remote.c: handle_input_v2: EAGAIN waits for the next poll, ECONNRESET is EOF)."""
    while True:
        try:
            return os.read(fd, CHUNK_SIZE)
        except BlockingIOError:
            _wait(fd, select.POLLIN)
        except ConnectionResetError:
            return b""


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``, unbuffered (a failed write leaves nothing for Python's exit
    flush to fail on again); waits on a non-blocking ``fd`` (libqrexec/write-stdin.c: write_stdin)."""
    pending = memoryview(data)
    while pending:
        try:
            pending = pending[os.write(fd, pending):]
        except BlockingIOError:
            _wait(fd, select.POLLOUT)


def _wait(fd: int, event: int) -> None:
    poller = select.poll()
    poller.register(fd, event)
    poller.poll()
