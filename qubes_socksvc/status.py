# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``list``/``status``: what is declared, rendered, listening and enabled.

Reads the file system and ``/proc/net/{unix,tcp,tcp6}`` only: looking must never
connect to a socket, since a connection would socket-activate the daemon (or
whatever a forward points at).
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import socket
import stat
import struct
import subprocess
from dataclasses import dataclass
from typing import Literal

from . import effective, install, qrexec, unixdiag
from .layout import LAYOUTS, Artifact, Layout
from .model import Daemon, Forward, Manifest

#: What qrexec connects to a socket service with (libqrexec/exec.c: find_qrexec_service:
#: ``socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)``): a SOCK_SEQPACKET listener is no server for it.
_QREXEC_SOCKET_TYPE = socket.SOCK_STREAM

UnixState = Literal["listening", "not listening", "unknown"]


@dataclass(frozen=True)
class UnixListeners:
    """What can be said, without connecting, about which socket paths a server listens on."""

    bound: frozenset[tuple[int, int]] | None
    """(st_dev, st_ino) of the file of every listening SOCK_STREAM socket, from sock_diag
    (UNIX_DIAG_VFS); None without sock_diag."""
    names: frozenset[str]
    """The exact names those sockets were bound at (UNIX_DIAG_NAME), absolute ones only."""
    claimed: frozenset[str]
    """Without sock_diag: names /proc/net/unix's text claims listen, unproven (a name can forge a line)."""
    complete: bool
    """Whether every listener was seen: if not, no path can be called "not listening"."""

    def state(self, path: str) -> UnixState:
        """``listening`` when the file at ``path`` is the very file a listening socket is bound
        to (same st_dev and st_ino), so that a connect there reaches it, whatever the spelling;
        a name alone proves nothing (a stale one outlives its file, another mount namespace
        binds the same name).  ``unknown`` when that cannot be told."""
        if self.bound is None:
            return "unknown" if path in self.claimed or not self.complete else "not listening"
        try:
            st = os.stat(path)
        except PermissionError:
            return "unknown"
        except (OSError, ValueError):  # ValueError: a NUL, which no file name holds
            return "not listening"
        listening = stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino & 0xFFFFFFFF) in self.bound
        return "listening" if listening else "not listening"


def unix_listeners() -> UnixListeners:
    """The kernel's exact list over sock_diag (unixdiag.py); without it, /proc/net/unix, whose
    claims are never trusted (_proc_net_unix_claims).  Stats nothing: UnixListeners.state stats
    only the path asked about."""
    try:
        found = unixdiag.listeners()
    except unixdiag.UnixDiagUnavailable:
        claims = _proc_net_unix_claims()
        return UnixListeners(None, frozenset(), frozenset(claims or ()), claims is not None)
    served = [listener for listener in found
              if listener.type == _QREXEC_SOCKET_TYPE and listener.vfs is not None]  # abstract: no file
    return UnixListeners(frozenset(listener.vfs for listener in served if listener.vfs is not None),
                         frozenset(os.fsdecode(listener.name) for listener in served
                                   if listener.name.startswith(b"/")),  # else relative to the binder's cwd
                         frozenset(), True)


def listening_paths() -> set[str]:
    """Names of Unix sockets proven to listen (UnixListeners.state): from the kernel's sock_diag,
    never from /proc/net/unix's text, so a name cannot forge an entry.  Stats every listener's
    name: to judge a few paths, UnixListeners.state stats only those."""
    listeners = unix_listeners()
    return {name for name in listeners.names if listeners.state(name) == "listening"}


#: One record of /proc/net/unix (net/unix/af_unix.c: unix_seq_show): ``%pK: %08X %08X %08X %04X
#: %02X %5lu``, then `` NAME`` if bound, its bytes raw (a NUL shown as ``@``).  Groups: flags,
#: type, name.
_PROC_NET_UNIX_RECORD = re.compile(
    rb"[0-9a-f]+: [0-9A-F]{8} [0-9A-F]{8} ([0-9A-F]{8}) ([0-9A-F]{4}) [0-9A-F]{2} +[0-9]+(?: (.*))?\Z", re.DOTALL)
#: include/linux/net.h: a listening socket's flags in unix_seq_show.
_SO_ACCEPTCON = 1 << 16


def _proc_net_unix_claims() -> set[str] | None:
    """Paths /proc/net/unix says a SOCK_STREAM socket listens on; None if it cannot be read.

    Only a fallback, and its claims are never proof.  The kernel prints a name raw, so a
    socket bound at ``/tmp/a\\n<a whole record naming P>`` adds a well-formed line claiming P:
    no rule on the text tells a forged line from a real one.  The converse holds, though: a
    real listener's record is always a whole line of its own (the kernel ends each with a
    newline a name cannot swallow), so a path no line claims is not listening.
    """
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    claims: set[str] = set()
    for line in lines[1:]:
        record = _PROC_NET_UNIX_RECORD.match(line)
        if record is None or record[3] is None:
            continue  # a continuation of a name (or unbound): it may also *be* a forged record
        flags, sock_type = int(record[1], 16), int(record[2], 16)
        if flags & _SO_ACCEPTCON and sock_type == _QREXEC_SOCKET_TYPE:
            claims.add(os.fsdecode(record[3]))
    return claims


