# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Install a wheel into a staging root with explicit paths: ``make install-python``.

What Fedora's ``%pyproject_install`` and pybuild's pyproject plugin do, for
rpmbuilds without those macros (Debian's) and for a plain ``make install``.
pip is not used for this step: on Debian, ``pip install --prefix=/usr`` lands
in ``/usr/local`` whatever the prefix.  The ``installer`` module writes the
package to ``--sitelib`` and console scripts to ``--bindir``, with a ``#!``
line naming this interpreter; rpmbuild's brp scripts byte-compile.
"""

from __future__ import annotations

import argparse
import sys

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--destdir", required=True, help="the staging root (DESTDIR)")
    parser.add_argument("--sitelib", required=True,
                        help="the Python package directory, e.g. /usr/lib/python3/dist-packages")
    parser.add_argument("--bindir", required=True, help="where console scripts go, e.g. /usr/bin")
    parser.add_argument("--prefix", required=True, help="the root of the wheel's data files, e.g. /usr")
    parser.add_argument("wheel")
    args = parser.parse_args()
    scheme = {"purelib": args.sitelib, "platlib": args.sitelib, "scripts": args.bindir, "data": args.prefix,
              "headers": f"{args.prefix}/include"}
    destination = SchemeDictionaryDestination(scheme, interpreter=sys.executable, script_kind="posix",
                                              destdir=args.destdir)
    with WheelFile.open(args.wheel) as source:
        install(source, destination, additional_metadata={})
    return 0


if __name__ == "__main__":
    sys.exit(main())
