#!/usr/bin/env bash
# pcache's memory under hostile and heavy clients, against its --io-memory.
#
#   benches/memory.sh            # writes docs/benchmarks-memory.md
#
# Each scenario starts a fresh pcache (defaults: --io-memory 64M, 16
# queues, a 2 GiB cache on tmpfs) in front of the raw file (and, for the
# last, an RBD image on a throwaway Ceph cluster), runs a client
# (examples/vub_bench) against it, and samples the server's anonymous
# memory (`Anonymous:` of /proc/PID/smaps_rollup) every 100 ms. The report
# gives each scenario's peak, the extent index at its end (`index_bytes` of
# `pcache status`) and the peak less the index, against --io-memory plus
# 16 MiB; and what an instance whose guest has left still holds.
#
# Environment (all optional):
#   RUNTIME=10                 seconds of load per scenario
#   BENCH_DIR=target/bench     where the raw file lives (not tmpfs: O_DIRECT)
#   RAW=$BENCH_DIR/disk.raw    the raw file (4 GiB, written if missing)
#   PCACHE_BIN, VUB_BENCH      prebuilt binaries (else cargo build --release)
#   OUT_MD=docs/benchmarks-memory.md
#   RBD=1                      0 skips the RBD scenario (and its cluster)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNTIME=${RUNTIME:-10}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
RAW=${RAW:-$BENCH_DIR/disk.raw}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks-memory.md}
RBD=${RBD:-1}
IO_MEMORY_MIB=64
FIXED_MIB=16
NQ=16

die() { echo "memory.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] memory.sh: $*" >&2; }

for t in taskset python3; do command -v $t >/dev/null || die "$t is missing"; done
if [[ -z ${PCACHE_BIN:-} || -z ${VUB_BENCH:-} ]]; then
    cargo build --release --bin pcache --example vub_bench >&2
fi
PCACHE_BIN=${PCACHE_BIN:-$ROOT/target/release/pcache}
VUB_BENCH=${VUB_BENCH:-$ROOT/target/release/examples/vub_bench}
mkdir -p "$BENCH_DIR"
if [[ ! -f $RAW || $(stat -c %s "$RAW") -ne $((4 << 30)) ]]; then
    log "writing $RAW (4 GiB of zeros)"
    dd if=/dev/zero of="$RAW" bs=1M count=4096 oflag=direct status=none
fi
RES=$(mktemp -d "$BENCH_DIR/memory-XXXXXX")
SOCK=$RES/vhost.sock
CTL=$RES/pcache.ctl
CACHE=/dev/shm/pcache-memory-$$.img
SPID=""
CG=""
CEPH_DIR=""

stop_server() {
    [[ -n $SPID ]] || return 0
    kill -KILL "$SPID" 2>/dev/null || true
    wait "$SPID" 2>/dev/null || true
    SPID=""
}
# Lift the throttle (a killed server may still have I/O to finish) and
# remove its cgroup.
unthrottle() {
    [[ -n $CG ]] || return 0
    echo "$dev 0" >"$CG/blkio.throttle.write_bps_device" 2>/dev/null ||
        echo "$dev wbps=max" >"$CG/io.max" 2>/dev/null || true
    for _ in $(seq 50); do rmdir "$CG" 2>/dev/null && break; sleep 0.1; done
    CG=""
}
cleanup() {
    stop_server
    unthrottle
    [[ -n $CEPH_DIR ]] && "$ROOT/scripts/ceph-cluster.sh" stop "$CEPH_DIR" >/dev/null 2>&1
    rm -f "$CACHE" "$SOCK" "$CTL"
}
trap cleanup EXIT

# start BACKING CACHE_SIZE [WRAP...]: a fresh pcache, pinned to core 0.
start() {
    local backing=$1 size=$2
    shift 2
    stop_server
    rm -f "$CACHE" "$SOCK" "$CTL"
    "$@" taskset -c 0 "$PCACHE_BIN" serve --socket "$SOCK" --control "$CTL" --cache "$CACHE" \
        --cache-size "$size" --backing "$backing" --format --num-queues $NQ >>"$RES/server.log" 2>&1 &
    SPID=$!
    for _ in $(seq 600); do
        [[ -S $SOCK ]] && return 0
        kill -0 "$SPID" 2>/dev/null || die "pcache exited (see $RES/server.log)"
        sleep 0.1
    done
    die "pcache did not listen within 60 s"
}

