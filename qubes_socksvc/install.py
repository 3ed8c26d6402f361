# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Plan and carry out an ``apply``: ownership record, conflicts, atomic writes, lock.

What we own is recorded in a state file (JSON: path -> accepted SHA-256 of the
file, or of ``symlink:TARGET``).  A path we did not record, or that changed
since we wrote it, is never touched: that is a conflict, and a plan with a
conflict changes nothing.  Everything a write needs (real directories, room for
the name, write permission) is checked in the plan, so a refused apply writes
nothing.  Before writing, the record is widened to accept exactly the old and the
new state of every path in the plan, so a crash between two writes leaves a state
the next ``apply`` recognises and repairs; temporary files such a crash leaves are
swept by the next apply.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import files, model
from .errors import SocksvcError
from .layout import Artifact, Layout, Link
from .qrexec import NAME_MAX

STATE_VERSION = 1
#: The record holds two digests per path at most; 16 MiB is far beyond any manifest.
MAX_STATE_SIZE = 16 << 20
#: The largest file apply writes is a daemon's spec (render refuses a larger one): a larger file is never ours.
MAX_ARTIFACT_SIZE = model.MAX_SPEC_SIZE
#: Linux's PATH_MAX, its NUL included.
PATH_MAX = 4096
#: A temporary name has a fixed length whatever the final name (a 255-byte service name
#: must fit NAME_MAX): a dot, ``socksvc-``, 16 hex digits of the final name's SHA-256, ``.tmp``.
TEMP_RE = re.compile(r"\.socksvc-[0-9a-f]{16}\.tmp\Z")
#: The temporary names of earlier versions (``.NAME.socksvc-tmp``), swept too.
OLD_TEMP_RE = re.compile(r"\..+\.socksvc-tmp\Z", re.DOTALL)


class ApplyError(SocksvcError):
    pass


class Verb(enum.Enum):
    """What a plan does with one path."""

    CREATE = "create"
    UPDATE = "update"
    REMOVE = "remove"
    UNCHANGED = "unchanged"
    CONFLICT = "conflict"
    """Nothing may be written: the plan changes nothing at all."""
    SWEEP = "sweep"
    """A temporary file an interrupted apply left, removed."""

    @property
    def changes(self) -> bool:
        """Whether the path is written or removed (and so its state recorded before)."""
        return self in (Verb.CREATE, Verb.UPDATE, Verb.REMOVE)


