#!/usr/bin/env bash
# Live-migration downtime with pcache, against the same migration on QEMU's
# own virtio-blk: what pcache's switchover adds.
#
#   benches/migration.sh            (ROUNDS=3, OUT_MD=docs/benchmarks-migration.md)
#
# A TCG guest (512 MiB + 8 KiB, 2 vCPUs, `-cpu qemu64`)
# writes 4 KiB blocks at random over a 64 MiB hot set (fio, QD16, never
# pausing) and migrates
# between two QEMU processes on this host. Peers, interleaved per round:
#   pcache  two `pcache serve` (512 MiB caches on /dev/shm) on one raw file,
#           the source's writeback told to wait (no idle or age trigger),
#           so its cache holds dirty data when the migration starts
#   virtio  QEMU's own virtio-blk on the same raw file (cache=none)
# Each migration starts once the guest has written for WARM seconds; QEMU's
# max-bandwidth is 1 GiB/s. Reported: QEMU's downtime and total time
# (query-migrate), and for pcache the dirty bytes when the migration began,
# and its switchover (bytes written back while the guest was stopped, ms).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
WARM=${WARM:-10}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks-migration.md}
PCACHE_BIN=${PCACHE_BIN:-$ROOT/target/release/pcache}
GUEST=$ROOT/target/guest

die() {
    echo "migration.sh: $*" >&2
    exit 1
}

[[ -x $PCACHE_BIN ]] || (cd "$ROOT" && cargo build --release --bin pcache >&2)
[[ -f $GUEST/vmlinuz ]] || "$ROOT/images/build.sh" >&2 || die "images/build.sh failed"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: apt-get install qemu-system-x86"

