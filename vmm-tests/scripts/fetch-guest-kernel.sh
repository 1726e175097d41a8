#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Fetch the guest kernel for the VM harness: Debian's linux-image-cloud-amd64
# from trixie-backports (7.3.x, the first kernel with RWF_DONTCACHE on block
# devices). Nothing is installed into the system: apt gets a private sources
# list and lists directory under the cache, the packages are fetched with
# `apt-get download` (hash-checked against the signed index) and unpacked
# with `dpkg -x`.
#
# Debian splits the kernel: linux-image-cloud-amd64 -> linux-image-<ABI>-...
# (empty) -> linux-binary-<ABI> (vmlinuz), linux-modules-<ABI>,
# linux-base-<ABI> (config). The ABI is resolved from the dependencies.
#
# Result: $CACHE/kernel/<ABI>/{vmlinuz,config,kernel/...} and the ABI in
# $CACHE/kernel/current. The kernel directory is printed on stdout. A second
# run finds the cache and needs no network (pass --refresh to look again).
#
# Environment:
#   VMM_TESTS_CACHE_DIR    cache root (default /var/cache/vhost-user-blk/vmm-tests)
#   VMM_TESTS_KERNEL_SUITE suite to take the kernel from (default trixie-backports)
#   VMM_TESTS_KERNEL_PKG   meta package (default linux-image-cloud-amd64)

set -eu

CACHE=${VMM_TESTS_CACHE_DIR:-/var/cache/vhost-user-blk/vmm-tests}
SUITE=${VMM_TESTS_KERNEL_SUITE:-trixie-backports}
META=${VMM_TESTS_KERNEL_PKG:-linux-image-cloud-amd64}
SYSTEM_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
REFRESH=0
[ "${1:-}" = "--refresh" ] && REFRESH=1

