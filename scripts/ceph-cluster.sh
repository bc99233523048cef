#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for the RBD tests and benchmarks:
# one mon, one BlueStore OSD on a sparse file, a pool `rbd` of size 1, no mgr,
# no systemd, everything (conf, keyring, data, logs, sockets) under DIR.
#
#   scripts/ceph-cluster.sh start DIR   start it; prints the conf path
#   scripts/ceph-cluster.sh stop DIR    stop it (OSD first) and remove DIR
#   scripts/ceph-cluster.sh stop-osd DIR / start-osd DIR   fault tests
#
# Clients use `-c DIR/ceph.conf` (pcache: --backing rbd:rbd/IMAGE:conf=DIR/ceph.conf)
# as client.admin. Needs ceph-mon ceph-osd ceph-common librbd-dev and
# qemu-block-extra (Debian); installs them when run as root and missing.
set -euo pipefail

die() {
    echo "scripts/ceph-cluster.sh: ERROR: $*" >&2
    exit 1
}
log() { echo "scripts/ceph-cluster.sh: $*" >&2; }

[[ $# -eq 2 ]] || die "usage: $0 start|stop|stop-osd|start-osd DIR"
cmd=$1
dir=$2
conf=$dir/ceph.conf

install_ceph() {
    local missing=() c
    for c in ceph-mon:ceph-mon ceph-osd:ceph-osd ceph:ceph-common rbd:ceph-common; do
        command -v "${c%%:*}" >/dev/null || missing+=("${c##*:}")
    done
    [[ -e /usr/include/rbd/librbd.h ]] || missing+=(librbd-dev)
    # QEMU's rbd driver, for the tests and benchmarks that compare.
    compgen -G '/usr/lib/*/qemu/block-rbd.so' >/dev/null || missing+=(qemu-block-extra)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "need root to apt-get install ${missing[*]} (or install them yourself)"
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed"
    fi
}

# A free TCP port pair (v2 and v1 messenger) on loopback.
free_port() {
    python3 - <<'EOF'
import socket
for base in range(20000, 60000, 2):
    ok = True
    for p in (base, base + 1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            ok = False
        finally:
            s.close()
    if ok:
        print(base)
        break
EOF
}

pid_of() { [[ -s $dir/run/$1.pid ]] && cat "$dir/run/$1.pid"; }

wait_for() { # seconds description command...
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not happen within ${limit} s (logs in $dir/log)"
}

osd_up() { ceph -c "$conf" osd dump 2>/dev/null | grep -q '^osd.0 up'; }

start_osd() {
    ceph-osd -c "$conf" -i 0 2>>"$dir/log/osd-start.log" || die "ceph-osd did not start (see $dir/log/osd.0.log)"
    wait_for 60 "osd.0 up" osd_up
}

stop_daemon() { # name
    local pid i
    pid=$(pid_of "$1") || return 0
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

case $cmd in
start)
    install_ceph
    [[ ! -e $conf ]] || die "$dir already holds a cluster; stop it first"
    mkdir -p "$dir"/{mon,osd,run,log}
    dir=$(cd "$dir" && pwd)
    conf=$dir/ceph.conf
    port=$(free_port)
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
keyring = $dir/keyring
run_dir = $dir/run
log_file = $dir/log/\$name.log
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
osd_crush_chooseleaf_type = 0
mon_data_avail_warn = 1
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
[mon]
mon_data = $dir/mon/\$cluster-\$id
[osd]
osd_data = $dir/osd/\$cluster-\$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 21474836480
bluestore_fsck_on_mkfs = false
bluestore_debug_enforce_settings = ssd
bdev_aio_poll_ms = 20
osd_memory_target = 1073741824
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 2
[client]
admin_socket = $dir/run/\$name.\$pid.asok
log_file = $dir/log/\$name.\$pid.log
EOF
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" ||
        die "ceph-mon --mkfs failed"
    ceph-mon -c "$conf" -i a || die "ceph-mon did not start (see $dir/log/mon.a.log)"
    wait_for 30 "the mon answering" ceph -c "$conf" mon stat
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(ceph -c "$conf" osd new "$uuid") || die "ceph osd new failed"
    [[ $id == 0 ]] || die "ceph osd new gave id $id, expected 0"
    mkdir -p "$dir/osd/ceph-0"
    ceph-authtool "$dir/keyring" -p -n osd.0 >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >"$dir/log/osd-mkfs.log" 2>&1 ||
        die "ceph-osd --mkfs failed (see $dir/log/osd-mkfs.log)"
    start_osd
    ceph -c "$conf" osd pool create rbd 8 8 >/dev/null 2>&1 || die "ceph osd pool create rbd failed"
    rbd -c "$conf" pool init rbd || die "rbd pool init failed"
    echo "$conf"
    ;;
stop)
    [[ -e $conf ]] || exit 0
    stop_daemon osd.0
    stop_daemon mon.a
    rm -rf "$dir"
    ;;
stop-osd)
    stop_daemon osd.0
    ;;
start-osd)
    start_osd
    ;;
*)
    die "unknown command $cmd"
    ;;
esac
