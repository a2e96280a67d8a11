#!/usr/bin/env bash
# Runs each cargo-fuzz target for SECONDS, one after another (one libFuzzer process each,
# so two cores shared with other work stay usable), and prints per target: total execs,
# crashes (files in its artifacts directory: crash-, timeout-, oom-, leak-) and corpus size.
#
#   fuzz/run.sh SECONDS [TARGET...]       (all targets when none is named)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). The
# committed seeds (fuzz/corpus/TARGET) are read, never written: new inputs go to
# $FUZZ_WORK/corpus/TARGET (default fuzz/work, ignored by git), findings to
# $FUZZ_WORK/artifacts/TARGET; reproduce one with
#   cargo +nightly fuzz run --debug-assertions TARGET FILE
# Builds use $CARGO_TARGET_DIR when set. Extra libFuzzer flags: $FUZZ_FLAGS.
# Exits non-zero when any target found a crash, timeout or OOM.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
work=${FUZZ_WORK:-$PWD/fuzz/work}

mkdir -p "$work"
# Debug assertions on: integer overflow then panics, as in `cargo test`.
echo "building ${targets[*]}"
for target in "${targets[@]}"; do
    if ! cargo +nightly fuzz build --debug-assertions "$target" >"$work/build.log" 2>&1; then
        cat "$work/build.log"
        exit 2
    fi
done

rows=()
found=0
for target in "${targets[@]}"; do
    corpus="$work/corpus/$target"
    artifacts="$work/artifacts/$target"
    log="$work/$target.log"
    mkdir -p "$corpus" "$artifacts"
    echo "fuzzing $target for ${seconds}s (log: $log)"
    # shellcheck disable=SC2086
    cargo +nightly fuzz run --debug-assertions "$target" "$corpus" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" ${FUZZ_FLAGS:-} \
        >"$log" 2>&1 || true
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # No final stats (killed): the last status line's count.
        execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    fi
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    crashes=$(find "$artifacts" -type f | wc -l)
    seeds=$(find "fuzz/corpus/$target" -type f | wc -l)
    grown=$(find "$corpus" -type f | wc -l)
    if [ "$crashes" -gt 0 ]; then
        found=1
        echo "  $target: $crashes finding(s) in $artifacts:"
        find "$artifacts" -type f -printf '    %f\n'
        grep -m1 -E "panicked at|ERROR: libFuzzer|ALARM" "$log" | sed 's/^/    /' || true
    fi
    rows+=("| $target | $seconds | ${execs:-?} | ${rate:-?} | $crashes | $grown (+$seeds seeds) |")
done

echo
echo "| target | seconds | execs | execs/s | crashes | corpus |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit "$found"
