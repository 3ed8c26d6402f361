# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Bounded inputs (issue 10): the manifest, the ownership record and rpc-config files are read
only if they are regular files (a FIFO or device is refused at once, never blocks), and only
up to a size cap, with an error that names the file, the cap and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qubes_socksvc import files, lookup, manifest
from tests.conftest import REPO, apply, run_cli
from tests.test_manifest import GOOD

#: A FIFO nobody writes to: reading it the ordinary way blocks forever. Every test that
#: touches one runs in a subprocess with this timeout, so a regression fails instead of hanging.
HANG = 20


def in_subprocess(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=HANG,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_read_regular_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    result = in_subprocess("import sys\nfrom qubes_socksvc import files\n"
                           "try:\n    files.read_regular(sys.argv[1], 100, 'thing')\n"
                           "except files.FileRefused as e:\n    print(e)\n", str(fifo))
    assert result.stdout == f"{fifo}: the thing is a FIFO, not a regular file; name a regular file (nothing was read)\n"
    assert time.monotonic() - start < HANG / 2


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a character device"), ("/dev/null", "a character device"),
                                        ("/", "a directory")])
def test_read_regular_refuses_devices_and_directories(path: str, kind: str) -> None:
    with pytest.raises(files.FileRefused, match=f"^{path}: the thing is {kind}, not a regular file"):
        files.read_regular(path, 100, "thing")


def test_read_regular_reads_up_to_its_limit_and_not_a_byte_more(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    assert files.read_regular(str(path), 4096, "thing") == b"x" * 4096
    with pytest.raises(files.FileRefused) as caught:
        files.read_regular(str(path), 4095, "thing")
    assert str(caught.value) == (f"{path}: the thing is larger than 4095 bytes, the most qubes-socksvc reads; "
                                 "check that this is the right file, or make it smaller")
    with pytest.raises(files.FileRefused, match="cannot read thing: No such file or directory"):
        files.read_regular(str(tmp_path / "missing"), 10, "thing")


@pytest.mark.parametrize("verb", ["check", "apply", "list"])
def test_a_fifo_manifest_is_refused_at_once(tmp_path: Path, verb: str) -> None:
    fifo = tmp_path / "m.yaml"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "qubes_socksvc", verb, "-c", str(fifo), "--root",
                             str(tmp_path / "root")], capture_output=True, text=True, timeout=HANG,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert f"{fifo}: the manifest is a FIFO, not a regular file" in result.stderr
    assert not (tmp_path / "root").exists()


def test_a_huge_manifest_is_refused_quickly(tmp_path: Path) -> None:
    """Was: a 50 MB manifest took 55 s and 2.8 GB before its first error."""
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.write(GOOD.encode())
        f.truncate(50 << 20)
    start = time.monotonic()
    result = apply(big, tmp_path / "root")
    elapsed = time.monotonic() - start
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{big}: the manifest is larger than {manifest.MAX_MANIFEST_SIZE} bytes" in result.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (tmp_path / "root").exists()


