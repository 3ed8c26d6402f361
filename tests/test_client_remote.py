# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qubes_socksvc.client against what the remote side sends (issue 22, point 5).

The qrexec client's stderr is the called service's (agent/qrexec-agent-data.c ->
libqrexec/remote.c: handle_remote_data, MSG_DATA_STDERR written to fd 2), and its exit
code is the service's (MSG_DATA_EXIT_CODE): both are untrusted.  Stand-in qrexec clients
here are shell scripts that write what a hostile or careless service would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from qubes_socksvc import client
from tests.test_client_lib import path_with


def fake_client(tmp_path: Path, script: str, name: str = client.CLIENT_VM) -> None:
    """A qrexec client on PATH that runs ``script`` (sh) instead of calling anything."""
    tool = tmp_path / name
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)


def fail(how: str, service: str = "test.Echo") -> client.QrexecError:
    """The QrexecError a call through the fake client raises, by ``call()`` or by ``stream()``."""
    with pytest.raises(client.QrexecError) as error:
        if how == "call":
            client.call("notes", service, b"input", timeout=60)
        else:
            asyncio.run(asyncio.wait_for(client.async_call("notes", service, b"input"), 60))
    return error.value


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", path_with(tmp_path))
    return tmp_path


# --- stderr: kept to its last STDERR_KEPT bytes while it streams --------------------------


@pytest.mark.parametrize("how", ["call", "stream"])
def test_stderr_is_bounded_while_it_streams(on_path: Path, how: str) -> None:
    """32 MiB of a service's stderr: the call never holds more than a few chunks of it
    (before: call() captured all of it, 512 MiB -> 1 GiB RSS)."""
    fake_client(on_path, "head -c 33554432 /dev/zero | tr '\\0' e >&2\necho 'the reason' >&2\nexit 125\n")
    tracemalloc.start()
    try:
        error = fail(how)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.exit_code == 125 and error.stderr.endswith("eethe reason\n")
    assert len(error.stderr) == client.STDERR_KEPT
    assert peak < 4 << 20, f"{peak} bytes allocated at once for 32 MiB of stderr"


# --- escapes: the message is safe to print, the attribute keeps the text --------------------


HOSTILE = r"printf 'cleared\033[2J\033]0;owned\007\rfake line\342\200\256dahc\302\233H\n' >&2; exit 125"


@pytest.mark.parametrize("how", ["call", "stream"])
def test_control_characters_are_escaped_in_the_message(on_path: Path, how: str) -> None:
    """A service's escape sequences (clear screen, window title, CR, U+202E, the C1 CSI) never
    reach a terminal through str(QrexecError); qrexec-client-vm itself only filters them when
    its stderr is a terminal (agent/qrexec-client-vm.c main: replace_chars_stderr; replace.c)."""
    fake_client(on_path, HOSTILE)
    error = fail(how)
    message = str(error)
    assert message.isprintable(), repr(message)
    assert message.endswith(r": cleared\x1b[2J\x1b]0;owned\x07\rfake line\u202edahc\x9bH"), message
    assert error.stderr == "cleared\x1b[2J\x1b]0;owned\x07\rfake line\u202edahc\x9bH\n"  # untrusted, as sent


def test_a_multi_line_stderr_is_one_line_in_the_message(on_path: Path) -> None:
    fake_client(on_path, "printf 'first\\nsecond\\n' >&2; exit 125")
    assert str(fail("call")).endswith(r": first\nsecond")


# --- 126: dom0's refusal, or the service's own exit code --------------------------------------


@pytest.mark.parametrize("how", ["call", "stream"])
def test_126_with_exactly_qrexecs_refusal_is_the_policy(on_path: Path, how: str) -> None:
    """agent/qrexec-client-vm.c main: the agent closes the trigger socket -> "Request refused\\n"
    on stderr, exit(QREXEC_EXIT_REQUEST_REFUSED), before any connection: no output at all."""
    fake_client(on_path, "echo 'Request refused' >&2; exit 126")
    error = fail(how)
    assert error.refused and error.meaning == client.EXIT_MEANINGS[126]
    assert "refused by dom0's qrexec policy" in str(error)


@pytest.mark.parametrize("how", ["call", "stream"])
@pytest.mark.parametrize("script", [
    "echo 'partial answer'; exit 126",  # output came: the call was allowed (handle_data_client ran)
    "echo 'partial answer'; echo 'Request refused' >&2; exit 126",  # the line too, after output
    "echo '/usr/bin/tool: Permission denied' >&2; exit 126",  # not qrexec-client-vm's line
    "echo 'Request refused' >&2; echo more >&2; exit 126",
    "exit 126",  # qrexec-client-vm always says "Request refused" when it refuses
])
def test_126_the_service_sent_is_the_services(on_path: Path, how: str, script: str) -> None:
    """MSG_DATA_EXIT_CODE carries the service's own status (libqrexec/remote.c:
    handle_remote_data), 126 too: "Permission denied" from a shell is 126."""
    fake_client(on_path, script)
    error = fail(how)
    assert error.exit_code == 126 and not error.refused
    assert error.meaning.startswith("the service itself exited with 126"), error.meaning
    assert "policy" not in str(error)


