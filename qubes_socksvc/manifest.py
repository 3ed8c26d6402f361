# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The manifest: YAML -> the validated model (model.py); every error at file:line:column.

Loading composes the YAML into nodes (so each value keeps its position) and
validates them against the schema below.  The only module that reads YAML: check,
apply, list and policy use it; a daemon never does (it loads the compiled spec).
"""

from __future__ import annotations

import hashlib
import os.path
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import yaml

from . import qrexec
from .files import FileRefused, read_regular
from .model import (
    DAEMON_RANGES,
    MAX_SOCKET_PATH,
    SERVICE_RANGES,
    Daemon,
    Forward,
    Policy,
    Service,
    forward_link,
    qubes_service_problem,
)
from .model import Manifest as Manifest  # re-exported: what load returns
from .model import ManifestError as ManifestError  # ... and what it raises
from .policy import source_problem

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
#: ConditionGroup= takes no ``@system`` (systemd.unit(5)): it would look up a group of that name.
CONDITION_GROUP_RE = re.compile(r"!?([a-z_][a-z0-9_-]*\$?|[0-9]+)\Z")
MODE_RE = re.compile(r"0?[0-7]{3}\Z")
SOCKET_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+\.sock\Z")


# --- schema -----------------------------------------------------------------


class _Problems:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []
        #: Where a dotted key was written, for checks made once everything is read.
        self.marks: dict[str, yaml.Node] = {}

    def add(self, node: yaml.Node, key: str, message: str) -> None:
        self.items.append(f"{_at(self.path, node.start_mark)}: {key}: {message}")


_TAG = "tag:yaml.org,2002:"
#: The booleans YAML 1.1 has, as PyYAML reads them (SafeConstructor.bool_values).
_BOOLEANS = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False}


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return node
    tag = node.tag.removeprefix(_TAG)
    value = node.value
    if tag == "bool":
        return _BOOLEANS.get(value.lower(), value)  # not a boolean: refused as the string it is
    # A YAML 1.1 number Python reads otherwise (octal 017, base-60 1:30, .inf) stays the string
    # written: a number field refuses it, never guesses; a string field takes it as written.
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
    kind: type[str] | type[bool] | type[int] | type[float] | None
    """The scalar's type (float: any number); None: ``parse`` reads the node."""
    check: Callable[[Any], str | None] | None = None
    parse: Callable[[yaml.Node, str, _Problems], Any] | None = None
    """For a value that is not a scalar: node, dotted key, problems -> value (None: invalid)."""


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


def _check_unit_text(value: str) -> str | None:
    """A value systemd must read back exactly: one line, no control character, no trailing
    backslash (systemd would join the next line), no blanks it would strip."""
    if not value.isprintable():
        return "must be one line of printable characters (no newline, tab or other control character)"
    if value.endswith("\\"):
        return "must not end with a backslash (systemd would join the next line to it)"
    if value != value.strip():
        return "must not start or end with blanks (systemd strips them)"
    return None


DAEMON_FIELDS: dict[str, _Field] = {
    "description": _Field(str, _check_unit_text),
    "socket": _Field(str, _check_socket),
    "socket_mode": _Field(str, _check_mode),
    "socket_group": _Field(str, _pattern(GROUP_RE, "a group name")),
    "condition_user": _Field(str, _check_condition_user),
    "condition_group": _Field(str, _pattern(CONDITION_GROUP_RE, 'a group name or GID, optionally after "!" '
                                                                '(ConditionGroup= has no @system)')),
    # Ranges: model.py's, which the daemon applies to its spec again.
    "idle_exit": _Field(float, DAEMON_RANGES["idle_exit"]),
    "max_connections": _Field(int, DAEMON_RANGES["max_connections"]),
    "descriptor_timeout": _Field(float, DAEMON_RANGES["descriptor_timeout"]),
    "qubes_service": _Field(str, qubes_service_problem),
    "enable": _Field(bool),
}
# --- policy: (see policy.py) ---------------------------------------------------------


def _callers(node: yaml.Node, key: str, problems: _Problems) -> tuple[str, ...] | None:
    """A caller or a list of callers, each a token of a policy line's source column."""
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    callers: list[str] = []
    for item in items:
        value = _scalar(item)
        if not isinstance(value, str):
            problems.add(item, key, f"expected a qube name or a keyword such as @anyvm, got {_type_name(value)}")
            return None
        problem = source_problem(value)
        if problem:
            problems.add(item, key, f"{value!r}: {problem}")
            return None
        callers.append(value)
    return tuple(callers)


