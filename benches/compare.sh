#!/usr/bin/env bash
# pcache against qemu-storage-daemon, side by side, with one client
# (examples/vub_bench.rs, libblkio's virtio-blk-vhost-user driver).
#
#   benches/compare.sh                 # build, run 3 interleaved rounds, write docs/benchmarks.md
#
# Peers, each exporting a 4 GiB disk over vhost-user-blk, server pinned to
# core 0 and client to core 1 (taskset):
#   null     QSD driver=null-co (no data at all: the ceiling of the transport)
#   nulliot  the same on an iothread, which polls adaptively (QSD's own
#            polling mode, against pcache's adaptive polling)
#   direct   QSD raw file on ext4, cache.direct=on,aio=native
#   pagec    QSD raw file on ext4, cache.direct=off (host page cache)
#   pcache   pcache serve with its defaults, 2 GiB cache on a tmpfs file, the
#            same raw file behind it
#
# Then the sustained section: 60 s points with IOPS every second, pcache
# (a fresh cache each) against QSD raw O_DIRECT, interleaved: a hot set of a
# quarter of the cache without FLUSH and with a FLUSH every 64 writes, a
# working set of twice the cache with a FLUSH every 64, each followed by 10 s
# of 4 KiB random reads QD32 of the same region while writeback still runs;
# and 10 s of writes overrunning the cache, then reads, against QSD null-co.
#
# Then the RBD section (benches/rbd.sh): a throwaway Ceph cluster, QSD's rbd
# driver against pcache --backing rbd:..., on the same image; its report is
# docs/benchmarks-rbd.md.
#
# Then the memory section (benches/memory.sh): pcache's peak anonymous
# memory under hostile and heavy clients, against its --io-memory; its
# report is docs/benchmarks-memory.md.
#
# Environment (all optional):
#   ROUNDS=3 RUNTIME=10 RAMP=2        rounds, measured and ramp seconds per point
#   DISK_SIZE=4G CACHE_SIZE=2G WS=256M  disk, pcache cache, hit working set
#   SEQ_BS=128k                       request size of the sequential fill and burst
#                                     (pcache advertises size_max 128 KiB)
#   BENCH_DIR=target/bench            raw disk file (must be on a real fs, O_DIRECT)
#   CACHE_DIR=/dev/shm                pcache cache file (tmpfs)
#   PCACHE_BIN=..., VUB_BENCH=...     prebuilt binaries (else cargo build --release)
#   PCACHE_REV="..."                  how to describe that build in the report (default: git HEAD)
#   QUIET_WAIT=300                    seconds to wait at start for load < 1.0 and no qemu-system
#   ENGINE_CACHE=4G                   cache size for the engine-alone bench at the end (0: skip)
#   SUS_ROUNDS=1 SUS_RUNTIME=60       sustained section rounds (0: skip) and seconds per point
#   SECTIONS="main rbd memory"        which sections run: main (with the sustained one), rbd
#                                     and memory; SECTIONS=rbd re-measures only the RBD section
#   RBD_SIZE=4G                       the RBD image
#   OUT_MD=docs/benchmarks.md OUT_SVG=docs/benchmarks-latency.svg OUT_SUS_SVG=docs/benchmarks-sustained.svg
#   OUT_RBD_MD=docs/benchmarks-rbd.md
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
DISK_SIZE=${DISK_SIZE:-4G}
CACHE_SIZE=${CACHE_SIZE:-2G}
WS=${WS:-256M}
SEQ_BS=${SEQ_BS:-128k}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
CACHE_DIR=${CACHE_DIR:-/dev/shm}
QUIET_WAIT=${QUIET_WAIT:-300}
# Extra flags for pcache serve: none, pcache runs with its defaults (which
# poll adaptively, as QSD's iothread does; its main loop does not poll).
export PCACHE_SERVE_ARGS=${PCACHE_SERVE_ARGS-}
SUS_ROUNDS=${SUS_ROUNDS:-1}
SUS_RUNTIME=${SUS_RUNTIME:-60}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks.md}
OUT_SVG=${OUT_SVG:-$ROOT/docs/benchmarks-latency.svg}
OUT_SUS_SVG=${OUT_SUS_SVG:-$ROOT/docs/benchmarks-sustained.svg}
OUT_RBD_MD=${OUT_RBD_MD:-$ROOT/docs/benchmarks-rbd.md}
SECTIONS=${SECTIONS:-main rbd memory}
section() { [[ " $SECTIONS " == *" $1 "* ]]; }
SERVER_CPU=0
CLIENT_CPU=1

