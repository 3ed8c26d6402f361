# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""`qubes-socksvc call`: resolves like qrexec, sends the descriptor, streams both ways."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qubes_socksvc import agent, lookup
from tests.conftest import REPO, TESTS, RpcDirs, RunningDaemon, call_cli, run_cli, world_dir
from tests.test_call_endings import cpu_seconds


@pytest.fixture
def rpc_dirs(daemon: RunningDaemon) -> RpcDirs:
    """Two qubes-rpc directories (searched in order) and an rpc-config dir, linking to the daemon."""
    base = world_dir("socksvc-rpc-")
    first, second, config = base / "run-qubes-rpc", base / "etc-qubes-rpc", base / "rpc-config"
    for d in (first, second, config):
        d.mkdir()
    (second / "test.Echo").symlink_to(daemon.socket())
    (second / "test.Slow").symlink_to(daemon.socket())
    (second / "test.Fields").symlink_to(daemon.socket())
    (first / "test.Fields+special").symlink_to(daemon.socket())
    (second / "test.Raw").symlink_to(daemon.socket("socksvc-test.Raw.sock"))
    (config / "test.Raw").write_text("skip-service-descriptor=true\n")
    (second / "test.Gone").symlink_to(base / "no-such.sock")
    (second / "test.Exec").write_text("#!/bin/sh\n")
    return RpcDirs((first, second), config)


def test_call_streams_stdin_and_stdout(rpc_dirs: RpcDirs) -> None:
    result = call_cli("test.Echo", dirs=rpc_dirs, data=b"hello through the symlink")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hello through the symlink", b"")


def test_call_resolves_name_plus_arg_then_name(rpc_dirs: RpcDirs) -> None:
    result = call_cli("test.Fields+other", "--source", "work", dirs=rpc_dirs)
    code, out = result.returncode, result.stdout.decode()
    assert code == 0 and "service=test.Fields+other" in out and "source='work'" in out
    result = call_cli("test.Fields+special", dirs=rpc_dirs)
    code, out = result.returncode, result.stdout.decode()
    assert "argument=special" in out  # the NAME+ARG entry in the first directory


def test_call_sends_dom0_descriptor(rpc_dirs: RpcDirs) -> None:
    result = call_cli("test.Fields", "--dom0", "--target-type", "keyword", "--target", "@dispvm", dirs=rpc_dirs)
    code, out = result.returncode, result.stdout.decode()
    assert code == 0 and "target_type='keyword'" in out and "target='dispvm'" in out


def test_call_honours_skip_service_descriptor(rpc_dirs: RpcDirs) -> None:
    result = call_cli("test.Raw", dirs=rpc_dirs, data=b"raw bytes")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"raw bytes", b"")


def test_call_missing_service_exits_127(rpc_dirs: RpcDirs) -> None:
    """agent/qrexec-agent-data.c: find_qrexec_service -1 -> QREXEC_EXIT_SERVICE_NOT_FOUND (127)."""
    result = call_cli("test.Nothing", dirs=rpc_dirs)
    code, err = result.returncode, result.stderr.decode()
    assert code == 127 and err.startswith("qubes-socksvc call: service test.Nothing not found: no test.Nothing+ "
                                          "then test.Nothing in "), err  # one plain line, the message alone
    assert err.count("\n") == 1


@pytest.mark.parametrize("where", [0, 2])  # the qubes-rpc entry, the rpc-config file
def test_call_fails_like_qrexec_on_an_entry_stat_cannot_read(rpc_dirs: RpcDirs, where: int) -> None:
    """libqrexec/exec.c: find_file: a stat() error other than ENOENT (here ELOOP, a link to
    itself) fails the call (125), it does not skip the file as a missing one."""
    loop = (*rpc_dirs.services, rpc_dirs.config)[where] / "test.Echo+"
    loop.symlink_to("test.Echo+")
    result = call_cli("test.Echo", dirs=rpc_dirs)
    code, err = result.returncode, result.stderr.decode()
    assert code == 125 and f"{loop}: Too many levels of symbolic links" in err, err


def test_call_dangling_symlink_is_skipped_like_qrexec(rpc_dirs: RpcDirs) -> None:
    """libqrexec/exec.c: find_file: stat() of a dangling link is ENOENT, so the search goes on."""
    result = call_cli("test.Gone", dirs=rpc_dirs)
    code, err = result.returncode, result.stderr.decode()
    assert code == 127 and "not found" in err