@pytest.mark.parametrize("how", ["call", "stream"])
def test_126_from_dom0_is_always_the_services(on_path: Path, how: str) -> None:
    """daemon/qrexec-client.c never exits with QREXEC_EXIT_REQUEST_REFUSED: dom0 asks no policy."""
    fake_client(on_path, "echo 'Request refused' >&2; exit 126", name=client.CLIENT_DOM0)
    error = fail(how)
    assert not error.refused and error.meaning.startswith("the service itself exited with 126")


@pytest.mark.parametrize("how", ["call", "stream"])
@pytest.mark.parametrize("code", [125, 127])
def test_125_and_127_after_output_are_the_services(on_path: Path, code: int, how: str) -> None:
    """agent/qrexec-agent-data.c handle_new_process_common sends QREXEC_EXIT_PROBLEM and
    QREXEC_EXIT_SERVICE_NOT_FOUND before any data: after output, the code is the service's."""
    fake_client(on_path, f"echo out; exit {code}")
    assert fail(how).meaning.startswith(f"the service itself exited with {code}")
    fake_client(on_path, f"exit {code}")
    assert fail(how).meaning == client.EXIT_MEANINGS[code]  # no output: qrexec's, or the service's


@pytest.mark.parametrize(("program", "code", "stderr", "output", "by_service"), [
    ("qrexec-client-vm", 1, b"", False, False),           # not one of qrexec's codes: nothing to tell apart
    ("qrexec-client-vm", 1, b"", True, False),            # exit(1) after output too: handle_vchan_error
    ("qrexec-client-vm", 125, b"", False, False),         # without output: may be qrexec's
    ("qrexec-client-vm", 127, b"", False, False),
    ("qrexec-client-vm", 125, b"", True, True),           # after output: the service's
    ("qrexec-client-vm", 127, b"", True, True),
    ("qrexec-client-vm", 126, client.REFUSAL, False, False),  # dom0's refusal, as the VM client says it
    ("qrexec-client-vm", 126, b"Request refused\nmore\n", False, True),
    ("qrexec-client-vm", 126, b"", False, True),
    ("/usr/bin/qrexec-client", 126, client.REFUSAL, False, True),  # dom0's client never exits 126 itself
])
def test_whose_exit_code_a_failed_call_has(program: str, code: int, stderr: bytes, output: bool,
                                           by_service: bool) -> None:
    """client.exit_origin: qrexec's 125/126/127 against a service's own, where qrexec leaves a trace."""
    assert client.exit_origin(program, code, stderr, output) is by_service


# --- call()'s pump: input, output and the deadline at once ----------------------------------


def test_a_service_answering_while_its_input_comes_does_not_deadlock_the_call(on_path: Path) -> None:
    """A filter-like service reads a little, writes a lot, then reads the rest: call() must
    keep reading its output while the input waits for room (the input pipe is non-blocking;
    a blocking write of a whole chunk into a pipe with one free page would wait for a reader
    that is itself waiting for us to read)."""
    pid_file = on_path / "pid"
    fake_client(on_path, f"echo $$ > {pid_file}\nexec python3 -c '"
                "import os; os.read(0, 4096); os.write(1, bytes(1 << 20))\n"
                "while os.read(0, 65536): pass\n'\n")
    result: list[bytes] = []
    caller = threading.Thread(target=lambda: result.append(client.call("notes", "test.Echo", bytes(1 << 20))),
                              daemon=True)
    caller.start()
    caller.join(60)
    if caller.is_alive():  # deadlocked: end the fake client so that the thread ends too
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        caller.join(60)
        pytest.fail("call() deadlocked against a service answering while its input came")
    assert result == [bytes(1 << 20)]


def test_a_service_that_closes_its_input_gets_no_more_of_it(on_path: Path) -> None:
    """A service that stops reading (here at once) answers; call() drops the input it did not
    take instead of offering it again (64 MiB of it, so offering it byte by byte would run into
    the timeout)."""
    fake_client(on_path, "exec 0<&-\necho answer\n")
    assert client.call("notes", "test.Echo", bytes(64 << 20), timeout=30) == b"answer\n"


@pytest.mark.parametrize("how", ["call", "stream"])
def test_a_call_answered_within_a_short_timeout_returns_its_answer(on_path: Path, how: str) -> None:
    fake_client(on_path, "exec cat\n")
    if how == "call":
        assert client.call("notes", "test.Echo", b"input", timeout=0.9) == b"input"
    else:
        assert asyncio.run(client.async_call("notes", "test.Echo", b"input", timeout=0.9)) == b"input"


@pytest.mark.parametrize("how", ["call", "stream"])
def test_a_client_that_closes_its_pipes_is_still_killed_at_the_timeout(on_path: Path, how: str) -> None:
    """The deadline holds after the output and stderr ended too: a qrexec client waiting for
    the exit code (qrexec-client-vm closes its stdout at the service's EOF, then waits for
    MSG_DATA_EXIT_CODE) is killed at the timeout like one still writing."""
    fake_client(on_path, "exec >&- 2>&-\nexec sleep 30\n")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"took longer than 1s; it was killed"):
        if how == "call":
            client.call("notes", "test.Echo", b"input", timeout=1)
        else:
            asyncio.run(client.async_call("notes", "test.Echo", b"input", timeout=1))
    assert time.monotonic() - started < 20
