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
import socket
import struct
import subprocess

from . import effective, install, qrexec, render
from .manifest import Forward, Manifest


def listening_paths() -> set[str]:
    """Unix socket paths some process listens on (state 01 = LISTEN in /proc/net/unix)."""
    paths: set[str] = set()
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[5] == "01":
                    paths.add(fields[7])
    except OSError:
        pass
    return paths


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


def forward_state(forward: Forward, unix: set[str],
                  tcp: set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]) -> str:
    """Whether the forward's target is reachable, judged from listening sockets (never by connecting)."""
    link = forward.link_target
    if not qrexec.is_tcp_link(link):
        return "listening" if link in unix else f"not listening (no server on {link})"
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


def _artifact_state(root: str, artifact: render.Artifact, owned: dict[str, list[str]]) -> str:
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
    pattern_global = os.path.join(root, "etc/systemd/user/*.wants", f"{unit}.socket")
    pattern_user = os.path.join(root, "home/*/.config/systemd/user/*.wants", f"{unit}.socket")
    users = sorted({p.split("/home/", 1)[1].split("/", 1)[0] for p in glob.glob(pattern_user)})
    if glob.glob(pattern_global):
        return "enabled globally" + (f", and for {', '.join(users)}" if users else "")
    return f"enabled for {', '.join(users)}" if users else "not enabled"


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


def report(manifest: Manifest, root: str = "/") -> str:
    layout = render.Layout.for_manifest(manifest)
    owned = install.load_state(root, layout)
    settled, findings = effective.settle(manifest, layout, render.render(manifest, layout), root, owned)
    artifacts = {a.path: a for a in settled}
    listening = listening_paths()
    lines = [f"manifest {manifest.path}: {len(manifest.daemons)} daemons, {len(manifest.forwards)} forwards"]
    for daemon in manifest.daemons.values():
        lines.append(f"daemon {daemon.name}: {daemon.description} [{_enabled(root, daemon.unit)}]")
        for kind in ("socket", "service"):
            path = f"{layout.unit_dir}/{daemon.unit}.{kind}"
            lines.append(f"  unit {path}: {_artifact_state(root, artifacts[path], owned)}")
        for socket_path in daemon.sockets():
            state = "listening" if socket_path in listening else "not listening"
            lines.append(f"  socket {socket_path}: {state}")
        lines.append(f"  running: {running_state(daemon.unit, install.real_path(root, layout.spec(daemon.name)))}")
        for full_name, service in daemon.services.items():
            lines.append(f"  service {full_name} -> {service.handler}")
            lines += _entry_lines(full_name, "    ", layout, artifacts, findings, root, owned)
    tcp = listening_tcp() if manifest.forwards else set()
    for full_name, forward in manifest.forwards.items():
        lines.append(f"forward {full_name} -> {forward.target}: {forward_state(forward, listening, tcp)}")
        lines += _entry_lines(full_name, "  ", layout, artifacts, findings, root, owned)
    return "\n".join(lines) + "\n"


def _entry_lines(full_name: str, indent: str, layout: render.Layout, artifacts: dict[str, render.Artifact],
                 findings: list[effective.Finding], root: str, owned: dict[str, list[str]]) -> list[str]:
    """A declared key's link, rpc-config and findings."""
    link = f"{layout.rpc_dir}/{full_name}"
    lines = [f"{indent}link {link}: {_artifact_state(root, artifacts[link], owned)}"]
    config = f"{layout.rpc_config_dir}/{full_name}"
    if config in artifacts:
        lines.append(f"{indent}rpc-config {config}: {_artifact_state(root, artifacts[config], owned)}")
    return lines + [f"{indent}{finding}" for finding in findings if finding.key == full_name]