@pytest.mark.parametrize("make, words", [
    (lambda p: (p.write_text("#!/bin/sh\n"), p.chmod(0o755)), "is an executable service, not a socket"),
    (lambda p: p.mkdir(), "is a directory; qrexec fails the call (125)"),
    (lambda p: p.write_text("not executable"), "is neither a socket nor an executable"),
    (lambda p: p.symlink_to("/dev/tcp/"), "/dev/tcp/ is not followed by a host"),
])
def test_call_names_every_kind_of_entry(tmp_path: Path, make: Callable[[Path], object], words: str) -> None:
    """libqrexec/exec.c: find_qrexec_service: socket, /dev/tcp link, executable, or error (125)."""
    make(tmp_path / "x.Kind")
    result = run_cli("call", "x.Kind", "--rpc-dir", str(tmp_path), "--rpc-config-dir", str(tmp_path / "none"))
    assert result.returncode == 125 and words in result.stderr, result.stderr


@pytest.fixture
def tcp_echo() -> Iterator[int]:
    """A real TCP echo server on 127.0.0.1; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    thread.join(5)


@pytest.mark.parametrize("link, service", [
    ("/dev/tcp/127.0.0.1/{port}", "x.Tcp"),
    ("/dev/tcp/127.0.0.1", "x.Tcp+{port}"),
    ("/dev/tcp", "x.Tcp+127.0.0.1+{port}"),
])
def test_call_tcp_service_like_the_agent(tmp_path: Path, tcp_echo: int, link: str, service: str) -> None:
    """libqrexec/exec.c: find_qrexec_service, TCP branch: host and port from the link or the argument."""
    (tmp_path / "x.Tcp").symlink_to(link.format(port=tcp_echo))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "x.Tcp").write_text("skip-service-descriptor=true\n")
    result = run_cli("call", service.format(port=tcp_echo), "--rpc-dir", str(tmp_path),
                     "--rpc-config-dir", str(tmp_path / "cfg"), input=b"over tcp")
    assert (result.returncode, result.stdout) == (0, "over tcp"), result.stderr


@pytest.mark.parametrize("link, service, words", [
    ("/dev/tcp/127.0.0.1/22", "x.Tcp+1", "takes no argument"),
    ("/dev/tcp/127.0.0.1", "x.Tcp", "needs the port"),
    ("/dev/tcp", "x.Tcp+127.0.0.1", "no port in the argument"),
    ("/dev/tcp", "x.Tcp+a_b+22", "underscore not allowed"),
    ("/dev/tcp/127.0.0.1", "x.Tcp+022", "invalid port '022'"),
    ("/dev/tcp/127.0.0.1", "x.Tcp+65536", "invalid port '65536'"),
    ("/dev/tcp/localhost/22", "x.Tcp", "localhost port 22: Name or service not known; a numeric address is required"),
    ("/dev/tcp/" + "\u00e4" * 70 + "/22", "x.Tcp", "a numeric address is required"),  # no IDNA label: UnicodeError
    ("/dev/tcp/127.0.0.1/", "x.Tcp+22", "takes no argument"),  # an empty port is a port, not none
    ("/dev/tcp/127.0.0.1/", "x.Tcp", "invalid port ''"),
])
def test_call_tcp_refuses_what_the_agent_refuses(tmp_path: Path, link: str, service: str, words: str) -> None:
    """libqrexec/exec.c: find_qrexec_service and validate_port, qubes_tcp_connect (AI_NUMERICHOST)."""
    (tmp_path / "x.Tcp").symlink_to(link)
    result = run_cli("call", service, "--rpc-dir", str(tmp_path), "--rpc-config-dir", str(tmp_path / "none"))
    assert result.returncode == 125 and words in result.stderr, result.stderr


def test_call_never_blocks_on_a_fifo_rpc_config(rpc_dirs: RpcDirs) -> None:
    os.mkfifo(rpc_dirs.config / "test.Echo")
    result = call_cli("test.Echo", dirs=rpc_dirs)
    code, err = result.returncode, result.stderr.decode()
    assert code == 125 and "not a regular file" in err


def test_call_rpc_config_is_looked_up_on_its_own(rpc_dirs: RpcDirs) -> None:
    """libqrexec/exec.c: load_service_config_raw: test.Fields+special's link matched, but with no
    config of its own it takes test.Fields's: here skip-service-descriptor=true."""
    (rpc_dirs.config / "test.Fields").write_text("skip-service-descriptor=true # inherited\n")
    result = call_cli("test.Fields+special", dirs=rpc_dirs, data=b"test.Fields+forged dom0\0")
    code, out = result.returncode, result.stdout.decode()
    assert code == 0 and "argument='forged'" in out and "source='dom0'" in out  # what apply prevents


