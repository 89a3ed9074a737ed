//! `eserver bench`: a verifying load generator on eserver's own event loop.
//!
//! Closed loop (default): each connection keeps `--depth` requests in
//! flight. Open loop (`--rate`): requests are due at fixed intervals across
//! the connections and latency counts from when each was due. `--mode
//! connect` measures connections per second (open, one request, close);
//! `--mode idle` opens `--conns` connections, makes one verified round trip
//! on each, and holds them (for memory per idle connection). Every reply is
//! verified (see [`load`]); any error makes the exit status 1, and so does a
//! run that verified no reply, or a closed-loop echo or eserver-demo run
//! whose connections did not all open. A run that cannot begin exits with
//! 2: a bad argument, or (pub/sub, idle, `--rate`) connections not all open
//! within 30 s.

mod load;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use eserver::framing::Framing;
use eserver::{Config, Running, Server};

use load::{Load, MIN_FILLER, MIN_SIZE, TOKEN_LEN, request};

/// What the generator asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Echo: each reply is the request.
    Echo,
    /// The original EServer demo: `^^^` + request + request + `$$$`, unframed.
    EserverDemo,
    /// One publisher, the other connections subscribers (`--app pubsub`).
    Pubsub,
    /// Connection rate: open, one echo request, close; repeat.
    Connect,
    /// Open the connections, one echo round trip on each (so each was
    /// accepted and served, not only queued), then hold them idle for
    /// `--duration`.
    Idle,
}

