# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What each validated name may contain: one table per rule, each case through the way a user meets it.

Every table gives accepted names that together use every character the rule allows, at each
place it allows it (first character, later ones, the length limit), and refused names with
each of ``@ : / +`` the rule refuses, at the first and at a later place, and with a trailing
newline.  Above each table: where the rule comes from.  A case given by ``sourced`` is one these
tables found the code refusing or accepting against the rule's source (now fixed), with why.

Entry points: the manifest (``manifest.load``: each refusal is one problem naming the file, the
line, the column and the key; ``qubes-socksvc check`` once, for all of them), the descriptor
parser (``descriptor.parse``), rpc-config (``rpcconfig.parse``) and ``apply``'s sweep of the
temporary files an interrupted apply left.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from qubes_socksvc import descriptor, manifest, model, rpcconfig
from qubes_socksvc.manifest import ManifestError
from tests.conftest import apply_in_process, run_cli

#: The characters a character class can wrongly let in: qrexec's separators and a path's.
INTRUDERS = "@:/+"


def placed(templates: dict[str, str], chars: str = INTRUDERS) -> list[Any]:
    """Each template with each of ``chars`` where its ``^`` stands: {where: "we^b"} -> "we@b", ..."""
    return [pytest.param(template.replace("^", c), id=f"{c} {where}")
            for where, template in templates.items() for c in chars]


def cases(*items: tuple[str, str]) -> list[Any]:
    """(value, id) pairs as parameters."""
    return [pytest.param(value, id=name) for value, name in items]


def sourced(value: str, name: str, why: str) -> Any:
    """A case that an earlier pattern got wrong against its source (found by these tables): ``why``."""
    del why  # read, not run
    return pytest.param(value, id=name)


# --- the manifest -------------------------------------------------------------------------------


def manifest_text(daemon: str = "demo", service: str = "demo.Echo", daemon_values: dict[str, str] | None = None,
                  service_values: dict[str, str] | None = None, allow: Iterable[str] | None = None,
                  arguments: Iterable[str] | None = None) -> str:
    """One daemon with one service; every name written as a YAML double-quoted scalar (JSON's)."""
    q = json.dumps
    lines = ["version: 1", "daemons:", f"  {q(daemon)}:"]
    lines += [f"    {k}: {q(v)}" for k, v in (daemon_values or {}).items()]
    lines += ["    services:", f"      {q(service)}:"]
    values = {"handler": "qubes_socksvc.examples:echo", **(service_values or {})}
    lines += [f"        {k}: {q(v)}" for k, v in values.items()]
    if allow is not None or arguments is not None:
        lines.append("        policy:")
        if allow is not None:
            lines.append(f"          allow: {q(list(allow))}")
        if arguments is not None:
            lines.append("          arguments:")
            lines += [f"            {q(a)}: {{allow: [work]}}" for a in arguments]
    return "\n".join(lines) + "\n"


def forward_text(target: str) -> str:
    return f"version: 1\nforwards:\n  my.Fwd:\n    target: {json.dumps(target)}\n"


def load(tmp_path: Path, text: str) -> model.Manifest:
    path = tmp_path / "qubes-socksvc.yaml"
    path.write_text(text)
    return manifest.load(str(path))


def assert_refused(tmp_path: Path, text: str, key: str, words: str) -> None:
    """The manifest is refused for exactly one problem: FILE:LINE:COLUMN: KEY: ...WORDS..."""
    path = tmp_path / "qubes-socksvc.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as error:
        manifest.load(str(path))
    problems = error.value.problems
    assert len(problems) == 1, problems
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: {re.escape(key)}: ", problems[0]), problems
    assert words in problems[0], problems


# --- daemon names -------------------------------------------------------------------------------
# daemons.NAME becomes the units qubes-socksvc-NAME.socket and .service and the socket
# /run/qubes/socksvc-NAME.sock.  systemd.unit(5), "Valid unit names" (unit_name_is_valid): ASCII
# letters, digits, ":", "-", "_", ".", "\"; "@" makes a unit an instance of a template; "/" and "+"
# are not unit name characters (and "/" would make the socket path a directory).  The manifest
# (qubes-socksvc.yaml(5), TOP-LEVEL KEYS) narrows this to [a-z0-9][a-z0-9_-]*, at most 64 characters.

DAEMON_NAMES = cases(
    ("a", "a letter alone"),
    ("7", "a digit alone"),
    ("sys-net_2", "letters, -, _ and a digit after the first"),
    ("0" + "a" * 63, "64 characters, a digit first"),
)
BAD_DAEMON_NAMES = [
    *placed({"first": "^web", "later": "we^b"}),
    *cases(
        ("web\n", "a trailing newline"),
        ("0" + "a" * 64, "65 characters"),
        ("Web", "an upper-case letter"),
        ("_web", "_ first"),
        ("-web", "- first"),
        ("my.web", "a dot"),
        ("", "empty"),
    ),
]


