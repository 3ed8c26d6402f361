# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Forwards: qubes-rpc links to existing Unix sockets and TCP ports, as qrexec calls them.

Each target form, each refusal qrexec makes at call time (libqrexec/exec.c:
find_qrexec_service, validate_port, qubes_tcp_connect), apply into a staging root,
and real calls through the generated links with ``qubes-socksvc call`` to a real
TCP echo server and a real Unix socket server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_socksvc import manifest, model, qrexec, status
from qubes_socksvc.manifest import ManifestError
from tests import qrexec_view
from tests.conftest import RpcDirs, apply, call_cli, private_dir, run_cli
from tests.test_manifest import tree_digest

PATH = "/etc/qubes-socksvc.yaml"
#: No Unix socket listens (the TCP cases).
NO_UNIX = status.UnixListeners(frozenset(), frozenset(), frozenset(), True)


def parse(text: str) -> model.Manifest:
    return manifest.parse(textwrap.dedent(text), PATH)


def forward(key: str, target: str, extra: str = "") -> str:
    return f'version: 1\nforwards:\n  {key}:\n    target: "{target}"\n{extra}'


# --- the manifest -------------------------------------------------------------------------


@pytest.mark.parametrize("target, link", [
    ("unix:/run/user/1000/gnupg/S.gpg-agent", "/run/user/1000/gnupg/S.gpg-agent"),
    ("tcp:127.0.0.1:8080", "/dev/tcp/127.0.0.1/8080"),
    ("tcp:127.0.0.1", "/dev/tcp/127.0.0.1"),
    ("tcp:", "/dev/tcp"),
    ("tcp:[::1]:22", "/dev/tcp/::1/22"),
    ("tcp:[fe80::1%eth0]:65535", "/dev/tcp/fe80::1%eth0/65535"),  # a scope: the link form only
    ("tcp:[::1]", "/dev/tcp/::1"),
    ("unix:/" + "s" * 106, "/" + "s" * 106),  # 107 bytes: sun_path's room, its NUL aside
])
def test_target_forms_become_qrexec_links(target: str, link: str) -> None:
    """libqrexec/exec.c: find_file: a link to /dev/tcp[/HOST[/PORT]] is a TCP service."""
    parsed = parse(forward("my.Fwd", target))
    fwd = parsed.forwards["my.Fwd"]
    assert fwd.link_target == link
    assert fwd.rpc_config().options() == {"skip-service-descriptor": True}  # not Qubes-aware by default
    assert parsed.daemons == {}


def test_forward_options_are_rpc_config() -> None:
    fwd = parse(forward("my.Fwd", "tcp:127.0.0.1:22", "    service_descriptor: true\n    wait_for_session: true\n"
                        "    exit_on_client_eof: true\n    exit_on_service_eof: false\n")).forwards["my.Fwd"]
    assert fwd.rpc_config().options() == {"wait-for-session": True, "exit-on-client-eof": True,
                                          "exit-on-service-eof": False}


