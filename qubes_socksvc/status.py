# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``list``/``status``: what is declared, rendered, listening and enabled.

Reads the file system and ``/proc/net/unix`` only: looking must never connect
to a socket, since a connection would socket-activate the daemon.
"""

from __future__ import annotations

import glob
import os

from . import effective, install, render
from .manifest import Manifest


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


def report(manifest: Manifest, root: str = "/") -> str:
    layout = render.Layout.for_manifest(manifest)
    owned = install.load_state(root, layout)
    settled, findings = effective.settle(manifest, layout, render.render(manifest, layout), root, owned)
    artifacts = {a.path: a for a in settled}
    listening = listening_paths()
    lines = [f"manifest {manifest.path}: {len(manifest.daemons)} daemons"]
    for daemon in manifest.daemons.values():
        lines.append(f"daemon {daemon.name}: {daemon.description} [{_enabled(root, daemon.unit)}]")
        for kind in ("socket", "service"):
            path = f"{layout.unit_dir}/{daemon.unit}.{kind}"
            lines.append(f"  unit {path}: {_artifact_state(root, artifacts[path], owned)}")
        for socket_path in daemon.sockets():
            state = "listening" if socket_path in listening else "not listening"
            lines.append(f"  socket {socket_path}: {state}")
        for full_name, service in daemon.services.items():
            link = f"{layout.rpc_dir}/{full_name}"
            lines.append(f"  service {full_name} -> {service.handler}")
            lines.append(f"    link {link}: {_artifact_state(root, artifacts[link], owned)}")
            config = f"{layout.rpc_config_dir}/{full_name}"
            if config in artifacts:
                lines.append(f"    rpc-config {config}: {_artifact_state(root, artifacts[config], owned)}")
            lines += [f"    {finding}" for finding in findings if finding.key == full_name]
    return "\n".join(lines) + "\n"