@pytest.mark.parametrize("name", DAEMON_NAMES)
def test_a_daemon_name_accepted(name: str, tmp_path: Path) -> None:
    daemon = load(tmp_path, manifest_text(daemon=name)).daemons[name]
    assert daemon.socket == f"/run/qubes/socksvc-{name}.sock"


@pytest.mark.parametrize("name", BAD_DAEMON_NAMES)
def test_a_daemon_name_refused(name: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(daemon=name), f"daemons.{name}", "invalid daemon name")


# --- handlers -----------------------------------------------------------------------------------
# "module:callable" (qubes-socksvc.yaml(5), SERVICE KEYS): a dotted module path, then a dotted
# attribute path, each part a Python identifier (The Python Language Reference, "Identifiers and
# keywords"), ASCII only: a letter or _ first, then letters, digits and _.

HANDLERS = cases(
    ("mypkg.handlers:echo.run", "lower-case letters first and later, in each of the four parts"),
    ("PKG.UI:HTTP.GET", "upper-case letters first and later, in each part"),
    ("_my_pkg._sub_mod:_echo_.__call__", "_ first and later, in each part"),
    ("pkg2.v3:echo4.run5", "digits after the first character, in each part"),
)
BAD_HANDLERS = [
    *placed({
        "module first": "^mod:func", "module later": "mo^d:func",
        "submodule first": "mod.^sub:func", "submodule later": "mod.su^b:func",
        "callable first": "mod:^func", "callable later": "mod:fu^nc",
        "attribute first": "mod:func.^attr", "attribute later": "mod:func.at^tr",
    }),
    *cases(
        ("mod:func\n", "a trailing newline"),
        ("2mod:func", "a digit first in the module"),
        ("mod:2func", "a digit first in the callable"),
        ("mod.:func", "an empty module part"),
        ("mod:func.", "an empty attribute"),
        ("mod", "no callable"),
        ("mod:fünc", "a non-ASCII letter"),
    ),
]


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_handler_accepted(handler: str, tmp_path: Path) -> None:
    parsed = load(tmp_path, manifest_text(service_values={"handler": handler}))
    assert parsed.daemons["demo"].services["demo.Echo"].handler == handler


@pytest.mark.parametrize("handler", BAD_HANDLERS)
def test_a_handler_refused(handler: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(service_values={"handler": handler}),
                   "daemons.demo.services.demo.Echo.handler", '"module:callable"')


# --- group and user names: socket_group, force_user ---------------------------------------------
# shadow-utils' is_valid_name (libmisc/chkname.c), the NAME_REGEX useradd and groupadd apply by
# default: [a-z_][a-z0-9_-]*[$]? (a trailing $ for Samba machine accounts).  socket_group becomes
# SocketGroup= (systemd.socket(5)); force_user becomes rpc-config force-user (libqrexec/toml.c).

GROUPS = cases(
    ("qubes", "lower-case letters"),
    ("_ssh", "_ first"),
    ("user1", "a digit later"),
    ("socket_users", "_ later"),
    ("sys-admin", "- later"),
    ("host$", "a trailing $"),
)
BAD_GROUPS = [
    *placed({"first": "^qubes", "later": "qu^bes"}),
    *cases(
        ("qubes\n", "a trailing newline"),
        ("Qubes", "an upper-case letter"),
        ("1qubes", "a digit first"),
        ("-qubes", "- first"),
        ("a$b", "$ not at the end"),
        ("$", "$ alone"),
        ("", "empty"),
    ),
]
GROUP_KEYS = [
    pytest.param(("daemon", "socket_group", "a group name"), id="socket_group"),
    pytest.param(("service", "force_user", "a user name"), id="force_user"),
]


def _with_value(where: str, key: str, value: str) -> tuple[str, str]:
    """(manifest text, dotted key) with ``key: value`` in the daemon or in its service."""
    if where == "daemon":
        return manifest_text(daemon_values={key: value}), f"daemons.demo.{key}"
    return manifest_text(service_values={key: value}), f"daemons.demo.services.demo.Echo.{key}"


@pytest.mark.parametrize("field", GROUP_KEYS)
@pytest.mark.parametrize("name", GROUPS)
def test_a_group_or_user_name_accepted(field: tuple[str, str, str], name: str, tmp_path: Path) -> None:
    where, key, _ = field
    daemon = load(tmp_path, _with_value(where, key, name)[0]).daemons["demo"]
    assert getattr(daemon if where == "daemon" else daemon.services["demo.Echo"], key) == name


@pytest.mark.parametrize("field", GROUP_KEYS)
@pytest.mark.parametrize("name", BAD_GROUPS)
def test_a_group_or_user_name_refused(field: tuple[str, str, str], name: str, tmp_path: Path) -> None:
    where, key, words = field
    text, dotted = _with_value(where, key, name)
    assert_refused(tmp_path, text, dotted, f"expected {words}")


