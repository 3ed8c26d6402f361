# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""What qrexec will make of the tree ``apply`` leaves: the rpc-config and the qubes-rpc
file each declared service's calls actually get.

qrexec looks rpc-config up on its own, ``NAME+ARG`` (or ``NAME+``) before ``NAME``
in every directory, whichever qubes-rpc file matched (libqrexec/exec.c:
load_service_config_raw).  So a service without a config file of its own inherits
``NAME``'s, ours or a foreign one: with ``NAME`` declared
``service_descriptor: false``, a call of ``NAME+x`` would reach the shared socket
with ``skip-service-descriptor=true`` and the caller's raw stdin would be read as
its descriptor.  :func:`settle` pins such keys with an explicit config of their
own, and reports what it cannot pin (a foreign file that wins the lookup) as a
conflict, so that every declared key gets exactly the config the manifest says.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass

from . import install, lookup, qrexec, rpcconfig
from .manifest import Manifest
from .render import Artifact, Layout


@dataclass(frozen=True)
class Finding:
    key: str
    """The declared service the finding is about."""
    message: str
    conflict: bool
    """True: a call would not get what the manifest says, and apply refuses."""

    def __str__(self) -> str:
        return f"{'conflict' if self.conflict else 'warning':9} {self.key}: {self.message}"


class _View:
    """The target tree as apply will leave it: our artifacts written, what we owned and
    no longer declare removed, everything else as it is on disk."""

    def __init__(self, root: str, artifacts: list[Artifact], owned: dict[str, list[str]]) -> None:
        self.root = root
        self.ours = {a.path: a for a in artifacts}
        self.removed = set(owned) - set(self.ours)

    def _real(self, path: str) -> str:
        return install.real_path(self.root, path)

    def config_exists(self, path: str) -> bool | None:
        if path in self.ours:
            return True
        return None if path in self.removed else lookup.config_exists(self._real(path))

    def config(self, path: str | None) -> rpcconfig.Config:
        if path is None:
            return rpcconfig.Config()
        artifact = self.ours.get(path)
        if artifact is not None and artifact.content is not None:
            return rpcconfig.Config.from_options(rpcconfig.parse(artifact.content))
        return lookup.read_config(self._real(path))

    def probe_service(self, path: str) -> tuple[lookup.Kind, str | None] | None:
        artifact = self.ours.get(path)
        if artifact is not None:  # our link: assume its socket (or port) is up
            target = artifact.link_target
            if target is not None and qrexec.is_tcp_link(target):
                return lookup.Kind.TCP, target
            return lookup.Kind.SOCKET, None
        return None if path in self.removed else lookup.probe_service(self._real(path))

    def names(self, directory: str) -> set[str]:
        try:
            on_disk = set(os.listdir(self._real(directory)))
        except OSError:
            on_disk = set()
        ours = {os.path.basename(p) for p in self.ours if os.path.dirname(p) == directory}
        gone = {os.path.basename(p) for p in self.removed if os.path.dirname(p) == directory}
        return (on_disk - gone) | ours


def _calls(key: str) -> list[str]:
    """Calls that stand for every call a declared key serves.

    ``NAME+ARG`` and ``NAME+`` serve their own calls.  ``NAME`` serves the bare call
    (looked up as ``NAME+`` first) and every ``NAME+ARG`` without a file of its own,
    which a call with an argument too long to be a file name represents exactly
    (its lookup keys are ``NAME`` alone: libqrexec/exec.c: find_file).
    """
    if "+" in key:
        return [key]
    return [key, f"{key}+{'x' * qrexec.NAME_MAX}"]


