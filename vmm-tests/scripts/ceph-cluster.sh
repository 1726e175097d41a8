#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# A throw-away single-node Ceph cluster for the RBD tests: one monitor and
# one OSD whose object store is RAM (memstore), on 127.0.0.1 only, with
# authentication off and no manager (pools, images and I/O need none).
# Everything lives under DIR: the config, the daemons' data, logs, admin
# sockets and pid files; nothing is written to /etc/ceph or /var/lib/ceph.
#
# Usage:
#   ceph-cluster.sh start DIR   start the cluster, create the pool and image,
#                               print "conf=DIR/ceph.conf" when ready
#   ceph-cluster.sh stop DIR    stop every daemon by its pid file
#   ceph-cluster.sh stop-osd DIR | start-osd DIR
#                               freeze / thaw the OSD (SIGSTOP / SIGCONT):
#                               clients' operations stall until their
#                               rados_osd_op_timeout, as with an OSD that is
#                               gone, yet the memstore keeps the data, which
#                               a real restart of a RAM store would lose
#
# Environment (optional):
#   CEPH_POOL (rbd), CEPH_IMAGE (test), CEPH_IMAGE_MB (256): the pool and the
#   image created at start; CEPH_IMAGE= (empty) creates none.
#   CEPH_MON_PORT: the monitor's port (msgr2); default: a free one.
#   CEPH_STORE_MB (1024): the memstore size, in RAM.
#
# Clients use "-c DIR/ceph.conf" (or CEPH_CONF=DIR/ceph.conf).

set -eu

log() { printf 'ceph-cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ $# -eq 2 ] || die "usage: $0 start|stop|stop-osd|start-osd DIR"
cmd=$1
dir=$2

pid_of() {
    [ -s "$dir/run/$1.pid" ] && cat "$dir/run/$1.pid"
}

alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null
}

stop_daemon() {
    pid=$(pid_of "$1" || true)
    alive "$pid" || return 0
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    i=0
    while alive "$pid" && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if alive "$pid"; then
        log "$1 (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/run/$1.pid"
}

free_port() {
    # A port nothing listens on, from the ephemeral-free range 40000-59999.
    while :; do
        p=$((40000 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 20000))
        if ! ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
            echo "$p"
            return
        fi
    done
}

# ceph CLI against this cluster; bounded so a broken cluster fails, not hangs.
c() {
    timeout 60 ceph -c "$dir/ceph.conf" --connect-timeout 30 "$@"
}

start() {
    for b in ceph-mon ceph-osd ceph rbd monmaptool uuidgen ss; do
        command -v "$b" >/dev/null 2>&1 ||
            die "$b not found: install ceph-mon ceph-osd ceph-common (vmm-tests/scripts/install-prereqs.sh)"
    done
    if [ -e "$dir/run/mon.a.pid" ] && alive "$(pid_of mon.a || true)"; then
        die "a cluster already runs in $dir"
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    rm -rf "$dir/mon" "$dir/osd" "$dir/run" "$dir/log"
    mkdir -p "$dir/mon" "$dir/osd" "$dir/run" "$dir/log"

    port=${CEPH_MON_PORT:-$(free_port)}
    fsid=$(uuidgen)
    cat >"$dir/ceph.conf" <<EOF
# Written by ceph-cluster.sh: a throw-away test cluster; do not use for data.
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.1/32
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
run dir = $dir/run
crash dir = $dir/crash
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = memstore
memstore device bytes = $(( ${CEPH_STORE_MB:-1024} * 1024 * 1024 ))
# Objects in fixed pages: by default memstore keeps an object as the list of the
# pieces written into it, so every small write into an object makes the next one
# on it cost more (splitting and copying that list): after a few thousand 4 KiB
# random writes, an OSD write cost 200-300 us of CPU, against about 90 in pages.
memstore page set = true
# Short PG logs. An OSD splits a log budget (300000 entries) over its PGs, up
# to 10000 each: spread over a real OSD's hundred or so PGs, 3000; over this
# one's 8, the 10000 maximum. The OSD walks that log on every write to trim it,
# so a write's CPU grew with every write until each PG's log was full (from 80
# to 140 us over the first 300000 writes); 500 entries keep it at the first.
osd min pg log entries = 500
osd max pg log entries = 500
osd pg log dups tracked = 500
osd max object name len = 256
osd max object namespace len = 64
# Few threads: the machine running the tests is small.
osd op num shards = 1
osd op num threads per shard = 2
[mon]
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
[osd]
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
[client]
# Many clients (backends, rbd commands) run at once: no shared admin socket or log file.
admin socket =
log file =
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd
EOF

    t0=$(date +%s)
    monmaptool --create --clobber --fsid "$fsid" \
        --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$dir/ceph.conf" -i a --mkfs --monmap "$dir/monmap" \
        >"$dir/log/mon-mkfs.out" 2>&1 ||
        die "ceph-mon --mkfs failed: $(tail -n 3 "$dir/log/mon-mkfs.out")"
    ceph-mon -c "$dir/ceph.conf" -i a ||
        die "ceph-mon did not start: see $dir/log/mon.a.log"

    id=$(c osd create) || die "ceph osd create failed (monitor unreachable?)"
    [ "$id" = 0 ] || die "ceph osd create gave id $id, not 0"
    ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs >"$dir/log/osd-mkfs.out" 2>&1 ||
        die "ceph-osd --mkfs failed: $(tail -n 3 "$dir/log/osd-mkfs.out")"
    ceph-osd -c "$dir/ceph.conf" -i 0 2>>"$dir/log/osd-start.out" ||
        die "ceph-osd did not start: see $dir/log/osd.0.log"

    i=0
    until c osd dump 2>/dev/null | grep -q '^osd\.0 up'; do
        i=$((i + 1))
        [ $i -lt 300 ] || die "osd.0 not up after 30 s: see $dir/log/osd.0.log"
        sleep 0.1
    done

    pool=${CEPH_POOL:-rbd}
    c osd pool create "$pool" 8 8 >/dev/null 2>&1 || die "ceph osd pool create $pool failed"
    timeout 60 rbd -c "$dir/ceph.conf" pool init "$pool" ||
        die "rbd pool init $pool failed"
    image=${CEPH_IMAGE-test}
    if [ -n "$image" ]; then
        timeout 60 rbd -c "$dir/ceph.conf" create --size "${CEPH_IMAGE_MB:-256}M" "$pool/$image" ||
            die "rbd create $pool/$image failed"
    fi
    log "up in $(( $(date +%s) - t0 )) s: mon 127.0.0.1:$port, pool $pool${image:+, image $pool/$image}"
    echo "conf=$dir/ceph.conf"
}

case "$cmd" in
start) start ;;
stop)
    stop_daemon osd.0
    stop_daemon mon.a
    ;;
stop-osd)
    pid=$(pid_of osd.0 || true)
    alive "$pid" || die "osd.0 does not run in $dir"
    kill -STOP "$pid"
    ;;
start-osd)
    pid=$(pid_of osd.0 || true)
    alive "$pid" || die "osd.0 does not run in $dir"
    kill -CONT "$pid"
    ;;
*) die "unknown command $cmd (start|stop|stop-osd|start-osd)" ;;
esac
