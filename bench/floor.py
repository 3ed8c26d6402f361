# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The floor: the seed document's own example server, answering as an echo.

``qrexec-socket-services.txt``, "Python server with socket activation": asyncio, the
listening socket from ``systemd.daemon.listen_fds`` when socket-activated (else it binds
``SOCKET`` itself), the whole input read, split at the descriptor's NUL, the reply written,
the connection closed.  No validation, no dispatch, no logging.  Two departures, both to
measure like with like: the event loop is uvloop's when uvloop imports (the daemon's own
rule, ``server._loop_factory``; ``bench/no_uvloop`` hides it for both), and a socket it
binds itself listens with the daemon's ``SOMAXCONN`` backlog instead of asyncio's 100.

Run as a script (``python3 floor.py SOCKET``) so it imports nothing of ours.
"""

import asyncio
import os
import socket
import sys

from systemd.daemon import listen_fds


class SocketService:
    def __init__(self, socket_path: str, socket_activated: bool = False) -> None:
        self._socket_path = socket_path
        self._socket_activated = socket_activated

    async def run(self) -> None:
        server = await self.start()
        print("serving", file=sys.stderr, flush=True)
        async with server:
            await server.serve_forever()

    async def start(self) -> asyncio.AbstractServer:
        if self._socket_activated:
            fds = listen_fds()
            if fds:
                assert len(fds) == 1, f"too many listen_fds: {fds}"
                sock = socket.socket(fileno=fds[0])
                return await asyncio.start_unix_server(self._client_connected, sock=sock)
        if os.path.exists(self._socket_path):
            os.unlink(self._socket_path)
        return await asyncio.start_unix_server(self._client_connected, path=self._socket_path,
                                               backlog=socket.SOMAXCONN)

    async def _client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read()
            assert b"\0" in data, data
            service_descriptor, data = data.split(b"\0", 1)
            response = await self.handle_request(service_descriptor, data)
            writer.write(response)
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    async def handle_request(self, service_descriptor: bytes, data: bytes) -> bytes:
        return data


def main() -> None:
    service = SocketService(sys.argv[1], socket_activated="LISTEN_FDS" in os.environ)
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(service.run())


if __name__ == "__main__":
    main()
