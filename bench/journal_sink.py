# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``journal_sink.py DIR``: stands in for journald where it does not run.

Binds a datagram socket at ``DIR/journal/socket``; the bench mounts ``DIR`` over /run/systemd
in the daemon's own mount namespace, so the daemon sends its log where its unit would, to
/run/systemd/journal/socket (libsystemd's sd_journal_sendv and python-systemd's journal.send
use that path and no other, so the daemon of any commit logs the same way).  Each datagram is
received and counted; journald's own work (parsing, writing the journal file) is not done.
On SIGTERM it prints how many entries it received, how many were the lines of example.Echo
calls, and the fields of the first of those.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

CALL_LINE = b"MESSAGE=call example.Echo from dom0\n"


def main() -> int:
    directory = os.path.join(sys.argv[1], "journal")
    os.mkdir(directory)
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    entries = calls = errors = 0
    first: bytes = b""
    # Stopped, it reads what is queued still, then ends.
    signal.signal(signal.SIGTERM, lambda *_: sock.setblocking(False))
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
        except BlockingIOError:
            break
        for fd in fds:
            os.close(fd)
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