log() { printf 'fetch-guest-kernel: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

kernel_complete() {
    d="$CACHE/kernel/$1"
    [ -s "$d/vmlinuz" ] && [ -s "$d/config" ] &&
        [ -s "$d/kernel/drivers/block/virtio_blk.ko.xz" ]
}

mkdir -p "$CACHE/kernel"

# Fast path, no lock and no network: the cache is complete.
if [ "$REFRESH" = 0 ] && [ -s "$CACHE/kernel/current" ]; then
    abi=$(cat "$CACHE/kernel/current")
    if kernel_complete "$abi"; then
        printf '%s\n' "$CACHE/kernel/$abi"
        exit 0
    fi
fi

# One fetch at a time (concurrent test binaries, CI jobs).
exec 9>"$CACHE/kernel/.lock"
flock 9

if [ "$REFRESH" = 0 ] && [ -s "$CACHE/kernel/current" ]; then
    abi=$(cat "$CACHE/kernel/current")
    if kernel_complete "$abi"; then
        printf '%s\n' "$CACHE/kernel/$abi"
        exit 0
    fi
fi

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/sources.list.d" "$APT/archives/partial" \
    "$APT/keyring" "$CACHE/debs"

mirror=$(debian_mirror | head -n 1)
[ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt/sources.list*"

apt_opts() {
    printf '%s\n' \
        "-o" "Dir::Etc::sourcelist=$APT/sources.list" \
        "-o" "Dir::Etc::sourceparts=$APT/sources.list.d" \
        "-o" "Dir::State::Lists=$APT/lists" \
        "-o" "Dir::Cache::Archives=$APT/archives" \
        "-o" "Dir::Cache::pkgcache=" \
        "-o" "Dir::Cache::srcpkgcache=" \
        "-o" "APT::Sandbox::User=root" \
        "-o" "Acquire::Languages=none"
}

write_sources() {
    printf 'deb [signed-by=%s] %s %s main\n' "$1" "$mirror" "$SUITE" >"$APT/sources.list"
}

private_update() {
    # shellcheck disable=SC2046
    apt-get $(apt_opts) -q update >"$APT/update.log" 2>&1 &&
        ! grep -qE '^(W|E): .*(NO_PUBKEY|not signed|signature|InRelease)' "$APT/update.log"
}

# Verify the suite with the system's archive keyring first. A keyring too old
# for the newer suite's keys is replaced by the newest debian-archive-keyring
# the system's own (verified) sources offer, unpacked, never installed.
write_sources "$SYSTEM_KEYRING"
log "apt-get update ($SUITE from $mirror)"
if ! private_update; then
    log "the system keyring cannot verify $SUITE; fetching the newest debian-archive-keyring"
    (cd "$APT/keyring" && rm -f ./*.deb &&
        apt-get -q -o APT::Sandbox::User=root download debian-archive-keyring >/dev/null) ||
        die "cannot download debian-archive-keyring"
    rm -rf "$APT/keyring/root"
    dpkg -x "$APT"/keyring/debian-archive-keyring_*.deb "$APT/keyring/root"
    kr="$APT/keyring/root/usr/share/keyrings/debian-archive-keyring.gpg"
    [ -s "$kr" ] || die "no keyring in the debian-archive-keyring package"
    write_sources "$kr"
    private_update || { cat "$APT/update.log" >&2; die "apt-get update of $SUITE failed"; }
fi

show() {
    # shellcheck disable=SC2046
    apt-cache $(apt_opts) show "$1" 2>/dev/null
}

# linux-image-cloud-amd64 depends on linux-image-<ABI>-cloud-amd64.
flavour=${META#linux-image-}
abi=$(show "$META" | sed -n 's/^Depends: //p' | head -n 1 | tr ',' '\n' |
    sed -n "s/^ *linux-image-\(.*-$flavour\)\( .*\)\{0,1\}\$/\1/p" | head -n 1)
[ -n "$abi" ] || die "cannot resolve the kernel ABI from $META's dependencies"
log "kernel ABI $abi"

# The versioned image package names what carries the files.
deps=$(show "linux-image-$abi" | sed -n 's/^Depends: //p' | head -n 1 | tr ',' '\n' |
    sed -e 's/^ *//' -e 's/ .*//' | grep -E "^linux-(binary|modules|base)-$abi\$" || true)
[ -n "$deps" ] || deps="linux-binary-$abi linux-modules-$abi linux-base-$abi"

debs="$CACHE/debs/$abi"
mkdir -p "$debs"
log "downloading $(echo $deps)"
# shellcheck disable=SC2046,SC2086
(cd "$debs" && apt-get $(apt_opts) -q download $deps >/dev/null) ||
    die "apt-get download failed"

out="$CACHE/kernel/$abi"
tmp="$CACHE/kernel/.$abi.tmp"
rm -rf "$tmp"
mkdir -p "$tmp/root"
for d in "$debs"/*.deb; do
    dpkg -x "$d" "$tmp/root"
done
src="$tmp/root/usr/lib/modules/$abi"
[ -d "$src" ] || src="$tmp/root/lib/modules/$abi"
[ -d "$src" ] || die "no usr/lib/modules/$abi in the packages"
if [ ! -s "$src/vmlinuz" ] && [ -s "$tmp/root/boot/vmlinuz-$abi" ]; then
    cp "$tmp/root/boot/vmlinuz-$abi" "$src/vmlinuz"
fi
if [ ! -s "$src/config" ] && [ -s "$tmp/root/boot/config-$abi" ]; then
    cp "$tmp/root/boot/config-$abi" "$src/config"
fi
rm -rf "$out"
mv "$src" "$out"
rm -rf "$tmp"
kernel_complete "$abi" || die "incomplete kernel in $out"
printf '%s\n' "$abi" >"$CACHE/kernel/current.tmp"
mv "$CACHE/kernel/current.tmp" "$CACHE/kernel/current"
log "ok: $out"
printf '%s\n' "$out"
