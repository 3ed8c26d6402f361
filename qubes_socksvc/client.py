# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Call a qrexec service in another qube from Python: the caller's side of a service.

In a VM this runs ``qrexec-client-vm TARGET SERVICE`` (dom0's policy decides, and
may redirect the call); in dom0, where there is no ``qrexec-client-vm``, it runs
``qrexec-client -d TARGET DEFAULT:QUBESRPC SERVICE dom0`` as qubesadmin's
``run_service`` does (no policy: dom0 calls what it likes).  Input is streamed
to the tool's stdin with backpressure, output read as it comes.  A call that
qrexec could not complete raises :class:`QrexecError` with qrexec's exit code.

    from qubes_socksvc import client

    notes = client.call("notes", "my.Notes+list", b"{}", timeout=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncGenerator

from . import qrexec
from .chunks import Input, chunks
from .errors import SocksvcError
from .qrexec import CHUNK_SIZE

__all__ = ["EXIT_MEANINGS", "Input", "QrexecError", "async_call", "call", "command", "exit_origin", "printable",
           "stream"]

#: The tool a VM calls services with (``agent/qrexec-client-vm.c``), and dom0's (``daemon/qrexec-client.c``).
CLIENT_VM = "qrexec-client-vm"
CLIENT_DOM0 = "qrexec-client"
#: Bytes of the tool's stderr kept for the error message (the rest is dropped as it comes).
STDERR_KEPT = 8192
#: What qrexec-client-vm writes, and all it writes, when dom0 refuses the call
#: (agent/qrexec-client-vm.c main: the agent closes the trigger socket -> exit 126).
REFUSAL = b"Request refused\n"
#: Exit codes qrexec's tools use for themselves (libqrexec/qrexec.h); a service may exit with them too.
QREXEC_EXIT_CODES = (125, 126, 127)

#: What qrexec's exit codes mean, from its source (``libqrexec/qrexec.h``; the tools' ``main``).
EXIT_MEANINGS = {
    # QREXEC_EXIT_REQUEST_REFUSED: qrexec-daemon.c handle_execute_service exits with it when the
    # policy does not allow the call; qrexec-client-vm.c main prints "Request refused" and exits
    # with it when the agent closes the trigger socket without connection parameters.
    126: "refused by dom0's qrexec policy (no allow rule for this source, service, argument and target, "
         "or the target does not exist)",
    # QREXEC_EXIT_SERVICE_NOT_FOUND: qrexec-agent-data.c handle_new_process_common, when
    # find_qrexec_service finds no qubes-rpc file for NAME+ARG nor NAME (a dangling socket link too).
    127: "service not found in the target qube (no qubes-rpc entry for it, or its socket unit is not running)",
    # QREXEC_EXIT_PROBLEM, "Problem with qrexec itself": e.g. a socket with no listener, a malformed
    # rpc-config, wait-for-session failing, a connection timeout, a dom0 target not running.
    125: "qrexec could not run the service (a socket nobody listens on, a malformed rpc-config, "
         "a connection timeout, or the target is not running)",
    # qrexec-client-vm.c main: exit(1) when it cannot reach the local qrexec agent or fails itself.
    1: "the qrexec client failed locally (cannot connect to the qrexec agent, or a system error)",
    # qrexec-client-vm.c usage(argv[0], 2): bad options or arguments.
    2: "the qrexec client was called with invalid arguments",
}


class QrexecError(SocksvcError):
    """A qrexec call that did not complete; ``exit_code`` is the qrexec client's exit status.

    ``stderr`` is the end of the client's stderr as it came, mostly the called service's own
    (untrusted: it may hold terminal escapes); ``str()`` of the error escapes every control
    character, so it is safe to print.  ``refused`` is True when the exit code is dom0's
    refusal; ``by_service`` when it can only be the service's own (see :func:`exit_origin`).
    """

    def __init__(self, target: str, service: str, exit_code: int, stderr: str = "", *,
                 by_service: bool = False) -> None:
        self.target = target
        self.service = service
        self.exit_code = exit_code
        self.stderr = stderr
        self.by_service = by_service
        detail = f": {printable(stderr.strip())}" if stderr.strip() else ""
        super().__init__(f"{_call_of(target, service)} failed with exit code {exit_code}, {self.meaning}{detail}")

    @property
    def refused(self) -> bool:
        """dom0's policy refused the call (exit code 126 and nothing says it is the service's)."""
        return self.exit_code == 126 and not self.by_service

    @property
    def meaning(self) -> str:
        """What qrexec's exit code says, in words."""
        meaning = None if self.by_service else EXIT_MEANINGS.get(self.exit_code)
        if meaning is not None:
            return meaning
        if self.exit_code < 0 or self.exit_code > 128:  # qrexec-client-vm(1), EXIT STATUS: 128+signal
            number = -self.exit_code if self.exit_code < 0 else self.exit_code - 128
            with contextlib.suppress(ValueError):
                return f"the call was terminated by {signal.Signals(number).name}"
            return f"the call was terminated by signal {number}"
        return (f"the service itself exited with {self.exit_code} "
                "(an executable service; socket services report 0)")


def exit_origin(client: str, exit_code: int, untrusted_stderr: bytes, output_seen: bool) -> bool:
    """Whether a failed call's ``exit_code`` is certainly the called service's own, not qrexec's.

    qrexec passes the service's exit status through unchanged (libqrexec/remote.c:
    handle_remote_data, MSG_DATA_EXIT_CODE), so a service may exit 125, 126 or 127 like
    qrexec's tools.  They can be told apart only where qrexec leaves a trace:

    - 126 in a VM is dom0's refusal only if qrexec-client-vm wrote exactly ``REFUSAL`` and no
      output came (agent/qrexec-client-vm.c main: it exits before any connection).  A service
      that itself writes exactly that line, nothing else, and exits 126 looks the same: qrexec
      gives no way to tell these two apart, and it is then reported as a refusal.
    - 126 from dom0's qrexec-client is always the service's (daemon/qrexec-client.c never
      exits with QREXEC_EXIT_REQUEST_REFUSED: dom0 asks no policy).
    - 125 and 127 after output are the service's (agent/qrexec-agent-data.c:
      handle_new_process_common sends them before any data); without output they may be either.
    - Any other code may be qrexec-client-vm's own even after output: it exits 1 when the
      vchan fails mid-call (agent/qrexec-client-vm.c: handle_vchan_error).
    """
    if exit_code not in QREXEC_EXIT_CODES:
        return False
    if output_seen:
        return True
    if exit_code == 126:
        return os.path.basename(client) == CLIENT_DOM0 or untrusted_stderr != REFUSAL
    return False


def printable(untrusted_text: str) -> str:
    """``untrusted_text`` with every control or invisible character escaped (``\\x1b``, ``\\n``,
    ``\\u202e``), so that printing it cannot move the cursor, retitle a terminal or reorder the
    line.  qrexec-client-vm itself filters only when its stderr is a terminal
    (libqrexec/replace.c: do_replace_chars); a message may be printed anywhere, so always here."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in untrusted_text)


def command(target: str, service: str) -> list[str]:
    """The qrexec client command line for calling ``service`` in ``target``, here.

    ``target`` is a qube name, a keyword such as ``@dispvm`` or ``@dispvm:TEMPLATE``
    (in a VM), or ``""`` for the policy's default target.  Raises ``ValueError``
    for names qrexec would refuse, ``FileNotFoundError`` outside Qubes.
    """
    if not qrexec.is_service(service):
        raise ValueError(f"invalid service {service!r}; expected NAME, NAME+ or NAME+ARG in qrexec's charset")
    if target and (not qrexec.is_target(target) or target.startswith("-")):
        raise ValueError(f"invalid target {target!r}; expected a qube name, @keyword or \"\" for the default")
    vm_client = shutil.which(CLIENT_VM)
    if vm_client is not None:
        return [vm_client, target, service]
    dom0_client = shutil.which(CLIENT_DOM0)
    if dom0_client is not None:
        if not target or target.startswith("@"):
            raise ValueError(f"target {target!r}: from dom0, name the qube to call (qrexec-client takes no keyword)")
        # qubesadmin/app.py QubesLocal.run_service: "-d DEST USER:QUBESRPC SERVICE dom0"
        return [dom0_client, "-d", target, f"DEFAULT:QUBESRPC {service} dom0"]
    raise FileNotFoundError(f"neither {CLIENT_VM} nor {CLIENT_DOM0} is on PATH: qubes_socksvc.client calls "
                            "services from a Qubes VM (package qubes-core-agent-qrexec) or from dom0")


def call(target: str, service: str, input: bytes = b"", *, timeout: float | None = None) -> bytes:
    """Call ``service`` (``NAME``, ``NAME+ARG``) in ``target`` with ``input``; returns its output.

    Raises :class:`QrexecError` when qrexec refuses or fails the call, ``TimeoutError``
    after ``timeout`` seconds (the call is then killed).  For inputs or outputs too large
    for memory, or inside an event loop, use :func:`stream` or :func:`async_call`.
    """
    argv = command(target, service)
    deadline = None if timeout is None else time.monotonic() + timeout
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            output, untrusted_stderr = _communicate(process, input, deadline)
            returncode = process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            process.kill()
            raise _timed_out(target, service, timeout) from e
        except BaseException:
            process.kill()
            raise
    if returncode != 0:
        raise QrexecError(target, service, returncode, _tail(untrusted_stderr),
                          by_service=exit_origin(argv[0], returncode, untrusted_stderr, bool(output)))
    return output


def _communicate(process: subprocess.Popen[bytes], input: bytes,
                 deadline: float | None) -> tuple[bytes, bytes]:
    """``process.communicate()`` that keeps only the last STDERR_KEPT bytes of stderr as it
    comes (all of it is read: a full pipe would block the client).  Returns (stdout, stderr
    tail); raises ``subprocess.TimeoutExpired`` at ``deadline``."""
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    stdout: list[bytes] = []
    untrusted_stderr = b""
    pending = memoryview(input)
    with selectors.DefaultSelector() as selector:
        if pending:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        while selector.get_map():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(process.args, 0)
            for key, _ in selector.select(remaining):
                if key.fileobj is process.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[:CHUNK_SIZE]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the service stopped reading: its output and exit code still count
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(process.stdin)
                        process.stdin.close()
                    continue
                data = os.read(key.fd, CHUNK_SIZE)
                if not data:
                    selector.unregister(key.fileobj)
                elif key.fileobj is process.stdout:
                    stdout.append(data)
                else:
                    untrusted_stderr = (untrusted_stderr + data)[-STDERR_KEPT:]
    return b"".join(stdout), untrusted_stderr


async def async_call(target: str, service: str, input: Input = b"", *, timeout: float | None = None) -> bytes:
    """:func:`call` for code running in an event loop (input may also be streamed)."""
    return b"".join([chunk async for chunk in stream(target, service, input, timeout=timeout)])


async def stream(target: str, service: str, input: Input = b"", *, timeout: float | None = None,
                 ) -> AsyncGenerator[bytes, None]:
    """Call ``service`` in ``target``: input sent as it comes, output yielded as it arrives.

    Both directions have backpressure: input is written only as fast as the service
    takes it, output read only as fast as you consume it.  Raises :class:`QrexecError`
    (after the output, which may then be partial) or ``TimeoutError``.
    """
    argv = command(target, service)
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    loop = asyncio.get_running_loop()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    deadline = loop.call_later(timeout, expire) if timeout is not None else None
    sender = loop.create_task(_send(input, process.stdin))
    stderr = loop.create_task(_keep_tail(process.stderr))
    output_seen = False
    try:
        while chunk := await process.stdout.read(CHUNK_SIZE):
            output_seen = True
            yield chunk
        returncode = await process.wait()
        if expired:
            raise _timed_out(target, service, timeout)
        if returncode != 0:
            untrusted_stderr = await stderr
            raise QrexecError(target, service, returncode, _tail(untrusted_stderr),
                              by_service=exit_origin(argv[0], returncode, untrusted_stderr, output_seen))
        failure = sender.exception() if sender.done() and not sender.cancelled() else None
        if failure is not None:
            raise failure  # the caller's own input failed
    finally:
        if deadline is not None:
            deadline.cancel()
        if process.returncode is None:  # abandoned or failed early: end the call
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            # wait() also waits for the pipes to close, and a stdout paused by backpressure would
            # never see its EOF: read (and drop) the rest so that it does.
            while await process.stdout.read(CHUNK_SIZE):
                pass
            await process.wait()
        for task in (sender, stderr):
            task.cancel()
        await asyncio.gather(sender, stderr, return_exceptions=True)


async def _send(input: Input, stdin: asyncio.StreamWriter) -> None:
    """Input to the qrexec client's stdin, chunk by chunk with backpressure, then EOF."""
    try:
        async for chunk in chunks(input):
            try:
                stdin.write(chunk)
                await stdin.drain()
            except ConnectionError:  # the service stopped reading: its output and exit code still count
                return
    finally:  # also when the input itself fails: the call must not wait for more
        stdin.close()


async def _keep_tail(stderr: asyncio.StreamReader) -> bytes:
    """Read the client's stderr to its end (so it never blocks on a full pipe), keeping its tail."""
    kept = b""
    while chunk := await stderr.read(CHUNK_SIZE):
        kept = (kept + chunk)[-STDERR_KEPT:]
    return kept


def _call_of(target: str, service: str) -> str:
    return f"call of {service} in {target or 'the default target'}"


def _timed_out(target: str, service: str, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"{_call_of(target, service)} took longer than {timeout}s; it was killed")


def _tail(stderr: bytes) -> str:
    return stderr[-STDERR_KEPT:].decode("utf-8", "replace")
