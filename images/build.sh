#!/usr/bin/env bash
# Builds the small guest that qemu/run-guest.sh boots against a vhost-user-blk
# socket:
#   target/guest/vmlinuz           Debian's cloud kernel (linux-image-*-cloud-amd64)
#   target/guest/initramfs.cpio.gz busybox-static, fio, util-linux's
#                                  blkdiscard and fstrim, mkfs.ext4/e2fsck with
#                                  their shared libraries, the virtio modules
#                                  and an /init that runs one command
#
# The kernel package is fetched with `apt-get download` into target/guest/pkgs
# and unpacked with `dpkg -x` under target/guest/kernel: it is never installed
# on the host. Host packages that are missing are apt-get installed (needs root).
#
# Idempotent: does nothing when both outputs are newer than this script.
# PCACHE_GUEST_REBUILD=1 forces a rebuild.
#
# The guest's /init:
#   mounts proc, sys, devtmpfs; insmods the modules in /etc/modules.order;
#   waits up to 30 s for /dev/vda; runs the command given base64-encoded on the
#   kernel command line as pcache.cmd=<base64> (a shell if none), with its
#   output on the console; prints exactly one line `PCACHE-GUEST-EXIT <status>`
#   and powers off.
set -euo pipefail

SCRIPT=$(readlink -f "$0")
ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
OUT=$ROOT/target/guest
KERNEL_META=linux-image-cloud-amd64
# Load order of the modules /init needs; any that are built in are skipped,
# and their own dependencies (from the modules' modinfo) are loaded first.
WANT_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
    crc16 mbcache jbd2 crc32c_generic ext4)

log() { echo "images/build.sh: $*" >&2; }
die() {
    echo "images/build.sh: ERROR: $*" >&2
    exit 1
}

if [[ -z ${PCACHE_GUEST_REBUILD:-} && $OUT/vmlinuz -nt $SCRIPT && $OUT/initramfs.cpio.gz -nt $SCRIPT ]]; then
    exit 0
fi

# ---------------------------------------------------------------- host packages
apt_updated=
apt_update() {
    [[ -n $apt_updated ]] && return 0
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    apt_updated=1
}

apt_install() {
    log "installing on the host: $*"
    if [[ $(id -u) -ne 0 ]]; then
        die "need root to apt-get install $* (or install them yourself: apt-get install $*)"
    fi
    local opts=(-y -qq --no-install-recommends)
    local pkgs=("$@") p
    # The machine may carry a newer qemu-utils (a backport) that Breaks
    # qemu-system-common of the release: take the release's qemu-utils along
    # so qemu-storage-daemon/qemu-img stay installed.
    for p in "${pkgs[@]}"; do
        if [[ $p == qemu-system-x86 ]] && dpkg -s qemu-utils >/dev/null 2>&1; then
            local qv codename
            qv=$(dpkg-query -W -f='${Version}' qemu-utils)
            # shellcheck disable=SC1091
            codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
            if [[ -n $codename ]] && dpkg --compare-versions "$qv" ge 1:8; then
                pkgs+=("qemu-utils/$codename")
                opts+=(--allow-downgrades)
            fi
        fi
    done
    if ! DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "${pkgs[@]}" >/dev/null; then
        apt_update
        DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "${pkgs[@]}" >/dev/null ||
            die "apt-get install ${pkgs[*]} failed; install them by hand"
    fi
}

missing=()
need_cmd() { # command package
    command -v "$1" >/dev/null 2>&1 || [[ -x $1 ]] || missing+=("$2")
}
need_cmd qemu-system-x86_64 qemu-system-x86
need_cmd /bin/busybox busybox-static
need_cmd fio fio
need_cmd cpio cpio
need_cmd /usr/sbin/mke2fs e2fsprogs
need_cmd /usr/sbin/e2fsck e2fsprogs
need_cmd /usr/sbin/blkdiscard util-linux
need_cmd /usr/sbin/fstrim util-linux
need_cmd gzip gzip
need_cmd dpkg-deb dpkg
# For the tests of pcache under systemd (units, socket activation).
need_cmd systemd-analyze systemd
need_cmd systemd-socket-activate systemd
# For the test of a guest run by libvirt (tests/libvirt.rs).
need_cmd virsh libvirt-clients
need_cmd libvirtd libvirt-daemon-system
need_cmd virtlogd libvirt-daemon-system
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    apt_install "${missing[@]}"
fi
# busybox must be the static one: the dynamic `busybox` package also provides
# /bin/busybox.
bb_ldd=$(LC_ALL=C ldd /bin/busybox 2>&1 || true)
if [[ $bb_ldd != *"not a dynamic executable"* ]]; then
    apt_install busybox-static