# Sample the server's Anonymous memory (KiB) into FILE until it exits or
# the sampler is killed.
sample() {
    local f=$1
    while kill -0 "$SPID" 2>/dev/null; do
        awk '/^Anonymous:/{print $2}' "/proc/$SPID/smaps_rollup" 2>/dev/null >>"$f" || true
        sleep 0.1
    done
}

index_kib() {
    "$PCACHE_BIN" status --control "$CTL" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["index_bytes"] // 1024)'
}

# scenario NAME DESCRIPTION VUB_ARGS...: load, sample, record.
scenario() {
    local name=$1 desc=$2
    shift 2
    local f=$RES/$name.anon
    : >"$f"
    sample "$f" &
    local sp=$!
    log "$name: $desc"
    taskset -c 1 "$VUB_BENCH" --socket "$SOCK" --runtime "$RUNTIME" --ramp 0 "$@" \
        >"$RES/$name.out" 2>&1 || echo "client ended with an error (see $name.out)" >>"$RES/$name.note"
    local idx
    idx=$(index_kib)
    kill "$sp" 2>/dev/null || true
    wait "$sp" 2>/dev/null || true
    echo "{\"name\": \"$name\", \"desc\": \"$desc\", \"peak_kib\": $(sort -n "$f" | tail -1), \"index_kib\": $idx, \"args\": \"$*\"}" >"$RES/$name.json"
}

start "$RAW" 2G
scenario misses "1 MiB random reads QD128 on 16 queues (misses)" --rw randread --bs 1M --qd 128 --queues $NQ
start "$RAW" 2G
scenario alias "the same, every request of a queue into one buffer" --rw randread --bs 1M --qd 128 --queues $NQ --alias
start "$RAW" 2G
scenario chains "16 MiB reads (128 descriptors each) QD128 on 16 queues, one buffer per queue" \
    --rw randread --bs 16M --qd 128 --queues $NQ --alias
start "$RAW" 2G
scenario chainsw "16 MiB writes (128 descriptors each) QD128 on 16 queues, one buffer per queue" \
    --rw randwrite --bs 16M --qd 128 --queues $NQ --alias

# A file store behind a device throttled to 64 KiB/s of writes (a block-I/O
# cgroup, v1 or v2): writes fill the cache, writeback stalls, writes wait
# for space. The cache is on tmpfs: only the backing store stalls.
src=$(findmnt -n -o SOURCE --target "$BENCH_DIR")
dev=$(lsblk -dno MAJ:MIN "$src" 2>/dev/null | tr -d ' ')
pdev=$(lsblk -no PKNAME "$src" 2>/dev/null | head -1)
[[ -n $pdev ]] && dev=$(lsblk -dno MAJ:MIN "/dev/$pdev" | tr -d ' ')
if [[ -n $dev && -e /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device ]]; then
    CG=/sys/fs/cgroup/blkio/pcache-memory-$$
    mkdir -p "$CG"
    echo "$dev 65536" >"$CG/blkio.throttle.write_bps_device"
elif [[ -n $dev ]] && grep -qw io /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
    CG=/sys/fs/cgroup/pcache-memory-$$
    mkdir -p "$CG"
    echo "$dev wbps=65536" >"$CG/io.max"
fi
if [[ -n $CG ]]; then
    start "$RAW" 512M sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG"
    scenario stalled "1 MiB writes QD32 on 16 queues into a 512 MiB cache, backing file throttled to 64 KiB/s" \
        --rw randwrite --bs 1M --qd 32 --queues $NQ
    stop_server
    unthrottle
else
    echo "not measured: no block-I/O cgroup to throttle $BENCH_DIR's disk with (needs root)" >"$RES/stalled.note"
fi

# An RBD image whose only OSD is stopped mid-run.
if [[ $RBD == 1 ]]; then
    CEPH_DIR=$(mktemp -d /tmp/pcache-memory-ceph.XXXXXX)
    rmdir "$CEPH_DIR"
    log "starting a Ceph cluster in $CEPH_DIR"
    CEPH_CONF=$("$ROOT/scripts/ceph-cluster.sh" start "$CEPH_DIR") || die "the Ceph cluster did not start"
    rbd -c "$CEPH_CONF" create --size 4096M rbd/mem
    start "rbd:rbd/mem:conf=$CEPH_CONF" 512M
    ("$ROOT/scripts/ceph-cluster.sh" stop-osd "$CEPH_DIR" >/dev/null 2>&1 &)
    scenario rbdstalled "1 MiB writes QD32 on 16 queues into a 512 MiB cache, the RBD image's OSD stopped" \
        --rw randwrite --bs 1M --qd 32 --queues $NQ
    stop_server
