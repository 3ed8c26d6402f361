# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The runtime daemon: listening sockets, accept, limits, reload, notify, and the log of each
call, which callcore.py serves (the testing kit runs the same code).

Imports stay light (no Jinja2, no YAML): a socket-activated call waits for this module to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import fcntl
import grp
import logging
import os
import resource
import select
import signal
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import callcore, handlers, logs, qrexec, stalls
from .callcore import ByDescriptor, Ending, OneService, Outcome, Result, Serves
from .errors import SocksvcError
from .handlers import Registry
from .model import Daemon, Service
from .request import Request

log = logging.getLogger("qubes_socksvc.server")

#: Seconds between STATUS= updates (only when a counter or the spec changed).
STATUS_INTERVAL = 2.0
#: Seconds between two looks at the spec file's stamp, besides those inotify prompts (SpecWatch):
#: the net for what the watch cannot see (the spec's parent directories replaced).
SPEC_CHECK_INTERVAL = 2.0
#: Seconds in-flight calls get to finish after SIGTERM.
STOP_TIMEOUT = 20.0
#: Seconds between two looks at whether the callers of the calls in flight are still there: a
#: handler that neither reads nor writes (a hung one, with no timeout) never learns it otherwise.
CALLER_CHECK_INTERVAL = 2.0
#: Plain handlers' threads still running after their call ended (timed out, caller gone): a thread
#: cannot be stopped, so past this many the daemon exits, and the next call starts a fresh one.
MAX_ORPHANED_THREADS = 64
#: File descriptors a call may need (its connection, and one for the handler's own use) ...
FDS_PER_CALL = 2
#: ... and those the daemon needs for itself (listeners, event loop, log, imports).
FDS_RESERVED = 64


class ServeError(SocksvcError):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class Listener:
    """A listening socket, and what it serves."""

    sock: socket.socket
    serves: Serves
    """ByDescriptor() for the daemon's shared socket, OneService(s) for a service's own."""

    @classmethod
    def for_path(cls, sock: socket.socket, service: Service | None) -> Listener:
        """``sock`` listening on a path of Daemon.sockets(), with the service it maps to."""
        return cls(sock, ByDescriptor() if service is None else OneService(service))


def activated_sockets(daemon: Daemon) -> list[Listener] | None:
    """The sockets systemd passed (None when not socket-activated)."""
    if "LISTEN_FDS" not in os.environ:
        return None
    from systemd.daemon import listen_fds  # only when activated: start-up time

    fds = listen_fds(unset_environment=True)
    if not fds:
        return None
    by_path = daemon.sockets()
    listeners: list[Listener] = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        path = sock.getsockname() if sock.family == socket.AF_UNIX else None
        if path not in by_path:
            log.error("ignoring socket %s passed by systemd: the manifest does not declare it for daemon %s; "
                      "run 'qubes-socksvc apply' and 'systemctl --user daemon-reload'", path, daemon.name)
            sock.close()
            continue
        sock.setblocking(False)
        listeners.append(Listener.for_path(sock, by_path.pop(path)))
    for path in by_path:
        log.warning("socket %s is declared but systemd did not pass it; reload the units", path)
    if not listeners:
        raise ServeError(f"systemd passed no socket declared for daemon {daemon.name}")
    return listeners