def _policy_entry(node: yaml.Node, key: str, problems: _Problems, schema: dict[str, _Field]) -> Policy | None:
    values = _fields(_mapping(node, key, problems), key, schema, problems)  # the valid ones: all said at once
    seen: dict[str, str] = {}
    for verb in ("allow", "ask", "deny"):
        for caller in values.get(verb, ()):
            if caller in seen:
                problems.add(node, f"{key}.{verb}", f"{caller} is also listed under {seen[caller]}; list it once")
                return None
            seen[caller] = verb
    return Policy(**values)


def _policy_arguments(node: yaml.Node, key: str, problems: _Problems) -> tuple[tuple[str, Policy], ...]:
    problems.marks[key] = node
    arguments: dict[str, Policy] = {}
    for argument, (key_node, value_node) in _mapping(node, key, problems).items():
        if not argument or not qrexec.ARGUMENT_RE.match(argument):
            problems.add(key_node, f"{key}.{argument}", "expected an argument of [A-Za-z0-9_.+-] (without the +)")
            continue
        problems.marks[f"{key}.{argument}"] = key_node
        entry = _policy_entry(value_node, f"{key}.{argument}", problems, ARGUMENT_POLICY_FIELDS)
        if entry is not None:
            arguments[argument] = entry
    return tuple(arguments.items())


def _policy(node: yaml.Node, key: str, problems: _Problems) -> Policy | None:
    return _policy_entry(node, key, problems, POLICY_FIELDS)


