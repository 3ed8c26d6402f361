# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``list``'s "listening": from the kernel's sock_diag (exact names with their length,
net/unix/diag.c: sk_diag_dump_name), never from /proc/net/unix's text, which prints a name
raw (net/unix/af_unix.c: unix_seq_show, ``seq_putc`` per byte): a name holding a newline
forges whole records there.  Every socket here lives in a fresh directory of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_socksvc import status, unixdiag
from tests.conftest import run_cli


@pytest.fixture
def short_dir() -> Iterator[bytes]:
    """A fresh directory with a short name: a whole forged record must fit in sun_path (108 bytes)."""
    path = tempfile.mkdtemp(prefix="l", dir="/tmp").encode()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def bound(path: bytes, listen: bool = True, kind: int = socket.SOCK_STREAM) -> Iterator[socket.socket]:
    os.makedirs(os.path.dirname(path), exist_ok=True)  # a forged record's slashes make directories
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.bind(path)
        if listen:
            sock.listen()
        yield sock


def dead_socket(path: bytes) -> bytes:
    """A socket file nobody listens on any more (bound, closed, not unlinked): what a crashed
    forward target leaves behind."""
    with bound(path):
        pass
    assert os.path.exists(path)
    return path


def forged_record(claimed: bytes) -> bytes:
    """A /proc/net/unix record (unix_seq_show's ``%pK: %08X %08X %08X %04X %02X %5lu NAME``)
    of a SOCK_STREAM socket with __SO_ACCEPTCON set: "listening at ``claimed``"."""
    return b"0: 00000002 00000000 00010000 0001 01 1 " + claimed


def old_proc_net_unix_parse() -> set[str]:
    """What list trusted before: the 8th field of every line whose St field is 01."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f)
        return {fields[7] for fields in map(str.split, f) if len(fields) >= 8 and fields[5] == "01"}


def test_a_forged_record_does_not_make_a_dead_socket_listen(short_dir: bytes) -> None:
    """A server bound at ``DIR/e\\n<record claiming DIR/d>`` adds a well-formed line to
    /proc/net/unix naming the dead ``DIR/d``: list must still call ``DIR/d`` not listening."""
    dead = dead_socket(short_dir + b"/d")
    with bound(short_dir + b"/e\n" + forged_record(dead)):
        text = Path("/proc/net/unix").read_bytes()
        assert b"\n" + forged_record(dead) + b"\n" in text  # the forgery is there, a line of its own
        assert dead.decode() in old_proc_net_unix_parse()  # and fooled the text parser
        assert dead.decode() not in status.listening_paths()
        assert status.unix_listeners().state(dead.decode()) == "not listening"


def test_sock_diag_gives_the_exact_name(short_dir: bytes) -> None:
    """unixdiag.listeners: UNIX_DIAG_NAME's bytes with their length, the NUL the kernel keeps
    (net/unix/af_unix.c: unix_mkname_bsd) cut; the newline is part of the name, not a record end."""
    name = short_dir + b"/e\n" + forged_record(short_dir + b"/d")
    with bound(name):
        names = [listener.name for listener in unixdiag.listeners() if listener.name.startswith(short_dir)]
        assert names == [name]
        assert os.fsdecode(name) in status.listening_paths()  # a real listener, whatever its name


def test_a_listening_socket_is_seen_a_bound_one_is_not(short_dir: bytes) -> None:
    """Only TCP_LISTEN counts (unix_diag_req.udiag_states = 1 << TCP_LISTEN); a socket bound
    but not listening refuses qrexec's connect (ECONNREFUSED), so it is not listening."""
    with bound(short_dir + b"/up"), bound(short_dir + b"/bound", listen=False):
        listeners = status.unix_listeners()
        assert f"{short_dir.decode()}/up" in status.listening_paths()
        assert listeners.state(f"{short_dir.decode()}/up") == "listening"
        assert f"{short_dir.decode()}/bound" not in status.listening_paths()
        assert listeners.state(f"{short_dir.decode()}/bound") == "not listening"
        assert listeners.state(f"{short_dir.decode()}/absent") == "not listening"


def test_a_seqpacket_listener_is_no_server_for_qrexec(short_dir: bytes) -> None:
    """libqrexec/exec.c: find_qrexec_service connects with SOCK_STREAM: a SOCK_SEQPACKET
    listener at the path would fail the call (EPROTOTYPE)."""
    with bound(short_dir + b"/seq", kind=socket.SOCK_SEQPACKET):
        assert f"{short_dir.decode()}/seq" not in status.listening_paths()
        assert status.unix_listeners().state(f"{short_dir.decode()}/seq") == "not listening"


