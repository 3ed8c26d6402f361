# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The runtime daemon against real Unix sockets and real concurrent clients."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import BinaryIO

import pytest

from qubes_socksvc import manifest, server
from tests.conftest import REPO, TEST_MANIFEST, TESTS, RunningDaemon, fields_of, raw_call, run_cli, world_dir
from tests.test_call_endings import cpu_seconds


def assert_still_serving(daemon: RunningDaemon) -> None:
    assert daemon.proc.poll() is None, daemon.log_text()
    assert daemon.call(b"test.Echo work\0", b"ping") == b"ping"


def test_vm_descriptor_forms(daemon: RunningDaemon) -> None:
    assert fields_of(daemon.call(b"test.Fields+abc work\0")) == {
        "service": "test.Fields+abc", "name": "test.Fields", "argument": "'abc'", "source": "'work'",
        "target_type": "None", "target": "None"}
    assert fields_of(daemon.call(b"test.Fields+ work\0"))["argument"] == "''"
    assert fields_of(daemon.call(b"test.Fields work\0"))["argument"] == "None"
    assert fields_of(daemon.call(b"test.Fields work\0"))["service"] == "test.Fields"


def test_dom0_descriptor_forms(daemon: RunningDaemon) -> None:
    named = fields_of(daemon.call(b"test.Fields+x sys-usb name dom0\0"))
    assert (named["source"], named["target_type"], named["target"]) == ("'sys-usb'", "'name'", "'dom0'")
    keyword = fields_of(daemon.call(b"test.Fields work keyword dispvm\0"))
    assert (keyword["target_type"], keyword["target"]) == ("'keyword'", "'dispvm'")


def test_name_plus_arg_wins_over_name(daemon: RunningDaemon) -> None:
    # test.Fields+special is declared with another handler; other arguments fall back to test.Fields.
    assert daemon.call(b"test.Fields+special work\0").startswith(b"service=test.Fields+special\nname=")
    assert b"argument=special\n" in daemon.call(b"test.Fields+special work\0")
    assert b"argument='other'" in daemon.call(b"test.Fields+other work\0")


def test_half_close_then_reply_after_eof(daemon: RunningDaemon) -> None:
    assert daemon.call(b"test.AfterEof work\0", b"x" * 300_000) == b"got 300000 bytes after EOF\n"


def test_just_exec_call_is_handled_cleanly(daemon: RunningDaemon) -> None:
    """MSG_JUST_EXEC: the socket receives only the descriptor and is then closed."""
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(daemon.socket())
            sock.sendall(b"test.Echo work\0")
    deadline = time.monotonic() + 5
    while daemon.log_text().count("call test.Echo from work") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.log_text().count("call test.Echo from work") == 3
    assert_still_serving(daemon)
    assert "Traceback" not in daemon.log_text()


def test_service_without_descriptor_has_its_own_socket(daemon: RunningDaemon) -> None:
    assert raw_call(daemon.socket("socksvc-test.Raw.sock"), b"no descriptor here\0 at all") == \
        b"no descriptor here\0 at all"
    assert "call test.Raw from (no descriptor)" in daemon.log_text()


def test_plain_function_runs_off_the_loop_with_whole_input(daemon: RunningDaemon) -> None:
    pid, size = daemon.call(b"test.Plain work\0", b"abcdef").split()
    assert int(pid) == daemon.proc.pid and size == b"6"