/// `eserver bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The server to load.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Connections (pub/sub: subscribers + 1 publisher).
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// Requests in flight per connection (closed loop; pub/sub: the publisher's).
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Request payload bytes (at least 51: a 43-byte token and 8 bytes of
    /// filler that check it).
    #[arg(long, value_parser = crate::args::parse_size, default_value = "64")]
    pub size: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Message framing: len-le, len-be, lines (eserver-demo: always len-le).
    #[arg(long, default_value = "len-le")]
    pub framing: String,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    pub mode: Mode,
    /// Open loop: requests per second in all, due at fixed intervals.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Event-loop threads of the generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark; the exit status is 0 only if every reply verified.
pub fn run(args: BenchArgs) -> i32 {
    match bench(&args) {
        Ok(report) => {
            if args.json {
                println!("{}", report.json(&args));
            } else {
                print!("{}", report.text(&args));
            }
            i32::from(report.errors > 0)
        }
        Err(e) => {
            eprintln!("eserver bench: {e}");
            2
        }
    }
}

/// What a run measured.
struct Report {
    /// Verified replies (pub/sub: deliveries) in the measured window.
    ok: u64,
    ok_total: u64,
    seconds: f64,
    errors: u64,
    error_samples: Vec<String>,
    connect_failures: u64,
    connected: usize,
    /// Open loop: requests due in the run that the scheduler never sent (it
    /// fell behind the requested rate by more than it could catch up).
    behind: u64,
    /// ns: p50, p90, p99, p99.9, max.
    latency: [u64; 5],
}

fn bench(args: &BenchArgs) -> Result<Report, String> {
    if args.size < MIN_SIZE {
        return Err(format!(
            "--size {} is too small: requests carry a {TOKEN_LEN}-byte token and at least \
             {MIN_FILLER} bytes of filler that check it",
            args.size
        ));
    }
    if args.conns == 0 || args.depth == 0 || args.threads == 0 {
        return Err("--conns, --depth and --threads must be at least 1".into());
    }
    if args.size > MAX_SIZE {
        return Err(format!(
            "--size {} is too large: at most {MAX_SIZE} bytes (16 MiB)",
            args.size
        ));
    }
    if args.depth > MAX_DEPTH {
        return Err(format!(
            "--depth {} is too large: at most {MAX_DEPTH} requests in flight per connection",
            args.depth
        ));
    }
    // Every request in flight is held by the generator and by the server:
    // refuse a run that would need more memory than any machine it runs on.
    let in_flight = (args.conns as u128) * (args.depth as u128) * (args.size as u128);
    if in_flight > MAX_IN_FLIGHT {
        return Err(format!(
            "--conns {} x --depth {} x --size {} is {in_flight} bytes in flight: at most \
             {MAX_IN_FLIGHT} (4 GiB)",
            args.conns, args.depth, args.size
        ));
    }
    if args.mode == Mode::Pubsub && args.conns < 2 {
        return Err("--mode pubsub needs at least 2 connections".into());
    }
    if args
        .rate
        .is_some_and(|r| r <= 0.0 || !r.is_finite() || r > MAX_RATE)
    {
        return Err(format!(
            "--rate must be a positive number of requests per second, at most {MAX_RATE}"
        ));
    }
    if args.rate.is_some() && !matches!(args.mode, Mode::Echo | Mode::EserverDemo) {
        return Err("--rate applies to echo and eserver-demo".into());
    }
    for (name, value) in [("--duration", args.duration), ("--warmup", args.warmup)] {
        if !(0.0..=MAX_SECONDS).contains(&value) {
            return Err(format!(
                "{name} {value} is out of range: 0 to {MAX_SECONDS} seconds"
            ));
        }
    }
    if args.mode != Mode::EserverDemo && args.framing == "raw" {
        return Err(
            "--framing raw keeps no message boundaries, so replies cannot be \
                    matched to requests: use len-le, len-be or lines"
                .into(),
        );
    }
    let framing = match args.mode {
        Mode::EserverDemo => Framing::Raw(eserver::framing::Raw),
        _ => Framing::from_name(&args.framing, 64 << 20)?,
    };
    let load = Arc::new(Load::new(
        args.mode,
        args.size,
        args.depth,
        args.rate.is_some(),
        args.addr,
    ));
    let budgets = Budgets::for_run(args.mode, args.conns, args.depth, args.size);
    let mut config = Config::default()
        .without_listeners()
        .threads(args.threads)
        .framing(framing)
        .max_conns(args.conns.saturating_add(16))
        .max_out(budgets.max_out);
    config.max_out_total = budgets.max_out_total;
    config.max_in_total = budgets.max_in_total;
    // The load generator keeps every thread hunting for work: its turns
    // are heavier than a server's (it builds and verifies every message),
    // and with standby it drove the servers about a quarter slower at depth 16.
    // It is the same for every server measured.
    config.idle_wait = eserver::IdleWait::Poll;
    let client = Server::bind(config, Arc::clone(&load))
        .map_err(|e| e.to_string())?
        .start()
        .map_err(|e| e.to_string())?;
    let report = drive(args, &load, &client);
    client.stop(Duration::from_secs(1));
    // The stop can still raise errors (a reply failing verification on its
    // way in, a connection closing short of its replies): read the count
    // after it.
    report.map(|mut report| {
        report.errors = load.errors.load(Ordering::Relaxed);
        report.error_samples = load.error_samples();
        report
    })
}

/// The generator's own output and input limits: what the run holds in
/// flight must fit them, or it would refuse its own requests or close its
/// own connections (`input_budget`) and report that as the server's
/// fault. The library's defaults at least.
#[derive(Debug, PartialEq, Eq)]
struct Budgets {
    max_out: usize,
    max_out_total: usize,
    max_in_total: usize,
}

impl Budgets {
    fn for_run(mode: Mode, conns: usize, depth: usize, size: usize) -> Self {
        let bytes = |n: u128| usize::try_from(n).unwrap_or(usize::MAX);
        let request = size as u128;
        // An eserver-demo reply is twice its request.
        let reply = if mode == Mode::EserverDemo {
            2 * request
        } else {
            request
        };
        let depth = depth as u128;
        let conns = conns as u128;
        Self {
            max_out: bytes(depth * request).max(64 << 20),
            max_out_total: bytes(conns * depth * request)
                .max(eserver::server::config::DEFAULT_MAX_OUT_TOTAL),
            // A frame being received may hold up to twice its length of
            // buffer, and every connection may be receiving one.
            max_in_total: bytes(2 * conns * depth * reply)
                .max(eserver::server::config::DEFAULT_MAX_IN_TOTAL),
        }
    }
}

/// The largest `--size`: requests stay well inside the 64 MiB frame limit
/// the generator decodes with (an eserver-demo reply is twice the request).
const MAX_SIZE: usize = 16 << 20;
/// The largest `--depth`.
const MAX_DEPTH: usize = 65_536;
/// The most request bytes in flight at once, over every connection.
const MAX_IN_FLIGHT: u128 = 4 << 30;
/// The highest `--rate` (requests per second): far above what one host
/// sends, and low enough that the scheduler's arithmetic stays exact.
const MAX_RATE: f64 = 1e9;

/// The longest `--duration` or `--warmup` (a day): checked up front, so no
/// later sum of the two can overflow a `Duration`.
const MAX_SECONDS: f64 = 86_400.0;

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.clamp(0.0, MAX_SECONDS)).unwrap_or_default()
}

