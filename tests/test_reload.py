# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Live reload: an applied manifest reaches a running daemon for the next call, without a restart,
while calls in flight finish on the spec they started with."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from qubes_socksvc import logs, model, server
from tests.conftest import REPO, NotifySocket, apply, raw_call, run_cli, world_dir
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
    apply(manifest, root, check=True)
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/r.json", world_dir("socksvc-reload-bind-"), "r")
    yield root, manifest, daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(daemon.bind_dir, ignore_errors=True)


def reapply(manifest: Path, root: Path, text: str) -> str:
    """Rewrite the manifest to ``text`` and apply it; apply's output."""
    manifest.write_text(text)
    return apply(manifest, root, check=True).stdout


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
    output = reapply(manifest, root, AFTER)
    assert "running daemons pick the new spec up at their next call" in output, output
    assert b"source='work'" in daemon.call(b"r.Added+ work\0")  # added
    assert daemon.call(b"r.Gone+ work\0") == b""  # removed
    assert stream.writer.is_alive(), "the stream ended before the reload: it proves nothing"
    assert daemon.call(b"r.Slow+2 work\0") == b"done\n"  # timeout 1 -> 9
    received = stream.finish()
    assert hashlib.sha256(received).digest() == hashlib.sha256(stream.data).digest()  # byte-exact
    assert daemon.proc.pid == pid and daemon.proc.poll() is None
    assert daemon.log.read_text().count("reloaded: serving spec") == 1


def rename_in(spec: Path, data: bytes) -> float:
    """Write ``data`` beside ``spec`` and rename it into place, as apply does; the rename's time."""
    tmp = spec.with_name(".r.json.tmp")
    tmp.write_bytes(data)
    renamed = time.monotonic()
    tmp.rename(spec)
    return renamed


def test_the_first_call_after_apply_renames_a_spec_in_is_served_with_it(
        world: tuple[Path, Path, SpecDaemon]) -> None:
    """docs/daemon.md, Live reload: a spec apply renamed into place serves every call that starts
    afterwards, the very first one included (server.SpecWatch: inotify on the spec's directory),
    whether it comes at once or later; 20 renames, each followed by one call only."""
    root, manifest, daemon = world
    spec = root / "var/lib/qubes-socksvc/daemons/r.json"
    before = spec.read_bytes()
    reapply(manifest, root, AFTER)
    assert b"source='work'" in daemon.call(b"r.Added+ work\0")  # the first call after apply itself
    after = spec.read_bytes()
    delays = []
    for i in range(20):
        added = i % 2 == 0
        renamed = rename_in(spec, after if added else before)
        if i % 4 == 1:
            time.sleep(0.3)  # the call comes later: the reload happened meanwhile
        reply = daemon.call(b"r.Added+ work\0")
        delays.append(time.monotonic() - renamed)
        assert (b"source='work'" in reply) == added, (i, reply, daemon.log.read_text()[-2000:])
    assert daemon.log.read_text().count("reloaded: serving spec") == 21
    assert max(d for i, d in enumerate(delays) if i % 4 != 1) < 1.0, delays


def test_without_inotify_each_call_looks_at_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where inotify cannot be had (SpecWatch.start: None, e.g. fs.inotify.max_user_instances
    reached), the daemon stat()s the spec before each call: just as prompt."""
    monkeypatch.setattr(server.SpecWatch, "start", classmethod(lambda cls, path, on_change: None))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the manifest's handlers:fields
    spec, after, source, daemon, spec_id = in_process(tmp_path, BEFORE, AFTER)
    before = spec.read_bytes()  # the first manifest's

    async def scenario() -> list[bool]:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        served = []
        for i in range(6):
            rename_in(spec, after if i % 2 == 0 else before)
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "socksvc-r.sock"))
            writer.write(b"r.Added+ work\0")
            writer.write_eof()
            served.append(b"source='work'" in await reader.read())
            writer.close()
        serving.stop()
        await running
        return served

    assert asyncio.run(scenario()) == [True, False] * 3


def declared(service: str, handler: str) -> str:
    """A service entry of the manifests above: ``service`` handled by tests/handlers.py's ``handler``."""
    return f"      {service}:\n        handler: handlers:{handler}\n"


class InProcess(NamedTuple):
    """A spec applied from a first manifest, and what a daemon serving it in this process needs."""

    spec: Path
    after: bytes
    """The bytes apply writes for the second manifest (rename_in puts them in place)."""
    source: server.Source
    daemon: model.Daemon
    spec_id: str


