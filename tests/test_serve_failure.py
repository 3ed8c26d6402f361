# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""A socket-activated daemon that cannot serve closes the calls already waiting.

systemd keeps the listening socket, with its pending connections, when the daemon
exits; the service sets no start limit (systemd.unit(5): a crashing handler must not
fail the socket for good), so a daemon that exits without accepting them would be
started again and again for as long as a caller waits, and the caller would hang.
Here the test holds the listening socket as systemd does and passes it the way
sd_listen_fds(3) reads it (LISTEN_PID, LISTEN_FDS, fd 3).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, world_dir

#: Put the listening socket at fd 3, name this process in LISTEN_PID, then become nobody
#: (setpriv execs in place: the PID stays).
WRAPPER = """\
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execvp("setpriv", ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *sys.argv[2:]])
"""


@pytest.mark.parametrize("spec", ["missing", "other-daemon"])
def test_a_daemon_that_cannot_load_its_spec_closes_the_waiting_calls(tmp_path: Path, spec: str) -> None:
    work = world_dir("socksvc-turnaway-")
    spec_path = work / "d.json"
    if spec == "other-daemon":  # a spec of another daemon: serve refuses it
        spec_path.write_text('{"version": 1, "manifest": "/m", "manifest_sha256": "0",'
                             ' "daemon": {"name": "other", "description": "x", "socket": "/run/qubes/x.sock",'
                             ' "services": {}}}\n')
        spec_path.chmod(0o644)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(work / "d.sock"))
    listener.listen(8)
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    caller.connect(str(work / "d.sock"))  # waits in the backlog, as a qrexec call would
    caller.sendall(b"svc+ work\0")
    caller.settimeout(20)
    try:
        result = subprocess.run(
            [sys.executable, "-c", WRAPPER, str(listener.fileno()), sys.executable, "-m", "qubes_socksvc",
             "serve", "d", "--spec", str(spec_path)],
            pass_fds=(listener.fileno(),), env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert "closed 1 waiting calls: this daemon cannot serve" in result.stderr, result.stderr
        try:
            reply = caller.recv(100)
        except ConnectionResetError:
            reply = b""
        assert reply == b"", reply  # EOF at once: the caller's call ends, it does not hang
        # The listening socket is still systemd's, and still works for the next start.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        caller.close()
        listener.close()