die() { echo "compare.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

to_bytes() {
    local s=${1^^} n mult=1
    n=${s%%[KMGT]*}
    case $s in
        *K*) mult=$((1 << 10)) ;; *M*) mult=$((1 << 20)) ;;
        *G*) mult=$((1 << 30)) ;; *T*) mult=$((1 << 40)) ;;
    esac
    [[ $n =~ ^[0-9]+$ ]] || die "bad size $1"
    echo $((n * mult))
}
DISK_BYTES=$(to_bytes "$DISK_SIZE")
CACHE_BYTES=$(to_bytes "$CACHE_SIZE")
WS_BYTES=$(to_bytes "$WS")
BURST_BYTES=$((CACHE_BYTES * 3 / 2))
((BURST_BYTES <= DISK_BYTES)) || die "the write burst (1.5 x CACHE_SIZE) must fit in DISK_SIZE"
# Writes into one fresh pcache instance stay under 50% of the cache (GC starts at 70%).
WRITE_TOTAL=$((CACHE_BYTES / 2))
DRAIN_BYTES=$((CACHE_BYTES / 2))

# --- tools -----------------------------------------------------------------
for t in taskset python3; do command -v $t >/dev/null || die "$t is missing"; done
if ! command -v qemu-storage-daemon >/dev/null; then
    # Debian ships it in qemu-system-common.
    [[ $(id -u) -eq 0 ]] || die "qemu-storage-daemon is missing: apt-get install qemu-system-common"
    log "installing qemu-system-common (qemu-storage-daemon)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-common >/dev/null
fi
QSD=$(command -v qemu-storage-daemon)
if [[ -z ${PCACHE_BIN:-} || -z ${VUB_BENCH:-} ]]; then
    log "cargo build --release --bin pcache --example vub_bench"
    cargo build --release --bin pcache --example vub_bench >&2
fi
PCACHE_BIN=${PCACHE_BIN:-$ROOT/target/release/pcache}
VUB_BENCH=${VUB_BENCH:-$ROOT/target/release/examples/vub_bench}
[[ -x $PCACHE_BIN && -x $VUB_BENCH ]] || die "missing $PCACHE_BIN or $VUB_BENCH"

# --- files -----------------------------------------------------------------
mkdir -p "$BENCH_DIR"
RAW=$BENCH_DIR/disk.raw
[[ $(stat -f -c %T "$BENCH_DIR") != tmpfs ]] || die "BENCH_DIR must not be tmpfs (O_DIRECT)"
if [[ ! -f $RAW || $(stat -c %s "$RAW") -ne $DISK_BYTES ]]; then
    log "writing $RAW ($DISK_SIZE of zeros, fully allocated)"
    dd if=/dev/zero of="$RAW" bs=1M count=$((DISK_BYTES >> 20)) oflag=direct status=none
fi
RUN_ID=$(date +%Y%m%d-%H%M%S)
RES=$BENCH_DIR/compare-$RUN_ID
mkdir -p "$RES"
SOCK=$RES/vhost.sock
CTL=$RES/pcache.ctl
CACHE=$CACHE_DIR/pcache-compare-$$.img
CMDS=$RES/commands.txt
: >"$CMDS"

SPID=""
stop_server() {
    [[ -n $SPID ]] || return 0
    kill -TERM "$SPID" 2>/dev/null || true
    local i
    for ((i = 0; i < 600; i++)); do
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SPID" 2>/dev/null; then
        log "server $SPID did not exit within 60 s of SIGTERM; SIGKILL"
        echo "server $SPID did not exit within 60 s of SIGTERM" >>"$RES/anomalies.txt"
        kill -KILL "$SPID" 2>/dev/null || true
    fi
    wait "$SPID" 2>/dev/null || true
    SPID=""
}
cleanup() {
    stop_server
    rbd_stop_cluster
    rm -f "$CACHE" "$SOCK" "$CTL"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Drop the raw file's pages from the host page cache (this file only).
drop_raw_cache() {
    python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$RAW"
}

wait_socket() {
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -S $SOCK ]] && return 0
        kill -0 "$SPID" 2>/dev/null || { SPID=""; die "server exited before listening (see $RES/server.log)"; }
        sleep 0.1
    done
    die "server did not listen on $SOCK within 60 s"
}