def in_process(tmp_path: Path, first: str, second: str) -> InProcess:
    """A spec applied from ``first`` in ``tmp_path`` (it holds the first's), the bytes apply
    writes for ``second``, and the spec's source, daemon and id, loaded."""
    (tmp_path / "manifest.yaml").write_text(first)
    apply(tmp_path / "manifest.yaml", tmp_path, check=True)
    spec = tmp_path / "var/lib/qubes-socksvc/daemons/r.json"
    before = spec.read_bytes()
    reapply(tmp_path / "manifest.yaml", tmp_path, second)
    after = spec.read_bytes()
    rename_in(spec, before)
    source = loader(spec)
    return InProcess(spec, after, source, *source.load())


def loader(spec: Path) -> server.Source:
    def load() -> tuple[model.Daemon, str]:
        loaded = model.load(str(spec))
        return loaded.daemon, loaded.id

    return server.Source(load, watch=str(spec))


def serving_in(tmp_path: Path, daemon: model.Daemon, source: server.Source | None = None, spec_id: str = "",
               **callbacks: Callable[[str], None]) -> tuple[server.Server, asyncio.Task[None]]:
    """A Server for ``daemon`` running in this loop, its sockets bound in ``tmp_path``."""
    serving = server.Server(daemon, source=source, spec_id=spec_id)
    return serving, asyncio.create_task(serving.run(server.bind_sockets(daemon, str(tmp_path)), **callbacks))