fn drive(args: &BenchArgs, load: &Arc<Load>, client: &Running) -> Result<Report, String> {
    let handle = client.handle();
    let connect = |n: usize| -> Result<(), String> {
        for _ in 0..n {
            handle.connect(args.addr).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let wait_for = |what: &str, mut done: Box<dyn FnMut() -> bool + '_>| -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            if Instant::now() > deadline || load.connect_failures.load(Ordering::Relaxed) > 0 {
                return Err(format!(
                    "{what}: gave up ({} connected, {} subscribed, errors: {:?})",
                    load.connected.load(Ordering::Relaxed),
                    load.subscribed.load(Ordering::Relaxed),
                    load.error_samples()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    };
    match args.mode {
        Mode::Pubsub => {
            let subscribers = args.conns - 1;
            connect(subscribers)?;
            wait_for(
                "subscribing",
                Box::new(|| load.subscribed.load(Ordering::Acquire) == subscribers),
            )?;
            load.publisher_next.store(true, Ordering::Release);
            connect(1)?;
        }
        _ => {
            connect(args.conns)?;
            if args.mode == Mode::Idle {
                // Served, not only connected: a handshake the kernel
                // completed for a connection still in the server's backlog
                // does not count.
                wait_for(
                    "connecting",
                    Box::new(|| load.ok_total.load(Ordering::Acquire) == args.conns as u64),
                )?;
            } else if args.rate.is_some() {
                wait_for(
                    "connecting",
                    Box::new(|| load.connected.load(Ordering::Acquire) == args.conns),
                )?;
            }
        }
    }
    if args.mode == Mode::Idle {
        eprintln!("connected {}", args.conns);
    }
    let scheduler = args.rate.map(|rate| {
        let load = Arc::clone(load);
        let handle = handle.clone();
        let end = Instant::now() + secs(args.warmup + args.duration);
        let size = args.size;
        let demo = args.mode == Mode::EserverDemo;
        std::thread::spawn(move || open_loop(&load, &handle, rate, end, size, demo))
    });
    let progress = std::io::stderr().is_terminal() && !args.json;
    std::thread::sleep(secs(args.warmup));
    load.open_window();
    let started = Instant::now();
    let window = secs(args.duration);
    let mut last = 0;
    while started.elapsed() < window {
        let left = window.saturating_sub(started.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(1)));
        if progress {
            let ok = load.ok.load(Ordering::Relaxed);
            eprint!(
                "\r{:5.1} s  {:>10} ok  {:>10}/s  {} errors   ",
                started.elapsed().as_secs_f64(),
                ok,
                ok - last,
                load.errors.load(Ordering::Relaxed)
            );
            last = ok;
        }
    }
    load.close_window();
    let seconds = started.elapsed().as_secs_f64();
    load.stopping.store(true, Ordering::Release);
    if progress {
        eprintln!();
    }
    let behind = match scheduler.map(std::thread::JoinHandle::join) {
        None => 0,
        Some(Ok(behind)) => behind,
        Some(Err(_)) => {
            load.error("open loop: the scheduler panicked".into());
            0
        }
    };
    if behind > 0 {
        load.error(format!(
            "open loop: {behind} requests due were never sent (the scheduler fell behind \
             the requested rate)"
        ));
        load.add_errors(behind - 1);
    }
    // Every request sent gets its reply (or the run has errors).
    let deadline = Instant::now() + Duration::from_secs(5);
    // Acquire: pairs with the publisher's Release (acks counted before).
    while load.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let unanswered = load.inflight.load(Ordering::Relaxed);
    if unanswered > 0 {
        load.error(format!("{unanswered} requests never answered"));
        load.add_errors(unanswered - 1);
    }
    if args.mode == Mode::Pubsub {
        // Every acknowledged publication reaches every subscriber: a stream
        // that just stops shows no gap to the subscriber's order check.
        let expected =
            load.acked.load(Ordering::Relaxed) * load.subscribed.load(Ordering::Relaxed) as u64;
        while load.ok_total.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let delivered = load.ok_total.load(Ordering::Relaxed);
        if delivered != expected {
            let missing = expected.abs_diff(delivered);
            load.error(format!(
                "{missing} deliveries missing or extra: {delivered} verified for {expected} \
                 ({} publications acknowledged x {} subscribers)",
                load.acked.load(Ordering::Relaxed),
                load.subscribed.load(Ordering::Relaxed)
            ));
            load.add_errors(missing - 1);
        }
    }
    // A run that verified nothing measured nothing, whatever else it saw
    // (a handler that failed before its first request, dials that never
    // completed).
    if load.ok_total.load(Ordering::Relaxed) == 0 {
        load.error("no reply was verified".into());
    }
    let connected = load.connected.load(Ordering::Relaxed);
    if matches!(args.mode, Mode::Echo | Mode::EserverDemo) && connected < args.conns {
        load.error(format!(
            "only {connected} of {} connections opened",
            args.conns
        ));
    }
    let h = load.histogram();
    Ok(Report {
        ok: load.ok.load(Ordering::Relaxed),
        ok_total: load.ok_total.load(Ordering::Relaxed),
        seconds,
        errors: load.errors.load(Ordering::Relaxed),
        error_samples: load.error_samples(),
        connect_failures: load.connect_failures.load(Ordering::Relaxed),
        connected: load.connected.load(Ordering::Relaxed),
        behind,
        latency: [
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
        ],
    })
}

/// How long past the end of the run the scheduler may go on sending the
/// requests that fell due before it.
const CATCH_UP: Duration = Duration::from_secs(1);

/// Sends requests due every `1/rate` s until `end`, round robin over the
/// connections, each stamped with when it was due (so a request sent late
/// counts its wait: no coordinated omission). Requests that fell due before
/// `end` are sent even late, for up to [`CATCH_UP`] more; returns how many
/// were still unsent then.
fn open_loop(
    load: &Load,
    handle: &eserver::ServerHandle,
    rate: f64,
    end: Instant,
    size: usize,
    demo: bool,
) -> u64 {
    let mut ids = load
        .ids
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    ids.sort_unstable();
    let mut seqs = vec![0u64; ids.len()];
    let interval = 1e9 / rate;
    let start_ns = load.now();
    let mut payload = Vec::with_capacity(size);
    let codec = load::demo_request_codec();
    let end_ns = start_ns + end.saturating_duration_since(Instant::now()).as_nanos() as u64;
    let give_up = end + CATCH_UP;
    for i in 0u64.. {
        // Saturating: a rate low enough puts the next request past any
        // time (the cast saturates too), and that ends the loop.
        let due = start_ns.saturating_add((i as f64 * interval) as u64);
        if due >= end_ns || ids.is_empty() {
            break;
        }
        if Instant::now() >= give_up {
            return ((end_ns - due) as f64 / interval).ceil() as u64;
        }
        let now = load.now();
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        let k = (i % ids.len() as u64) as usize;
        let (number, id) = ids[k];
        request(&mut payload, number, seqs[k], due, size);
        seqs[k] += 1;
        load.inflight.fetch_add(1, Ordering::Relaxed);
        let sent = if demo {
            let mut framed = Vec::with_capacity(size + 4);
            match eserver::Codec::encode(&codec, &[&payload], &mut framed) {
                Ok(()) => handle.send_raw(id, framed).map_err(|e| e.to_string()),
                Err(e) => Err(format!("request not framed: {e}")),
            }
        } else {
            handle.send(id, &payload).map_err(|e| e.to_string())
        };
        if let Err(e) = sent {
            load.inflight.fetch_sub(1, Ordering::Relaxed);
            load.error(e);
        }
    }
    0
}

impl Report {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }

    fn unit(args: &BenchArgs) -> &'static str {
        match args.mode {
            Mode::Pubsub => "deliveries",
            Mode::Connect => "connections",
            Mode::Idle => "replies",
            _ => "requests",
        }
    }

    fn text(&self, args: &BenchArgs) -> String {
        let us = |ns: u64| ns as f64 / 1000.0;
        let [p50, p90, p99, p999, max] = self.latency;
        let loop_kind = match args.rate {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => "closed loop".into(),
        };
        let mut out = format!(
            "eserver bench: {:?} on {}, {} connections, depth {}, {} B, {:.1} s ({loop_kind})\n\
             {}: {} verified in the window ({:.0}/s), {} in all; {} errors\n",
            args.mode,
            args.addr,
            args.conns,
            args.depth,
            args.size,
            self.seconds,
            Self::unit(args),
            self.ok,
            self.rate(),
            self.ok_total,
            self.errors,
        );
        if self.ok > 0 {
            out += &format!(
                "latency (us): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}\n",
                us(p50),
                us(p90),
                us(p99),
                us(p999),
                us(max)
            );
        }
        for e in &self.error_samples {
            out += &format!("error: {e}\n");
        }
        out
    }

    fn json(&self, args: &BenchArgs) -> String {
        let [p50, p90, p99, p999, max] = self.latency;
        let errors: Vec<String> = self.error_samples.iter().map(|e| json_string(e)).collect();
        format!(
            "{{\"mode\":\"{:?}\",\"addr\":\"{}\",\"conns\":{},\"depth\":{},\"size\":{},\"rate\":{},\
             \"seconds\":{:.3},\"unit\":\"{}\",\"ok\":{},\"ok_total\":{},\"per_second\":{:.1},\
             \"errors\":{},\"connect_failures\":{},\"connected\":{},\"behind\":{},\
             \"latency_ns\":{{\"p50\":{p50},\"p90\":{p90},\"p99\":{p99},\"p999\":{p999},\"max\":{max}}},\
             \"error_samples\":[{}]}}",
            args.mode,
            args.addr,
            args.conns,
            args.depth,
            args.size,
            args.rate.map_or("null".into(), |r| r.to_string()),
            self.seconds,
            Self::unit(args),
            self.ok,
            self.ok_total,
            self.rate(),
            self.errors,
            self.connect_failures,
            self.connected,
            self.behind,
            errors.join(",")
        )
    }
}

