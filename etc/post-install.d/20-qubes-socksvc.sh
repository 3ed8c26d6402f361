#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
#
# Tell dom0 what "qubes-socksvc apply" installed in this qube: supported-rpc.NAME=1 for
# every service and forward, supported-service.NAME=1 for every daemon's qubes_service
# (the list: "qubes-socksvc features", from what apply recorded, by core-agent's
# persistence rule).  qubes.PostInstall runs this as root after an install or an update
# (qubes-core-agent-linux qubes-rpc/post-install.d/), and 90-qubes-core-agent.sh sends the
# requests to dom0 afterwards.  It never fails the update: problems go to stderr.
#
# $1: a staging root to read instead of / (tests).

root=${1:-/}

# Not in a qube (or no core-agent): nobody to tell.
command -v qvm-features-request >/dev/null 2>&1 || exit 0

if ! command -v qubes-socksvc >/dev/null 2>&1; then
    echo "qubes-socksvc: WARNING: qubes-socksvc not found; nothing announced to dom0" >&2
    exit 0
fi

if ! features=$(qubes-socksvc features --root "$root"); then
    echo "qubes-socksvc: WARNING: 'qubes-socksvc features' reported problems (see above);" \
         "announcing what it listed" >&2
fi
[ -n "$features" ] || exit 0

# One FEATURE=1 per line, each of [A-Za-z0-9_.=-]: splitting on blanks is exact.
# shellcheck disable=SC2086
if ! qvm-features-request $features; then
    echo "qubes-socksvc: WARNING: qvm-features-request failed (see above); dom0 was not told" \
         "what qubes-socksvc installed" >&2
fi
exit 0
