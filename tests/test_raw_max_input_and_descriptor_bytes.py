# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Two bounds nothing else held (issue 21), against a real daemon with real Unix sockets.

1. ``max_input`` binds a ``service_descriptor: false`` socket exactly as it binds the shared
   one: past it the call fails (Request._count raises InputTooLarge; Server logs "rejected")
   and a plain handler never runs, a streaming one never sees a byte past the bound.
2. ``@`` and ``:`` (and other bytes qrexec strips) are refused in a descriptor's NAME, argument
   and source before any handler runs, yet ``@`` and ``:`` are valid in dom0's target field:
   daemon/qrexec-daemon.c: sanitize_name(service, "+") and sanitize_name(target, "@:") (SPEC §1),
   libqrexec/exec.c: parse_qubes_rpc_command splits NAME from the argument at the first ``+``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from qubes_socksvc import descriptor, qrexec
from tests.conftest import RunningDaemon
from tests.test_hostile import handler_calls, read_until_closed, send_ignoring_reset, wait_for_log

MAX_INPUT = 1024

MANIFEST = f"""\
version: 1
daemons:
  g:
    idle_exit: 0
    services:
      g.RawPlain:
        handler: handlers:plain_pid
        service_descriptor: false
        max_input: {MAX_INPUT}
      g.RawStream:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
        max_input: {MAX_INPUT}
      g.Plain:
        handler: handlers:plain_pid
        max_input: {MAX_INPUT}
      g.Stream:
        handler: qubes_socksvc.examples:echo
        max_input: {MAX_INPUT}
      g.Fields:
        handler: handlers:fields
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    """One daemon for the module (as nobody, sockets in a fresh world-usable directory)."""
    running = RunningDaemon(MANIFEST, "g")
    yield running
    running.stop()


def call(daemon: RunningDaemon, service: str, data: bytes) -> bytes:
    """One call: on ``service``'s own socket (no descriptor) for g.Raw*, else on the shared one
    with a VM descriptor.  The daemon may abort while data is still going in: a reset is fine."""
    raw = service.startswith("g.Raw")
    path = daemon.socket(f"socksvc-{service}.sock") if raw else daemon.socket()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        send_ignoring_reset(sock, (b"" if raw else f"{service} work\0".encode()) + data)
        with contextlib.suppress(OSError):  # already reset by the daemon
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


# --- 1. max_input on a descriptor-less socket -----------------------------------------------

@pytest.mark.parametrize("service", ["g.RawPlain", "g.Plain"])
def test_a_plain_handler_gets_max_input_and_no_more(daemon: RunningDaemon, service: str) -> None:
    """handlers._threaded reads the whole input first (Request.read counts it): at the bound the
    handler runs with all of it; one byte more and it never runs, the caller gets nothing."""
    assert call(daemon, service, b"x" * MAX_INPUT).split()[1] == str(MAX_INPUT).encode()
    rejected = daemon.log_text().count(f"call {service} rejected: input exceeds max_input ({MAX_INPUT} bytes)")
    assert call(daemon, service, b"x" * (MAX_INPUT + 1)) == b""
    wait_for_log(daemon, f"call {service} rejected: input exceeds max_input ({MAX_INPUT} bytes)", rejected + 1)


@pytest.mark.parametrize("service", ["g.RawStream", "g.Stream"])
def test_a_streaming_handler_never_sees_a_byte_past_max_input(daemon: RunningDaemon, service: str) -> None:
    """Request._count raises InputTooLarge on the chunk that crosses the bound, before the handler
    gets it: echo gives back at most MAX_INPUT bytes of 64 KiB, and the call fails."""
    assert call(daemon, service, b"y" * MAX_INPUT) == b"y" * MAX_INPUT
    rejected = daemon.log_text().count(f"call {service} rejected: input exceeds max_input")
    echoed = call(daemon, service, b"y" * 65536)
    assert len(echoed) <= MAX_INPUT, f"{len(echoed)} bytes echoed past max_input {MAX_INPUT}"
    wait_for_log(daemon, f"call {service} rejected: input exceeds max_input ({MAX_INPUT} bytes)", rejected + 1)


# --- 2. "@" and ":" refused in NAME, argument and source; valid in a dom0 target ------------

#: Bytes sanitize_name never keeps in a NAME, an argument or a source (``@`` and ``:`` first: the
#: target keeps those two).  Space separates fields and NUL ends the descriptor, so neither is here.
FORBIDDEN = ["@", ":", "/", "!", "*", "%", ",", "=", "~", "#", "$", "'", "\\", "\t"]


def rejected_as(daemon: RunningDaemon, wire: bytes, reason: str) -> None:
    """The call gets nothing, no handler ran, and the daemon logged why it refused the descriptor."""
    before_calls, before_reason = handler_calls(daemon), daemon.log_text().count(f"rejected call: {reason}")
    assert daemon.call(wire, timeout=10) == b"", wire
    wait_for_log(daemon, f"rejected call: {reason}", before_reason + 1)
    time.sleep(0.05)
    assert handler_calls(daemon) == before_calls, f"a handler ran for {wire!r}"


@pytest.mark.parametrize("char", FORBIDDEN)
def test_the_daemon_refuses_a_forbidden_byte_in_name_argument_and_source(daemon: RunningDaemon, char: str) -> None:
    """sanitize_name(service, "+") keeps ``[A-Za-z0-9_.+-]`` only and parse_qubes_rpc_command cuts
    NAME at the first ``+``; a source is a qube name (sanitize_name with no extras).  In each field
    the byte is refused with that field's reason, before dispatch: not "not handled", not served."""
    c = char.encode()
    rejected_as(daemon, b"g.Fi" + c + b"elds work\0", "invalid service name or argument")          # NAME
    rejected_as(daemon, b"g.Fields" + c + b"+x work\0", "invalid service name or argument")        # NAME, then +
    rejected_as(daemon, b"g.Fields+a" + c + b"b work\0", "invalid service name or argument")       # argument
    rejected_as(daemon, b"g.Fields+" + c + b" work\0", "invalid service name or argument")         # argument alone
    rejected_as(daemon, b"g.Fields+ wo" + c + b"rk\0", "invalid source domain")                    # source
    rejected_as(daemon, b"g.Fields+x wo" + c + b"rk name dom0\0", "invalid source domain")         # dom0 source
    assert daemon.call(b"g.Fields+x work name dom0\0", timeout=10).startswith(b"service=g.Fields+x\n")  # still serving