async def one_call(path: Path, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


def test_with_inotify_a_call_costs_no_look_at_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """docs/daemon.md: "No system call is spent per call": the spec's directory is watched
    (server.SpecWatch), so a call does not stat() the spec, and a new spec is still seen by the
    very next call.  The start line names the spec served."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec, after, source, daemon, spec_id = in_process(tmp_path, BEFORE, AFTER)
    looks: list[str] = []
    real = server._stamp

    def stamp(path: str) -> tuple[int, int, int] | None:
        looks.append(path)
        return real(path)

    monkeypatch.setattr(server, "_stamp", stamp)

    async def scenario() -> tuple[list[bytes], bytes]:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        await asyncio.sleep(0.1)
        looks.clear()
        replies = [await one_call(tmp_path / "socksvc-r.sock", b"r.Echo+ work\0x") for _ in range(5)]
        assert looks == [], "a call looked at the spec"
        rename_in(spec, after)
        added = await one_call(tmp_path / "socksvc-r.sock", b"r.Added+ work\0")
        looks.clear()  # and the daemon's own reading of the new spec did not cost it its watch
        replies += [await one_call(tmp_path / "socksvc-r.sock", b"r.Echo+ work\0x") for _ in range(3)]
        assert looks == [], "a call after the reload looked at the spec"
        serving.stop()
        await running
        return replies, added

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        replies, added = asyncio.run(scenario())
    assert replies == [b"x"] * 8 and b"source='work'" in added
    assert f"daemon r serving 3 services on 1 sockets, spec {spec_id} (asyncio event loop)" in caplog.text



def _change(spec: Path, how: str) -> None:
    directory = spec.parent
    if how == "renamed in":  # apply
        (directory / "new").write_text("{}")
        os.rename(directory / "new", spec)
    elif how == "written in place":  # an editor
        spec.write_text("{ }")
    elif how == "its mode changed":
        spec.chmod(0o600)
    elif how == "created":
        spec.write_text("{}")
    elif how == "linked in":  # link(2): IN_CREATE alone, no write, no rename
        (directory / "new").write_text("{}")
        os.link(directory / "new", spec)
    elif how == "removed":
        spec.unlink()
    elif how == "renamed away":
        os.rename(spec, directory / "old")
    elif how == "its directory removed":
        shutil.rmtree(directory)
    elif how == "its directory moved":
        os.rename(directory, directory.with_name("moved"))
    elif how == "too much at once":  # more events than the queue holds (fs.inotify.max_queued_events)
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        for i in range(limit + 1):
            (directory / f"f{i}").touch()


@pytest.mark.parametrize(("how", "alive"), [
    ("renamed in", True), ("written in place", True), ("its mode changed", True), ("created", True),
    ("linked in", True), ("removed", True), ("renamed away", True),
    # then no watch is left: each call looks at the spec again
    ("its directory removed", False), ("its directory moved", False), ("too much at once", False),
])
def test_the_spec_watch_sees_every_way_the_spec_can_change(tmp_path: Path, how: str, alive: bool) -> None:
    """server.SpecWatch (inotify(7) on the spec's directory) reports each change to the spec's
    name, whoever makes it, and none to another file there; where the watch itself is lost it
    says so (alive False)."""
    spec = tmp_path / "daemons" / "r.json"
    spec.parent.mkdir()
    if how not in ("created", "linked in"):
        spec.write_text("{}")

    async def scenario() -> tuple[int, int, bool]:
        seen: list[int] = []
        watch = server.SpecWatch.start(str(spec), lambda: seen.append(1))
        assert watch is not None
        (spec.parent / "other.json").write_text("another daemon's spec")
        await asyncio.sleep(0.05)
        before = len(seen)
        _change(spec, how)
        await asyncio.sleep(0.05)
        watch.close()
        return before, len(seen), watch.alive

    before, after, still = asyncio.run(scenario())
    assert (before, after > 0, still) == (0, True, alive)


def test_a_spec_written_in_place_is_seen_once_its_writer_closes_it(tmp_path: Path) -> None:
    """A spec an editor writes in place, in pieces, is reported when the writer closes it
    (IN_CLOSE_WRITE), not at each write: the daemon never reads a spec half written."""
    spec = tmp_path / "r.json"
    spec.write_text("{}")

    async def scenario() -> tuple[int, int]:
        seen: list[int] = []
        watch = server.SpecWatch.start(str(spec), lambda: seen.append(1))
        assert watch is not None
        try:
            with spec.open("w") as writer:
                for piece in ('{"version": 1, ', '"daemon": {}}'):
                    writer.write(piece)
                    writer.flush()
                    await asyncio.sleep(0.05)
                while_written = len(seen)
            await asyncio.sleep(0.05)
            return while_written, len(seen)
        finally:
            watch.close()

    assert asyncio.run(scenario()) == (0, 1)


def test_the_spec_watch_holds_one_descriptor_that_never_blocks_nor_outlives_an_exec(tmp_path: Path) -> None:
    """The watch's inotify descriptor is non-blocking (SpecWatch._read drains it until EAGAIN: a
    blocking one would hang the event loop after the first event) and close-on-exec (a handler's
    child process does not inherit it)."""
    spec = tmp_path / "r.json"
    spec.write_text("{}")

    async def scenario() -> tuple[int, int]:
        watch = server.SpecWatch.start(str(spec), lambda: None)
        assert watch is not None
        try:
            return fcntl.fcntl(watch.fd, fcntl.F_GETFL), fcntl.fcntl(watch.fd, fcntl.F_GETFD)
        finally:
            watch.close()

    status, flags = asyncio.run(scenario())
    assert status & os.O_NONBLOCK and flags & fcntl.FD_CLOEXEC


@contextlib.contextmanager
def _no_descriptor_left() -> Iterator[None]:
    """Every new file descriptor fails with EMFILE meanwhile (RLIMIT_NOFILE below the lowest free one)."""
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(("lacking", "error"), [
    ("a descriptor", errno.EMFILE), ("the directory", errno.ENOENT), ("a directory, a file there", errno.ENOTDIR),
])
def test_a_spec_watch_that_cannot_be_had_says_why_and_leaves_nothing_open(
        tmp_path: Path, lacking: str, error: int, caplog: pytest.LogCaptureFixture) -> None:
    """SpecWatch.start returns None, and says why in the kernel's words, when inotify_init1 fails
    (here EMFILE: no descriptor left; fs.inotify.max_user_instances gives the same) or the
    directory cannot be watched: missing (ENOENT), or a file (ENOTDIR, IN_ONLYDIR: a watch on a
    file would report no change of a spec created once a directory replaces it).  The daemon
    then looks at the spec before each call (test_without_inotify_each_call_looks_at_the_spec).
    No descriptor is left open."""
    spec = tmp_path / ("r.json" if lacking == "a descriptor" else "missing/r.json")
    if lacking == "a directory, a file there":
        spec.parent.write_text("not a directory")

    async def scenario() -> tuple[server.SpecWatch | None, int, int]:
        before = len(os.listdir("/proc/self/fd"))
        if lacking == "a descriptor":
            importlib.import_module("ctypes")  # SpecWatch.start's import: loaded, it opens no file
            with _no_descriptor_left():
                watch = server.SpecWatch.start(str(spec), lambda: None)
        else:
            watch = server.SpecWatch.start(str(spec), lambda: None)
        return watch, before, len(os.listdir("/proc/self/fd"))

    with caplog.at_level(logging.WARNING, logger="qubes_socksvc"):
        watch, before, after = asyncio.run(scenario())
    assert watch is None and after == before
    expected = (f"no inotify ({os.strerror(error)}): " if lacking == "a descriptor"
                else f"cannot watch {spec.parent} ({os.strerror(error)}): ")
    assert [r.getMessage() for r in caplog.records] == [expected + "the spec's stamp is looked at before each call"]


def test_a_daemon_started_without_a_spec_names_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "manifest.yaml").write_text(BEFORE)
    apply(tmp_path / "manifest.yaml", tmp_path, check=True)
    daemon = model.load(str(tmp_path / "var/lib/qubes-socksvc/daemons/r.json")).daemon

    async def scenario() -> None:
        serving, running = serving_in(tmp_path, daemon)
        await asyncio.sleep(0.1)
        serving.stop()
        await running

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        asyncio.run(scenario())
    assert "daemon r serving 3 services on 1 sockets (asyncio event loop)" in caplog.text, caplog.text


def test_a_stopped_server_leaves_no_task_of_its_own_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server.run in a program of its own (not serve's process, which exits): once it returns,
    its idle watch, status reporter, spec timer and caller watch are gone, it reports nothing
    more, and SIGTERM, SIGINT and SIGHUP do what they did before it ran (asyncio's
    remove_signal_handler alone would set SIG_DFL)."""
    monkeypatch.setattr(server, "STATUS_INTERVAL", 0.05)
    _, _, source, daemon, spec_id = in_process(tmp_path, BEFORE.replace("idle_exit: 0", "idle_exit: 60"), BEFORE)
    statuses: list[str] = []

    async def scenario() -> set[asyncio.Task[object]]:
        # the program's own: asyncio.run's SIGINT handler, SIGHUP ignored as under nohup
        handlers_before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT,
                                                                            signal.SIGHUP)}
        assert handlers_before[signal.SIGHUP] == signal.SIG_IGN
        serving, running = serving_in(tmp_path, daemon, source, spec_id,
                                      on_ready=statuses.append, on_status=statuses.append)
        assert await one_call(tmp_path / "socksvc-r.sock", b"r.Echo+ work\0x") == b"x"
        await asyncio.sleep(0.2)
        serving.stop()
        await running
        reported = len(statuses)
        await asyncio.sleep(0.2)
        assert len(statuses) == reported, "a stopped server still reports its status"
        # SIGTERM, SIGINT and SIGHUP are the program's again
        assert {signum: signal.getsignal(signum) for signum in handlers_before} == handlers_before
        return asyncio.all_tasks() - {asyncio.current_task()}

    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    descriptors = sorted(os.listdir("/proc/self/fd"))
    try:
        assert asyncio.run(scenario()) == set()
    finally:
        signal.signal(signal.SIGHUP, hangup)
    assert sorted(os.listdir("/proc/self/fd")) == descriptors  # the sockets' and the spec watch's closed
    # one status per change: READY's, then the served call's (STATUS_INTERVAL passed many times)
    assert [status.rpartition(": ")[2] for status in statuses] == [
        "0 served, 0 rejected, 0 failed", "1 served, 0 rejected, 0 failed"], statuses


