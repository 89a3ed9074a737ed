//! The pub/sub application on real sockets: fan-out across connections,
//! with subscribers leaving and new clients taking their slots.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Client, start};
use eserver::apps::PubSub;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn command(client: &mut Client, cmd: &[u8]) -> Vec<u8> {
    client.send(cmd);
    client.recv()
}

#[test]
fn subscribe_publish_unsubscribe() {
    let server = start(PubSub::default(), 2, |c| c);
    let addr = server.local_addr().unwrap();
    let mut sub = Client::connect(addr);
    let mut publisher = Client::connect(addr);
    assert_eq!(command(&mut sub, b"SUB news"), b"OK SUB news");
    assert_eq!(
        command(&mut publisher, b"PUB news hello \x00 world"),
        b"OK PUB 1"
    );
    assert_eq!(sub.recv(), b"MSG news hello \x00 world");
    assert_eq!(command(&mut publisher, b"PUB sports goal"), b"OK PUB 0");
    assert_eq!(command(&mut sub, b"UNSUB news"), b"OK UNSUB news");
    assert_eq!(command(&mut publisher, b"PUB news again"), b"OK PUB 0");
    sub.expect_silence(Duration::from_millis(100));
    assert!(command(&mut sub, b"DANCE").starts_with(b"ERR "));
    assert!(command(&mut sub, b"SUB").starts_with(b"ERR "));
    assert_eq!(
        command(&mut sub, b"SUB x"),
        b"OK SUB x",
        "still open after errors"
    );
}

/// A connection that subscribes and publishes to the same topic in one
/// read gets its replies and its own message in the order of its
/// commands. Sent through the handle, the message went to the kernel at
/// once, ahead of the turn's `OK SUB` still waiting in its output.
#[test]
fn a_publisher_subscribed_to_its_topic_gets_its_message_in_order() {
    let server = start(PubSub::default(), 2, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    let mut bytes = common::frame(b"SUB echo");
    bytes.extend_from_slice(&common::frame(b"PUB echo hi"));
    bytes.extend_from_slice(&common::frame(b"UNSUB echo"));
    client.send_bytes(&bytes);
    assert_eq!(client.recv(), b"OK SUB echo");
    assert_eq!(client.recv(), b"MSG echo hi");
    assert_eq!(client.recv(), b"OK PUB 1");
    assert_eq!(client.recv(), b"OK UNSUB echo");
}

/// A review finding: subscriptions were bounded per connection only, so
/// every connection the pool allows could hold half a megabyte of topics.
/// The server-wide bound refuses a `SUB` past it, and what `UNSUB` and a
/// close give back can be taken again.
#[test]
fn subscriptions_are_bounded_server_wide() {
    let server = start(PubSub::with_max_subscriptions(2), 2, |c| c);
    let addr = server.local_addr().unwrap();
    let mut a = Client::connect(addr);
    let mut b = Client::connect(addr);
    assert_eq!(command(&mut a, b"SUB one"), b"OK SUB one");
    assert_eq!(command(&mut a, b"SUB one"), b"OK SUB one", "held already");
    assert_eq!(command(&mut b, b"SUB one"), b"OK SUB one");
    assert_eq!(
        command(&mut b, b"SUB two"),
        b"ERR too many subscriptions on the server"
    );
    assert_eq!(command(&mut b, b"UNSUB one"), b"OK UNSUB one");
    assert_eq!(command(&mut b, b"UNSUB one"), b"OK UNSUB one", "not held");
    assert_eq!(command(&mut b, b"SUB two"), b"OK SUB two");
    assert!(command(&mut b, b"SUB three").starts_with(b"ERR "));
    // A close gives its subscriptions back.
    a.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || {
        command(&mut b, b"SUB three") == b"OK SUB three"
    }));
    let mut publisher = Client::connect(addr);
    assert_eq!(command(&mut publisher, b"PUB one x"), b"OK PUB 0");
    assert_eq!(command(&mut publisher, b"PUB three x"), b"OK PUB 1");
}

