# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Build the .deb and the .rpm once per test session, with the Makefile's own targets.

``make deb`` and ``make rpm`` build from a copy of the working tree (a build
directory under PKGDIR, a tarball under RPMDIR); both point outside the
checkout here, so a test run leaves nothing in it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Tools the builds need; "make setup-test" installs them (TEST_DEBS).
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "pybuild", "lintian", "rpmbuild", "rpm", "make")


@dataclass(frozen=True)
class Built:
    dir: Path  # holds pkgs/ and rpmbuild/
    deb: Path
    changes: Path
    rpm: Path
    log: str  # make's output: dpkg-buildpackage, lintian, rpmbuild
    seconds: float

    @property
    def lintian_tags(self) -> list[str]:
        """Lintian's lines for the package, e.g. ``W: qubes-socksvc: no-manual-page [...]``."""
        return [line for line in self.log.splitlines()
                if len(line) > 3 and line[1:3] == ": " and line[0] in "EWIPXO" and "qubes-socksvc" in line]


_built: Built | None = None


def missing_tools() -> list[str]:
    return [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]


def build() -> Built:
    """The packages of this working tree, built on first use."""
    global _built
    if _built is not None:
        return _built
    out = Path(tempfile.mkdtemp(prefix="socksvc-pkgs-"))
    out.chmod(0o755)  # apt's _apt user reads the .deb from here
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    # Debian's interpreter and tools, whatever python3 the test runner uses.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYENV"))}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["LC_ALL"] = "C.UTF-8"
    started = time.monotonic()
    result = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "deb", "rpm", f"PKGDIR={out}/pkgs",
         f"RPMDIR={out}/rpmbuild", "PYTHON=/usr/bin/python3"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
    )
    seconds = time.monotonic() - started
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"make deb rpm failed ({result.returncode}):\n{log[-8000:]}")
    debs = sorted((out / "pkgs").glob("qubes-socksvc_*_all.deb"))
    changes = sorted((out / "pkgs").glob("qubes-socksvc_*.changes"))
    rpms = sorted((out / "rpmbuild/RPMS/noarch").glob("qubes-socksvc-*.noarch.rpm"))
    assert len(debs) == 1 and len(changes) == 1 and len(rpms) == 1, f"unexpected build output:\n{log[-4000:]}"
    _built = Built(out, debs[0], changes[0], rpms[0], log, seconds)
    return _built
