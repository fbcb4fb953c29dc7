#!/usr/bin/env bash
# Runs each fuzz target of meshd-dataplane for a bounded time and exits non-zero
# on the first crash (the crashing input is saved under fuzz/artifacts/).
#
#   dataplane/fuzz/run.sh [SECONDS_PER_TARGET]     (default 60)
#
# cargo-fuzz wants nightly for its -Z flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. No sanitizer: the fuzzed code has no `unsafe`, and
# without ASan the fuzzer runs about twice as many inputs.
set -euo pipefail
secs=${1:-60}
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in wgconf keys demux; do
    mkdir -p "fuzz/corpus/$target"
    extra=()
    [[ -d fuzz/seeds/$target ]] && extra+=("fuzz/seeds/$target")
    flags=(-max_total_time="$secs")
    [[ -f fuzz/$target.dict ]] && flags+=(-dict="fuzz/$target.dict")
    RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "fuzz/corpus/$target" "${extra[@]}" -- "${flags[@]}"
done
