# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``call``: what the qrexec agent does towards a socket service, as a local tool.

Resolves ``NAME+ARG`` then ``NAME`` through the qubes-rpc search path, reads the
matching rpc-config for ``skip-service-descriptor``, connects, sends the
descriptor, streams stdin, half-closes, and streams the reply to stdout.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from typing import BinaryIO

from . import qrexec, rpcconfig
from .descriptor import Descriptor
from .errors import SocksvcError

CHUNK_SIZE = 65536


class CallError(SocksvcError):
    """The call could not be made; ``exit_code`` mirrors qrexec's (125: no service)."""

    def __init__(self, message: str, exit_code: int = 125) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve(
    name: str,
    argument: str | None,
    search_path: tuple[str, ...] = qrexec.RPC_SEARCH_PATH,
) -> tuple[str, str]:
    """(the qubes-rpc entry qrexec would use, the name it matched as)."""
    for candidate in qrexec.lookup_names(name, argument):
        for directory in search_path:
            path = os.path.join(directory, candidate)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # includes a symlink whose socket is gone: qrexec skips it
            except OSError as e:
                raise CallError(f"{path}: {e.strerror}") from e
            if not stat.S_ISSOCK(st.st_mode):
                raise CallError(f"{path} is an executable service, not a socket; run it with qrexec")
            return path, candidate
    tried = ", ".join(qrexec.lookup_names(name, argument))
    raise CallError(f"service {tried} not found in {':'.join(search_path)}")


def skips_descriptor(matched: str, config_path: tuple[str, ...] = qrexec.RPC_CONFIG_SEARCH_PATH) -> bool:
    """rpc-config's ``skip-service-descriptor`` for the matched name (first file wins)."""
    for directory in config_path:
        path = os.path.join(directory, matched)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as e:
            raise CallError(f"{path}: {e}") from e
        try:
            return rpcconfig.parse(text).get("skip-service-descriptor") is True
        except rpcconfig.RpcConfigError as e:
            raise CallError(f"{path}: invalid rpc-config, qrexec would fail the call: {e}") from e
    return False


def call(
    socket_path: str,
    desc: Descriptor | None,
    stdin: BinaryIO,
    stdout: BinaryIO,
) -> None:
    """Run one call: descriptor (unless None), stdin until EOF then half-close, stdout until EOF."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(socket_path)
        except OSError as e:
            raise CallError(f"cannot connect to {socket_path}: {e.strerror} (is the socket unit running?)") from e
        if desc is not None:
            sock.sendall(desc.encode())
        _pump(sock, stdin.fileno(), stdout)
    finally:
        sock.close()


def _pump(sock: socket.socket, stdin_fd: int, stdout: BinaryIO) -> None:
    """Copy stdin -> socket (in a thread) while copying socket -> stdout, like qrexec's
    data loop: the two directions never wait for each other."""

    def send() -> None:
        try:
            while data := os.read(stdin_fd, CHUNK_SIZE):
                sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # the service stopped reading; its output still counts
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
        stdout.write(data)
        stdout.flush()