#: An argument's own rules: the same, but no deeper ``arguments``.
ARGUMENT_POLICY_FIELDS: dict[str, _Field] = {
    "allow": _Field(None, parse=_callers),
    "ask": _Field(None, parse=_callers),
    "deny": _Field(None, parse=_callers),
    "default_target": _Field(bool),
    "autostart": _Field(bool),
    "notify": _Field(bool),
}
POLICY_FIELDS: dict[str, _Field] = {**ARGUMENT_POLICY_FIELDS, "arguments": _Field(None, parse=_policy_arguments)}
SERVICE_FIELDS: dict[str, _Field] = {
    "handler": _Field(str, _pattern(HANDLER_RE, '"module:callable", e.g. "mypkg.handlers:echo"')),
    "wait_for_session": _Field(bool),
    "service_descriptor": _Field(bool),
    "exit_on_client_eof": _Field(bool),
    "exit_on_service_eof": _Field(bool),
    "force_user": _Field(str, _pattern(GROUP_RE, "a user name")),
    "socket": _Field(str, _check_socket),
    "max_input": _Field(int, SERVICE_RANGES["max_input"]),
    "timeout": _Field(float, SERVICE_RANGES["timeout"]),
    "policy": _Field(None, parse=_policy),
}
_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    str: ((str,), "a string"),
    bool: ((bool,), "a boolean (true/false)"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
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
        if spec.parse is not None:
            parsed = spec.parse(value_node, f"{key}.{name}", problems)
            if parsed is not None:
                values[name] = parsed
            continue
        value = _scalar(value_node)
        assert spec.kind is not None  # a field without a kind has a parse
        types, expected = _KINDS[spec.kind]
        if not isinstance(value, types) or (spec.kind is not bool and isinstance(value, bool)):
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


#: The rpc-config keys a service's field does not spell as qrexec does (the others: ``-`` as ``_``).
_SERVICE_FIELD_OF_KEY = {"skip-service-descriptor": "service_descriptor"}


def _service(node: yaml.Node, key: str, problems: _Problems, full_name: str,
             policies: dict[str, Policy]) -> Service | None:
    """Validate one service; its ``policy:`` entry, if any, goes to ``policies``."""
    before = len(problems.items)
    values = _fields(_mapping(node, key, problems), key, SERVICE_FIELDS, problems)
    policy = values.pop("policy", None)
    if "handler" not in values and len(problems.items) == before:
        problems.add(node, key, 'missing "handler: module:callable"')
    if len(problems.items) != before:
        return None
    clash = Service(full_name=full_name, **values).rpc_config().force_user_conflicts()
    if clash:
        names = ", ".join(_SERVICE_FIELD_OF_KEY.get(k, k.replace("-", "_")) for k in clash)
        problems.add(node, key, f"force_user cannot be combined with {names} (qrexec rejects it)")
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
    if policy is not None:
        policies[full_name] = policy
    return Service(full_name=full_name, **values)


def _daemon(
    name: str, node: yaml.Node, key: str, problems: _Problems, claimed: dict[str, str],
    policies: dict[str, Policy],
) -> Daemon:
    """Validate one daemon; ``claimed`` maps services and sockets already declared to their owner.
    A daemon with problems is built all the same (its valid keys, its valid services), so that the
    rules between entries judge it too: every problem is said at once."""
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
            service = _service(value_node, service_key, problems, full_name, policies)
            if service is not None:
                services[full_name] = service
                claimed[full_name] = f"daemons.{name}"
                if service.socket is not None:
                    where = next((v for k, v in value_node.value if k.value == "socket"), value_node)
                    _claim_socket(service.socket, where, f"{service_key}.socket", problems, claimed)
    values.setdefault("description", f"qubes-socksvc daemon {name}")
    return Daemon(name=name, services=services, **values)


# --- forwards ---------------------------------------------------------------------------

def _check_forward_target(value: str) -> str | None:
    try:
        forward_link(value)
    except ValueError as e:
        return str(e)
    return None


def tcp_call_problem(link_target: str, argument: str | None) -> str | None:
    """Why qrexec fails every call with ``argument`` through a ``/dev/tcp`` link, or None
    (libqrexec/exec.c: find_qrexec_service, validate_port, qubes_tcp_connect)."""
    try:
        host, _ = qrexec.tcp_address(link_target, argument)
    except ValueError as e:
        return str(e)
    if not qrexec.is_numeric_host(host):
        return f"{host!r} is not a numeric address, and qubes_tcp_connect does no name lookup"
    return None


FORWARD_FIELDS: dict[str, _Field] = {
    "target": _Field(str, _check_forward_target),
    "service_descriptor": _Field(bool),
    "wait_for_session": _Field(bool),
    "exit_on_client_eof": _Field(bool),
    "exit_on_service_eof": _Field(bool),
    "policy": _Field(None, parse=_policy),
}


def _forward(node: yaml.Node, key: str, problems: _Problems, full_name: str,
             policies: dict[str, Policy]) -> Forward | None:
    """Validate one forward; its ``policy:`` entry, if any, goes to ``policies``."""
    before = len(problems.items)
    mapping = _mapping(node, key, problems)
    values = _fields(mapping, key, FORWARD_FIELDS, problems)
    policy = values.pop("policy", None)
    if "target" not in values and len(problems.items) == before:
        problems.add(node, key, 'missing "target: unix:/PATH" or "target: tcp:HOST:PORT"')
    if len(problems.items) != before:
        return None
    forward = Forward(full_name=full_name, **values)
    problems.marks[f"{key}.target"] = mapping["target"][1]
    if policy is not None:
        policies[full_name] = policy
    if not qrexec.is_tcp_link(forward.link_target):
        return forward
    # The key fixes the argument of every call it serves (NAME+ARG); policy arguments name others.
    name, argument = qrexec.split_service(full_name)
    calls = {f"{key}.target": argument} if argument is not None else {}
    if policy is not None:
        calls.update({f"{key}.policy.arguments.{a}": a for a, _ in policy.arguments})
    for where, call_argument in calls.items():
        problem = tcp_call_problem(forward.link_target, call_argument)
        if problem:
            fix = "change the key or the target" if where.endswith(".target") else "remove that argument"
            problems.add(problems.marks[where], where, f"qrexec would fail every call of {name}+{call_argument} "
                         f"through {forward.link_target} ({problem}; libqrexec/exec.c: find_qrexec_service): {fix}")
    return forward if len(problems.items) == before else None


def _check_across(daemons: dict[str, Daemon], forwards: dict[str, Forward], policies: dict[str, Policy],
                  problems: _Problems) -> None:
    """Rules between entries: a ``NAME`` key's policy arguments are not declared ``NAME+ARG``
    keys (those have policies of their own) and only ``NAME`` keys have them; a forward
    does not point at a socket a daemon of this manifest listens on."""
    where = {name: f"daemons.{d.name}.services.{name}" for d in daemons.values() for name in d.services}
    where.update({name: f"forwards.{name}" for name in forwards})
    for name in where:
        policy = policies.get(name)
        if policy is None or not policy.arguments:
            continue
        key = f"{where[name]}.policy.arguments"
        if "+" in name:
            problems.add(problems.marks[key], key, f"only a NAME key has per-argument rules; {name} serves "
                         "one argument: put them in its policy")
            continue
        for argument, _ in policy.arguments:
            if f"{name}+{argument}" in where:
                problems.add(problems.marks[f"{key}.{argument}"], f"{key}.{argument}",
                             f"{name}+{argument} is declared as {where[name + '+' + argument]}: "
                             "put its rules in that entry's policy")
    sockets = {path: f"daemons.{d.name}" for d in daemons.values() for path in d.sockets()}
    for name, forward in forwards.items():
        if forward.link_target in sockets:
            key = f"forwards.{name}.target"
            problems.add(problems.marks[key], key, f"{forward.link_target} is the socket of "
                         f"{sockets[forward.link_target]}; declare {name} as a service there")


def _claim_socket(path: str, node: yaml.Node, key: str, problems: _Problems, claimed: dict[str, str]) -> None:
    if path in claimed:
        problems.add(
            node,
            key,
            f"socket {path} is already used by {claimed[path]}; "
            "every daemon, and every service_descriptor: false service, needs a socket of its own",
        )
    else:
        claimed[path] = key


#: Deeper than any manifest needs (it needs 9: a policy argument's list of callers).  Deeper
#: input is refused before it is composed: libyaml's composer recurses, and ~50 000 levels
#: overflow the C stack.
MAX_DEPTH = 32
#: Aliases named one by one in the refusal; the rest are counted.
MAX_ALIASES_LISTED = 10


class _Mark(Protocol):
    """A place in the text: PyYAML's Mark, or its C parser's."""

    line: int
    column: int


def _at(path: str, mark: _Mark | None) -> str:
    """FILE:LINE:COLUMN of ``mark`` (PyYAML gives one to every event and every error it raises)."""
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path


def _check_events(text: str, path: str, loader: type) -> None:
    """Refuse, from libyaml's iterative parser's events and before anything is composed:

    - input nested deeper than MAX_DEPTH;
    - YAML aliases (``*name``, ``<<: *name``).  An alias stands for its anchor's whole value
      wherever it is used, so the work of check, apply and policy grows with the product of
      the two, not with the manifest's size: a 0.14 MiB manifest using one 1000-caller policy
      3000 times made ``policy`` print 96 MB.  Refused, the work stays bounded by
      MAX_MANIFEST_SIZE.  An anchor alone (``&name``) changes nothing and is accepted.
    """
    depth = 0
    aliases: list[str] = []
    count = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ManifestError([f"{_at(path, event.start_mark)}: nested deeper than {MAX_DEPTH} levels; "
                                     "a manifest needs at most 9"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            count += 1
            if len(aliases) < MAX_ALIASES_LISTED:
                aliases.append(f"{_at(path, event.start_mark)}: alias *{event.anchor}: YAML aliases are not "
                               "accepted (each one repeats its anchor's whole value, and the work with it); "
                               "write the value out here")
    if count > len(aliases):
        aliases.append(f"{path}: and {count - len(aliases)} more aliases")
    if aliases:
        raise ManifestError(aliases)


def parse(text: str, path: str) -> Manifest:
    """Validate manifest text; raises ManifestError listing every problem found."""
    if not path.isprintable():
        raise ManifestError([f"{path!r}: a manifest path must be printable: it is written into the units' "
                             "and rpc-config files' header comments; rename the file"])
    problems = _Problems(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_events(text, path, loader)
        root = yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        raise ManifestError([f"{_at(path, e.problem_mark or e.context_mark)}: invalid YAML: "
                             f"{e.problem or e.context}"]) from e
    except yaml.YAMLError as e:
        raise ManifestError([f"{path}: invalid YAML: {e}"]) from e
    if root is None:
        raise ManifestError([f"{path}:1:1: manifest is empty; expected \"version: 1\" and \"daemons:\""])
    top = _mapping(root, "(top level)", problems)
    daemons: dict[str, Daemon] = {}
    forwards: dict[str, Forward] = {}
    policies: dict[str, Policy] = {}
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
                daemons[daemon_name] = _daemon(daemon_name, dnode, key, problems, claimed, policies)
        elif name == "forwards":
            if _scalar(value_node) is None:
                continue
            for full_name, (fkey, fnode) in _mapping(value_node, "forwards", problems).items():
                key = f"forwards.{full_name}"
                problem = service_key_problem(full_name)
                if problem:
                    problems.add(fkey, key, problem)
                elif full_name in claimed:
                    problems.add(fkey, key, f"service already declared by {claimed[full_name]}; declare it once")
                else:
                    claimed[full_name] = "forwards"
                    forward = _forward(fnode, key, problems, full_name, policies)
                    if forward is not None:
                        forwards[full_name] = forward
        else:
            problems.add(key_node, name, "unknown key; expected one of: daemons, forwards, version")
    if isinstance(root, yaml.MappingNode) and "version" not in top:
        problems.add(root, "version", 'missing "version: 1"')
    _check_across(daemons, forwards, policies, problems)
    if problems.items:
        raise ManifestError(problems.items)
    return Manifest(path=path, daemons=daemons, forwards=forwards, policies=policies,
                    sha256=hashlib.sha256(text.encode()).hexdigest())


#: A manifest declares a few daemons; 1 MiB is thousands of services (a 50 MB file
#: took 55 s and 2.8 GB to compose).
MAX_MANIFEST_SIZE = 1 << 20


def load(path: str) -> Manifest:
    """Read and validate the manifest at ``path`` (a regular file of at most MAX_MANIFEST_SIZE)."""

    try:
        text = read_regular(path, MAX_MANIFEST_SIZE, "manifest").decode("utf-8")
    except FileRefused as e:
        raise ManifestError([str(e)]) from e
    except UnicodeDecodeError as e:
        raise ManifestError([f"{path}: cannot read manifest: not UTF-8 ({e}); save it as UTF-8"]) from e
    return parse(text, path)