@pytest.mark.parametrize("wire, payload, logged", [
    (b"test.Raises work\0", b"", "RuntimeError: handler failure on purpose"),
    (b"test.Exits work\0", b"", "SystemExit: 3"),
    (b"test.PlainExits work\0", b"", "SystemExit: 4"),
    (b"test.Hangs work\0", b"", "call test.Hangs timed out after 1s"),
    (b"test.Small work\0", b"x" * 5000, "input exceeds max_input (1024 bytes)"),
    (b"test.ReturnsInt work\0", b"", "handler returned int"),
    (b"test.Missing work\0", b"", "handler 'no_such_module:nothing' cannot be loaded"),
    (b"test.Unknown work\0", b"", "service test.Unknown is not handled by daemon t"),
    (b"test.Echo/../x work\0", b"", "invalid service name"),
    (b"test.Echo w\xffrk\0", b"", "not ASCII"),
    (b"test.Echo work", b"", "closed before the descriptor's NUL"),
    (b"\0", b"", "descriptor has 1 fields"),
    (b"x" * 70000, b"", "descriptor longer than 65535 bytes"),
])
def test_faults_are_logged_and_the_daemon_keeps_serving(
        daemon: RunningDaemon, wire: bytes, payload: bytes, logged: str) -> None:
    assert daemon.call(wire, payload) == b""
    assert logged in daemon.log_text()
    assert_still_serving(daemon)