# start_server PEER: start one server on $SOCK, pinned to SERVER_CPU.
start_server() {
    local peer=$1 cmd
    stop_server
    rm -f "$SOCK" "$CTL"
    drop_raw_cache
    case $peer in
        null) cmd=("$QSD" --blockdev "driver=null-co,node-name=n0,size=$DISK_BYTES"
            --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1") ;;
        nulliot) cmd=("$QSD" --object iothread,id=io0 --blockdev "driver=null-co,node-name=n0,size=$DISK_BYTES"
            --export "type=vhost-user-blk,id=e0,node-name=n0,iothread=io0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1") ;;
        direct) cmd=("$QSD" --blockdev "driver=file,node-name=f0,filename=$RAW,cache.direct=on,aio=native"
            --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1") ;;
        pagec) cmd=("$QSD" --blockdev "driver=file,node-name=f0,filename=$RAW,cache.direct=off,aio=threads"
            --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1") ;;
        pcache) cmd=("$PCACHE_BIN" serve --socket "$SOCK" --control "$CTL" --cache "$CACHE"
            --cache-size "$CACHE_SIZE" --backing "$RAW" --format --num-queues 2 ${PCACHE_SERVE_ARGS} ${PCACHE_EXTRA:-}) ;; # word splitting wanted
        rbd) cmd=("$QSD" --blockdev "driver=rbd,node-name=r0,pool=rbd,image=$RBD_IMAGE,conf=$CEPH_CONF,user=admin,cache.direct=on"
            --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1") ;;
        pcrbd | pcrbdn) cmd=("$PCACHE_BIN" serve --socket "$SOCK" --control "$CTL" --cache "$CACHE"
            --cache-size "$CACHE_SIZE" --backing "rbd:rbd/$RBD_IMAGE:conf=$CEPH_CONF" --format --num-queues 2 ${PCACHE_SERVE_ARGS} ${PCACHE_EXTRA:-}) # word splitting wanted
            if [[ $peer == pcrbdn ]]; then cmd+=(--writeback-order newest); fi ;;
        *) die "unknown peer $peer" ;;
    esac
    echo "server $peer: taskset -c $SERVER_CPU ${cmd[*]}" >>"$CMDS"
    echo "=== $(date +%T) $peer: ${cmd[*]}" >>"$RES/server.log"
    taskset -c $SERVER_CPU "${cmd[@]}" >>"$RES/server.log" 2>&1 &
    SPID=$!
    wait_socket
    if [[ $peer == pcache || $peer == pcrbd || $peer == pcrbdn ]]; then
        local i
        for ((i = 0; i < 600; i++)); do
            [[ -S $CTL ]] && return 0
            sleep 0.1
        done
        die "pcache did not create its control socket $CTL within 60 s"
    fi
}

env_state() {
    local q
    q=$(pgrep -c -f '^[^ ]*qemu-system' || true)
    echo "load $(cut -d' ' -f1 /proc/loadavg), qemu-system processes $q"
}

# client PEER POINT ROUND ARGS...: one measured point, JSON to $RES.
client() {
    local peer=$1 point=$2 round=$3
    shift 3
    local out=$RES/$peer.$point.r$round.json
    echo "client $peer $point: taskset -c $CLIENT_CPU $VUB_BENCH --socket SOCK $*" >>"$CMDS"
    local st
    st=$(env_state)
    if ! taskset -c $CLIENT_CPU "$VUB_BENCH" --socket "$SOCK" --json "$@" >"$out.tmp" 2>"$out.err"; then
        log "FAILED: $peer $point round $round: $(cat "$out.err")"
        echo "$peer $point round $round: vub_bench failed: $(cat "$out.err")" >>"$RES/anomalies.txt"
        rm -f "$out.tmp"
        return 0
    fi
    python3 - "$out.tmp" "$out" "$peer" "$point" "$round" "$st" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
r.update(peer=sys.argv[3], point=sys.argv[4], round=int(sys.argv[5]), env=sys.argv[6])
json.dump(r, open(sys.argv[2], "w"))
print(f"  {r['peer']:<7} {r['point']:<12} r{r['round']}: {r['iops']:>9.0f} IOPS {r['mb_s']:>8.1f} MB/s"
      f"  p50 {r['lat_us']['p50']:>8.1f} us  p99 {r['lat_us']['p99']:>8.1f} us  ({r['env']})", file=sys.stderr)
EOF
    rm -f "$out.tmp" "$out.err"
}

