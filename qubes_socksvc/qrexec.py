# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qrexec's vocabulary: name charsets, limits, lookup keys and search paths.

Facts from qubes-core-qrexec 4.4 (SPEC.md section 1); each rule names the
qrexec function it mirrors.  This module imports nothing of ours and nothing
heavy: the daemon's start-up pays for it.
"""

from __future__ import annotations

import re

#: qubes-rpc directories, searched in this order (``/run`` since 4.3.5;
#: libqrexec/exec.c: find_qrexec_service, QREXEC_SERVICE_PATH).
RPC_SEARCH_PATH = ("/run/qubes-rpc", "/usr/local/etc/qubes-rpc", "/etc/qubes-rpc")
#: rpc-config directories, same lookup (libqrexec/exec.c: load_service_config_raw).
RPC_CONFIG_SEARCH_PATH = (
    "/run/qubes/rpc-config",
    "/usr/local/etc/qubes/rpc-config",
    "/etc/qubes/rpc-config",
)
#: Where qrexec expects socket services to listen (mode 2770 root:qubes).
SOCKET_DIR = "/run/qubes"

#: A file name, so a lookup key, is at most this long (libqrexec/exec.c: find_file).
NAME_MAX = 255
#: The service string, argument included (libqrexec/qrexec.h: MAX_SERVICE_NAME_LEN,
#: checked in libqrexec/exec.c: parse_qubes_rpc_command).
MAX_SERVICE_NAME_LEN = 65000
#: The whole command qrexec passes, so a bound on any descriptor (libqrexec/qrexec.h:
#: MAX_QREXEC_CMD_LEN).
MAX_DESCRIPTOR_LEN = 65535
#: Qube names (qrexec/policy/utils.py and libxl cap them at 31 characters).
MAX_SOURCE_LEN = 31
#: Requested targets, e.g. ``uuid:`` + 36 (qrexec/tools/qrexec_policy_daemon.py accepts 63).
MAX_TARGET_LEN = 63

#: daemon/qrexec-daemon.c: sanitize_name(service, "+") keeps these; the first ``+``
#: ends NAME (libqrexec/exec.c: parse_qubes_rpc_command), so NAME has no ``+``.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
ARGUMENT_RE = re.compile(r"[A-Za-z0-9_.+-]*\Z")
#: Source: a qube name (sanitize_name without extras); target: sanitize_name(target, "@:").
SOURCE_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
TARGET_RE = re.compile(r"[A-Za-z0-9_.@:-]+\Z")
TARGET_TYPES = ("name", "keyword")


def split_service(service: str) -> tuple[str, str | None]:
    """``NAME+ARG`` -> (NAME, ARG), split at the *first* ``+`` (ARG may hold more);
    ``NAME+`` -> (NAME, ""); ``NAME`` -> (NAME, None).

    libqrexec/exec.c: parse_qubes_rpc_command (``memchr(start, '+', ...)``);
    qrexec/policy/parser.py does ``split("+", 1)``.
    """
    name, plus, argument = service.partition("+")
    return name, (argument if plus else None)


def is_service(service: str) -> bool:
    """A service string qrexec can deliver: ``NAME``, ``NAME+`` or ``NAME+ARG``.

    NAME is 1-255 bytes of ``[A-Za-z0-9_.-]``, ARG any of ``[A-Za-z0-9_.+-]``, the
    whole at most MAX_SERVICE_NAME_LEN (libqrexec/exec.c: parse_qubes_rpc_command;
    daemon/qrexec-daemon.c: validate_service_name refuses an empty one or a leading ``+``).
    """
    if len(service) > MAX_SERVICE_NAME_LEN:
        return False
    name, argument = split_service(service)
    return (len(name) <= NAME_MAX and bool(NAME_RE.match(name))
            and (argument is None or bool(ARGUMENT_RE.match(argument))))


def is_rpc_file_name(key: str) -> bool:
    """A qubes-rpc or rpc-config file name qrexec can look up: a service string of at
    most NAME_MAX bytes (libqrexec/exec.c: find_file skips longer keys), and not a
    directory entry such as ``..``."""
    return len(key) <= NAME_MAX and is_service(key) and key not in (".", "..")


def lookup_keys(service: str) -> tuple[str, ...]:
    """The file names qrexec tries for a call, in order, each in every directory.

    Key 1 is the service as called with ``+`` appended when it has none; key 2 is
    NAME.  A key longer than NAME_MAX "cannot possibly exist" and is skipped
    (libqrexec/exec.c: parse_qubes_rpc_command builds ``service_descriptor``;
    find_qrexec_service and load_service_config_raw try it, then ``service_name``;
    find_file skips long names).
    """
    name, argument = split_service(service)
    first = service if argument is not None else service + "+"
    return tuple(key for key in (first, name) if len(key) <= NAME_MAX)


def is_source(name: str) -> bool:
    """The calling qube as the descriptor names it."""
    return len(name) <= MAX_SOURCE_LEN and bool(SOURCE_RE.match(name))


def is_target(name: str) -> bool:
    """A requested target in dom0's descriptor (keywords arrive without their ``@``)."""
    return len(name) <= MAX_TARGET_LEN and bool(TARGET_RE.match(name))