# (key, target, extra YAML, "line:col", key in the message, words in the message)
BAD_TARGETS = [
    ("my.F", "ftp:x", "", "4:13", "forwards.my.F.target", 'expected "unix:/PATH", "tcp:HOST:PORT"'),
    ("my.F", "/run/x.sock", "", "4:13", "forwards.my.F.target", 'expected "unix:/PATH"'),
    ("my.F", "unix:run/x.sock", "", "4:13", "forwards.my.F.target", "absolute, normalised path"),
    ("my.F", "unix:/run/../x.sock", "", "4:13", "forwards.my.F.target", "absolute, normalised path"),
    ("my.F", "unix:/" + "s" * 107, "", "4:13", "forwards.my.F.target", "longer than 107 bytes"),
    ("my.F", "unix:/run/a b.sock", "", "4:13", "forwards.my.F.target", "spaces or control characters"),
    ("my.F", "tcp:localhost:80", "", "4:13", "forwards.my.F.target", "qubes_tcp_connect, AI_NUMERICHOST"),
    ("my.F", "tcp:127.0.0.1:080", "", "4:13", "forwards.my.F.target", "invalid port '080'"),
    ("my.F", "tcp:127.0.0.1:0", "", "4:13", "forwards.my.F.target", "validate_port"),
    ("my.F", "tcp:127.0.0.1:65536", "", "4:13", "forwards.my.F.target", "invalid port '65536'"),
    ("my.F", "tcp:127.0.0.1:", "", "4:13", "forwards.my.F.target", "invalid port ''"),
    ("my.F", "tcp:127.0.0.1:+22", "", "4:13", "forwards.my.F.target", "invalid port '+22'"),
    ("my.F", "tcp:::1:22", "", "4:13", "forwards.my.F.target", "IPv6 address goes in brackets"),
    ("my.F", "tcp:[127.0.0.1]:22", "", "4:13", "forwards.my.F.target", "tcp:[IPv6]:PORT"),
    ("my.F", "tcp:[::1]22", "", "4:13", "forwards.my.F.target", "tcp:[IPv6]:PORT"),
    ("my.F", "tcp:127.0.0.1%lo:22", "", "4:13", "forwards.my.F.target", "not a numeric IPv4 or IPv6"),
    ("my.F", "tcp:[fe80::1%a b]:22", "", "4:13", "forwards.my.F.target", "not a numeric IPv4 or IPv6"),
    # The key fixes every call's argument: qrexec's TCP branch judges it at call time.
    ("my.F+x", "tcp:127.0.0.1:80", "", "4:13", "forwards.my.F+x.target", "takes no argument"),
    ("my.F+", "tcp:127.0.0.1", "", "4:13", "forwards.my.F+.target", "needs the port"),
    ("my.F+ssh", "tcp:127.0.0.1", "", "4:13", "forwards.my.F+ssh.target", "invalid port 'ssh'"),
    ("my.F+022", "tcp:127.0.0.1", "", "4:13", "forwards.my.F+022.target", "invalid port '022'"),
    ("my.F+", "tcp:", "", "4:13", "forwards.my.F+.target", "needs the host+port"),
    ("my.F+127.0.0.1", "tcp:", "", "4:13", "forwards.my.F+127.0.0.1.target", "no port in the argument"),
    ("my.F+a_b+22", "tcp:", "", "4:13", "forwards.my.F+a_b+22.target", "underscore not allowed"),
    ("my.F+localhost+22", "tcp:", "", "4:13", "forwards.my.F+localhost+22.target", "not a numeric address"),
    # So do policy arguments of a NAME key.
    ("my.F", "tcp:127.0.0.1", "    policy:\n      arguments:\n        '022': {allow: work}\n", "7:9",
     "forwards.my.F.policy.arguments.022", "invalid port '022'"),
    ("my.F", "tcp:127.0.0.1:22", "    policy:\n      arguments:\n        x: {allow: work}\n", "7:9",
     "forwards.my.F.policy.arguments.x", "takes no argument"),
    # The rest of the schema.
    ("my.F", "tcp:127.0.0.1:22", "    force_user: user\n", "5:5", "forwards.my.F.force_user", "unknown key"),
    ("my.F", "tcp:127.0.0.1:22", "    service_descriptor: no-thanks\n", "5:25", "forwards.my.F.service_descriptor",
     "expected a boolean"),
    ("my F", "tcp:127.0.0.1:22", "", "3:3", "forwards.my F", "invalid qrexec service name"),
]


@pytest.mark.parametrize("key, target, extra, where, field, words", BAD_TARGETS,
                         ids=[f"{k} {t}{' ' + e.split(':')[0].strip() if e else ''}" for k, t, e, *_ in BAD_TARGETS])
def test_bad_forwards_are_errors_at_file_line_column(key: str, target: str, extra: str, where: str, field: str,
                                                     words: str) -> None:
    """Everything qrexec would refuse at call time is refused by check, with FILE:LINE:COLUMN."""
    with pytest.raises(ManifestError) as error:
        parse(forward(key, target, extra))
    assert len(error.value.problems) == 1, error.value.problems
    problem = error.value.problems[0]
    assert problem.startswith(f"{PATH}:{where}: {field}: "), problem
    assert words in problem, problem


