"""The manifest: YAML -> a validated, typed model; every error at file:line:column.

Loading composes the YAML into nodes (so each value keeps its position) and
validates them against the schema below; no Jinja2 here, so ``serve`` can use it.
"""

from __future__ import annotations

import os.path
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import qrexec
from .errors import SocksvcError

DEFAULT_PATH = "/etc/qubes-socksvc.yaml"
LOCAL_PATH = "/usr/local/etc/qubes-socksvc.yaml"
SCHEMA_VERSION = 1

#: Socket paths must live here: qrexec's socket directory (2770 root:qubes) is
#: where the agent, running as root or the default user, meets a user manager.
ALLOWED_SOCKET_DIRS = (qrexec.SOCKET_DIR,)

DAEMON_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
HANDLER_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z"
)
GROUP_RE = re.compile(r"[a-z_][a-z0-9_-]*\$?\Z")
CONDITION_RE = re.compile(r"!?(@system|[a-z_][a-z0-9_-]*\$?|[0-9]+)\Z")
MODE_RE = re.compile(r"0?[0-7]{3}\Z")
#: sun_path holds 108 bytes, its NUL included.
MAX_SOCKET_PATH = 107
SOCKET_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+\.sock\Z")


class ManifestError(SocksvcError):
    """One or more problems in a manifest; ``str()`` lists them, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
class Manifest:
    path: str
    daemons: dict[str, Daemon]

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


# --- schema -----------------------------------------------------------------


class _Problems:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, node: yaml.Node, key: str, message: str) -> None:
        mark = node.start_mark
        self.items.append(f"{self.path}:{mark.line + 1}:{mark.column + 1}: {key}: {message}")


_TAG = "tag:yaml.org,2002:"


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return node
    tag = node.tag.removeprefix(_TAG)
    value = node.value
    if tag == "str":
        return value
    if tag == "bool":
        return value.lower() in ("yes", "true", "on", "y")
    if tag == "int":
        try:
            return int(value.replace("_", ""), 0)
        except ValueError:
            return value
    if tag == "float":
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return value
    if tag == "null":
        return None
    return value


def _type_name(value: Any) -> str:
    if isinstance(value, yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _mapping(node: yaml.Node, key: str, problems: _Problems) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node -> {key: (key node, value node)}, reporting duplicate and non-string keys."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, key, f"expected a mapping, got {_type_name(_scalar(node))}")
        return {}
    result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        name = _scalar(key_node)
        if not isinstance(name, str):
            problems.add(key_node, key, f"keys must be strings, got {_type_name(name)}")
        elif name in result:
            problems.add(key_node, f"{key}.{name}", "duplicate key; remove one of them")
        else:
            result[name] = (key_node, value_node)
    return result


@dataclass(frozen=True)
class _Field:
    kind: str  # "str", "bool", "int", "number"
    check: Callable[[Any], str | None] | None = None


def _check_mode(value: str) -> str | None:
    if not MODE_RE.match(value):
        return 'expected an octal mode such as "0660" (quote it)'
    if int(value, 8) & 0o007:
        return "the socket must not be accessible to others; use e.g. 0660"
    return None


def _check_socket(value: str) -> str | None:
    directory, name = os.path.split(value)
    if not os.path.isabs(value) or os.path.normpath(value) != value:
        return "expected an absolute, normalised path"
    if directory not in ALLOWED_SOCKET_DIRS or not SOCKET_NAME_RE.match(name):
        return f"expected {ALLOWED_SOCKET_DIRS[0]}/NAME.sock (NAME of [A-Za-z0-9_.+-])"
    if len(value.encode()) > MAX_SOCKET_PATH:
        return f"longer than {MAX_SOCKET_PATH} bytes, the most a Unix socket address holds"
    return None


def _check_condition_user(value: str) -> str | None:
    if not CONDITION_RE.match(value):
        return 'expected a user name, UID or "@system", optionally after "!"'
    if value in ("root", "0"):
        return 'the daemon refuses to run as root; use "!root" or a user name'
    return None


def _pattern(regex: re.Pattern[str], expected: str) -> Callable[[Any], str | None]:
    return lambda value: None if regex.match(value) else f"expected {expected}"


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


DAEMON_FIELDS: dict[str, _Field] = {
    "description": _Field("str"),
    "socket": _Field("str", _check_socket),
    "socket_mode": _Field("str", _check_mode),
    "socket_group": _Field("str", _pattern(GROUP_RE, "a group name")),
    "condition_user": _Field("str", _check_condition_user),
    "condition_group": _Field("str", _pattern(CONDITION_RE, 'a group name or GID, optionally after "!"')),
    "idle_exit": _Field("number", _at_least(0)),
    "max_connections": _Field("int", _at_least(1)),
    "descriptor_timeout": _Field("number", _at_least(0.1)),
}
SERVICE_FIELDS: dict[str, _Field] = {
    "handler": _Field("str", _pattern(HANDLER_RE, '"module:callable", e.g. "mypkg.handlers:echo"')),
    "wait_for_session": _Field("bool"),
    "service_descriptor": _Field("bool"),
    "exit_on_client_eof": _Field("bool"),
    "exit_on_service_eof": _Field("bool"),
    "force_user": _Field("str", _pattern(GROUP_RE, "a user name")),
    "socket": _Field("str", _check_socket),
    "max_input": _Field("int", _at_least(0)),
    "timeout": _Field("number", _at_least(0)),
}
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"),
    "bool": ((bool,), "a boolean (true/false)"),
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
}


def _fields(
    mapping: dict[str, tuple[yaml.Node, yaml.Node]], key: str, schema: dict[str, _Field], problems: _Problems,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (key_node, value_node) in mapping.items():
        if name in skip:
            continue
        spec = schema.get(name)
        if spec is None:
            known = ", ".join(sorted((*schema, *skip)))
            problems.add(key_node, f"{key}.{name}", f"unknown key; expected one of: {known}")
            continue
        value = _scalar(value_node)
        types, expected = _KINDS[spec.kind]
        if not isinstance(value, types) or (spec.kind != "bool" and isinstance(value, bool)):
            problems.add(value_node, f"{key}.{name}", f"expected {expected}, got {_type_name(value)}")
            continue
        message = spec.check(value) if spec.check else None
        if message:
            problems.add(value_node, f"{key}.{name}", message)
            continue
        values[name] = value
    return values


def service_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a qubes-rpc file name qrexec looks up, or None."""
    if len(key.encode()) > qrexec.NAME_MAX and qrexec.is_service(key):
        return (f"{len(key.encode())} bytes; qrexec never looks up a file name longer than {qrexec.NAME_MAX} "
                "(libqrexec/exec.c: find_file), so calls of it reach NAME: declare NAME and read the argument")
    if not qrexec.is_rpc_file_name(key):
        return ("invalid qrexec service name; expected NAME, NAME+ or NAME+ARG, NAME of [A-Za-z0-9_.-], "
                f"ARG of [A-Za-z0-9_.+-], at most {qrexec.NAME_MAX} bytes in all")
    return None