fi

# A guest that writes and reads, then leaves: what the instance keeps.
start "$RAW" 2G
taskset -c 1 "$VUB_BENCH" --socket "$SOCK" --rw randwrite --bs 4k --qd 8 --runtime 1 --ramp 0 >/dev/null 2>&1
taskset -c 1 "$VUB_BENCH" --socket "$SOCK" --rw randread --bs 1M --qd 32 --runtime 1 --ramp 0 >/dev/null 2>&1
for _ in $(seq 600); do
    d=$("$PCACHE_BIN" status --control "$CTL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty_bytes"])')
    [[ $d == 0 ]] && break
    sleep 0.1
done
sleep 2
echo "{\"name\": \"idle\", \"anon_kib\": $(awk '/^Anonymous:/{print $2}' "/proc/$SPID/smaps_rollup"), \"index_kib\": $(index_kib)}" >"$RES/idle.json"
stop_server

python3 - "$RES" "$OUT_MD" "$IO_MEMORY_MIB" "$FIXED_MIB" "$RUNTIME" "$PCACHE_BIN" <<'EOF'
import glob, json, os, subprocess, sys, time
res, out, budget, fixed, runtime, pcache = sys.argv[1:7]
budget, fixed = int(budget), int(fixed)
order = ["misses", "alias", "chains", "chainsw", "stalled", "rbdstalled"]
rows = []
ok_all = True
for n in order:
    p = os.path.join(res, n + ".json")
    note = open(os.path.join(res, n + ".note")).read().strip() if os.path.exists(os.path.join(res, n + ".note")) else ""
    if not os.path.exists(p):
        rows.append(f"| {n} | {note or 'not measured'} | - | - | - | - | - |")
        continue
    r = json.load(open(p))
    beyond = (r["peak_kib"] - r["index_kib"]) / 1024
    ok = beyond <= budget + fixed
    ok_all &= ok
    rows.append(f"| {n} | {r['desc']} | {r['peak_kib'] / 1024:.1f} | {r['index_kib'] / 1024:.1f} | {beyond:.1f} | "
                f"{budget + fixed} | {'**pass**' if ok else '**miss**'}{' (' + note + ')' if note else ''} |")
idle = json.load(open(os.path.join(res, "idle.json")))
ib = (idle["anon_kib"] - idle["index_kib"]) / 1024
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
md = [
    "# pcache's memory under hostile and heavy clients",
    "",
    f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at {rev} by `benches/memory.sh` "
    f"(`{pcache}`, defaults: `--io-memory {budget}M`, 16 queues, a 2 GiB cache on tmpfs unless said; "
    f"{runtime} s of load per scenario, server on core 0, client on core 1).",
    "",
    "Anonymous memory is `Anonymous:` of `/proc/PID/smaps_rollup`, sampled every 100 ms; the extent index is "
    "`index_bytes` of `pcache status` at the end of the scenario (it grows with what is cached, not with what "
    "the guest sends). The bound is the I/O memory plus 16 MiB for everything else (threads, rings, request "
    "tables, the heap's slack).",
    "",
    "| scenario | what the client does | peak MiB | index MiB | peak less index MiB | bound MiB | result |",
    "|---|---|---|---|---|---|---|",
    *rows,
    "",
    f"After a guest wrote 4 KiB blocks for 1 s at QD8, read 1 MiB misses for 1 s at QD32, and left, and "
    f"writeback finished: {idle['anon_kib'] / 1024:.1f} MiB anonymous, of which the index {idle['index_kib'] / 1024:.1f} MiB: "
    f"**{ib:.1f} MiB beyond the index** (bound 8 MiB: {'pass' if ib <= 8 else 'miss'}).",
    "",
    f"Raw files of this run: `{res}`.",
    "",
]
open(out, "w").write("\n".join(md))
print("\n".join(md))
sys.exit(0 if ok_all and ib <= 8 else 1)
EOF
