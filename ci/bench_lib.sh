# Shared by ci/bench.sh, ci/bench_threads.sh and ci/bench_ab.sh (sourced,
# not run): how a server is started, how a free port is found and awaited,
# what is read of a server process from /proc, and one measured run. Needs
# THREADS (read at each call), PEERS and, for `measure`, SECS; sets and
# advances `port`.

port=${port:-7950}
server_cmd() { # server app port
    case $1 in
        eserver) echo "target/release/eserver serve --listen 127.0.0.1:$3 --threads $THREADS --stats-interval 0 --log-level warn --app $2" ;;
        eserver-registered) echo "target/release/eserver serve --listen 127.0.0.1:$3 --threads $THREADS --stats-interval 0 --log-level warn --app $2 --write-interest registered" ;;
        eserver-poll) echo "target/release/eserver serve --listen 127.0.0.1:$3 --threads $THREADS --stats-interval 0 --log-level warn --app $2 --idle-wait poll" ;;
        tokio) echo "$PEERS/tokio_echo --listen 127.0.0.1:$3 --threads $THREADS" ;;
        threads) echo "$PEERS/threads_echo --listen 127.0.0.1:$3 --threads $THREADS" ;;
        epoll) echo "$PEERS/epoll_echo --listen 127.0.0.1:$3 --threads $THREADS" ;;
    esac
}
# The next port nothing listens on.
next_port() {
    port=$((port + 1))
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
}
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.02
    done
    echo "server on port $1 did not start" >&2
    return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sys_ticks() { awk '{print $15}' "/proc/$1/stat"; }
# Context switches of all the server's threads (they live as long as it does).
ctxsw() { { cat /proc/"$1"/task/*/status 2>/dev/null || true; } | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }


# measure PID LABELS bench-arguments...: runs the verifying client (2
# threads, SECS seconds after 1 s of warm-up) against the server PID that
# listens on $port, then stops it. Prints one JSON line: LABELS (a JSON
# object) plus throughput, server CPU and context switches per verified
# reply, and the error count.
measure() {
    local pid=$1 labels=$2 t0 s0 t1 s1 json
    shift 2
    wait_port "$port"
    t0=$(cpu_ticks "$pid"); s0=$(ctxsw "$pid")
    json=$(target/release/eserver bench --addr "127.0.0.1:$port" "$@" \
        --duration "$SECS" --warmup 1 --threads 2 --json)
    t1=$(cpu_ticks "$pid"); s1=$(ctxsw "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$((s1 - s0))" "$labels" <<'PY'
import json, sys
b = json.loads(sys.argv[1]); n = max(b["ok_total"], 1)
row = json.loads(sys.argv[5])
row.update({"rate": b["per_second"], "cpu_us": int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / n,
            "ctxsw": int(sys.argv[4]) / n, "errors": b["errors"]})
print(json.dumps(row))
PY
}
