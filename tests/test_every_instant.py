# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""No state on disk, however it was reached, lets a caller choose its own descriptor.

qrexec looks a call's rpc-config up on its own (libqrexec/exec.c:
load_service_config_raw), so a ``NAME+ARG`` on a shared, descriptor-reading socket
inherits ``NAME``'s ``skip-service-descriptor=true`` unless a config of its own pins it;
qrexec would then pass the caller's raw stdin (``other.Admin dom0\\0``) as the descriptor.
Every test here judges the tree with ``tests/qrexec_view.py``, written from exec.c
alone, never with qubes_socksvc's own lookup:

- apply killed (SIGKILL) before each of its file-system operations, and apply whose
  every write in turn fails, for each transition that moves a pin, in one manifest and
  across the two (``/etc`` and ``/usr/local``), with foreign files;
- a random run of applies, kills and foreign files;
- ``check`` and ``list`` fail on a forgeable disk whatever made it.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_socksvc import cli
from qubes_socksvc.manifest import Manifest
from tests import qrexec_view
from tests.conftest import apply_in_process, killed_apply

#: Daemon d1 is the /etc manifest's, d2 the /usr/local one's; their shared sockets read descriptors.
READING = {"/run/qubes/socksvc-d1.sock", "/run/qubes/socksvc-d2.sock"}
KEYS = ("svc", "svc+", "svc+x", "svc+y", "other")
#: Each daemon's socket unit: its shared socket and the own sockets of its services.
UNITS = {f"qubes-socksvc-{d}.socket": {f"/run/qubes/socksvc-{d}.sock",
                                       *(f"/run/qubes/socksvc-{d}-{k.replace('+', '_')}.sock" for k in KEYS)}
         for d in ("d1", "d2")}


def text(daemon: str, services: dict[str, str]) -> str:
    """A manifest: key -> "shared" (on the daemon's descriptor socket) or "own"
    (``service_descriptor: false``: its own socket, skip-service-descriptor=true)."""
    lines = ["version: 1", "daemons:", f"  {daemon}:", "    services:"]
    for key, kind in services.items():
        lines += [f"      {key}:", "        handler: qubes_socksvc.examples:echo"]
        if kind == "own":
            lines += ["        service_descriptor: false",
                      f"        socket: /run/qubes/socksvc-{daemon}-{key.replace('+', '_')}.sock"]
    return "\n".join(lines) + "\n" if services else "version: 1\ndaemons: {}\n"


