#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs first.
#   scripts/test.sh                 lint + every test
#   PCACHE_LONG=1 scripts/test.sh   longer randomized runs
set -euo pipefail
cd "$(dirname "$0")/.."

# The guest image for the end-to-end test; this also apt-get installs what
# the tests need on the host (qemu-system-x86, busybox-static, fio, cpio,
# e2fsprogs) and says what to install when it cannot.
images/build.sh

if [[ -n ${PCACHE_LONG:-} ]]; then
    export PCACHE_MODEL_OPS=${PCACHE_MODEL_OPS:-1000000}
    export PCACHE_KILLS=${PCACHE_KILLS:-500}
    export PCACHE_CRASH_POINTS=${PCACHE_CRASH_POINTS:-50000}
fi

cargo fmt --check
# Dependencies point down (docs/layers.toml): no file uses a layer above
# its own, and neither modules nor the files of one import in a circle.
python3 scripts/check-layers.py
cargo clippy --all-targets -- -D warnings

# A throwaway Ceph cluster for the RBD tests (scripts/ceph-cluster.sh
# installs ceph-mon, ceph-osd, ceph-common and librbd-dev when missing),
# stopped however the tests end.
CEPH_DIR=$(mktemp -d /tmp/pcache-ceph.XXXXXX)
rmdir "$CEPH_DIR"
trap 'scripts/ceph-cluster.sh stop "$CEPH_DIR"' EXIT
PCACHE_TEST_CEPH_CONF=$(scripts/ceph-cluster.sh start "$CEPH_DIR")
export PCACHE_TEST_CEPH_CONF

cargo test --all-targets

# Every fuzz target, built and run over its saved corpus (the regression
# cases), then 20 s each on new inputs.
FUZZ_SECONDS=${FUZZ_SECONDS:-20} scripts/fuzz.sh
