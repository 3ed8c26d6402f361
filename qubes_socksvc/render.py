# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The manifest's model -> artifacts: the compiled specs, user units (Jinja2), qubes-rpc
symlinks and rpc-config files (where they go: layout.py)."""

from __future__ import annotations

import os.path
import sys
from pathlib import Path

import jinja2

from . import model, rpcconfig
from .layout import Artifact, File, Layout, Link
from .model import Manifest, ManifestError


def templates_dir() -> Path:
    """The source tree's templates/, else the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (
        here.parent / "templates",
        Path(sys.prefix) / "share/qubes-socksvc/templates",
        Path("/usr/share/qubes-socksvc/templates"),
    ):
        if (candidate / "socket.j2").is_file():
            return candidate
    raise FileNotFoundError("qubes-socksvc templates not found; reinstall the package")


def default_exec_start() -> list[str]:
    """How the units start the daemon: this interpreter running this package, in safe-path
    mode (``-P``: neither the working directory nor the script's is put on ``sys.path``, so a
    user's ``~/asyncio.py`` is never imported; handlers come from site-packages)."""
    return [sys.executable, "-P", "-m", "qubes_socksvc"]


def _unit_text(value: str) -> str:
    return value.replace("%", "%%")


def _exec_arg(value: str) -> str:
    """Quote one ExecStart= argument: systemd expands % specifiers and $ variables."""
    value = value.replace("%", "%%").replace("$", "$$")
    if any(c in value for c in ' \t"\'\\;'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["unit_text"] = _unit_text
    env.filters["exec_arg"] = _exec_arg
    return env


def render(manifest: Manifest, layout: Layout, exec_start: list[str] | None = None) -> list[Artifact]:
    """Every artifact the manifest declares, sorted by path."""
    env = _environment()
    source = os.path.abspath(manifest.path)
    command = exec_start or default_exec_start()
    artifacts: list[Artifact] = []
    for daemon in manifest.daemons.values():
        spec = layout.spec(daemon.name)
        context = {
            "manifest": source,
            "daemon": daemon,
            "exec_start": [*command, "serve", daemon.name, "--spec", spec],
        }
        spec_text = model.dump(daemon, source, manifest.sha256)
        size = len(spec_text.encode())
        if size > model.MAX_SPEC_SIZE:  # the daemon would refuse to read it (model.load)
            raise ManifestError([f"{source}: daemons.{daemon.name}: its spec would be {size} "
                                 f"bytes, more than a daemon reads ({model.MAX_SPEC_SIZE}); split its "
                                 f"{len(daemon.services)} services among more daemons"])
        artifacts.append(File(spec, spec_text))
        for kind in ("socket", "service"):
            text = env.get_template(f"{kind}.j2").render(context)
            artifacts.append(File(f"{layout.unit_dir}/{daemon.unit}.{kind}", text))
        if daemon.enable:
            artifacts.append(enable_link(layout, daemon.unit))
        for full_name, service in daemon.services.items():
            artifacts += _rpc_entry(layout, full_name, service.socket or daemon.socket, service.rpc_config(), source)
    for full_name, forward in manifest.forwards.items():  # a link and a config: no unit, no daemon
        artifacts += _rpc_entry(layout, full_name, forward.link_target, forward.rpc_config(), source)
    return sorted(artifacts, key=lambda a: a.path)


def enable_link(layout: Layout, unit: str) -> Link:
    """The link ``systemctl --global enable UNIT.socket`` makes, in the layout's unit directory."""
    return Link(f"{layout.wants_dir}/{unit}.socket", f"{layout.unit_dir}/{unit}.socket")


def _rpc_entry(layout: Layout, full_name: str, link_target: str, config: rpcconfig.Config,
               source: str) -> list[Artifact]:
    """One declared key's qubes-rpc symlink, and its rpc-config file when it sets an option."""
    link = Link(f"{layout.rpc_dir}/{full_name}", link_target)
    if config == rpcconfig.Config():
        return [link]
    return [link, File(f"{layout.rpc_config_dir}/{full_name}", rpcconfig.render(config, source))]