def _service(node: yaml.Node, key: str, problems: _Problems, full_name: str) -> Service | None:
    before = len(problems.items)
    values = _fields(_mapping(node, key, problems), key, SERVICE_FIELDS, problems)
    if "handler" not in values and len(problems.items) == before:
        problems.add(node, key, 'missing "handler: module:callable"')
    if len(problems.items) != before:
        return None
    if values.get("force_user") is not None:
        # libqrexec/exec.c: load_service_config_v2 refuses force-user only with these *set*.
        clash = [k for k, on in (("service_descriptor", False), ("exit_on_client_eof", True),
                                 ("exit_on_service_eof", True)) if values.get(k, not on) is on]
        if clash:
            problems.add(node, key, f"force_user cannot be combined with {', '.join(clash)} (qrexec rejects it)")
            return None
    descriptor = values.get("service_descriptor", True)
    if descriptor and "socket" in values:
        problems.add(node, f"{key}.socket", "only a service_descriptor: false service has its own socket")
        return None
    if not descriptor and "socket" not in values:
        values["socket"] = f"{qrexec.SOCKET_DIR}/socksvc-{full_name}.sock"
        message = _check_socket(values["socket"])
        if message:
            problems.add(node, f"{key}.socket", f"the default socket {values['socket']} is {message}; "
                         "set socket: to a shorter path")
            return None
    return Service(full_name=full_name, **values)


