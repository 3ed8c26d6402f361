# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Purge removes the directories the package's apply created, and nothing else (issue 22, point 9).

The real maintainer scripts (debian/postinst, prerm, postrm; the RPM spec's %post, %preun,
%postun with its macros expanded) run in a private mount namespace where /etc, /var/lib and
/usr/local are empty tmpfs mounts: install (apply both manifests), upgrade, remove, purge.
Seconds, not the minutes of tests/test_e2e_systemd.py, which checks the same on a real
apt install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ROOTS = ("/etc", "/var/lib", "/usr/local")

MANIFEST = """\
version: 1
daemons:
  {name}:
    socket: /run/qubes/socksvc-{name}.sock
    services:
      {name}.Echo:
        handler: qubes_socksvc.examples:echo
        wait_for_session: true
"""

#: Before the package: what a Debian or Fedora system has, and one empty directory of someone
#: else's among those apply writes to (kept: the package did not create it).
BEFORE = """\
mkdir -p /usr/local/bin /usr/local/etc /usr/local/lib /usr/local/share /etc/systemd/user /etc/qubes-rpc
printf '{system}' > /etc/qubes-socksvc.yaml
printf '{local}' > /usr/local/etc/qubes-socksvc.yaml
"""

#: After every apply: someone else's file in a directory apply created (kept, and its parent).
FOREIGN = "echo 'wait-for-session=true' > /usr/local/etc/qubes/rpc-config/other.Service\n"

#: What must be left after the purge: the system's, someone else's, the administrator's manifest.
LEFT = {
    "/etc", "/etc/systemd", "/etc/systemd/user", "/etc/qubes-rpc",
    "/var/lib",
    "/usr/local", "/usr/local/bin", "/usr/local/etc", "/usr/local/lib", "/usr/local/share",
    "/usr/local/etc/qubes-socksvc.yaml",
    "/usr/local/etc/qubes", "/usr/local/etc/qubes/rpc-config", "/usr/local/etc/qubes/rpc-config/other.Service",
}

#: What apply created (checked before the purge, so that the test cannot pass by creating nothing).
CREATED = {
    "/etc/qubes", "/etc/qubes/rpc-config", "/usr/local/etc/qubes-rpc", "/usr/local/lib/systemd",
    "/usr/local/lib/systemd/user", "/usr/local/var", "/usr/local/var/lib", "/var/lib/qubes-socksvc",
}


