#!/usr/bin/env bash
# Runs the coordinator's fuzz target for a bounded time and exits non-zero on
# a crash (the crashing input is saved under coord/fuzz/artifacts/).
#
#   coord/fuzz/run.sh [SECONDS_PER_TARGET]     (default 60)
#
# As dataplane/fuzz/run.sh: stable toolchain with RUSTC_BOOTSTRAP=1, no
# sanitizer (the fuzzed code has no `unsafe`).
set -euo pipefail
secs=${1:-60}
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in session; do
    mkdir -p "fuzz/corpus/$target"
    extra=()
    [[ -d fuzz/seeds/$target ]] && extra+=("fuzz/seeds/$target")
    RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "fuzz/corpus/$target" "${extra[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=1024
done