@dataclass(frozen=True)
class OwnedSocket:
    """A socket file this daemon bound itself (by hand, not by systemd): removed when it exits."""

    path: str
    device: int
    inode: int

    def remove(self) -> None:
        """Unlink the path if it is still our socket (not one a later daemon bound there)."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self.device, self.inode):
                os.unlink(self.path)


def bind_sockets(daemon: Daemon, bind_dir: str | None = None, owned: list[OwnedSocket] | None = None) -> list[Listener]:
    """Bind the daemon's sockets ourselves (started by hand, not by systemd).

    A path where something answers a connect (another daemon, or systemd's socket unit) is
    refused; only a stale socket (nobody listening) is replaced.  Each socket bound is appended
    to ``owned``, for :meth:`OwnedSocket.remove` at exit.
    """
    mode = int(daemon.socket_mode, 8)
    try:
        gid: int | None = grp.getgrnam(daemon.socket_group).gr_gid
    except KeyError:
        gid = None
        log.warning("group %s does not exist; socket left in the daemon's own group", daemon.socket_group)
    listeners: list[Listener] = []
    try:
        for path, service in daemon.sockets().items():
            if bind_dir is not None:
                path = os.path.join(bind_dir, os.path.basename(path))
            with _directory_locked(os.path.dirname(path)):  # two daemons started at once: one wins
                _remove_stale_socket(path, daemon)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listeners.append(Listener.for_path(sock, service))
                old_umask = os.umask(0o777 & ~mode)
                try:
                    sock.bind(path)
                except OSError as e:
                    raise ServeError(f"cannot bind {path}: {e.strerror}") from e
                finally:
                    os.umask(old_umask)
                st = os.lstat(path)
                if owned is not None:
                    owned.append(OwnedSocket(path, st.st_dev, st.st_ino))
                os.chmod(path, mode)
                if gid is not None:
                    try:
                        os.chown(path, -1, gid)
                    except PermissionError:
                        log.warning("cannot give %s to group %s: not a member", path, daemon.socket_group)
                sock.listen(socket.SOMAXCONN)  # before the lock is released: bound but not listening looks stale
            sock.setblocking(False)
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


@contextlib.contextmanager
def _directory_locked(directory: str) -> Iterator[None]:
    """flock() the socket directory: serve processes that bind there take turns."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # not readable: bind() reports what matters
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_socket(path: str, daemon: Daemon) -> None:
    """Make way for bind(): nothing there, or a socket nobody listens on (left by a killed daemon)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket; remove it or change the socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody accepts on it
        return
    except BlockingIOError:  # its listen backlog is full: someone listens
        pass
    except OSError as e:
        raise ServeError(f"{path}: cannot tell whether a daemon listens on it ({e.strerror}); "
                         "remove it if it is stale") from e
    finally:
        probe.close()
    raise ServeError(f"{path}: a daemon is already listening on this socket (another 'qubes-socksvc serve', or "
                     f"systemd's {daemon.unit}.socket); stop it first ('systemctl --user stop {daemon.unit}.socket') "
                     "or bind elsewhere with --bind-dir")


def fd_budget(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; return how many calls the
    limit lets run at once: ``max_connections``, or fewer (with a WARNING) when it is short."""
    needed = max_connections * FDS_PER_CALL + FDS_RESERVED
    # Never RLIM_INFINITY on Linux: do_prlimit (kernel/sys.c) refuses a hard RLIMIT_NOFILE above
    # fs.nr_open with EPERM, and a soft one above the hard.  Raising the soft limit to the hard
    # one is always allowed (a no-op when they are equal).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # a seccomp filter, say: keep the soft limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft >= needed:
        return max_connections
    allowed = max(1, (soft - FDS_RESERVED) // FDS_PER_CALL)
    log.warning("RLIMIT_NOFILE is %d (hard limit %d): max_connections %d needs %d file descriptors; serving at "
                "most %d calls at once. Raise the limit (LimitNOFILE= in the unit, or ulimit -n) or lower "
                "max_connections", soft, hard, max_connections, needed, allowed)
    return allowed


@dataclass(frozen=True)
class Source:
    """Where the daemon's spec comes from, so that it can be loaded again (live reload).

    ``load`` returns the daemon and a short id of what it loaded (the spec's hash); ``watch``
    is the file whose change (a new inode, mtime or size: ``apply`` renames a new spec into
    place) triggers a reload at the next call.
    """

    load: Callable[[], tuple[Daemon, str]]
    watch: str


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Server:
    """Serves one daemon's listeners until stopped, idle or SIGTERM; reloads its spec on SIGHUP
    and when the spec file changes, for every call that starts afterwards."""

    def __init__(self, daemon: Daemon, registry: Registry | None = None, source: Source | None = None,
                 spec_id: str = "") -> None:
        self.daemon = daemon
        self.spec_id = spec_id
        self.registry = registry or Registry()
        self.source = source
        self._stamp = _stamp(source.watch) if source is not None else None
        self.counts = dict.fromkeys(Outcome, 0)
        self._reported: tuple[object, ...]  # run() sets it: the status READY=1 came with
        self._slots: int  # run() and reload() set both
        """Calls that may run at once: max_connections, or fewer when RLIMIT_NOFILE is short."""
        self._free: int
        """Slots not taken: always ``_slots - len(_tasks)`` (negative after a reload that lowered
        the limit below the calls in flight, until enough of them end)."""
        self._listeners: list[Listener] = []
        self._accepting = False
        self._tasks: dict[asyncio.Task[None], socket.socket] = {}
        """Each call in flight, and its connection."""
        self._stopping = asyncio.Event()
        self._last_activity = 0.0
        self._repeats = logs.Repeats()
        self._watchdog: asyncio.Task[None] | None = None
        self._on_status: Callable[[str], None] | None = None
        self._spec_watch: SpecWatch | None = None

    # --- lifecycle -------------------------------------------------------

    async def run(self, listeners: list[Listener], on_ready: Callable[[str], None] | None = None,
                  on_status: Callable[[str], None] | None = None) -> None:
        """Serve until stopped.  ``on_ready`` gets the first status line (READY=1), ``on_status``
        every later one (STATUS=: the spec served and the call counters, at most every
        STATUS_INTERVAL seconds)."""
        loop = asyncio.get_running_loop()
        self._slots = self._free = fd_budget(self.daemon.max_connections)
        loop.set_exception_handler(self._loop_exception)
        self._last_activity = loop.time()
        # remove_signal_handler sets SIG_DFL: a program's own dispositions (nohup's SIG_IGN for
        # SIGHUP) are given back as they were
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        if self.source is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._listeners = listeners
        self._on_status = on_status
        self._watch_listeners()
        self._restart_watchdog()
        reporter = loop.create_task(self._report_status()) if on_status is not None else None
        spec_watch = loop.create_task(self._watch_spec()) if self.source is not None else None
        if self.source is not None:
            self._spec_watch = SpecWatch.start(self.source.watch, self._reload_if_changed)
        caller_watch = loop.create_task(self._watch_callers())
        log.info("daemon %s serving %d services on %d sockets%s (%s event loop)", self.daemon.name,
                 len(self.daemon.services), len(listeners), f", spec {self.spec_id}" if self.spec_id else "",
                 type(loop).__module__.partition(".")[0])
        self._reported = (self.spec_id, *self.counts.values())
        if on_ready is not None:
            on_ready(self.status())
        try:
            await self._stopping.wait()
        finally:
            self.stop()  # when run's task was cancelled rather than stopped
            for task in (self._watchdog, reporter, spec_watch):
                if task is not None:
                    task.cancel()
            for listener in listeners:
                listener.sock.close()
            if self._spec_watch is not None:
                self._spec_watch.close()
            try:
                # the caller watch goes on meanwhile: a call whose caller left ends within
                # CALLER_CHECK_INTERVAL, not after STOP_TIMEOUT
                await self._finish_in_flight()
            finally:
                caller_watch.cancel()
            for signum, handler in previous.items():
                loop.remove_signal_handler(signum)
                if handler is not None:  # None: installed by C code, which Python cannot reinstall
                    signal.signal(signum, handler)

    def status(self) -> str:
        """The STATUS= line ``systemctl --user status`` shows, and ``list`` reads."""
        counts = ", ".join(f"{self.counts[o]} {o.value}" for o in Outcome)
        return f"spec {self.spec_id or '(none)'}: {len(self.daemon.services)} services; calls: {counts}"

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self._report_if_changed()

    def _report_if_changed(self) -> None:
        """STATUS= now, unless it would say what the last one said."""
        current = (self.spec_id, *self.counts.values())
        if self._on_status is not None and current != self._reported:
            self._reported = current
            self._on_status(self.status())

    # --- live reload -----------------------------------------------------

    def reload(self) -> None:
        """Load the spec again (SIGHUP, or its file changed); calls already running keep theirs.

        A spec that fails to load is logged, and the daemon goes on serving the one it has.
        Sockets cannot change here: they are systemd's (or bound at start).
        """
        if self.source is None:
            return
        self._stamp = _stamp(self.source.watch)
        try:
            new, spec_id = self.source.load()
        except Exception as e:  # a broken spec must never stop the daemon
            log.error("reload failed, still serving spec %s: %s", self.spec_id, e)
            return
        old = self.daemon
        if new.name != old.name:
            log.error("reload failed, still serving spec %s: the new spec is for daemon %s", self.spec_id, new.name)
            return
        if set(new.sockets()) != set(old.sockets()):
            log.warning("daemon %s: its sockets changed in the new spec; they take effect only after "
                        "'systemctl --user daemon-reload' and 'systemctl --user restart %s.socket' "
                        "(every other change takes effect now)", new.name, new.unit)
        # Recomputed, never adjusted: the old count may have been capped by RLIMIT_NOFILE, and a
        # spec may lower the limit below the calls in flight (then no call is accepted until
        # enough of them end: _done counts each back).
        self._slots = fd_budget(new.max_connections)
        self._free = self._slots - len(self._tasks)
        self.daemon, self.spec_id = new, spec_id
        if new.idle_exit != old.idle_exit:
            self._restart_watchdog()
        self._resume_accepting()  # when a slot is free (a higher limit lets waiting callers in)
        log.info("reloaded: serving spec %s (%d services)", spec_id, len(new.services))
        self._report_if_changed()  # at once: list reads the spec served from STATUS=

    def _reload_if_changed(self) -> None:
        """Reload if the spec's stamp changed: a spec that ``apply`` renamed into place is served
        from the next call (SpecWatch says when to look; without it, each call looks)."""
        if self.source is not None and _stamp(self.source.watch) != self._stamp:
            self.reload()

    async def _watch_spec(self) -> None:
        """The spec's stamp, every SPEC_CHECK_INTERVAL: what SpecWatch cannot see (the spec's
        parent directories replaced), and a daemon accepting no call (without inotify)."""
        while True:
            await asyncio.sleep(SPEC_CHECK_INTERVAL)
            self._reload_if_changed()

    async def _watch_callers(self) -> None:
        """End the calls whose callers are gone, every CALLER_CHECK_INTERVAL.

        A caller that went away closed its end: its connection polls POLLHUP (net/unix/af_unix.c:
        unix_poll, both directions shut), which a mere half-close never gives.  Such a call's task
        is cancelled as CALLER_GONE, so a hung handler gives its slot back."""
        while True:
            await asyncio.sleep(CALLER_CHECK_INTERVAL)
            if not self._tasks:
                continue
            poll = select.poll()
            by_fd = {}
            for task, conn in self._tasks.items():
                fd = conn.fileno()
                if fd != -1:  # -1: its call has cut it, and its task ends within this loop turn or the next
                    poll.register(fd, select.POLLRDHUP)
                    by_fd[fd] = task
            for fd, events in poll.poll(0):
                # POLLERR comes only with POLLHUP: unix_release_sock sets the peer's sk_err
                # (ECONNRESET, unread data) beside its SHUTDOWN_MASK
                if events & select.POLLHUP:
                    by_fd[fd].cancel(callcore.CALLER_GONE)

    def _restart_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = None
        if self.daemon.idle_exit > 0:
            self._watchdog = asyncio.get_running_loop().create_task(self._idle_watch())

    def stop(self) -> None:
        """Accept no more callers; run closes the sockets and returns once the calls in flight
        have ended (STOP_TIMEOUT at most)."""
        self._stopping.set()
        self._pause_accepting()
        self._listeners = []  # nothing resumes accepting: _resume_accepting needs a listener

    async def _finish_in_flight(self) -> None:
        if not self._tasks:
            return
        log.info("stopping: waiting up to %ss for %d calls", STOP_TIMEOUT, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("stopping: cancelled %d calls still running", len(pending))
            await asyncio.wait(pending)

    async def _idle_watch(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self.daemon.idle_exit  # a reload that changes it starts a new watch
        while True:
            remaining = self._last_activity + idle - loop.time()
            if remaining <= 0 and not self._tasks:
                log.info("idle for %ss: exiting (systemd keeps the socket)", idle)
                self.stop()
                return
            await asyncio.sleep(max(remaining, 0.05) if not self._tasks else idle)

    # --- connections -----------------------------------------------------

    # Accepting is a reader callback on each listener, the way asyncio's own servers accept: no
    # future, task switch or epoll change per call (sock_accept() had all three).  A slot is
    # taken only once a caller waits, so an idle listener holds none; with every slot taken,
    # all listeners are unwatched and new callers wait in the backlog until a call ends.

    def _watch_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.add_reader(listener.sock.fileno(), self._accept, listener)
        self._accepting = True

    def _pause_accepting(self) -> None:
        if self._accepting:
            loop = asyncio.get_running_loop()
            for listener in self._listeners:
                loop.remove_reader(listener.sock.fileno())
            self._accepting = False

    def _resume_accepting(self) -> None:
        if not self._accepting and self._free > 0 and self._listeners:
            self._watch_listeners()

    def _accept(self, listener: Listener) -> None:
        """Accept the callers waiting on ``listener``, while slots are free.

        With no call in progress, one caller is accepted and the rest wait for the loop's next
        turn (the listener stays readable while any caller waits): a lone caller, the usual
        case, then costs no accept() that fails with EAGAIN, 5 % of a warm call.  With calls in
        progress (a burst), callers are accepted until none is left, as asyncio's servers do.
        """
        loop = asyncio.get_running_loop()
        lone = not self._tasks
        while self._free > 0:
            try:
                conn, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):  # none left (or the caller gave up)
                return
            except OSError as e:  # EMFILE and the like: wait for a call to end and retry
                if not self._tasks:  # no call of ours holds the descriptors: a handler leaked them
                    log.error("accept failed: %s, and no call is in flight: exiting, so that the next "
                              "call starts a fresh daemon", e)
                    self.stop()
                    return
                self._fault(("accept", e.errno), logging.ERROR, "accept failed: %s", e)
                self._pause_accepting()
                loop.call_later(0.1, self._resume_accepting)
                return
            self._free -= 1
            task = loop.create_task(self._connection(conn, listener.serves))
            self._tasks[task] = conn
            task.add_done_callback(self._done)
            if lone:  # with no slot left, the next caller's turn finds none and pauses accepting
                return
        self._pause_accepting()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._free += 1
        self._last_activity = asyncio.get_running_loop().time()
        if not self._accepting:
            self._resume_accepting()

    async def _connection(self, conn: socket.socket, serves: Serves) -> None:
        if self._spec_watch is None or not self._spec_watch.alive:  # no inotify: a stat() per call
            self._reload_if_changed()
        # The spec this call starts with is the one it finishes with.
        await callcore.run(conn, self.daemon, serves, self.registry, self)

    # --- a call's events (callcore.Reporter) --------------------------------

    def started(self, request: Request, called: str) -> None:
        # From here on, every line logged in this call's context carries its journal fields.
        fields = {"SERVICE": called, "SOURCE": request.source or "", "TARGET": request.target or "",
                  "TARGET_TYPE": request.target_type or ""}
        logs.call_fields.set(fields)
        target = f" to {request.target_type} {request.target}" if request.target else ""
        logs.line(log, logging.INFO, f"call {called} from {request.source or '(no descriptor)'}{target}", fields,
                  _STARTED)

    def stalled(self, service: Service, called: str, seconds: float) -> None:
        self._fault(("stall", service.handler), logging.WARNING, stalls.MESSAGE, called, service.handler, seconds)

    def cancelled(self) -> None:
        self.counts[Outcome.FAILED] += 1
        log.warning("call cancelled: the daemon is stopping")

    def ended(self, daemon: Daemon, result: Result) -> None:
        """Count the call; log how it ended unless it was served (its one line is logged at its start)."""
        ending = result.ending
        self.counts[ending.outcome] += 1
        if ending is not Ending.SERVED:
            self._log_ending(daemon, result)
            orphans = handlers.orphaned_threads()
            if orphans > MAX_ORPHANED_THREADS and not self._stopping.is_set():
                log.error("%d plain handlers' threads still run after their calls ended (timed out, or the "
                          "caller went away): exiting, so that the next call starts a fresh daemon; make "
                          "those handlers return", orphans)
                self.stop()

    def _log_ending(self, daemon: Daemon, result: Result) -> None:
        ending, called, service, error = result.ending, result.called, result.service, result.error
        if ending is Ending.LATE:
            log.warning("rejected call: no descriptor within %ss", daemon.descriptor_timeout)
        elif ending is Ending.CUT_SHORT:
            partial = error.partial if isinstance(error, asyncio.IncompleteReadError) else b""
            log.warning("rejected call: connection closed before the descriptor's NUL (%d bytes)", len(partial))
        elif ending is Ending.EMPTY:  # a connect and nothing else: a probe, e.g. a second 'serve' checking the socket
            log.info("rejected call: connection closed before sending anything")
        elif ending is Ending.TOO_LONG:
            log.warning("rejected call: descriptor longer than %d bytes", qrexec.MAX_DESCRIPTOR_LEN)
        elif ending is Ending.MALFORMED:
            log.warning("rejected call: %s", error)
        elif ending is Ending.UNKNOWN:
            log.warning("rejected call: service %s is not handled by daemon %s", called, daemon.name)
        elif ending is Ending.CALLER_GONE and not called:  # before the descriptor was read
            log.info("caller went away")
        elif ending is Ending.INTERNAL:
            log.error("internal error while serving a call", exc_info=error)
        elif service is None:
            raise AssertionError(f"a call that ended {ending} names no service")
        elif ending is Ending.UNDECLARED:
            log.warning("rejected call: service %s on %s is no longer declared", service.full_name, service.socket)
        elif ending is Ending.LOAD_FAILED:
            self._fault(("load", service.handler), logging.ERROR, "call %s failed: %s", called, error)
        elif ending is Ending.INPUT_TOO_LARGE:
            log.warning("call %s rejected: %s", called, error)
        elif ending is Ending.TIMED_OUT:
            log.warning("call %s timed out after %ss", called, service.timeout)
        elif ending is Ending.CALLER_GONE:
            log.info("call %s: caller went away", called)
        elif ending is Ending.RAISED and error is not None:
            self._handler_raised(called, service, error)

    def _handler_raised(self, called: str, service: Service, e: BaseException) -> None:
        # Keyed by the declared service and the exception's type, never its message: a message
        # that quotes the caller's input (int(request.argument)) would make every call a new fault.
        self._fault(("raised", service.full_name, type(e)), logging.ERROR, "call %s: handler %s raised",
                    called, service.handler, exc_info=e)

    def _fault(self, key: object, level: int, msg: str, *args: object,
               exc_info: BaseException | None = None) -> None:
        """Log a handler's fault, once per REPEAT_INTERVAL for the same fault: a handler that fails
        the same way on every call must not flood the journal (the calls themselves are logged).

        The traceback is logged as ``logging`` would, but cut (logs.traceback_text), and without
        the exception object: python-systemd's JournalHandler would send its whole repr again.
        """
        held = self._repeats.check(key)
        if held is None:
            return
        if held:
            msg += " (and %d times more in the last %ds, not logged)"
            args += (held, int(self._repeats.interval))
        if exc_info is None:
            log.log(level, msg, *args)
        elif log.isEnabledFor(level):
            filename, line, function, _ = log.findCaller()  # _fault, as log.log() above would give
            record = log.makeRecord(log.name, level, filename, line, msg, args, None, function)
            record.exc_text = logs.traceback_text(exc_info)  # Formatter.format appends it
            log.handle(record)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """The loop's reports (an exception in a callback, a task never awaited): once per kind."""
        exc = context.get("exception")
        if isinstance(exc, ConnectionError):  # a caller that went away: logged by its call
            return
        message = logs.cut(str(context.get("message") or "unexpected error in the event loop"))
        error = exc if isinstance(exc, BaseException) else None
        # Keyed like a handler's fault: by type, not by a message that may quote a caller's bytes.
        key = ("loop", type(error)) if error is not None else ("loop", message[:64])
        self._fault(key, logging.ERROR, "%s", message, exc_info=error)

_STARTED = logs.Where.of(Server.started)
"""The code location of the line each call logs, for its CODE_* journal fields."""


# inotify(7) event bits (linux/inotify.h).
_IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR = 0x4000, 0x8000, 0x1000000
#: What may change the spec: apply renames a new one in (IN_MOVED_TO); an editor writes one.
_SPEC_EVENTS = (_IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
                | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
#: struct inotify_event's fixed part: wd, mask, cookie, len (then len bytes of NUL-padded name).
_EVENT = struct.Struct("iIII")


class SpecWatch:
    """inotify(7) on the spec's directory: the spec's stamp is looked at when its name changes there.

    ``apply`` renames a new spec into place; the kernel queues IN_MOVED_TO on the directory's
    inotify fd during rename(2), so before ``apply`` exits and before any caller it answers can
    connect.  The event loop runs the reader callbacks of one wait before the first step of any
    task they create (asyncio queues a new task's step behind the ready callbacks; uvloop runs
    it in a later phase than I/O), so the call accepted in the same turn as the event already
    starts on the new spec: as prompt as the stat() each call used to take (0.05 ms, issue 26),
    with no system call per call.  No libc binding in the standard library: ctypes.
    """

    def __init__(self, fd: int, name: bytes, on_change: Callable[[], None]) -> None:
        self.fd = fd
        self.name = name
        self.on_change = on_change
        self.alive = True
        """False once the directory is gone, moved or the queue overflowed: stat() per call again."""

    @classmethod
    def start(cls, path: str, on_change: Callable[[], None]) -> SpecWatch | None:
        """A watch on ``path``'s directory, read by the running loop; None (logged) without one."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.warning("no inotify (%s): the spec's stamp is looked at before each call",
                        os.strerror(ctypes.get_errno()))
            return None
        directory, name = os.path.split(os.path.abspath(path))
        if libc.inotify_add_watch(fd, os.fsencode(directory), _SPEC_EVENTS) < 0:
            log.warning("cannot watch %s (%s): the spec's stamp is looked at before each call", directory,
                        os.strerror(ctypes.get_errno()))
            os.close(fd)
            return None
        watch = cls(fd, os.fsencode(name), on_change)
        asyncio.get_running_loop().add_reader(fd, watch._read)
        return watch

    def _read(self) -> None:
        changed = False
        while True:
            try:
                events = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(events):
                _, mask, _, length = _EVENT.unpack_from(events, offset)
                name = events[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & (_IN_IGNORED | _IN_Q_OVERFLOW | _IN_DELETE_SELF | _IN_MOVE_SELF):
                    changed = True
                    self.alive = self.alive and not mask & (_IN_IGNORED | _IN_Q_OVERFLOW | _IN_MOVE_SELF)
                elif name == self.name:
                    changed = True
        if changed:
            self.on_change()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


def notify(status: str, ready: bool = True) -> None:
    """READY=1 (once) and STATUS= to systemd when it asked for them (Type=notify)."""
    if "NOTIFY_SOCKET" not in os.environ:
        return
    from systemd.daemon import notify as sd_notify

    sd_notify(f"READY=1\nSTATUS={status}" if ready else f"STATUS={status}")


def notify_status(status: str) -> None:
    notify(status, ready=False)


def serve(daemon: Daemon, bind_dir: str | None = None, source: Source | None = None, spec_id: str = "") -> None:
    """Run the daemon until idle exit or SIGTERM.

    Socket-activated, it unlinks nothing (the sockets are systemd's); started by hand, it removes
    the sockets it bound when it exits.
    """
    logs.tag_log_handlers()
    # A handler that kills the process (a crashing C extension) leaves its cause in the journal:
    # the Python stack of every thread, written to stderr on SIGSEGV, SIGFPE, SIGABRT, SIGBUS and
    # SIGILL (faulthandler; the journal's stream under systemd).  systemd logs the exit itself,
    # once, and the next call starts a new daemon (templates: no start limit).
    faulthandler.enable(all_threads=True)
    listeners = activated_sockets(daemon) if bind_dir is None else None
    owned: list[OwnedSocket] = []
    try:
        if listeners is None:
            listeners = bind_sockets(daemon, bind_dir, owned)
        server = Server(daemon, source=source, spec_id=spec_id)
        on_status = notify_status if "NOTIFY_SOCKET" in os.environ else None
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as runner, \
                logs.lines_held():
            runner.run(server.run(listeners, on_ready=notify, on_status=on_status))
    finally:
        for sock in owned:
            sock.remove()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (optional: python3-uvloop), else asyncio's.

    Measured with bench/ (example.Echo, same run): a warm call costs the daemon 27% less CPU
    (190 vs 260 µs), 1000 concurrent callers get 1.4x the calls/s, for 1.8 MiB more RSS
    and ~3 ms more start-up.  Everything else (streams, Request, handlers) is unchanged.
    """
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
