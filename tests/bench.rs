//! `eserver bench` runs and verifies every reply: short runs of each mode
//! against in-process servers, and servers that misbehave on purpose to show
//! the verification catches corruption and wrong-peer delivery. Never timed:
//! how fast is `ci/bench.sh`'s business.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{BIN, start};
use eserver::apps::{EServerDemo, Echo, PubSub};
use eserver::{ConnId, Ctx, Handler};

/// Runs `eserver bench --json` with `args`; (exit code, JSON text).
fn bench(addr: SocketAddr, args: &[&str]) -> (i32, String) {
    bench_for("0.5", addr, args)
}

/// [`bench`] for `seconds` seconds.
fn bench_for(seconds: &str, addr: SocketAddr, args: &[&str]) -> (i32, String) {
    let addr = addr.to_string();
    let mut all = vec![
        "bench",
        "--addr",
        &addr,
        "--duration",
        seconds,
        "--warmup",
        "0.1",
        "--json",
    ];
    all.extend_from_slice(args);
    // Bounded: the run's own length, and a minute for start-up and stop.
    let out = common::output_within(
        Command::new(BIN).args(&all),
        std::time::Duration::from_secs(60),
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{json}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), json)
}

/// A number field of the flat JSON report.
fn field(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + key.len();
    json[at..]
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap()
        .parse::<f64>()
        .unwrap() as u64
}

fn assert_clean(code: i32, json: &str, conns: u64) {
    assert_eq!(code, 0, "bench failed: {json}");
    if let Err(e) = serde_json::from_str::<serde_json::Value>(json.trim()) {
        panic!("not JSON ({e}): {json}");
    }
    assert_eq!(field(json, "errors"), 0);
    assert!(field(json, "ok") > 0, "nothing verified in the window");
    assert!(field(json, "connected") >= conns, "{json}");
}

#[test]
fn closed_loop_echo_verifies_every_reply() {
    let server = start(Echo, 2, |c| c);
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--conns", "20", "--depth", "4", "--size", "100"],
    );
    assert_clean(code, &json, 20);
}

#[test]
fn open_loop_and_lines_framing() {
    let server = start(Echo, 2, |c| {
        c.framing(eserver::Framing::from_name("lines", 1 << 20).unwrap())
    });
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--conns", "10", "--rate", "2000", "--framing", "lines"],
    );
    assert_clean(code, &json, 10);
    assert_eq!(field(&json, "behind"), 0, "2,000/s is within reach");
}

/// An audit finding: at a rate low enough, the time the scheduler computed
/// for its second request overflowed, and the scheduler thread panicked;
/// the panic was taken for "nothing left behind", so the run passed. The
/// second request is now due after the run (it sends one), and a
/// scheduler that panics fails the run.
#[test]
fn a_rate_too_low_for_a_second_request_sends_one() {
    let server = start(Echo, 2, |c| c);
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--conns", "1", "--rate", "1e-11"],
    );
    assert_eq!(code, 0, "{json}");
    assert_eq!(field(&json, "errors"), 0, "{json}");
    assert_eq!(field(&json, "ok_total"), 1, "{json}");
}

/// A rate no scheduler reaches: the requests it could not send are reported
/// and fail the run, rather than vanishing with the latencies they would
/// have shown.
#[test]
fn an_unreachable_rate_fails_the_run() {
    let server = start(Echo, 2, |c| c);
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--conns", "2", "--rate", "1e9"],
    );
    assert_eq!(code, 1, "{json}");
    assert!(field(&json, "behind") > 0, "{json}");
}

#[test]
fn demo_pubsub_connect_and_idle_modes() {
    let demo = start(EServerDemo, 2, |c| c);
    let (code, json) = bench(
        demo.local_addr().unwrap(),
        &["--mode", "eserver-demo", "--conns", "8", "--depth", "2"],
    );
    assert_clean(code, &json, 8);

    let pubsub = start(PubSub::default(), 2, |c| c);
    let (code, json) = bench(
        pubsub.local_addr().unwrap(),
        &["--mode", "pubsub", "--conns", "11", "--depth", "4"],
    );
    assert_clean(code, &json, 11);

    let echo = start(Echo, 2, |c| c);
    let (code, json) = bench(
        echo.local_addr().unwrap(),
        &["--mode", "connect", "--conns", "5"],
    );
    assert_clean(code, &json, 5);
    let (code, json) = bench(
        echo.local_addr().unwrap(),
        &["--mode", "idle", "--conns", "100"],
    );
    assert_eq!(code, 0, "{json}");
    assert_eq!(field(&json, "connected"), 100);
}