# --- ConditionUser= and ConditionGroup= ---------------------------------------------------------
# systemd.unit(5): ConditionUser= "takes a numeric UID, a UNIX user name, or the special value
# @system"; ConditionGroup= takes a group name or GID and "does not support the special value
# @system"; either may be negated with "!".  Names as above (is_valid_name).  condition_user
# refuses root and 0 (the daemon refuses to run as root).

CONDITIONS = cases(
    ("qubes", "a name"),
    ("!qubes", "a negated name"),
    ("_ssh", "_ first"),
    ("user1", "a digit later"),
    ("socket_users", "_ later"),
    ("sys-admin", "- later"),
    ("host$", "a trailing $"),
    ("1000", "a number"),
    ("!1000", "a negated number"),
)
BAD_CONDITIONS = [
    *placed({"name first": "^qubes", "name later": "qu^bes", "number first": "^1000", "number later": "10^00"}),
    *cases(
        ("qubes\n", "a name and a trailing newline"),
        ("1000\n", "a number and a trailing newline"),
        ("!qubes\n", "negated, a trailing newline"),
        ("Qubes", "an upper-case letter"),
        ("-qubes", "- first"),
        ("!!qubes", "two !"),
        ("|qubes", "a trigger |"),
        ("a$b", "$ not at the end"),
        ("", "empty"),
    ),
]
CONDITION_KEYS = [
    pytest.param(("condition_user", 'a user name, UID or "@system"'), id="condition_user"),
    pytest.param(("condition_group", "a group name or GID"), id="condition_group"),
]


@pytest.mark.parametrize("field", CONDITION_KEYS)
@pytest.mark.parametrize("value", CONDITIONS)
def test_a_condition_accepted(field: tuple[str, str], value: str, tmp_path: Path) -> None:
    key, _ = field
    assert getattr(load(tmp_path, manifest_text(daemon_values={key: value})).daemons["demo"], key) == value


@pytest.mark.parametrize("field", CONDITION_KEYS)
@pytest.mark.parametrize("value", BAD_CONDITIONS)
def test_a_condition_refused(field: tuple[str, str], value: str, tmp_path: Path) -> None:
    key, words = field
    assert_refused(tmp_path, manifest_text(daemon_values={key: value}), f"daemons.demo.{key}", f"expected {words}")


@pytest.mark.parametrize("value", cases(("@system", "@system"), ("!@system", "negated @system")))
def test_condition_user_takes_system(value: str, tmp_path: Path) -> None:
    daemon = load(tmp_path, manifest_text(daemon_values={"condition_user": value})).daemons["demo"]
    assert daemon.condition_user == value


@pytest.mark.parametrize("value", [
    sourced("@system", "@system", "systemd.unit(5): ConditionGroup= does not support @system (it looks up a group "
          "named @system, which never exists: the daemon would never start)"),
    sourced("!@system", "negated @system", "systemd.unit(5): ConditionGroup= does not support @system (negated: "
          "always true)"),
])
def test_condition_group_does_not_take_system(value: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(daemon_values={"condition_group": value}), "daemons.demo.condition_group",
                   "expected a group name or GID")


@pytest.mark.parametrize("value", cases(("root", "root"), ("0", "UID 0")))
def test_condition_user_is_never_root(value: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(daemon_values={"condition_user": value}), "daemons.demo.condition_user",
                   "refuses to run as root")


# --- socket_mode --------------------------------------------------------------------------------
# SocketMode= (systemd.socket(5)): an octal mode; the manifest takes three octal digits, with an
# optional leading 0, and no bits for others.

MODES = cases(("660", "three digits"), ("0660", "a leading 0"), ("0600", "owner only"), ("0770", "with x"),
              ("0750", "group r-x"))
BAD_MODES = [
    *placed({"first": "^60", "later": "0^60"}),
    *cases(
        ("0660\n", "a trailing newline"),
        ("0668", "an 8"),
        ("66", "two digits"),
        ("06600", "five digits"),
        ("1660", "four digits, not 0 first"),
    ),
]


@pytest.mark.parametrize("mode", MODES)
def test_a_socket_mode_accepted(mode: str, tmp_path: Path) -> None:
    assert load(tmp_path, manifest_text(daemon_values={"socket_mode": mode})).daemons["demo"].socket_mode == mode


@pytest.mark.parametrize("mode", BAD_MODES)
def test_a_socket_mode_refused(mode: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(daemon_values={"socket_mode": mode}), "daemons.demo.socket_mode",
                   "expected an octal mode")


# --- socket paths -------------------------------------------------------------------------------
# qubes-socksvc.yaml(5), DAEMON KEYS: /run/qubes/X.sock, X of [A-Za-z0-9_.+-] ("+": the default
# socket of a service_descriptor: false NAME+ARG service is /run/qubes/socksvc-NAME+ARG.sock).
# "/" cannot be in X: the path would leave /run/qubes.