#: /proc/net/tcp{,6}: state 0A is TCP_LISTEN.
_TCP_TABLES = {"/proc/net/tcp": socket.AF_INET, "/proc/net/tcp6": socket.AF_INET6}
_TCP_LISTEN = "0A"


def listening_tcp() -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every listening TCP socket in this network namespace.

    ``local_address`` is ``ADDR:PORT`` in hex: ADDR the raw bytes of the address as
    32-bit words in host byte order, PORT big-endian (net/ipv4/tcp_ipv4.c: get_tcp4_sock).
    """
    listening: set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = set()
    for table in _TCP_TABLES:
        try:
            with open(table, encoding="ascii", errors="replace") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 4 or fields[3] != _TCP_LISTEN:
                        continue
                    address, _, port = fields[1].partition(":")
                    try:
                        raw = b"".join(struct.pack("=I", int(address[i:i + 8], 16)) for i in range(0, len(address), 8))
                        listening.add((ipaddress.ip_address(raw), int(port, 16)))
                    except ValueError:
                        continue
        except OSError:
            continue
    return listening


def _serves(listener: ipaddress.IPv4Address | ipaddress.IPv6Address,
            wanted: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a socket listening on ``listener`` takes connections to ``wanted``: the same
    address, the wildcard of its family, or ``::`` for IPv4 too (dual-stack, the default)."""
    if isinstance(listener, ipaddress.IPv6Address) and listener.ipv4_mapped is not None:
        listener = listener.ipv4_mapped
    if listener == wanted or (listener.is_unspecified and listener.version == wanted.version):
        return True
    return listener.is_unspecified and listener.version == 6


def forward_state(forward: Forward, unix: UnixListeners,
                  tcp: set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]) -> str:
    """Whether the forward's target is reachable, judged from listening sockets (never by connecting)."""
    link = forward.link_target
    if not qrexec.is_tcp_link(link):
        state = unix.state(link)
        return "listening" if state == "listening" else f"{state} (no server on {link})"
    _, argument = qrexec.split_service(forward.full_name)  # a NAME+ARG key fixes the argument
    if argument is None and link == qrexec.TCP_LINK:
        return "host and port come from each call's argument"
    try:
        if argument is None and link.count("/") == 3:  # /dev/tcp/HOST: the argument is the port
            host, port = link.removeprefix(qrexec.TCP_LINK + "/"), ""
        else:
            host, port = qrexec.tcp_address(link, argument)
        _, sockaddr = qrexec.tcp_sockaddr(host, port or "1")
        wanted = ipaddress.ip_address(sockaddr[0].partition("%")[0])
    except ValueError as e:
        return f"unreachable: {e}"
    ports = sorted({p for address, p in tcp if _serves(address, wanted)})
    if not port:
        listed = ", ".join(map(str, ports)) or "none"
        return f"the port comes from each call's argument; listening on {host}: {listed}"
    return "listening" if int(port) in ports else f"not listening (nothing on {host} port {port})"


def _artifact_state(root: str, artifact: Artifact, owned: dict[str, list[str]]) -> str:
    real = install.real_path(root, artifact.path)
    current = install.current_fingerprint(real)
    if current is None:
        return "missing"
    if current == install.fingerprint(artifact):
        return "ok"
    if artifact.path in owned and current in owned[artifact.path]:
        return "outdated (run apply)"
    return "foreign or modified"


def _enabled(root: str, unit: str) -> str:
    """Who the socket is enabled for: everyone (a ``.wants`` link in either manifest's unit
    directory: ``systemctl --global enable`` or ``enable: true``), and which users of /home."""
    patterns_global = [os.path.join(root, lay.unit_dir.lstrip("/"), "*.wants", f"{unit}.socket") for lay in LAYOUTS]
    pattern_user = os.path.join(root, "home/*/.config/systemd/user/*.wants", f"{unit}.socket")
    users = sorted({p.split("/home/", 1)[1].split("/", 1)[0] for p in glob.glob(pattern_user)})
    if any(glob.glob(pattern) for pattern in patterns_global):
        return "enabled globally" + (f", and for {', '.join(users)}" if users else "")
    return f"enabled for {', '.join(users)}" if users else "not enabled"