/// `s` as a JSON string literal. Error samples quote what a peer sent, so
/// every character JSON forbids raw (the quote, the backslash, U+0000 to
/// U+001F) is escaped by JSON's rules; Rust's `Debug` escaping (`\u{1}`,
/// `\0`) is not JSON, and one such byte made the whole line unparsable.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An audit's finding: the generator kept the library's 256 MiB input
    /// and output budgets while its checks allow 4 GiB in flight, so a run
    /// of large requests over many connections closed its own connections
    /// (`input_budget`) and reported it as the server's fault.
    #[test]
    fn the_generators_budgets_hold_what_the_run_has_in_flight() {
        let small = Budgets::for_run(Mode::Echo, 50, 1, 64);
        assert_eq!(
            small,
            Budgets {
                max_out: 64 << 20,
                max_out_total: 256 << 20,
                max_in_total: 256 << 20,
            }
        );
        let large = Budgets::for_run(Mode::Echo, 30, 8, 16 << 20);
        assert_eq!(large.max_out, 8 * (16 << 20));
        assert!(large.max_out_total >= 30 * 8 * (16 << 20));
        assert!(large.max_in_total >= 2 * 30 * 8 * (16 << 20));
        let demo = Budgets::for_run(Mode::EserverDemo, 100, 1, 16 << 20);
        assert!(demo.max_in_total >= 2 * 100 * (32 << 20));
    }
}
