# Shared by ci/bench.sh and ci/bench_threads.sh (sourced, not run): how a
# server is started, how a free port is found and awaited, and what is read
# of a server process from /proc. Needs THREADS (read at each call) and
# PEERS; sets and advances `port`.

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