def test_streaming_1_gib_with_bounded_memory(daemon: RunningDaemon) -> None:
    total, block = 1 << 30, os.urandom(1 << 16)
    baseline = daemon.rss_kib()
    digest_sent, digest_received, received = hashlib.sha256(), hashlib.sha256(), 0
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(120)
        sock.connect(daemon.socket())
        sock.sendall(b"test.Echo+stream work\0")

        def send() -> None:
            for _ in range(total // len(block)):
                sock.sendall(block)
                digest_sent.update(block)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while data := sock.recv(1 << 16):
            received += len(data)
            digest_received.update(data)
        sender.join()
    assert received == total and digest_received.digest() == digest_sent.digest()
    peak = int(next(line.split()[1] for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM:")))
    assert peak - baseline < 16 * 1024, f"RSS grew by {peak - baseline} KiB while streaming"


def test_500_concurrent_callers_all_answered(daemon: RunningDaemon) -> None:
    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_unix_connection(daemon.socket())
        writer.write(b"test.Echo+%d work\0caller %d" % (i, i))
        await writer.drain()
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        return reply

    async def many() -> list[bytes]:
        return await asyncio.gather(*(one(i) for i in range(500)))

    replies = asyncio.run(many())
    assert replies == [b"caller %d" % i for i in range(500)]


def test_max_connections_bounds_concurrency_and_excess_callers_wait(start_daemon: type[RunningDaemon]) -> None:
    manifest = ("version: 1\ndaemons:\n  c:\n    idle_exit: 0\n    max_connections: 2\n    services:\n"
                "      test.Concurrency:\n        handler: handlers:concurrency\n")
    daemon = start_daemon(manifest, "c")
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(daemon.call(b"test.Concurrency work\0")))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert max(int(r) for r in results) == 2


def test_a_saturated_daemon_waits_for_a_free_slot_without_spinning(start_daemon: type[RunningDaemon]) -> None:
    """Every slot held and callers waiting in the backlog: the daemon stops watching its
    listener until a call ends (Server._accept pauses accepting), it does not wake up for
    callers it cannot take."""
    manifest = ("version: 1\ndaemons:\n  c:\n    idle_exit: 0\n    max_connections: 1\n    services:\n"
                "      test.Slow:\n        handler: handlers:slow\n")
    daemon = start_daemon(manifest, "c")
    callers = [threading.Thread(target=daemon.call, args=(b"test.Slow+3 work\0",)) for _ in range(2)]
    for caller in callers:
        caller.start()
    time.sleep(0.5)  # one call runs, one caller waits
    cpu = cpu_seconds(daemon.proc.pid)
    time.sleep(2)
    # idle, it spends about 0.01 s; spinning, whatever share of a core the machine's load leaves it
    assert cpu_seconds(daemon.proc.pid) - cpu < 0.15, "the daemon spun while every slot was taken"
    for caller in callers:
        caller.join()


def test_sockets_bound_before_one_that_cannot_be_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bind_sockets refusing one socket (a foreign file in its place) closes the others it
    bound, not the garbage collector (which warns of each: ResourceWarning)."""
    daemon = manifest.parse(TEST_MANIFEST, "manifest.yaml").daemons["t"]
    paths = list(daemon.sockets())
    assert len(paths) == 2
    (tmp_path / os.path.basename(paths[-1])).write_text("precious")
    before = sorted(os.listdir("/proc/self/fd"))
    owned: list[server.OwnedSocket] = []
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with pytest.raises(server.ServeError, match="exists and is not a socket"):
            server.bind_sockets(daemon, str(tmp_path), owned)
        gc.collect()
    assert unraisable == [] and len(owned) == 1 and sorted(os.listdir("/proc/self/fd")) == before
    for sock in owned:
        sock.remove()


def test_idle_exit(start_daemon: type[RunningDaemon]) -> None:
    daemon = start_daemon(TEST_MANIFEST.replace("idle_exit: 0", "idle_exit: 1"), "t")
    assert daemon.call(b"test.Echo work\0", b"x") == b"x"
    assert daemon.proc.wait(timeout=15) == 0
    assert "idle for 1s: exiting" in daemon.log_text()


def test_idle_exit_counts_from_the_end_of_the_last_call(start_daemon: type[RunningDaemon]) -> None:
    """A call longer than idle_exit does not make the daemon exit as it ends: idle means
    idle_exit seconds with no call, counted from when the last one ended."""
    daemon = start_daemon(TEST_MANIFEST.replace("idle_exit: 0", "idle_exit: 1"), "t")
    assert daemon.call(b"test.Slow+1.5 work\0") == b"done\n"
    ended = time.monotonic()
    assert daemon.proc.wait(timeout=15) == 0
    assert time.monotonic() - ended > 0.9, "the daemon exited less than idle_exit after its last call ended"


def test_sigterm_lets_in_flight_calls_finish(daemon: RunningDaemon) -> None:
    result: list[bytes] = []
    caller = threading.Thread(target=lambda: result.append(daemon.call(b"test.Slow+1.5 work\0")))
    caller.start()
    time.sleep(0.5)
    daemon.proc.send_signal(signal.SIGTERM)
    caller.join()
    assert result == [b"done\n"]
    assert daemon.proc.wait(timeout=10) == 0
    with pytest.raises(OSError):
        raw_call(daemon.socket(), b"test.Echo work\0")  # no longer accepting


def test_serve_refuses_root(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(TEST_MANIFEST)
    if os.geteuid() != 0:
        pytest.skip("needs root to show the refusal")
    result = run_cli("serve", "t", "-c", str(manifest), "--bind-dir", str(tmp_path))
    assert result.returncode == 1 and "refusing to run as root" in result.stderr
    assert list(tmp_path.iterdir()) == [manifest]


def test_serve_unknown_daemon(start_daemon: type[RunningDaemon]) -> None:
    with pytest.raises(AssertionError, match="no daemon 'nope'"):
        start_daemon(TEST_MANIFEST, "nope")


def test_serve_never_replaces_a_foreign_file(start_daemon: type[RunningDaemon]) -> None:
    daemon = start_daemon(TEST_MANIFEST, "t")
    daemon.stop()
    bind_dir = world_dir("socksvc-foreign-")
    (bind_dir / "socksvc-t.sock").write_text("precious")
    manifest = bind_dir / "m.yaml"
    manifest.write_text(TEST_MANIFEST)
    manifest.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "qubes_socksvc", "serve", "t", "-c", str(manifest), "--bind-dir", str(bind_dir)],
        env={"PYTHONPATH": f"{REPO}:{TESTS}", "PATH": "/usr/bin:/bin"}, user="nobody", group="nogroup",
        extra_groups=[], capture_output=True, text=True, timeout=30)
    try:
        assert result.returncode == 1
        assert "exists and is not a socket" in result.stderr
        assert (bind_dir / "socksvc-t.sock").read_text() == "precious"
    finally:
        shutil.rmtree(bind_dir)


def test_serve_module_imports_no_jinja2() -> None:
    code = ("import sys; from qubes_socksvc import cli, server, model, handlers;"  # what serve imports
            "heavy = ('jinja2', 'yaml', 'qubes_socksvc.manifest', 'qubes_socksvc.render', 'qubes_socksvc.install');"
            "print(' '.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.fixture
def qubes_run_dir() -> Path:
    """/run/qubes as qrexec has it (created if missing; we run as root in CI)."""
    path = Path("/run/qubes")
    if os.geteuid() != 0 and not path.is_dir():
        pytest.skip("needs root to create /run/qubes")
    if not path.is_dir():
        path.mkdir()
        path.chmod(0o2770)  # mkdir's mode passes through the umask: group-writable only this way
    return path


def activation_manifest(work: Path, name: str, prefix: str, raw_socket: Path) -> Path:
    """A daemon ``name`` with PREFIX.Echo, PREFIX.Slow and PREFIX.Env on its shared socket and
    PREFIX.Raw on ``raw_socket``."""
    manifest = work / "m.yaml"
    manifest.write_text(
        f"version: 1\ndaemons:\n  {name}:\n    idle_exit: 0\n    services:\n"
        f"      {prefix}.Echo:\n        handler: qubes_socksvc.examples:echo\n"
        f"      {prefix}.Slow:\n        handler: tests.handlers:slow\n"
        f"      {prefix}.Env:\n        handler: tests.handlers:plain_child_listen_variables\n"
        f"      {prefix}.Raw:\n        handler: qubes_socksvc.examples:sha256\n        service_descriptor: false\n"
        f"        socket: {raw_socket}\n")
    manifest.chmod(0o644)
    return manifest


def activated(passed: list[Path], name: str, manifest: Path, out: BinaryIO,
              loop: str = "uvloop") -> subprocess.Popen[bytes]:
    """The real systemd-socket-activate listening on ``passed``, starting ``serve name`` as
    nobody on the first call, on ``loop`` ("asyncio": uvloop hidden); returns once the first
    socket exists."""
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None, "systemd-socket-activate missing: 'make setup-test' installs the systemd package"
    proc = subprocess.Popen(
        [activate, *(arg for path in passed for arg in ("-l", str(path))), "-E", "PYTHONPATH",
         "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-m", "qubes_socksvc", "serve", name, "-c", str(manifest)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO / 'bench' / 'no_uvloop'}:{REPO}" if loop == "asyncio"
             else str(REPO)}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not passed[0].exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_socket_activation_with_systemd_socket_activate(qubes_run_dir: Path, loop: str) -> None:
    """The real systemd-socket-activate passes LISTEN_FDS; the first call starts the daemon."""
    work = world_dir("socksvc-activate-")
    name = f"act{os.getpid()}"
    main_socket = qubes_run_dir / f"socksvc-{name}.sock"
    raw_socket = qubes_run_dir / f"socksvc-{name}.Raw.sock"
    manifest = activation_manifest(work, name, "act", raw_socket)
    log = open(work / "log", "wb")  # noqa: SIM115
    proc = activated([main_socket, raw_socket], name, manifest, log, loop)
    try:
        assert "serving" not in (work / "log").read_text()  # nothing started before the first call
        assert raw_call(str(main_socket), b"act.Echo+1 work\0cold call") == b"cold call"
        assert raw_call(str(raw_socket), b"abc") == (hashlib.sha256(b"abc").hexdigest() + "\n").encode()
        text = (work / "log").read_text()
        assert "serving 4 services on 2 sockets" in text and f"({loop} event loop)" in text, text
        assert "cannot" not in text and "ignoring socket" not in text, text
        # sd_listen_fds(3) unsets LISTEN_* for the daemon's children: none takes its sockets
        assert raw_call(str(main_socket), b"act.Env work\0") == b""
        # A call while another is in flight: accepting goes on until none is left, and must not
        # block on the passed socket (systemd passes it blocking; uvloop's poll handle makes it
        # non-blocking, asyncio's loop does not).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            slow.connect(str(main_socket))
            slow.sendall(b"act.Slow+2 work\0")
            slow.shutdown(socket.SHUT_WR)
            time.sleep(0.3)  # the slow call accepted and in flight
            assert raw_call(str(main_socket), b"act.Echo work\0meanwhile", timeout=10) == b"meanwhile"
            slow.settimeout(30)
            assert slow.recv(16) == b"done\n"
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        # The sockets are systemd's (here systemd-socket-activate's): the daemon unlinks nothing.
        assert main_socket.is_socket() and raw_socket.is_socket()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        for path in (main_socket, raw_socket):
            path.unlink(missing_ok=True)
        shutil.rmtree(work)


def test_listen_variables_meant_for_another_process_are_ignored(qubes_run_dir: Path) -> None:
    """LISTEN_FDS with a LISTEN_PID that is not the daemon's (inherited from a shell a
    socket-activated service started): sd_listen_fds(3) says no socket was passed, so the daemon
    binds its own, as when started by hand, rather than failing."""
    work = world_dir("socksvc-listen-")
    name = f"lp{os.getpid()}"
    main_socket = qubes_run_dir / f"socksvc-{name}.sock"
    manifest = work / "m.yaml"
    manifest.write_text(f"version: 1\ndaemons:\n  {name}:\n    idle_exit: 0\n"
                        f"    services:\n      lp.Echo:\n        handler: qubes_socksvc.examples:echo\n")
    manifest.chmod(0o644)
    with (work / "log").open("wb") as out:  # in /run/qubes's group, as a qube's user is: it binds there
        proc = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", f"--groups={qubes_run_dir.stat().st_gid}",
             sys.executable, "-m", "qubes_socksvc", "serve", name, "-c", str(manifest)],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LISTEN_FDS": "1", "LISTEN_PID": "1"},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while " services on " not in (work / "log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (work / "log").read_text()
            time.sleep(0.05)
        assert raw_call(str(main_socket), b"lp.Echo work\0bound by hand") == b"bound by hand"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        main_socket.unlink(missing_ok=True)
        shutil.rmtree(work)


def test_socket_activation_with_sockets_the_manifest_does_not_declare(qubes_run_dir: Path) -> None:
    """systemd passing a socket the spec does not declare (units older or newer than the spec):
    that socket is closed with an error naming the fix, a declared one it did not pass is named,
    the declared ones passed are served; with none of them passed the daemon fails at once."""
    work = world_dir("socksvc-activate-")
    name = f"mis{os.getpid()}"
    main_socket, raw_socket = qubes_run_dir / f"socksvc-{name}.sock", qubes_run_dir / f"socksvc-{name}.Raw.sock"
    stray = qubes_run_dir / f"socksvc-{name}-stray.sock"
    manifest = activation_manifest(work, name, "mis", raw_socket)

    def serve(*passed: Path) -> tuple[subprocess.Popen[bytes], Path]:
        log = work / f"log-{len(passed)}"
        with log.open("wb") as out:
            return activated(list(passed), name, manifest, out), log

    try:
        proc, log = serve(stray, main_socket)  # the ignored one first: the next is still taken
        try:
            stray_socket = os.readlink(f"/proc/{proc.pid}/fd/3")  # SD_LISTEN_FDS_START, before the exec
            assert raw_call(str(main_socket), b"mis.Echo work\0still served") == b"still served"
            held = set()
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    held.add(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
            assert stray_socket.startswith("socket:[") and stray_socket not in held, "the ignored socket is kept open"
            text = log.read_text()
            assert f"ignoring socket {stray} passed by systemd: the manifest does not declare it for daemon " \
                   f"{name}; run 'qubes-socksvc apply' and 'systemctl --user daemon-reload'" in text, text
            assert f"socket {raw_socket} is declared but systemd did not pass it; reload the units" in text, text
            assert "serving 4 services on 1 sockets" in text, text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        for path in (main_socket, stray):
            path.unlink(missing_ok=True)
        proc, log = serve(stray)
        try:
            with contextlib.suppress(OSError):
                raw_call(str(stray), b"mis.Echo work\0")  # starts the daemon, which serves nothing
            deadline = time.monotonic() + 30
            while f"systemd passed no socket declared for daemon {name}" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        for path in (main_socket, raw_socket, stray):
            path.unlink(missing_ok=True)
        shutil.rmtree(work)