/// A review finding: open loop framed eserver-demo requests with the
/// default 8 MiB frame limit and dropped the error, so every request over
/// it went out as nothing and the run failed as "never answered".
#[test]
fn open_loop_demo_frames_requests_over_eight_mebibytes() {
    let demo = start(EServerDemo, 2, |c| {
        c.framing(eserver::Framing::from_name("len-le", 16 << 20).unwrap())
    });
    // Two seconds at two requests a second. A debug build on a loaded
    // machine took up to 4 s to answer a 9 MiB request (18 MiB back), and
    // at four a second the generator's own scheduler, building each 9 MiB
    // request, then fell a request behind (counted as an error) in about
    // one run in four, before and after this test's last code change
    // alike; two a second leaves it room.
    let (code, json) = bench_for(
        "2",
        demo.local_addr().unwrap(),
        &[
            "--mode",
            "eserver-demo",
            "--conns",
            "1",
            "--rate",
            "2",
            "--size",
            "9M",
        ],
    );
    assert_clean(code, &json, 1);
}

/// Echoes, but damages one byte of every 10th reply (10, not more: a slow
/// machine's half-second run still gets there on every connection).
struct Corrupt;

impl Handler for Corrupt {
    type Conn = u32;
    fn on_open(&self, _: &mut Ctx<'_>) -> u32 {
        0
    }
    fn on_message(&self, n: &mut u32, ctx: &mut Ctx<'_>, msg: &[u8]) {
        *n += 1;
        let mut reply = msg.to_vec();
        if *n % 10 == 0 {
            let last = reply.len() - 1;
            reply[last] ^= 1;
        }
        ctx.reply(&reply).unwrap();
    }
}

/// From its 10th message on, echoes one message of each connection to the
/// connection that sent the message before it (the first time that was
/// another connection).
#[derive(Default)]
struct Misdeliver {
    last: Mutex<Option<ConnId>>,
}

impl Handler for Misdeliver {
    /// Messages seen, and whether one went astray already.
    type Conn = (u32, bool);
    fn on_open(&self, _: &mut Ctx<'_>) -> (u32, bool) {
        (0, false)
    }
    fn on_message(&self, conn: &mut (u32, bool), ctx: &mut Ctx<'_>, msg: &[u8]) {
        let (n, done) = conn;
        *n += 1;
        let other = self.last.lock().unwrap().replace(ctx.id());
        match other {
            Some(other) if *n >= 10 && !*done && other != ctx.id() => {
                *done = true;
                let _ = ctx.server().send(other, msg);
            }
            _ => ctx.reply(msg).unwrap(),
        }
    }
}

#[test]
fn corruption_fails_the_run() {
    let server = start(Corrupt, 2, |c| c);
    let (code, json) = bench(server.local_addr().unwrap(), &["--conns", "4"]);
    assert_eq!(code, 1, "a corrupted reply must fail the run: {json}");
    assert!(field(&json, "errors") > 0);
    assert!(json.contains("corrupted"), "{json}");
}

/// Echoes, but moves the send time of every 10th reply earlier (the last
/// non-zero hex digit of the token's time field, bytes 27 to 42, set to 0):
/// a reply that would count a shorter latency than the real one.
struct Backdate;

impl Handler for Backdate {
    type Conn = u32;
    fn on_open(&self, _: &mut Ctx<'_>) -> u32 {
        0
    }
    fn on_message(&self, n: &mut u32, ctx: &mut Ctx<'_>, msg: &[u8]) {
        *n += 1;
        let mut reply = msg.to_vec();
        if *n % 10 == 0 {
            if let Some(digit) = (27..43).rev().find(|&i| reply[i] != b'0') {
                reply[digit] = b'0';
            }
        }
        ctx.reply(&reply).unwrap();
    }
}

/// A bench review's finding: the time field was checked only against the
/// clock (not after the reply's arrival), so a backdated reply verified.
#[test]
fn a_backdated_reply_fails_the_run() {
    let server = start(Backdate, 2, |c| c);
    let (code, json) = bench(server.local_addr().unwrap(), &["--conns", "4"]);
    assert_eq!(code, 1, "a backdated reply must fail the run: {json}");
    assert!(field(&json, "errors") > 0);
    assert!(json.contains("corrupted"), "{json}");
}

#[test]
fn wrong_peer_delivery_fails_the_run() {
    let server = start(Misdeliver::default(), 2, |c| c);
    let (code, json) = bench(server.local_addr().unwrap(), &["--conns", "4"]);
    assert_eq!(code, 1, "a misdelivered reply must fail the run: {json}");
    assert!(json.contains("wrong peer"), "{json}");
}

/// Echoes, but never answers every 7th connection.
#[derive(Default)]
struct IgnoresSome {
    opened: AtomicU64,
}

