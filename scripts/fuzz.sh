#!/usr/bin/env bash
# Build every fuzz target in fuzz/ and run each: first over its saved
# corpus (fuzz/corpus/TARGET: the regression cases, each run once), then
# on fresh inputs for FUZZ_SECONDS (default 20) more. Stable Rust: the
# coverage libFuzzer needs comes from LLVM's sancov pass, as cargo-fuzz
# sets it up, without the sanitizers that need nightly.
#
#   scripts/fuzz.sh                    every target, 20 s each
#   FUZZ_SECONDS=3600 scripts/fuzz.sh image    one target, an hour
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECONDS:-20}
OUT=${FUZZ_TARGET_DIR:-$PWD/target/fuzz}
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(request decode image frontend)
if ! command -v c++ >/dev/null; then
    # libFuzzer itself is C++, built by libfuzzer-sys.
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ >&2
    else
        echo "fuzz.sh: libFuzzer needs a C++ compiler: apt-get install g++" >&2
        exit 1
    fi
fi
# An explicit target keeps the flags off build scripts and proc macros.
HOST=$(rustc -vV | sed -n 's/^host: //p')

RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks" \
    cargo build --release --manifest-path fuzz/Cargo.toml --target-dir "$OUT" --target "$HOST" \
    $(printf -- '--bin %s ' "${TARGETS[@]}")

for t in "${TARGETS[@]}"; do
    bin=$OUT/$HOST/release/$t
    corpus=fuzz/corpus/$t
    mkdir -p "$corpus"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    n=$(find "$corpus" -type f | wc -l)
    echo "fuzz.sh: $t: $n saved inputs, then ${SECS}s of new ones"
    # New inputs go to $work (listed first), never into the saved corpus;
    # a crash leaves its input in $work and fails the run.
    if ! "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$work/" -print_final_stats=1 "$work" "$corpus" \
        >"$work/log" 2>&1; then
        tail -60 "$work/log" >&2
        echo "fuzz.sh: $t FAILED; the input is in $work (kept)" >&2
        trap - EXIT
        exit 1
    fi
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$work/log" | sed "s/^/fuzz.sh: $t: /"
    rm -rf "$work"
    trap - EXIT
done
