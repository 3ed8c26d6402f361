# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Plan and carry out an ``apply``: ownership record, conflicts, atomic writes, lock.

What we own is recorded in a state file (JSON: path -> accepted SHA-256 of the
file, or of ``symlink:TARGET``).  A path we did not record, or that changed
since we wrote it, is never touched: that is a conflict, and a plan with a
conflict changes nothing.  Before writing, the record is widened to accept both
the old and the new state of every path in the plan, so a crash between two
writes leaves a state the next ``apply`` recognises and repairs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import SocksvcError
from .render import Artifact, Layout

STATE_VERSION = 1


class ApplyError(SocksvcError):
    pass


@dataclass(frozen=True)
class Action:
    verb: str  # "create", "update", "remove", "unchanged", "conflict"
    path: str  # absolute on the target system
    artifact: Artifact | None = None
    reason: str = ""

    def __str__(self) -> str:
        text = f"{self.verb:9} {self.path}"
        if self.artifact is not None and self.artifact.link_target is not None:
            text += f" -> {self.artifact.link_target}"
        return text + (f"  ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    layout: Layout
    root: str

    @property
    def changes(self) -> list[Action]:
        return [a for a in self.actions if a.verb in ("create", "update", "remove")]

    @property
    def conflicts(self) -> list[Action]:
        return [a for a in self.actions if a.verb == "conflict"]


def fingerprint(artifact: Artifact) -> str:
    if artifact.link_target is not None:
        data = b"symlink:" + artifact.link_target.encode()
    else:
        assert artifact.content is not None
        data = artifact.content.encode()
    return hashlib.sha256(data).hexdigest()


def current_fingerprint(real_path: str) -> str | None:
    """The fingerprint of what is at ``real_path`` now; None if nothing; "" if not ours to judge."""
    try:
        st = os.lstat(real_path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return hashlib.sha256(b"symlink:" + os.readlink(real_path).encode()).hexdigest()
    if stat.S_ISREG(st.st_mode):
        with open(real_path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return ""  # a directory, socket, device...: never ours


def real_path(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def _symlinked_parent(root: str, path: str) -> str | None:
    """The first directory between ``root`` and ``path`` that is a symlink, if any."""
    current = root.rstrip("/") or "/"
    for part in os.path.dirname(path).strip("/").split("/"):
        current = os.path.join(current, part)
        if os.path.islink(current):
            return current
    return None


def load_state(root: str, layout: Layout) -> dict[str, list[str]]:
    try:
        with open(real_path(root, layout.state_file), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ApplyError(f"{real_path(root, layout.state_file)}: unreadable ownership record ({e}); "
                         "restore or delete it, then apply again") from e
    owned = data.get("owned") if isinstance(data, dict) else None
    if not isinstance(owned, dict) or not all(
        isinstance(v, list) and all(isinstance(h, str) for h in v) for v in owned.values()
    ):
        raise ApplyError(f"{real_path(root, layout.state_file)}: not a qubes-socksvc ownership record; "
                         "restore or delete it, then apply again")
    return {str(k): list(v) for k, v in owned.items()}


def _in_layout(layout: Layout, path: str) -> bool:
    """A path apply may write: directly inside one of the layout's directories."""
    directory, name = os.path.split(path)
    return (os.path.normpath(path) == path and name not in ("", ".", "..")
            and directory in (layout.unit_dir, layout.rpc_dir, layout.rpc_config_dir, layout.spec_dir))


def plan(artifacts: list[Artifact], layout: Layout, root: str = "/") -> Plan:
    owned = load_state(root, layout)
    actions: list[Action] = []
    wanted = {a.path: a for a in artifacts}
    symlinked = _symlinked_parent(root, layout.state_file)
    if symlinked is not None:  # the record is written too
        actions.append(Action("conflict", layout.state_file, None,
                              f"{symlinked} is a symlink; refusing to write through it"))
    for path in sorted(set(wanted) | set(owned)):
        artifact = wanted.get(path)
        if not _in_layout(layout, path):  # only an edited record can name one
            actions.append(Action("conflict", path, artifact, "the ownership record names a path outside "
                                  f"qubes-socksvc's directories; remove it from {layout.state_file}"))
            continue
        real = real_path(root, path)
        symlinked = _symlinked_parent(root, path)
        current = current_fingerprint(real) if symlinked is None else ""
        mine = path in owned and current in owned[path]
        if symlinked is not None:
            reason = f"{symlinked} is a symlink; refusing to write through it"
            actions.append(Action("conflict", path, artifact, reason))
        elif artifact is None:
            if current is None:
                continue  # already gone
            actions.append(Action("remove", path) if mine else Action(
                "conflict", path, None, "changed since qubes-socksvc wrote it; remove it by hand"))
        elif current is None:
            actions.append(Action("create", path, artifact))
        elif current == fingerprint(artifact) and (mine or path not in owned):
            actions.append(Action("unchanged", path, artifact))
        elif mine:
            actions.append(Action("update", path, artifact))
        elif path in owned:
            actions.append(Action("conflict", path, artifact,
                                  "changed since qubes-socksvc wrote it; remove it or restore it"))
        else:
            actions.append(Action("conflict", path, artifact,
                                  "exists and is not owned by qubes-socksvc; remove it or rename the service"))
    return Plan(actions, layout, root)


#: Outside every target tree, so that taking the lock changes nothing there.
LOCK_FILE = "/run/lock/qubes-socksvc-apply.lock"


@contextlib.contextmanager
def locked(lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Serialise concurrent applies (one lock for every target tree)."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _temp_beside(real: str) -> str:
    """The temporary name a write of ``real`` goes through before its rename."""
    directory, name = os.path.split(real)
    return os.path.join(directory, f".{name}.socksvc-tmp")


def _fresh_temp_beside(real: str) -> str:
    os.makedirs(os.path.dirname(real), mode=0o755, exist_ok=True)
    tmp = _temp_beside(real)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by an interrupted apply
    return tmp


def _write_file(real: str, content: bytes, mode: int = 0o644) -> None:
    tmp = _fresh_temp_beside(real)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(content)
        while view:  # write() may take less than asked (a full disk, a signal)
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, real)


def _write_symlink(real: str, target: str) -> None:
    tmp = _fresh_temp_beside(real)
    os.symlink(target, tmp)
    os.rename(tmp, real)


def _save_state(root: str, layout: Layout, owned: dict[str, list[str]]) -> None:
    data = {"version": STATE_VERSION, "owned": dict(sorted(owned.items()))}
    _write_file(real_path(root, layout.state_file), (json.dumps(data, indent=1) + "\n").encode())


def execute(plan_: Plan) -> None:
    """Carry out a conflict-free plan (the caller holds the lock)."""
    if plan_.conflicts:
        raise ApplyError("the plan has conflicts; nothing was changed")
    root, layout = plan_.root, plan_.layout
    final = {a.path: [fingerprint(a.artifact)] for a in plan_.actions
             if a.artifact is not None and a.verb in ("create", "update", "unchanged")}
    owned = load_state(root, layout)
    if not plan_.changes:
        # An apply interrupted after its last write left the record wide (or half-saved).
        if owned != final or os.path.lexists(_temp_beside(real_path(root, layout.state_file))):
            _save_state(root, layout, final)
        return
    # Accept old and new states while we work, so an interrupted apply is repairable.
    for action in plan_.changes:
        if action.artifact is not None:
            owned.setdefault(action.path, []).append(fingerprint(action.artifact))
    _save_state(root, layout, owned)
    for action in plan_.changes:
        real = real_path(root, action.path)
        if action.verb == "remove":
            os.unlink(real)
            continue
        artifact = action.artifact
        assert artifact is not None
        if artifact.link_target is not None:
            _write_symlink(real, artifact.link_target)
        else:
            assert artifact.content is not None
            _write_file(real, artifact.content.encode())
    _save_state(root, layout, final)
