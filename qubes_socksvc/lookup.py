# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qrexec's lookup of a call's qubes-rpc file and rpc-config, as the agent does it.

Both lookups try the keys of :func:`qrexec.lookup_keys` in order, each key in
every directory of the search path before the next key, and stop at the first
file found (libqrexec/exec.c: find_file, find_qrexec_service,
load_service_config_raw).  The rpc-config lookup is independent of which
qubes-rpc file matched.  Used by ``call`` on the real file system and by
``apply``/``check``/``list`` on the tree as ``apply`` leaves it.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from . import files, qrexec, rpcconfig
from .errors import SocksvcError

T = TypeVar("T")

#: An rpc-config file holds a few short lines; more is not a config we read.
MAX_CONFIG_SIZE = 65536


class LookupFailed(SocksvcError):
    """qrexec would fail the call: its find_file returned -2 or the config is bad (``call``
    exits 125, agent.CallError)."""


class Unreadable(LookupFailed):
    """An rpc-config we will not read (larger than MAX_CONFIG_SIZE, not a regular file): qrexec
    may well read it, so nothing can be said of what it makes of the call."""


class Kind(enum.Enum):
    SOCKET = "a socket service"
    TCP = "a TCP service"
    EXECUTABLE = "an executable service"
    DIRECTORY = "a directory"
    OTHER = "neither a socket nor an executable"


@dataclass(frozen=True)
class Entry:
    """The qubes-rpc file a call resolves to."""

    path: str
    key: str
    """The lookup key it matched (``NAME+ARG``, ``NAME+`` or ``NAME``)."""
    kind: Kind
    link_target: str | None = None
    """For a TCP service: the symlink's target (``/dev/tcp[/HOST[/PORT]]``)."""


def find_file(directories: Sequence[str], keys: Sequence[str], probe: Callable[[str], T | None]
              ) -> tuple[str, str, T] | None:
    """(path, key, what ``probe`` said) for the first path a probe accepts; ``probe``
    returns None where qrexec's find_file sees ENOENT and raises where it fails."""
    for key in keys:
        for directory in directories:
            path = os.path.join(directory, key)
            found = probe(path)
            if found is not None:
                return path, key, found
    return None


def probe_service(path: str) -> tuple[Kind, str | None] | None:
    """What find_file and find_qrexec_service make of one qubes-rpc path."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            if qrexec.is_tcp_link(target):
                if target == "/dev/tcp/":
                    raise LookupFailed(f"{path} -> /dev/tcp/ is not followed by a host")
                return Kind.TCP, target
            st = os.stat(path)  # a dangling link is ENOENT: skipped, like a missing file
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LookupFailed(f"{path}: {e.strerror}") from e
    if stat.S_ISSOCK(st.st_mode):
        return Kind.SOCKET, None
    if stat.S_ISDIR(st.st_mode):
        return Kind.DIRECTORY, None
    if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK, effective_ids=True):
        return Kind.EXECUTABLE, None
    return Kind.OTHER, None


def find_service(service: str, directories: Sequence[str] = qrexec.RPC_SEARCH_PATH) -> Entry | None:
    """The qubes-rpc file qrexec would use for a call of ``service`` (None: exit 127)."""
    found = find_file(directories, qrexec.lookup_keys(service), probe_service)
    if found is None:
        return None
    path, key, (kind, target) = found
    return Entry(path, key, kind, target)


def config_exists(path: str) -> bool | None:
    """find_file without a stat buffer: ``stat()``, a dangling link counting as absent."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LookupFailed(f"{path}: {e.strerror}") from e
    return True


def find_config(service: str, directories: Sequence[str] = qrexec.RPC_CONFIG_SEARCH_PATH,
                exists: Callable[[str], bool | None] = config_exists) -> str | None:
    """The rpc-config file qrexec reads for a call of ``service``, whichever service file matched."""
    found = find_file(directories, qrexec.lookup_keys(service), exists)
    return None if found is None else found[0]


def read_config(path: str) -> rpcconfig.Config:
    """Read and parse an rpc-config file without ever blocking on it.

    Only a regular file is read (a FIFO or device is refused at once: it would block the
    agent's fopen() too), at most MAX_CONFIG_SIZE bytes (a limit of ours: the agent reads any
    size line by line).  Raises LookupFailed where qrexec would fail the call, or where we
    will not read the file.
    """
    try:
        data = files.read_regular(path, MAX_CONFIG_SIZE, "rpc-config")
    except files.FileRefused as e:
        raise Unreadable(str(e)) from e
    try:
        return rpcconfig.parse(data.decode("latin-1")).effective()
    except rpcconfig.RpcConfigError as e:
        raise LookupFailed(f"{path}: invalid rpc-config, qrexec fails the call (125): {e}") from e


def config_for(service: str, directories: Sequence[str] = qrexec.RPC_CONFIG_SEARCH_PATH) -> rpcconfig.Config:
    """The effective rpc-config of a call (qrexec's defaults when no file matches)."""
    path = find_config(service, directories)
    return rpcconfig.Config().effective() if path is None else read_config(path)