impl Handler for IgnoresSome {
    type Conn = bool;
    fn on_open(&self, _: &mut Ctx<'_>) -> bool {
        self.opened.fetch_add(1, Ordering::Relaxed) % 7 == 6
    }
    fn on_message(&self, ignored: &mut bool, ctx: &mut Ctx<'_>, msg: &[u8]) {
        if !*ignored {
            ctx.reply(msg).unwrap();
        }
    }
}

#[test]
fn a_connection_never_answered_fails_a_connect_run() {
    let server = start(IgnoresSome::default(), 2, |c| c);
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--mode", "connect", "--conns", "5"],
    );
    assert_eq!(code, 1, "an unanswered request must fail the run: {json}");
    assert!(json.contains("never answered"), "{json}");
}

/// The pub/sub protocol, with a fault after the 20th publication.
#[derive(Default)]
struct FaultyPubSub {
    fault: PubSubFault,
    subscribers: Mutex<Vec<ConnId>>,
    published: AtomicU64,
}

#[derive(Default, PartialEq)]
enum PubSubFault {
    /// One subscriber gets nothing more (no gap it could see: its stream
    /// just stops), while the publisher is told every publication reached
    /// them all.
    #[default]
    DropsDeliveries,
    /// Every publication is acknowledged twice.
    AcksTwice,
    /// Publications are acknowledged with a count that is not a number:
    /// control characters, a quote, a backslash, non-ASCII.
    AcksGarbage,
}

impl Handler for FaultyPubSub {
    type Conn = ();
    fn on_open(&self, _: &mut Ctx<'_>) {}
    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        if let Some(topic) = msg.strip_prefix(b"SUB ") {
            self.subscribers.lock().unwrap().push(ctx.id());
            ctx.reply_parts(&[b"OK SUB ", topic]).unwrap();
        } else if let Some(rest) = msg.strip_prefix(b"PUB ") {
            let space = rest.iter().position(|&b| b == b' ').unwrap();
            let (topic, payload) = (&rest[..space], &rest[space + 1..]);
            let subscribers = self.subscribers.lock().unwrap().clone();
            let faulty = self.published.fetch_add(1, Ordering::Relaxed) >= 20;
            let skip = faulty && self.fault == PubSubFault::DropsDeliveries;
            for (i, id) in subscribers.iter().enumerate() {
                if skip && i == 0 {
                    continue;
                }
                let mut m = b"MSG ".to_vec();
                m.extend_from_slice(topic);
                m.push(b' ');
                m.extend_from_slice(payload);
                let _ = ctx.server().send(*id, &m);
            }
            let ack = if faulty && self.fault == PubSubFault::AcksGarbage {
                "OK PUB \u{1}\u{1b}[0m\"\\\n\u{0}\u{7f}é\u{301}".to_string()
            } else {
                format!("OK PUB {}", subscribers.len())
            };
            ctx.reply(ack.as_bytes()).unwrap();
            if faulty && self.fault == PubSubFault::AcksTwice {
                ctx.reply(ack.as_bytes()).unwrap();
            }
        }
    }
}

#[test]
fn a_lost_delivery_fails_a_pubsub_run() {
    let server = start(FaultyPubSub::default(), 2, |c| c);
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--mode", "pubsub", "--conns", "5", "--depth", "2"],
    );
    assert_eq!(code, 1, "a lost delivery must fail the run: {json}");
    assert!(json.contains("deliveries missing"), "{json}");
}

/// An audit finding: acknowledgements were counted without looking at what
/// was in flight, so a duplicated one drove the in-flight count below zero
/// (the run failed, reporting 18,446,744,073,709,551,615 requests never
/// answered). Each message is now checked against its connection's role and
/// what it has outstanding.
#[test]
fn a_duplicated_acknowledgement_fails_a_pubsub_run() {
    let server = start(
        FaultyPubSub {
            fault: PubSubFault::AcksTwice,
            ..FaultyPubSub::default()
        },
        2,
        |c| c,
    );
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--mode", "pubsub", "--conns", "5", "--depth", "1"],
    );
    assert_eq!(
        code, 1,
        "a duplicated acknowledgement must fail the run: {json}"
    );
    assert!(
        json.contains("an acknowledgement with no publication in flight"),
        "{json}"
    );
    assert!(!json.contains("18446744073709551615"), "{json}");
}