/// A connection holds at most `MAX_SUBSCRIPTIONS`: the next `SUB` of a
/// new topic is refused with an `ERR` that names the limit (an audit found
/// it named none, and no test reached it); a topic already held is still
/// `OK`, and an `UNSUB` makes room for another.
#[test]
fn subscriptions_are_bounded_per_connection() {
    use eserver::apps::pubsub::MAX_SUBSCRIPTIONS;
    let server = start(PubSub::default(), 2, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    let topic = |i: usize| format!("t{i}").into_bytes();
    let sub = |i: usize| [b"SUB ".as_slice(), &topic(i)].concat();
    // Pipelined: one write, then the replies in order.
    let wire: Vec<u8> = (0..=MAX_SUBSCRIPTIONS)
        .flat_map(|i| common::frame(&sub(i)))
        .collect();
    client.send_bytes(&wire);
    for i in 0..MAX_SUBSCRIPTIONS {
        assert_eq!(client.recv(), [b"OK ".as_slice(), &sub(i)].concat());
    }
    assert_eq!(
        client.recv(),
        format!("ERR too many subscriptions on this connection (at most {MAX_SUBSCRIPTIONS})")
            .into_bytes()
    );
    assert_eq!(
        command(&mut client, &sub(7)),
        [b"OK ".as_slice(), &sub(7)].concat()
    );
    assert_eq!(command(&mut client, b"UNSUB t7"), b"OK UNSUB t7");
    let last = sub(MAX_SUBSCRIPTIONS);
    assert_eq!(
        command(&mut client, &last),
        [b"OK ".as_slice(), &last].concat()
    );
    let mut publisher = Client::connect(server.local_addr().unwrap());
    assert_eq!(command(&mut publisher, b"PUB t7 x"), b"OK PUB 0");
}

/// Counts the log lines of refused `SUB`s from a server whose cap is 1
/// (this binary's logger).
static SUB_REFUSED_LINES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct CountingLogger;

impl log::Log for CountingLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        // This test's server only (its cap is 1): another test's server
        // logs its own refusals, into the same logger.
        let line = format!("{}", record.args());
        if line.contains("SUB refused") && line.contains("most subscriptions, 1 (") {
            SUB_REFUSED_LINES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn flush(&self) {}
}

/// An audit finding: every `SUB` refused for the server-wide cap logged a
/// warning, so once the cap was reached one peer could write log lines as
/// fast as it sent 10-byte frames (and a stalled stderr would then block
/// every worker). They are logged on the 1st, 2nd, 4th, 8th... refusal.
#[test]
fn refused_subscriptions_cannot_flood_the_log() {
    if log::set_logger(&CountingLogger).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let server = start(PubSub::with_max_subscriptions(1), 2, |c| c);
    let addr = server.local_addr().unwrap();
    let mut holder = Client::connect(addr);
    assert_eq!(command(&mut holder, b"SUB held"), b"OK SUB held");
    let mut spammer = Client::connect(addr);
    for _ in 0..1000 {
        assert_eq!(
            command(&mut spammer, b"SUB more"),
            b"ERR too many subscriptions on the server"
        );
    }
    let lines = SUB_REFUSED_LINES.load(std::sync::atomic::Ordering::SeqCst);
    // 1, 2, 4, ..., 512: 10 lines for 1,000 refusals.
    assert!(
        (1..=10).contains(&lines),
        "{lines} log lines for 1,000 refused SUBs"
    );
}

/// Parses "MSG <topic> p<publisher>:<seq>:..." into (topic, publisher, seq).
fn parse_msg(msg: &[u8]) -> (String, u32, u32) {
    let text = String::from_utf8_lossy(msg).into_owned();
    let mut words = text.splitn(3, ' ');
    assert_eq!(words.next(), Some("MSG"), "not a publication: {text:?}");
    let topic = words.next().unwrap().to_string();
    let body = words.next().unwrap();
    let mut parts = body.splitn(3, ':');
    let publisher = parts.next().unwrap()[1..].parse().unwrap();
    let seq = parts.next().unwrap().parse().unwrap();
    let padding = parts.next().unwrap();
    assert!(
        padding.bytes().all(|b| b == b'.'),
        "a torn or mixed message: {text:?}"
    );
    assert_eq!(
        padding.len(),
        (seq as usize * 7) % 200,
        "a truncated message: {text:?}"
    );
    (topic, publisher, seq)
}

#[test]
fn fan_out_with_churn_never_crosses_wires() {
    const PUBLISHERS: u32 = 4;
    const EACH: u32 = 400;
    const TOPICS: usize = 4;
    let server = start(PubSub::default(), 4, |c| c.max_conns(64));
    let addr = server.local_addr().unwrap();

    // A subscriber: subscribes, reads, checks every message, leaves after
    // `lifetime` messages (or at the end); returns what it saw.
    let subscriber = move |seed: u64, lifetime: Option<usize>| {
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut c = Client::connect(addr);
            let topics: BTreeSet<String> = (0..TOPICS)
                .filter(|_| rng.random_bool(0.6))
                .map(|t| format!("t{t}"))
                .collect();
            for t in &topics {
                assert_eq!(
                    command(&mut c, format!("SUB {t}").as_bytes()),
                    format!("OK SUB {t}").as_bytes()
                );
            }
            let mut last: BTreeMap<u32, u32> = BTreeMap::new();
            let mut seen = 0usize;
            // The first message may take a while (the publishers start
            // after everyone subscribed, on a machine maybe busy); after
            // that, 800 ms without one means the publishers are done.
            let mut wait = if topics.is_empty() {
                Duration::from_millis(800)
            } else {
                Duration::from_secs(10)
            };
            while let Ok(Some(msg)) = c.recv_within(wait) {
                wait = Duration::from_millis(800);
                let (topic, publisher, seq) = parse_msg(&msg);
                assert!(
                    topics.contains(&topic),
                    "got {topic} without subscribing (subscribed to {topics:?})"
                );
                if let Some(prev) = last.insert(publisher, seq) {
                    assert!(seq > prev, "publisher {publisher}: {seq} after {prev}");
                }
                seen += 1;
                if lifetime == Some(seen) {
                    break;
                }
            }
            seen
        })
    };
    // Long-lived subscribers, and short-lived ones replaced by newcomers
    // that take their slots.
    let mut handles: Vec<_> = (0..12u64).map(|s| subscriber(s, None)).collect();
    for s in 100..124u64 {
        handles.push(subscriber(s, Some(20 + s as usize % 30)));
    }
    std::thread::sleep(Duration::from_millis(200));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut rng = StdRng::seed_from_u64(1000 + u64::from(p));
                let mut newcomers = Vec::new();
                for seq in 0..EACH {
                    let topic = rng.random_range(0..TOPICS);
                    let padding = ".".repeat((seq as usize * 7) % 200);
                    let cmd = format!("PUB t{topic} p{p}:{seq}:{padding}");
                    let reply = command(&mut c, cmd.as_bytes());
                    assert!(
                        reply.starts_with(b"OK PUB "),
                        "{}",
                        String::from_utf8_lossy(&reply)
                    );
                    if seq % 50 == 0 {
                        // Newcomers arrive while messages fly. (Joined: a
                        // detached thread's failed assertion went unseen.)
                        newcomers.push(std::thread::spawn(move || {
                            let mut late = Client::connect(addr);
                            assert_eq!(command(&mut late, b"SUB t0"), b"OK SUB t0");
                            while let Ok(Some(msg)) = late.recv_within(Duration::from_millis(300)) {
                                assert_eq!(
                                    parse_msg(&msg).0,
                                    "t0",
                                    "a newcomer got a message for another topic"
                                );
                            }
                        }));
                    }
                }
                for newcomer in newcomers {
                    newcomer.join().unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    let seen: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(seen > 1000, "only {seen} messages delivered in all");
}