def test_without_inotify_the_timer_sees_a_new_spec_while_every_slot_is_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No call is accepted while the only slot is held, so no call looks at the spec, and there
    is no watch: the timer (SPEC_CHECK_INTERVAL) does, and the new limit lets the caller in."""
    monkeypatch.setattr(server.SpecWatch, "start", classmethod(lambda cls, path, on_change: None))
    monkeypatch.setattr(server, "SPEC_CHECK_INTERVAL", 0.2)
    monkeypatch.setattr(server, "STOP_TIMEOUT", 0.1)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    one = BEFORE.replace("idle_exit: 0", "idle_exit: 0\n    max_connections: 1") + declared("r.Hang", "hangs")
    spec, after, source, daemon, spec_id = in_process(tmp_path, one, one.replace("connections: 1", "connections: 2"))

    async def scenario() -> bytes:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        _, hanging = await asyncio.open_unix_connection(str(tmp_path / "socksvc-r.sock"))
        hanging.write(b"r.Hang+ work\0")
        await asyncio.sleep(0.3)  # the only slot is held
        waiting = asyncio.create_task(one_call(tmp_path / "socksvc-r.sock", b"r.Echo+ work\0in"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # in the backlog
        rename_in(spec, after)
        try:
            return await waiting
        finally:
            hanging.close()
            serving.stop()
            await running

    assert asyncio.run(scenario()) == b"in"


def test_a_spec_for_another_daemon_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The spec file now holds another daemon's spec (a copy gone wrong): the reload fails,
    saying so, and the daemon goes on serving its own; a plain reload says nothing of sockets."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.yaml").write_text(BEFORE.replace("  r:", "  q:").replace("r.", "q."))
    apply(other / "manifest.yaml", other, check=True)
    spec, after, source, daemon, spec_id = in_process(tmp_path, BEFORE, AFTER)

    async def scenario() -> list[bytes]:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        await asyncio.sleep(0.1)  # serving, and watching the spec
        rename_in(spec, (other / "var/lib/qubes-socksvc/daemons/q.json").read_bytes())
        replies = [await one_call(tmp_path / "socksvc-r.sock", b"r.Gone+ work\0")]
        rename_in(spec, after)  # r's own: loaded
        replies.append(await one_call(tmp_path / "socksvc-r.sock", b"r.Added+ work\0"))
        serving.stop()
        await running
        return replies

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        gone, added = asyncio.run(scenario())
    assert b"source='work'" in gone and b"source='work'" in added
    assert f"reload failed, still serving spec {spec_id}: the new spec is for daemon q" in caplog.text
    assert "reloaded: serving spec" in caplog.text and "its sockets changed" not in caplog.text


def test_a_reload_that_changes_the_sockets_says_they_wait_for_a_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = "      r.Raw:\n        handler: qubes_socksvc.examples:echo\n        service_descriptor: false\n"
    spec, after, source, daemon, spec_id = in_process(tmp_path, BEFORE, BEFORE + raw)

    statuses: list[str] = []

    async def scenario() -> bytes:
        serving, running = serving_in(tmp_path, daemon, source, spec_id, on_status=statuses.append)
        await asyncio.sleep(0.1)
        rename_in(spec, after)
        reply = await one_call(tmp_path / "socksvc-r.sock", b"r.Echo+ work\0still")
        serving.stop()
        await running
        return reply

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        assert asyncio.run(scenario()) == b"still"
    # STATUS= names the new spec at once, not at the next STATUS_INTERVAL (list reads it)
    assert statuses and statuses[0].startswith(f"spec {source.load()[1]}: 4 services"), statuses
    assert ("daemon r: its sockets changed in the new spec; they take effect only after 'systemctl --user "
            "daemon-reload' and 'systemctl --user restart qubes-socksvc-r.socket'") in caplog.text


def test_a_reload_with_calls_in_flight_keeps_max_connections_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """One call of max_connections 2 in flight, then a reload: one more call runs, not two
    (the free slots are the limit less the calls in flight)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(server, "STOP_TIMEOUT", 0.1)
    two = BEFORE.replace("idle_exit: 0", "idle_exit: 0\n    max_connections: 2") + declared("r.Hang", "hangs")
    spec, after, source, daemon, spec_id = in_process(tmp_path, two, two.replace("timeout: 1", "timeout: 9"))

    async def scenario() -> None:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        hanging = []
        for _ in range(3):
            _, writer = await asyncio.open_unix_connection(str(tmp_path / "socksvc-r.sock"))
            writer.write(b"r.Hang+ work\0")
            hanging.append(writer)
            if len(hanging) == 1:
                await asyncio.sleep(0.2)
                rename_in(spec, after)
                serving.reload()
        await asyncio.sleep(0.5)
        for writer in hanging:
            writer.close()
        serving.stop()
        await running

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        asyncio.run(scenario())
    assert "reloaded: serving spec" in caplog.text
    assert caplog.text.count("call r.Hang+ from work") == 2, caplog.text


