# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What the qrexec agent would do with a staging tree, restated for the tests from
qubes-core-qrexec 4.4 ``libqrexec/exec.c`` alone (it imports nothing of qubes_socksvc,
so a test judges apply's output by qrexec's rules, not by our own restatement):

- ``parse_qubes_rpc_command``: NAME ends at the first ``+``; key 1 is the service as
  called, with ``+`` appended to a bare one; key 2 is NAME;
- ``find_file``: a key longer than NAME_MAX cannot exist; each key in every directory
  of QREXEC_SERVICE_PATH before the next key; a dangling symlink is ENOENT (skipped);
  lstat() failing otherwise (ENOTDIR: a file where the directory should be) fails the call;
- ``load_service_config_raw``: the same two keys in every directory of
  QUBES_RPC_CONFIG_PATH, whichever service file matched;
- ``libqrexec/toml.c``: ``skip-service-descriptor = true|false``, ``#`` comments.

Sockets are judged in every state they can be in: each daemon's ``.socket`` unit whose
file is installed up or down (all its sockets together: systemd.socket(5), every
``ListenStream=`` opened at start, ``RemoveOnStop=yes``; a unit not installed listens on
nothing), any other socket as it is on disk.  A link to a socket that is down dangles, and
qrexec goes on to the next directory and key; a socket file itself (a hard link) is
connected to (exec.c: find_qrexec_service, ``S_ISSOCK``).
"""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

#: libqrexec/qrexec.h: QREXEC_SERVICE_PATH and QUBES_RPC_CONFIG_PATH.
SERVICE_PATH = ("run/qubes-rpc", "usr/local/etc/qubes-rpc", "etc/qubes-rpc")
CONFIG_PATH = ("run/qubes/rpc-config", "usr/local/etc/qubes/rpc-config", "etc/qubes/rpc-config")
NAME_MAX = 255


def keys(call: str) -> list[str]:
    name, plus, _ = call.partition("+")
    return [k for k in (call if plus else call + "+", name) if len(k) <= NAME_MAX]


#: Where the user units live (the /etc manifest's, the /usr/local one's).
UNIT_DIRS = ("etc/systemd/user", "usr/local/lib/systemd/user")


def _target(root: Path, path: Path, known: set[str]) -> str | None:
    """Where a qubes-rpc entry leads, as the kernel resolves it inside ``root`` (symlinked
    directories such as /var/run -> ../run followed; a socket file itself is the known socket
    it is a hard link of), or None for anything qrexec stops at."""
    if not path.is_symlink():
        if stat.S_ISSOCK(path.lstat().st_mode):
            same = [k for k in known
                    if (root / k.lstrip("/")).exists() and os.path.samefile(root / k.lstrip("/"), path)]
            return same[0] if same else "/" + os.path.relpath(path, root)
        return None
    target = os.readlink(path)
    if target.startswith("/dev/tcp"):
        return target
    return "/" + os.path.relpath(os.path.realpath(root / target.lstrip("/")), root)


def service_entry(root: Path, call: str, up: set[str], units: set[str]) -> tuple[str, str | None] | None:
    """(entry, where it leads) qrexec uses for ``call`` while the daemon sockets in ``up`` listen
    (those in ``units`` but not in ``up`` are down)."""
    for key in keys(call):
        for directory in SERVICE_PATH:
            path = root / directory / key
            try:
                path.lstat()
            except FileNotFoundError:
                continue
            except OSError:  # find_file: lstat failing with anything but ENOENT fails the call (-2)
                return f"/{directory}/{key}", None
            target = _target(root, path, units)
            if target is None or target.startswith("/dev/tcp") or not path.is_symlink():
                return f"/{directory}/{key}", target
            if target in units:
                if target in up:
                    return f"/{directory}/{key}", target
                continue  # its unit is down: the link dangles
            real = root / target.lstrip("/")
            if real.exists() and stat.S_ISSOCK(real.stat().st_mode):
                return f"/{directory}/{key}", target
            # a dangling link: ENOENT, the next directory
    return None


def config(root: Path, call: str) -> tuple[str | None, dict[str, bool]]:
    """(the rpc-config file qrexec takes for ``call``, the boolean keys it sets)."""
    for key in keys(call):
        for directory in CONFIG_PATH:
            path = root / directory / key
            if path.is_file():
                values = {}
                for line in path.read_text().splitlines():
                    key_part, eq, rest = line.partition("=")
                    if eq and not key_part.startswith("#"):
                        values[key_part.strip()] = rest.split("#")[0].strip() == "true"
                return f"/{directory}/{key}", values
    return None, {}


def skips_descriptor(root: Path, call: str) -> tuple[str | None, bool]:
    """(the rpc-config file, its skip-service-descriptor) for ``call``."""
    path, values = config(root, call)
    return path, values.get("skip-service-descriptor", False)


def calls(root: Path) -> set[str]:
    """Calls standing for every call: each file name in every directory, each NAME bare and
    with an argument too long to be a file name."""
    found: set[str] = set()
    for directory in (*SERVICE_PATH, *CONFIG_PATH):
        try:
            names = os.listdir(root / directory)
        except OSError:  # no such directory, or a file in its place: no names from it
            continue
        for file_name in names:
            if file_name.startswith("."):
                continue  # apply's temporary names
            name = file_name.partition("+")[0]
            found |= {file_name, name, f"{name}+{'x' * NAME_MAX}"}
    return found


def forgeable(root: Path, reading: set[str], units: dict[str, set[str]]) -> dict[str, tuple[str, str | None]]:
    """call -> (entry, rpc-config) for every call that, with some of the installed socket
    ``units`` (unit file name -> its sockets) up, reaches a socket in ``reading`` (sockets that
    read a descriptor) with skip-service-descriptor=true: the caller's stdin would be read as
    its descriptor."""
    result = {}
    every = set().union(*units.values(), reading)
    installed = [sockets for name, sockets in units.items()
                 if any((root / directory / name).exists() for directory in UNIT_DIRS)]
    for call in sorted(calls(root)):
        for count in range(len(installed) + 1):
            for chosen in itertools.combinations(installed, count):
                up = set().union(*chosen, reading - set().union(*units.values()))  # forwards: no unit
                entry = service_entry(root, call, up, every)
                if entry is None or entry[1] not in reading:
                    continue
                config, skip = skips_descriptor(root, call)
                if skip:
                    result[call] = (entry[0], config)
    return result