pstatus() { "$PCACHE_BIN" status --control "$CTL" --json; }
# Save pcache's status after a point (hits, misses, writeback, failed).
save_status() {
    local point=$1 round=$2
    pstatus >"$RES/pcache.$point.r$round.status.json" 2>>"$RES/server.log" || {
        echo "pcache status failed after $point round $round" >>"$RES/anomalies.txt"
        return 0
    }
    python3 - "$RES/pcache.$point.r$round.status.json" "$point" "$round" "$RES/anomalies.txt" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
st = s["stats"]
if s.get("failed") or st.get("writeback_errors") or st.get("data_crc_errors"):
    open(sys.argv[4], "a").write(f"pcache after {sys.argv[2]} round {sys.argv[3]}: failed={s.get('failed')} "
                                 f"writeback_errors={st.get('writeback_errors')} data_crc_errors={st.get('data_crc_errors')}\n")
EOF
}

# shellcheck source=benches/rbd.sh
. "$ROOT/benches/rbd.sh"

# --- the points -----------------------------------------------------------
T=(--runtime "$RUNTIME" --ramp "$RAMP")
R4=(--rw randread --bs 4k)
W4=(--rw randwrite --bs 4k)
# Writes into pcache are capped to WRITE_TOTAL so they stay within capacity;
# the peers run the very same client arguments.
WCAP=(--runtime "$RUNTIME" --ramp 0 --total "$WRITE_TOTAL")

run_qsd_null() {
    local peer=$1 r=$2
    start_server "$peer"
    client "$peer" w32 "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${WCAP[@]}"
    client "$peer" r32 "$r" "${R4[@]}" --qd 32 --size "$WS_BYTES" "${T[@]}"
    client "$peer" r1 "$r" "${R4[@]}" --qd 1 --size "$WS_BYTES" "${T[@]}"
    client "$peer" w1 "$r" "${W4[@]}" --qd 1 --size "$WS_BYTES" "${WCAP[@]}"
    client "$peer" wf1 "$r" "${W4[@]}" --qd 1 --flush-every 1 --size "$WS_BYTES" "${T[@]}"
    stop_server
}

# --- the sustained section ------------------------------------------------
HOT_BYTES=$((CACHE_BYTES / 4))
WS2X_BYTES=$((CACHE_BYTES * 2))
((WS2X_BYTES <= DISK_BYTES)) || die "the sustained working set (2 x CACHE_SIZE) must fit in DISK_SIZE"
ST=(--runtime "$SUS_RUNTIME" --ramp 0)
R10=(--runtime 10 --ramp 0)

# sustained PEER ROUND: the three 60 s write points, each on a fresh server
# (a fresh cache for pcache) and followed by reads of its region.
sustained() {
    local peer=$1 r=$2
    start_server "$peer"
    client "$peer" hot "$r" "${W4[@]}" --qd 32 --size "$HOT_BYTES" "${ST[@]}"
    client "$peer" hotread "$r" "${R4[@]}" --qd 32 --size "$HOT_BYTES" "${R10[@]}"
    if [[ $peer == pcache ]]; then save_status hot "$r"; fi
    start_server "$peer"
    client "$peer" hotf64 "$r" "${W4[@]}" --qd 32 --flush-every 64 --size "$HOT_BYTES" "${ST[@]}"
    client "$peer" hotf64read "$r" "${R4[@]}" --qd 32 --size "$HOT_BYTES" "${R10[@]}"
    if [[ $peer == pcache ]]; then save_status hotf64 "$r"; fi
    start_server "$peer"
    client "$peer" ws2xf64 "$r" "${W4[@]}" --qd 32 --flush-every 64 --size "$WS2X_BYTES" "${ST[@]}"
    client "$peer" ws2xf64read "$r" "${R4[@]}" --qd 32 --size "$WS2X_BYTES" "${R10[@]}"
    if [[ $peer == pcache ]]; then save_status ws2xf64 "$r"; fi
    stop_server
}

