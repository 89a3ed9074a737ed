#!/usr/bin/env bash
# Benchmarks eserver against its peers (benchmarks/: tokio, thread per
# connection, bare epoll ceiling) with `eserver bench`, which verifies every
# reply. Rounds are interleaved (A B C D A B C D ...); the report gives
# medians, min-max and ratios, then counted runs: syscalls per request
# (strace -c -f, and kernel tracepoints through perf stat where available),
# and user-space RSS per idle connection at 10,000.
# Writes BENCHMARKS.md and bench.svg at the repository root.
#
#   ci/bench.sh [rounds] [seconds]      defaults: 3 rounds of 5 s (+1 s warmup)
#   THREADS=2 CLIENT_THREADS=2 ci/bench.sh
#
# Loopback only; every process it starts is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
SECS=${2:-5}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-2}
CLIENT_THREADS=${CLIENT_THREADS:-2}
OUT=${OUT:-target/bench}
IDLE_CONNS=${IDLE_CONNS:-10000}

need() {
    command -v "$1" >/dev/null && return
    echo "installing $2" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq "$2" >/dev/null; fi
}
need python3 python3
need strace strace

cargo build --release --quiet
cargo build --release --quiet --manifest-path benchmarks/Cargo.toml
BENCH=target/release/eserver
PEERS=benchmarks/target/release
mkdir -p "$OUT"
rm -f "$OUT"/*.jsonl "$OUT"/*.strace "$OUT"/*.perf "$OUT"/*.json
# 10,000 idle connections need descriptors on both sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# server_cmd, next_port, wait_port and the /proc readers.
# shellcheck source=ci/bench_lib.sh
source ci/bench_lib.sh

# name | bench arguments | servers
SCENARIOS=(
    "echo64_c50_d1|--conns 50 --depth 1 --size 64|eserver tokio threads epoll eserver-registered eserver-poll"
    "echo64_c50_d16|--conns 50 --depth 16 --size 64|eserver tokio threads epoll eserver-registered eserver-poll"
    "echo64_c1000_d1|--conns 1000 --depth 1 --size 64|eserver tokio threads epoll eserver-poll"
    "echo4k_c50_d4|--conns 50 --depth 4 --size 4096|eserver tokio threads epoll eserver-registered eserver-poll"
    "connect_c50|--mode connect --conns 50 --size 64|eserver tokio threads epoll"
    "pubsub_1x100_d16|--mode pubsub --conns 101 --depth 16 --size 64|eserver"
)

run_one() { # scenario args server round
    local name=$1 args=$2 server=$3 round=$4 app=echo
    [[ $name == pubsub* ]] && app=pubsub
    next_port
    # shellcheck disable=SC2046
    $(server_cmd "$server" "$app" "$port") & local pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    local before; before=$(cpu_ticks "$pid")
    local sys_before; sys_before=$(sys_ticks "$pid")
    local cs_before; cs_before=$(ctxsw "$pid")
    local json status=0
    # shellcheck disable=SC2086
    json=$($BENCH bench --addr "127.0.0.1:$port" $args --duration "$SECS" --warmup "$WARMUP" \
        --threads "$CLIENT_THREADS" --json) || status=$?
    # A run that failed outright prints no report: recorded as null, and
    # counted as a failed run rather than breaking the report.
    [ -n "$json" ] || json=null
    local after; after=$(cpu_ticks "$pid")
    local sys_after; sys_after=$(sys_ticks "$pid")
    local cs_after; cs_after=$(ctxsw "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "{\"scenario\":\"$name\",\"server\":\"$server\",\"round\":$round,\"cpu_ticks\":$((after - before)),\"sys_ticks\":$((sys_after - sys_before)),\"ctxsw\":$((cs_after - cs_before)),\"bench_status\":$status,\"bench\":$json}" \
        >>"$OUT/runs.jsonl"
    printf '%-18s %-18s round %s: %s\n' "$name" "$server" "$round" \
        "$(python3 -c 'import json,sys; b=json.loads(sys.argv[1]); print("failed (exit status %s)" % sys.argv[2] if b is None else "%.0f/s p99 %.0f us, %d errors" % (b["per_second"], b["latency_ns"]["p99"] / 1000, b["errors"]))' "$json" "$status")"
}

for round in $(seq "$ROUNDS"); do
    for scenario in "${SCENARIOS[@]}"; do
        IFS='|' read -r name args servers <<<"$scenario"
        for server in $servers; do run_one "$name" "$args" "$server" "$round"; done
    done
done

# Counted runs: syscalls per request under strace (slow, so only counts), at
# depth 1 and 16 and per connection in the connect mode. strace counts the
# server's whole life, so a run of the same length with the connections open
# and idle is counted too: less that baseline, what remains is what the
# requests cost (no start-up, connection set-up or periodic timers).
LOADS=("d1|--depth 1" "d16|--depth 16" "connect|--mode connect")
for server in eserver tokio epoll; do
    for load in "${LOADS[@]}" "idle|--mode idle"; do
        IFS='|' read -r lname largs <<<"$load"
        next_port
        # shellcheck disable=SC2046
        strace -f -c -o "$OUT/$server.$lname.strace" $(server_cmd "$server" echo "$port") & spid=$!
        PIDS+=("$spid")
        wait_port "$port"
        # shellcheck disable=SC2086
        json=$($BENCH bench --addr "127.0.0.1:$port" --conns 50 $largs --size 64 \
            --duration 3 --warmup 0 --threads "$CLIENT_THREADS" --json) || true
        [ -n "$json" ] || json=null
        kill "$(pgrep -P "$spid")" 2>/dev/null || true
        wait "$spid" 2>/dev/null || true
        echo "{\"server\":\"$server\",\"load\":\"$lname\",\"bench\":$json}" >>"$OUT/strace.jsonl"
    done
done

# The same counts from the kernel's syscall tracepoints (perf stat): strace
# stops the server at every syscall, which slows it and so batches more
# events per epoll_wait than a free-running server gets. Skipped, with a
# note in the report, where perf or its tracepoints are not available.
PERF_EVENTS=raw_syscalls:sys_enter
for c in epoll_wait recvfrom sendto accept4 dup3 close epoll_ctl setsockopt futex; do
    PERF_EVENTS="$PERF_EVENTS,syscalls:sys_enter_$c"
done
perf_works() { perf stat -x, -e "$PERF_EVENTS" -o /dev/null true 2>/dev/null; }
if ! perf_works; then
    command -v perf >/dev/null || need perf linux-perf || true
fi
if perf_works; then
    for server in eserver tokio epoll; do
        for load in "${LOADS[@]}"; do
            IFS='|' read -r lname largs <<<"$load"
            next_port
            # shellcheck disable=SC2046
            $(server_cmd "$server" echo "$port") & pid=$!
            PIDS+=("$pid")
            wait_port "$port"
            perf stat -x, -e "$PERF_EVENTS" -p "$pid" -o "$OUT/$server.$lname.perf" & ppid=$!
            PIDS+=("$ppid")
            sleep 0.2
            # shellcheck disable=SC2086
            json=$($BENCH bench --addr "127.0.0.1:$port" --conns 50 $largs --size 64 \
                --duration 3 --warmup 0 --threads "$CLIENT_THREADS" --json) || true
            [ -n "$json" ] || json=null
            kill -INT "$ppid"; wait "$ppid" 2>/dev/null || true
            kill "$pid"; wait "$pid" 2>/dev/null || true
            echo "{\"server\":\"$server\",\"load\":\"$lname\",\"bench\":$json}" >>"$OUT/perf.jsonl"
        done
    done
else
    echo "perf stat with syscall tracepoints is not available: skipping the tracepoint counts" >&2
fi

# Counted runs: user-space RSS per idle connection.
for server in eserver tokio threads epoll; do
    next_port
    # shellcheck disable=SC2046
    $(server_cmd "$server" echo "$port") & pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    sleep 0.2
    base=$(rss_kib "$pid")
    $BENCH bench --addr "127.0.0.1:$port" --mode idle --conns "$IDLE_CONNS" --duration 3 \
        --warmup 0 --threads "$CLIENT_THREADS" --json >"$OUT/idle.$server.json" 2>"$OUT/idle.$server.err" & bpid=$!
    PIDS+=("$bpid")
    # "connected N" once all are (a failure says "gave up (N connected...").
    for _ in $(seq 600); do grep -q '^connected [0-9]' "$OUT/idle.$server.err" && break; sleep 0.05; done
    sleep 1
    held=$(rss_kib "$pid")
    wait "$bpid" || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "{\"server\":\"$server\",\"conns\":$IDLE_CONNS,\"base_kib\":$base,\"held_kib\":$held}" >>"$OUT/rss.jsonl"
done

python3 ci/bench_report.py "$OUT" "$ROUNDS" "$SECS" "$WARMUP" "$THREADS" "$CLIENT_THREADS"