@pytest.mark.parametrize(("target_type", "target"), [
    ("keyword", "dispvm:web"),                                   # @dispvm:web arrives without its @
    ("name", "uuid:01234567-89ab-cdef-0123-456789abcdef"),       # a uuid: target (41 characters)
    ("name", "@dispvm:web"),                                     # sanitize_name(target, "@:") keeps @
    ("keyword", "adminvm"),
])
def test_at_and_colon_are_valid_in_a_dom0_target(daemon: RunningDaemon, target_type: str, target: str) -> None:
    """daemon/qrexec-daemon.c: sanitize_name(target, "@:"): the target field keeps ``@`` and ``:``,
    and the handler receives it unchanged."""
    reply = daemon.call(f"g.Fields+x work {target_type} {target}\0".encode(), timeout=10)
    assert reply.endswith(f"target_type={target_type!r}\ntarget={target!r}\n".encode()), reply


@pytest.mark.parametrize("char", FORBIDDEN[2:])
def test_the_daemon_refuses_other_bytes_in_a_target(daemon: RunningDaemon, char: str) -> None:
    """Only ``@`` and ``:`` are the target's extras: sanitize_name(target, "@:")."""
    rejected_as(daemon, f"g.Fields+x work name dis{char}pvm\0".encode(), "invalid target")


# --- the patterns themselves (qubes_socksvc.qrexec) ------------------------------------------

@pytest.mark.parametrize("char", FORBIDDEN)
def test_qrexec_patterns_at_each_forbidden_byte(char: str) -> None:
    """NAME_RE, ARGUMENT_RE and SOURCE_RE refuse the byte anywhere; TARGET_RE takes ``@`` and ``:``
    only (daemon/qrexec-daemon.c: sanitize_name; libqrexec/exec.c: parse_qubes_rpc_command)."""
    for value in (char, f"a{char}", f"{char}a", f"a{char}b"):
        assert not qrexec.NAME_RE.match(value), value
        assert not qrexec.ARGUMENT_RE.match(value), value
        assert not qrexec.SOURCE_RE.match(value), value
        assert not qrexec.is_service(f"g.Fields+{value}") and not qrexec.is_service(f"g.{value}+x"), value
        assert not qrexec.is_source(value), value
        assert bool(qrexec.TARGET_RE.match(value)) is (char in "@:"), value
        assert qrexec.is_target(value) is (char in "@:"), value
        wire = f"g.Fields+{value} work".encode()
        with pytest.raises(descriptor.DescriptorError, match="invalid service name or argument"):
            descriptor.parse(wire)


def test_the_argument_keeps_plus() -> None:
    """The argument's one extra is ``+`` (qubes.ConnectTCP+fe80++1+22): the pattern is not just
    NAME_RE, and the NAME before the first ``+`` never holds one."""
    assert qrexec.ARGUMENT_RE.match("fe80++1+22") and qrexec.is_service("qubes.ConnectTCP+fe80++1+22")
    assert not qrexec.NAME_RE.match("a+b")


def test_more_bytes_than_qrexec_ever_sends_before_the_nul_are_cut_at_once(daemon: RunningDaemon) -> None:
    """qrexec sends at most MAX_QREXEC_CMD_LEN (65535) bytes before a descriptor's NUL
    (libqrexec/qrexec.h): a caller that has sent that many and no NUL may still be sending a
    descriptor and keeps its descriptor_timeout (10 s here); one byte more cannot be one, and
    the daemon cuts it at once, with the bound in the log."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waiting:
        waiting.connect(daemon.socket())
        waiting.sendall(b"a" * qrexec.MAX_DESCRIPTOR_LEN)
        waiting.settimeout(1.5)
        with pytest.raises(TimeoutError):  # neither answered nor cut: still reading the descriptor
            waiting.recv(1)
    before = daemon.log_text().count("rejected call: descriptor longer than 65535 bytes")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as too_long:
        too_long.connect(daemon.socket())
        started = time.monotonic()
        send_ignoring_reset(too_long, b"a" * (qrexec.MAX_DESCRIPTOR_LEN + 1))
        too_long.settimeout(5)
        assert read_until_closed(too_long) == b""
        assert time.monotonic() - started < 3, "cut only at the descriptor timeout, not at once"
    wait_for_log(daemon, "rejected call: descriptor longer than 65535 bytes", before + 1)
