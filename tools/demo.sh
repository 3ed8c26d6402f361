#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
# The main job on the bundled example, end to end, on this machine (run as root):
#   1. check + apply examples/qubes-socksvc.yaml into a staging root (units, qubes-rpc links, rpc-config);
#   2. verify the units with systemd-analyze;
#   3. listen on the declared sockets in /run/qubes with the real systemd-socket-activate, which starts
#      the daemon (as nobody: it refuses root) on the first call, as a user manager would;
#   4. call every example service through its staged qubes-rpc symlink, like qrexec does.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
REPO=$PWD
ROOT=$(mktemp -d /tmp/qubes-socksvc-demo.XXXXXX)
MANIFEST=$REPO/examples/qubes-socksvc.yaml
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -f /run/qubes/socksvc-example.sock /run/qubes/socksvc-raw.sock /run/qubes/socksvc-example.RawEcho.sock
    rm -rf "$ROOT"
}
trap cleanup EXIT
socksvc() { PYTHONPATH=$REPO "$PYTHON" -m qubes_socksvc "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "demo: run as root (it listens in /run/qubes like qrexec's sockets)" >&2; exit 1; }
chmod 755 "$ROOT"

step "qubes-socksvc check"
socksvc check -c "$MANIFEST"

step "qubes-socksvc apply --root $ROOT (first run)"
socksvc apply -c "$MANIFEST" --root "$ROOT"
step "qubes-socksvc apply again: nothing to do"
socksvc apply -c "$MANIFEST" --root "$ROOT"

step "the rendered socket unit"
cat "$ROOT/etc/systemd/user/qubes-socksvc-example.socket"
step "systemd-analyze --user verify"
mkdir -p -m 0700 "$ROOT/xdg"
XDG_RUNTIME_DIR=$ROOT/xdg SYSTEMD_UNIT_PATH=$ROOT/etc/systemd/user: \
    systemd-analyze --user verify "$ROOT"/etc/systemd/user/*.s* && echo "units OK"
step "qubes-rpc links and rpc-config"
ls -l "$ROOT/etc/qubes-rpc" | tail -n +2
head -n 20 "$ROOT"/etc/qubes/rpc-config/*

step "sockets listening in /run/qubes; the daemons start on the first call (socket activation)"
install -d -m 2770 /run/qubes
activate() {  # DAEMON SOCKET...
    local daemon=$1; shift
    local args=()
    for s in "$@"; do args+=(-l "$s"); done
    systemd-socket-activate "${args[@]}" -E PYTHONPATH \
        setpriv --reuid=nobody --regid=nogroup --clear-groups \
        "$PYTHON" -m qubes_socksvc serve "$daemon" -c "$MANIFEST" &
    pids+=($!)
}
export PYTHONPATH=$REPO
activate example /run/qubes/socksvc-example.sock
activate raw /run/qubes/socksvc-raw.sock /run/qubes/socksvc-example.RawEcho.sock
for _ in $(seq 50); do [ -S /run/qubes/socksvc-example.RawEcho.sock ] && break; sleep 0.1; done
socksvc list -c "$MANIFEST" --root "$ROOT"

call() { socksvc call --rpc-dir "$ROOT/etc/qubes-rpc" --rpc-config-dir "$ROOT/etc/qubes/rpc-config" "$@"; }
step "example.Echo (first call: starts the daemon)"
echo "hello from the demo" | call example.Echo --source work
step "example.Hello+friend from qube work (NAME+ARG has its own entry)"
call example.Hello+friend --source work </dev/null
step "example.Hello+stranger, dom0 form with a keyword target (falls back to NAME)"
call example.Hello+stranger --source personal --dom0 --target-type keyword --target @dispvm </dev/null
step "example.Sha256 of 256 MiB streamed through the socket (constant memory)"
head -c 268435456 /dev/zero | call example.Sha256
echo "expected: $(head -c 268435456 /dev/zero | sha256sum | cut -d' ' -f1)"
step "example.Upper (a plain function in a worker thread)"
echo "shout this" | call example.Upper
step "example.RawEcho (skip-service-descriptor: its own socket, no descriptor)"
echo "no descriptor was sent" | call example.RawEcho
step "an unknown service: qrexec's exit code 125"
call example.Nothing </dev/null || echo "exit code $?"
step "done: every example service answered through its qubes-rpc symlink"