def _daemon(
    name: str, node: yaml.Node, key: str, problems: _Problems, claimed: dict[str, str]
) -> Daemon | None:
    """Validate one daemon; ``claimed`` maps services and sockets already declared to their owner."""
    before = len(problems.items)
    mapping = _mapping(node, key, problems)
    values = _fields(mapping, key, DAEMON_FIELDS, problems, skip=("services",))
    services: dict[str, Service] = {}
    values.setdefault("socket", f"{qrexec.SOCKET_DIR}/socksvc-{name}.sock")
    socket_node = mapping["socket"][1] if "socket" in mapping else node
    _claim_socket(values["socket"], socket_node, f"{key}.socket", problems, claimed)
    if "services" not in mapping:
        if isinstance(node, yaml.MappingNode):
            problems.add(node, key, 'missing "services:" (a mapping of service names)')
    else:
        services_node = mapping["services"][1]
        for full_name, (key_node, value_node) in _mapping(services_node, f"{key}.services", problems).items():
            service_key = f"{key}.services.{full_name}"
            problem = service_key_problem(full_name)
            if problem:
                problems.add(key_node, service_key, problem)
                continue
            if full_name in claimed:
                owner = claimed[full_name]
                problems.add(key_node, service_key, f"service already declared by {owner}; declare it once")
                continue
            service = _service(value_node, service_key, problems, full_name)
            if service is not None:
                services[full_name] = service
                claimed[full_name] = f"daemons.{name}"
                if service.socket is not None:
                    where = next((v for k, v in value_node.value if k.value == "socket"), value_node)
                    _claim_socket(service.socket, where, f"{service_key}.socket", problems, claimed)
    if len(problems.items) != before:
        return None
    values.setdefault("description", f"qubes-socksvc daemon {name}")
    return Daemon(name=name, services=services, **values)


def _claim_socket(path: str, node: yaml.Node, key: str, problems: _Problems, claimed: dict[str, str]) -> bool:
    if path in claimed:
        problems.add(
            node,
            key,
            f"socket {path} is already used by {claimed[path]}; "
            "every daemon, and every service_descriptor: false service, needs a socket of its own",
        )
        return False
    claimed[path] = key
    return True


#: Deeper than any manifest needs (it needs 5).  Deeper input is refused before it
#: is composed: libyaml's composer recurses, and ~50 000 levels overflow the C stack.
MAX_DEPTH = 32


def _check_depth(text: str, path: str, loader: type) -> None:
    """Refuse input nested deeper than MAX_DEPTH, using libyaml's iterative parser."""
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
                raise ManifestError([f"{where}: nested deeper than {MAX_DEPTH} levels; a manifest needs at most 5"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse(text: str, path: str) -> Manifest:
    """Validate manifest text; raises ManifestError listing every problem found."""
    problems = _Problems(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_depth(text, path, loader)
        root = yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ManifestError([f"{where}: invalid YAML: {e.problem or e.context}"]) from e
    except yaml.YAMLError as e:
        raise ManifestError([f"{path}: invalid YAML: {e}"]) from e
    if root is None:
        raise ManifestError([f"{path}:1:1: manifest is empty; expected \"version: 1\" and \"daemons:\""])
    top = _mapping(root, "(top level)", problems)
    daemons: dict[str, Daemon] = {}
    claimed: dict[str, str] = {}
    for name, (key_node, value_node) in top.items():
        if name == "version":
            if _scalar(value_node) != SCHEMA_VERSION or isinstance(_scalar(value_node), bool):
                problems.add(value_node, "version", f"expected {SCHEMA_VERSION}")
        elif name == "daemons":
            if _scalar(value_node) is None:
                continue  # "daemons:" with nothing under it: a manifest that declares nothing
            for daemon_name, (dkey, dnode) in _mapping(value_node, "daemons", problems).items():
                key = f"daemons.{daemon_name}"
                if not DAEMON_NAME_RE.match(daemon_name):
                    problems.add(dkey, key, "invalid daemon name; expected [a-z0-9][a-z0-9_-]*, at most 64 characters")
                    continue
                daemon = _daemon(daemon_name, dnode, key, problems, claimed)
                if daemon is not None:
                    daemons[daemon_name] = daemon
        else:
            problems.add(key_node, name, "unknown key; expected one of: daemons, version")
    if isinstance(root, yaml.MappingNode) and "version" not in top:
        problems.add(root, "version", 'missing "version: 1"')
    if problems.items:
        raise ManifestError(problems.items)
    return Manifest(path=path, daemons=daemons)


#: A manifest declares a few daemons; 1 MiB is thousands of services (a 50 MB file
#: took 55 s and 2.8 GB to compose).
MAX_MANIFEST_SIZE = 1 << 20


def load(path: str) -> Manifest:
    """Read and validate the manifest at ``path`` (a regular file of at most MAX_MANIFEST_SIZE)."""
    from .files import FileRefused, read_regular

    try:
        text = read_regular(path, MAX_MANIFEST_SIZE, "manifest").decode("utf-8")
    except FileRefused as e:
        raise ManifestError([str(e)]) from e
    except UnicodeDecodeError as e:
        raise ManifestError([f"{path}: cannot read manifest: not UTF-8 ({e}); save it as UTF-8"]) from e
    return parse(text, path)
