#!/usr/bin/env bash
# eserver against itself with different server flags, one scenario, rounds
# interleaved (A B C A B C ...), a fresh server per run. Prints each run, then
# the medians of throughput, server CPU and context switches per verified
# reply. How the standby threshold was chosen (see ci/bench_notes.md):
#
#   ci/bench_ab.sh 4 4 "poll:--idle-wait poll" "sb50:--busy-below-us 50" \
#       "sb200:--busy-below-us 200" -- --conns 1000 --depth 1 --size 64
#
#   ci/bench_ab.sh rounds seconds "name:server flags"... -- bench arguments...
#
# Loopback only; every process it starts is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=$1
SECS=$2
shift 2
VARIANTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do VARIANTS+=("$1"); shift; done
[ $# -gt 0 ] && shift
cargo build --release --quiet
OUT=$(mktemp)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -f "$OUT"' EXIT
port=8500
# shellcheck source=ci/bench_lib.sh
source ci/bench_lib.sh
for round in $(seq "$ROUNDS"); do
    for variant in "${VARIANTS[@]}"; do
        name=${variant%%:*}
        read -r -a flags <<<"${variant#*:}"
        next_port
        target/release/eserver serve --listen "127.0.0.1:$port" --threads 2 \
            --stats-interval 0 --log-level warn --app echo "${flags[@]}" &
        pid=$!
        measure "$pid" "{\"variant\": \"$name\", \"round\": $round}" "$@" >>"$OUT"
        pid=
        tail -1 "$OUT"
    done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print("| variant | per second (median) | min-max | server CPU us/req | context switches/req | errors |")
print("|---|---:|---:|---:|---:|---:|")
for v in dict.fromkeys(r["variant"] for r in runs):
    rs = [r for r in runs if r["variant"] == v]
    med = lambda k: statistics.median(r[k] for r in rs)
    lo, hi = min(r["rate"] for r in rs), max(r["rate"] for r in rs)
    print(f"| {v} | {med('rate'):,.0f} | {lo:,.0f}-{hi:,.0f} | {med('cpu_us'):.3f} | {med('ctxsw'):.4f} | {sum(r['errors'] for r in rs)} |")
PY
