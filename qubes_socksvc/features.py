# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What this qube tells dom0 it supports (``qubes-socksvc features``, run by the post-install hook).

Qubes templates announce features from ``/etc/qubes/post-install.d/*.sh`` with
``qvm-features-request``; ``90-qubes-core-agent.sh`` commits them to dom0
(qubes-core-agent-linux ``qubes-rpc/post-install.d/``).  Two kinds are ours:

- ``supported-rpc.NAME=1`` for every service and forward apply wrote, NAME without its
  ``+ARG`` (``10-qubes-core-agent-rpc.sh``: ``srv_name=${srv_name%%+*}``), whether or
  not its socket exists now: core-agent's own hook announces a socket only while it
  exists (``[ -S "$srv" ]``), and a user unit's socket rarely does during an update;
- ``supported-service.NAME=1`` for every daemon's ``qubes_service``: the Services tab of
  a qube's settings lists those (``10-qubes-core-agent-features.sh``:
  ``advertise_systemd_service``).

Only what ``apply`` recorded counts (the specs it wrote, the links in its ownership
record), never the manifest as it is now: an edited, unapplied manifest announces nothing.
Which manifests count is core-agent's persistence rule (``10-qubes-core-agent-rpc.sh``):
``qubesdb-read /qubes-vm-persistence`` ``full`` (a template or a standalone) -> the /etc
manifest's, ``rw-only`` (a template-based qube) -> the /usr/local manifest's, anything
else -> none; a failed read counts as ``full`` (``|| echo full``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import effective, install, qrexec
from .layout import LOCAL, SYSTEM, Layout
from .model import Daemon

#: qubes-core-agent-linux misc/qvm-features-request: a request is written to QubesDB at
#: ``/features-request/FEATURE``, and a path longer than 63 is refused ("too long, ignoring"):
#: QubesDB's paths hold 64 bytes with their NUL.
FEATURES_REQUEST_PREFIX = "/features-request/"
MAX_QUBESDB_PATH = 63

#: qubesdb-read /qubes-vm-persistence -> the layouts whose artifacts survive a restart of this qube
#: (10-qubes-core-agent-rpc.sh: full -> /etc/qubes-rpc, rw-only -> /usr/local/etc/qubes-rpc).
PERSISTENCE: dict[str, tuple[Layout, ...]] = {"full": (SYSTEM,), "rw-only": (LOCAL,)}
#: What core-agent assumes when qubesdb-read fails (``|| echo full``).
UNREADABLE_PERSISTENCE = "full"


def persistence() -> tuple[str, str]:
    """(this qube's persistence, where it came from): ``qubesdb-read /qubes-vm-persistence``, or
    ``full`` when that fails, as core-agent's hook assumes."""
    import subprocess

    try:
        result = subprocess.run(["qubesdb-read", "/qubes-vm-persistence"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return UNREADABLE_PERSISTENCE, f"qubesdb-read failed ({e}); taken as full, as core-agent does"
    if result.returncode != 0:
        return UNREADABLE_PERSISTENCE, "qubesdb-read failed; taken as full, as core-agent does"
    return result.stdout.strip(), "qubesdb-read /qubes-vm-persistence"


@dataclass(frozen=True)
class Announcement:
    """What to request of dom0, and what cannot be requested (too long for QubesDB)."""

    features: list[str]
    """``FEATURE=1`` requests, sorted, each once."""
    refused: list[str]
    """Why a feature is left out, one sentence each."""


def announceable(feature: str) -> bool:
    """Whether qvm-features-request takes ``feature`` (misc/qvm-features-request: len(path) > 63)."""
    return len(FEATURES_REQUEST_PREFIX + feature) <= MAX_QUBESDB_PATH


def recorded_names(root: str, layout: Layout) -> set[str]:
    """The NAMEs (without ``+ARG``) of the qubes-rpc links apply recorded in ``layout``, services
    and forwards alike, that are still there."""
    try:
        owned = install.load_state(root, layout)
    except install.ApplyError:
        return set()  # reported by announce
    names = set()
    for path in owned:
        directory, file_name = os.path.split(path)
        if directory == layout.rpc_dir and qrexec.is_rpc_file_name(file_name) \
                and os.path.islink(install.real_path(root, path)):
            names.add(qrexec.split_service(file_name)[0])
    return names


def announce(root: str, mode: str) -> tuple[Announcement, list[str]]:
    """The announcement for persistence ``mode``, and what is wrong on disk (stderr's business)."""
    features: set[str] = set()
    problems: list[str] = []
    for layout in PERSISTENCE.get(mode, ()):
        try:
            install.load_state(root, layout)
        except install.ApplyError as e:
            problems.append(str(e))
        features |= {f"supported-rpc.{name}" for name in recorded_names(root, layout)}
        features |= {f"supported-service.{daemon.qubes_service}"
                     for daemon in effective.applied_daemons(root, [layout]).values()
                     if daemon.qubes_service is not None}
    refused = [f"{feature}: not announced: longer than qvm-features-request takes ({FEATURES_REQUEST_PREFIX}"
               f"{feature} is over {MAX_QUBESDB_PATH} characters, misc/qvm-features-request); shorten the name"
               for feature in sorted(features) if not announceable(feature)]
    return Announcement([f"{f}=1" for f in sorted(features) if announceable(f)], refused), problems


def _who(daemon: Daemon) -> str:
    """Whose managers start the socket, in words: ConditionGroup= and, unless it is the default
    ``!root``, ConditionUser= (systemd.unit(5): a leading "!" negates either)."""
    group = daemon.condition_group
    who = f"every user not in group {group[1:]}" if group.startswith("!") else f"every user in group {group}"
    if daemon.condition_user != "!root":
        who += f" (and ConditionUser={daemon.condition_user})"
    return who


def explain(daemon: Daemon) -> tuple[str, bool] | None:
    """What a daemon's ``qubes_service`` and ``enable`` mean together, and whether that deserves
    a warning (``check``); None for a daemon with neither (nothing new to say)."""
    key = f"daemons.{daemon.name}"
    who = _who(daemon)
    if daemon.qubes_service is None:
        if not daemon.enable:
            return None
        return (f"{key}.enable: true without qubes_service: the socket listens in every qube based on this "
                f"template, for {who}; add 'qubes_service: NAME' to choose the qubes in dom0 "
                "(qvm-service --enable QUBE NAME)", True)
    service = daemon.qubes_service
    feature = f"supported-service.{service}"
    if not announceable(feature):
        return (f"{key}.qubes_service: {feature} is too long for qvm-features-request ({FEATURES_REQUEST_PREFIX}"
                f"{feature} is over {MAX_QUBESDB_PATH} characters), so the qube settings' Services tab will "
                f"not offer it; 'qvm-service --enable QUBE {service}' still turns it on; a name of at most "
                f"{MAX_QUBESDB_PATH - len(FEATURES_REQUEST_PREFIX + 'supported-service.')} characters is "
                "announced", True)
    if daemon.enable:
        return (f"{key}: listens in the qubes where dom0 turned on {service} ('qvm-service --enable QUBE "
                f"{service}', then restart the qube), for {who}", False)
    return (f"{key}: runs in the qubes where dom0 turned on {service} ('qvm-service --enable QUBE {service}'), "
            "for the users who enable its socket ('systemctl --user enable', or 'enable: true' for everyone)",
            False)