def test_a_tcp_forward_qrexec_would_fail_names_the_call_and_the_fix() -> None:
    """The key fixes the argument: change the key or the target; a policy argument: remove it."""
    extra = "    policy:\n      arguments:\n        '022': {allow: work}\n"
    with pytest.raises(ManifestError) as error:
        parse(forward("my.F+ssh", "tcp:127.0.0.1") + forward("my.G", "tcp:127.0.0.1", extra).split("forwards:\n")[1])
    assert [problem.split(": ", 1)[1] for problem in error.value.problems] == [
        "forwards.my.F+ssh.target: qrexec would fail every call of my.F+ssh through /dev/tcp/127.0.0.1 (invalid "
        "port 'ssh': a decimal 1-65535 without leading zeros; libqrexec/exec.c: find_qrexec_service): "
        "change the key or the target",
        "forwards.my.G.policy.arguments.022: qrexec would fail every call of my.G+022 through /dev/tcp/127.0.0.1 "
        "(invalid port '022': a decimal 1-65535 without leading zeros; libqrexec/exec.c: find_qrexec_service): "
        "remove that argument"]


def test_missing_target_and_clashes() -> None:
    text = """\
        version: 1
        daemons:
          d:
            services:
              my.Svc:
                handler: qubes_socksvc.examples:echo
        forwards:
          my.Svc:
            target: tcp:127.0.0.1:22
          my.Empty: {}
          my.Into:
            target: unix:/run/qubes/socksvc-d.sock
        """
    with pytest.raises(ManifestError) as error:
        parse(text)
    assert error.value.problems == [
        f"{PATH}:8:3: forwards.my.Svc: service already declared by daemons.d; declare it once",
        f'{PATH}:10:13: forwards.my.Empty: missing "target: unix:/PATH" or "target: tcp:HOST:PORT"',
        f"{PATH}:12:13: forwards.my.Into.target: /run/qubes/socksvc-d.sock is the socket of daemons.d; "
        "declare my.Into as a service there",
    ]