SOCKETS = cases(
    ("/run/qubes/socksvc-demo.sock", "lower-case letters and -"),
    ("/run/qubes/MY_APP.sock", "upper-case letters and _"),
    ("/run/qubes/app2.0.sock", "digits and ."),
    ("/run/qubes/+my.Raw+arg.sock", "+ first and later"),
)
BAD_SOCKETS = [
    *placed({"first": "/run/qubes/^demo.sock", "later": "/run/qubes/de^mo.sock"}, chars="@:"),
    *cases(
        ("/run/qubes/de/mo.sock", "/ (the path leaves /run/qubes)"),
        ("/run/qubes/demo.sock\n", "a trailing newline"),
        ("/run/qubes/.sock", "no name before .sock"),
        ("/run/qubes/demo.socket", "not .sock"),
        ("/run/qubes/de mo.sock", "a space"),
    ),
]


@pytest.mark.parametrize("socket", SOCKETS)
def test_a_socket_path_accepted(socket: str, tmp_path: Path) -> None:
    assert load(tmp_path, manifest_text(daemon_values={"socket": socket})).daemons["demo"].socket == socket


@pytest.mark.parametrize("socket", BAD_SOCKETS)
def test_a_socket_path_refused(socket: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(daemon_values={"socket": socket}), "daemons.demo.socket",
                   "expected /run/qubes/NAME.sock")


# --- qubes_service ------------------------------------------------------------------------------
# qubes-core-agent-linux vm-systemd/qubes-sysinit.sh creates /run/qubes-service/NAME only for
# names matching ^[[:alnum:]_][[:alnum:]._-]*$ (ASCII: alike in every locale); qubes-core-admin
# qubes/ext/services.py: on_domain_feature_pre_set refuses a name longer than 48 bytes.

QUBES_SERVICES = cases(
    ("my-service", "lower-case letters, - later"),
    ("Split_GPG2", "upper-case letters, _ and a digit later"),
    ("9p.share", "a digit first, . later"),
    ("_private", "_ first"),
    ("S" + "s" * 47, "48 characters"),
)
BAD_QUBES_SERVICES = [
    *placed({"first": "^vault", "later": "va^ult"}),
    *cases(
        ("vault\n", "a trailing newline"),
        (".vault", ". first"),
        ("-vault", "- first"),
        ("S" + "s" * 48, "49 characters"),
        ("", "empty"),
    ),
]


@pytest.mark.parametrize("name", QUBES_SERVICES)
def test_a_qubes_service_accepted(name: str, tmp_path: Path) -> None:
    assert load(tmp_path, manifest_text(daemon_values={"qubes_service": name})).daemons["demo"].qubes_service == name


@pytest.mark.parametrize("name", BAD_QUBES_SERVICES)
def test_a_qubes_service_refused(name: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(daemon_values={"qubes_service": name}), "daemons.demo.qubes_service",
                   "qvm-service name" if len(name) <= 48 else "longer than 48")


# --- qrexec service names (NAME) ----------------------------------------------------------------
# daemon/qrexec-daemon.c: validate_service_name, then sanitize_name(service, "+"): [A-Za-z0-9_.-],
# and "+", which ends NAME (libqrexec/exec.c: parse_qubes_rpc_command splits at the first "+").
# A NAME longer than 255 bytes can never be looked up (libqrexec/exec.c: find_file, NAME_MAX).
# Met as a manifest's service key and as the SERVICE of a descriptor.

NAMES = cases(
    ("qubes.Filecopy", "letters of both cases and ."),
    ("my-service", "-"),
    ("my_service", "_"),
    ("svc2", "a digit"),
    ("N" * 255, "255 bytes"),
)
BAD_NAMES = [
    *placed({"first": "^svc", "later": "s^vc"}, chars="@:/"),
    *cases(("svc\n", "a trailing newline"), ("N" * 256, "256 bytes")),
]


@pytest.mark.parametrize("name", NAMES)
def test_a_service_name_accepted(name: str, tmp_path: Path) -> None:
    assert name in load(tmp_path, manifest_text(service=name)).daemons["demo"].services
    parsed = descriptor.parse(f"{name} work".encode())
    assert (parsed.name, parsed.argument) == (name, None)


@pytest.mark.parametrize("name", [*BAD_NAMES, *cases(("", "empty"))])
def test_a_service_name_refused(name: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(service=name), f"daemons.demo.services.{name}",
                   "invalid qrexec service name")
    with pytest.raises(descriptor.DescriptorError, match="invalid service name or argument"):
        descriptor.parse(f"{name} work".encode())


# --- qrexec service arguments (ARG) -------------------------------------------------------------
# sanitize_name(service, "+") again: the argument, everything after the first "+", is of
# [A-Za-z0-9_.+-] and may be empty (a call of NAME+) or hold more "+" (qubes.ConnectTCP+fe80++1+22).
# Met in a manifest's NAME+ARG service key, in a policy's "arguments:" (not empty there: the
# empty argument is the NAME+ call) and in a descriptor's SERVICE.

