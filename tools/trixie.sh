#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
# make trixie: the proof on Debian 13.  Debootstraps trixie into a scratch
# directory, builds the .deb there, installs it with apt, checks the installed
# command and its man pages, purges it, then runs the whole suite ("make
# check-here": slow tests included, so the package builds, lintian, and the
# end-to-end test under a real systemd --user) on trixie's Python.
#
# Not part of "make check": it downloads a distribution (about 150 MB; a few
# minutes).  Root only.  /proc, /dev and /sys (so /sys/fs/cgroup, which the
# user manager of the end-to-end test needs) are bind-mounted into the chroot
# and unmounted on exit; the scratch directory is removed unless TRIXIE_KEEP=1.
#   TRIXIE_MIRROR   a Debian mirror URL (default: debootstrap's own default)
#   TRIXIE_DIR      where to create the scratch directory (default /var/tmp)
#   TRIXIE_LOG      the log file (default: trixie.log in the scratch directory's parent)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [ "$(id -u)" != 0 ]; then
    echo "make trixie: needs root (debootstrap, chroot, mounts)" >&2
    exit 2
fi
for tool in debootstrap chroot mount umount findmnt; do
    command -v "$tool" >/dev/null || { echo "make trixie: $tool not found (apt-get install debootstrap)" >&2; exit 2; }
done

root=$(mktemp -d "${TRIXIE_DIR:-/var/tmp}/socksvc-trixie.XXXXXX")
chmod 0755 "$root"  # the chroot's /: users (nobody, the test user) must get through it
log=${TRIXIE_LOG:-$root.log}
mounted=()

cleanup() {
    local status=$? i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -R "${mounted[i]}" 2>/dev/null || umount -R -l "${mounted[i]}" || true
    done
    if findmnt -rn -o TARGET | grep -q "^$root/"; then
        echo "make trixie: mounts left under $root; not removing it" >&2
    elif [ "${TRIXIE_KEEP:-}" = 1 ]; then
        echo "make trixie: kept $root"
    else
        rm -rf --one-file-system "$root"
    fi
    echo "make trixie: log in $log"
    exit "$status"
}
trap cleanup EXIT

bind() {  # bind-mount $1 (recursively) at the same path in the chroot
    mkdir -p "$root$1"
    mount --rbind "$1" "$root$1"
    mount --make-rslave "$root$1"
    mounted+=("$root$1")
}

step() { echo "=== $(date -u '+%F %T') $*" | tee -a "$log"; }

: > "$log"
step "debootstrap trixie into $root"
# shellcheck disable=SC2086  # the mirror is optional
debootstrap --variant=minbase --include=ca-certificates,make trixie "$root" ${TRIXIE_MIRROR:-} >>"$log" 2>&1

bind /proc
bind /dev
bind /sys
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mounted+=("$root/run")
mkdir -p "$root/run/lock"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# CA certificates added on this machine (e.g. a proxy's) are trusted in the chroot too (pip, PyPI).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >>"$log" 2>&1
fi
# A world-readable copy of the working tree: the daemon runs as nobody.
mkdir -p "$root/srv/qubes-socksvc"
tar -C "$repo" --exclude-vcs --exclude=./.venv --exclude=./pkgs --exclude=./rpmbuild --exclude=./build \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=./.pytest_cache --exclude=./.mypy_cache \
    --exclude=./.ruff_cache --exclude=./.hypothesis -cf - . | tar -C "$root/srv/qubes-socksvc" -xf -
chmod -R a+rX "$root/srv/qubes-socksvc"

step "in the chroot: make setup-test, make deb, apt-get install the .deb, make check-here"
chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    /bin/bash -euo pipefail -c '
umask 022
cd /srv/qubes-socksvc
make setup-test
. /etc/os-release
echo "chroot: $PRETTY_NAME, $(python3 --version), $(systemctl --version | head -1)"
pkgs=$(mktemp -d /tmp/socksvc-pkgs.XXXXXX)
chmod 755 "$pkgs"
make deb PKGDIR="$pkgs"
apt="apt-get -y -q -o DPkg::Lock::Timeout=600"
$apt install "$pkgs"/qubes-socksvc_*_all.deb
qubes-socksvc check -c /usr/share/doc/qubes-socksvc/examples/qubes-socksvc.yaml
qubes-socksvc --help >/dev/null
test -f /usr/share/man/man1/qubes-socksvc.1.gz
test -f /usr/share/man/man5/qubes-socksvc.yaml.5.gz
head -1 /usr/bin/qubes-socksvc
$apt purge qubes-socksvc
rm -rf "$pkgs"
echo "chroot: installed, checked and purged the .deb"
make check-here
' 2>&1 | tee -a "$log"
step "done: trixie passed"