def qubes_service_state(root: str, daemon: Daemon) -> str | None:
    """Whether the daemon's qvm-service is on in this qube (its file exists), or None (no condition)."""
    if daemon.condition_path is None:
        return None
    if os.path.exists(install.real_path(root, daemon.condition_path)):
        return f"on in this qube ({daemon.condition_path} exists)"
    return (f"off in this qube ({daemon.condition_path} is missing: in dom0, 'qvm-service --enable QUBE "
            f"{daemon.qubes_service}', then restart the qube); the units do not start")


def running_state(unit: str, spec_path: str) -> str:
    """Whether this user's daemon runs, which spec it serves (its STATUS=), and whether that is the
    applied one: asked of the user manager (``systemctl --user show`` starts nothing)."""
    from . import model

    if os.geteuid() == 0 or not os.environ.get("XDG_RUNTIME_DIR"):
        return "(run 'qubes-socksvc list' as a user to see that user's daemon)"
    try:
        shown = subprocess.run(["systemctl", "--user", "show", "-p", "ActiveState,MainPID,StatusText,NeedDaemonReload",
                                f"{unit}.service"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown (systemctl --user: {e})"
    if shown.returncode != 0:
        return f"unknown (no user manager: {shown.stderr.strip()[:100]})"
    props = dict(line.partition("=")[::2] for line in shown.stdout.splitlines())
    reload_units = "; units changed: run 'systemctl --user daemon-reload'" if props.get("NeedDaemonReload") == "yes" \
        else ""
    if props.get("ActiveState") != "active":
        return f"no ({props.get('ActiveState', 'unknown')}; it starts on the next call){reload_units}"
    serving = props.get("StatusText", "").partition(":")[0].removeprefix("spec ")
    try:
        applied = model.load(spec_path).id
    except model.SpecError:
        applied = ""
    verdict = ("the applied one" if serving == applied else
               f"not the applied {applied or '(none)'}: it reloads at its next call, or now with "
               f"'systemctl --user reload {unit}.service'")
    return f"yes (pid {props.get('MainPID')}), serving spec {serving or '(unknown)'}, {verdict}{reload_units}"


def report(manifest: Manifest, root: str = "/") -> tuple[str, bool]:
    """The listing, and whether the disk now lets a caller forge its descriptor (``list`` then fails)."""
    from . import render  # list only: importing status renders nothing

    layout = Layout.for_manifest(manifest)
    owned = install.load_state(root, layout)
    settled, findings = effective.settle(manifest, layout, render.render(manifest, layout), root, owned)
    artifacts = {a.path: a for a in settled}
    listening = unix_listeners()
    lines = [f"manifest {manifest.path}: {len(manifest.daemons)} daemons, {len(manifest.forwards)} forwards"]
    for daemon in manifest.daemons.values():
        lines.append(f"daemon {daemon.name}: {daemon.description} [{_enabled(root, daemon.unit)}]")
        service_state = qubes_service_state(root, daemon)
        if service_state is not None:
            lines.append(f"  qubes_service {daemon.qubes_service}: {service_state}")
        if daemon.enable:
            link = render.enable_link(layout, daemon.unit)
            lines.append(f"  enable link {link.path}: {_artifact_state(root, link, owned)}")
        for kind in ("socket", "service"):
            path = f"{layout.unit_dir}/{daemon.unit}.{kind}"
            lines.append(f"  unit {path}: {_artifact_state(root, artifacts[path], owned)}")
        for socket_path in daemon.sockets():
            lines.append(f"  socket {socket_path}: {listening.state(socket_path)}")
        lines.append(f"  running: {running_state(daemon.unit, install.real_path(root, layout.spec(daemon.name)))}")
        for full_name, service in daemon.services.items():
            lines.append(f"  service {full_name} -> {service.handler}")
            lines += _entry_lines(full_name, "    ", layout, artifacts, findings, root, owned)
    tcp = listening_tcp() if manifest.forwards else set()
    for full_name, forward in manifest.forwards.items():
        lines.append(f"forward {full_name} -> {forward.target}: {forward_state(forward, listening, tcp)}")
        lines += _entry_lines(full_name, "  ", layout, artifacts, findings, root, owned)
    now = effective.forgeable(manifest, root)
    lines += [f"on disk now: {finding}" for finding in now]
    return "\n".join(lines) + "\n", bool(now)


def _entry_lines(full_name: str, indent: str, layout: Layout, artifacts: dict[str, Artifact],
                 findings: list[effective.Finding], root: str, owned: dict[str, list[str]]) -> list[str]:
    """A declared key's link, rpc-config and findings."""
    link = f"{layout.rpc_dir}/{full_name}"
    lines = [f"{indent}link {link}: {_artifact_state(root, artifacts[link], owned)}"]
    config = f"{layout.rpc_config_dir}/{full_name}"
    if config in artifacts:
        lines.append(f"{indent}rpc-config {config}: {_artifact_state(root, artifacts[config], owned)}")
    return lines + [f"{indent}{finding}" for finding in findings if finding.key == full_name]
