#!/usr/bin/env bash
# Fuzz smoke run for CI: each cargo-fuzz target for a short, bounded time, starting from the
# checked-in seed corpus (corpus/<target>/, never modified here: new inputs go to a scratch
# directory). Exits non-zero on any crash, leak, timeout or invariant failure; the reproducer
# is left in fuzz/artifacts/<target>/.
#
#   bash fuzz/smoke.sh            # 30 s per target
#   FUZZ_SECONDS=600 bash fuzz/smoke.sh
#
# Needs cargo-fuzz (installed from crates.io if missing) and, on a stable toolchain,
# RUSTC_BOOTSTRAP=1 for the sanitizer flags, which this script sets. The smoke run uses
# AddressSanitizer and debug assertions (overflow checks).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-30}
targets=(request_parse queue_chains)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}

echo "== building the fuzz targets"
cargo fuzz build -a

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${seconds}s"
    mkdir -p "$scratch/$t" "artifacts/$t"
    log="$scratch/$t.log"
    status=0
    cargo fuzz run -a "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -aE '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done|^stat::(number_of_executed_units|average_exec_per_sec)' \
        "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 80 "$log" >&2
        echo "fuzz target $t failed (exit $status); reproducer in fuzz/artifacts/$t/:" >&2
        ls -l "artifacts/$t" >&2 || true
        exit "$status"
    fi
done
echo "== fuzz smoke: ${#targets[@]} targets, ${seconds}s each, no crash"
