# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qubes_socksvc.client against a real daemon, through the stand-in qrexec tools in tests/standin.

The real qrexec-client-vm needs dom0 and another qube.  tests/standin/qrexec-client-vm
plays dom0's policy (the README's policy lines, verbatim), the target qube's qubes-rpc
directory, and its agent (`qubes-socksvc call`), with qrexec's exit codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qubes_socksvc import client, examples_notes
from tests.conftest import REPO, TESTS, RunningDaemon, fields_of, world_dir

STANDIN = TESTS / "standin"
TARGET = "notes"  # the one other qube of the stand-in's world


def readme_policy() -> str:
    """The dom0 policy lines the README gives for the worked example."""
    lines = re.findall(r"^my\.Notes\s.*$", (REPO / "README.md").read_text(), re.MULTILINE)
    assert len(lines) >= 2, "README.md lost the worked example's policy lines"
    return "\n".join(lines) + "\n"


@dataclass
class World:
    base: Path
    rpc_dir: Path
    daemon: RunningDaemon
    notes_dir: Path


def path_with(*dirs: Path) -> str:
    """PATH with only these tool directories, and this interpreter for the stand-in's shebang."""
    return os.pathsep.join([*map(str, dirs), os.path.dirname(sys.executable), "/usr/bin", "/bin"])


@pytest.fixture
def world(daemon: RunningDaemon, start_daemon: type[RunningDaemon], monkeypatch: pytest.MonkeyPatch) -> World:
    base = world_dir("socksvc-client-")
    rpc_dir, config_dir, notes_dir = base / "qubes-rpc", base / "rpc-config", base / "notes-data"
    for d in (rpc_dir, config_dir, notes_dir):
        d.mkdir()
    notes_dir.chmod(0o777)
    notes = start_daemon((REPO / "examples/notes.yaml").read_text(), "notes",
                         extra_env={"QUBES_SOCKSVC_NOTES_DIR": str(notes_dir)})
    (rpc_dir / "my.Notes").symlink_to(notes.socket())
    for name in ("test.Echo", "test.Fields", "test.Slow", "test.Huge"):
        (rpc_dir / name).symlink_to(daemon.socket())
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(base / "dead.sock"))  # bound, never listening: a daemon that died
    dead.close()
    (rpc_dir / "test.Dead").symlink_to(base / "dead.sock")
    policy = base / "30-user.policy"
    policy.write_text(readme_policy() + "test.Fields * work @default allow target=notes\n"
                      "* * work notes allow\n")
    monkeypatch.setenv("PATH", path_with(STANDIN))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{TESTS}")
    monkeypatch.setenv("SOCKSVC_STANDIN_TARGET", TARGET)
    monkeypatch.setenv("SOCKSVC_STANDIN_SOURCE", "work")
    monkeypatch.setenv("SOCKSVC_STANDIN_POLICY", str(policy))
    monkeypatch.setenv("SOCKSVC_STANDIN_RPC_DIR", str(rpc_dir))
    monkeypatch.setenv("SOCKSVC_STANDIN_RPC_CONFIG_DIR", str(config_dir))
    return World(base, rpc_dir, daemon, notes_dir)


@pytest.fixture
def in_dom0(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    """Only qrexec-client on PATH, as in dom0."""
    tools = world.base / "dom0-bin"
    tools.mkdir()
    (tools / "qrexec-client").symlink_to(STANDIN / "qrexec-client-vm")
    monkeypatch.setenv("PATH", path_with(tools))
    return world


# --- the command line ----------------------------------------------------------------


def test_command_in_a_vm_and_in_dom0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(STANDIN))
    assert client.command("notes", "my.Notes+list") == [str(STANDIN / "qrexec-client-vm"), "notes", "my.Notes+list"]
    assert client.command("", "my.Notes")[1:] == ["", "my.Notes"]  # "": the policy's default target
    assert client.command("@dispvm:web", "my.Notes")[1] == "@dispvm:web"
    assert client.command("@dispvm:" + "t" * 55, "my.Notes")[1] == "@dispvm:" + "t" * 55  # 63: the most
    (tmp_path / "qrexec-client").symlink_to(STANDIN / "qrexec-client-vm")
    monkeypatch.setenv("PATH", str(tmp_path))
    # qubesadmin/app.py QubesLocal.run_service
    assert client.command("notes", "my.Notes+list") == [
        str(tmp_path / "qrexec-client"), "-d", "notes", "DEFAULT:QUBESRPC my.Notes+list dom0"]
    with pytest.raises(ValueError, match="name the qube"):
        client.command("@dispvm", "my.Notes")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="qrexec-client-vm"):
        client.command("notes", "my.Notes")