def in_sandbox(script: str, tools: Path) -> list[str]:
    """Run ``script`` (sh, set -e) with ROOTS on empty tmpfs mounts, ``qubes-socksvc`` this
    checkout's; returns every path under ROOTS afterwards (the mounts vanish with the namespace)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    tools.mkdir(exist_ok=True)
    (tools / "qubes-socksvc").write_text(f'#!/bin/sh\nexec {sys.executable} -m qubes_socksvc "$@"\n')
    (tools / "qubes-socksvc").chmod(0o755)
    mounts = "".join(f"mount -t tmpfs tmpfs {root}\n" for root in ROOTS)
    before = BEFORE.format(system=MANIFEST.format(name="purgea"), local=MANIFEST.format(name="purgeb"))
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
         mounts + before + script + f"find {' '.join(ROOTS)} | sed 's/^/left /'\n"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def paths(listing: list[str], mark: str = "left") -> set[str]:
    """The paths a ``find ... | sed 's/^/MARK /'`` listed (the scripts' own output aside)."""
    return {line.removeprefix(f"{mark} ") for line in listing if line.startswith(f"{mark} /")}


def test_deb_purge_removes_the_directories_apply_created_and_nothing_else(tmp_path: Path) -> None:
    scripts = REPO / "debian"
    listing = in_sandbox(
        f"sh {scripts}/postinst configure\n" + FOREIGN
        + "find /etc /var/lib /usr/local -type d | sed 's/^/installed /'\n"
        + f"sh {scripts}/postinst configure 0.1.0\n"  # an upgrade: the list is kept, not redone
        + f"sh {scripts}/prerm remove\nsh {scripts}/postrm remove\n"
        + "rm /etc/qubes-socksvc.yaml\n"  # dpkg removes the conffile before postrm purge
        + f"sh {scripts}/postrm purge\n",
        tmp_path / "bin")
    installed = paths(listing, "installed")
    assert installed >= CREATED, sorted(CREATED - installed)
    assert paths(listing) == LEFT


def rpm_scriptlet(spec: str, section: str, bindir: Path) -> str:
    """One scriptlet of the spec, its macros expanded as rpmbuild would on Fedora."""
    body = re.search(rf"^%{section}\n(.*?)(?=^%\w)", spec, re.MULTILINE | re.DOTALL)
    assert body is not None, section
    text = body.group(1)
    for macro, value in (("_localstatedir", "/var"), ("_sysconfdir", "/etc"), ("_bindir", str(bindir)),
                         ("name", "qubes-socksvc")):
        text = text.replace(f"%{{{macro}}}", value)
    assert "%{" not in text, text
    return text.replace("%%", "%")


def test_rpm_erase_removes_the_directories_apply_created_and_nothing_else(tmp_path: Path) -> None:
    spec = (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text()
    bindir = tmp_path / "bin"
    scriptlets = tmp_path / "scriptlets"
    scriptlets.mkdir()
    for section in ("post", "preun", "postun"):
        (scriptlets / section).write_text(rpm_scriptlet(spec, section, bindir))
    listing = in_sandbox(
        f"sh {scriptlets}/post 1\n" + FOREIGN
        + f"sh {scriptlets}/post 2\n"  # an upgrade
        + f"sh {scriptlets}/preun 0\nsh {scriptlets}/postun 0\n"
        + "rm /etc/qubes-socksvc.yaml\n",  # rpm removes the %config file (unchanged) with the package
        bindir)
    assert paths(listing) == LEFT


def test_purge_keeps_what_was_there_before_even_when_empty(tmp_path: Path) -> None:
    """A directory apply would have created, there before the package: the list never names it."""
    scripts = REPO / "debian"
    listing = in_sandbox(
        "mkdir -p /usr/local/var/lib /usr/local/lib/systemd\n"
        + f"sh {scripts}/postinst configure\nsh {scripts}/prerm remove\nsh {scripts}/postrm remove\n"
        + f"rm /etc/qubes-socksvc.yaml\nsh {scripts}/postrm purge\n",
        tmp_path / "bin")
    left = paths(listing)
    assert {"/usr/local/var", "/usr/local/var/lib", "/usr/local/lib/systemd"} <= left
    assert "/usr/local/lib/systemd/user" not in left and "/usr/local/etc/qubes-rpc" not in left


@pytest.mark.parametrize("system", ["deb", "rpm"])
def test_purge_keeps_a_directory_a_package_made_its_own_since(tmp_path: Path, system: str) -> None:
    """/etc/qubes was absent at first install (listed), and a package installed since owns it
    (a stand-in dpkg-query or rpm says so): purge leaves it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool, query = ("dpkg-query", "-S") if system == "deb" else ("rpm", "-qf")
    (bindir / tool).write_text(f'#!/bin/sh\n[ "$1" = "{query}" ] && [ "$2" = /etc/qubes ]\n')
    (bindir / tool).chmod(0o755)
    if system == "deb":
        scripts = REPO / "debian"
        script = (f"sh {scripts}/postinst configure\nsh {scripts}/prerm remove\nsh {scripts}/postrm remove\n"
                  f"rm /etc/qubes-socksvc.yaml\nsh {scripts}/postrm purge\n")
    else:
        spec = (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text()
        for section in ("post", "preun", "postun"):
            (tmp_path / section).write_text(rpm_scriptlet(spec, section, bindir))
        script = (f"sh {tmp_path}/post 1\nsh {tmp_path}/preun 0\nsh {tmp_path}/postun 0\n"
                  "rm /etc/qubes-socksvc.yaml\n")
    left = paths(in_sandbox(script, bindir))
    assert "/etc/qubes" in left and "/etc/qubes/rpc-config" not in left, sorted(left)