fi

# ---------------------------------------------------------------- the kernel
mkdir -p "$OUT/pkgs"
chmod 0755 "$OUT/pkgs" # so apt's _apt user can write there
kernel_deb() { ls -t "$OUT"/pkgs/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -n1; }
deb=$(kernel_deb || true)
if [[ -z $deb ]]; then
    kpkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}' || true)
    if [[ -z $kpkg ]]; then
        apt_update
        kpkg=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/{print $2; exit}' || true)
    fi
    [[ -n $kpkg ]] || die "cannot find the versioned package that $KERNEL_META depends on (apt-cache depends $KERNEL_META)"
    log "downloading $kpkg"
    if ! (cd "$OUT/pkgs" && apt-get download -qq "$kpkg" 2>/dev/null); then
        apt_update
        (cd "$OUT/pkgs" && apt-get download -qq "$kpkg" 2>/dev/null) || die "apt-get download $kpkg failed"
    fi
    deb=$(kernel_deb)
    [[ -n $deb ]] || die "apt-get download $kpkg left no .deb in $OUT/pkgs"
fi

KDIR=$OUT/kernel
if [[ ! -f $KDIR/.from || $(cat "$KDIR/.from") != "$(basename "$deb")" ]]; then
    log "unpacking $(basename "$deb")"
    rm -rf "$KDIR"
    mkdir -p "$KDIR"
    dpkg -x "$deb" "$KDIR"
    basename "$deb" >"$KDIR/.from"
fi
vmlinuz=$(ls "$KDIR"/boot/vmlinuz-* | head -n1)
[[ -f $vmlinuz ]] || die "no /boot/vmlinuz-* in $deb"
KVER=${vmlinuz##*/vmlinuz-}
MODDIR=$(ls -d "$KDIR"/lib/modules/"$KVER" "$KDIR"/usr/lib/modules/"$KVER" 2>/dev/null | head -n1 || true)
[[ -d $MODDIR ]] || die "no lib/modules/$KVER in $deb"

# ---------------------------------------------------------------- the initramfs
STAGE=$OUT/initramfs.d
rm -rf "$STAGE"
mkdir -p "$STAGE"/{usr/bin,usr/sbin,usr/lib/modules,usr/lib64,proc,sys,dev,tmp,mnt,run,etc,root}
ln -s usr/bin "$STAGE/bin"
ln -s usr/sbin "$STAGE/sbin"
ln -s usr/lib "$STAGE/lib"
ln -s usr/lib64 "$STAGE/lib64"
chmod 1777 "$STAGE/tmp"

# A host file at the same path in the guest, with every shared library it
# needs (and the dynamic loader).
copy_with_libs() {
    local f=$1 dst lib
    dst=$STAGE$f
    mkdir -p "$(dirname "$dst")"
    [[ -e $dst ]] || cp -L "$f" "$dst"
    # ldd lines: "libx.so => /path (addr)" or "/lib64/ld-linux-x86-64.so.2 (addr)"
    while read -r lib; do
        [[ -n $lib && -e $lib ]] || continue
        dst=$STAGE$lib
        [[ -e $dst ]] && continue
        mkdir -p "$(dirname "$dst")"
        cp -L "$lib" "$dst"
    done < <(LC_ALL=C ldd "$f" 2>/dev/null | awk '/=>/ {print $3; next} /^[[:space:]]*\// {print $1}')
}

cp -L /bin/busybox "$STAGE/usr/bin/busybox"
copy_with_libs "$(readlink -f "$(command -v fio)")"
[[ -e $STAGE/usr/bin/fio ]] || ln -s "$(readlink -f "$(command -v fio)")" "$STAGE/usr/bin/fio"
copy_with_libs /usr/sbin/mke2fs
copy_with_libs /usr/sbin/e2fsck
copy_with_libs /usr/sbin/blkdiscard
copy_with_libs /usr/sbin/fstrim
for l in mkfs.ext4 mkfs.ext2 mkfs.ext3; do ln -sf mke2fs "$STAGE/usr/sbin/$l"; done
for l in fsck.ext4 fsck.ext2 fsck.ext3; do ln -sf e2fsck "$STAGE/usr/sbin/$l"; done
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$STAGE/etc/"
# busybox applets for whatever is not a real program already
while read -r applet; do
    [[ -n $applet ]] || continue
    applet=${applet#/}
    case $applet in
    bin/* | sbin/* | usr/bin/* | usr/sbin/*) ;;
    *) continue ;;
    esac
    name=${applet##*/}
    [[ -e $STAGE/usr/bin/$name || -e $STAGE/usr/sbin/$name || -L $STAGE/usr/bin/$name ]] && continue
    ln -s /usr/bin/busybox "$STAGE/usr/bin/$name"
done < <(/bin/busybox --list-full)
[[ -e $STAGE/usr/bin/sh ]] || ln -s busybox "$STAGE/usr/bin/sh"
echo "root:x:0:0:root:/root:/bin/sh" >"$STAGE/etc/passwd"
echo "root:x:0:" >"$STAGE/etc/group"
: >"$STAGE/etc/mtab"

# Kernel modules: the wanted ones that are not built in, each after its
# dependencies, decompressed on the host (busybox insmod may not decompress).
declare -A mod_done=()
mod_order=()
builtin_list=$MODDIR/modules.builtin
is_builtin() { # name
    [[ -f $builtin_list ]] || return 1
    local n=$1
    grep -qE "/(${n}|${n//_/-})\.ko$" "$builtin_list"
}
find_mod() { # name -> path of its .ko[.xz|.zst|.gz]
    local n=$1
    find "$MODDIR" \( -name "$n.ko" -o -name "$n.ko.*" -o -name "${n//_/-}.ko" -o -name "${n//_/-}.ko.*" \) -print -quit
}
mod_depends() { # decompressed .ko -> its depends= list, one per line
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' '\n'
}
add_mod() { # name
    local n=${1//-/_} src tmp d
    [[ -n $n ]] || return 0
    [[ -n ${mod_done[$n]:-} ]] && return 0
    mod_done[$n]=1
    if is_builtin "$n"; then
        return 0
    fi
    src=$(find_mod "$n")
    [[ -n $src ]] || die "kernel module $n is neither built in nor in $(basename "$deb")"
    tmp=$STAGE/usr/lib/modules/$n.ko
    case $src in
    *.ko) cp "$src" "$tmp" ;;
    *.ko.xz)
        command -v xz >/dev/null || apt_install xz-utils
        xz -dc "$src" >"$tmp"
        ;;
    *.ko.zst)
        command -v zstd >/dev/null || apt_install zstd
        zstd -qdc "$src" >"$tmp"
        ;;
    *.ko.gz) gzip -dc "$src" >"$tmp" ;;
    *) die "unknown module compression: $src" ;;
    esac
    for d in $(mod_depends "$tmp"); do add_mod "$d"; done
    mod_order+=("$n")
}
for m in "${WANT_MODULES[@]}"; do add_mod "$m"; done
printf '%s\n' "${mod_order[@]}" >"$STAGE/etc/modules.order"
log "kernel $KVER; modules to load: ${mod_order[*]:-(none, all built in)}"