# overrun PEER ROUND: 10 s of QD32 writes over the hit working set with no
# byte cap (they overrun a fresh cache), then read hits of it.
overrun() {
    local peer=$1 r=$2
    start_server "$peer"
    client "$peer" w32over "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${R10[@]}"
    client "$peer" r32after "$r" "${R4[@]}" --qd 32 --size "$WS_BYTES" "${R10[@]}"
    if [[ $peer == pcache ]]; then save_status w32over "$r"; fi
    stop_server
}

run_qsd_file() {
    local peer=$1 r=$2
    start_server "$peer"
    client "$peer" w32 "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${WCAP[@]}"
    client "$peer" wf1 "$r" "${W4[@]}" --qd 1 --flush-every 1 --size "$WS_BYTES" "${T[@]}"
    client "$peer" r32miss "$r" "${R4[@]}" --qd 32 --random-map "${T[@]}"
    if [[ $peer == direct ]]; then
        big_misses "$peer" "$r"
        client "$peer" wf1poll "$r" "${W4[@]}" --qd 1 --flush-every 1 --poll --size "$WS_BYTES" "${WCAP[@]}"
        client "$peer" w32disk "$r" "${W4[@]}" --qd 32 --random-map --runtime "$RUNTIME" --ramp 0 --total "$DRAIN_BYTES"
        client "$peer" burst "$r" --rw write --bs "$SEQ_BS" --qd 32 --runtime 0 --ramp 0 --total "$BURST_BYTES"
    fi
    stop_server
}

# big_misses PEER ROUND: 1 MiB random reads QD8, QD32 and QD128, every
# one a miss (each block once, 3 GiB of the 4 GiB disk); pcache gets a fresh
# cache for each, so the earlier ones fill nothing the later ones read.
big_misses() {
    local peer=$1 r=$2 qd
    for qd in 8 32 128; do
        if [[ $peer == pcache ]]; then start_server pcache; fi
        client "$peer" "r1m${qd}miss" "$r" --rw randread --bs 1M --qd "$qd" --random-map \
            --runtime 0 --ramp 0 --total 3G
        if [[ $peer == pcache ]]; then save_status "r1m${qd}miss" "$r"; fi
    done
}

run_pcache() {
    local r=$1
    # Hits: a fresh cache holding the working set (written sequentially,
    # so without the sequential cutoff, which would send the fill around
    # the cache).
    PCACHE_EXTRA="--sequential-cutoff 0"
    start_server pcache
    client pcache fill "$r" --rw write --bs "$SEQ_BS" --qd 32 --size "$WS_BYTES" --runtime 0 --ramp 0 --total "$WS_BYTES"
    client pcache r32 "$r" "${R4[@]}" --qd 32 --size "$WS_BYTES" "${T[@]}"
    client pcache r1 "$r" "${R4[@]}" --qd 1 --size "$WS_BYTES" "${T[@]}"
    client pcache r32q2 "$r" "${R4[@]}" --qd 32 --queues 2 --size "$WS_BYTES" "${T[@]}"
    save_status hits "$r"
    # Writes: a fresh cache for each, so each stays within capacity.
    PCACHE_EXTRA=""
    local p
    for p in w32 w32imm w1 wf1 wf1poll w32q2; do
        # w32imm: the same writes with writeback at once (dm-pcache's way)
        # instead of the default policy, which waits while the guest is busy.
        if [[ $p == w32imm ]]; then PCACHE_EXTRA="--writeback-high 0"; else PCACHE_EXTRA=""; fi
        start_server pcache
        case $p in
            w32) client pcache w32 "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${WCAP[@]}" ;;
            w32imm) client pcache w32imm "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${WCAP[@]}" ;;
            w1) client pcache w1 "$r" "${W4[@]}" --qd 1 --size "$WS_BYTES" "${WCAP[@]}" ;;
            wf1) client pcache wf1 "$r" "${W4[@]}" --qd 1 --flush-every 1 --size "$WS_BYTES" "${T[@]}" ;;
            # The client polls its completions: no wake-up of the client's
            # CPU in each round trip. Capped at half the cache like the
            # other write points: past that, writeback of one flush epoch
            # per backing flush sets the pace (see docs/benchmarks.md).
            wf1poll) client pcache wf1poll "$r" "${W4[@]}" --qd 1 --flush-every 1 --poll --size "$WS_BYTES" "${WCAP[@]}" ;;
            w32q2) client pcache w32q2 "$r" "${W4[@]}" --qd 32 --queues 2 --size "$WS_BYTES" "${WCAP[@]}" ;;
        esac
        save_status "$p" "$r"
    done
    # Write-through and write-around: every write goes to the disk.
    for p in w32wt w32wa; do
        if [[ $p == w32wt ]]; then PCACHE_EXTRA="--mode writethrough"; else PCACHE_EXTRA="--mode writearound"; fi
        start_server pcache
        client pcache "$p" "$r" "${W4[@]}" --qd 32 --size "$WS_BYTES" "${WCAP[@]}"
        save_status "$p" "$r"
    done
    PCACHE_EXTRA=""
    big_misses pcache "$r"
    # Misses: a fresh cache, every block read once (--random-map) over the whole disk.
    start_server pcache
    client pcache r32miss "$r" "${R4[@]}" --qd 32 --random-map "${T[@]}"
    save_status r32miss "$r"
    # Drain: DRAIN_BYTES of distinct random 4k blocks, then time until dirty_bytes == 0.
    start_server pcache
    client pcache w32disk "$r" "${W4[@]}" --qd 32 --random-map --runtime 0 --ramp 0 --total "$DRAIN_BYTES"
    echo "drain: pcache status --control CTL --json until dirty_bytes == 0" >>"$CMDS"
    python3 - "$PCACHE_BIN" "$CTL" "$RES/pcache.drain.r$r.json" "$r" "$(env_state)" <<'EOF' || echo "drain round $r failed" >>"$RES/anomalies.txt"