def test_the_manifest_cap_is_one_mib_exactly(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    padding = manifest.MAX_MANIFEST_SIZE - len(GOOD.encode())
    path.write_bytes(GOOD.encode() + b"#" * (padding - 1) + b"\n")
    assert os.path.getsize(path) == manifest.MAX_MANIFEST_SIZE
    assert run_cli("check", "-c", str(path)).returncode == 0
    path.write_bytes(GOOD.encode() + b"#" * padding + b"\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1 and f"{path}: the manifest is larger than 1048576 bytes" in result.stderr


def test_a_manifest_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(GOOD.encode() + b"# \xff\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1 and f"{path}: cannot read manifest: not UTF-8" in result.stderr


def test_read_config_keeps_qrexecs_125(tmp_path: Path) -> None:
    """An rpc-config qrexec would fail on fails the call (exit 125): now through files.read_regular."""
    big = tmp_path / "big"
    big.write_text("wait-for-session=true\n" + "#" * lookup.MAX_CONFIG_SIZE + "\n")
    with pytest.raises(lookup.LookupFailed, match=f"larger than {lookup.MAX_CONFIG_SIZE} bytes"):
        lookup.read_config(str(big))
    with pytest.raises(lookup.LookupFailed, match="a directory, not a regular file"):
        lookup.read_config(str(tmp_path))


def test_a_manifest_at_the_cap_is_checked_in_seconds(tmp_path: Path) -> None:
    """The cap bounds the time too: 1 MiB of services (about 16,800) took 371 s to check while
    effective.settle listed the rpc-config directories once per service; now about 2 s."""
    path = tmp_path / "m.yaml"
    with open(path, "w") as f:
        f.write("version: 1\ndaemons:\n")
        number = 0
        while f.tell() < manifest.MAX_MANIFEST_SIZE - 100:
            if number % 5000 == 0:  # a daemon's spec holds about 12,900 services at most
                f.write(f"  d{number // 5000}:\n    services:\n")
            f.write(f"      svc.N{number}:\n        handler: qubes_socksvc.examples:echo\n")
            number += 1
    start = time.monotonic()
    result = run_cli("check", "-c", str(path))
    elapsed = time.monotonic() - start
    assert result.returncode == 0 and f"{number} services" in result.stdout, result.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_read_regular_counts_what_it_reads_when_the_size_does_not_tell(tmp_path: Path) -> None:
    """A regular file whose stat() size is 0 but which has content (procfs; a file that grows
    while it is read looks the same): the bytes read are counted against the limit."""
    proc = "/proc/self/cmdline"
    content = Path(proc).read_bytes()
    assert os.stat(proc).st_size == 0 and len(content) > 2
    assert files.read_regular(proc, len(content), "thing") == content
    with pytest.raises(files.FileRefused, match=f"larger than {len(content) - 1} bytes"):
        files.read_regular(proc, len(content) - 1, "thing")


def test_read_regular_refuses_a_file_read_in_pieces_that_ends_past_the_cap() -> None:
    """procfs hands a multi-record file out a page of whole records per read (fs/seq_file.c:
    seq_read_iter): a read may end exactly at the cap with more to come.  Such a file is
    refused as larger than the cap, never taken whole at the cap's length."""
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        maps = f"/proc/{idle.pid}/maps"  # stable while the process waits on its stdin
        whole = b""
        while whole != (whole := Path(maps).read_bytes()):
            time.sleep(0.05)
        fd = os.open(maps, os.O_RDONLY)
        try:
            first = len(os.read(fd, len(whole) + 1))
        finally:
            os.close(fd)
        assert first < len(whole), "maps came in one read: nothing to test"
        with pytest.raises(files.FileRefused, match=f"larger than {first} bytes"):
            files.read_regular(maps, first, "thing")
        assert files.read_regular(maps, len(whole), "thing") == whole
    finally:
        idle.kill()
        idle.wait()


def test_read_regular_does_not_take_a_terminal_for_its_own() -> None:
    """A path naming a terminal is refused (not a regular file), and opening it (O_NOCTTY) does
    not make it the controlling terminal of a process that has none (a daemon, a CLI started by
    a unit): else that terminal's hang-up would be the process's SIGHUP (tty_ioctl(4))."""
    master, slave = os.openpty()
    try:
        code = (
            "import os, sys\n"
            "from qubes_socksvc import files\n"
            "os.setsid()\n"  # a session of its own: no controlling terminal
            "try:\n"
            "    files.read_regular(sys.argv[1], 100, 'thing')\n"
            "except files.FileRefused as e:\n"
            "    print(e)\n"
            "try:\n"
            "    os.close(os.open('/dev/tty', os.O_RDONLY))\n"
            "    print('took it as its terminal')\n"
            "except OSError:\n"
            "    print('no terminal')\n")
        result = in_subprocess(code, os.ttyname(slave))
    finally:
        os.close(master)
        os.close(slave)
    assert result.stdout.splitlines()[1:] == ["no terminal"], result
    assert "is a character device, not a regular file" in result.stdout, result


def test_read_regular_leaves_no_descriptor_open() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        files.read_regular("/proc/self/cmdline", 1 << 20, "thing")
        with pytest.raises(files.FileRefused):
            files.read_regular("/proc/self/cmdline", 1, "thing")
    assert len(os.listdir("/proc/self/fd")) == before


def test_read_regular_names_a_read_error() -> None:
    """/proc/self/mem is a regular file whose first page cannot be read (EIO)."""
    with pytest.raises(files.FileRefused, match="/proc/self/mem: cannot read thing: Input/output error"):
        files.read_regular("/proc/self/mem", 100, "thing")
