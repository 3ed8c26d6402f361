# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The floor: a bare asyncio Unix-socket server, no validation, no dispatch.

Reads the descriptor to its NUL, reads the input to EOF, writes it back.  What
pure Python asyncio costs; run as a script (``python3 floor.py SOCKET``) so it
imports nothing but asyncio.
"""

import asyncio
import socket
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\0")
    writer.write(await reader.read())
    await writer.drain()
    writer.close()


async def main(path: str) -> None:
    server = await asyncio.start_unix_server(handle, path, backlog=socket.SOMAXCONN)
    print("serving", file=sys.stderr, flush=True)
    await server.serve_forever()


asyncio.run(main(sys.argv[1]))
