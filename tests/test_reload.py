# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Live reload: an applied manifest reaches a running daemon for the next call, without a restart,
while calls in flight finish on the spec they started with."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NotifySocket, raw_call, run_cli, world_dir
from tests.test_spec import SpecDaemon

BEFORE = """\
version: 1
daemons:
  r:
    idle_exit: 0
    services:
      r.Echo:
        handler: qubes_socksvc.examples:echo
        max_input: 0
      r.Slow:
        handler: handlers:slow
        timeout: 1
      r.Gone:
        handler: handlers:fields
"""
AFTER = BEFORE.replace("timeout: 1", "timeout: 9").replace("r.Gone:", "r.Added:")


@pytest.fixture
def world() -> Iterator[tuple[Path, Path, SpecDaemon]]:
    """(staging root, manifest, a daemon serving the spec apply wrote there)."""
    root = world_dir("socksvc-reload-")
    manifest = root / "manifest.yaml"
    manifest.write_text(BEFORE)
    run_cli("apply", "-c", str(manifest), "--root", str(root), check=True)
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/r.json", world_dir("socksvc-reload-bind-"), "r")
    yield root, manifest, daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(daemon.bind_dir, ignore_errors=True)


def apply(root: Path, manifest: Path, text: str) -> str:
    manifest.write_text(text)
    return run_cli("apply", "-c", str(manifest), "--root", str(root), check=True).stdout


class Stream:
    """A long streaming call through r.Echo: 8 MiB sent over ~5 s, read back in full."""

    def __init__(self, path: str, descriptor: bytes = b"r.Echo+ work\0") -> None:
        self.data = os.urandom(8 << 20)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.sock.sendall(descriptor)
        self.received: list[bytes] = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()
        self.writer = threading.Thread(target=self._write)
        self.writer.start()

    def _write(self) -> None:
        for i in range(0, len(self.data), 1 << 17):
            self.sock.sendall(self.data[i:i + (1 << 17)])
            time.sleep(0.08)
        self.sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while chunk := self.sock.recv(65536):
            self.received.append(chunk)

    def finish(self) -> bytes:
        self.writer.join(60)
        self.reader.join(60)
        self.sock.close()
        return b"".join(self.received)


def test_apply_reaches_the_running_daemon_without_dropping_a_call(world: tuple[Path, Path, SpecDaemon]) -> None:
    root, manifest, daemon = world
    pid = daemon.proc.pid
    assert daemon.call(b"r.Slow+2 work\0") == b""  # timeout 1: cut
    assert b"source='work'" in daemon.call(b"r.Gone+ work\0")
    stream = Stream(daemon.socket)
    time.sleep(0.5)
    output = apply(root, manifest, AFTER)
    assert "running daemons pick the new spec up at their next call" in output, output
    assert b"source='work'" in daemon.call(b"r.Added+ work\0")  # added
    assert daemon.call(b"r.Gone+ work\0") == b""  # removed
    assert stream.writer.is_alive(), "the stream ended before the reload: it proves nothing"
    assert daemon.call(b"r.Slow+2 work\0") == b"done\n"  # timeout 1 -> 9
    received = stream.finish()
    assert hashlib.sha256(received).digest() == hashlib.sha256(stream.data).digest()  # byte-exact
    assert daemon.proc.pid == pid and daemon.proc.poll() is None
    assert daemon.log.read_text().count("reloaded: serving spec") == 1


def test_sighup_reloads_what_the_file_stamp_did_not_show(world: tuple[Path, Path, SpecDaemon]) -> None:
    """A spec rewritten in place with the same size and mtime is not seen by the per-call stat;
    SIGHUP (systemctl --user reload: ExecReload=) loads it anyway."""
    root, manifest, daemon = world
    spec = root / "var/lib/qubes-socksvc/daemons/r.json"
    before = spec.stat()
    other = root / "other"
    other.mkdir()
    (other / "manifest.yaml").write_text(BEFORE.replace("timeout: 1", "timeout: 9"))
    run_cli("apply", "-c", str(other / "manifest.yaml"), "--root", str(other), check=True)
    new = (other / "var/lib/qubes-socksvc/daemons/r.json").read_bytes().replace(
        str(other / "manifest.yaml").encode(), str(manifest).encode())
    with open(spec, "r+b") as f:  # same inode
        f.write(new)
        f.truncate()
    os.utime(spec, ns=(before.st_atime_ns, before.st_mtime_ns))
    if spec.stat().st_size != before.st_size:
        pytest.fail("the rewritten spec must keep its size for this test")
    assert daemon.call(b"r.Slow+2 work\0") == b""  # not reloaded: the stamp is unchanged
    os.kill(daemon.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded: serving spec" not in daemon.log.read_text():
        assert time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.02)
    assert daemon.call(b"r.Slow+2 work\0") == b"done\n"


def test_a_broken_spec_leaves_the_old_one_serving(world: tuple[Path, Path, SpecDaemon]) -> None:
    root, _, daemon = world
    spec = root / "var/lib/qubes-socksvc/daemons/r.json"
    good = spec.read_text()
    for broken in ("{not json", '{"version": 99}', ""):
        tmp = spec.with_name("tmp")
        tmp.write_text(broken)
        tmp.rename(spec)  # a new inode, as apply would write it
        assert b"source='work'" in daemon.call(b"r.Gone+ work\0")  # the old spec, still whole
        assert daemon.call(b"r.Added+ work\0") == b""
    assert daemon.log.read_text().count("reload failed, still serving spec") == 3
    tmp = spec.with_name("tmp")
    tmp.write_text(good.replace('"timeout": 1', '"timeout": 9'))
    tmp.rename(spec)
    assert daemon.call(b"r.Slow+2 work\0") == b"done\n"
    assert daemon.proc.poll() is None


def test_a_reload_that_removes_a_socket_service_refuses_its_calls() -> None:
    """A service on a socket of its own (service_descriptor: false) that apply removes: the daemon
    still holds the socket it started with, but serves nothing there once the spec drops it."""
    root = world_dir("socksvc-reload-")
    manifest = root / "manifest.yaml"
    manifest.write_text(BEFORE + "      r.Raw:\n        handler: qubes_socksvc.examples:echo\n"
                        "        service_descriptor: false\n")
    run_cli("apply", "-c", str(manifest), "--root", str(root), check=True)
    notify = NotifySocket()
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/r.json", world_dir("socksvc-reload-bind-"), "r",
                        notify.path)
    try:
        raw = [str(p) for p in daemon.bind_dir.iterdir() if p.is_socket() and str(p) != daemon.socket]
        assert len(raw) == 1 and raw_call(raw[0], b"no descriptor") == b"no descriptor"
        apply(root, manifest, BEFORE)
        # Refused at once: the connection is cut, perhaps before the input is even sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            assert raw_call(raw[0], b"no descriptor") == b""
        deadline = time.monotonic() + 10
        while "rejected call: service r.Raw on " not in daemon.log.read_text():
            assert time.monotonic() < deadline, daemon.log.read_text()
            time.sleep(0.05)
        assert b"source='work'" in daemon.call(b"r.Gone+ work\0")  # the rest is served
        notify.wait_for("calls: 2 served, 1 rejected, 0 failed")  # refused before any handler ran
    finally:
        daemon.stop()
        notify.close()
