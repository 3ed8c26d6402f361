# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``journal_sink.py DIR``: stands in for journald where it does not run.

Binds a datagram socket at ``DIR/journal/socket``; the bench mounts ``DIR`` over /run/systemd
in the daemon's own mount namespace, so the daemon sends its log where its unit would, to
/run/systemd/journal/socket (libsystemd's sd_journal_sendv and python-systemd's journal.send
use that path and no other, so the daemon of any commit logs the same way).

Each datagram is received as journald receives it (journald-server.c: server_process_datagram,
one recvmsg() per wake-up of its event loop): the socket asks for the sender's credentials and
a timestamp with each datagram (SO_PASSCRED, SO_TIMESTAMP), and the datagram is read into one
buffer kept for the sink's life (journald grows its own, never allocates one per datagram); the
sink wakes for each datagram that finds it waiting, as journald does.  It is then counted;
journald's own work (parsing the fields, writing the journal file) is not done, so journald
costs more per entry than this does.
On SIGTERM it prints how many entries it received, how many were the lines of example.Echo
calls, and the fields of the first of those.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import sys

CALL_LINE = b"MESSAGE=call example.Echo from dom0\n"
#: SO_TIMESTAMP (asm-generic/socket.h); Python's socket module does not name it.
SO_TIMESTAMP = 29
#: Room for what journald asks with each datagram: credentials, a timestamp, and fds (a memfd).
ANCILLARY = socket.CMSG_SPACE(12) + socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4 * 4)


def main() -> int:
    directory = os.path.join(sys.argv[1], "journal")
    os.mkdir(directory)
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
    buffer = bytearray(1 << 20)  # a longer datagram is cut (MSG_TRUNC), and still counted
    view = memoryview(buffer)
    entries = calls = errors = 0
    first: bytes = b""
    # Stopped, it reads what is queued still, then ends.
    signal.signal(signal.SIGTERM, lambda *_: sock.setblocking(False))
    while True:
        try:
            size, ancillary, _, _ = sock.recvmsg_into([buffer], ANCILLARY)
        except BlockingIOError:
            break
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", value[:len(value) - len(value) % 4]):
                    os.close(fd)
        data = view[:size].tobytes()
        entries += 1
        if data.startswith(CALL_LINE):
            calls += 1
            first = first or data
        elif b"PRIORITY=3\n" in data or b"PRIORITY=2\n" in data:
            errors += 1
    print(f"entries {entries} calls {calls} errors {errors}")
    print("first call line's fields:", " ".join(sorted(line.partition(b"=")[0].decode()
                                                       for line in first.split(b"\n") if b"=" in line)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
