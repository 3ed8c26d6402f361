# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The model: the daemons and services ``serve`` needs, and the compiled spec; the
manifest's forwards and policy entries, which only the tools need.

``apply`` validates the manifest (manifest.py, the only YAML reader) and writes one
spec per daemon: its :class:`Daemon` as JSON, with the manifest's hash (never its
policy: that is dom0's).  The unit's ``ExecStart=`` names that spec, so a running
daemon depends only on what ``apply`` validated.  No YAML and no Jinja2 here: a
socket-activated call waits for this module to load.
"""

from __future__ import annotations

import json
import math
import os.path
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import qrexec
from .errors import SocksvcError
from .files import FileRefused, read_regular

if TYPE_CHECKING:
    from .rpcconfig import Config

#: The spec's format; a daemon refuses a spec of another version (run apply again).
SPEC_VERSION = 1
#: A spec holds a daemon's few settings and services: far less than this.
MAX_SPEC_SIZE = 4 << 20


#: The shortest ``idle_exit`` but 0 (never), in seconds: longer than a daemon takes to start
#: (~0.1 s), so that idle exits alone start it at most 3 times in any 2 s, far below the socket's
#: TriggerLimitBurst= (templates/socket.j2; systemd.socket(5)), and below systemd's default
#: start limit too (5 in 10 s, systemd.unit(5) StartLimitBurst=) only for idle_exit >= 2.
MIN_IDLE_EXIT = 1


#: The longest time a manifest may give (about 31 years): asyncio's and uvloop's timers take it,
#: where a number with hundreds of digits overflowed them and failed every call.
MAX_SECONDS = 10**9
#: Any other number fits a C long long.
_MAX_INTEGER = 2**63 - 1


def _finite(value: float) -> str | None:
    if isinstance(value, int):  # math.isfinite(10**400) overflows
        return None if abs(value) <= _MAX_INTEGER else f"must be at most {_MAX_INTEGER}"
    return None if math.isfinite(value) else "must be a finite number"


def at_least(minimum: float) -> Callable[[float], str | None]:
    """The rule ``value >= minimum`` (and finite): why not, or None."""
    return lambda value: _finite(value) or (None if value >= minimum else f"must be at least {minimum}")


def seconds(minimum: float) -> Callable[[float], str | None]:
    """A time: at least ``minimum``, at most MAX_SECONDS."""
    least = at_least(minimum)
    return lambda value: least(value) or (None if value <= MAX_SECONDS else f"must be at most {MAX_SECONDS} seconds")


def idle_exit_problem(value: float) -> str | None:
    """``idle_exit``: 0 (never), or at least MIN_IDLE_EXIT seconds (and at most MAX_SECONDS)."""
    if _finite(value) or value == 0 or value >= MIN_IDLE_EXIT:
        return _finite(value) or seconds(0)(value)
    return (f"must be 0 (never exit) or at least {MIN_IDLE_EXIT} seconds: a daemon that idles out "
            "sooner is started again for almost every call")


#: The value ranges of the daemon's and the services' numbers: one rule for ``check``
#: (manifest.py) and for the spec a daemon loads (``parse``), with the same messages.
DAEMON_RANGES: dict[str, Callable[[float], str | None]] = {
    "idle_exit": idle_exit_problem,
    "max_connections": at_least(1),
    "descriptor_timeout": seconds(0.1),
}
SERVICE_RANGES: dict[str, Callable[[float], str | None]] = {
    "max_input": at_least(0),
    "timeout": seconds(0),
}


#: Where a qube's qvm-services appear: qubes-core-agent-linux vm-systemd/qubes-sysinit.sh creates
#: ``/run/qubes-service/NAME`` at boot for each ``/qubes-service/NAME`` that dom0 set to 1 in QubesDB.
QUBES_SERVICE_DIR = "/run/qubes-service"
#: qubes-core-admin qubes/ext/services.py: ServicesExtension.on_domain_feature_pre_set refuses a
#: ``service.NAME`` feature longer than this ("Service name must not exceed 48 bytes").
MAX_QUBES_SERVICE = 48
#: vm-systemd/qubes-sysinit.sh touches only names matching ``^[[:alnum:]_][[:alnum:]._-]*$``
#: (ASCII here: what matches in every locale); it also excludes core-admin's ``.``, ``..`` and ``/``.
QUBES_SERVICE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")


def qubes_service_problem(name: str) -> str | None:
    """Why ``name`` cannot be a qvm-service a unit waits for, or None: both sides' rules, dom0's
    (qubes-core-admin qubes/ext/services.py: on_domain_feature_pre_set) and the qube's
    (qubes-core-agent-linux vm-systemd/qubes-sysinit.sh, which skips any other name)."""
    if not QUBES_SERVICE_RE.match(name):
        return ("expected a qvm-service name of [A-Za-z0-9_.-] not starting with '.' or '-' "
                "(vm-systemd/qubes-sysinit.sh creates /run/qubes-service/NAME only for those)")
    if len(name) > MAX_QUBES_SERVICE:
        return (f"{len(name)} characters; dom0 refuses a qvm-service name longer than {MAX_QUBES_SERVICE} "
                "(qubes-core-admin qubes/ext/services.py: on_domain_feature_pre_set)")
    return None


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

    def rpc_config(self) -> Config:
        """The rpc-config keys this service sets."""
        from .rpcconfig import Config  # apply's business: the daemon never loads rpcconfig

        return Config(wait_for_session=self.wait_for_session,
                      skip_service_descriptor=None if self.service_descriptor else True,
                      exit_on_client_eof=self.exit_on_client_eof, exit_on_service_eof=self.exit_on_service_eof,
                      force_user=self.force_user)


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
    qubes_service: str | None = None
    """The qvm-service that turns the daemon on per qube: both units get
    ``ConditionPathExists=/run/qubes-service/NAME``."""
    enable: bool = False
    """``apply`` writes the ``sockets.target.wants`` link ``systemctl --global enable`` would."""

    @property
    def unit(self) -> str:
        return f"qubes-socksvc-{self.name}"

    @property
    def condition_path(self) -> str | None:
        """What both units wait for: the qvm-service's file, or None (no condition)."""
        return None if self.qubes_service is None else f"{QUBES_SERVICE_DIR}/{self.qubes_service}"

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


