#!/usr/bin/env python3
"""Turns ci/bench.sh's raw runs into BENCHMARKS.md and bench.svg.

Usage: bench_report.py OUT_DIR ROUNDS SECONDS WARMUP THREADS CLIENT_THREADS
"""
import json
import math
import os
import platform
import statistics
import subprocess
import sys

out, rounds, secs, warmup, threads, client_threads = sys.argv[1:7]
TICK = os.sysconf("SC_CLK_TCK")
SERVERS = ["eserver", "tokio", "threads", "epoll", "eserver-registered", "eserver-poll"]
LABEL = {
    "eserver": "eserver",
    "tokio": "tokio (multi-thread)",
    "threads": "thread per connection",
    "epoll": "bare epoll (ceiling)",
    "eserver-registered": "eserver, EPOLLOUT registered (not S)",
    "eserver-poll": "eserver, every worker polls (no standby)",
}


def lines(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


runs = lines("runs.jsonl")
scenarios = []
for r in runs:
    if r["scenario"] not in scenarios:
        scenarios.append(r["scenario"])


def med(values):
    return statistics.median(values) if values else float("nan")


summary = {}
failed_runs = []
for s in scenarios:
    for server in SERVERS:
        every = [r for r in runs if r["scenario"] == s and r["server"] == server]
        # A run whose client printed no report (it failed outright) counts
        # as an error, and has no figures to take a median of.
        failed_runs += [(s, server, r["round"], r["bench_status"]) for r in every if not r["bench"]]
        rs = [r for r in every if r["bench"]]
        if not rs:
            continue
        rate = [r["bench"]["per_second"] for r in rs]
        cpu = [
            r["cpu_ticks"] / TICK * 1e6 / max(r["bench"]["ok_total"], 1) for r in rs
        ]
        kernel = [r.get("sys_ticks", 0) / max(r["cpu_ticks"], 1) for r in rs]
        switches = [r.get("ctxsw", 0) / max(r["bench"]["ok_total"], 1) for r in rs]
        summary[(s, server)] = {
            "kernel": med(kernel),
            "ctxsw": med(switches),
            "rate": med(rate),
            "min": min(rate),
            "max": max(rate),
            "p50": med([r["bench"]["latency_ns"]["p50"] / 1000 for r in rs]),
            "p99": med([r["bench"]["latency_ns"]["p99"] / 1000 for r in rs]),
            "p999": med([r["bench"]["latency_ns"]["p999"] / 1000 for r in rs]),
            "cpu": med(cpu),
            "errors": sum(r["bench"]["errors"] + (r["bench_status"] != 0) for r in rs)
            + len(every) - len(rs),
            "rounds": len(rs),
        }


def ratio(s, server, peer, key="rate"):
    a, b = summary.get((s, server)), summary.get((s, peer))
    if not a or not b or not b[key]:
        return None
    return a[key] / b[key]


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


# Syscalls per request (per connection in the connect mode), counted two
# ways: strace -c (the method) and the kernel's tracepoints.
LOADS = {"d1": "depth 1", "d16": "depth 16", "connect": "connect (per connection)"}


def load_of(r):
    # Runs from before the connect mode was counted name the depth only.
    return r.get("load") or f"d{r['depth']}"


def strace_counts(path):
    """strace -c's table, read by the columns its dashed rule marks: a cell
    may be blank (errors, and in some versions usecs/call on the total line),
    so splitting on spaces can shift the calls column."""
    calls, top, spans = None, [], None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if spans is None:
                if line.startswith("------"):
                    spans, start = [], None
                    for i, c in enumerate(line + " "):
                        if c == "-" and start is None:
                            start = i
                        elif c != "-" and start is not None:
                            spans.append((start, i))
                            start = None
                continue
            if line.startswith("------") or len(spans) < 6:
                continue
            cells = [line[a:b].strip() for a, b in spans[:5]] + [line[spans[5][0]:].strip()]
            if not cells[3].isdigit():
                continue
            if cells[5] == "total":
                calls = int(cells[3])
            else:
                top.append((int(cells[3]), cells[5]))
    return calls, top


def perf_counts(path):
    calls, top = None, []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 3 or not parts[0].isdigit():
                continue
            if parts[2] == "raw_syscalls:sys_enter":
                calls = int(parts[0])
            elif parts[2].startswith("syscalls:sys_enter_"):
                top.append((int(parts[0]), parts[2][len("syscalls:sys_enter_"):]))
    return calls, top


# Counted syscall runs (strace, perf) whose load failed or had reply errors:
# their figures are left out, and they count against "zero reply errors".
# (A failed RSS run is reported in its own table.)
counted_failures = []


def per_request(jsonl, suffix, parse):
    table, idle = {}, {}
    for r in lines(jsonl):
        path = os.path.join(out, f"{r['server']}.{load_of(r)}{suffix}")
        if not os.path.exists(path):
            continue
        if not r["bench"]:
            counted_failures.append(f"{jsonl}: {r['server']} {load_of(r)}: no result")
            continue
        if r["bench"]["errors"]:
            counted_failures.append(
                f"{jsonl}: {r['server']} {load_of(r)}: {r['bench']['errors']} reply errors")
            continue
        calls, top = parse(path)
        if calls is None:
            continue
        if load_of(r) == "idle":
            idle[r["server"]] = calls
            continue
        ok = r["bench"]["ok_total"]
        if ok:
            top.sort(reverse=True)
            table[(r["server"], load_of(r))] = (
                calls / ok,
                ", ".join(f"{name} {n / ok:.2f}" for n, name in top[:5]),
                ok,
                calls,
            )
    # Less the idle run's count: what the requests cost (not per connection).
    for (server, load), row in list(table.items()):
        base = idle.get(server)
        marginal = None if base is None or load == "connect" else (row[3] - base) / row[2]
        table[(server, load)] = row[:3] + (marginal,)
    return table


syscalls = per_request("strace.jsonl", ".strace", strace_counts)
traced = per_request("perf.jsonl", ".perf", perf_counts)

rss, rss_failed = {}, {}
for r in lines("rss.jsonl"):
    # Only a run that opened every connection measures anything.
    try:
        with open(os.path.join(out, f"idle.{r['server']}.json")) as f:
            idle_run = json.load(f)
        # Served, not only connected: each idle connection made one
        # verified round trip, so none was still in the server's backlog.
        served = idle_run["errors"] == 0 and idle_run["ok_total"] >= r["conns"]
        connected = idle_run["connected"] if served else 0
    except (OSError, ValueError, KeyError):
        connected = 0
    if connected == r["conns"]:
        rss[r["server"]] = (r["held_kib"] - r["base_kib"]) * 1024 / r["conns"]
    else:
        rss_failed[r["server"]] = f"failed: {connected:,} of {r['conns']:,} connected"


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


cpu_model = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
md = []
md.append("# Benchmarks\n")
md.append(
    "Produced by `ci/bench.sh` (the numbers below are from its last run; rerun it to "
    "reproduce them). Every reply of every run is verified by `eserver bench` "
    "(a per-request token: right connection, next sequence number, send time, and a filler "
    "seeded by the token: intact bytes); "
    "the *errors* column counts any failure.\n"
)
md.append("## Machine and method\n")
md.append(f"- CPU: {cpu_model}, {os.cpu_count()} cores; kernel {platform.release()}")
md.append(f"- {sh('rustc --version')}")
md.append(
    f"- Server and client on the same host over loopback; servers run {threads} "
    f"worker threads, the client (`eserver bench`, on eserver's own event loop "
    f"with outbound connections) {client_threads}."
)
md.append(
    f"- {rounds} rounds, interleaved (eserver, tokio, threads, epoll, then again); "
    f"each run {warmup} s warmup + {secs} s measured, a fresh server process per run. "
    "Medians, with min-max over the rounds."
)
md.append(
    "- Server CPU per request: the server process's user+system time "
    "(`/proc/PID/stat`) over the run divided by the verified replies of the run."
)
md.append(
    "- Peers (`benchmarks/`): tokio multi-thread runtime with the same worker count, "
    "a task per connection, one `write_all` of all the replies of a read; a thread per "
    "connection (std); a bare single-threaded level-triggered epoll loop per thread "
    "with SO_REUSEPORT (the ceiling)."
)
md.append("\nCommand: `ci/bench.sh " + f"{rounds} {secs}`\n")
md.append("## Throughput and latency\n")
md.append(
    "| scenario | server | per second (median) | min-max | p50 us | p99 us | p99.9 us "
    "| server CPU us/req | kernel share | context switches/req | vs tokio | vs ceiling | errors |"
)
md.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in scenarios:
    for server in SERVERS:
        v = summary.get((s, server))
        if not v:
            continue
        # A thread per connection's switches die with its threads, before
        # the count after the run: not measured.
        switches = "-" if server == "threads" else f"{v['ctxsw']:.3f}"
        md.append(
            f"| {s} | {LABEL[server]} | {v['rate']:,.0f} | {v['min']:,.0f}-{v['max']:,.0f} "
            f"| {v['p50']:.0f} | {v['p99']:.0f} | {v['p999']:.0f} | {v['cpu']:.2f} "
            f"| {v['kernel'] * 100:.0f}% | {switches} "
            f"| {fmt_ratio(ratio(s, server, 'tokio'))} | {fmt_ratio(ratio(s, server, 'epoll'))} "
            f"| {v['errors']} |"
        )
md.append(
    "\nScenarios: `echo64_c50_d1` = 64-byte echo, 50 connections, 1 request in flight "
    "each; `_d16` 16 in flight; `c1000` 1,000 connections; `echo4k_c50_d4` 4 KiB "
    "requests, depth 4; `connect_c50` = connections per second, 50 at a time, each "
    "opening, sending one request and closing (the original EServer client's metric); "
    "`pubsub_1x100_d16` = one publisher, 100 subscribers, 16 publications in flight, "
    "counted in deliveries per second (eserver only: the peers have no pub/sub). "
    "Latency is from a request's send to its verified reply; in `connect_c50` the "
    "request is sent once connected, so the handshake is not in it. Context switches "
    "are summed over the server's threads alive at the end of the run, so the thread "
    "per connection server's (whose threads end with their connections) are not "
    "measured.\n"
)
for s, server, round_, status in failed_runs:
    md.append(f"- **Failed run**: {s}, {LABEL[server]}, round {round_}: the client "
              f"exited with status {status} and no report (counted as an error).")
if failed_runs:
    md.append("")
md.append("![throughput and p99 relative to tokio, and latency percentiles](bench.svg)\n")
md.append("## Syscalls per request (50 connections, 64 B)\n")
md.append("Counted with `strace -c -f` around the server (the issue's method), and again, where "
          "`perf` is available, from the kernel's syscall tracepoints (`perf stat -e "
          "raw_syscalls:sys_enter,...` on the server's PID) with the server running free: "
          "strace stops the server at every syscall, so each `epoll_wait` finds more events "
          "waiting than it would without it. In the connect mode the figure is per connection "
          "(open, one request, close). strace counts the server's whole life (start-up, "
          "the 50 connections' set-up and teardown, periodic timers); the *less idle "
          "baseline* column subtracts the count of a run of the same length with the 50 "
          "connections open and idle, which leaves what the requests themselves cost.\n")


def order(item):
    (server, load), _ = item
    return (SERVERS.index(server), list(LOADS).index(load) if load in LOADS else 9)


for title, table in [("strace -c -f", syscalls), ("kernel tracepoints (perf stat)", traced)]:
    if not table:
        md.append(f"*{title}: not measured in this run.*\n")
        continue
    md.append(f"**{title}**\n")
    md.append("| server | load | syscalls/request | less idle baseline "
              "| largest contributors (per request) | requests |")
    md.append("|---|---|---:|---:|---|---:|")
    for (server, load), (per, top, ok, marginal) in sorted(table.items(), key=order):
        less = "-" if marginal is None else f"{marginal:.3f}"
        md.append(f"| {LABEL[server]} | {LOADS.get(load, load)} | {per:.3f} | {less} "
                  f"| {top} | {ok:,} |")
    md.append("")
if counted_failures:
    md.append("**Counted runs left out** (their load failed or had reply errors):\n")
    md.extend(f"- {f}" for f in counted_failures)
    md.append("")
md.append("\n## Memory per idle connection\n")
md.append(
    f"User-space RSS growth of the server process with {sh('echo $IDLE_CONNS') or '10000'} "
    "idle connections open, each served first (one verified echo: not a handshake the kernel "
    "completed for a connection still in the backlog), divided by the count "
    "(`/proc/PID/status` VmRSS).\n"
)
md.append("| server | bytes per idle connection |")
md.append("|---|---:|")
for server in SERVERS:
    if server in rss:
        md.append(f"| {LABEL[server]} | {rss[server]:,.0f} |")
    elif server in rss_failed:
        md.append(f"| {LABEL[server]} | {rss_failed[server]} |")

# The targets of issue 7, each beside what the bare epoll ceiling measured
# for the same target in the same run: a target the ceiling itself misses is
# out of reach of any server on this machine, not only of eserver.
targets = []


def target(name, ok, detail, ceiling):
    targets.append(f"| {name} | {'met' if ok else 'NOT met'} | {detail} | {ceiling} |")


def get(s, server, key):
    v = summary.get((s, server))
    return v[key] if v else None


for s, want in [("echo64_c50_d1", 1.2), ("echo64_c1000_d1", 1.2), ("echo64_c50_d16", 1.1)]:
    r = ratio(s, "eserver", "tokio")
    target(f"{s}: >= {want}x tokio", r is not None and r >= want, fmt_ratio(r),
           fmt_ratio(ratio(s, "epoll", "tokio")))
    p, q = get(s, "eserver", "p99"), get(s, "tokio", "p99")
    c = get(s, "epoll", "p99")
    target(f"{s}: p99 <= tokio's", p is not None and q is not None and p <= q,
           f"{p or 0:.0f} us vs {q or 0:.0f} us", "-" if c is None else f"{c:.0f} us")
for s in scenarios:
    r = ratio(s, "eserver", "tokio", "cpu")
    if r is not None:
        target(f"{s}: server CPU/request <= 0.75x tokio", r <= 0.75, fmt_ratio(r),
               fmt_ratio(ratio(s, "epoll", "tokio", "cpu")))
for s in scenarios:
    r = ratio(s, "eserver", "epoll")
    if r is not None:
        target(f"{s}: >= 0.9x ceiling", r >= 0.9, fmt_ratio(r), "1.00x")
for depth, limit in [(1, 2.05), (16, 0.12)]:
    v = syscalls.get(("eserver", f"d{depth}"))
    c = syscalls.get(("epoll", f"d{depth}"))
    # Judged on strace's whole count (the method); the figure less
    # the idle baseline is beside it.
    def both(row):
        if row is None:
            return "-"
        return f"{row[0]:.4f}" + ("" if row[3] is None else f" ({row[3]:.4f} less idle)")
    target(f"syscalls/request at depth {depth} <= {limit}", v is not None and v[0] <= limit,
           both(v), both(c))
v = rss.get("eserver")
c = rss.get("epoll")
target("memory per idle connection <= 1 KiB", v is not None and v <= 1024,
       rss_failed.get("eserver", "-") if v is None else f"{v:,.0f} B",
       rss_failed.get("epoll", "-") if c is None else f"{c:,.0f} B")
r = ratio("connect_c50", "eserver", "tokio")
target("connections/s >= 1.2x tokio", r is not None and r >= 1.2, fmt_ratio(r),
       fmt_ratio(ratio("connect_c50", "epoll", "tokio")))
# A pair of scenario and server whose every run failed has no summary; its
# failed runs count here.
unsummarized = [f for f in failed_runs if (f[0], f[1]) not in summary]
counted_ceiling = [f for f in counted_failures if ": epoll " in f]
errors = sum(v["errors"] for v in summary.values()) + len(unsummarized) + len(counted_failures)
ceiling_errors = sum(v["errors"] for (_, server), v in summary.items() if server == "epoll") + len(
    [f for f in unsummarized if f[1] == "epoll"]) + len(counted_ceiling)
target("zero reply errors in every run", errors == 0, f"{errors} errors",
       f"{ceiling_errors} errors")
md.append("\n## Targets (issue 7)\n")
md.append("The last column is the bare epoll ceiling's figure for the same target, from the same"
          " run: where the ceiling misses a target too, no server of this shape reaches it on"
          " this machine.\n")
md.append("| target | status | eserver | bare epoll (ceiling) |")
md.append("|---|---|---|---|")
md.extend(targets)
md.append("")

notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_notes.md")
if os.path.exists(notes):
    with open(notes) as f:
        md.append(f.read())

with open("BENCHMARKS.md", "w") as f:
    f.write("\n".join(md) + "\n")

# The plot: throughput and p99 relative to tokio, per scenario and server,
# then each server's latency percentiles (p50, p99, p99.9) in microseconds.
W, H, PAD = 900, 820, 60
panel_h = (H - 4 * PAD) / 3
colors = {"eserver": "#d95f02", "tokio": "#1b9e77", "threads": "#7570b3", "epoll": "#666666",
          "eserver-registered": "#e6ab02", "eserver-poll": "#e7298a"}


def scenario_axis(top, base, title):
    """A panel's title and base line, and a label under each scenario's
    group of bars; returns each group's left edge and one bar's width."""
    svg.append(f'<text x="{PAD}" y="{top - 12}" font-size="13">{title}</text>')
    svg.append(f'<line x1="{PAD}" y1="{base}" x2="{W - 20}" y2="{base}" stroke="black"/>')
    group = (W - PAD - 20) / max(len(scenarios), 1)
    for i, sc in enumerate(scenarios):
        svg.append(f'<text x="{PAD + i * group + 4}" y="{base + 14}">{sc}</text>')
    return [PAD + i * group for i in range(len(scenarios))], group / (len(SERVERS) + 1)


svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>']
for panel, (key, title) in enumerate([("rate", "throughput relative to tokio (higher is better)"),
                                      ("p99", "p99 latency relative to tokio (lower is better)")]):
    top = PAD + panel * (panel_h + PAD)
    values = {}
    for s in scenarios:
        for server in SERVERS:
            r = ratio(s, server, "tokio", key)
            if r is not None:
                values[(s, server)] = r
    vmax = max([1.0] + list(values.values())) * 1.1
    base = top + panel_h
    lefts, bar = scenario_axis(top, base, title)
    one = base - panel_h / vmax
    svg.append(f'<line x1="{PAD}" y1="{one}" x2="{W - 20}" y2="{one}" stroke="#999" stroke-dasharray="4"/>')
    svg.append(f'<text x="{PAD - 30}" y="{one + 4}">1.0</text>')
    for s, x0 in zip(scenarios, lefts):
        for j, server in enumerate(SERVERS):
            r = values.get((s, server))
            if r is None:
                continue
            h = panel_h * r / vmax
            x = x0 + (j + 0.5) * bar
            svg.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar * 0.9:.1f}" height="{h:.1f}" fill="{colors[server]}"/>')
            svg.append(f'<text x="{x:.1f}" y="{base - h - 3:.1f}" font-size="9">{r:.2f}</text>')
