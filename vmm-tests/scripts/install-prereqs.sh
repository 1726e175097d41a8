#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Install what the VM harness needs on a Debian 12 (bookworm) host:
#   - QEMU 10.0.x (qemu-system-x86, qemu-utils for qemu-storage-daemon)
#     from bookworm-backports,
#   - busybox-static (the guest's userland), e2fsprogs (mkfs.ext4 in the
#     guest, e2fsck/debugfs on the host), cpio (host tooling), fio (the
#     host-driven bench, and the guest's fio: build-initramfs.sh -F copies
#     /usr/bin/fio), xz-utils,
#   - ceph-mon, ceph-osd, ceph-common (the throw-away test cluster that
#     ceph-cluster.sh starts for the RBD tests) and librbd-dev, librados-dev
#     (the backend's RBD engine links librbd and librados).
#
# Idempotent: when everything is present it only runs dpkg-query and exits.
# The backports mirror is derived at run time from the Debian mirror already
# configured in /etc/apt/sources.list{,.d/*}; no host name is hard-coded.
#
# Usage: install-prereqs.sh [--check]   (--check: exit 1 if something is missing)

set -eu

QEMU_MIN_MAJOR=10
BPO_LIST=/etc/apt/sources.list.d/vmm-tests-bookworm-backports.sources
PLAIN_PKGS="busybox-static e2fsprogs cpio fio xz-utils ceph-mon ceph-osd ceph-common librbd-dev librados-dev"
BPO_PKGS="qemu-system-x86 qemu-utils"

log() { printf 'install-prereqs: %s\n' "$*" >&2; }

installed_version() {
    dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "install" && $3 == "installed" { print $4 }'
}

qemu_ok() {
    for p in $BPO_PKGS; do
        v=$(installed_version "$p")
        [ -n "$v" ] || return 1
        # Versions look like 1:10.0.2+ds-2+deb13u1~bpo12+1: strip epoch.
        major=$(printf '%s' "$v" | sed -e 's/^[0-9]*://' -e 's/\..*//')
        [ "$major" -ge "$QEMU_MIN_MAJOR" ] 2>/dev/null || return 1
    done
    command -v qemu-system-x86_64 >/dev/null 2>&1 || [ -x /usr/bin/qemu-system-x86_64 ]
}

missing_plain() {
    for p in $PLAIN_PKGS; do
        [ -n "$(installed_version "$p")" ] || printf '%s ' "$p"
    done
}

miss=$(missing_plain)
if qemu_ok && [ -z "$miss" ]; then
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    log "missing: ${miss}$(qemu_ok || echo "qemu>=$QEMU_MIN_MAJOR")"
    exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -n "$0" "$@"
    fi
    log "must run as root (missing: $miss qemu)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

if ! qemu_ok; then
    if [ ! -f "$BPO_LIST" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror=$(debian_mirror | head -n 1)
        if [ -z "$mirror" ]; then
            log "cannot find the Debian bookworm mirror in /etc/apt/sources.list*"
            exit 1
        fi
        log "adding bookworm-backports from $mirror"
        cat >"$BPO_LIST" <<EOT
# Added by vmm-tests/scripts/install-prereqs.sh (QEMU 10 for the VM harness).
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
    fi
fi

log "apt-get update"
apt-get update -qq >/dev/null || apt-get update
if [ -n "$miss" ]; then
    log "installing $miss"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $miss >/dev/null
fi
if ! qemu_ok; then
    log "installing $BPO_PKGS from bookworm-backports"
    # shellcheck disable=SC2086
    apt-get install -y -qq -t bookworm-backports --no-install-recommends $BPO_PKGS >/dev/null
fi

if ! qemu_ok; then
    log "QEMU >= $QEMU_MIN_MAJOR still missing after install"
    exit 1
fi
log "ok: $(qemu-system-x86_64 --version | head -n 1)"