def settle(manifest: Manifest, layout: Layout, artifacts: list[Artifact], root: str = "/",
           owned: dict[str, list[str]] | None = None) -> tuple[list[Artifact], list[Finding]]:
    """The artifacts with explicit rpc-config files added where inheritance would change a
    declared service's or forward's meaning, and what remains wrong or shadowed (see module doc)."""
    if owned is None:
        owned = install.load_state(root, layout)
    artifacts = list(artifacts)
    view = _View(root, artifacts, owned)
    findings: list[Finding] = []
    source = os.path.abspath(manifest.path)
    declared = {key: service.rpc_config() for key, (_, service) in manifest.services().items()}
    declared.update({key: forward.rpc_config() for key, forward in manifest.forwards.items()})
    # NAME -> the NAME+ARG files in the rpc-config directories, listed once (once per key was
    # quadratic: 46 s for 3000 services).  What the loop adds are declared keys, skipped there.
    argument_configs: dict[str, list[str]] = {}
    for file_name in sorted(set().union(*(view.names(d) for d in qrexec.RPC_CONFIG_SEARCH_PATH))):
        if "+" in file_name:
            argument_configs.setdefault(qrexec.split_service(file_name)[0], []).append(file_name)
    for key, declared_options in declared.items():
        want = rpcconfig.Config.from_options(declared_options)
        calls = _calls(key)
        for call in calls:
            try:
                path = lookup.find_config(call, qrexec.RPC_CONFIG_SEARCH_PATH, view.config_exists)
                got = view.config(path)
                own = f"{layout.rpc_config_dir}/{key}"
                if got != want and own not in view.ours:
                    options = {**{k: getattr(want, k.replace("-", "_")) for k in want.differences(got)},
                               **declared_options}
                    note = (f"Explicit: without this file qrexec would apply {path or 'no rpc-config'} "
                            f"to {key} too ({', '.join(want.differences(got))}).")
                    pinned = Artifact(own, content=rpcconfig.render(options, source, note))
                    artifacts.append(pinned)
                    view.ours[own] = pinned
                    path = lookup.find_config(call, qrexec.RPC_CONFIG_SEARCH_PATH, view.config_exists)
                    got = view.config(path)
            except lookup.LookupFailed as e:
                findings.append(Finding(key, f"qrexec would fail calls of {_shown(call)}: {e}", True))
                continue
            if got != want:
                findings.append(Finding(key, f"calls of {_shown(call)} would take the rpc-config {path} "
                                        f"({', '.join(want.differences(got))} not as declared); "
                                        "remove or change that file, or rename the service", True))
        findings += _shadows(key, calls, view)
        if "+" not in key:
            findings += _argument_configs(key, want, view, declared, argument_configs.get(key, []))
    return sorted(artifacts, key=lambda a: a.path), findings


def _shown(call: str) -> str:
    name, argument = qrexec.split_service(call)
    return f"{name}+ARG (any ARG without a file of its own)" if argument and len(call) > qrexec.NAME_MAX else call


def _shadows(key: str, calls: list[str], view: _View) -> list[Finding]:
    """A foreign qubes-rpc file that qrexec finds first for this key's calls."""
    findings = []
    for call in calls:
        try:
            found = lookup.find_file(qrexec.RPC_SEARCH_PATH, qrexec.lookup_keys(call), view.probe_service)
        except lookup.LookupFailed as e:
            findings.append(Finding(key, f"qrexec would fail calls of {_shown(call)}: {e}", False))
            continue
        if found is not None and found[0] not in view.ours:
            findings.append(Finding(key, f"calls of {_shown(call)} reach {found[0]} ({found[2][0].value}), "
                                    "which qrexec finds first: not this daemon", False))
    return findings


def _argument_configs(name: str, want: rpcconfig.Config, view: _View, declared: Collection[str],
                      keys: list[str]) -> list[Finding]:
    """Foreign ``NAME+ARG`` rpc-config files (``keys``, sorted) with no qubes-rpc file of their
    own: calls of ``NAME+ARG`` then reach our ``NAME`` with that config."""
    findings = []
    for key in keys:
        if key in declared or not qrexec.is_rpc_file_name(key):
            continue
        try:
            if lookup.find_file(qrexec.RPC_SEARCH_PATH, (key,), view.probe_service) is not None:
                continue  # the call reaches that file, not us
            path = lookup.find_config(key, qrexec.RPC_CONFIG_SEARCH_PATH, view.config_exists)
            got = view.config(path)
        except lookup.LookupFailed as e:
            findings.append(Finding(name, f"qrexec would fail calls of {key}: {e}", True))
            continue
        if got != want:
            findings.append(Finding(name, f"calls of {key} reach {name} but take the rpc-config {path} "
                                    f"({', '.join(want.differences(got))} not as declared for {name}); "
                                    f"remove that file, or declare {key}", True))
    return findings