import json, subprocess, sys, time
pc, ctl, out, rnd, env = sys.argv[1:6]
def status():
    return json.loads(subprocess.run([pc, "status", "--control", ctl, "--json"],
                                     check=True, capture_output=True, text=True).stdout)
s0 = status(); t0 = time.monotonic()
d0, wb0 = s0["dirty_bytes"], s0["stats"]["writeback_bytes"]
s = s0
while s["dirty_bytes"] > 0:
    if time.monotonic() - t0 > 600:
        print(f"drain: dirty_bytes still {s['dirty_bytes']} after 600 s", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.05)
    s = status()
t = time.monotonic() - t0
wb = s["stats"]["writeback_bytes"] - wb0
r = dict(peer="pcache", point="drain", round=int(rnd), env=env, dirty_bytes_at_start=d0,
         drain_s=round(t, 3), writeback_bytes=wb,
         mb_s=round(d0 / t / 1e6, 2) if t > 0 else None,
         writeback_mb_s=round(wb / t / 1e6, 2) if t > 0 else None,
         writeback_errors=s["stats"]["writeback_errors"], failed=s["failed"])
json.dump(r, open(out, "w"))
print(f"  pcache  drain        r{rnd}: {d0} dirty bytes drained in {t:.2f} s = {r['mb_s']} MB/s ({env})", file=sys.stderr)
EOF
    save_status drain "$r"
    # Burst: 1.5 x the cache, sequential SEQ_BS at QD32, into a fresh cache
    # (into the cache: no sequential cutoff).
    PCACHE_EXTRA="--sequential-cutoff 0"
    start_server pcache
    client pcache burst "$r" --rw write --bs "$SEQ_BS" --qd 32 --runtime 0 --ramp 0 --total "$BURST_BYTES"
    save_status burst "$r"
    stop_server
    PCACHE_EXTRA=""
}

# --- go --------------------------------------------------------------------
START_STATE=""
wait_quiet() {
    local t0=$SECONDS l q
    while :; do
        l=$(cut -d' ' -f1 /proc/loadavg)
        q=$(pgrep -c -f '^[^ ]*qemu-system' || true)
        if [[ $q -eq 0 ]] && python3 -c "import sys; sys.exit(0 if float('$l') < 1.0 else 1)"; then
            START_STATE="quiet at start (load $l, no qemu-system), waited $((SECONDS - t0)) s"
            return
        fi
        if ((SECONDS - t0 >= QUIET_WAIT)); then
            START_STATE="NOT quiet at start after waiting $QUIET_WAIT s: load $l, $q qemu-system process(es) running; measured anyway"
            return
        fi
        sleep 5
    done
}
log "waiting up to $QUIET_WAIT s for load < 1.0 and no qemu-system"
wait_quiet
log "$START_STATE"
log "results in $RES"
T_START=$SECONDS
section main || { ROUNDS_MAIN=0; }
for ((r = 1; r <= ${ROUNDS_MAIN:-$ROUNDS}; r++)); do
    log "round $r/$ROUNDS ($(env_state))"
    echo "round $r: $(env_state)" >>"$RES/rounds.txt"
    run_qsd_null null "$r"
    run_pcache "$r"
    run_qsd_null nulliot "$r"
    run_qsd_file direct "$r"
    run_qsd_file pagec "$r"