ARGUMENTS = cases(
    ("Friend", "letters of both cases"),
    ("v2", "a digit"),
    ("a_b", "_"),
    ("a.b", "."),
    ("a-b", "-"),
    ("+x", "+ first"),
    ("fe80++1+22", "+ later"),
)
BAD_ARGUMENTS = [
    *placed({"first": "^arg", "later": "a^rg"}, chars="@:/"),
    *cases(("arg\n", "a trailing newline")),
]


@pytest.mark.parametrize("argument", [*ARGUMENTS, *cases(("", "empty"))])
def test_an_argument_accepted(argument: str, tmp_path: Path) -> None:
    key = f"demo.Echo+{argument}"
    assert key in load(tmp_path, manifest_text(service=key)).daemons["demo"].services
    parsed = descriptor.parse(f"{key} work".encode())
    assert (parsed.name, parsed.argument) == ("demo.Echo", argument)


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_an_argument_accepted_in_a_policy(argument: str, tmp_path: Path) -> None:
    policy = load(tmp_path, manifest_text(arguments=[argument])).policies["demo.Echo"]
    assert [a for a, _ in policy.arguments] == [argument]


@pytest.mark.parametrize("argument", BAD_ARGUMENTS)
def test_an_argument_refused(argument: str, tmp_path: Path) -> None:
    key = f"demo.Echo+{argument}"
    assert_refused(tmp_path, manifest_text(service=key), f"daemons.demo.services.{key}",
                   "invalid qrexec service name")
    with pytest.raises(descriptor.DescriptorError, match="invalid service name or argument"):
        descriptor.parse(f"{key} work".encode())


@pytest.mark.parametrize("argument", [*BAD_ARGUMENTS, *cases(("", "empty"))])
def test_an_argument_refused_in_a_policy(argument: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(arguments=[argument]),
                   f"daemons.demo.services.demo.Echo.policy.arguments.{argument}", "expected an argument")


# --- source qubes -------------------------------------------------------------------------------
# The descriptor's SOURCE: qrexec-daemon passes the calling qube's name, of [A-Za-z0-9_.-]
# (sanitize_name without extras), at most 31 characters (qubes-core-admin qubes/vm/__init__.py:
# validate_name; libxl).  A policy's callers take the same names (qrexec/policy/parser.py: Source).
# qubes-core-admin's validate_name also wants a letter first (\A[a-zA-Z][a-zA-Z0-9_.-]*\Z): a policy
# line naming anything else names no qube.

SOURCES = cases(
    ("dom0", "lower-case letters and a digit"),
    ("sys-net", "-"),
    ("Work_VM", "upper-case letters and _"),
    ("my.qube", "."),
    ("w" + "x" * 30, "31 characters"),
)
BAD_SOURCES = [
    *placed({"first": "^work", "later": "wo^rk"}),
    *cases(("work\n", "a trailing newline"), ("w" + "x" * 31, "32 characters"), ("", "empty")),
]


@pytest.mark.parametrize("source", SOURCES)
def test_a_source_accepted(source: str, tmp_path: Path) -> None:
    assert descriptor.parse(f"demo.Echo {source}".encode()).source == source
    assert load(tmp_path, manifest_text(allow=[source])).policies["demo.Echo"].allow == (source,)


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_a_source_refused(source: str, tmp_path: Path) -> None:
    with pytest.raises(descriptor.DescriptorError, match="invalid source domain"):
        descriptor.parse(f"demo.Echo {source}".encode())
    assert_refused(tmp_path, manifest_text(allow=[source]), "daemons.demo.services.demo.Echo.policy.allow",
                   repr(source))


@pytest.mark.parametrize("source", [
    sourced(name, f"{name[0]} first", "qubes-core-admin qubes/vm/__init__.py: validate_name wants a letter first, "
          "so a policy line naming it matches no caller")
    for name in ("0work", "_work", ".work", "-work")
])
def test_a_policy_caller_no_qube_can_have_is_refused(source: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(allow=[source]), "daemons.demo.services.demo.Echo.policy.allow",
                   repr(source))


# --- requested targets --------------------------------------------------------------------------
# dom0's descriptor: TARGET_TYPE TARGET, the target of sanitize_name(target, "@:"): [A-Za-z0-9_.@:-]
# (keywords arrive without their leading "@": @dispvm:@tag:T -> dispvm:@tag:T), at most 63
# characters (qrexec/tools/qrexec_policy_daemon.py).

