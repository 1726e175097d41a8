#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Build the guest's initramfs (an uncompressed newc cpio):
#   /init                 mounts /proc, /sys, /dev, loads the modules, runs
#                         the guest agent, powers off
#   /bin/busybox          busybox-static, applets installed at boot
#   /bin/guest-agent      the static guest agent
#   /sbin/mkfs.ext4       e2fsprogs' mke2fs with its shared libraries
#   /usr/bin/fio          with -F only: the host's fio (Debian's package) with
#                         its shared libraries, copies run through
#                         `strip --strip-unneeded` (about 90 MB all the same:
#                         fio links librbd, glusterfs, ICU, ..., and Debian
#                         ships them stripped already), for the
#                         agent's `fio` workload; a separate variant, so the
#                         default initramfs the VM tests boot stays small
#   /lib/modules/*.ko     the modules named with -m and their dependencies,
#                         decompressed
#
# Usage: build-initramfs.sh -k KERNEL_DIR -a AGENT_BIN -o OUT [-m "virtio_blk xfs"] [-F]
# (-m default: virtio_blk). KERNEL_DIR is what fetch-guest-kernel.sh prints
# (usr/lib/modules/<ABI>).

set -eu

MODULES="virtio_blk"
KDIR=
AGENT=
OUT=
FIO=
while getopts k:a:o:m:F opt; do
    case $opt in
    k) KDIR=$OPTARG ;;
    a) AGENT=$OPTARG ;;
    o) OUT=$OPTARG ;;
    m) MODULES=$OPTARG ;;
    F) FIO=/usr/bin/fio ;;
    *) echo "usage: $0 -k KERNEL_DIR -a AGENT_BIN -o OUT [-m MODULES] [-F]" >&2; exit 2 ;;
    esac
done
[ -n "$KDIR" ] && [ -n "$AGENT" ] && [ -n "$OUT" ] || {
    echo "usage: $0 -k KERNEL_DIR -a AGENT_BIN -o OUT [-m MODULES] [-F]" >&2
    exit 2
}

log() { printf 'build-initramfs: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "no $BUSYBOX (install busybox-static)"
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' ||
    ldd "$BUSYBOX" 2>&1 | grep -q 'not a dynamic' || die "$BUSYBOX is not static"
MKE2FS=$(command -v mke2fs || echo /sbin/mke2fs)
[ -x "$MKE2FS" ] || die "no mke2fs (install e2fsprogs)"
[ -x "$AGENT" ] || die "no guest agent at $AGENT"
[ -d "$KDIR/kernel" ] || die "no modules under $KDIR"
[ -z "$FIO" ] || [ -x "$FIO" ] || die "no $FIO (install fio)"

root=$(mktemp -d "${TMPDIR:-/tmp}/vmm-initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/etc" \
    "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/mnt" "$root/run" \
    "$root/lib/modules"

cp "$BUSYBOX" "$root/bin/busybox"
cp "$AGENT" "$root/bin/guest-agent"
strip --strip-debug "$root/bin/guest-agent" 2>/dev/null || true

# copy_libs BIN [strip]: the shared libraries BIN needs, at the same paths
# (libraries already there are left alone); with "strip", each copy except
# the loader goes through `strip --strip-unneeded`.
copy_libs() {
    for lib in $(ldd "$1" | awk '/=>/ { print $3 } /^[ \t]*\// { print $1 }'); do
        [ -f "$lib" ] || continue
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
        if [ "${2:-}" = strip ]; then
            case "$lib" in
            */ld-linux*) ;;
            *) strip --strip-unneeded "$root$lib" ;;
            esac
        fi
    done
}

# mke2fs and the shared libraries it needs, at the same paths.
cp "$MKE2FS" "$root/sbin/mke2fs"
ln -s mke2fs "$root/sbin/mkfs.ext4"
copy_libs "$MKE2FS"
if [ -n "$FIO" ]; then
    cp "$FIO" "$root/usr/bin/fio"
    strip --strip-unneeded "$root/usr/bin/fio"
    copy_libs "$FIO" strip
fi
# The loader is looked up at /lib64 as well as where ldd found it.
if [ -e /lib64/ld-linux-x86-64.so.2 ] && [ ! -e "$root/lib64/ld-linux-x86-64.so.2" ]; then
    mkdir -p "$root/lib64"
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"

# Modules and their dependencies (the package ships no modules.dep, so read
# the depends= field of each module's .modinfo section).
find_module() {
    find "$KDIR/kernel" -name "$1.ko*" | head -n 1
}
added=" "
add_module() {
    name=$(printf '%s' "$1" | tr '-' '_')
    case "$added" in *" $name "*) return 0 ;; esac
    f=$(find_module "$name")
    if [ -z "$f" ]; then
        grep -qs "/$name.ko" "$KDIR/modules.builtin" && return 0
        die "module $name neither built in nor found under $KDIR"
    fi
    case "$f" in
    *.xz) deps=$(xz -dc "$f" | tr '\0' '\n' | sed -n 's/^depends=//p') ;;
    *.zst) deps=$(zstd -dc "$f" | tr '\0' '\n' | sed -n 's/^depends=//p') ;;
    *) deps=$(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p') ;;
    esac
    for d in $(printf '%s' "$deps" | tr ',' ' '); do
        add_module "$d"
    done
    # Unpacked here: the guest then neither decompresses under emulation
    # nor logs busybox insmod's first, compressed attempt.
    out="$root/lib/modules/$name.ko"
    case "$f" in
    *.xz) xz -dc "$f" >"$out" ;;
    *.zst) zstd -qdc "$f" >"$out" ;;
    *) cp "$f" "$out" ;;
    esac
    printf '%s\n' "$name.ko" >>"$root/etc/modules-load"
    added="$added$name "
}
: >"$root/etc/modules-load"
for m in $MODULES; do
    add_module "$m"
done

cat >"$root/init" <<'EOT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
mount -t tmpfs tmpfs /tmp
while read -r m; do
    insmod "/lib/modules/$m" || echo "init: insmod $m failed"
done </etc/modules-load
echo "init: starting the guest agent"
/bin/guest-agent
echo "AGENT-EXIT rc=$?"
sync
poweroff -f
EOT
chmod 755 "$root/init"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true

mkdir -p "$(dirname "$OUT")"
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "ok: $OUT ($(du -h "$OUT" | cut -f1), modules: $(tr '\n' ' ' <"$root/etc/modules-load")${FIO:+, with $FIO})"
