#!/usr/bin/env bash
# Fuzz every target (or the ones named) for SECONDS each (default 60).
# Uses the nightly toolchain with AddressSanitizer where nightly is
# installed, and the stable toolchain without a sanitizer otherwise.
# Fails on the first crash; the input is saved in fuzz/artifacts/<target>/
# (minimise it with `cargo fuzz tmin`, then commit it under
# fuzz/regressions/<target>/, where `cargo test` replays it).
#
#   ci/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  # Pinned: a later release could want a newer rustc or other flags.
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
# Asked of the toolchain itself: a `grep -q` on rustup's listing could end
# the pipe early and, under pipefail, fall back to stable without a word.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
  sanitizer=()
else
  echo "no nightly toolchain: fuzzing on stable without a sanitizer"
  toolchain=()
  sanitizer=(-s none)
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  # Not a process substitution: its failure would go unseen, and an empty
  # list would fuzz nothing and pass.
  listed=$(cargo "${toolchain[@]}" fuzz list)
  mapfile -t targets <<<"$listed"
  if [ -z "$listed" ] || [ ${#targets[@]} -eq 0 ]; then
    echo "cargo fuzz list found no target" >&2
    exit 1
  fi
fi
for target in "${targets[@]}"; do
  # New inputs go to fuzz/corpus (not committed); fuzz/seeds is read-only.
  mkdir -p "fuzz/corpus/$target"
  echo "== $target: ${secs}s"
  cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" "$target" \
    "fuzz/corpus/$target" "fuzz/seeds/$target" \
    -- -max_total_time="$secs" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1
done