# Latency percentiles, absolute, on a log scale: one bar per server from
# p50 to p99.9, with a tick at p99.
top = PAD + 2 * (panel_h + PAD)
base = top + panel_h
points = [v for v in summary.values() for v in (v["p50"], v["p999"]) if v > 0]
if points:
    lo = 10 ** math.floor(math.log10(min(points)))
    hi = 10 ** math.ceil(math.log10(max(points)))
    if hi <= lo:
        hi = lo * 10

    def y_of(us):
        return base - panel_h * (math.log10(max(us, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    lefts, bar = scenario_axis(top, base, "latency in microseconds, log scale: each bar from "
                               "p50 to p99.9, the tick at p99 (lower is better)")
    decade = lo
    while decade <= hi:
        y = y_of(decade)
        svg.append(f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - 20}" y2="{y:.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{PAD - 44}" y="{y + 4:.1f}">{decade:g}</text>')
        decade *= 10
    for sc, x0 in zip(scenarios, lefts):
        for j, server in enumerate(SERVERS):
            v = summary.get((sc, server))
            if not v or v["p50"] <= 0:
                continue
            x = x0 + (j + 0.5) * bar
            y50, y99, y999 = y_of(v["p50"]), y_of(v["p99"]), y_of(v["p999"])
            svg.append(f'<rect x="{x:.1f}" y="{y999:.1f}" width="{bar * 0.9:.1f}" '
                       f'height="{max(y50 - y999, 1):.1f}" fill="{colors[server]}"/>')
            svg.append(f'<line x1="{x:.1f}" y1="{y99:.1f}" x2="{x + bar * 0.9:.1f}" y2="{y99:.1f}" '
                       f'stroke="black" stroke-width="2"/>')
for j, server in enumerate(SERVERS):
    svg.append(f'<rect x="{PAD + j * 165}" y="{H - 22}" width="12" height="12" fill="{colors[server]}"/>')
    svg.append(f'<text x="{PAD + j * 165 + 16}" y="{H - 12}" font-size="10">{LABEL[server]}</text>')
svg.append("</svg>")
with open("bench.svg", "w") as f:
    f.write("\n".join(svg) + "\n")
print("\n".join(md))