/// Publishes 2,000 bytes to `t` on a server whose `max_out` is 1,024, and
/// expects the refusal that names the limit.
fn publish_too_large(client: &mut Client) {
    let mut big = b"PUB t ".to_vec();
    big.extend_from_slice(&[b'x'; 2000]);
    let answer = command(client, &big);
    assert!(
        answer.starts_with(b"ERR ") && String::from_utf8_lossy(&answer).contains("1024"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// One publication too large for any subscriber's output limit is refused
/// to its publisher; the subscribers, whose queues were empty, stay
/// subscribed and get the next one.
#[test]
fn an_oversized_publication_is_refused_and_takes_no_subscriber_down() {
    let server = start(PubSub::default(), 2, |c| c.max_out(1024));
    let addr = server.local_addr().unwrap();
    let mut sub = Client::connect(addr);
    let mut publisher = Client::connect(addr);
    assert_eq!(command(&mut sub, b"SUB t"), b"OK SUB t");
    publish_too_large(&mut publisher);
    assert_eq!(command(&mut publisher, b"PUB t small"), b"OK PUB 1");
    assert_eq!(sub.recv(), b"MSG t small");
    assert_eq!(server.handle().stats().closed_total(), 0);
}

/// The same for a publisher that is its own topic's only subscriber: its
/// copy goes as a reply, which nothing refuses, so the publication is
/// checked against the output limit before any delivery.
#[test]
fn an_oversized_publication_is_refused_to_a_publisher_subscribed_to_it() {
    let server = start(PubSub::default(), 2, |c| c.max_out(1024));
    let mut client = Client::connect(server.local_addr().unwrap());
    assert_eq!(command(&mut client, b"SUB t"), b"OK SUB t");
    publish_too_large(&mut client);
    assert_eq!(command(&mut client, b"PUB t small"), b"MSG t small");
    assert_eq!(client.recv(), b"OK PUB 1");
}

/// An audit finding: one `PUB` counted as one frame against its read
/// turn's frame budget however many subscribers it reached, so a publisher
/// on a wide topic could hold its worker for the budget's frames times the
/// topic's subscribers (a send each) before others were served. A
/// publication now spends a frame per delivery: with a budget of 4 frames,
/// the first of two publications to 8 subscribers ends the turn, and the
/// second is dispatched in the next.
#[test]
fn a_wide_publication_spends_the_turns_frame_budget() {
    let server = start(PubSub::default(), 1, |c| eserver::Config {
        frame_budget: 4,
        ..c
    });
    let addr = server.local_addr().unwrap();
    let mut subscribers: Vec<Client> = (0..8).map(|_| Client::connect(addr)).collect();
    for s in &mut subscribers {
        assert_eq!(command(s, b"SUB wide"), b"OK SUB wide");
    }
    let handle = server.handle().clone();
    let before = handle.stats().budget_requeues;
    let mut publisher = Client::connect(addr);
    let mut both = common::frame(b"PUB wide one");
    both.extend_from_slice(&common::frame(b"PUB wide two"));
    publisher.send_bytes(&both);
    assert_eq!(publisher.recv(), b"OK PUB 8");
    assert_eq!(publisher.recv(), b"OK PUB 8");
    for s in &mut subscribers {
        assert_eq!(s.recv(), b"MSG wide one");
        assert_eq!(s.recv(), b"MSG wide two");
    }
    // The workers' tallies reach the stats between their batches.
    assert!(
        common::wait_until(Duration::from_secs(5), || handle.stats().budget_requeues
            > before),
        "the first publication did not end its turn"
    );
}

/// An audit's finding: a `SUB`'s `OK` waited in its read turn's output
/// while the subscription was already visible, so a publisher on another
/// worker sent the subscriber a `MSG` (straight to the kernel) before the
/// `OK SUB` that announced it. Each subscriber here makes its turn long
/// (the `SUB`, then 200 publications to a topic nobody reads) while one
/// publisher publishes without pause; each must see its `OK SUB` first.
#[test]
fn a_subscription_is_announced_before_its_first_message() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = start(PubSub::default(), 2, |c| c);
    let addr = server.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The publisher: batches of publications, its acknowledgements drained.
    let publisher = std::net::TcpStream::connect(addr).unwrap();
    // Bounded: a server that stops reading the publisher fails the test
    // (the write times out) rather than hanging it.
    publisher
        .set_write_timeout(Some(common::IO_TIMEOUT))
        .unwrap();
    publisher
        .set_read_timeout(Some(common::IO_TIMEOUT))
        .unwrap();
    let mut drain = publisher.try_clone().unwrap();
    let drainer = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
    });
    let pushing = {
        let stop = Arc::clone(&stop);
        let mut publisher = publisher.try_clone().unwrap();
        std::thread::spawn(move || {
            let batch: Vec<u8> = (0..100).flat_map(|_| common::frame(b"PUB t m")).collect();
            let mut batches = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = publisher.write_all(&batch) {
                    return Err(format!("after {batches} batches: {e}"));
                }
                batches += 1;
            }
            Ok(batches)
        })
    };
    let mut long_turn = common::frame(b"SUB t");
    for _ in 0..200 {
        long_turn.extend_from_slice(&common::frame(b"PUB nobody ."));
    }
    let mut first = Vec::new();
    let mut subscriber = None;
    for _ in 0..20 {
        let mut s = Client::connect(addr);
        s.send_bytes(&long_turn);
        first.push(s.recv());
        subscriber = Some(s);
    }
    // The race was run: publications reached a subscriber (among its own
    // 200 `OK PUB` replies).
    let mut last = subscriber.unwrap();
    let mut heard = false;
    for _ in 0..10_000 {
        match last.recv_within(Duration::from_secs(5)) {
            Ok(Some(frame)) if frame == b"MSG t m" => {
                heard = true;
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("the last subscriber's stream ended: {other:?}"),
        }
    }
    assert!(heard, "no publication reached the last subscriber");
    stop.store(true, Ordering::Relaxed);
    let pushed = pushing.join().unwrap();
    assert!(
        matches!(pushed, Ok(n) if n > 0),
        "the publisher: {pushed:?}"
    );
    publisher.shutdown(std::net::Shutdown::Both).unwrap();
    drainer.join().unwrap();
    let early = first.iter().filter(|f| f.as_slice() != b"OK SUB t").count();
    assert_eq!(
        early,
        0,
        "{early} of 20 subscribers got something before their OK SUB: {:?}",
        first
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect::<Vec<_>>()
    );
}