@pytest.mark.parametrize("basename", [b"a b.sock", b" lead and trail ", b"caf\xe9\xff.sock", b"tab\there", b"@at"],
                         ids=["space", "edge-spaces", "not-utf8", "tab", "at"])
def test_names_with_spaces_and_bytes_that_are_not_utf8(short_dir: bytes, basename: bytes) -> None:
    """The name is compared as bytes (os.fsdecode, as Python spells such a path), not as text."""
    path = os.fsdecode(short_dir + b"/" + basename)
    with bound(short_dir + b"/" + basename):
        assert path in status.listening_paths()
        assert status.unix_listeners().state(path) == "listening"
    assert path not in status.listening_paths()


def test_a_stale_name_is_not_listening(short_dir: bytes) -> None:
    """The kernel keeps the name a socket was bound at after its file is gone: the name counts
    only while the file there is the one it bound (UNIX_DIAG_VFS: st_dev, st_ino).  Here the
    listener's file was unlinked and a dead socket file took its place: a connect there fails."""
    path = short_dir + b"/moved"
    with bound(path):
        os.unlink(path)
        dead_socket(path)
        assert path in [listener.name for listener in unixdiag.listeners()]  # the name lives on
        assert path.decode() not in status.listening_paths()
        assert status.unix_listeners().state(path.decode()) == "not listening"


def test_another_spelling_of_a_listening_path_is_judged_by_its_inode(short_dir: bytes) -> None:
    """UnixListeners.state stats the path: a symlinked directory reaches the same socket file."""
    os.symlink(short_dir, short_dir + b"-link")
    try:
        with bound(short_dir + b"/s"):
            assert status.unix_listeners().state(f"{short_dir.decode()}-link/s") == "listening"
    finally:
        os.unlink(short_dir + b"-link")


def test_without_sock_diag_no_claim_is_trusted(short_dir: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without sock_diag only /proc/net/unix is left, and no rule on its text tells a forged
    record from a real one: a claimed path is "unknown", never "listening"; a path no line
    claims is "not listening" (a real record is always a whole line of its own)."""

    def unavailable(sequence: int = 1) -> list[unixdiag.Listener]:
        raise unixdiag.UnixDiagUnavailable("no CONFIG_UNIX_DIAG")

    monkeypatch.setattr(unixdiag, "listeners", unavailable)
    dead = dead_socket(short_dir + b"/d")
    with bound(short_dir + b"/e\n" + forged_record(dead)), bound(short_dir + b"/up"):
        listeners = status.unix_listeners()
        assert status.listening_paths() == set()
        assert listeners.state(dead.decode()) == "unknown"
        assert listeners.state(f"{short_dir.decode()}/up") == "unknown"
        assert listeners.state(f"{short_dir.decode()}/absent") == "not listening"


def test_without_any_source_nothing_is_not_listening(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither sock_diag nor /proc/net/unix: every path is "unknown"."""

    def unavailable(sequence: int = 1) -> list[unixdiag.Listener]:
        raise unixdiag.UnixDiagUnavailable("no CONFIG_UNIX_DIAG")

    monkeypatch.setattr(unixdiag, "listeners", unavailable)
    monkeypatch.setattr(status, "_proc_net_unix_claims", lambda: None)
    assert status.unix_listeners().state("/run/qubes/anything.sock") == "unknown"


def test_an_error_from_the_kernel_is_unavailable() -> None:
    """NLMSG_ERROR (here: a sequence the parser is told to expect) raises, it is not an empty list."""
    error = b"\x24\x00\x00\x00\x02\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00" + b"\xfe\xff\xff\xff" + b"\x00" * 16
    with pytest.raises(unixdiag.UnixDiagUnavailable):
        unixdiag._parse(error, 7, [])


def test_list_shows_a_forged_forward_target_not_listening(tmp_path: Path) -> None:
    """End to end: ``list`` (status.report) judges a forward's Unix target with this check.  The
    directory is under /run, not /tmp: a forward target in a world-writable directory is refused."""
    base = tempfile.mkdtemp(prefix="l", dir="/run").encode()
    try:
        dead, up = dead_socket(base + b"/d"), base + b"/u"
        manifest = tmp_path / "m.yaml"
        manifest.write_text(f"version: 1\nforwards:\n  my.Dead:\n    target: unix:{dead.decode()}\n"
                            f"  my.Up:\n    target: unix:{up.decode()}\n")
        with bound(base + b"/e\n" + forged_record(dead)), bound(up):
            out = run_cli("list", "-c", str(manifest), "--root", str(tmp_path / "root")).stdout
        assert f"forward my.Dead -> unix:{dead.decode()}: not listening" in out, out
        assert f"forward my.Up -> unix:{up.decode()}: listening\n" in out, out
    finally:
        shutil.rmtree(base, ignore_errors=True)