@pytest.mark.parametrize(("idle_exit", "reloaded_at", "exits"), [
    ((0, 2), 1.5, (1.9, 2.8)),  # set by the reload: counted from the start, not from the reload
    ((1, 3), 0.1, (2.9, 4.5)),  # lengthened: the old 1-s watch is replaced
])
def test_a_reload_that_sets_or_changes_idle_exit_is_obeyed_from_the_last_activity(
        tmp_path: Path, idle_exit: tuple[int, int], reloaded_at: float, exits: tuple[float, float]) -> None:
    first, second = (BEFORE.replace("idle_exit: 0", f"idle_exit: {n}") for n in idle_exit)
    spec, after, source, daemon, spec_id = in_process(tmp_path, first, second)

    async def scenario() -> float:
        started = time.monotonic()
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        await asyncio.sleep(reloaded_at)
        rename_in(spec, after)
        serving.reload()
        await asyncio.wait_for(running, timeout=15)  # idle: exits by itself
        return time.monotonic() - started

    assert exits[0] <= asyncio.run(scenario()) < exits[1]


def test_callers_during_a_stop_are_refused_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A daemon bound by hand and stopping, a call still in flight: its sockets are closed at
    once, so a new caller is refused rather than left in a backlog nobody will accept; once it
    returns, it holds no descriptor more than before it started."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(server, "STOP_TIMEOUT", 1.0)
    _, _, source, daemon, spec_id = in_process(tmp_path, BEFORE + declared("r.Hang", "hangs"), BEFORE)
    fds = sorted(os.listdir("/proc/self/fd"))

    async def scenario() -> None:
        listeners = server.bind_sockets(daemon, str(tmp_path))
        serving = server.Server(daemon, source=source, spec_id=spec_id)
        running = asyncio.create_task(serving.run(listeners))
        _, hanging = await asyncio.open_unix_connection(str(tmp_path / "socksvc-r.sock"))
        hanging.write(b"r.Hang+ work\0")
        await asyncio.sleep(0.2)
        serving.stop()
        await asyncio.sleep(0.1)
        assert not running.done()  # waiting for the call in flight
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_unix_connection(str(tmp_path / "socksvc-r.sock"))
        await running
        assert asyncio.all_tasks() == {asyncio.current_task()}  # the call cut at STOP_TIMEOUT has ended too
        hanging.close()
        await asyncio.sleep(0)
        del listeners, serving

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        asyncio.run(scenario())
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert "stopping: waiting up to 1.0s for 1 calls" in caplog.text
    assert "stopping: cancelled 1 calls still running" in caplog.text