done
for ((r = 1; r <= ${ROUNDS_MAIN:-$SUS_ROUNDS}; r++)); do
    log "sustained round $r/$SUS_ROUNDS ($(env_state))"
    echo "sustained round $r: $(env_state)" >>"$RES/rounds.txt"
    overrun pcache "$r"
    overrun null "$r"
    sustained pcache "$r"
    sustained direct "$r"
done
MAIN_ELAPSED=$((SECONDS - T_START))
if section rbd; then
    T_RBD=$SECONDS
    rbd_section
    RBD_ELAPSED=$((SECONDS - T_RBD))
fi
if section memory; then
    stop_server
    log "memory section: benches/memory.sh"
    PCACHE_BIN=$PCACHE_BIN VUB_BENCH=$VUB_BENCH BENCH_DIR=$BENCH_DIR RAW=$RAW OUT_MD=${OUT_MEM_MD:-$ROOT/docs/benchmarks-memory.md} \
        "$ROOT/benches/memory.sh" >&2 || echo "memory section failed" >>"$RES/anomalies.txt"
fi
ELAPSED=$((SECONDS - T_START))
log "measured in $ELAPSED s"

# The engine alone on one thread (no vhost, no client): write and read-hit
# rates, replay of a full cache of 4 KiB keys, DRAM per extent.
ENGINE_CACHE=${ENGINE_CACHE:-4G}
section main || ENGINE_CACHE=0
if [[ $ENGINE_CACHE != 0 ]]; then
    log "engine alone: cargo bench --bench engine, PCACHE_BENCH_CACHE=$ENGINE_CACHE"
    cargo bench --bench engine --no-run >&2
    echo "engine: PCACHE_BENCH_CACHE=$ENGINE_CACHE taskset -c $SERVER_CPU cargo bench --bench engine" >>"$CMDS"
    PCACHE_BENCH_CACHE=$ENGINE_CACHE taskset -c $SERVER_CPU cargo bench --bench engine \
        >"$RES/engine-bench.out" 2>>"$RES/server.log" ||
        echo "engine bench failed" >>"$RES/anomalies.txt"
fi

if section rbd; then
    python3 "$ROOT/benches/rbd_report.py" "$RES" --md "$OUT_RBD_MD" --elapsed "$RBD_ELAPSED" \
        --start-state "$START_STATE" --cache-size "$CACHE_SIZE" --rbd-size "$RBD_SIZE" --ws "$WS" \
        --rounds "$ROUNDS" --runtime "$RUNTIME" --sus-runtime "$SUS_RUNTIME" --pcache-rev "${PCACHE_REV:-}"
fi
section main || exit 0
python3 "$ROOT/benches/compare_report.py" "$RES" \
    --md "$OUT_MD" --svg "$OUT_SVG" \
    --start-state "$START_STATE" --elapsed "$MAIN_ELAPSED" \
    --pcache-bin "$PCACHE_BIN" --vub-bench "$VUB_BENCH" --qsd "$QSD" --raw "$RAW" \
    --cache "$CACHE_DIR/pcache-compare-PID.img" --cache-size "$CACHE_SIZE" --disk-size "$DISK_SIZE" \
    --ws "$WS" --seq-bs "$SEQ_BS" --rounds "$ROUNDS" --runtime "$RUNTIME" --ramp "$RAMP" --pcache-rev "${PCACHE_REV:-}"
if ((SUS_ROUNDS > 0)); then
    python3 "$ROOT/benches/sustained_report.py" "$RES" --md "$OUT_MD" --svg "$OUT_SUS_SVG" \
        --cache-size "$CACHE_SIZE" --runtime "$SUS_RUNTIME" --rounds "$SUS_ROUNDS"
fi
