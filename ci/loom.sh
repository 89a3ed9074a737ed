#!/usr/bin/env bash
# Deep loom run: the models at a higher preemption bound (default 3),
# optimised, then the whole crate built on loom (`--cfg loom`) so the core's
# own unit tests run as loom models too.
#
#   ci/loom.sh [BOUND]
set -euo pipefail
cd "$(dirname "$0")/.."
bound="${1:-3}"
# Optimised, but with the core's `debug_assert!`s on: they check invariants
# the models rely on (the holder checks in `end_read`/`end_write`, the
# pool's double check-in), which a plain release build would drop.
export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true

echo "== loom models, preemption bound $bound"
time ESERVER_LOOM_PREEMPTIONS="$bound" cargo test --release --test loom -- --test-threads 1

echo "== the core's unit tests under --cfg loom"
CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" \
  cargo test --release --lib core:: -- --test-threads 1