/// A finding of the last stop's audit: error samples were escaped with Rust's
/// `Debug` (`\u{1}`, `\0`), which is not JSON, so a peer's control byte in a
/// quoted reply broke the `--json` line for any parser (`ci/bench_report.py`
/// among them). The line must parse, and the sample must say what arrived.
#[test]
fn a_hostile_reply_quoted_in_an_error_keeps_the_json_valid() {
    let server = start(
        FaultyPubSub {
            fault: PubSubFault::AcksGarbage,
            ..FaultyPubSub::default()
        },
        2,
        |c| c,
    );
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--mode", "pubsub", "--conns", "3", "--depth", "1"],
    );
    assert_eq!(
        code, 1,
        "a garbled acknowledgement must fail the run: {json}"
    );
    let parsed: serde_json::Value =
        serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    let samples = parsed["error_samples"].as_array().unwrap();
    assert!(
        samples.iter().any(|s| s
            .as_str()
            .unwrap()
            .contains("reached \u{1}\u{1b}[0m\"\\\n\u{0}\u{7f}é\u{301} subscribers")),
        "{json}"
    );
}

/// An audit's finding: a run in which no connection ever opened exited 0
/// (closed loop counted only failed replies, and there were none). The
/// listener here takes one connection in its backlog and never accepts, so
/// the kernel drops the generator's handshakes.
#[test]
fn a_run_whose_connections_never_open_fails() {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fills the backlog of 0 (Linux queues one more than the backlog).
    let _filler = std::net::TcpStream::connect(addr).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (code, json) = bench(addr, &["--conns", "2"]);
    assert_eq!(code, 1, "a run that opened nothing must fail: {json}");
    assert_eq!(field(&json, "ok"), 0, "{json}");
    assert!(json.contains("0 of 2 connections opened"), "{json}");
}

/// Answers every request twice, in one write.
struct Twice;

impl Handler for Twice {
    type Conn = ();
    fn on_open(&self, _: &mut Ctx<'_>) {}
    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        ctx.reply(msg).unwrap();
        ctx.reply(msg).unwrap();
    }
}

/// An audit's finding: connect mode checked the first reply and closed,
/// dropping the rest of the read unseen, so a server that answered twice
/// passed.
#[test]
fn a_second_answer_fails_a_connect_run() {
    let server = start(Twice, 2, |c| c);
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--mode", "connect", "--conns", "2"],
    );
    assert_eq!(code, 1, "an extra reply must fail the run: {json}");
    assert!(json.contains("beyond its replies"), "{json}");
}

/// An audit's finding: one bad reply counted as several errors (the reply,
/// the close the generator made for it, and each request then left in
/// flight), so the count did not say how many replies failed.
#[test]
fn one_bad_reply_is_one_error() {
    let server = start(Corrupt, 2, |c| c);
    let (code, json) = bench(
        server.local_addr().unwrap(),
        &["--conns", "1", "--depth", "4"],
    );
    assert_eq!(code, 1, "{json}");
    assert_eq!(field(&json, "errors"), 1, "{json}");
}

/// Echoes until `silent_after` from its first connection, then answers
/// nothing: the requests in flight at the run's end stay unanswered.
struct GoesSilent {
    first: std::sync::OnceLock<std::time::Instant>,
    silent_after: std::time::Duration,
    ids: Mutex<Vec<ConnId>>,
}

impl Handler for GoesSilent {
    type Conn = ();
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        self.first.get_or_init(std::time::Instant::now);
        self.ids.lock().unwrap().push(ctx.id());
    }
    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        let first = self.first.get().copied().unwrap();
        if first.elapsed() < self.silent_after {
            ctx.reply(msg).unwrap();
        }
    }
}

/// An audit's finding: a connection the server closed after the window,
/// while the generator waited for its last replies, took its unanswered
/// requests out of the end-of-run count without counting an error (a
/// close while stopping was taken for the generator's own), so a server
/// that drops its last replies and closes passed. Here the server stops
/// answering during the window and closes every connection a second
/// after it ends, while the generator still waits.
#[test]
fn requests_lost_to_a_close_after_the_window_fail_the_run() {
    use std::sync::Arc;
    use std::time::Duration;

    let handler = Arc::new(GoesSilent {
        first: std::sync::OnceLock::new(),
        silent_after: Duration::from_millis(300),
        ids: Mutex::new(Vec::new()),
    });
    let server = start(Arc::clone(&handler), 2, |c| c);
    let handle = server.handle().clone();
    let closer = {
        let handler = Arc::clone(&handler);
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while handler.first.get().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let Some(first) = handler.first.get().copied() else {
                return;
            };
            // The run's window ends 0.6 s after its start (0.1 warm-up, 0.5
            // measured); the generator then waits up to 5 s.
            std::thread::sleep(
                (first + Duration::from_millis(1_600))
                    .saturating_duration_since(std::time::Instant::now()),
            );
            for id in handler.ids.lock().unwrap().iter() {
                handle.close(*id);
            }
        })
    };
    let (code, json) = bench(server.local_addr().unwrap(), &["--conns", "4"]);
    closer.join().unwrap();
    assert_eq!(
        code, 1,
        "requests lost to a close must fail the run: {json}"
    );
    assert!(field(&json, "errors") >= 4, "{json}");
}
