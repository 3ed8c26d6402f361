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
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import SocksvcError
from .files import FileRefused, read_regular

#: The spec's format; a daemon refuses a spec of another version (run apply again).
SPEC_VERSION = 1
#: A spec holds a daemon's few settings and services: far less than this.
MAX_SPEC_SIZE = 4 << 20


#: The shortest ``idle_exit`` but 0 (never), in seconds: longer than a daemon takes to start
#: (~0.1 s), so that idle exits alone start it at most 3 times in any 2 s, far below the socket's
#: TriggerLimitBurst= (templates/socket.j2; systemd.socket(5)), and below systemd's default
#: start limit too (5 in 10 s, systemd.unit(5) StartLimitBurst=) only for idle_exit >= 2.
MIN_IDLE_EXIT = 1


def _finite(value: float) -> str | None:
    if isinstance(value, int):  # any int is finite (and math.isfinite(10**400) overflows)
        return None
    return None if math.isfinite(value) else "must be a finite number"


def at_least(minimum: float) -> Callable[[float], str | None]:
    """The rule ``value >= minimum`` (and finite): why not, or None."""
    return lambda value: _finite(value) or (None if value >= minimum else f"must be at least {minimum}")


def idle_exit_problem(value: float) -> str | None:
    """``idle_exit``: 0 (never), or at least MIN_IDLE_EXIT seconds."""
    if _finite(value) or value == 0 or value >= MIN_IDLE_EXIT:
        return _finite(value)
    return (f"must be 0 (never exit) or at least {MIN_IDLE_EXIT} seconds: a daemon that idles out "
            "sooner is started again for almost every call")


#: The value ranges of the daemon's and the services' numbers: one rule for ``check``
#: (manifest.py) and for the spec a daemon loads (``parse``), with the same messages.
DAEMON_RANGES: dict[str, Callable[[float], str | None]] = {
    "idle_exit": idle_exit_problem,
    "max_connections": at_least(1),
    "descriptor_timeout": at_least(0.1),
}
SERVICE_RANGES: dict[str, Callable[[float], str | None]] = {
    "max_input": at_least(0),
    "timeout": at_least(0),
}


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


def _build(cls: type[Any], values: object, where: str,
           ranges: dict[str, Callable[[float], str | None]]) -> Any:
    """``cls(**values)`` with every field's type and range checked: only what dump() writes loads
    (and only what ``check`` accepts: a reload must never make the daemon stop accepting)."""
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
        problem = ranges[name](value) if name in ranges else None
        if problem:
            raise SpecError(f"{where}.{name}: {problem}")
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
    services = {key: _build(Service, value, f"{path}: daemon.services.{key}", SERVICE_RANGES)
                for key, value in raw["services"].items()}
    daemon = _build(Daemon, {**raw, "services": services}, f"{path}: daemon", DAEMON_RANGES)
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