def test_a_fault_logged_again_after_the_interval_says_how_often_it_was_held_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A handler that fails on every call is logged once per interval (logs.REPEAT_INTERVAL,
    60 s; 1 s here): its next line says how many failures were held back meanwhile."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    _, _, source, daemon, spec_id = in_process(tmp_path, BEFORE + declared("r.Raise", "raises"), BEFORE)

    async def scenario() -> None:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        serving._repeats = logs.Repeats(interval=1.0)
        for _ in range(3):
            await one_call(tmp_path / "socksvc-r.sock", b"r.Raise+ work\0")
        await asyncio.sleep(1.1)
        await one_call(tmp_path / "socksvc-r.sock", b"r.Raise+ work\0")
        serving.stop()
        await running

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        asyncio.run(scenario())
    raised = [r.getMessage() for r in caplog.records if "raised" in r.getMessage()]
    assert raised == ["call r.Raise+: handler handlers:raises raised",
                      "call r.Raise+: handler handlers:raises raised (and 2 times more in the last 1s, not logged)"]



def test_a_report_to_the_loop_without_an_exception_is_logged_once_by_its_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A library that reports to the loop on every call without an exception (aiohttp's
    "Unclosed client session") is logged once per interval, keyed by its message; one without
    even a message is named as such; a connection error is its call's business, not logged.
    Messages that differ only past their 64th character are one fault."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    _, _, source, daemon, spec_id = in_process(tmp_path, BEFORE + declared("r.Report", "reports_to_the_loop"), BEFORE)

    async def scenario() -> list[bytes]:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        replies = [await one_call(tmp_path / "socksvc-r.sock", b"r.Report+ work\0") for _ in range(3)]
        serving.stop()
        await running
        return replies

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        assert asyncio.run(scenario()) == [b"reported\n"] * 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["Unclosed client session", "unexpected error in the event loop", "an exception that is none",
                      "x" * 63 + "a", "x" * 63 + "b", "y" * 64 + "a"], errors


