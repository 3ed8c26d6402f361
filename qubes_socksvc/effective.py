# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What qrexec will make of the whole disk: every qubes-rpc entry in every search
directory, both manifests' artifacts and foreign files together.

qrexec finds a call's qubes-rpc file and its rpc-config independently: each by
trying ``NAME+ARG`` (``NAME+`` for a bare call) in every directory, then ``NAME``
(libqrexec/exec.c: find_qrexec_service, load_service_config_raw, find_file).  Two
things must hold for every call, in every state the disk can be in:

- **No forged descriptor.**  A call that can reach a socket reading descriptors (a
  daemon's shared socket, of either manifest) must never take an rpc-config with
  ``skip-service-descriptor=true``: qrexec would pass the caller's raw stdin as the
  descriptor, and the caller would choose its own service and source.  A link is
  judged by where the kernel takes it (symlinked directories, ``/var/run``), and a
  link whose socket is down still counts: the socket can come up at any moment.
- **Declared means effective.**  A call that reaches one of this manifest's links
  gets exactly the rpc-config the manifest declares for that key.

:func:`settle` pins what it can with explicit rpc-config files of its own and
reports the rest; :func:`safe_order` orders apply's writes so that every state a
kill or a failed write can leave keeps the first rule; :func:`forgeable` judges the
disk as it is, for ``check`` and ``list``.

Files under ``/run`` are volatile and ``/run/qubes/rpc-config`` is writable by group
``qubes`` (which can replace the sockets in ``/run/qubes`` anyway): what they cause is
a warning for ``apply`` (refusing would protect nothing and let any group member block
every apply), and ``check``/``list`` still fail on a forgeable state.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from . import install, lookup, model, qrexec, rpcconfig
from .layout import LAYOUTS, Artifact, File, Layout, Link
from .model import Manifest

#: Directories every systemd system links elsewhere (FHS 3.0; systemd's tmpfiles.d/var.conf:
#: ``L /var/run - - - - ../run``, ``L /var/lock - - - - ../run/lock``): resolved even in a
#: staging tree that lacks the links.
_ALIASES = (("/var/run", "/run"), ("/var/lock", "/run/lock"))
#: World-writable on every Linux system, whether or not a staging tree has them.
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
#: The kernel's limit on symlinks followed in one lookup (ELOOP; fs/namei.c: MAXSYMLINKS).
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class Finding:
    key: str
    """The declared key, or the call, the finding is about."""
    message: str
    conflict: bool
    """True: apply refuses (False: a warning)."""
    forgeable: bool = False
    """A caller could choose its own descriptor: ``check`` and ``list`` fail."""

    def __str__(self) -> str:
        return f"{'conflict' if self.conflict else 'warning':9} {self.key}: {self.message}"


def _volatile(path: str | None) -> bool:
    return path is not None and (path + "/").startswith("/run/")


def _unaliased(path: str) -> str:
    for alias, real in _ALIASES:
        if path == alias or path.startswith(alias + "/"):
            return real + path[len(alias):]
    return path


def resolve(root: str, path: str) -> str:
    """``path`` as the kernel reaches it inside ``root``: every symlink on the way followed (an
    absolute target starts again at ``root``), ``..`` after them; what does not exist stays as
    named.  Loops end after MAXSYMLINKS links, like ELOOP."""
    parts = [p for p in _unaliased(path).split("/") if p]
    done = ""
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            done = done.rpartition("/")[0]
            continue
        candidate = f"{done}/{part}"
        try:
            target = os.readlink(install.real_path(root, candidate))
        except OSError:  # not a link, or missing: the name stands
            done = candidate
            continue
        hops += 1
        if hops > _MAX_SYMLINKS:
            return candidate
        if target.startswith("/"):
            done, target = "", _unaliased(target)
        parts = [p for p in target.split("/") if p] + parts
    return done or "/"


class _Disk:
    """What is on disk under ``root``: the qubes-rpc and rpc-config directories listed once,
    their file names grouped by NAME (shared by every Tree of a run)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.groups: dict[str, set[str]] = {}
        """NAME -> the paths of its files, in every search directory."""
        for directory in (*qrexec.RPC_SEARCH_PATH, *qrexec.RPC_CONFIG_SEARCH_PATH):
            try:
                names = os.listdir(self.real(directory))
            except OSError:
                continue
            for file_name in names:
                if qrexec.is_rpc_file_name(file_name):
                    self.groups.setdefault(qrexec.split_service(file_name)[0], set()).add(f"{directory}/{file_name}")

    def real(self, path: str) -> str:
        return install.real_path(self.root, path)


#: What Tree.update returns for a path that had no change before.
_UNCHANGED = File("", "")


class Tree:
    """The qubes-rpc and rpc-config directories as one state leaves them: the disk under
    ``root`` with ``changes`` on top (path -> the artifact written there, or None: removed)."""

    def __init__(self, disk: _Disk, changes: Mapping[str, Artifact | None]) -> None:
        self.disk = disk
        self.changes: dict[str, Artifact | None] = {}
        self._changed: dict[str, set[str]] = {}
        self.update(changes)

    def update(self, changes: Mapping[str, Artifact | None]) -> dict[str, Artifact | None]:
        """Make ``changes``; returns what undoes them (for :meth:`undo`)."""
        previous = {path: self.changes.get(path, _UNCHANGED) for path in changes}
        for path, artifact in changes.items():
            self.changes[path] = artifact
            self._changed.setdefault(qrexec.split_service(os.path.basename(path))[0], set()).add(path)
        return previous

    def undo(self, previous: Mapping[str, Artifact | None]) -> None:
        for path, artifact in previous.items():
            if artifact is _UNCHANGED:
                del self.changes[path]
            else:
                self.changes[path] = artifact

    def names(self) -> set[str]:
        """Every NAME with a file in some search directory on disk (what a check judges; apply
        judges the NAMEs it declares besides)."""
        return set(self.disk.groups)

    def files(self, name: str) -> set[str]:
        """The file names of NAME present in some search directory."""
        paths = self.disk.groups.get(name, set()) | self._changed.get(name, set())
        return {os.path.basename(p) for p in paths if (self.changes[p] is not None if p in self.changes
                                                        else p in self.disk.groups.get(name, ()))}

    def entry(self, path: str) -> tuple[str, str | None] | None:
        """What a qubes-rpc path is, for whether a call can go past it: ``("link", where the kernel
        takes it)`` (a link can dangle, then qrexec goes on), ``("socket", where)`` for a socket file
        itself (qrexec connects to it: exec.c find_qrexec_service, S_ISSOCK), ``("stop", None)`` for
        anything else qrexec stops at (a file, a directory, a TCP link), None if absent."""
        if path in self.changes:
            artifact = self.changes[path]
            if artifact is None:
                return None
            if not isinstance(artifact, Link) or qrexec.is_tcp_link(artifact.target):
                return "stop", None
            return "link", resolve(self.disk.root, artifact.target)
        try:
            st = os.lstat(self.disk.real(path))
        except FileNotFoundError:
            return None
        except OSError:
            return "stop", None  # qrexec fails the call (find_file returns -2)
        if stat.S_ISSOCK(st.st_mode):  # a socket itself (a hard link, a bind mount): reached, never skipped
            return "socket", resolve(self.disk.root, path)
        try:
            target = os.readlink(self.disk.real(path))
        except OSError:  # not a link (EINVAL): a file or a directory, which qrexec runs or fails on
            return "stop", None
        if qrexec.is_tcp_link(target):
            return "stop", None
        return "link", resolve(self.disk.root, path)

    def probe_service(self, path: str, sockets: Sockets) -> tuple[lookup.Kind, str | None] | None:
        """find_qrexec_service's view, with our own links and every link to a socket we know (a
        daemon's, a Qubes-aware forward's) taken as up (they come and go with their sessions)."""
        if path in self.changes:
            artifact = self.changes[path]
            if artifact is None:
                return None
            if isinstance(artifact, Link) and qrexec.is_tcp_link(artifact.target):
                return lookup.Kind.TCP, artifact.target
            return lookup.Kind.SOCKET, None
        found = self.entry(path)
        if found is not None and found[1] is not None and (
                (canonical := sockets.canonical(found[1])) in sockets.units or canonical in sockets.reading):
            return lookup.Kind.SOCKET, None
        return lookup.probe_service(self.disk.real(path))

    def config_exists(self, path: str) -> bool | None:
        if path in self.changes:
            return None if self.changes[path] is None else True
        return lookup.config_exists(self.disk.real(path))

    def config(self, path: str | None) -> rpcconfig.Config:
        if path is None:
            return rpcconfig.Config().effective()
        artifact = self.changes.get(path)
        if isinstance(artifact, File):
            return rpcconfig.parse(artifact.content).effective()
        return lookup.read_config(self.disk.real(path))

    def config_for(self, call: str) -> tuple[str | None, rpcconfig.Config]:
        """(the file, what it says) of a call's rpc-config (load_service_config_raw); raises
        LookupFailed where qrexec fails the call."""
        path = lookup.find_config(call, qrexec.RPC_CONFIG_SEARCH_PATH, self.config_exists)
        return path, self.config(path)


class Sockets:
    """Sockets as the kernel reaches them: which read a descriptor first (daemons' shared
    sockets, Qubes-aware forward targets), and which socket unit each daemon socket belongs to.

    All sockets of one ``.socket`` unit come and go together (systemd.socket(5): every
    ``ListenStream=`` is opened when the unit starts, and ``RemoveOnStop=yes`` removes them
    all), so a link to a daemon's own socket dangles only while its shared socket is gone too.
    """

    def __init__(self, root: str, reading: Mapping[str, str], units: Mapping[str, str]) -> None:
        self.root = root
        self.reading = {resolve(root, p): what for p, what in reading.items()}
        self.units = {resolve(root, p): unit for p, unit in units.items()}
        self._inodes: dict[tuple[int, int], str] = {}
        for path in {**self.reading, **self.units}:
            try:  # the same socket under another name (a hard link)
                st = os.stat(install.real_path(root, path))
            except OSError:
                continue
            self._inodes[(st.st_dev, st.st_ino)] = path

    def canonical(self, resolved: str) -> str:
        """The known socket path ``resolved`` is (the same file under another name), or itself."""
        if resolved in self.reading or resolved in self.units or not self._inodes:
            return resolved
        try:
            st = os.stat(install.real_path(self.root, resolved))
        except OSError:
            return resolved
        return self._inodes.get((st.st_dev, st.st_ino), resolved)


def applied_daemons(root: str, layouts: Iterable[Layout] = LAYOUTS) -> dict[str, model.Daemon]:
    """The daemons whose specs are on disk (either manifest's), by spec path; unreadable ones
    are left out (no daemon can run from them)."""
    found = {}
    for layout in layouts:
        directory = install.real_path(root, layout.spec_dir)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith(".json"):
                try:
                    found[f"{layout.spec_dir}/{name}"] = model.load(os.path.join(directory, name)).daemon
                except model.SpecError:
                    continue
    return found


def _units_without_spec(root: str, layouts: Iterable[Layout], known: set[str]) -> dict[str, list[str]]:
    """Socket unit -> its ListenStream= paths, the descriptor socket first (templates/socket.j2),
    for our socket units in the ``layouts`` that no spec names: an apply killed between removing
    a spec and its units leaves them, and a daemon still running keeps serving its last spec
    (server.Server.reload: a spec that fails to load leaves the old one served)."""
    found: dict[str, list[str]] = {}
    for layout in layouts:
        directory = install.real_path(root, layout.unit_dir)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not (name.startswith("qubes-socksvc-") and name.endswith(".socket")) or name in known:
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                    listens = [line.partition("=")[2].strip() for line in f if line.startswith("ListenStream=")]
            except OSError:
                continue
            if listens:
                found[name] = listens
    return found


def applied_forwards(root: str, layouts: Iterable[Layout], daemon_sockets: Iterable[str]) -> dict[str, str]:
    """Socket path -> the forward that reads a descriptor there, from what apply recorded in the
    ``layouts``: an owned qubes-rpc link to a Unix socket no daemon listens on, whose own
    rpc-config (that layout's, owned too) does not skip the descriptor.  Forwards leave no spec,
    so the record is where the other manifest's Qubes-aware forwards are known."""
    reading: dict[str, str] = {}
    daemons = set(daemon_sockets)
    for layout in layouts:
        try:
            owned = install.load_state(root, layout)
        except install.ApplyError:
            continue  # apply and check report an unreadable record in its own layout
        for path in owned:
            if os.path.dirname(path) != layout.rpc_dir:
                continue
            try:
                target = os.readlink(install.real_path(root, path))
            except OSError:
                continue
            if qrexec.is_tcp_link(target) or target in daemons:
                continue
            config = f"{layout.rpc_config_dir}/{os.path.basename(path)}"
            try:
                skips = config in owned and lookup.read_config(install.real_path(root, config)).skip_service_descriptor
            except lookup.LookupFailed:
                skips = False
            if not skips:
                reading[target] = f"the target of {path} (applied, reads a descriptor)"
    return reading


def sockets(root: str, manifest: Manifest | None, applied: Sequence[Layout]) -> Sockets:
    """The sockets of this manifest's daemons and Qubes-aware forwards, and of the daemons and
    forwards apply left in the ``applied`` layouts (their specs and records)."""
    reading: dict[str, str] = {}
    units: dict[str, str] = {}
    daemons = [(d, f" (applied, {spec})") for spec, d in applied_daemons(root, applied).items()]
    if manifest is not None:
        daemons += [(d, "") for d in manifest.daemons.values()]
    for daemon, _ in daemons:
        units.update(dict.fromkeys(daemon.sockets(), f"{daemon.unit}.socket"))
    for unit, listens in _units_without_spec(root, applied, set(units.values())).items():
        units.update(dict.fromkeys(listens, unit))
        reading[listens[0]] = f"the descriptor socket of {unit} (no spec: a running daemon serves its last one)"
    reading.update(applied_forwards(root, applied, units))
    if manifest is not None:
        for key, forward in manifest.forwards.items():
            if forward.service_descriptor and not qrexec.is_tcp_link(forward.link_target):
                reading[forward.link_target] = f"the target of forward {key} (reads a descriptor)"
    for daemon, where in daemons:
        reading[daemon.socket] = f"the socket of daemon {daemon.name}{where}"
    return Sockets(root, reading, units)


# --- the calls of a NAME ------------------------------------------------------------------


def _long_call(name: str) -> str:
    """A call of NAME+ARG with an argument too long to be a file name: its only lookup key is
    NAME, so it stands for every NAME+ARG without a file of its own (exec.c: find_file)."""
    return f"{name}+{'x' * qrexec.NAME_MAX}"


def _shown(call: str) -> str:
    name, argument = qrexec.split_service(call)
    if argument and len(call) > qrexec.NAME_MAX:
        return f"{name}+ARG (any ARG without a file of its own)"
    return call if argument is not None else f"{call} (and {call}+)"


def _calls(name: str, files: Iterable[str]) -> list[str]:
    """Calls that together stand for every call of NAME: the bare call (looked up exactly like
    ``NAME+``), an argument without a file of its own, and each ``NAME+ARG`` with a file."""
    return [name, _long_call(name), *sorted(f for f in files if "+" in f and f != f"{name}+")]


def _reaches(tree: Tree, call: str, sockets: Sockets) -> tuple[str, str] | None:
    """(the link, what reads descriptors there) if some state of the sockets lets ``call`` reach
    a descriptor-reading socket: qrexec takes the first entry in lookup order, and skips a link
    whose socket is down like a missing file (exec.c: find_file), so every link before it may
    be skipped, except one of a socket unit that must be up for the socket reached."""
    down: set[str] = set()  # units taken as stopped on the way
    for key in qrexec.lookup_keys(call):
        for directory in qrexec.RPC_SEARCH_PATH:
            path = f"{directory}/{key}"
            found = tree.entry(path)
            if found is None:
                continue
            kind, resolved = found
            if kind == "stop" or resolved is None:
                return None
            socket = sockets.canonical(resolved)
            unit = sockets.units.get(socket)
            what = sockets.reading.get(socket)
            if kind == "socket":  # nothing to skip past
                return None if what is None else (path, what)
            if what is not None and unit not in down:
                return path, what
            if unit is not None:
                down.add(unit)
    return None


def forgeable_calls(tree: Tree, sockets: Sockets, names: Iterable[str] | None = None
                    ) -> dict[str, tuple[str, str, str | None]]:
    """call -> (link, socket, rpc-config file) for every call that can reach a descriptor-reading
    socket with ``skip-service-descriptor=true`` (in the NAMEs given, or everywhere)."""
    found = {}
    for name in sorted(tree.names() if names is None else names):
        for call in _calls(name, tree.files(name)):
            reached = _reaches(tree, call, sockets)
            if reached is not None:
                path, skips = _skips(tree, call)
                if skips:
                    found[call] = (*reached, path)
    return found


def _skips(tree: Tree, call: str) -> tuple[str | None, bool]:
    """(the rpc-config file, whether it may skip the descriptor) for a call: False where qrexec
    fails the call (125: nothing reaches the socket), True where the file says so or where we
    cannot read it (qrexec reads any size, line by line)."""
    try:
        path = lookup.find_config(call, qrexec.RPC_CONFIG_SEARCH_PATH, tree.config_exists)
    except lookup.LookupFailed:
        return None, False
    try:
        return path, tree.config(path).skip_service_descriptor is True
    except lookup.Unreadable:
        return path, True
    except lookup.LookupFailed:
        return path, False


def _forgeable_finding(call: str, link: str, what: str, config: str | None, conflict: bool) -> Finding:
    return Finding(call, f"FORGEABLE: calls of {_shown(call)} can reach {link}, {what}, with "
                   f"skip-service-descriptor=true (or a file qubes-socksvc cannot read) from {config}: "
                   "qrexec would pass the caller's own bytes as the descriptor (libqrexec/exec.c: "
                   "load_service_config_raw); remove or change that file", conflict, forgeable=True)


def forgeable(manifest: Manifest | None, root: str = "/") -> list[Finding]:
    """Forgeable calls on the disk as it is now (``check``, ``list``), whatever made them: every
    applied daemon's socket, and this manifest's."""
    found = forgeable_calls(Tree(_Disk(root), {}), sockets(root, manifest, LAYOUTS))
    return [_forgeable_finding(call, *where, conflict=not _volatile(where[2])) for call, where in found.items()]


# --- settle: what apply must write, and what it must refuse -------------------------------


class _Settler:
    def __init__(self, manifest: Manifest, layout: Layout, artifacts: list[Artifact], root: str,
                 owned: dict[str, list[str]]) -> None:
        self.manifest, self.layout, self.root = manifest, layout, root
        self.source = os.path.abspath(manifest.path)
        self.artifacts = list(artifacts)
        # What apply leaves: every path it owned removed, unless it writes the path again.
        self.tree = Tree(_Disk(root), {**dict.fromkeys(owned), **{a.path: a for a in artifacts}})
        self.sockets = sockets(root, manifest, [lay for lay in LAYOUTS if lay != layout])
        declared = {key: service.rpc_config() for key, (_, service) in manifest.services().items()}
        declared.update({key: forward.rpc_config() for key, forward in manifest.forwards.items()})
        #: our qubes-rpc link -> (its key, the rpc-config the manifest declares)
        self.declared = {f"{layout.rpc_dir}/{key}": (key, config) for key, config in declared.items()}
        self.findings: list[Finding] = []
        self._now: set[str] | None = None

    def _add(self, path: str, config: rpcconfig.Config, note: str) -> bool:
        """Pin: an rpc-config of ours at ``path``, unless one is there already."""
        if self.tree.changes.get(path) is not None:
            return False
        artifact = File(path, rpcconfig.render(config, self.source, note))
        self.artifacts.append(artifact)
        self.tree.update({path: artifact})
        return True

    def run(self) -> None:
        names = {qrexec.split_service(k)[0] for k, _ in self.declared.values()} | self.disk_names()
        for name in sorted(names):
            calls = _calls(name, self.tree.files(name))
            # A declared call's own config first: it says skip-service-descriptor=false and
            # every key as declared, so no pin (which keeps the skipping file's other keys) is
            # needed for it, or could contradict its declaration.
            for call in calls:
                self._declared_config(call)
            for call in calls:
                self._pin_forgeable(call)
            # What pinning could not fix; a volatile cause is a warning only if it is not ours to add.
            for call, (link, what, config_path) in forgeable_calls(self.tree, self.sockets, [name]).items():
                already = _volatile(config_path) and call in self.now()
                self.findings.append(_forgeable_finding(call, link, what, config_path, conflict=not already))
        for key, _ in self.declared.values():
            self._shadow(key)
        self._forward_targets()

    def probe(self, path: str) -> tuple[lookup.Kind, str | None] | None:
        return self.tree.probe_service(path, self.sockets)

    def now(self) -> set[str]:
        """The calls forgeable on the disk as it is, before apply, with the sockets that can listen
        now (what apply left: a new daemon's socket cannot)."""
        if self._now is None:
            self._now = set(forgeable_calls(Tree(self.tree.disk, {}), sockets(self.root, None, LAYOUTS)))
        return self._now

    def disk_names(self) -> set[str]:
        """The NAMEs of foreign entries and other manifests' (ours are declared)."""
        return {n for n in self.tree.names() if any(
            os.path.dirname(p) in qrexec.RPC_SEARCH_PATH and p not in self.declared
            for p in self.tree.disk.groups.get(n, ()))}

    def _pin_forgeable(self, call: str) -> None:
        if _reaches(self.tree, call, self.sockets) is None:
            return
        path, skips = _skips(self.tree, call)
        try:
            config = self.tree.config(path)
        except lookup.LookupFailed:  # unreadable to us: pin qrexec's defaults, descriptor sent
            config = rpcconfig.Config()
        keys = qrexec.lookup_keys(call)
        if skips and keys:
            pin = f"{self.layout.rpc_config_dir}/{keys[0]}"
            pinned = replace(config.away_from_defaults(), skip_service_descriptor=False)
            self._add(pin, pinned, f"Explicit: calls of {_shown(call)} can reach a socket that reads a "
                      f"descriptor; without this file they would take {path} (skip-service-descriptor=true).")

    def _declared_config(self, call: str) -> None:
        """A call that reaches one of our links gets the config its key declares."""
        try:
            found = lookup.find_file(qrexec.RPC_SEARCH_PATH, qrexec.lookup_keys(call), self.probe)
        except lookup.LookupFailed:
            return  # reported as a shadow
        if found is None or found[0] not in self.declared:
            return
        key, declared = self.declared[found[0]]
        want = declared.effective()
        own = f"{self.layout.rpc_config_dir}/{key}"
        try:
            path, got = self.tree.config_for(call)
            if got != want and self._add(own, want.only(want.differences(got)).updated(declared),
                                         f"Explicit: without this file qrexec would apply {path or 'no rpc-config'} "
                                         f"to {key} too ({', '.join(want.differences(got))})."):
                path, got = self.tree.config_for(call)
        except lookup.LookupFailed as e:
            try:
                cause = lookup.find_config(call, qrexec.RPC_CONFIG_SEARCH_PATH, self.tree.config_exists)
            except lookup.LookupFailed:
                cause = None
            if isinstance(e, lookup.Unreadable):
                if self._add(own, want,
                             f"Explicit: qubes-socksvc cannot judge {cause} ({e}), which qrexec would apply "
                             f"to {key} too."):
                    self._declared_config(call)
                    return
                self.findings.append(Finding(key, f"calls of {_shown(call)} take the rpc-config {cause}, which "
                                             f"qubes-socksvc cannot judge ({e}) but qrexec reads; remove it or "
                                             "make it smaller", not _volatile(cause)))
                return
            self.findings.append(Finding(key, f"qrexec would fail calls of {_shown(call)}: {e}", not _volatile(cause)))
            return
        if got == want:
            return
        differences = ", ".join(want.differences(got))
        if call == key or (call == _long_call(key)):
            message = (f"calls of {_shown(call)} would take the rpc-config {path} ({differences} not as "
                       "declared); remove or change that file, or rename the service")
        else:
            message = (f"calls of {_shown(call)} reach {key} but take the rpc-config {path} ({differences} "
                       f"not as declared for {key}); remove that file, or declare {call}")
        self.findings.append(Finding(key, message, not _volatile(path)))

    def _shadow(self, key: str) -> None:
        """A file that qrexec finds before our link for the calls the key is declared for (a bare
        call of NAME belongs to NAME+ where this manifest declares it: exec.c tries NAME+ first)."""
        calls = [key] if "+" in key else [*([key] if f"{self.layout.rpc_dir}/{key}+" not in self.declared else []),
                                          _long_call(key)]
        reported = set()
        for call in calls:
            try:
                found = lookup.find_file(qrexec.RPC_SEARCH_PATH, qrexec.lookup_keys(call), self.probe)
            except lookup.LookupFailed as e:
                self.findings.append(Finding(key, f"qrexec would fail calls of {_shown(call)}: {e}", False))
                return
            if found is not None and found[0] != f"{self.layout.rpc_dir}/{key}" and found[0] not in reported:
                reported.add(found[0])
                self.findings.append(Finding(key, f"calls of {_shown(call)} reach {found[0]} "
                                             f"({found[2][0].value}), which qrexec finds first: not this daemon",
                                             False))

    def _forward_targets(self) -> None:
        """A forward's socket judged where the kernel takes it: never a daemon's socket under another
        spelling, never in a directory where any user can bind a socket first."""
        for key, forward in self.manifest.forwards.items():
            target = forward.link_target
            if qrexec.is_tcp_link(target):
                continue
            resolved = resolve(self.root, target)
            unit = self.sockets.units.get(self.sockets.canonical(resolved))
            if unit is not None:
                self.findings.append(Finding(key, f"forwards.{key}.target: {target} is a socket of {unit} "
                                             f"(reached as {resolved}); declare {key} as a service of that "
                                             "daemon instead", True))
                continue
            writable = _world_writable_dir(self.root, resolved)
            if writable is not None:
                self.findings.append(Finding(key, f"forwards.{key}.target: {target} is in {writable}, where any "
                                             "user can bind a socket before the server does and receive the "
                                             "callers' data; move the server's socket to a directory only its "
                                             "owner can write (e.g. /run/SERVER/ or /run/user/UID/)", True))


def _world_writable_dir(root: str, resolved: str) -> str | None:
    """The first directory on the way to ``resolved`` that every user can write, if any."""
    path = ""
    for part in resolved.strip("/").split("/")[:-1]:
        path += "/" + part
        if path in _WORLD_WRITABLE:
            return path
        try:
            st = os.stat(install.real_path(root, path))
        except OSError:
            continue  # not (yet) there: only the well-known ones are judged
        if st.st_mode & stat.S_IWOTH:
            return path
    return None


def settle(manifest: Manifest, layout: Layout, artifacts: list[Artifact], root: str = "/",
           owned: dict[str, list[str]] | None = None) -> tuple[list[Artifact], list[Finding]]:
    """The artifacts with explicit rpc-config files added where qrexec would otherwise forge or
    change a call, and what remains wrong, judged on the whole disk as apply will leave it."""
    if owned is None:
        owned = install.load_state(root, layout)
    settler = _Settler(manifest, layout, artifacts, root, owned)
    settler.run()
    return sorted(settler.artifacts, key=lambda a: a.path), settler.findings


# --- safe_order: every state a kill can leave is safe -------------------------------------


def safe_order(plan: install.Plan, manifest: Manifest) -> install.Plan | Finding:
    """The plan with its changes ordered so that no prefix of them, which is what a kill or a failed
    write leaves, lets a call reach a descriptor-reading socket with ``skip-service-descriptor=true``
    unless it could before.  Each NAME's qubes-rpc and rpc-config changes are ordered apart (a change
    affects only calls of its NAME: exec.c looks up NAME+ARG and NAME), greedily, each step checked.

    The sockets are those of the daemons before and after (a running daemon reads its new spec
    later).  A Finding if no such order exists (seen only in random histories of kills and foreign
    files: test_every_instant, seeds 100, 107, 115, 120); then nothing is written.
    """
    root, layout = plan.root, plan.layout
    known = sockets(root, manifest, LAYOUTS)  # this layout's applied daemons too, until they reload
    applied = sockets(root, None, LAYOUTS)  # what can listen before apply writes a unit
    rpc_dirs = (layout.rpc_dir, layout.rpc_config_dir)
    groups: dict[str, list[install.Action]] = {}
    others: list[install.Action] = []
    for action in plan.changes:
        directory, file_name = os.path.split(action.path)
        if directory in rpc_dirs:
            groups.setdefault(qrexec.split_service(file_name)[0], []).append(action)
        else:
            others.append(action)
    tree = Tree(_Disk(root), {})
    ordered: list[install.Action] = []
    for name in sorted(groups):
        before = _exposed(tree, applied, name)
        pending = sorted(groups[name], key=lambda a: a.path)
        while pending:
            for action in pending:  # each write tried on the model, and undone unless taken
                undo = tree.update({action.path: None if action.verb is install.Verb.REMOVE else action.artifact})
                if _exposed(tree, known, name) <= before:
                    ordered.append(action)
                    pending.remove(action)
                    break
                tree.undo(undo)
            else:
                return Finding(name, f"no order of apply's writes for {name} keeps every call safe while it "
                               "works; apply in two steps (first remove the services of "
                               f"{name}, then add the new ones)", True)
    # Units and specs after the links and configs: a new daemon's socket unit (and so its
    # socket) exists only once every call that could reach it is pinned; a link to a socket
    # not there yet dangles, which forgeable_calls already allows for.  An enable link
    # (sockets.target.wants) comes after the unit it names and goes before it: a manager
    # never finds a wants link to a unit that is not there.
    wanted = [a for a in others if os.path.dirname(a.path) == layout.wants_dir]
    others = [a for a in others if a not in wanted]
    kept = [a for a in others if a.verb is not install.Verb.REMOVE]
    kept += [a for a in wanted if a.verb is not install.Verb.REMOVE]
    removals = [a for a in wanted if a.verb is install.Verb.REMOVE]
    removals += [a for a in others if a.verb is install.Verb.REMOVE]
    order = [*ordered, *kept, *removals]
    first = {a.path for a in order}
    return replace(plan, actions=[*order, *(a for a in plan.actions if a.path not in first)])


#: A forgeable call and its way: each entry qrexec finds, (path, Tree.entry), the last one reached.
_Exposure = tuple[str, tuple[tuple[str, tuple[str, str | None]], ...]]


def _exposed(tree: Tree, sockets: Sockets, name: str) -> set[_Exposure]:
    """How each forgeable call of NAME gets to a descriptor-reading socket: (call, the entries
    qrexec finds on its way, in lookup order, the one it connects through last).  Every entry
    before the last is skipped only while its socket is down (exec.c: find_file), so a write
    that removes one of them, or sends the call elsewhere, exposes it in a state of the sockets
    where it was safe: a link to a daemon's own socket that a socket unit started before the
    last daemon-reload still listens on (random run, seed 135), or a daemon's own socket taken
    as reading a descriptor, then its shared socket (seed 22, writes tried by path)."""
    found = set()
    for call, (link, _, _) in forgeable_calls(tree, sockets, [name]).items():
        way = []
        for path in (f"{d}/{key}" for key in qrexec.lookup_keys(call) for d in qrexec.RPC_SEARCH_PATH):
            entry = tree.entry(path)
            if entry is not None:
                way.append((path, entry))
            if path == link:
                break
        found.add((call, tuple(way)))
    return found
