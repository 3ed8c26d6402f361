#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
# The main job on the bundled example, end to end, on this machine (run as root):
#   1. check + apply examples/qubes-socksvc.yaml into a staging root (units, qubes-rpc links, rpc-config);
#   2. verify the units with systemd-analyze;
#   3. listen on the declared sockets in /run/qubes with the real systemd-socket-activate, which starts
#      the daemon from the spec apply compiled (as nobody: it refuses root) on the first call, as a
#      user manager would;
#   4. call every example service through its staged qubes-rpc symlink, like qrexec does;
#   5. the worked example of README.md (examples/notes.yaml): a notes qube called from two qubes
#      with qubes_socksvc.client, under the README's dom0 policy (tests/standin plays qrexec-client-vm).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
REPO=$PWD
ROOT=$(mktemp -d /tmp/qubes-socksvc-demo.XXXXXX)
MANIFEST=$REPO/examples/qubes-socksvc.yaml
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -f /run/qubes/socksvc-example.sock /run/qubes/socksvc-raw.sock /run/qubes/socksvc-example.RawEcho.sock \
        /run/qubes/socksvc-notes.sock
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
    systemd-socket-activate "${args[@]}" -E PYTHONPATH -E QUBES_SOCKSVC_NOTES_DIR \
        setpriv --reuid=nobody --regid=nogroup --clear-groups \
        "$PYTHON" -P -m qubes_socksvc serve "$daemon" \
        --spec "${SPECS:-$ROOT/var/lib/qubes-socksvc/daemons}/$daemon.json" &
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
step "every example service answered through its qubes-rpc symlink"

# --- the worked example: a notes qube (README.md, "A worked example") ---------------------
NOTES_MANIFEST=$REPO/examples/notes.yaml
NOTES_ROOT=$ROOT/notes-qube
step "worked example: check examples/notes.yaml and import its handler, as the author's test would"
"$PYTHON" -c '
import sys
from qubes_socksvc.testing import check_manifest
manifest = check_manifest(sys.argv[1])
for name, (daemon, service) in manifest.services().items():
    print(f"{manifest.path}: daemon {daemon.name}: {name} -> {service.handler} imports; max_input {service.max_input}")
' "$NOTES_MANIFEST"
step "its handler called in-process with qubes_socksvc.testing (no daemon, no qrexec)"
QUBES_SOCKSVC_NOTES_DIR=$ROOT/notes-unit "$PYTHON" -c '
from qubes_socksvc.testing import call_handler
for action, body in (("add", b"{\"text\": \"test note\"}"), ("list", b"")):
    print(f"my.Notes+{action}:", call_handler("qubes_socksvc.examples_notes:handle", body,
                                              service=f"my.Notes+{action}", source="work").decode(), end="")'
step "apply it in the notes qube (staged in $NOTES_ROOT) and listen on its socket"
socksvc apply -c "$NOTES_MANIFEST" --root "$NOTES_ROOT"
export QUBES_SOCKSVC_NOTES_DIR=$ROOT/notes-data
install -d -m 0700 -o nobody -g nogroup "$QUBES_SOCKSVC_NOTES_DIR"
SPECS=$NOTES_ROOT/var/lib/qubes-socksvc/daemons activate notes /run/qubes/socksvc-notes.sock
for _ in $(seq 50); do [ -S /run/qubes/socksvc-notes.sock ] && break; sleep 0.1; done
step "dom0's policy for it, as README.md gives it"
grep -E '^my\.Notes\s' README.md | tee "$ROOT/30-user.policy"
export PATH=$REPO/tests/standin:$(dirname "$PYTHON"):$PATH SOCKSVC_STANDIN_TARGET=notes \
    SOCKSVC_STANDIN_POLICY=$ROOT/30-user.policy SOCKSVC_STANDIN_RPC_DIR=$NOTES_ROOT/etc/qubes-rpc \
    SOCKSVC_STANDIN_RPC_CONFIG_DIR=$NOTES_ROOT/etc/qubes/rpc-config
notes() {  # QUBE ARGS...: run the example's client in qube QUBE
    SOCKSVC_STANDIN_SOURCE=$1 "$PYTHON" -m qubes_socksvc.examples_notes --target notes "${@:2}"
}
step "from qube work: add two notes (qubes_socksvc.client -> qrexec-client-vm notes my.Notes+add)"
notes work add "buy milk"
notes work add "call Ann"
step "from qube personal: +list is allowed, +add is refused by dom0's policy"
notes personal list
notes personal add "from personal" || echo "exit code $? (126: refused by policy)"
step "from qube work: delete note 1, list again"
notes work delete 1
notes work list
step "done: every example service answered through its qubes-rpc symlink, and the notes qube worked end to end"