@pytest.mark.parametrize("ended_by", ["stop", "cancel"])
def test_a_server_whose_run_is_cancelled_ends_as_a_stopped_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, ended_by: str) -> None:
    """A program that runs Server.run in a task of its own may cancel that task rather than
    call stop(): the call in flight is then given STOP_TIMEOUT all the same, and run returns
    only once the call, cancelled, has finished its cleanup (serve's process exits then).
    Afterwards nothing watches the closed sockets nor the spec watch's closed descriptor any
    more, and nothing fails in the loop."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(server, "STOP_TIMEOUT", 0.5)
    _, _, source, daemon, spec_id = in_process(tmp_path, BEFORE + declared("r.Hang", "hangs_then_cleans_up"), BEFORE)

    async def scenario() -> list[bool]:
        listeners = server.bind_sockets(daemon, str(tmp_path))
        fds = [listener.sock.fileno() for listener in listeners]
        serving = server.Server(daemon, source=source, spec_id=spec_id)
        running = asyncio.create_task(serving.run(listeners))
        _, caller = await asyncio.open_unix_connection(str(tmp_path / "socksvc-r.sock"))
        caller.write(b"r.Hang+ work\0")
        await asyncio.sleep(0.2)
        assert serving._spec_watch is not None
        fds.append(serving._spec_watch.fd)  # the spec's inotify descriptor, closed by run too
        if ended_by == "stop":
            serving.stop()
        else:
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        assert sys.modules["handlers"].CLEANED_UP.pop() == "r.Hang+"  # its cleanup finished first
        assert serving.status().endswith("calls: 0 served, 0 rejected, 1 failed")  # the cut call
        await asyncio.sleep(0.1)  # the cut call's own end has run
        caller.close()
        loop = asyncio.get_running_loop()
        return [loop.remove_reader(fd) for fd in fds]

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        assert asyncio.run(scenario()) == [False, False], "a closed descriptor is still watched"
    assert "stopping: cancelled 1 calls still running" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def hang_and_leave(path: str, caplog: pytest.LogCaptureFixture) -> None:
    """Call r.Hang (a handler that never returns by itself) and leave: wait up to 5 s for the
    daemon to say the caller went away."""
    _, caller = await asyncio.open_unix_connection(path)
    caller.write(b"r.Hang+ work\0")
    await asyncio.sleep(0.2)
    caller.close()
    for _ in range(100):
        if "call r.Hang+: caller went away" in caplog.text:
            return
        await asyncio.sleep(0.05)


def test_a_hung_call_whose_caller_left_is_ended_after_the_daemon_was_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The caller watch (CALLER_CHECK_INTERVAL) goes on through idle times: a call to a handler
    that hangs, made after several checks found no call, is still ended once its caller leaves."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(server, "CALLER_CHECK_INTERVAL", 0.1)
    _, _, source, daemon, spec_id = in_process(tmp_path, BEFORE + declared("r.Hang", "hangs"), BEFORE)

    async def scenario() -> None:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        await asyncio.sleep(0.5)  # idle: the watch has found no call five times
        await hang_and_leave(str(tmp_path / "socksvc-r.sock"), caplog)
        serving.stop()
        await running

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        asyncio.run(scenario())
    assert "call r.Hang+: caller went away" in caplog.text, caplog.text



def test_the_caller_watch_outlives_a_call_whose_connection_closed_before_its_task_ended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A call that lingers (its output outlasts the handler) has its connection closed by the
    transport a loop turn or two before its task ends.  The caller watch, checking at every
    turn here, meets that closed connection and must go on: a hung call whose caller leaves
    afterwards is still ended."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(server, "CALLER_CHECK_INTERVAL", 0)
    monkeypatch.setattr(server, "STOP_TIMEOUT", 1.0)  # a failure ends sooner
    services = declared("r.Hang", "hangs") + declared("r.Linger", "lingering_reply")
    _, _, source, daemon, spec_id = in_process(tmp_path, BEFORE + services, BEFORE)
    path = str(tmp_path / "socksvc-r.sock")

    async def scenario() -> int:
        serving, running = serving_in(tmp_path, daemon, source, spec_id)
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"r.Linger+ work\0")
        writer.write_eof()
        await asyncio.sleep(0.3)  # the handler has returned; its output waits for this caller
        lingered = len(await reader.read())
        writer.close()
        await hang_and_leave(path, caplog)
        serving.stop()
        await running
        return lingered

    with caplog.at_level(logging.INFO, logger="qubes_socksvc.server"):
        assert asyncio.run(scenario()) == 262144
    assert "call r.Hang+: caller went away" in caplog.text, caplog.text


def test_sighup_reloads_what_the_file_stamp_did_not_show(world: tuple[Path, Path, SpecDaemon]) -> None:
    """A spec rewritten in place with the same size and mtime is not seen by its stamp;
    SIGHUP (systemctl --user reload: ExecReload=) loads it anyway."""
    root, manifest, daemon = world
    spec = root / "var/lib/qubes-socksvc/daemons/r.json"
    before = spec.stat()
    other = root / "other"
    other.mkdir()
    (other / "manifest.yaml").write_text(BEFORE.replace("timeout: 1", "timeout: 9"))
    apply(other / "manifest.yaml", other, check=True)
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
    apply(manifest, root, check=True)
    notify = NotifySocket()
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/r.json", world_dir("socksvc-reload-bind-"), "r",
                        notify.path)
    try:
        raw = [str(p) for p in daemon.bind_dir.iterdir() if p.is_socket() and str(p) != daemon.socket]
        assert len(raw) == 1 and raw_call(raw[0], b"no descriptor") == b"no descriptor"
        reapply(manifest, root, BEFORE)
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


# --- a reload is safe in every direction (issue 22.2) ---------------------------------------------

def served(daemon: SpecDaemon, payload: bytes, timeout: float = 8) -> bytes | None:
    """The call's output, or None when the daemon did not answer within ``timeout`` (not accepted)."""
    try:
        return raw_call(daemon.socket, payload, timeout=timeout)
    except TimeoutError:
        return None


def wait_logged(daemon: SpecDaemon, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log.read_text():
        assert time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.02)


def test_a_reload_below_a_limit_the_fd_budget_capped_keeps_accepting() -> None:
    """max_connections 200 under a hard RLIMIT_NOFILE of 256 serves at most 96 calls at once
    (server.fd_budget); a reload to 10 recomputes the free slots from the new limit, the budget
    and the calls in flight (it used to add 10 - 200 to 96, and the daemon never accepted again)."""
    root = world_dir("socksvc-reload-")
    manifest = root / "manifest.yaml"
    reapply(manifest, root, BEFORE.replace("idle_exit: 0", "idle_exit: 0\n    max_connections: 200"))
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/r.json", world_dir("socksvc-reload-bind-"),
                        "r", nofile=256)
    try:
        wait_logged(daemon, "serving at most 96 calls at once")  # capped: the case that went wrong
        reapply(manifest, root, BEFORE.replace("idle_exit: 0", "idle_exit: 0\n    max_connections: 10"))
        for i in range(12):  # more calls than the new limit, one after the other
            assert served(daemon, b"r.Echo+ work\0hi") == b"hi", (i, daemon.log.read_text())
        assert daemon.log.read_text().count("reloaded: serving spec") == 1
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(daemon.bind_dir, ignore_errors=True)


