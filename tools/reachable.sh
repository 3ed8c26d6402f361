#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
# Run "make TARGET-here" where the unprivileged daemon can read the code.
#
# The daemon refuses root, so the demo, the tests and the benchmarks run it as
# "nobody"; a checkout under a directory nobody may enter (a 0700 home or
# temporary directory) would make every such run fail.  Then the target runs in
# a world-readable copy of the checkout (without .venv), removed afterwards.
set -euo pipefail
target=$1
cd "$(dirname "$0")/.."
if setpriv --reuid=nobody --regid=nogroup --clear-groups -- test -r "$PWD/qubes_socksvc/__init__.py" 2>/dev/null; then
    exec make "$target-here"
fi
copy=$(mktemp -d /tmp/qubes-socksvc-"$target".XXXXXX)
trap 'rm -rf "$copy"' EXIT
echo "$PWD is not readable by user nobody (who runs the daemon): running 'make $target' in a copy, $copy"
tar --exclude=./.venv -cf - . | tar -xf - -C "$copy"
chmod -R a+rX "$copy"
make -C "$copy" "$target-here"
