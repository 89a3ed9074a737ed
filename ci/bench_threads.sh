#!/usr/bin/env bash
# eserver against the bare epoll ceiling at 1 and at 2 server threads, one
# scenario (default: 64-byte echo, 50 connections, depth 16), rounds
# interleaved. Prints throughput, server CPU and context switches per
# verified reply for each run, then the medians. A focused companion to
# ci/bench.sh: it separates what sharing one epoll between workers costs
# from what the per-request work costs.
#
#   ci/bench_threads.sh [rounds] [seconds] [bench arguments...]
#
# Loopback only; every process it starts is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
SECS=${2:-5}
shift 2 2>/dev/null || shift $#
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--conns 50 --depth 16 --size 64)

cargo build --release --quiet
cargo build --release --quiet --manifest-path benchmarks/Cargo.toml
OUT=$(mktemp)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -f "$OUT"' EXIT
PEERS=benchmarks/target/release
port=8100
# server_cmd, next_port, wait_port and the /proc readers.
# shellcheck source=ci/bench_lib.sh
source ci/bench_lib.sh
for round in $(seq "$ROUNDS"); do
    for threads in 1 2; do
        for server in eserver epoll; do
            next_port
            THREADS=$threads
            # shellcheck disable=SC2046
            $(server_cmd "$server" echo "$port") &
            pid=$!
            measure "$pid" "{\"server\": \"$server\", \"threads\": $threads, \"round\": $round}" \
                "${ARGS[@]}" >>"$OUT"
            pid=
            tail -1 "$OUT"
        done
    done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print("| server | threads | per second (median) | server CPU us/req | context switches/req | errors |")
print("|---|---:|---:|---:|---:|---:|")
for threads in (1, 2):
    for server in ("eserver", "epoll"):
        rs = [r for r in runs if r["server"] == server and r["threads"] == threads]
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"| {server} | {threads} | {med('rate'):,.0f} | {med('cpu_us'):.3f} | {med('ctxsw'):.3f} | {sum(r['errors'] for r in rs)} |")
PY
