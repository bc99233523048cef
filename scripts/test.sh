#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs first.
#   scripts/test.sh            lint + every test
#   PCACHE_LONG=1 scripts/test.sh   longer randomized runs
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for p in qemu-system-x86 qemu-utils fio busybox-static cpio e2fsprogs; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    echo "test.sh: installing ${need_pkgs[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "test.sh: need root to apt-get install ${need_pkgs[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [[ -n ${PCACHE_LONG:-} ]]; then
    export PCACHE_MODEL_OPS=${PCACHE_MODEL_OPS:-1000000}
    export PCACHE_KILLS=${PCACHE_KILLS:-500}
fi

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
