# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The runtime model: the daemons and services ``serve`` needs, and the compiled spec.

``apply`` validates the manifest (manifest.py, the only YAML reader) and writes one
spec per daemon: this model as JSON, with the manifest's hash.  The unit's
``ExecStart=`` names that spec, so a running daemon depends only on what ``apply``
validated.  No YAML and no Jinja2 here: a socket-activated call waits for this
module to load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import SocksvcError
from .files import FileRefused, read_regular

#: The spec's format; a daemon refuses a spec of another version (run apply again).
SPEC_VERSION = 1
#: A spec holds a daemon's few settings and services: far less than this.
MAX_SPEC_SIZE = 4 << 20


class SpecError(SocksvcError):
    """A compiled spec that cannot be loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class Service:
    """One qrexec service (``NAME`` or ``NAME+ARG``) handled by a daemon."""

    full_name: str
    handler: str
    wait_for_session: bool | None = None
    service_descriptor: bool = True
    exit_on_client_eof: bool | None = None
    exit_on_service_eof: bool | None = None
    force_user: str | None = None
    socket: str | None = None
    """Only for ``service_descriptor: false``: the service's own socket."""
    max_input: int = 1 << 20
    """Bytes of input a call may send; 0 = unlimited (streaming handlers)."""
    timeout: float = 0
    """Seconds a call may take; 0 = no limit."""

    def rpc_config(self) -> dict[str, bool | str]:
        """The rpc-config keys this service sets, in qrexec's spelling."""
        options: dict[str, bool | str | None] = {
            "wait-for-session": self.wait_for_session,
            "skip-service-descriptor": True if not self.service_descriptor else None,
            "exit-on-client-eof": self.exit_on_client_eof,
            "exit-on-service-eof": self.exit_on_service_eof,
            "force-user": self.force_user,
        }
        return {key: value for key, value in options.items() if value is not None}


@dataclass(frozen=True)
class Daemon:
    """One runtime daemon: a user .socket/.service pair serving several services."""

    name: str
    description: str
    socket: str
    socket_mode: str = "0660"
    socket_group: str = "qubes"
    condition_user: str = "!root"
    condition_group: str = "qubes"
    idle_exit: float = 300
    max_connections: int = 256
    descriptor_timeout: float = 10
    """Seconds a caller gets to send its whole descriptor (slow or idle callers hold a slot)."""
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return f"qubes-socksvc-{self.name}"

    def sockets(self) -> dict[str, Service | None]:
        """Socket path -> the service bound to it, or None for the descriptor socket."""
        paths: dict[str, Service | None] = {self.socket: None}
        for service in self.services.values():
            if service.socket is not None:
                paths[service.socket] = service
        return paths


@dataclass(frozen=True)
class Spec:
    """A compiled spec: one daemon and the manifest it came from."""

    daemon: Daemon
    manifest: str
    manifest_sha256: str

    @property
    def id(self) -> str:
        """What STATUS= and ``list`` name the spec by: its manifest's hash, short (apply renders a
        manifest to the same spec every time; and the daemon hashes nothing at start-up)."""
        return self.manifest_sha256[:12]


def dump(daemon: Daemon, manifest: str, manifest_sha256: str) -> str:
    """The spec file's text (stable: the same daemon always gives the same bytes)."""
    data = {"version": SPEC_VERSION, "manifest": manifest, "manifest_sha256": manifest_sha256,
            "daemon": asdict(daemon)}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float),
                                       "None": (type(None),)}


def _build(cls: type[Any], values: object, where: str) -> Any:
    """``cls(**values)`` with every field's type checked: only what dump() writes loads."""
    if not isinstance(values, dict):
        raise SpecError(f"{where}: expected an object")
    known = {f.name: str(f.type) for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise SpecError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    for name, value in values.items():
        alternatives = known[name].split(" | ")
        if all(t in _TYPES for t in alternatives):
            allowed = tuple(kind for t in alternatives for kind in _TYPES[t])
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise SpecError(f"{where}.{name}: expected {known[name]}, got {type(value).__name__}")
    try:
        return cls(**values)
    except TypeError as e:
        raise SpecError(f"{where}: {e}") from e


def parse(text: str, path: str) -> Spec:
    """Validate a spec's text; raises SpecError naming ``path``."""
    fix = "run 'qubes-socksvc apply' as root to write it again"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SpecError(f"{path}: not a qubes-socksvc spec ({e}); {fix}") from e
    if not isinstance(data, dict) or data.get("version") != SPEC_VERSION:
        raise SpecError(f"{path}: not a version {SPEC_VERSION} qubes-socksvc spec; {fix}")
    raw = data.get("daemon")
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise SpecError(f"{path}: no daemon in the spec; {fix}")
    services = {key: _build(Service, value, f"{path}: daemon.services.{key}")
                for key, value in raw["services"].items()}
    daemon = _build(Daemon, {**raw, "services": services}, f"{path}: daemon")
    manifest, manifest_sha256 = data.get("manifest"), data.get("manifest_sha256")
    if not isinstance(manifest, str) or not isinstance(manifest_sha256, str):
        raise SpecError(f"{path}: no manifest recorded in the spec; {fix}")
    return Spec(daemon, manifest, manifest_sha256)


def load(path: str) -> Spec:
    """Read and validate the spec at ``path`` (a regular file, bounded)."""
    try:
        data = read_regular(path, MAX_SPEC_SIZE, "daemon's spec")
    except FileRefused as e:
        raise SpecError(f"{e}; run 'qubes-socksvc apply' as root, then 'systemctl --user daemon-reload'") from e
    try:
        return parse(data.decode("utf-8"), path)
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8; run 'qubes-socksvc apply' to write it again") from e
