# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qrexec's vocabulary: name charsets, limits and search paths.

Facts from qubes-core-qrexec 4.2-4.4 (see SPEC.md section 1).  This module
imports nothing of ours and nothing heavy: the daemon's start-up pays for it.
"""

from __future__ import annotations

import re

#: qubes-rpc directories, searched in this order (``/run`` since 4.3.5).
RPC_SEARCH_PATH = ("/run/qubes-rpc", "/usr/local/etc/qubes-rpc", "/etc/qubes-rpc")
#: rpc-config directories, same lookup order as the services.
RPC_CONFIG_SEARCH_PATH = (
    "/run/qubes/rpc-config",
    "/usr/local/etc/qubes/rpc-config",
    "/etc/qubes/rpc-config",
)
#: Where qrexec expects socket services to listen (mode 2770 root:qubes).
SOCKET_DIR = "/run/qubes"

#: The whole command qrexec passes, descriptor included (MAX_QREXEC_CMD_LEN).
MAX_DESCRIPTOR_LEN = 65000
#: A service name with its argument longer than this cannot be looked up.
MAX_SERVICE_LEN = 255
#: The policy tools cap qube names at 31 characters.
MAX_DOMAIN_LEN = 31

SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
ARGUMENT_RE = re.compile(r"[A-Za-z0-9_.-]*\Z")
DOMAIN_RE = re.compile(r"[A-Za-z0-9_.@:-]+\Z")
TARGET_TYPES = ("name", "keyword")


def is_service_name(name: str) -> bool:
    """A qrexec service name without its argument, e.g. ``qubes.Filecopy``."""
    return bool(SERVICE_NAME_RE.match(name)) and name not in (".", "..")


def is_argument(argument: str) -> bool:
    """A service argument (the part after ``+``); may be empty."""
    return bool(ARGUMENT_RE.match(argument))


def is_domain_name(name: str) -> bool:
    """A source or target as qrexec passes it (keywords without their ``@``)."""
    return len(name) <= MAX_DOMAIN_LEN and bool(DOMAIN_RE.match(name))


def split_service(full_name: str) -> tuple[str, str | None]:
    """``NAME+ARG`` -> (NAME, ARG); ``NAME+`` -> (NAME, ""); ``NAME`` -> (NAME, None)."""
    name, plus, argument = full_name.partition("+")
    return name, (argument if plus else None)


def is_full_service_name(full_name: str) -> bool:
    """``NAME``, ``NAME+`` or ``NAME+ARG`` within qrexec's charset and NAME_MAX."""
    if not full_name or len(full_name.encode()) > MAX_SERVICE_LEN:
        return False
    name, argument = split_service(full_name)
    return is_service_name(name) and (argument is None or is_argument(argument))


def lookup_names(name: str, argument: str | None) -> tuple[str, ...]:
    """The file names qrexec tries, in order: ``NAME+ARG`` (or ``NAME+``), then ``NAME``."""
    if argument is None:
        return (name,)
    return (f"{name}+{argument}", name)
