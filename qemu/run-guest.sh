#!/usr/bin/env bash
# Boots the test guest (images/build.sh) under QEMU/TCG with a vhost-user-blk
# disk served on SOCKET, runs COMMAND in it (a shell if none) and exits with
# that command's exit status.
#
#   qemu/run-guest.sh SOCKET [COMMAND]
#
# The disk is /dev/vda in the guest. Everything the guest prints is passed
# through. The guest ends by printing `PCACHE-GUEST-EXIT <status>`; if it dies
# without printing it, this script prints why and exits 1.
#
# Environment:
#   PCACHE_GUEST_QUEUES      num-queues of vhost-user-blk-pci (default 2; must be
#                            <= the backend's)
#   PCACHE_GUEST_QUEUE_SIZE  queue-size (default 128)
#   PCACHE_GUEST_TIMEOUT     seconds before QEMU is killed (default 600)
#   PCACHE_GUEST_SMP         vCPUs (default 2)
#   PCACHE_GUEST_CPU         -cpu model (default max)
#   PCACHE_GUEST_MEM         guest memory (default 1G; a guest that migrates
#                            needs a size that is not a multiple of 256 KiB:
#                            see GUEST_MEM in tests/migration.rs)
#   PCACHE_GUEST_APPEND      extra kernel command line
#   PCACHE_GUEST_BIOS        firmware for -bios (default: QEMU's, SeaBIOS, which
#                            drives the disk itself before Linux does;
#                            /usr/share/qemu/qboot.rom does not touch it)
#   PCACHE_GUEST_RECONNECT   seconds between QEMU's attempts to reconnect to a
#                            restarted backend (QEMU 7.2 `reconnect=N`; default
#                            unset: no reconnect)
#   PCACHE_GUEST_QEMU_ARGS   extra QEMU arguments (split on whitespace)
set -uo pipefail

SCRIPT=$(readlink -f "$0")
ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
GUEST=$ROOT/target/guest
BUILD=$ROOT/images/build.sh

die() {
    echo "run-guest.sh: $*" >&2
    exit 1
}

(($# >= 1 && $# <= 2)) || die "usage: qemu/run-guest.sh SOCKET [COMMAND]"
SOCK=$1
CMD=${2:-}
[[ -S $SOCK ]] || die "$SOCK is not a socket (is the vhost-user-blk backend running?)"

QUEUES=${PCACHE_GUEST_QUEUES:-2}
QSIZE=${PCACHE_GUEST_QUEUE_SIZE:-128}
TIMEOUT=${PCACHE_GUEST_TIMEOUT:-600}
SMP=${PCACHE_GUEST_SMP:-2}
CPU=${PCACHE_GUEST_CPU:-max}
MEM=${PCACHE_GUEST_MEM:-1G}

if [[ ! -f $GUEST/vmlinuz || ! -f $GUEST/initramfs.cpio.gz ||
    $BUILD -nt $GUEST/vmlinuz || $BUILD -nt $GUEST/initramfs.cpio.gz ]]; then
    "$BUILD" || die "images/build.sh failed"
fi
command -v qemu-system-x86_64 >/dev/null ||
    die "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
command -v timeout >/dev/null || die "timeout (coreutils) not found"

append="console=ttyS0 quiet panic=-1 ${PCACHE_GUEST_APPEND:-}"
if [[ -n $CMD ]]; then
    append+=" pcache.cmd=$(printf '%s' "$CMD" | base64 -w0)"
fi
# x86 kernels keep 2048 bytes of command line
((${#append} < 2000)) || die "command too long for the kernel command line (${#append} bytes of 2000 after base64)"

# shellcheck disable=SC2054 # commas separate QEMU's suboptions
qemu=(qemu-system-x86_64
    -accel tcg -cpu "$CPU" -smp "$SMP"
    -m "$MEM"
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem
    -nographic -no-reboot -nic none
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz"
    -append "$append"
    -chardev "socket,id=vub0,path=$SOCK${PCACHE_GUEST_RECONNECT:+,reconnect=$PCACHE_GUEST_RECONNECT}"
    -device "vhost-user-blk-pci,chardev=vub0,num-queues=$QUEUES,queue-size=$QSIZE")
[[ -n ${PCACHE_GUEST_BIOS:-} ]] && qemu+=(-bios "$PCACHE_GUEST_BIOS")
# shellcheck disable=SC2206
[[ -n ${PCACHE_GUEST_QEMU_ARGS:-} ]] && qemu+=($PCACHE_GUEST_QEMU_ARGS)

log=$(mktemp "${TMPDIR:-/tmp}/run-guest.XXXXXX")
trap 'rm -f "$log"' EXIT

start=$(date +%s.%N)
# Without a command the shell needs the terminal; with one, keep stdin away
# from the QEMU monitor mux unless it is a terminal.
if [[ -z $CMD || -t 0 ]]; then
    timeout --foreground -s TERM -k 10 "$TIMEOUT" "${qemu[@]}" | tee "$log"
else
    timeout -s TERM -k 10 "$TIMEOUT" "${qemu[@]}" </dev/null | tee "$log"
fi
qemu_rc=${PIPESTATUS[0]}
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')

status=$(tr -d '\r' <"$log" | sed -n 's/.*PCACHE-GUEST-EXIT \([0-9][0-9]*\).*/\1/p' | tail -n1)
if [[ -z $status ]]; then
    if ((qemu_rc == 124)); then
        echo "run-guest.sh: timeout after ${TIMEOUT}s (PCACHE_GUEST_TIMEOUT): QEMU killed, the guest printed no PCACHE-GUEST-EXIT" >&2
    else
        echo "run-guest.sh: the guest died without printing PCACHE-GUEST-EXIT (QEMU exit status $qemu_rc, after ${elapsed}s)" >&2
    fi
    exit 1
fi
echo "run-guest.sh: guest command exited $status (QEMU exit $qemu_rc, ${elapsed}s)" >&2
exit "$status"