W=$(mktemp -d /dev/shm/pcache-mig.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
RAW=$ROOT/target/bench/mig-disk.raw
mkdir -p "$(dirname "$RAW")"
truncate -s 1G "$RAW"

CMD='echo HOT-START; fio --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --size=64M --time_based --runtime=3600 --name=hot --output=/dev/null'
APPEND="console=ttyS0 quiet panic=-1 pcache.cmd=$(printf '%s' "$CMD" | base64 -w0)"

qmp() { # SOCK CMD [ARGS-JSON]: the reply's "return" as JSON
    python3 - "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
def cmd(c, a=None):
    f.write(json.dumps({"execute": c, "arguments": a or {}}) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r:
            return r["return"]
        if "error" in r:
            sys.exit(f"QMP {c}: {r['error']}")
cmd("qmp_capabilities")
print(json.dumps(cmd(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)))
EOF
}

# qemu NAME DISK-ARGS [-incoming URI]: start a guest in the background.
qemu() {
    local name=$1 disk=$2
    shift 2
    # shellcheck disable=SC2086 # DISK-ARGS are several words
    # 512 MiB + 8 KiB: QEMU 7.2 loses TCG guests' stores in a migration of
    # a RAM block whose size is a multiple of 256 KiB (tests/migration.rs).
    qemu-system-x86_64 -accel tcg -cpu qemu64 -smp 2 -m 524296K \
        -object memory-backend-memfd,id=mem,size=524296K,share=on -numa node,memdev=mem \
        -nographic -no-reboot -nic none -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
        -append "$APPEND" -qmp "unix:$W/$name-qmp.sock,server=on,wait=off" $disk "$@" \
        </dev/null >"$W/$name.log" 2>&1 &
    PIDS+=($!)
}

pserve() { # NAME
    "$PCACHE_BIN" serve --socket "$W/$1.sock" --cache "$W/$1.img" --cache-size 512M --format \
        --backing "$RAW" --num-queues 2 --writeback-idle-ms 3600000 --writeback-max-age 3600 \
        >"$W/pcache-$1.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 300); do [[ -S $W/$1.ctl ]] && return 0; sleep 0.1; done
    die "pcache $1 did not start"
}

wait_for() { # FILE TEXT SECONDS
    for _ in $(seq $(($3 * 10))); do grep -q "$2" "$1" && return 0; sleep 0.1; done
    die "no '$2' in $1 within $3 s: $(tail -5 "$1")"
}

status() { "$PCACHE_BIN" status --control "$W/$1.ctl" --json; }

# one PEER ROUND: one migration; appends a JSON line to $W/results.
one() {
    local peer=$1 r=$2 disk_a disk_b
    rm -f "$W"/*.sock "$W"/*.ctl
    if [[ $peer == pcache ]]; then
        pserve a
        pserve b
        disk_a="-chardev socket,id=d,path=$W/a.sock -device vhost-user-blk-pci,chardev=d,num-queues=2"
        disk_b="-chardev socket,id=d,path=$W/b.sock -device vhost-user-blk-pci,chardev=d,num-queues=2"
    else
        disk_a="-drive file=$RAW,if=virtio,format=raw,cache=none,aio=native"
        disk_b=$disk_a
    fi
    qemu src "$disk_a"
    qemu dst "$disk_b" -incoming "unix:$W/mig.sock"
    wait_for "$W/src.log" HOT-START 120
    sleep "$WARM"
    local dirty=0
    [[ $peer == pcache ]] && dirty=$(status a | python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty_bytes"])')
    qmp "$W/src-qmp.sock" migrate-set-parameters '{"max-bandwidth": 1073741824}' >/dev/null
    qmp "$W/src-qmp.sock" migrate "{\"uri\": \"unix:$W/mig.sock\"}" >/dev/null
    local m st
    for _ in $(seq 1200); do
        m=$(qmp "$W/src-qmp.sock" query-migrate)
        st=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("status"))' "$m")
        [[ $st == completed || $st == failed || $st == cancelled ]] && break
        sleep 0.1
    done
    [[ $st == completed ]] || die "$peer round $r: migration $st: $m"
    local sw='{}'
    if [[ $peer == pcache ]]; then
        sw=$(status a | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["frontend"]["migration"]))')
    fi
    python3 - "$peer" "$r" "$m" "$dirty" "$sw" >>"$W/results" <<'EOF'
import json, sys
m, sw = json.loads(sys.argv[3]), json.loads(sys.argv[5])
last = sw.get("last_switchover") or {}
print(json.dumps({"peer": sys.argv[1], "round": int(sys.argv[2]), "downtime_ms": m["downtime"],
    "total_ms": m["total-time"], "dirty_at_start": int(sys.argv[4]), "phase": sw.get("phase"),
    "switchover_bytes": last.get("dirty_bytes"), "switchover_ms": last.get("millis")}))
EOF
    echo "$peer round $r: $(tail -1 "$W/results")" >&2
    qmp "$W/src-qmp.sock" quit >/dev/null 2>&1 || true
    qmp "$W/dst-qmp.sock" quit >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
}

: >"$W/results"
for r in $(seq "$ROUNDS"); do
    one virtio "$r"
    one pcache "$r"
done

python3 - "$W/results" "$OUT_MD" "$ROUNDS" "$WARM" "$(git -C "$ROOT" rev-parse --short HEAD)" <<'EOF'
import json, statistics, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1])]
out, rounds, warm, rev = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
med = lambda peer, k: statistics.median(r[k] for r in rows if r["peer"] == peer)
mb = lambda b: f"{b / 2**20:.1f}"
lines = [
    "# Live migration: the downtime pcache adds",
    "",
    f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `benches/migration.sh` "
    f"(pcache {rev}, {rounds} interleaved rounds; regenerate with the same command). A TCG guest "
    "(512 MiB, 2 vCPUs, -cpu qemu64) writes 4 KiB blocks at random over a 64 MiB hot set with fio at QD16, never pausing, "
    f"and after {warm} s migrates to a second QEMU on this host (max-bandwidth 1 GiB/s). "
    "pcache: two `pcache serve` on one raw file, the source's writeback told to wait, so its cache holds "
    "dirty data when the migration starts. virtio: QEMU's own virtio-blk on the same file (cache=none).",
    "",
    "| peer | QEMU downtime ms (median) | migration total ms | dirty MiB at start | switchover: MiB written back | switchover ms |",
    "|---|---|---|---|---|---|",
    f"| virtio | {med('virtio', 'downtime_ms'):.0f} | {med('virtio', 'total_ms'):.0f} | - | - | - |",
    f"| pcache | {med('pcache', 'downtime_ms'):.0f} | {med('pcache', 'total_ms'):.0f} | "
    f"{mb(med('pcache', 'dirty_at_start'))} | {mb(med('pcache', 'switchover_bytes'))} | {med('pcache', 'switchover_ms'):.0f} |",
    "",
    f"Extra downtime (pcache's median minus virtio's): {med('pcache', 'downtime_ms') - med('virtio', 'downtime_ms'):.0f} ms.",
    "",
    "Every round:",
    "",
    "| peer | round | downtime ms | total ms | dirty MiB at start | switchover MiB | switchover ms |",
    "|---|---|---|---|---|---|---|",
]
for r in rows:
    p = r["peer"] == "pcache"
    lines.append(f"| {r['peer']} | {r['round']} | {r['downtime_ms']} | {r['total_ms']} | "
                 f"{mb(r['dirty_at_start']) if p else '-'} | {mb(r['switchover_bytes']) if p else '-'} | "
                 f"{r['switchover_ms'] if p else '-'} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
