# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""`qubes-socksvc call`: resolves like qrexec, sends the descriptor, streams both ways."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qubes_socksvc import agent
from tests.conftest import REPO, TESTS, RunningDaemon, run_cli, world_dir


@pytest.fixture
def rpc_dirs(daemon: RunningDaemon) -> tuple[Path, Path, Path]:
    """Two qubes-rpc directories (searched in order) and an rpc-config dir, linking to the daemon."""
    base = world_dir("socksvc-rpc-")
    first, second, config = base / "run-qubes-rpc", base / "etc-qubes-rpc", base / "rpc-config"
    for d in (first, second, config):
        d.mkdir()
    (second / "test.Echo").symlink_to(daemon.socket())
    (second / "test.Fields").symlink_to(daemon.socket())
    (first / "test.Fields+special").symlink_to(daemon.socket())
    (second / "test.Raw").symlink_to(daemon.socket("socksvc-test.Raw.sock"))
    (config / "test.Raw").write_text("skip-service-descriptor=true\n")
    (second / "test.Gone").symlink_to(base / "no-such.sock")
    (second / "test.Exec").write_text("#!/bin/sh\n")
    return first, second, config


def call(dirs: tuple[Path, Path, Path], *args: str, data: bytes = b"") -> tuple[int, str, str]:
    first, second, config = dirs
    result = run_cli("call", *args, "--rpc-dir", str(first), "--rpc-dir", str(second),
                     "--rpc-config-dir", str(config), input=data)
    return result.returncode, result.stdout, result.stderr


def test_call_streams_stdin_and_stdout(rpc_dirs: tuple[Path, Path, Path]) -> None:
    assert call(rpc_dirs, "test.Echo", data=b"hello through the symlink") == (0, "hello through the symlink", "")


def test_call_resolves_name_plus_arg_then_name(rpc_dirs: tuple[Path, Path, Path]) -> None:
    code, out, _ = call(rpc_dirs, "test.Fields+other", "--source", "work")
    assert code == 0 and "service=test.Fields+other" in out and "source='work'" in out
    code, out, _ = call(rpc_dirs, "test.Fields+special")
    assert "argument=special" in out  # the NAME+ARG entry in the first directory


def test_call_sends_dom0_descriptor(rpc_dirs: tuple[Path, Path, Path]) -> None:
    code, out, _ = call(rpc_dirs, "test.Fields", "--dom0", "--target-type", "keyword", "--target", "@dispvm")
    assert code == 0 and "target_type='keyword'" in out and "target='dispvm'" in out


def test_call_honours_skip_service_descriptor(rpc_dirs: tuple[Path, Path, Path]) -> None:
    assert call(rpc_dirs, "test.Raw", data=b"raw bytes") == (0, "raw bytes", "")


def test_call_missing_service_exits_125(rpc_dirs: tuple[Path, Path, Path]) -> None:
    code, _, err = call(rpc_dirs, "test.Nothing")
    assert code == 125 and "service test.Nothing not found" in err


def test_call_dangling_symlink_is_skipped_like_qrexec(rpc_dirs: tuple[Path, Path, Path]) -> None:
    code, _, err = call(rpc_dirs, "test.Gone")
    assert code == 125 and "not found" in err


def test_call_executable_service_is_refused(rpc_dirs: tuple[Path, Path, Path]) -> None:
    code, _, err = call(rpc_dirs, "test.Exec")
    assert code == 125 and "is an executable service" in err


def test_call_socket_without_listener_exits_125(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # bound, never listening: like a daemon that died
    result = run_cli("call", "x.Y", "--socket", str(path))
    assert result.returncode == 125 and "cannot connect" in result.stderr


def test_call_rejects_invalid_names() -> None:
    result = run_cli("call", "../etc/passwd")
    assert result.returncode == 2 and "invalid service name" in result.stderr


def test_call_streams_large_input_both_ways(rpc_dirs: tuple[Path, Path, Path]) -> None:
    data = os.urandom(8 << 20)
    second = rpc_dirs[1]
    result = subprocess.run(
        [sys.executable, "-m", "qubes_socksvc", "call", "test.Echo", "--rpc-dir", str(second)],
        input=data, capture_output=True, env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"}, timeout=60)
    assert result.returncode == 0 and hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_invalid_rpc_config_fails_like_qrexec(tmp_path: Path) -> None:
    (tmp_path / "x.Y").write_text(" wait-for-session=true\n")
    with pytest.raises(agent.CallError, match="invalid rpc-config"):
        agent.skips_descriptor("x.Y", (str(tmp_path),))


def test_call_with_no_standard_input_at_all(rpc_dirs: tuple[Path, Path, Path]) -> None:
    """Started with fd 0 closed (as by some service managers): an empty input, not a crash."""
    result = subprocess.run(
        [sys.executable, "-m", "qubes_socksvc", "call", "test.Fields", "--rpc-dir", str(rpc_dirs[1])],
        preexec_fn=lambda: os.close(0), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}"})
    assert result.returncode == 0, result.stderr
    assert "service=test.Fields" in result.stdout