/// An audit's finding: a reply longer than the framing's `max_frame` was
/// dropped without a word (`OK SUB` and a topic are longer than the `SUB`
/// that asked), so the subscription took effect and the client waited for
/// an answer that never came. Now the connection closes after the replies
/// before it, and the subscription is not taken.
#[test]
fn a_reply_the_framing_refuses_closes_the_connection_and_subscribes_nothing() {
    use eserver::framing::{ByteOrder, LengthPrefixed};
    use std::sync::Arc;
    let pubsub = Arc::new(PubSub::default());
    let at_close = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = CountsAtClose {
        inner: Arc::clone(&pubsub),
        topic: b"abcdefghijkl",
        seen: Arc::clone(&at_close),
    };
    let server = start(handler, 2, |c| {
        c.framing(eserver::Framing::Length(LengthPrefixed::new(
            ByteOrder::Little,
            16,
        )))
    });
    let mut client = Client::connect(server.local_addr().unwrap());
    let mut both = common::frame(b"SUB a");
    both.extend_from_slice(&common::frame(b"SUB abcdefghijkl"));
    client.send_bytes(&both);
    assert_eq!(client.recv(), b"OK SUB a");
    client.expect_closed();
    assert!(common::wait_until(Duration::from_secs(5), || {
        pubsub.subscriptions() == 0
    }));
    // Not taken in the first place: none when the close began (`on_close`
    // removes whatever the connection had, so the count after it proves
    // nothing).
    assert_eq!(*at_close.lock().unwrap(), [0]);
}

