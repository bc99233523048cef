# The RBD section of benches/compare.sh (sourced by it; uses its
# start_server, client, save_status and stop_server).
#
# One throwaway single-node Ceph cluster (scripts/ceph-cluster.sh) with one
# image of RBD_SIZE, written through once so misses read real objects. Two
# peers on that same image, interleaved per round:
#   rbd     qemu-storage-daemon driver=rbd,cache.direct=on (librbd, no cache)
#   pcrbd   pcache serve --backing rbd:rbd/IMAGE (a fresh CACHE_SIZE cache on
#           tmpfs for each write point)
#   pcrbdn  the same with --writeback-order newest (the sustained point only)
# Points (4 KiB): write + FLUSH QD1, random write QD1 (latency), random
# write QD32 within the cache (and, for pcache, in write-through and
# write-around mode too), random read QD32 of every block once (all
# misses), and a sustained hot set of a quarter of the cache with a FLUSH
# every 64 writes for SUS_RUNTIME seconds. The Ceph daemons run unpinned.

RBD_SIZE=${RBD_SIZE:-4G}
RBD_BYTES=$(to_bytes "$RBD_SIZE")
RBD_IMAGE=bench
CEPH_DIR=""

rbd_start_cluster() {
    CEPH_DIR=$(mktemp -d /tmp/pcache-bench-ceph.XXXXXX)
    rmdir "$CEPH_DIR"
    log "starting a Ceph cluster in $CEPH_DIR"
    CEPH_CONF=$("$ROOT/scripts/ceph-cluster.sh" start "$CEPH_DIR") || die "the Ceph cluster did not start"
    rbd -c "$CEPH_CONF" create --size "$((RBD_BYTES >> 20))M" "rbd/$RBD_IMAGE"
    log "writing the whole image once ($RBD_SIZE, 4 MiB sequential)"
    rbd -c "$CEPH_CONF" bench --io-type write --io-pattern seq --io-size 4M --io-threads 4 \
        --io-total "$RBD_BYTES" "rbd/$RBD_IMAGE" >"$RES/rbd-fill.txt" 2>&1 || die "rbd bench fill failed"
    {
        echo "ceph: $(ceph-osd --version 2>/dev/null | head -n1)"
        echo "cluster: scripts/ceph-cluster.sh start DIR (one mon, one BlueStore OSD on a sparse file, pool size 1)"
        echo "image: rbd create --size $((RBD_BYTES >> 20))M rbd/$RBD_IMAGE, then rbd bench --io-type write --io-pattern seq --io-size 4M --io-total $RBD_BYTES"
    } >>"$CMDS"
}

rbd_stop_cluster() {
    [[ -n $CEPH_DIR ]] || return 0
    "$ROOT/scripts/ceph-cluster.sh" stop "$CEPH_DIR" || true
    CEPH_DIR=""
}

# rbd_round PEER ROUND: the time-based and capped points.
rbd_round() {
    local peer=$1 r=$2 p
    if [[ $peer == rbd ]]; then
        start_server rbd
        client rbd rbd_wf1 "$r" "${W4[@]}" --qd 1 --flush-every 1 --size "$WS_BYTES" "${T[@]}"
        client rbd rbd_w1 "$r" "${W4[@]}" --qd 1 --size "$WS_BYTES" "${WCAP[@]}"
        client rbd rbd_w32 "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${WCAP[@]}"
        client rbd rbd_r32miss "$r" "${R4[@]}" --qd 32 --random-map --size "$RBD_BYTES" "${T[@]}"
        stop_server
        return
    fi
    # pcache: a fresh cache for each write point, so each stays within it.
    for p in rbd_wf1 rbd_w1 rbd_w32 rbd_w32wt rbd_w32wa; do
        case $p in
            rbd_w32wt) PCACHE_EXTRA="--mode writethrough" ;;
            rbd_w32wa) PCACHE_EXTRA="--mode writearound" ;;
            *) PCACHE_EXTRA="" ;;
        esac
        start_server pcrbd
        case $p in
            rbd_wf1) client pcrbd rbd_wf1 "$r" "${W4[@]}" --qd 1 --flush-every 1 --size "$WS_BYTES" "${T[@]}" ;;
            rbd_w1) client pcrbd rbd_w1 "$r" "${W4[@]}" --qd 1 --size "$WS_BYTES" "${WCAP[@]}" ;;
            rbd_w32 | rbd_w32wt | rbd_w32wa) client pcrbd "$p" "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${WCAP[@]}" ;;
        esac
        save_status "$p" "$r"
    done
    PCACHE_EXTRA=""
    start_server pcrbd
    client pcrbd rbd_r32miss "$r" "${R4[@]}" --qd 32 --random-map --size "$RBD_BYTES" "${T[@]}"
    save_status rbd_r32miss "$r"
    stop_server
}

# rbd_sustained PEER ROUND: the hot set with a FLUSH every 64 writes.
rbd_sustained() {
    local peer=$1 r=$2
    start_server "$peer"
    client "$peer" rbd_hotf64 "$r" "${W4[@]}" --qd 32 --flush-every 64 --size "$HOT_BYTES" "${ST[@]}"
    if [[ $peer == pcrbd ]]; then save_status rbd_hotf64 "$r"; fi
    if [[ $peer == pcrbdn ]]; then save_status rbd_hotf64n "$r"; fi
    stop_server
}

rbd_section() {
    rbd_start_cluster
    local r
    for ((r = 1; r <= ROUNDS; r++)); do
        log "rbd round $r/$ROUNDS ($(env_state))"
        echo "rbd round $r: $(env_state)" >>"$RES/rounds.txt"
        rbd_round rbd "$r"
        rbd_round pcrbd "$r"
    done
    for ((r = 1; r <= SUS_ROUNDS; r++)); do
        log "rbd sustained round $r/$SUS_ROUNDS ($(env_state))"
        rbd_sustained pcrbd "$r"
        rbd_sustained rbd "$r"
        rbd_sustained pcrbdn "$r"
    done
    rbd_stop_cluster
}