@pytest.mark.parametrize("key, value, where", [
    ("max_connections", -5, "daemon"), ("max_connections", 0, "daemon"), ("descriptor_timeout", 0, "daemon"),
    ("idle_exit", -1, "daemon"), ("idle_exit", 0.01, "daemon"), ("idle_exit", float("inf"), "daemon"),
    ("timeout", -1, "daemon.services.r.Slow"), ("max_input", -1, "daemon.services.r.Slow"),
])
def test_the_spec_loader_checks_ranges_with_checks_messages(key: str, value: float, where: str) -> None:
    """model.parse refuses what ``check`` refuses, with the same words (one rule: model.DAEMON_RANGES,
    model.SERVICE_RANGES): a spec edited by hand, or written by another version, cannot make the
    daemon stop accepting."""
    root = world_dir("socksvc-reload-")
    try:
        manifest = root / "manifest.yaml"
        reapply(manifest, root, BEFORE)
        spec_path = root / "var/lib/qubes-socksvc/daemons/r.json"
        spec = json.loads(spec_path.read_text())
        target = spec["daemon"] if where == "daemon" else spec["daemon"]["services"]["r.Slow"]
        target[key] = value
        with pytest.raises(model.SpecError) as refused:
            model.parse(json.dumps(spec), str(spec_path))
        yaml_value = {float("inf"): "1.0e+999"}.get(value, value)
        if where == "daemon":
            text = BEFORE.replace("idle_exit: 0", f"idle_exit: 0\n    {key}: {yaml_value}")
        else:
            text = BEFORE.replace("timeout: 1", f"timeout: 1\n        {key}: {yaml_value}")
        text = text.replace("idle_exit: 0\n    idle_exit:", "idle_exit:").replace("timeout: 1\n        timeout:",
                                                                             "timeout:")
        (root / "bad.yaml").write_text(text)
        check = run_cli("check", "-c", str(root / "bad.yaml"))
        words = str(refused.value).rpartition(f"{where}.{key}: ")[2]
        yaml_key = "daemons.r" + ("" if where == "daemon" else ".services.r.Slow")
        assert words and f"{yaml_key}.{key}: {words}" in check.stdout + check.stderr, (refused.value, check)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_spec_out_of_range_is_refused_and_the_old_one_serves(world: tuple[Path, Path, SpecDaemon]) -> None:
    root, _, daemon = world
    spec_path = root / "var/lib/qubes-socksvc/daemons/r.json"
    spec = json.loads(spec_path.read_text())
    spec["daemon"]["max_connections"] = -5
    tmp = spec_path.with_name("tmp")
    tmp.write_text(json.dumps(spec))
    tmp.rename(spec_path)
    for _ in range(3):
        assert served(daemon, b"r.Echo+ work\0still") == b"still", daemon.log.read_text()
    assert "daemon.max_connections: must be at least 1" in daemon.log.read_text()


def test_a_daemon_that_cannot_accept_still_sees_a_new_spec() -> None:
    """Every slot held by a call that hangs: no call is accepted, so no call looks at the spec;
    the timer does (server.SPEC_CHECK_INTERVAL), and the new limit lets the waiting caller in."""
    text = BEFORE.replace("idle_exit: 0", "idle_exit: 0\n    max_connections: 1") + declared("r.Hang", "hangs")
    root = world_dir("socksvc-reload-")
    manifest = root / "manifest.yaml"
    reapply(manifest, root, text)
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/r.json", world_dir("socksvc-reload-bind-"), "r")
    hanging = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hanging.connect(daemon.socket)
        hanging.sendall(b"r.Hang+ work\0")
        wait_logged(daemon, "call r.Hang+ from work")  # the only slot is taken
        assert served(daemon, b"r.Echo+ work\0waits", timeout=1) is None  # in the backlog
        reapply(manifest, root, text.replace("max_connections: 1", "max_connections: 2"))
        started = time.monotonic()
        assert served(daemon, b"r.Echo+ work\0in", timeout=server.SPEC_CHECK_INTERVAL + 8) == b"in", \
            daemon.log.read_text()
        assert time.monotonic() - started < server.SPEC_CHECK_INTERVAL + 5
    finally:
        hanging.close()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(daemon.bind_dir, ignore_errors=True)


def test_a_daemon_started_with_its_standard_input_closed_still_watches_its_spec(tmp_path: Path) -> None:
    """Started by hand with fd 0 closed, the daemon's inotify descriptor may be 0: a descriptor
    like any other (inotify_init1 fails with -1 only), so the spec is still watched."""
    spec = tmp_path / "r.json"
    spec.write_text("{}")
    script = textwrap.dedent(f"""\
        import asyncio, ctypes, os
        from qubes_socksvc import server
        async def main():
            seen = []
            os.close(0)  # with the loop's own descriptors open: the lowest free one is 0
            watch = server.SpecWatch.start({str(spec)!r}, lambda: seen.append(1))
            os.chmod({str(spec)!r}, 0o600)
            await asyncio.sleep(0.1)
            print(watch.fd, len(seen))
        asyncio.run(main())
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stdout.split()) == (0, ["0", "1"]), done.stderr