cat >"$STAGE/init" <<'EOF'
#!/bin/sh
# pcache test guest init (written by images/build.sh)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=${TERM:-linux}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1

finish() { # status
    sync
    echo
    echo "PCACHE-GUEST-EXIT $1"
    sync
    poweroff -f
    sleep 2
    reboot -f
    echo o >/proc/sysrq-trigger
    while :; do sleep 1; done
}

while read -r m; do
    [ -n "$m" ] || continue
    insmod "/usr/lib/modules/$m.ko" || echo "init: insmod $m failed"
done </etc/modules.order

i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ -b /dev/vda ] || echo "init: no /dev/vda after 30 s"

cmd=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    pcache.cmd=*) cmd=$(echo "${arg#pcache.cmd=}" | base64 -d) || { echo "init: bad pcache.cmd"; finish 125; } ;;
    esac
done

cd /root
if [ -n "$cmd" ]; then
    sh -c "$cmd"
    status=$?
else
    echo "init: no pcache.cmd; starting a shell (exit it to power off)"
    setsid cttyhack sh -l
    status=$?
fi
finish "$status"
EOF
chmod 0755 "$STAGE/init"
# /dev/console for the kernel to open before /init runs (devtmpfs comes later)
if [[ $(id -u) -eq 0 ]]; then
    mknod -m 0600 "$STAGE/dev/console" c 5 1
    mknod -m 0666 "$STAGE/dev/null" c 1 3
fi

tmp_img=$OUT/initramfs.cpio.gz.tmp
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6) >"$tmp_img"
cp "$vmlinuz" "$OUT/vmlinuz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$tmp_img" "$OUT/initramfs.cpio.gz"
rm -rf "$STAGE"
log "built $OUT/vmlinuz ($KVER) and $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
