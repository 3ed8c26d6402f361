# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Where one manifest's artifacts go, and what an artifact is: a file or a symlink.

The qubes-rpc and rpc-config directories are qrexec's (qrexec.py's search paths); the
rest is ours.  No YAML, no Jinja2: ``install``, ``effective`` and ``list`` need these
without rendering anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from . import qrexec
from .model import Manifest


@dataclass(frozen=True)
class File:
    """A regular file at an absolute ``path``."""

    path: str
    content: str


@dataclass(frozen=True)
class Link:
    """A symlink at an absolute ``path``, pointing to ``target``."""

    path: str
    target: str


Artifact: TypeAlias = File | Link


@dataclass(frozen=True)
class Layout:
    """Where one manifest's artifacts go (absolute paths on the target system)."""

    unit_dir: str
    rpc_dir: str
    rpc_config_dir: str
    state_file: str
    spec_dir: str
    """Compiled specs, one per daemon: root-owned, world-readable (the daemons read them)."""

    def spec(self, daemon: str) -> str:
        return f"{self.spec_dir}/{daemon}.json"

    @property
    def wants_dir(self) -> str:
        """Where ``enable: true`` puts a socket's link, as ``systemctl --global enable`` would
        (the socket unit's ``WantedBy=sockets.target``; systemd.unit(5), ``.wants/``)."""
        return f"{self.unit_dir}/sockets.target.wants"

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> Layout:
        return LOCAL if manifest.is_local else SYSTEM


#: qrexec's search paths, in its order: /run (tmpfs, not ours), then /usr/local (persistent
#: in an AppVM), then /etc (the template's).
_, _LOCAL_RPC_DIR, _SYSTEM_RPC_DIR = qrexec.RPC_SEARCH_PATH
_, _LOCAL_RPC_CONFIG_DIR, _SYSTEM_RPC_CONFIG_DIR = qrexec.RPC_CONFIG_SEARCH_PATH

#: The /etc manifest's artifacts, and the AppVM-persistent /usr/local manifest's.
SYSTEM = Layout(
    unit_dir="/etc/systemd/user",
    rpc_dir=_SYSTEM_RPC_DIR,
    rpc_config_dir=_SYSTEM_RPC_CONFIG_DIR,
    state_file="/var/lib/qubes-socksvc/owned.json",
    spec_dir="/var/lib/qubes-socksvc/daemons",
)
LOCAL = Layout(
    unit_dir="/usr/local/lib/systemd/user",
    rpc_dir=_LOCAL_RPC_DIR,
    rpc_config_dir=_LOCAL_RPC_CONFIG_DIR,
    state_file="/usr/local/var/lib/qubes-socksvc/owned.json",
    spec_dir="/usr/local/var/lib/qubes-socksvc/daemons",
)
LAYOUTS = (SYSTEM, LOCAL)
