# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qrexec's vocabulary: name charsets, limits, lookup keys and search paths.

Facts from qubes-core-qrexec 4.4 (SPEC.md section 1); each rule names the
qrexec function it mirrors.  This module imports nothing of ours and nothing
heavy: the daemon's start-up pays for it.
"""

from __future__ import annotations

import re
from typing import Any

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


def full_name(name: str, argument: str | None) -> str:
    """(NAME, ARG) -> the service string as called: ``NAME``, ``NAME+`` or ``NAME+ARG``; the
    inverse of :func:`split_service` (``QREXEC_SERVICE_FULL_NAME``)."""
    return name if argument is None else f"{name}+{argument}"


#: How much the daemon, ``call`` and the client read or write at a time (ours, not a qrexec limit).
CHUNK_SIZE = 65536


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
    if len(first) <= NAME_MAX:  # NAME is a prefix of key 1: never longer
        return first, name
    return (name,) if len(name) <= NAME_MAX else ()


def is_source(name: str) -> bool:
    """The calling qube as the descriptor names it."""
    return len(name) <= MAX_SOURCE_LEN and bool(SOURCE_RE.match(name))


def is_target(name: str) -> bool:
    """A requested target in dom0's descriptor (keywords arrive without their ``@``)."""
    return len(name) <= MAX_TARGET_LEN and bool(TARGET_RE.match(name))


# --- TCP services: qubes-rpc links to /dev/tcp[/HOST[/PORT]] (qrexec >= 4.2.19) ----------

#: A qubes-rpc symlink to this, or to ``/dev/tcp/...``, is a TCP service
#: (libqrexec/exec.c: find_file; ``/dev/tcp/`` alone fails the call).
TCP_LINK = "/dev/tcp"
#: Interface names as a ``%scope`` of an IPv6 address in a link: 1 to IFNAMSIZ - 1 bytes, no
#: ":" and not "." or ".." (Linux net/core/dev.c: dev_valid_name), or an interface index.
_SCOPE_RE = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.-]{1,15}\Z")


def is_tcp_link(target: str) -> bool:
    """libqrexec/exec.c: find_file treats ``/dev/tcp`` and ``/dev/tcp/...`` links as TCP services."""
    return target == TCP_LINK or target.startswith(TCP_LINK + "/")


def valid_port(port: str) -> bool:
    """libqrexec/exec.c: validate_port: decimal 1-65535 without a leading zero."""
    return port.isascii() and port.isdigit() and not port.startswith("0") and int(port) <= 65535


def tcp_address(link_target: str, argument: str | None) -> tuple[str, str]:
    """(host, port) a call with ``argument`` connects to through a ``/dev/tcp[/HOST[/PORT]]``
    link, or ValueError with the reason qrexec fails the call (125).

    libqrexec/exec.c: find_qrexec_service, TCP branch: ``/dev/tcp/HOST/PORT`` takes no
    argument; ``/dev/tcp/HOST`` takes the port as the argument; ``/dev/tcp`` takes
    ``HOST+PORT``, split at the *last* ``+``, with ``+`` in HOST standing for ``:``
    and no ``_``.  The port then goes through validate_port.
    """
    address = link_target.removeprefix(TCP_LINK)
    host, slash, port = address[1:].partition("/") if address else ("", "", "")
    has_host, has_port = bool(address), bool(slash)  # "/dev/tcp/HOST/" has an empty port
    if has_port:
        if argument:
            raise ValueError(f"{link_target} takes no argument; call it without one (got {argument!r})")
    elif not argument:
        raise ValueError(f"{link_target} needs the {'port' if has_host else 'host+port'} as the call's argument")
    elif has_host:
        port = argument
    else:
        host, plus, port = argument.rpartition("+")
        if not plus:
            raise ValueError(f"no port in the argument {argument!r}; {link_target} takes HOST+PORT")
        if "_" in host:
            raise ValueError(f"underscore not allowed in the host {host!r}")
        host = host.replace("+", ":")
    if not valid_port(port):
        raise ValueError(f"invalid port {port!r}: a decimal 1-65535 without leading zeros")
    return host, port


def tcp_sockaddr(host: str, port: str) -> tuple[int, tuple[Any, ...]]:
    """(family, socket address) qrexec connects to, or ValueError: getaddrinfo with
    AI_NUMERICHOST | AI_NUMERICSERV, AF_INET6 when the host holds ``:`` or ``%``, no
    name lookup (libqrexec/exec.c: qubes_tcp_connect)."""
    import socket  # only the TCP paths need it

    ipv6 = ":" in host or "%" in host
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET6 if ipv6 else socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP, socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise ValueError(f"{host} port {port}: {reason}; a numeric address is required (IPv4 or IPv6)") from e
    family, _, _, _, address = infos[0]
    return family, address


def is_numeric_host(host: str) -> bool:
    """A host qubes_tcp_connect accepts on any machine: a numeric address, and for IPv6
    an optional ``%scope`` (an interface name or index, which only the machine can
    resolve, so only its syntax is checked here)."""
    address, percent, scope = host.partition("%")
    if percent and (":" not in address or not _SCOPE_RE.match(scope)):
        return False
    try:
        tcp_sockaddr(address, "1")
    except ValueError:
        return False
    return True
