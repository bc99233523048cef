#!/usr/bin/env bash
# Two pcache binaries on the request-path rows of benches/compare.sh
# (hits, writes within the cache, write + FLUSH, misses), in the same
# interleaved run: what a change costs on the request path.
#
#   benches/ab.sh OLD_PCACHE NEW_PCACHE
#
# Each round runs each point on OLD, then on NEW (server on core 0, client
# on core 1), each on a fresh cache on /dev/shm in front of a sparse backing
# file on /dev/shm; the misses, as in benches/compare.sh, read a fully
# allocated file on disk with O_DIRECT (a store on tmpfs is no disk: its
# reads are memory copies, which io_uring hands to a kernel worker). Prints
# each point's median over the rounds and NEW/OLD.
#
# Environment: ROUNDS (default 3), RUNTIME seconds per point (default 10),
# BENCH_DIR for the file the misses read (default target/bench, as
# benches/compare.sh; created when missing), VUB_BENCH (default
# target/release/examples/vub_bench, built if missing).
set -euo pipefail

die() {
    echo "ab.sh: $*" >&2
    exit 1
}

(($# == 2)) || die "usage: benches/ab.sh OLD_PCACHE NEW_PCACHE"
OLD=$(readlink -f "$1")
NEW=$(readlink -f "$2")
[[ -x $OLD && -x $NEW ]] || die "both binaries must exist and be executable"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
VUB_BENCH=${VUB_BENCH:-$ROOT/target/release/examples/vub_bench}
if [[ ! -x $VUB_BENCH ]]; then
    (cd "$ROOT" && cargo build --release --example vub_bench >&2)
fi
[[ -d /dev/shm ]] || die "/dev/shm is missing: the caches live on tmpfs"
command -v taskset >/dev/null || die "taskset (util-linux) is missing"

W=$(mktemp -d /dev/shm/pcache-ab.XXXXXX)
SPID=
cleanup() {
    [[ -n $SPID ]] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
truncate -s 4G "$W/disk.raw"
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
RAW=$BENCH_DIR/disk.raw
[[ $(stat -f -c %T "$BENCH_DIR") != tmpfs ]] || die "BENCH_DIR must not be tmpfs (O_DIRECT)"
if [[ ! -f $RAW || $(stat -c %s "$RAW") -ne $((4 << 30)) ]]; then
    echo "writing $RAW (4 GiB of zeros, fully allocated)" >&2
    dd if=/dev/zero of="$RAW" bs=1M count=4096 oflag=direct status=none
fi

# The points: name, then vub_bench arguments.
POINTS=(
    "r32:--rw randread --qd 32 --size 256M"
    "r1:--rw randread --qd 1 --size 256M"
    "r32q2:--rw randread --qd 32 --queues 2 --size 256M"
    "w32:--rw randwrite --qd 32 --size 512M --total 512M"
    "w1:--rw randwrite --qd 1 --size 512M --total 512M"
    "w32q2:--rw randwrite --qd 32 --queues 2 --size 512M --total 512M"
    "wf1:--rw randwrite --qd 1 --flush-every 1 --size 256M"
    "wf1poll:--rw randwrite --qd 1 --flush-every 1 --poll --size 256M --total 512M"
    "r32miss:--rw randread --qd 32 --random-map"
)

# serve BINARY BACKING
serve() {
    rm -f "$W/cache.img" "$W/s.sock"
    # No sequential cutoff: the sequential fill before the hit points must
    # go into the cache.
    taskset -c 0 "$1" serve --socket "$W/s.sock" --cache "$W/cache.img" --cache-size 2G \
        --backing "$2" --format --num-queues 2 --sequential-cutoff 0 >"$W/server.log" 2>&1 &
    SPID=$!
    for _ in $(seq 300); do
        [[ -S $W/s.ctl ]] && return 0
        sleep 0.1
    done
    die "pcache did not start: $(tail -5 "$W/server.log")"
}

stop() {
    kill "$SPID"
    wait "$SPID" 2>/dev/null || true
    SPID=
}

bench() {
    taskset -c 1 "$VUB_BENCH" --socket "$W/s.sock" --json "$@"
}

: >"$W/results"
for r in $(seq "$ROUNDS"); do
    for p in "${POINTS[@]}"; do
        name=${p%%:*}
        read -ra args <<<"${p#*:}"
        for bin in old new; do
            [[ $bin == old ]] && b=$OLD || b=$NEW
            if [[ $name == *miss ]]; then serve "$b" "$RAW"; else serve "$b" "$W/disk.raw"; fi
            if [[ $name == r* && $name != *miss ]]; then
                # Reads hit: the region is written first.
                bench --rw write --bs 128k --qd 32 --size 256M --total 256M --runtime 0 >/dev/null
            fi
            j=$(bench "${args[@]}" --runtime "$RUNTIME")
            stop
            python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(sys.argv[2], sys.argv[3], j["iops"], j["lat_us"]["p50"])' \
                "$j" "$bin" "$name" >>"$W/results"
            echo "round $r $bin $name: $(tail -1 "$W/results")" >&2
        done
    done
done

python3 - "$W/results" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = lambda b, p, i: statistics.median(float(r[i]) for r in rows if r[0] == b and r[1] == p)
print(f"{'point':<6} {'old IOPS':>10} {'new IOPS':>10} {'new/old':>8} {'old p50 us':>11} {'new p50 us':>11}")
for p in dict.fromkeys(r[1] for r in rows):
    oi, ni, ol, nl = med("old", p, 2), med("new", p, 2), med("old", p, 3), med("new", p, 3)
    print(f"{p:<6} {oi:>10.0f} {ni:>10.0f} {ni / oi:>8.3f} {ol:>11.1f} {nl:>11.1f}")
EOF