TARGETS = cases(
    ("dom0", "lower-case letters and a digit"),
    ("Work_2.x", "upper-case letters, _, a digit and ."),
    ("dispvm:default-dvm", ": and -"),
    ("dispvm:@tag:my-tag", "@ later"),
    ("@adminvm", "@ first"),
    ("uuid:0123abcd-4e5f-6a7b-8c9d-0123456789ef", "a uuid"),
    ("t" * 63, "63 characters"),
)
BAD_TARGETS = [
    *placed({"first": "^work", "later": "wo^rk"}, chars="/+"),
    *cases(("work\n", "a trailing newline"), ("t" * 64, "64 characters"), ("", "empty")),
]


@pytest.mark.parametrize("target_type", ["name", "keyword"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_target_accepted(target: str, target_type: str) -> None:
    parsed = descriptor.parse(f"demo.Echo dom0 {target_type} {target}".encode())
    assert (parsed.target_type, parsed.target) == (target_type, target)


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_a_target_refused(target: str) -> None:
    with pytest.raises(descriptor.DescriptorError, match="invalid target"):
        descriptor.parse(f"demo.Echo dom0 name {target}".encode())


# --- policy words: @tag:TAG, @type:TYPE ---------------------------------------------------------
# qrexec/policy/parser.py (TagVM, TypeVM) takes any word after the prefix and compares it with
# what dom0 knows: tags are of [A-Za-z0-9_-] (qubes-core-admin qubes/vm/__init__.py:
# Tags.validate_tag), types are class names (AppVM, DispVM, ...).

WORDS = cases(
    ("@tag:my-tag_2", "a tag of lower-case letters, -, _ and a digit"),
    ("@tag:Work", "a tag with an upper-case letter"),
    ("@type:AppVM", "a type"),
    ("@type:DispVM", "another type"),
    ("@type:_Remote_VM2", "a class name with _ first, _ and a digit later"),
    ("@type:myVM", "a class name with a lower-case letter first"),
)
BAD_WORDS = [
    *placed({"tag first": "@tag:^work", "tag later": "@tag:wo^rk", "type first": "@type:^AppVM",
             "type later": "@type:App^VM"}),
    *cases(("@tag:work\n", "a tag and a trailing newline"), ("@tag:", "an empty tag"), ("@type:", "an empty type")),
    sourced("@tag:my.tag", "a tag with .", "qubes-core-admin Tags.validate_tag refuses '.', so no qube has that tag "
          "and the line matches no caller"),
    *cases(("@type:AppVM\n", "a type and a trailing newline")),
    *(sourced(caller, name, "TypeVM.match compares with a class name: a Python identifier, so this matches no caller")
      for caller, name in (("@type:App.VM", "a type with ."), ("@type:App-VM", "a type with -"),
                           ("@type:2VM", "a type with a digit first"))),
]


@pytest.mark.parametrize("caller", WORDS)
def test_a_tag_or_type_accepted(caller: str, tmp_path: Path) -> None:
    assert load(tmp_path, manifest_text(allow=[caller])).policies["demo.Echo"].allow == (caller,)


@pytest.mark.parametrize("caller", BAD_WORDS)
def test_a_tag_or_type_refused(caller: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(allow=[caller]), "daemons.demo.services.demo.Echo.policy.allow",
                   "expected @tag:NAME" if caller.startswith("@tag:") else "expected @type:NAME")


# --- uuid:UUID callers ----------------------------------------------------------------------------
# qrexec/policy/parser.py: match_strings compares uuid:X with the qube's uuid as dom0 stores it,
# str(uuid.UUID): lower-case hex in groups of 8-4-4-4-12 (dom0 is uuid:00000000-...: is_dom0).

GOOD_UUID = "uuid:0123abcd-4e5f-6a7b-8c9d-0123456789ef"
UUIDS = cases(
    (GOOD_UUID, "digits and letters in every group"),
    ("uuid:00000000-0000-0000-0000-000000000000", "dom0's"),
)


def _uuid_spots() -> dict[str, str]:
    """GOOD_UUID with ^ at the first and at a later character of each group."""
    spots = {}
    for group, start in enumerate((5, 14, 19, 24, 29), 1):
        for where, at in (("first", start), ("later", start + 2)):
            spots[f"group {group} {where}"] = GOOD_UUID[:at] + "^" + GOOD_UUID[at + 1:]
    return spots


BAD_UUIDS = [
    *placed(_uuid_spots()),
    *cases(
        (GOOD_UUID + "\n", "a trailing newline"),
        (GOOD_UUID.upper().replace("UUID:", "uuid:"), "upper-case hex"),
        (GOOD_UUID[:-1], "a short last group"),
        (GOOD_UUID + "0", "a long last group"),
        (GOOD_UUID.replace("-", ""), "no hyphens"),
        ("uuid:0123abcg-4e5f-6a7b-8c9d-0123456789ef", "not hex"),
    ),
]


@pytest.mark.parametrize("caller", UUIDS)
def test_a_uuid_caller_accepted(caller: str, tmp_path: Path) -> None:
    assert load(tmp_path, manifest_text(allow=[caller])).policies["demo.Echo"].allow == (caller,)


@pytest.mark.parametrize("caller", BAD_UUIDS)
def test_a_uuid_caller_refused(caller: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, manifest_text(allow=[caller]), "daemons.demo.services.demo.Echo.policy.allow",
                   "a lower-case UUID")


# --- IPv6 scopes in a forward's target ----------------------------------------------------------
# tcp:[ADDRESS%SCOPE]:PORT becomes the link /dev/tcp/ADDRESS%SCOPE/PORT; libqrexec/exec.c:
# qubes_tcp_connect hands the host to getaddrinfo, whose scope is an interface name or index
# (glibc inet6_scopeid_pton).  Linux interface names (net/core/dev.c: dev_valid_name): 1 to 15
# bytes (IFNAMSIZ - 1), not "." or "..", no "/", ":" or white space.  The manifest also refuses
# "@" and "+" (legal in an interface name, but in no real one).

SCOPES = cases(
    ("eth0", "lower-case letters and a digit"),
    ("WAN", "upper-case letters"),
    ("br-lan", "-"),
    ("wlan_1", "_"),
    ("eth0.100", ". (a VLAN)"),
    ("2", "an interface index"),
    ("e" * 15, "15 characters"),
)
BAD_SCOPES = [
    *placed({"first": "^eth0", "later": "et^h0"}, chars="@/+"),
    *cases(("eth0\n", "a trailing newline"), ("e" * 16, "16 characters"), ("", "empty")),
    *(sourced(scope, name, "Linux dev_valid_name refuses it as an interface name, so getaddrinfo never resolves "
            "the scope and every call fails")
      for scope, name in (("eth0:1", ": (an address label, not an interface)"), (".", ". alone"), ("..", ".. alone"))),
]


@pytest.mark.parametrize("scope", SCOPES)
def test_a_scope_accepted(scope: str, tmp_path: Path) -> None:
    forward = load(tmp_path, forward_text(f"tcp:[fe80::1%{scope}]:22")).forwards["my.Fwd"]
    assert forward.link_target == f"/dev/tcp/fe80::1%{scope}/22"


@pytest.mark.parametrize("scope", BAD_SCOPES)
def test_a_scope_refused(scope: str, tmp_path: Path) -> None:
    assert_refused(tmp_path, forward_text(f"tcp:[fe80::1%{scope}]:22"), "forwards.my.Fwd.target",
                   "not a numeric IPv4 or IPv6 address")


# --- every manifest rule at once, through qubes-socksvc check -------------------------------------


CHECK_MANIFEST = """\
version: 1
daemons:
  "Bad/Name":
    services: {}
  other:
    socket_group: Qubes
    condition_user: "a:b"
    condition_group: "+g"
    socket_mode: "0+60"
    socket: /run/qubes/a@b.sock
    qubes_service: .x
    services:
      "bad@svc":
        handler: qubes_socksvc.examples:echo
      other.Echo:
        handler: "mod:fu/nc"
        force_user: "u@x"
        policy:
          allow: ["@tag:a:b", "uuid:X", "wo/rk"]
          arguments:
            "a/b": {allow: [work]}
forwards:
  my.Fwd:
    target: "tcp:[fe80::1%a/b]:22"
"""
#: The key of each problem in CHECK_MANIFEST, in the order check reports them.
CHECK_KEYS = [
    "daemons.Bad/Name", "daemons.other.socket_group", "daemons.other.condition_user",
    "daemons.other.condition_group", "daemons.other.socket_mode", "daemons.other.socket",
    "daemons.other.qubes_service", "daemons.other.services.bad@svc", "daemons.other.services.other.Echo.handler",
    "daemons.other.services.other.Echo.force_user", "daemons.other.services.other.Echo.policy.allow",
    "daemons.other.services.other.Echo.policy.arguments.a/b", "forwards.my.Fwd.target",
]


def test_check_names_the_file_and_the_key_of_each_bad_name(tmp_path: Path) -> None:
    """One refused value per manifest rule: check reports each, all at once, with the file and the key."""
    path = tmp_path / "qubes-socksvc.yaml"
    path.write_text(CHECK_MANIFEST)
    result = run_cli("check", "-c", str(path))
    assert result.returncode != 0, result.stdout + result.stderr
    for key in CHECK_KEYS:
        assert re.search(rf"^{re.escape(str(path))}:\d+:\d+: {re.escape(key)}: ", result.stderr, re.M), (
            key, result.stderr)


# --- rpc-config keys and integers ---------------------------------------------------------------
# libqrexec/toml.c: qubes_toml_config_parse: a key starts with a letter ("a" ... "z", "A" ... "Z")
# and goes on with qubes_is_key_byte: letters, digits, ".", "-", "_"; then "=".  A known key's
# value is checked, an unknown key is ignored.  Integers (parse_toml_value): decimal digits, then
# only blanks or a comment ("Unexpected junk after integer").

RPC_CONFIG_LINES = cases(
    ("wait-for-session=true", "a known key: lower-case letters and -"),
    ("X-Custom=1", "an upper-case letter first"),
    ("aB=1", "an upper-case letter later"),
    ("my.key=1", "."),
    ("my_key=1", "_"),
    ("key2=1", "a digit"),
)
BAD_RPC_CONFIG_KEYS = [
    *[pytest.param(f"{c}key=1", "expected a key", id=f"{c} first") for c in INTRUDERS],
    *[pytest.param(f"ke{c}y=1", "missing '='", id=f"{c} later") for c in INTRUDERS],
    pytest.param("9key=1", "expected a key", id="a digit first"),
    pytest.param("_key=1", "expected a key", id="_ first"),
    pytest.param(".key=1", "expected a key", id=". first"),
    pytest.param("-key=1", "expected a key", id="- first"),
]


@pytest.mark.parametrize("line", RPC_CONFIG_LINES)
def test_an_rpc_config_key_accepted(line: str) -> None:
    expected = rpcconfig.Config(wait_for_session=True) if line.startswith("wait-for-session") else rpcconfig.Config()
    assert rpcconfig.parse(line + "\n") == expected


@pytest.mark.parametrize("line, words", BAD_RPC_CONFIG_KEYS)
def test_an_rpc_config_key_refused(line: str, words: str) -> None:
    with pytest.raises(rpcconfig.RpcConfigError, match=words):
        rpcconfig.parse(line + "\n")


@pytest.mark.parametrize("value, expected", [
    pytest.param("1", True, id="1"), pytest.param("0", False, id="0"), pytest.param("1 # on", True, id="a comment"),
])
def test_an_rpc_config_integer_accepted(value: str, expected: bool) -> None:
    assert rpcconfig.parse(f"wait-for-session={value}\n") == rpcconfig.Config(wait_for_session=expected)


@pytest.mark.parametrize("value", [pytest.param(f"1{c}", id=f"{c} after a digit") for c in INTRUDERS])
def test_an_rpc_config_integer_refused(value: str) -> None:
    with pytest.raises(rpcconfig.RpcConfigError, match="unexpected text after the value"):
        rpcconfig.parse(f"wait-for-session={value}\n")


# --- apply's temporary files --------------------------------------------------------------------
# install.py: _temp_for names a write's temporary file .socksvc-HEX16.tmp (16 lower-case hex digits
# of the final name's SHA-256); earlier versions used .NAME.socksvc-tmp.  apply sweeps a file
# (or a symlink) with such a name, which only an interrupted apply leaves, and nothing else: a file
# apply did not write is never removed (SPEC.md section 3).

SWEPT = cases(
    (".socksvc-0123456789abcdef.tmp", "16 hex digits, digits and letters"),
    (".socksvc-fedcba9876543210.tmp", "16 hex digits, letters first"),
    (".alpha.Echo.socksvc-tmp", "an earlier version's name"),
    (".a\nb.socksvc-tmp", "an earlier version's name, a newline inside"),
)
KEPT = [
    *placed({"first": ".socksvc-^123456789abcdef.tmp", "later": ".socksvc-0123456789abcde^.tmp"}, chars="@:+"),
    *cases(
        (".socksvc-0123456789abcdef.tmp\n", "a trailing newline"),
        (".alpha.Echo.socksvc-tmp\n", "an earlier version's name and a trailing newline"),
        (".socksvc-0123456789ABCDEF.tmp", "upper-case hex"),
        (".socksvc-0123456789abcde.tmp", "15 hex digits"),
        (".socksvc-0123456789abcdef0.tmp", "17 hex digits"),
        (".socksvc-0123456789abcdeg.tmp", "not hex"),
        ("socksvc-0123456789abcdef.tmp", "no leading dot"),
        ("..socksvc-tmp", "no name in an earlier version's form"),
    ),
]


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bool]:
    """Every name of SWEPT and KEPT as a file in /etc/qubes-rpc, then one apply: name -> gone."""
    top = tmp_path_factory.mktemp("names-apply")
    manifest_path, root = top / "qubes-socksvc.yaml", top / "root"
    manifest_path.write_text(manifest_text())
    rpc = root / "etc/qubes-rpc"
    rpc.mkdir(parents=True)
    names = [p.values[0] for p in (*SWEPT, *KEPT)]
    for name in names:
        (rpc / str(name)).write_text("half a file")
    code, output = apply_in_process(manifest_path, root)
    assert code == 0, output
    return {str(name): not (rpc / str(name)).exists() for name in names}


@pytest.mark.parametrize("name", SWEPT)
def test_a_leftover_is_swept(name: str, swept: dict[str, bool]) -> None:
    assert swept[name]


@pytest.mark.parametrize("name", KEPT)
def test_a_file_not_named_like_a_leftover_is_kept(name: str, swept: dict[str, bool]) -> None:
    assert not swept[name]