/// Pub/sub, recording how many subscribers `topic` has when each
/// connection's `on_close` begins.
struct CountsAtClose {
    inner: std::sync::Arc<PubSub>,
    topic: &'static [u8],
    seen: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl eserver::Handler for CountsAtClose {
    type Conn = <PubSub as eserver::Handler>::Conn;

    fn on_open(&self, ctx: &mut eserver::Ctx<'_>) -> Self::Conn {
        self.inner.on_open(ctx)
    }

    fn on_message(&self, conn: &mut Self::Conn, ctx: &mut eserver::Ctx<'_>, msg: &[u8]) {
        self.inner.on_message(conn, ctx, msg);
    }

    fn on_close(&self, conn: Self::Conn, info: eserver::CloseInfo<'_>) {
        let count = self.inner.subscribers(self.topic);
        self.seen.lock().unwrap().push(count);
        self.inner.on_close(conn, info);
    }
}

/// Found by a flaky run of `subscriptions_are_bounded_server_wide`: the
/// `OK SUB` was flushed before the subscription became visible, so a
/// publication sent after the subscriber had its `OK` could miss it (`OK
/// PUB 0`). The `OK` is now queued (`Ctx::queue`), the subscription made
/// visible, and only then the `OK` written: a publisher sees the
/// subscription before the subscriber can have its `OK`, and its message
/// queues behind the `OK`. Here the subscriber's worker is held (a call
/// hook after the `send` that writes the `OK`) while the publisher
/// publishes.
#[test]
fn a_subscriber_that_has_its_ok_gets_the_next_publication() {
    use std::sync::atomic::Ordering;

    let (sys, armed) = common::holds_once("send", Duration::from_millis(300), 16);
    let mut config = eserver::Config::default()
        .listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())
        .threads(2);
    config.idle_wait = eserver::IdleWait::Poll;
    let server = eserver::Server::with_sys(sys, config, PubSub::default())
        .unwrap()
        .start()
        .unwrap();
    let addr = server.local_addr().unwrap();
    let mut sub = Client::connect(addr);
    let mut publisher = Client::connect(addr);
    assert_eq!(command(&mut publisher, b"PUB news early"), b"OK PUB 0");
    armed.store(true, Ordering::SeqCst);
    assert_eq!(command(&mut sub, b"SUB news"), b"OK SUB news");
    assert_eq!(command(&mut publisher, b"PUB news hello"), b"OK PUB 1");
    assert_eq!(sub.recv(), b"MSG news hello");
    // Looked at last: the `OK` reaches the client a moment before the
    // hook that follows its `send` begins.
    assert!(!armed.load(Ordering::SeqCst), "the hook never ran");
}