@pytest.mark.parametrize(("target", "service"), [
    ("notes", "my Notes"), ("notes", "my.Notes+a b"), ("notes", ""), ("-rf", "my.Notes"), ("a b", "my.Notes"),
    ("@dispvm:" + "t" * 56, "my.Notes"),  # 64 characters: qrexec-client-vm would cut it to 63
])
def test_command_refuses_what_qrexec_would(target: str, service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(STANDIN))
    with pytest.raises(ValueError):
        client.command(target, service)


# --- calls ---------------------------------------------------------------------------


def test_call_round_trip(world: World) -> None:
    assert client.call(TARGET, "test.Echo", b"hello from work") == b"hello from work"
    # no input: the service's stdin ends at once (an echo reads to EOF, so it answers)
    assert client.call(TARGET, "test.Echo", timeout=20) == b""


def test_calls_from_a_vm_always_carry_a_plus(world: World) -> None:
    """daemon/qrexec-daemon.c handle_execute_service appends '+' when the service has none."""
    out = fields_of(client.call(TARGET, "test.Fields"))
    assert (out["service"], out["argument"], out["source"]) == ("test.Fields+", "''", "'work'")
    assert fields_of(client.call(TARGET, "test.Fields+x"))["argument"] == "'x'"


def test_calls_from_dom0_arrive_as_called(in_dom0: World) -> None:
    out = fields_of(client.call(TARGET, "test.Fields"))
    assert (out["service"], out["argument"], out["source"]) == ("test.Fields", "None", "'dom0'")


def test_default_target_is_the_policys(world: World) -> None:
    assert fields_of(client.call("", "test.Fields"))["service"] == "test.Fields+"


# --- failures: one exception type, qrexec's exit codes --------------------------------


def test_refused_by_policy_is_126(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOCKSVC_STANDIN_SOURCE", "personal")
    with pytest.raises(client.QrexecError) as error:
        client.call(TARGET, "my.Notes+add", b'{"text": "x"}')
    assert error.value.exit_code == 126 and error.value.service == "my.Notes+add"
    assert "refused by dom0's qrexec policy" in str(error.value) and "Request refused" in error.value.stderr
    with pytest.raises(client.QrexecError, match="exit code 126"):
        client.call("elsewhere", "test.Echo")  # no such qube: refused too


def test_service_not_found_is_127(world: World) -> None:
    with pytest.raises(client.QrexecError) as error:
        client.call(TARGET, "test.Nothing")
    assert error.value.exit_code == 127 and "service not found" in error.value.meaning


def test_socket_without_listener_is_125(world: World) -> None:
    with pytest.raises(client.QrexecError) as error:
        client.call(TARGET, "test.Dead")
    assert error.value.exit_code == 125 and "nobody listens" in error.value.meaning


def test_dom0_target_not_running_is_125(in_dom0: World) -> None:
    with pytest.raises(client.QrexecError, match="exit code 125"):
        client.call("stopped", "test.Echo")


def test_meanings_of_other_exit_codes() -> None:
    def meaning(exit_code: int) -> str:
        return client.QrexecError("q", "s", exit_code).meaning

    # subprocess's negative code: the client itself was killed
    assert "SIGKILL" in meaning(-9) and meaning(-1) == "the call was terminated by SIGHUP"
    # qrexec-client-vm(1), EXIT STATUS: 128+signal; 128 itself is no signal
    assert "SIGTERM" in meaning(128 + 15) and meaning(128 + 1) == "the call was terminated by SIGHUP"
    assert meaning(128 + 40) == "the call was terminated by signal 40"  # a real-time signal has no name
    assert "the service itself" in meaning(3) and "the service itself" in meaning(128)
    assert "invalid arguments" in meaning(2)
    assert "failed locally" in meaning(1)  # qrexec-client-vm.c main: exit(1)


def test_a_qrexec_error_keeps_what_a_caller_catching_it_reads() -> None:
    """QrexecError's documented attributes hold the call's target, service, exit code and the
    stderr as it came; its message adds the stderr only when there is some."""
    error = client.QrexecError("work", "my.Service+x", 125, "no such service\n")
    assert (error.target, error.service, error.exit_code, error.stderr, error.by_service) == \
        ("work", "my.Service+x", 125, "no such service\n", False)
    assert str(error).endswith(": no such service")
    assert client.printable("café, 中文, a\\b") == "café, 中文, a\\b"  # printable text stays as it is
    bare = client.QrexecError("work", "my.Service+x", 125, " \n")
    assert str(bare).endswith(client.EXIT_MEANINGS[125]) and "my.Service+x" in str(bare) and "work" in str(bare)


@pytest.mark.parametrize("how", ["call", "stream", "async_call"])
def test_timeout_kills_the_call(world: World, how: str) -> None:
    """The call is killed at its timeout, not left to finish (test.Slow+30 answers after 30 s)."""
    async def streamed() -> None:
        async for _ in client.stream(TARGET, "test.Slow+30", timeout=0.5):
            pass

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"call of test.Slow\+30 in notes took longer than 0.5s; it was killed"):
        if how == "call":
            client.call(TARGET, "test.Slow+30", timeout=0.5)
        elif how == "stream":
            asyncio.run(streamed())
        else:
            asyncio.run(client.async_call(TARGET, "test.Slow+30", timeout=0.5))
    assert time.monotonic() - started < 15