@dataclass(frozen=True)
class Action:
    verb: Verb
    path: str  # absolute on the target system
    artifact: Artifact | None = None
    reason: str = ""
    current: str | None = None
    """For "update" and "remove": the fingerprint of what is there now (one the record accepts)."""

    def __str__(self) -> str:
        text = f"{self.verb.value:9} {self.path}"
        if isinstance(self.artifact, Link):
            text += f" -> {self.artifact.target}"
        return text + (f"  ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    layout: Layout
    root: str

    @property
    def changes(self) -> list[Action]:
        return [a for a in self.actions if a.verb.changes]

    @property
    def conflicts(self) -> list[Action]:
        return [a for a in self.actions if a.verb is Verb.CONFLICT]

    @property
    def sweeps(self) -> list[Action]:
        """Temporary files an interrupted apply left behind."""
        return [a for a in self.actions if a.verb is Verb.SWEEP]


def fingerprint(artifact: Artifact) -> str:
    data = b"symlink:" + artifact.target.encode() if isinstance(artifact, Link) else artifact.content.encode()
    return hashlib.sha256(data).hexdigest()


def current_fingerprint(real_path: str) -> str | None:
    """The fingerprint of what is at ``real_path`` now; None if nothing; "" if not ours to judge."""
    try:
        st = os.lstat(real_path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return hashlib.sha256(b"symlink:" + os.readlink(real_path).encode()).hexdigest()
    if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_ARTIFACT_SIZE:
        return hashlib.sha256(files.read_regular(real_path, MAX_ARTIFACT_SIZE, "file")).hexdigest()
    return ""  # a directory, socket, device, a huge file...: never ours


def real_path(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def _artifact_dirs(layout: Layout) -> tuple[str, ...]:
    """The directories artifacts live in (a record naming any other is refused)."""
    return (layout.unit_dir, layout.wants_dir, layout.rpc_dir, layout.rpc_config_dir, layout.spec_dir)


def _written_dirs(layout: Layout) -> tuple[str, ...]:
    """Every directory apply writes in: the artifacts' and the record's."""
    return tuple(dict.fromkeys((*_artifact_dirs(layout), os.path.dirname(layout.state_file))))


@dataclass(frozen=True)
class _DirCheck:
    """What the file system says about one target directory, before any write."""

    problem: str | None
    """Why nothing in it can be judged or written (a symlink or a non-directory on the way)."""
    unwritable: str | None
    """Why nothing in it can be written (a read-only or immutable directory, no permission)."""


def _check_dir(root: str, directory: str) -> _DirCheck:
    """Walk from ``root`` to ``directory`` as apply's makedirs and renames would."""
    top = root.rstrip("/") or "/"
    deepest = top  # the deepest directory that exists: where a write or a makedirs happens
    while not os.path.lexists(deepest):  # a --root still to be created
        deepest = os.path.dirname(deepest)
    if not os.path.isdir(deepest):
        return _DirCheck(f"{deepest} is not a directory; move it away", None)
    path = top
    for part in directory.strip("/").split("/"):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # makedirs creates the rest (and the root's own missing part)
            break
        except OSError as e:
            return _DirCheck(f"{path}: {e.strerror}", None)
        if stat.S_ISLNK(st.st_mode):
            return _DirCheck(f"{path} is a symlink; refusing to write through it", None)
        if not stat.S_ISDIR(st.st_mode):
            return _DirCheck(f"{path} is not a directory; move it away", None)
        deepest = path
    if not os.access(deepest, os.X_OK, effective_ids=True):  # its entries cannot even be looked at
        return _DirCheck(f"{deepest} cannot be searched by this user; apply writes as root", None)
    unwritable = None
    if not os.access(deepest, os.W_OK, effective_ids=True):
        unwritable = (f"{deepest} is not writable by this user; apply writes as root" if os.geteuid() != 0
                      else f"{deepest} is not writable (a read-only file system, or an immutable directory)")
    return _DirCheck(None, unwritable)


def _temp_for(real: str) -> str:
    """The temporary name a write of ``real`` goes through before its rename."""
    directory, name = os.path.split(real)
    return os.path.join(directory, f".socksvc-{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}.tmp")


def _write_problem(real: str) -> str | None:
    """Why a write or removal of ``real`` (in a sound directory) would fail half-way, if it would."""
    tmp = _temp_for(real)  # a name of at most NAME_MAX bytes (_in_layout), and so is the temporary one
    if max(len(os.fsencode(real)), len(os.fsencode(tmp))) >= PATH_MAX:
        return f"the path or its temporary name is longer than {PATH_MAX - 1} bytes (PATH_MAX); use a shorter --root"
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(tmp).st_mode) and not os.path.islink(tmp):  # files and links are swept
            return f"{tmp} is in the way (not a file, with the name of qubes-socksvc's temporary file); remove it"
    if os.path.isfile(real) and not os.path.islink(real) and not os.access(real, os.W_OK, effective_ids=True):
        return "the file cannot be replaced or removed (immutable, or not ours to write)"
    return None


def _leftovers(root: str, layout: Layout, checks: dict[str, _DirCheck]) -> list[Action]:
    """Temporary files (ours by name, files or symlinks) an interrupted apply left behind."""
    actions = []
    for directory in _written_dirs(layout):
        check = checks[directory]
        if check.problem is not None or check.unwritable is not None:
            continue
        try:
            entries = list(os.scandir(real_path(root, directory)))
        except OSError:  # not there yet (makedirs creates it), or unreadable: nothing to sweep
            continue
        for entry in entries:
            if ((TEMP_RE.match(entry.name) or OLD_TEMP_RE.match(entry.name))
                    and (entry.is_symlink() or entry.is_file(follow_symlinks=False))):
                actions.append(Action(Verb.SWEEP, f"{directory}/{entry.name}", None, "left by an interrupted apply"))
    return sorted(actions, key=lambda a: a.path)


def load_state(root: str, layout: Layout) -> dict[str, list[str]]:
    path = real_path(root, layout.state_file)
    if not os.path.lexists(path):
        return {}
    try:
        data = json.loads(files.read_regular(path, MAX_STATE_SIZE, "ownership record"))
    except files.FileRefused as e:
        raise ApplyError(f"{e}; restore or delete it, then apply again") from e
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested deeper than the stack
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ApplyError(f"{path}: unreadable ownership record ({reason}); "
                         "restore or delete it, then apply again") from e
    owned = data.get("owned") if isinstance(data, dict) else None
    if not isinstance(owned, dict) or not all(
        isinstance(v, list) and all(isinstance(h, str) for h in v) for v in owned.values()
    ):
        raise ApplyError(f"{path}: not a qubes-socksvc ownership record; restore or delete it, then apply again")
    if data.get("version") != STATE_VERSION:
        raise ApplyError(f"{path}: an ownership record of version {data.get('version')!r} (this qubes-socksvc "
                         f"reads version {STATE_VERSION}); install the qubes-socksvc that wrote it, "
                         "or restore or delete it, then apply again")
    return {str(k): list(v) for k, v in owned.items()}


def _in_layout(layout: Layout, path: str) -> bool:
    """A path apply may write: a name of at most NAME_MAX bytes directly inside one of the
    layout's directories (the manifest's checks keep every rendered name that short)."""
    directory, name = os.path.split(path)
    return (os.path.normpath(path) == path and name not in ("", ".", "..")
            and len(os.fsencode(name)) <= NAME_MAX and directory in _artifact_dirs(layout))


def plan(artifacts: list[Artifact], layout: Layout, root: str = "/") -> Plan:
    owned = load_state(root, layout)
    actions: list[Action] = []
    wanted = {a.path: a for a in artifacts}
    checks = {d: _check_dir(root, d) for d in _written_dirs(layout)}
    for path in sorted(set(wanted) | set(owned)):
        artifact = wanted.get(path)
        if not _in_layout(layout, path):  # only an edited record can name one
            actions.append(Action(Verb.CONFLICT, path, artifact, "the ownership record names a path qubes-socksvc "
                                  "never writes (outside its directories, or a name longer than "
                                  f"{NAME_MAX} bytes); remove it from {layout.state_file}"))
            continue
        check = checks[os.path.dirname(path)]
        if check.problem is not None:
            actions.append(Action(Verb.CONFLICT, path, artifact, check.problem))
            continue
        real = real_path(root, path)
        current = current_fingerprint(real)
        mine = path in owned and current in owned[path]
        if artifact is None:
            if current is None:
                continue  # already gone
            actions.append(Action(Verb.REMOVE, path, current=current) if mine else Action(
                Verb.CONFLICT, path, None, "changed since qubes-socksvc wrote it; remove it by hand"))
        elif current is None:
            actions.append(Action(Verb.CREATE, path, artifact))
        elif current == fingerprint(artifact) and (mine or path not in owned):
            actions.append(Action(Verb.UNCHANGED, path, artifact))
        elif mine:
            actions.append(Action(Verb.UPDATE, path, artifact, current=current))
        elif path in owned:
            actions.append(Action(Verb.CONFLICT, path, artifact,
                                  "changed since qubes-socksvc wrote it; remove it or restore it"))
        else:
            actions.append(Action(Verb.CONFLICT, path, artifact,
                                  "exists and is not owned by qubes-socksvc; remove it or rename the service"))
    actions = [_refused_if_unwritable(a, root, checks) for a in actions]
    record_dir = checks[os.path.dirname(layout.state_file)]
    if record_dir.problem is not None:  # the record is written too
        actions.append(Action(Verb.CONFLICT, layout.state_file, None, record_dir.problem))
    elif any(a.verb.changes for a in actions):
        problem = record_dir.unwritable or _write_problem(real_path(root, layout.state_file))
        if problem is not None:
            actions.append(Action(Verb.CONFLICT, layout.state_file, None, problem))
    result = Plan(_leftovers(root, layout, checks) + actions, layout, root)
    size = len(_record(_widened(result)))  # the largest record execute writes: old and new states
    if size > MAX_STATE_SIZE:
        return Plan([*result.actions, Action(Verb.CONFLICT, layout.state_file, None, (
            f"the ownership record would be {size} bytes while apply works, more than it reads back "
            f"({MAX_STATE_SIZE}); apply fewer services at once, or split them between /etc and /usr/local"))],
            layout, root)
    return result


def _refused_if_unwritable(action: Action, root: str, checks: dict[str, _DirCheck]) -> Action:
    """A change that would fail half-way (see _write_problem) as a conflict, before any write."""
    if not action.verb.changes:
        return action
    problem = checks[os.path.dirname(action.path)].unwritable or _write_problem(real_path(root, action.path))
    return action if problem is None else Action(Verb.CONFLICT, action.path, action.artifact, problem)


#: Only root can create files in /run (0755), so no user can hold this lock and hang
#: ``postinst`` (/run/lock is world-writable); outside every target tree, so taking
#: it changes nothing there.
LOCK_FILE = "/run/qubes-socksvc-apply.lock"


@contextlib.contextmanager
def locked(lock_file: str = LOCK_FILE, *, optional: bool = False) -> Iterator[bool]:
    """Serialise concurrent applies (one lock for every target tree); yields whether it is held.

    With ``optional`` (a dry run), a caller that cannot open the lock (not root) goes on without it.
    """
    fd: int | None = None
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if not optional:
            raise ApplyError(f"{lock_file}: cannot take the apply lock ({e.strerror}); apply writes as root: "
                             "run it as root, or with --dry-run to see the plan") from e
    if fd is None:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """Created directories and files get exactly the modes asked for, whatever the caller's umask."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _write_file(real: str, content: bytes) -> None:
    """Write ``real`` whole or not at all: a temporary file, fsynced, renamed; removed on failure.

    Mode 0644: execute() sets the umask to 022.  O_EXCL: never through a name someone else made.
    """
    os.makedirs(os.path.dirname(real), mode=0o755, exist_ok=True)
    tmp = _temp_for(real)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(content)
            while view:  # write() may take less than asked (a full disk, a signal)
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_symlink(real: str, target: str) -> None:
    os.makedirs(os.path.dirname(real), mode=0o755, exist_ok=True)
    tmp = _temp_for(real)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _record(owned: dict[str, list[str]]) -> bytes:
    data = {"version": STATE_VERSION, "owned": dict(sorted(owned.items()))}
    return (json.dumps(data, indent=1) + "\n").encode()


def _save_state(root: str, layout: Layout, owned: dict[str, list[str]]) -> None:
    record = _record(owned)
    if len(record) > MAX_STATE_SIZE:  # plan refuses this first: a net
        raise ApplyError(f"{layout.state_file}: the ownership record would be {len(record)} bytes, more than "
                         f"apply reads back ({MAX_STATE_SIZE}); nothing more was written")
    _write_file(real_path(root, layout.state_file), record)


def _widened(plan_: Plan) -> dict[str, list[str]]:
    """The record while the plan is carried out: each path's state now and after, nothing more
    (repeated interrupted applies never make it grow)."""
    owned = {}
    for action in plan_.actions:
        new = fingerprint(action.artifact) if action.artifact is not None and action.verb is not Verb.REMOVE else None
        states = [h for h in (action.current, new) if h is not None]
        if states:
            owned[action.path] = states
    return owned


def execute(plan_: Plan) -> None:
    """Carry out a conflict-free plan (the caller holds the lock)."""
    if plan_.conflicts:
        raise ApplyError("the plan has conflicts; nothing was changed")
    root, layout = plan_.root, plan_.layout
    final = {a.path: [fingerprint(a.artifact)] for a in plan_.actions
             if a.artifact is not None and a.verb in (Verb.CREATE, Verb.UPDATE, Verb.UNCHANGED)}
    with _umask(0o022):
        for action in plan_.sweeps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(real_path(root, action.path))
        if not plan_.changes:
            # An apply interrupted after its last write left the record wide.
            if load_state(root, layout) != final:
                _save_state(root, layout, final)
            return
        # Accept old and new states while we work, so an interrupted apply is repairable.
        _save_state(root, layout, _widened(plan_))
        for action in plan_.changes:
            real = real_path(root, action.path)
            if action.verb is Verb.REMOVE:
                os.unlink(real)
                continue
            artifact = action.artifact
            assert artifact is not None
            if isinstance(artifact, Link):
                _write_symlink(real, artifact.target)
            else:
                _write_file(real, artifact.content.encode())
        _save_state(root, layout, final)