def test_a_manifest_with_only_forwards_renders_no_units(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(forward("my.Web", "tcp:127.0.0.1:8080"))
    root = tmp_path / "root"
    result = apply(path, root, check=True)
    assert "applied 2 changes" in result.stdout
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert files == ["etc/qubes-rpc/my.Web", "etc/qubes/rpc-config/my.Web", "var/lib/qubes-socksvc/owned.json"]
    assert os.readlink(root / "etc/qubes-rpc/my.Web") == "/dev/tcp/127.0.0.1/8080"
    assert "skip-service-descriptor=true\n" in (root / "etc/qubes/rpc-config/my.Web").read_text()


# --- apply and call through the generated links ---------------------------------------------


class Server:
    """A real stream server (TCP or Unix) that echoes, records what it received and counts
    its connections; ``first`` bytes of each connection are kept apart (a descriptor)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.connections = 0
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = bytearray()
                while chunk := conn.recv(1 << 16):
                    data += chunk
                    conn.sendall(chunk)
                self.received.append(bytes(data))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def tcp_server() -> Iterator[Server]:
    server = Server(socket.create_server(("127.0.0.1", 0)))
    yield server
    server.close()


@pytest.fixture
def unix_server() -> Iterator[tuple[Server, str]]:
    directory = private_dir("socksvc-fwd-")
    path = str(directory / "server.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    server = Server(sock)
    yield server, path
    server.close()
    shutil.rmtree(directory)


def apply_text(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    root = tmp_path / "root"
    result = apply(path, root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


PAYLOAD = os.urandom(3 << 20) + bytes(range(256)) * 17


def test_forwards_stream_byte_exact_through_their_links(tmp_path: Path, tcp_server: Server,
                                                        unix_server: tuple[Server, str]) -> None:
    """3 MiB through each generated link to a real server and back, unchanged; no descriptor
    (skip-service-descriptor=true is the forwards' default)."""
    port = tcp_server.sock.getsockname()[1]
    userver, upath = unix_server
    root = apply_text(tmp_path, f"""\
version: 1
forwards:
  my.Tcp:
    target: tcp:127.0.0.1:{port}
  my.Port:
    target: tcp:127.0.0.1
  my.Any:
    target: "tcp:"
  my.Unix:
    target: unix:{upath}
""")
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    for service in ("my.Tcp", f"my.Port+{port}", f"my.Any+127.0.0.1+{port}", "my.Unix"):
        result = call_cli(service, dirs=RpcDirs.under(root), data=PAYLOAD)
        assert result.returncode == 0, (service, result.stderr)
        assert hashlib.sha256(result.stdout).hexdigest() == digest, service
    assert [hashlib.sha256(r).hexdigest() for r in tcp_server.received] == [digest] * 3
    assert [hashlib.sha256(r).hexdigest() for r in userver.received] == [digest]


def test_a_qubes_aware_forward_gets_the_descriptor(tmp_path: Path, unix_server: tuple[Server, str]) -> None:
    server, upath = unix_server
    root = apply_text(tmp_path, forward("my.Aware", f"unix:{upath}", "    service_descriptor: true\n"))
    assert not (root / "etc/qubes/rpc-config/my.Aware").exists()
    result = call_cli("my.Aware+arg", "--source", "work", dirs=RpcDirs.under(root), data=b"data")
    assert result.returncode == 0 and result.stdout == b"my.Aware+arg work\0data"
    assert server.received == [b"my.Aware+arg work\0data"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path for sockets (sun_path holds 107 bytes; tmp_path is long)."""
    directory = private_dir("socksvc-dead-")
    yield directory
    shutil.rmtree(directory)


def test_dead_targets_exit_like_qrexec(tmp_path: Path, short_dir: Path) -> None:
    """Nobody listening: 125 (libqrexec/exec.c: qubes_tcp_connect / qubes_connect fail, -2 ->
    QREXEC_EXIT_PROBLEM); a socket file that is gone: the link dangles, find_file skips it: 127."""
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    directory = short_dir
    stale = directory / "stale.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(stale))  # a socket file, never listened on
    bound.close()
    root = apply_text(tmp_path, f"""\
version: 1
forwards:
  my.Tcp:
    target: tcp:127.0.0.1:{port}
  my.Stale:
    target: unix:{stale}
  my.Gone:
    target: unix:{directory}/gone.sock
""")
    dirs = RpcDirs.under(root)
    tcp, stale_call, gone = (call_cli("my.Tcp", dirs=dirs), call_cli("my.Stale", dirs=dirs),
                             call_cli("my.Gone", dirs=dirs))
    assert tcp.returncode == 125 and b"Connection refused" in tcp.stderr, tcp.stderr
    assert stale_call.returncode == 125 and b"Connection refused" in stale_call.stderr, stale_call.stderr
    assert gone.returncode == 127 and b"not found" in gone.stderr, gone.stderr
    # The argument-taking forms refuse at call time what qrexec refuses (find_qrexec_service).
    root2 = apply_text(tmp_path / "2", forward("my.Port", "tcp:127.0.0.1"))
    assert call_cli("my.Port", dirs=RpcDirs.under(root2)).returncode == 125
    assert b"invalid port '022'" in call_cli("my.Port+022", dirs=RpcDirs.under(root2)).stderr


def test_apply_owns_forward_links_like_service_links(tmp_path: Path) -> None:
    """Same rules as for services: idempotent, stale links removed, a foreign file a conflict."""
    path = tmp_path / "m.yaml"
    root = tmp_path / "root"
    path.write_text(forward("my.A", "tcp:127.0.0.1:22") + '  my.B:\n    target: "unix:/run/b.sock"\n')
    apply(path, root, check=True)
    before = tree_digest(root)
    again = apply(path, root, check=True)
    assert "up to date" in again.stdout and tree_digest(root) == before
    path.write_text(forward("my.A", "tcp:127.0.0.1:2222"))
    result = apply(path, root, check=True)
    assert "update    /etc/qubes-rpc/my.A -> /dev/tcp/127.0.0.1/2222" in result.stdout
    assert "remove    /etc/qubes-rpc/my.B" in result.stdout and "remove    /etc/qubes/rpc-config/my.B" in result.stdout
    assert not (root / "etc/qubes-rpc/my.B").is_symlink()
    (root / "etc/qubes-rpc/my.C").write_text("#!/bin/sh\n")
    path.write_text(forward("my.C", "tcp:127.0.0.1:22"))
    before = tree_digest(root)
    result = apply(path, root)
    assert result.returncode == 1 and "conflict  /etc/qubes-rpc/my.C" in result.stdout
    assert tree_digest(root) == before


#: A handler service NAME+x beside a forward NAME (its options may follow).
BESIDE_A_FORWARD = """\
version: 1
daemons:
  d:
    services:
      my.Svc+x:
        handler: qubes_socksvc.examples:echo
forwards:
  my.Svc:
    target: tcp:127.0.0.1:22
"""


def test_forwards_take_part_in_the_effective_rpc_config(tmp_path: Path) -> None:
    """A forward is a declared key like a service: a handler service NAME+x under a
    forward NAME (skip-service-descriptor=true) gets an explicit config, or qrexec would
    send it the caller's raw stdin as a descriptor (libqrexec/exec.c: load_service_config_raw);
    a foreign NAME+ARG config that changes a forward's calls is a conflict."""
    root = apply_text(tmp_path, BESIDE_A_FORWARD)
    pinned = (root / "etc/qubes/rpc-config/my.Svc+x").read_text()
    assert "skip-service-descriptor=false" in pinned
    (root / "etc/qubes/rpc-config/my.Svc+y").write_text("wait-for-session=true\n")
    path = tmp_path / "m.yaml"
    result = run_cli("check", "-c", str(path), "--root", str(root))
    assert result.returncode == 1
    assert "calls of my.Svc+y reach my.Svc but take the rpc-config /etc/qubes/rpc-config/my.Svc+y" in result.stderr
    # A foreign file that qrexec finds first for a forward's calls: a warning (the shadow report).
    (root / "run/qubes-rpc").mkdir(parents=True)
    (root / "etc/qubes/rpc-config/my.Svc+y").unlink()
    (root / "run/qubes-rpc/my.Svc").symlink_to("/dev/tcp/127.0.0.1/23")
    result = run_cli("check", "-c", str(path), "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert ("calls of my.Svc (and my.Svc+) reach /run/qubes-rpc/my.Svc (a TCP service), which qrexec finds first"
            in result.stderr)


def test_a_pin_under_a_forward_changes_only_what_reads_the_descriptor(tmp_path: Path) -> None:
    """A forward NAME with wait_for_session: true: a handler service NAME+x beside it takes what
    it declares (the descriptor sent, no wait for a session), not the forward's keys, and apply
    does not refuse it; a foreign link NAME+z to the daemon's socket gets a pin that makes qrexec
    send the descriptor and keeps every other key qrexec applied to it from NAME's config
    (libqrexec/exec.c: load_service_config_raw takes NAME+z's file before NAME's)."""
    (tmp_path / "root/etc/qubes-rpc").mkdir(parents=True)
    (tmp_path / "root/etc/qubes-rpc/my.Svc+z").symlink_to("/run/qubes/socksvc-d.sock")
    root = apply_text(tmp_path, BESIDE_A_FORWARD + "    wait_for_session: true\n")
    assert qrexec_view.config(root, "my.Svc+y") == ("/etc/qubes/rpc-config/my.Svc",
                                                   {"wait-for-session": True, "skip-service-descriptor": True})
    assert qrexec_view.config(root, "my.Svc+x") == ("/etc/qubes/rpc-config/my.Svc+x",
                                                   {"wait-for-session": False, "skip-service-descriptor": False})
    assert qrexec_view.config(root, "my.Svc+z") == ("/etc/qubes/rpc-config/my.Svc+z",
                                                   {"wait-for-session": True, "skip-service-descriptor": False})


# --- list: reachability without connecting --------------------------------------------------


def test_list_shows_reachability_without_connecting(tmp_path: Path, tcp_server: Server,
                                                    unix_server: tuple[Server, str]) -> None:
    """From /proc/net/unix and /proc/net/tcp{,6} (LISTEN) only: a connection could
    socket-activate what the forward points at."""
    port = tcp_server.sock.getsockname()[1]
    userver, upath = unix_server
    free = socket.create_server(("127.0.0.1", 0))
    free_port = free.getsockname()[1]
    free.close()
    path = tmp_path / "m.yaml"
    path.write_text(f"""\
version: 1
forwards:
  my.Up:
    target: tcp:127.0.0.1:{port}
  my.Down:
    target: tcp:127.0.0.1:{free_port}
  my.Port+{port}:
    target: tcp:127.0.0.1
  my.Ports:
    target: tcp:127.0.0.1
  my.Any:
    target: "tcp:"
  my.Unix:
    target: unix:{upath}
  my.NoUnix:
    target: unix:{upath}.gone
""")
    out = run_cli("list", "-c", str(path), "--root", str(tmp_path / "root"), check=True).stdout
    assert f"forward my.Up -> tcp:127.0.0.1:{port}: listening\n" in out
    assert f"forward my.Down -> tcp:127.0.0.1:{free_port}: not listening (nothing on 127.0.0.1 port {free_port})" in out
    assert f"forward my.Port+{port} -> tcp:127.0.0.1: listening\n" in out
    ports_line = next(line for line in out.splitlines() if line.startswith("forward my.Ports "))
    assert "the port comes from each call's argument; listening on 127.0.0.1:" in ports_line
    assert str(port) in ports_line.rpartition(":")[2].split(", ")
    assert "forward my.Any -> tcp:: host and port come from each call's argument" in out
    assert f"forward my.Unix -> unix:{upath}: listening\n" in out
    assert f"forward my.NoUnix -> unix:{upath}.gone: not listening" in out
    assert "link /etc/qubes-rpc/my.Up: missing" in out
    assert (tcp_server.connections, userver.connections) == (0, 0)  # looked, never connected


def test_tcp_listeners_are_read_from_proc() -> None:
    """/proc/net/tcp6 wildcards serve IPv4 too (dual-stack); an exact address only itself."""
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        v6.bind(("::", 0))
    except OSError:
        pytest.skip("no IPv6 here")
    v6.listen(1)
    with v6:
        port = v6.getsockname()[1]
        fwd = model.Forward("my.F", f"tcp:127.0.0.1:{port}")
        assert status.forward_state(fwd, NO_UNIX, status.listening_tcp()) == "listening"
        fwd6 = model.Forward("my.F", f"tcp:[::1]:{port}")
        assert status.forward_state(fwd6, NO_UNIX, status.listening_tcp()) == "listening"
    assert status.forward_state(fwd, NO_UNIX, status.listening_tcp()).startswith("not listening")


def test_ipv6_forward_calls_through_its_link(tmp_path: Path) -> None:
    try:
        server = Server(socket.create_server(("::1", 0), family=socket.AF_INET6))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        port = server.sock.getsockname()[1]
        root = apply_text(tmp_path, forward("my.V6", f"tcp:[::1]:{port}") + '  my.Any6:\n    target: "tcp:"\n')
        dirs = RpcDirs.under(root)
        assert call_cli("my.V6", dirs=dirs, data=b"six").stdout == b"six"
        assert call_cli(f"my.Any6+++1+{port}", dirs=dirs, data=b"six too").stdout == b"six too"  # "+" stands for ":"
    finally:
        server.close()


def test_tcp_rules_are_qrexecs() -> None:
    """libqrexec/exec.c: find_qrexec_service (TCP branch), validate_port."""
    assert qrexec.tcp_address("/dev/tcp/10.0.0.1/22", None) == ("10.0.0.1", "22")
    assert qrexec.tcp_address("/dev/tcp/10.0.0.1/22", "") == ("10.0.0.1", "22")
    assert qrexec.tcp_address("/dev/tcp/10.0.0.1", "22") == ("10.0.0.1", "22")
    assert qrexec.tcp_address("/dev/tcp", "fe80++1+22") == ("fe80::1", "22")  # split at the last +
    with pytest.raises(ValueError, match="invalid port ''"):
        qrexec.tcp_address("/dev/tcp/10.0.0.1/", None)  # "/dev/tcp/HOST/": an empty port, not none
    ports = ("1", "65535", "65536", "0", "01", "\uff11", "22 ", "")  # \uff11: a digit to isdigit(), not to C
    assert [p for p in ports if qrexec.valid_port(p)] == ["1", "65535"]


@pytest.mark.parametrize(("host", "accepted"), [
    ("fe80::1%eth0", True), ("fe80::1%" + "e" * 15, True), ("fe80::1%" + "e" * 16, False),
    ("fe80::1%eth0\n", False), ("fe80::1%", False), ("10.0.0.1%eth0", False),
])
def test_an_ipv6_scope_is_an_interface_name(host: str, accepted: bool) -> None:
    """libqrexec/exec.c: qubes_tcp_connect hands HOST to getaddrinfo; a %scope is an interface name
    (at most IFNAMSIZ - 1 = 15 characters) on an IPv6 address, with nothing after it."""
    assert qrexec.is_numeric_host(host) == accepted