def test_call_ctrl_c_exits_130_without_a_traceback(rpc_dirs: RpcDirs) -> None:
    second, config = rpc_dirs.services[1], rpc_dirs.config
    proc = subprocess.Popen(
        [sys.executable, "-m", "qubes_socksvc", "call", "test.Slow+30", "--rpc-dir", str(second),
         "--rpc-config-dir", str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"},
        # As from a terminal: a suite started in the background by a shell inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and b"Traceback" not in err and b"interrupted" in err, err


def test_call_socket_without_listener_exits_125(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # bound, never listening: like a daemon that died
    result = run_cli("call", "x.Y", "--socket", str(path))
    assert result.returncode == 125 and "cannot connect" in result.stderr


@pytest.mark.parametrize("service", ["../etc/passwd", "x.Y\n", "+x", "x.Y+a/b"])
def test_call_rejects_invalid_names(service: str) -> None:
    result = run_cli("call", service)
    assert result.returncode == 2 and "invalid service" in result.stderr


def test_call_streams_large_input_both_ways(rpc_dirs: RpcDirs) -> None:
    data = os.urandom(8 << 20)
    second = rpc_dirs.services[1]
    result = subprocess.run(
        [sys.executable, "-m", "qubes_socksvc", "call", "test.Echo", "--rpc-dir", str(second)],
        input=data, capture_output=True, env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"}, timeout=60)
    assert result.returncode == 0 and hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_rpc_config_files_are_read_up_to_64_kib(tmp_path: Path) -> None:
    """README, "Bounded inputs": rpc-config files are read up to 64 KiB (the agent reads any size;
    a larger one is refused, never read whole)."""
    line = "wait-for-session=true\n"
    (tmp_path / "x.Y").write_text("#" * (65536 - len(line) - 1) + "\n" + line)
    assert lookup.config_for("x.Y", (str(tmp_path),)).wait_for_session is True
    (tmp_path / "x.Y").write_text("#" * (65536 - len(line)) + "\n" + line)
    with pytest.raises(lookup.LookupFailed, match="larger than 65536 bytes"):
        lookup.config_for("x.Y", (str(tmp_path),))


def test_invalid_rpc_config_fails_like_qrexec(tmp_path: Path) -> None:
    (tmp_path / "x.Y").write_text(" wait-for-session=true\n")
    with pytest.raises(lookup.LookupFailed, match="invalid rpc-config"):
        lookup.config_for("x.Y", (str(tmp_path),))


def test_call_with_no_standard_input_at_all(rpc_dirs: RpcDirs) -> None:
    """Started with fd 0 closed (as by some service managers): an empty input, not a crash."""
    result = subprocess.run(
        [sys.executable, "-m", "qubes_socksvc", "call", "test.Fields", "--rpc-dir", str(rpc_dirs.services[1])],
        preexec_fn=lambda: os.close(0), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"})
    assert result.returncode == 0, result.stderr
    assert "service=test.Fields" in result.stdout


def test_call_streams_output_as_it_comes_and_ends_with_the_service(rpc_dirs: RpcDirs) -> None:
    """Output reaches call's stdout as the service writes it (an interactive service works), and
    call ends when the service's output ends, even while its own stdin is still open."""
    argv = [sys.executable, "-m", "qubes_socksvc", "call", "--rpc-dir", str(rpc_dirs.services[1])]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"}
    env.pop("PYTHONUNBUFFERED", None)  # stdout buffered, as it is for a user
    echo = subprocess.Popen([*argv, "test.Echo"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert echo.stdin is not None and echo.stdout is not None
        echo.stdin.write(b"first line\n")
        echo.stdin.flush()
        assert select.select([echo.stdout], [], [], 10)[0], "the echoed line never came while call ran"
        assert echo.stdout.readline() == b"first line\n"
        echo.stdin.close()
        assert echo.wait(timeout=10) == 0
    finally:
        echo.kill()
    fields = subprocess.Popen([*argv, "test.Fields"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert fields.wait(timeout=10) == 0  # its stdin never closed
    finally:
        fields.kill()
        assert fields.stdin is not None
        fields.stdin.close()


# --- every failure mode: one line, qrexec's exit code, no hang (issue 22, point 6) -----------


def run_call(second: Path, service: str, **popen: object) -> tuple[int, str]:
    """``call SERVICE`` with the given stdin/stdout (pipes, files, closed fds); (exit code, stderr).
    Bounded: a call that hangs fails the test instead of hanging it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qubes_socksvc", "call", service, "--rpc-dir", str(second)],
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"}, **popen)  # type: ignore[call-overload]
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"call {service} hung") from None
    return proc.returncode, err.decode()


def read_to_end(fd: int, timeout: float = 30) -> bytes:
    """All of a pipe until its EOF, then closed; fails after ``timeout`` (a hung call)."""
    deadline, chunks = time.monotonic() + timeout, list[bytes]()
    try:
        while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if not (data := os.read(fd, 65536)):
                return b"".join(chunks)
            chunks.append(data)
        raise AssertionError(f"no end of output within {timeout}s: the call hung")
    finally:
        os.close(fd)


def assert_one_line(err: str, *words: str) -> None:
    assert err.count("\n") == 1 and err.startswith("qubes-socksvc call: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_call_with_standard_output_closed(rpc_dirs: RpcDirs) -> None:
    """``>&-``: nowhere for the reply to go; the call is not made (before: an AttributeError)."""
    code, err = run_call(rpc_dirs.services[1], "test.Echo", stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(1))
    assert code == 125
    assert_one_line(err, "standard output is closed")


def test_call_whose_standard_output_fails(rpc_dirs: RpcDirs) -> None:
    """A write error on stdout (here EPIPE: its reader has gone) ends the call at once, in one
    line (before: "[Errno 32] Broken pipe" and exit 1, then Python's own flush error)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        code, err = run_call(rpc_dirs.services[1], "test.Fields", stdin=subprocess.DEVNULL, stdout=write_end)
    finally:
        os.close(write_end)
    assert code == 125
    assert_one_line(err, "cannot write the reply to standard output", "Broken pipe")


def test_a_service_gone_before_the_descriptor_fails_the_call_with_125() -> None:
    """The descriptor is the socket's first data (libqrexec/exec.c): a service that closed its
    end before it could be sent fails the call as qrexec does (125), not with a traceback."""
    ours, service = socket.socketpair()
    service.close()
    with pytest.raises(agent.CallError) as e, open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as stdout:
        agent.call(ours, b"test.Echo+ work\0", stdin, stdout)
    assert e.value.exit_code == 125 and str(e.value) == "cannot send the service descriptor: Broken pipe"


class RawService:
    """A socket service of the test's own, one caller at a time, with a qubes-rpc link to it."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.rpc_dir = tmp_path / "rpc"
        self.rpc_dir.mkdir()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(tmp_path / "service.sock"))
        self.listener.listen()
        self.listener.settimeout(30)
        (self.rpc_dir / name).symlink_to(tmp_path / "service.sock")

    def accept(self) -> socket.socket:
        """The next caller, its descriptor read (up to and with its NUL)."""
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        while (byte := conn.recv(1)) != b"\0":
            assert byte, "the caller sent no descriptor"
        return conn


def test_the_call_ends_when_the_service_closes_though_input_never_ends(tmp_path: Path) -> None:
    """A service that replies and closes ends the call, as qrexec-client-vm ends once the
    service's side is done: a caller whose stdin never ends (a terminal) is not kept waiting."""
    service = RawService(tmp_path, "test.Quick")
    read_end, write_end = os.pipe()  # input that never ends: the write end stays open
    proc = subprocess.Popen([sys.executable, "-m", "qubes_socksvc", "call", "test.Quick", "--rpc-dir",
                             str(service.rpc_dir)], stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"})
    os.close(read_end)
    try:
        with service.accept() as conn:
            conn.sendall(b"bye\n")
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(write_end)
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (0, b"bye\n", b"")


def test_a_service_that_leaves_input_unread_still_gives_its_reply(tmp_path: Path) -> None:
    """A service that replies and closes without reading the input sent to it: Linux reports
    ECONNRESET to the caller after the reply (net/unix/af_unix.c: unix_release_sock), which
    the agent takes for the end of output (libqrexec/remote.c: handle_input_v2): the reply,
    exit 0."""
    service = RawService(tmp_path, "test.Quick")
    proc = subprocess.Popen([sys.executable, "-m", "qubes_socksvc", "call", "test.Quick", "--rpc-dir",
                             str(service.rpc_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"})
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"input the service never reads")
        proc.stdin.flush()
        with service.accept() as conn:
            select.select([conn], [], [], 30)  # the unread input has arrived
            conn.sendall(b"bye\n")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (0, b"bye\n", b"")


def test_call_whose_standard_input_fails(rpc_dirs: RpcDirs, tmp_path: Path) -> None:
    """A read error on stdin (EBADF: opened write-only) cuts the call: no end of input is sent,
    so the service cannot take what it got for all of the input (before: a thread traceback,
    no half-close, and a call that hung)."""
    fd = os.open(tmp_path / "write-only", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        code, err = run_call(rpc_dirs.services[1], "test.Echo", stdin=fd, stdout=subprocess.DEVNULL)
    finally:
        os.close(fd)
    assert code == 125
    assert_one_line(err, "cannot read standard input: Bad file descriptor")


def test_call_whose_standard_input_is_reset_takes_it_as_the_end_of_input(rpc_dirs: RpcDirs, tmp_path: Path) -> None:
    """A standard input that is a socket reset by its peer (ECONNRESET: the peer closed with
    data of ours unread) ends the input there, as EOF does, and the call goes on (libqrexec/
    remote.c: handle_input_v2 takes ECONNRESET as EOF): what came before it reaches the service."""
    ours, peer = socket.socketpair()
    peer.sendall(b"input before the reset")
    ours.sendall(b"never read by the peer")
    peer.close()  # unix_release_sock: data left unread sets our side's sk_err to ECONNRESET
    with ours, open(tmp_path / "out", "wb") as out:
        code, err = run_call(rpc_dirs.services[1], "test.Echo", stdin=ours.fileno(), stdout=out)
    assert (code, err) == (0, "")
    assert (tmp_path / "out").read_bytes() == b"input before the reset"


def test_call_with_a_non_blocking_standard_input(rpc_dirs: RpcDirs) -> None:
    """stdin's O_NONBLOCK belongs to its open file, shared with whoever set it: EAGAIN means
    "not yet", and the call waits for input as qrexec does (libqrexec/remote.c: handle_input_v2
    on EAGAIN; libqrexec/process_io.c sets its own stdin non-blocking).  Before: a thread
    traceback, no half-close, a call hung forever."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    out_read, out_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qubes_socksvc", "call", "test.Echo", "--rpc-dir", str(rpc_dirs.services[1])],
        stdin=read_end, stdout=out_write, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"})
    os.close(read_end)
    os.close(out_write)
    try:
        # call reads an empty, non-blocking pipe meanwhile (EAGAIN): it waits in poll(), never spins
        assert cpu_while_waiting(proc.pid) < 0.25, "call spun on EAGAIN instead of waiting for input"
        os.write(write_end, b"late ")
        time.sleep(0.2)
        os.write(write_end, b"input")
        os.close(write_end)
        reply = read_to_end(out_read)
        assert proc.wait(timeout=30) == 0
    finally:
        err = killed_stderr(proc)
    assert reply == b"late input" and err == "", err


def cpu_while_waiting(pid: int, seconds: float = 1.0) -> float:
    """CPU seconds process ``pid`` spends in ``seconds``, measured once its sending thread runs
    (two threads: start-up is over and both directions are under way)."""
    deadline = time.monotonic() + 30
    while "\nThreads:\t2\n" not in Path(f"/proc/{pid}/status").read_text():
        assert time.monotonic() < deadline, "call never started its sending thread"
        time.sleep(0.02)
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


def killed_stderr(proc: subprocess.Popen[bytes]) -> str:
    """A call process ended (killed if still running), and what it wrote on stderr."""
    proc.kill()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return err


def test_call_with_a_non_blocking_standard_output(rpc_dirs: RpcDirs) -> None:
    """A full non-blocking stdout (EAGAIN) is waited for, not a lost reply or a traceback."""
    data = os.urandom(1 << 20)
    out_read, out_write = os.pipe()
    os.set_blocking(out_write, False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qubes_socksvc", "call", "test.Echo", "--rpc-dir", str(rpc_dirs.services[1])],
        stdin=subprocess.PIPE, stdout=out_write, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"})
    os.close(out_write)
    try:
        assert proc.stdin is not None
        feeder = threading.Thread(target=lambda: (proc.stdin.write(data), proc.stdin.close()))  # type: ignore[union-attr]
        feeder.start()
        # the pipe (64 KiB) is full meanwhile: call's writes meet EAGAIN, and it waits in poll()
        assert cpu_while_waiting(proc.pid) < 0.25, "call spun on EAGAIN instead of waiting for its output"
        reply = read_to_end(out_read)
        feeder.join(30)
        assert proc.wait(timeout=30) == 0
    finally:
        err = killed_stderr(proc)
    assert hashlib.sha256(reply).digest() == hashlib.sha256(data).digest() and err == "", err