#: Daemon fields a spec carries only when set: specs of daemons without them stay as they were.
_OPTIONAL_IN_SPEC = {"qubes_service": None, "enable": False}


def dump(daemon: Daemon, manifest: str, manifest_sha256: str) -> str:
    """The spec file's text (stable: the same daemon always gives the same bytes)."""
    fields = {k: v for k, v in asdict(daemon).items() if k not in _OPTIONAL_IN_SPEC or v != _OPTIONAL_IN_SPEC[k]}
    data = {"version": SPEC_VERSION, "manifest": manifest, "manifest_sha256": manifest_sha256,
            "daemon": fields}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


#: The JSON values each Python field type takes (a float field takes a JSON integer too).
_JSON_KINDS: dict[object, tuple[type, ...]] = {str: (str,), bool: (bool,), int: (int,), float: (int, float),
                                               type(None): (type(None),)}


_Kinds = dict[str, tuple[str, tuple[type, ...] | None]]
_KINDS: dict[type[Any], _Kinds] = {}


def _field_kinds(cls: type[Any]) -> _Kinds:
    """Field -> (its type as written, the JSON values it takes), from the dataclass's own field
    types (typing.get_type_hints); None for a field built apart (a daemon's services)."""
    if cls in _KINDS:
        return _KINDS[cls]
    kinds: _Kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        shown = " | ".join("None" if m is type(None) else getattr(m, "__name__", str(m)) for m in members)
        allowed = tuple(k for m in members for k in _JSON_KINDS[m]) if all(m in _JSON_KINDS for m in members) \
            else None
        kinds[name] = (shown, allowed)
    _KINDS[cls] = kinds
    return kinds


def _build(cls: type[Any], values: object, where: str,
           ranges: dict[str, Callable[[float], str | None]]) -> Any:
    """``cls(**values)`` with every field's type and range checked: only what dump() writes loads
    (and only what ``check`` accepts: a reload must never make the daemon stop accepting)."""
    if not isinstance(values, dict):
        raise SpecError(f"{where}: expected an object")
    known = _field_kinds(cls)
    unknown = set(values) - set(known)
    if unknown:
        raise SpecError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    for name, value in values.items():
        shown, allowed = known[name]
        if allowed is not None and (not isinstance(value, allowed)
                                    or (isinstance(value, bool) and bool not in allowed)):
            raise SpecError(f"{where}.{name}: expected {shown}, got {type(value).__name__}")
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
    problem = daemon.qubes_service is not None and qubes_service_problem(daemon.qubes_service)
    if problem:  # it is written into units and announced to dom0: only what check accepts
        raise SpecError(f"{path}: daemon.qubes_service: {problem}; {fix}")
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


# --- the manifest's model: what check, apply, list and policy work on -------------------
#
# manifest.py reads YAML into these; render.py, install.py, effective.py and policy.py read
# them.  A daemon never sees them: it loads the compiled spec above.

#: sun_path holds 108 bytes, its NUL included.
MAX_SOCKET_PATH = 107