def test_an_error_in_the_callers_own_code_kills_the_call(world: World) -> None:
    """Anything raised while the call runs (here input that is no bytes; Ctrl-C alike) kills the
    qrexec client and is raised as it is: the call is not left to finish (test.Slow+30 answers
    after 30 s)."""
    started = time.monotonic()
    with pytest.raises(TypeError, match="memoryview"):
        client.call(TARGET, "test.Slow+30", "text, not bytes")  # type: ignore[arg-type]
    assert time.monotonic() - started < 15


# --- streaming ----------------------------------------------------------------------


def test_stream_both_ways_with_bounded_memory(world: World) -> None:
    """32 MiB in from an async generator and back out through the daemon's echo; this process
    never holds more than a few chunks of it."""
    total, block = 32 << 20, os.urandom(1 << 16)

    async def source() -> AsyncIterator[bytes]:
        for _ in range(total // len(block)):
            yield block

    async def run() -> tuple[int, bytes]:
        digest, received = hashlib.sha256(), 0
        async for chunk in client.stream(TARGET, "test.Echo", source()):
            received += len(chunk)
            digest.update(chunk)
        return received, digest.digest()

    tracemalloc.start()
    try:
        received, digest = asyncio.run(run())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == total and digest == hashlib.sha256(block * (total // len(block))).digest()
    assert peak < 8 << 20, f"{peak} bytes allocated at once for {total} streamed"


def test_abandoning_a_stream_ends_the_call(world: World) -> None:
    async def run() -> int:
        calls = client.stream(TARGET, "test.Huge")  # 64 MiB of output, with backpressure
        first = await calls.__anext__()
        await calls.aclose()
        return len(first)

    assert asyncio.run(run()) > 0


def test_abandoning_an_endless_stream_kills_the_client(world: World) -> None:
    """aclose() on a call whose output never ends returns at once, and the qrexec client is gone."""
    daemons = children()

    async def run() -> set[int]:
        calls = client.stream(TARGET, "test.Huge+1000000")  # a terabyte, with backpressure
        assert await calls.__anext__()
        assert children() > daemons  # the qrexec client runs
        await asyncio.sleep(0.5)  # the output piles up until its pipe's reading is paused
        await asyncio.wait_for(calls.aclose(), 20)
        return children()

    assert asyncio.run(run()) == daemons


def children() -> set[int]:
    """This process's child processes (zombies too: a child not yet waited for)."""
    return {int(pid) for task in Path("/proc/self/task").iterdir()
            for pid in (task / "children").read_text().split()}


def test_async_call(world: World) -> None:
    assert asyncio.run(client.async_call(TARGET, "test.Echo", [b"a", b"b"])) == b"ab"


def test_stream_refused_raises_after_the_output(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOCKSVC_STANDIN_SOURCE", "personal")
    with pytest.raises(client.QrexecError) as error:
        asyncio.run(asyncio.wait_for(client.async_call(TARGET, "my.Notes+add", b'{"text": "x"}'), 20))
    assert error.value.exit_code == 126 and "Request refused" in error.value.stderr
    assert str(error.value).startswith("call of my.Notes+add in notes failed with exit code 126, refused by dom0's")
    with pytest.raises(client.QrexecError, match=r"^call of test\.Echo in the default target failed"):
        asyncio.run(asyncio.wait_for(client.async_call("", "test.Echo"), 20))


def test_the_callers_input_failing_fails_the_call(world: World) -> None:
    """An exception from the caller's own input ends the call and is raised as it is."""
    async def failing() -> AsyncIterator[bytes]:
        yield b"some"
        raise OSError("the input file went away")

    with pytest.raises(OSError, match="the input file went away"):
        asyncio.run(asyncio.wait_for(client.async_call(TARGET, "test.Echo", failing()), 20))


def test_a_service_that_answers_without_reading_its_input(world: World) -> None:
    """The call ends with the service's answer while the input still waits for more, and
    the input generator has been closed (its ``finally`` has run) when the call returns."""
    closed: list[bool] = []

    async def never_ends() -> AsyncIterator[bytes]:
        try:
            yield b"x"
            await asyncio.Event().wait()
        finally:
            closed.append(True)

    async def run() -> tuple[bytes, list[bool]]:
        async with asyncio.timeout(20):  # not wait_for: its task would give the generator a loop turn
            out = await client.async_call(TARGET, "test.Fields", never_ends())
        return out, list(closed)

    out, closed_when_returned = asyncio.run(run())
    assert fields_of(out)["service"] == "test.Fields+" and closed_when_returned == [True]


CHATTY_CLIENT = """#!/bin/sh
head -c 100000 /dev/zero | tr '\\0' e >&2
echo "the reason, last" >&2
exit 125
"""


@pytest.mark.parametrize("how", ["call", "stream"])
def test_error_keeps_the_last_8_kib_of_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """However much the qrexec client writes to stderr, the error keeps its end (where the
    reason is), 8 KiB of it, and the call holds no more of it in memory."""
    (tmp_path / "qrexec-client-vm").write_text(CHATTY_CLIENT)
    (tmp_path / "qrexec-client-vm").chmod(0o755)
    monkeypatch.setenv("PATH", path_with(tmp_path))
    with pytest.raises(client.QrexecError) as error:
        if how == "call":
            client.call(TARGET, "test.Echo")
        else:
            asyncio.run(asyncio.wait_for(client.async_call(TARGET, "test.Echo"), 20))
    assert error.value.exit_code == 125 and error.value.stderr.endswith("eethe reason, last\n")
    assert len(error.value.stderr) == 8192 and set(error.value.stderr[:-17]) == {"e"}


# --- the worked example, end to end ------------------------------------------------------


def test_notes_example_end_to_end(world: World, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """work adds and deletes, personal may only list: the README's policy, its client, its daemon."""
    assert examples_notes.add(TARGET, "buy milk") == 1
    assert examples_notes.main(["--target", TARGET, "add", "call Ann"]) == 0
    monkeypatch.setenv("SOCKSVC_STANDIN_SOURCE", "personal")
    assert [n["text"] for n in examples_notes.list_notes(TARGET)] == ["buy milk", "call Ann"]
    assert examples_notes.main(["--target", TARGET, "add", "not allowed"]) == 126
    assert "refused by dom0's qrexec policy" in capsys.readouterr().err
    with pytest.raises(client.QrexecError, match="exit code 126"):
        examples_notes.delete(TARGET, 1)
    # Even where a policy lets personal call +delete, the handler checks who added the note.
    (world.base / "30-user.policy").write_text("* * @anyvm notes allow\n")
    with pytest.raises(examples_notes.NotesError, match="only that qube may delete it"):
        examples_notes.delete(TARGET, 1)
    monkeypatch.setenv("SOCKSVC_STANDIN_SOURCE", "work")
    examples_notes.delete(TARGET, 1)
    assert examples_notes.main(["--target", TARGET, "list"]) == 0
    assert re.search(r"^   2  \S+Z  work +call Ann$", capsys.readouterr().out, re.MULTILINE)
    stored = json.loads((world.notes_dir / "notes.json").read_text())
    assert [n["id"] for n in stored] == [2]