@pytest.fixture(autouse=True)
def local_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest named local.yaml renders under /usr/local, as /usr/local/etc/qubes-socksvc.yaml
    does (the tests' manifests live in tmp_path; forked children inherit the patch)."""
    monkeypatch.setattr(Manifest, "is_local", property(lambda self: os.path.basename(self.path) == "local.yaml"))


def manifest_path(tmp_path: Path, local: bool) -> Path:
    return tmp_path / ("local.yaml" if local else "etc.yaml")


@contextlib.contextmanager
def failing(name: str, after: int) -> Iterator[list[int]]:
    """``os.NAME`` fails with EIO (a full or broken disk) after ``after`` successful calls;
    yields [calls made]."""
    real = getattr(os, name)
    calls = [0]

    def operation(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise OSError(5, f"Input/output error (injected into {name})")
        return real(*args, **kwargs)

    setattr(os, name, operation)
    try:
        yield calls
    finally:
        setattr(os, name, real)


def assert_unforgeable(root: Path, when: str) -> None:
    found = qrexec_view.forgeable(root, READING, UNITS)
    assert not found, f"{when}: a caller can forge its descriptor: {found}"


# (what is applied first: (local?, services) in order), (local?, services) applied under faults,
#  foreign files (path -> file text, or "->TARGET" for a symlink)
TRANSITIONS = {
    "add NAME+ARG under a descriptor-less NAME": ([(False, {"svc": "own"})],
                                                  (False, {"svc": "own", "svc+x": "shared"}), {}),
    "NAME turns descriptor-less under NAME+ARG": ([(False, {"svc": "shared", "svc+x": "shared"})],
                                                 (False, {"svc": "own", "svc+x": "shared"}), {}),
    "NAME turns shared again": ([(False, {"svc": "own", "svc+x": "shared"})],
                                (False, {"svc": "shared", "svc+x": "shared"}), {}),
    "a descriptor-less NAME+ARG goes from under a shared NAME": ([(False, {"svc": "shared", "svc+x": "own"})],
                                                                 (False, {"svc": "shared"}), {}),
    "NAME and NAME+ARG swap kinds": ([(False, {"svc": "own", "svc+x": "shared", "svc+": "shared"})],
                                     (False, {"svc": "shared", "svc+x": "own", "svc+": "own"}), {}),
    "the other manifest's NAME+ARG under our new descriptor-less NAME": (
        [(True, {"svc+x": "shared", "svc+": "shared"})], (False, {"svc": "own"}), {}),
    "our NAME+ARG under the other manifest's descriptor-less NAME": (
        [(False, {"svc": "own"})], (True, {"svc+x": "shared"}), {}),
    "a foreign NAME+ARG link to our socket under our descriptor-less NAME": (
        [], (False, {"svc": "own", "other": "shared"}),
        {"etc/qubes-rpc/svc+y": "->/run/qubes/socksvc-d1.sock"}),
    "a foreign link to a new daemon's socket under the other manifest's descriptor-less NAME": (
        [(True, {"svc": "own"})], (False, {"other": "shared"}),
        {"etc/qubes-rpc/svc+w": "->/run/qubes/socksvc-d1.sock"}),
    "a foreign link to our socket through /var/run": (
        [], (False, {"svc": "own", "other": "shared"}),
        {"usr/local/etc/qubes-rpc/svc+z": "->/var/run/qubes/socksvc-d1.sock", "var/run": "->../run"}),
}


def build(tmp_path: Path, name: str, history: list[tuple[bool, dict[str, str]]], foreign: dict[str, str]) -> Path:
    root = tmp_path / name
    root.mkdir()
    for path, content in foreign.items():
        real = root / path
        real.parent.mkdir(parents=True, exist_ok=True)
        if content.startswith("->"):
            real.symlink_to(content[2:])
        else:
            real.write_text(content)
    for local, services in history:
        manifest = manifest_path(tmp_path, local)
        manifest.write_text(text("d2" if local else "d1", services))
        code, output = apply_in_process(manifest, root)
        assert code == 0, output
        assert_unforgeable(root, f"after applying {services}")
    return root


@pytest.mark.parametrize("transition", TRANSITIONS, ids=list(TRANSITIONS))
def test_apply_killed_before_any_operation_leaves_nothing_forgeable(tmp_path: Path, transition: str) -> None:
    """exec.c load_service_config_raw: the pinning config lands before the link that needs it,
    and a link goes before the config that protected it; an apply killed anywhere leaves a
    tree in which no call reaches a shared socket with skip-service-descriptor=true."""
    history, (local, services), foreign = TRANSITIONS[transition]
    start = build(tmp_path, "start", history, foreign)
    manifest = manifest_path(tmp_path, local)
    manifest.write_text(text("d2" if local else "d1", services))
    kills = 0
    for k in range(1, 400):
        root = tmp_path / f"kill{k}"
        shutil.copytree(start, root, symlinks=True)
        code = killed_apply(manifest, root, k)
        if code is not None:
            assert code == 0, f"apply failed with {code}"
            break
        kills += 1
        assert_unforgeable(root, f"killed before operation {k}")
        shutil.rmtree(root)
    else:
        pytest.fail("apply never finished")
    assert kills >= 3, f"only {kills} kill points: the kills do not reach apply's writes"
    code, output = apply_in_process(manifest, root)
    assert code == 0, output
    assert_unforgeable(root, "after a whole apply")


@pytest.mark.parametrize("operation", ["rename", "symlink", "unlink"])
@pytest.mark.parametrize("transition", TRANSITIONS, ids=list(TRANSITIONS))
def test_apply_whose_write_fails_leaves_nothing_forgeable(tmp_path: Path, transition: str, operation: str) -> None:
    """The same with each write failing in turn (EIO, ENOSPC): apply reports it and stops;
    what it wrote so far is safe."""
    history, (local, services), foreign = TRANSITIONS[transition]
    start = build(tmp_path, "start", history, foreign)
    manifest = manifest_path(tmp_path, local)
    manifest.write_text(text("d2" if local else "d1", services))
    for after in range(0, 50):
        root = tmp_path / f"fail{after}"
        shutil.copytree(start, root, symlinks=True)
        with failing(operation, after) as calls:
            code, output = apply_in_process(manifest, root)
        assert_unforgeable(root, f"{operation} failing after {after}")
        shutil.rmtree(root)
        if calls[0] <= after:  # apply made fewer calls: it finished
            assert code == 0, output
            break
        assert code == 1 and "injected" in output, output


@pytest.mark.parametrize("seed", [21, 22, 23, 112, 135])  # 112, 135: what the model once missed
def test_a_random_run_of_applies_kills_and_foreign_files_is_never_forgeable(tmp_path: Path, seed: int) -> None:
    """An adversary's run: both manifests declare random kinds for NAME, NAME+, NAME+x and
    NAME+y; each apply may be killed at a random point; foreign links to a shared socket come.
    No step makes a call forgeable (qrexec_view), and a whole apply leaves none: it pins what
    the adversary's files opened, or refuses."""
    rng = random.Random(seed)
    root = tmp_path / "root"
    root.mkdir()
    keys = KEYS[:4]
    kills = applied = 0
    for step in range(60):
        local = rng.random() < 0.5
        services = {k: rng.choice(("shared", "own")) for k in keys if rng.random() < 0.6}
        manifest = manifest_path(tmp_path, local)
        manifest.write_text(text("d2" if local else "d1", services))
        if rng.random() < 0.2:  # a foreign link to a shared socket, in a directory apply does not own
            path = root / "etc/qubes-rpc" / f"svc+f{step}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(rng.choice(sorted(READING)))
        before = set(qrexec_view.forgeable(root, READING, UNITS))  # what the adversary's files made
        if rng.random() < 0.5:
            code = killed_apply(manifest, root, rng.randrange(1, 30))
            kills += code is None
        else:
            code, output = apply_in_process(manifest, root)
            assert code == 0 or "conflict" in output, output
        applied += code == 0
        now = set(qrexec_view.forgeable(root, READING, UNITS))
        when = f"step {step}: {'local' if local else 'etc'} {services}, exit {code}"
        assert now <= before, f"{when}: apply made calls forgeable: {now - before}"
        assert code != 0 or not now, f"{when}: apply neither pinned nor refused: {now}"
    assert kills >= 5 and applied >= 5, (kills, applied)


def forge_by_hand(tmp_path: Path) -> tuple[Path, Path]:
    """A tree apply never leaves: svc+x on the shared socket with no pin under a descriptor-less svc."""
    manifest = manifest_path(tmp_path, False)
    manifest.write_text(text("d1", {"svc": "own", "svc+x": "shared"}))
    root = tmp_path / "root"
    code, output = apply_in_process(manifest, root)
    assert code == 0, output
    assert_unforgeable(root, "after apply")
    (root / "etc/qubes/rpc-config/svc+x").unlink()  # the pin, gone
    assert qrexec_view.forgeable(root, READING, UNITS), "the oracle sees no forgery"
    return manifest, root


def test_check_and_list_fail_on_a_forgeable_disk_whatever_made_it(tmp_path: Path) -> None:
    manifest, root = forge_by_hand(tmp_path)
    for verb in ("check", "list"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main([verb, "-c", str(manifest), "--root", str(root)])
        assert code == 1, out.getvalue()
        assert "FORGEABLE: calls of svc+x can reach /etc/qubes-rpc/svc+x" in out.getvalue(), out.getvalue()
    code, output = apply_in_process(manifest, root)  # apply pins it again
    assert code == 0, output
    assert_unforgeable(root, "after the repairing apply")


def test_check_sees_what_the_other_manifest_made_forgeable(tmp_path: Path) -> None:
    """Across manifests: the /usr/local manifest's svc+x on its shared socket, then a foreign
    /etc config makes svc skip descriptors.  The /usr/local manifest's check fails."""
    root = build(tmp_path, "root", [(True, {"svc+x": "shared"})], {})
    (root / "etc/qubes/rpc-config").mkdir(parents=True)
    (root / "etc/qubes/rpc-config/svc").write_text("skip-service-descriptor=true\n")
    assert qrexec_view.forgeable(root, READING, UNITS)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["check", "-c", str(manifest_path(tmp_path, True)), "--root", str(root)])
    assert code == 1 and "FORGEABLE" in out.getvalue(), out.getvalue()