class ManifestError(SocksvcError):
    """One or more problems in a manifest; ``str()`` lists them, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Policy:
    """A service's or forward's ``policy:`` entry: who may call it, from which qubes."""

    allow: tuple[str, ...] = ()
    """Callers allowed without asking."""
    ask: tuple[str, ...] = ()
    """Callers for whom dom0 asks the user each time (this qube preselected)."""
    deny: tuple[str, ...] = ()
    """Callers refused outright (where a broader allow or ask would let them in)."""
    default_target: bool = False
    """Also route calls that name no target (``@default``) to this qube."""
    autostart: bool | None = None
    """``autostart=``: start this qube for a call (qrexec's default: yes)."""
    notify: bool | None = None
    """``notify=``: a notification for each allowed call (qrexec's default: no; for deny: yes)."""
    arguments: tuple[tuple[str, Policy], ...] = ()
    """(ARG, rules) per argument (``NAME`` keys only): tried before the key's own, for ``NAME+ARG`` calls."""

    def grants(self) -> tuple[str, ...]:
        """The callers some line lets in (ask or allow)."""
        return (*self.ask, *self.allow)


_TARGET_FORMS = 'expected "unix:/PATH", "tcp:HOST:PORT", "tcp:HOST" or "tcp:" (IPv6 in brackets: "tcp:[::1]:22")'


def forward_link(target: str) -> str:
    """A forward's ``target:`` -> what its qubes-rpc symlink points to; ValueError says why not.

    ``unix:/PATH`` -> PATH, absolute and normalised, at most 107 bytes (sun_path: no
    server can listen at a longer path); ``tcp:HOST:PORT`` -> ``/dev/tcp/HOST/PORT``,
    ``tcp:HOST`` -> ``/dev/tcp/HOST``, ``tcp:`` -> ``/dev/tcp`` (libqrexec/exec.c:
    find_file, find_qrexec_service), HOST numeric (qubes_tcp_connect), PORT as
    validate_port takes it.
    """
    scheme, colon, rest = target.partition(":")
    if colon and scheme == "unix":
        if not os.path.isabs(rest) or os.path.normpath(rest) != rest or rest.startswith("//"):
            raise ValueError("expected unix: and an absolute, normalised path")
        if any(c.isspace() or not c.isprintable() for c in rest):
            raise ValueError("the socket path must not contain spaces or control characters")
        if len(rest.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"the socket path is longer than {MAX_SOCKET_PATH} bytes, "
                             "the most a Unix socket address holds")
        return rest
    if not colon or scheme != "tcp":
        raise ValueError(_TARGET_FORMS)
    if not rest:
        return qrexec.TCP_LINK
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or ":" not in host or (after and not after.startswith(":")):
            raise ValueError('expected tcp:[IPv6]:PORT or tcp:[IPv6], e.g. "tcp:[::1]:22"')
        port: str | None = after[1:] if after else None
    else:
        host, colon, port = rest.partition(":")
        if ":" in port:
            raise ValueError('an IPv6 address goes in brackets, e.g. "tcp:[::1]:22"')
        port = port if colon else None
    if not qrexec.is_numeric_host(host):
        raise ValueError(f"{host!r} is not a numeric IPv4 or IPv6 address; qrexec connects without "
                         "a name lookup (libqrexec/exec.c: qubes_tcp_connect, AI_NUMERICHOST)")
    if port is not None and not qrexec.valid_port(port):
        raise ValueError(f"invalid port {port!r}: expected 1-65535 without leading zeros "
                         "(libqrexec/exec.c: validate_port)")
    return f"{qrexec.TCP_LINK}/{host}" + (f"/{port}" if port is not None else "")


@dataclass(frozen=True)
class Forward:
    """A qubes-rpc link straight to an existing Unix socket or TCP port: no daemon, no process.

    ``target`` is ``unix:/PATH``, ``tcp:HOST:PORT``, ``tcp:HOST`` (the call's argument is
    the port) or ``tcp:`` (the argument is ``HOST+PORT``); IPv6 hosts in brackets.
    """

    full_name: str
    target: str
    service_descriptor: bool = False
    """A server that is not Qubes-aware gets no descriptor (skip-service-descriptor=true)."""
    wait_for_session: bool | None = None
    exit_on_client_eof: bool | None = None
    exit_on_service_eof: bool | None = None

    @property
    def link_target(self) -> str:
        """What the qubes-rpc symlink points to: the socket path or ``/dev/tcp[/HOST[/PORT]]``."""
        return forward_link(self.target)

    def rpc_config(self) -> Config:
        """The rpc-config keys this forward sets."""
        from .rpcconfig import Config

        return Config(wait_for_session=self.wait_for_session,
                      skip_service_descriptor=None if self.service_descriptor else True,
                      exit_on_client_eof=self.exit_on_client_eof, exit_on_service_eof=self.exit_on_service_eof)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: its daemons, its forwards and who may call them."""

    path: str
    daemons: dict[str, Daemon]
    forwards: dict[str, Forward]
    policies: dict[str, Policy]
    """The ``policy:`` entries of services and forwards, by key (dom0's business, not the
    daemon's: kept out of :class:`Daemon`, so out of the compiled spec)."""
    sha256: str
    """Of the manifest's text: recorded in each compiled spec."""

    @property
    def is_local(self) -> bool:
        """The ``/usr/local`` manifest (AppVM-persistent) renders under ``/usr/local``."""
        return os.path.abspath(self.path).startswith("/usr/local/")

    def services(self) -> dict[str, tuple[Daemon, Service]]:
        return {
            full_name: (daemon, service)
            for daemon in self.daemons.values()
            for full_name, service in daemon.services.items()
        }
