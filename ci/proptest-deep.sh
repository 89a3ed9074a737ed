#!/usr/bin/env bash
# Deep property run: many scenarios of the production server on the
# simulated kernel (six properties: no faults, benign faults, hostile
# faults, lingering closes with benign faults, and the benign and the
# lingering ones again on the finer schedule), optimised, two at a time.
# It runs the whole `sim` test binary at CASES: the tests that loop over
# `cases()` take it too (the drain-cut linger test runs 4 x CASES
# schedules), as do the fixed regression and unit tests, unchanged.
#
#   ci/proptest-deep.sh [CASES]     (cases per property; default 20000)
#
# A failure prints the seed and the whole scenario; proptest also records it
# in tests/sim.proptest-regressions, which is committed and replayed first by
# every later run.
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-20000}"
echo "== $cases scenarios per property"
time PROPTEST_CASES="$cases" cargo test --release --test sim -- --test-threads 2
