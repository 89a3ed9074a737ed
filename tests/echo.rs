//! Echo over real loopback sockets: the byte-exactness, ordering and
//! isolation promises, under concurrency, pipelining, fragmentation,
//! half-close and hostile input.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Client, frame, start, wait_for_stats, wait_until};
use eserver::apps::Echo;
use eserver::framing::{ByteOrder, Framing, LengthPrefixed};
use eserver::{CloseReason, Ctx, Handler};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// A payload that names its client and sequence number, padded with bytes
/// derived from both, so any misdelivery or corruption is visible.
fn token_payload(client: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + len);
    p.extend_from_slice(&client.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend((0..len).map(|i| (client as usize * 31 + seq as usize * 7 + i) as u8));
    p
}

/// Many clients at once, each pipelining frames written in random cuts:
/// every reply is its own, byte-exact, in order (R, W and C together).
fn concurrent_clients(clients: u32, frames: u32, threads: usize) {
    let server = start(Echo, threads, |c| c);
    let addr = server.local_addr().unwrap();
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(u64::from(client));
                let mut c = Client::connect(addr);
                let mut reader = Client::from_stream(c.stream.try_clone().unwrap());
                let expected: Vec<Vec<u8>> = (0..frames)
                    .map(|seq| token_payload(client, seq, rng.random_range(0..300)))
                    .collect();
                let wire: Vec<u8> = expected.iter().flat_map(|p| frame(p)).collect();
                let writer = std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(u64::from(client) + 1000);
                    let mut at = 0;
                    while at < wire.len() {
                        let n = rng.random_range(1..=4096).min(wire.len() - at);
                        c.send_bytes(&wire[at..at + n]);
                        at += n;
                    }
                    c
                });
                for (seq, want) in expected.iter().enumerate() {
                    let got = reader.recv();
                    assert_eq!(
                        &got, want,
                        "client {client} reply {seq} is not its own byte-exact echo"
                    );
                }
                drop(writer.join().unwrap());
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let stats = server.stop(Duration::from_secs(5));
    assert_eq!(stats.msgs_in, u64::from(clients * frames));
    assert_eq!(stats.accepted, u64::from(clients));
}

#[test]
fn hundred_concurrent_clients_get_their_own_replies_in_order() {
    concurrent_clients(100, 200, 4);
}

#[test]
fn two_hundred_clients_on_two_workers() {
    concurrent_clients(200, 20, 2);
}

#[test]
fn payload_sizes_from_zero_to_64k_are_echoed_exactly() {
    let server = start(Echo, 2, |c| c);
    let mut c = Client::connect(server.local_addr().unwrap());
    let mut rng = StdRng::seed_from_u64(7);
    for len in [
        0usize, 1, 2, 3, 4, 5, 100, 1000, 4095, 4096, 4097, 65535, 65536,
    ] {
        let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        c.send(&payload);
        assert_eq!(c.recv(), payload, "{len}-byte payload");
    }
}

#[test]
fn ten_thousand_frames_in_one_write() {
    let server = start(Echo, 2, |c| c);
    let mut c = Client::connect(server.local_addr().unwrap());
    let wire: Vec<u8> = (0..10_000u32)
        .flat_map(|i| frame(&i.to_le_bytes()))
        .collect();
    let mut reader = Client::from_stream(c.stream.try_clone().unwrap());
    let writer = std::thread::spawn(move || c.send_bytes(&wire));
    for i in 0..10_000u32 {
        assert_eq!(reader.recv(), i.to_le_bytes());
    }
    writer.join().unwrap();
}

/// A turn dispatches at most `frame_budget` frames, however few bytes they
/// take: the rest wait in the read buffer, the connection goes to the back
/// of the line, and every frame is still answered, in order.
#[test]
fn a_turn_dispatches_at_most_the_frame_budget() {
    const FRAMES: u32 = 1000;
    const BUDGET: usize = 16;
    let server = start(Echo, 1, |mut c| {
        c.frame_budget = BUDGET;
        c
    });
    let mut c = Client::connect(server.local_addr().unwrap());
    // 8 KB: one read, far under the 256 KiB byte budget.
    let wire: Vec<u8> = (0..FRAMES).flat_map(|i| frame(&i.to_le_bytes())).collect();
    c.send_bytes(&wire);
    for i in 0..FRAMES {
        assert_eq!(c.recv(), i.to_le_bytes());
    }
    let handle = server.handle();
    let turns_cut = FRAMES as u64 / BUDGET as u64 - 1;
    assert!(
        wait_until(Duration::from_secs(5), || handle.stats().msgs_in
            == u64::from(FRAMES)
            && handle.stats().budget_requeues >= turns_cut),
        "{FRAMES} frames in one read with a budget of {BUDGET} per turn: {} turns cut short, \
         at least {turns_cut} expected",
        handle.stats().budget_requeues
    );
}

#[test]
fn frames_dribbled_one_byte_per_write() {
    let server = start(Echo, 2, |c| c);
    let mut c = Client::connect(server.local_addr().unwrap());
    c.stream.set_nodelay(true).unwrap();
    let payloads: Vec<Vec<u8>> = vec![b"first".to_vec(), vec![], vec![0xab; 300], b"last".to_vec()];
    let wire: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
    for byte in &wire {
        c.stream.write_all(std::slice::from_ref(byte)).unwrap();
        // Give the server a chance to read each byte on its own.
        std::thread::sleep(Duration::from_micros(200));
    }
    for p in &payloads {
        assert_eq!(&c.recv(), p);
    }
}

#[test]
fn half_close_gets_every_reply_then_the_close() {
    let server = start(Echo, 2, |c| c);
    let mut c = Client::connect(server.local_addr().unwrap());
    let payloads: Vec<Vec<u8>> = (0..500u32).map(|i| token_payload(0, i, 2000)).collect();
    let wire: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
    let mut reader = Client::from_stream(c.stream.try_clone().unwrap());
    let writer = std::thread::spawn(move || {
        c.send_bytes(&wire);
        // Half a frame more, then FIN: the incomplete frame gets no reply.
        c.send_bytes(&[9, 0, 0, 0, 1, 2]);
        c.stream.shutdown(Shutdown::Write).unwrap();
        c
    });
    for p in &payloads {
        assert_eq!(&reader.recv(), p);
    }
    reader.expect_closed();
    drop(writer.join().unwrap());
    let handle = server.handle().clone();
    assert!(wait_until(Duration::from_secs(5), || handle
        .stats()
        .closed_for(CloseReason::Eof)
        == 1));
}

#[test]
fn oversized_header_closes_only_that_connection() {
    let server = start(Echo, 2, |c| c);
    let addr = server.local_addr().unwrap();
    let mut good = Client::connect(addr);
    good.send(b"before");
    assert_eq!(good.recv(), b"before");
    let mut bad = Client::connect(addr);
    bad.send_bytes(&[0xff, 0xff, 0xff, 0xff]);
    bad.expect_closed();
    // One byte over a small limit is refused too, while exactly the limit works.
    drop(server);
    let server = start(Echo, 2, |c| {
        c.framing(Framing::Length(LengthPrefixed::new(
            ByteOrder::Little,
            1000,
        )))
    });
    let addr = server.local_addr().unwrap();
    let mut good = Client::connect(addr);
    let mut exact = Client::connect(addr);
    exact.send(&[7; 1000]);
    assert_eq!(exact.recv(), vec![7; 1000]);
    let mut over = Client::connect(addr);
    over.send_bytes(&1001u32.to_le_bytes());
    over.expect_closed();
    good.send(b"after");
    assert_eq!(good.recv(), b"after");
    exact.send(b"still");
    assert_eq!(exact.recv(), b"still");
    let handle = server.handle().clone();
    assert!(wait_until(Duration::from_secs(5), || handle
        .stats()
        .closed_for(CloseReason::BadFrame)
        == 1));
}

/// A pub/sub audit's finding: a bad header closed the connection at once,
/// dropping the replies still queued for the complete frames before it,
/// and the bytes left unread behind it made the close a reset, which cut
/// off those already in the kernel too. As with a half-close or the input
/// budget, every complete frame is now answered, then the connection ends
/// with an end of stream, the bytes after the bad header read and dropped.
#[test]
fn a_bad_header_after_pipelined_frames_closes_after_their_replies() {
    const FRAMES: u32 = 256;
    let server = start(Echo, 2, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    // 16 MiB of replies, far more than the kernel's buffers on loopback
    // take: the client reads none until the server's writes met EAGAIN
    // and replies wait in its queue (the premise, checked below).
    let payloads: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| {
            let mut p = i.to_le_bytes().to_vec();
            p.resize(64 << 10, (i % 251) as u8);
            p
        })
        .collect();
    let mut wire: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
    wire.extend_from_slice(&[0xff; 4]);
    wire.extend(std::iter::repeat_n(0x5a, 256 << 10));
    let mut writer = client.stream.try_clone().unwrap();
    // The bytes after the bad header may meet a reset (the bug): not the
    // writer's to judge.
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&wire);
    });
    wait_for_stats(server.handle(), "the replies to wait", |s| {
        s.epollout_arms > 0
    });
    for (i, p) in payloads.iter().enumerate() {
        match client.recv_within(Duration::from_secs(10)) {
            Ok(Some(reply)) => assert!(&reply == p, "reply {i} altered"),
            other => panic!(
                "reply {i} of {FRAMES} lost ({other:?}): {}",
                server.handle().stats()
            ),
        }
    }
    match client.recv_within(Duration::from_secs(10)) {
        Ok(None) => {}
        other => panic!("expected an end of stream, got {other:?}"),
    }
    sender.join().unwrap();
    wait_for_stats(server.handle(), "the close counted", |s| {
        s.closed_for(CloseReason::BadFrame) == 1 && s.closed_total() == 1
    });
}

/// Replies to each frame with a header frame, then the payload; panics
/// between the two on the payload "boom".
struct Fragile;

impl Handler for Fragile {
    type Conn = ();

    fn on_open(&self, _ctx: &mut Ctx<'_>) {}

    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        ctx.reply(b"header").unwrap();
        assert!(msg != b"boom", "handler bug triggered by a peer");
        ctx.reply(msg).unwrap();
    }
}

/// Waits for the server to count one handler panic.
fn wait_for_one_handler_panic(server: &eserver::Running) {
    wait_for_stats(server.handle(), "a handler panic", |s| {
        s.closed_for(CloseReason::HandlerPanic) == 1
    });
}

#[test]
fn a_handler_panic_closes_only_its_connection() {
    let server = start(Fragile, 2, |c| c);
    let addr = server.local_addr().unwrap();
    let mut victim = Client::connect(addr);
    let mut other = Client::connect(addr);
    victim.send(b"boom");
    victim.expect_closed();
    other.send(b"fine");
    assert_eq!(other.recv(), b"header");
    assert_eq!(other.recv(), b"fine");
    wait_for_one_handler_panic(&server);
}

/// An audit finding: the replies a panicking `on_message` had made before
/// its panic were still written, so the peer got half a response (a
/// header without its body) before the close; a panicking `on_open`'s were
/// already dropped. Now the panicking call's replies are dropped, and the
/// earlier frames' of the same turn still go out.
#[test]
fn a_panicking_call_sends_none_of_its_replies() {
    let server = start(Fragile, 1, |c| c);
    let addr = server.local_addr().unwrap();
    let mut client = Client::connect(addr);
    // One write: both frames are handled in the same turn.
    let mut both = frame(b"fine");
    both.extend_from_slice(&frame(b"boom"));
    client.send_bytes(&both);
    assert_eq!(client.recv(), b"header");
    assert_eq!(client.recv(), b"fine");
    client.expect_closed();
    wait_for_one_handler_panic(&server);
}

/// Replies, flushes, replies again, then panics on "boom".
struct FlushesThenPanics;

impl Handler for FlushesThenPanics {
    type Conn = ();

    fn on_open(&self, _ctx: &mut Ctx<'_>) {}

    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        ctx.reply(b"flushed").unwrap();
        ctx.flush();
        ctx.reply(b"header").unwrap();
        assert!(msg != b"boom", "handler bug triggered by a peer");
        ctx.reply(msg).unwrap();
    }
}

/// `Ctx::flush` writes the replies so far at once; a panic after it drops
/// only what the panicking call replied since (a half response), not the
/// earlier frames' replies nor what was flushed.
#[test]
fn a_flush_sends_the_replies_so_far_and_a_later_panic_only_what_followed() {
    let server = start(FlushesThenPanics, 1, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    let mut both = frame(b"fine");
    both.extend_from_slice(&frame(b"boom"));
    client.send_bytes(&both);
    for want in [&b"flushed"[..], b"header", b"fine", b"flushed"] {
        assert_eq!(client.recv(), want);
    }
    client.expect_closed();
    wait_for_one_handler_panic(&server);
}

/// `Ctx::queue` in its uses. On "queue": replies "announce", queues it,
/// then sends "after" to its own connection through the handle (as another
/// thread would) and replies "header". On "held": replies and queues only.
/// On "boom": replies and queues, replies "half", panics. On "wait":
/// replies, queues, flushes (nothing left in the turn's buffer: the queued
/// reply is what the flush writes), then waits for the test's word before
/// it returns. Anything else: echoed.
struct Queues(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl Handler for Queues {
    type Conn = ();

    fn on_open(&self, _ctx: &mut Ctx<'_>) {}

    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        if !matches!(msg, b"queue" | b"held" | b"boom" | b"wait") {
            ctx.reply(msg).unwrap();
            return;
        }
        ctx.reply(b"announce").unwrap();
        ctx.queue();
        match msg {
            b"queue" => {
                let id = ctx.id();
                ctx.server().send(id, b"after").unwrap();
                ctx.reply(b"header").unwrap();
            }
            b"boom" => {
                ctx.reply(b"half").unwrap();
                panic!("handler bug triggered by a peer");
            }
            b"wait" => {
                ctx.flush();
                let _ = self.0.lock().unwrap().recv_timeout(Duration::from_secs(10));
            }
            _ => {}
        }
    }
}

/// `Ctx::queue` (added so pub/sub can make a subscription visible without
/// holding its lock across a write): a queued reply goes out before
/// anything sent to the connection after it (without the queue, the
/// handle's send reached the kernel first); it is written when the call
/// returns without a flush, and by a flush with nothing else to write; and
/// when the call then panics, it stays, with the earlier frames' replies
/// queued with it, while what the call replied after it (a half
/// response) goes.
#[test]
fn queued_replies_go_ahead_of_later_sends_and_are_written_without_a_flush() {
    let (go, wait) = std::sync::mpsc::channel();
    let server = start(Queues(std::sync::Mutex::new(wait)), 1, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"queue");
    for want in [&b"announce"[..], b"after", b"header"] {
        assert_eq!(client.recv(), want);
    }
    client.send(b"held");
    assert_eq!(client.recv(), b"announce");
    // Written by the flush, while the call still runs.
    client.send(b"wait");
    match client.recv_within(Duration::from_secs(5)) {
        Ok(Some(reply)) => assert_eq!(reply, b"announce"),
        other => panic!("the flush after a queue wrote nothing ({other:?})"),
    }
    go.send(()).unwrap();
    // One read: "fine"'s echo is in the turn's buffer when "boom" queues.
    let mut both = frame(b"fine");
    both.extend_from_slice(&frame(b"boom"));
    client.send_bytes(&both);
    for want in [&b"fine"[..], b"announce"] {
        assert_eq!(client.recv(), want);
    }
    client.expect_closed();
    wait_for_one_handler_panic(&server);
}

/// Greets in `on_open`, moves the greeting along with `Ctx::queue` (or
/// `Ctx::flush`), publishes the connection's id, and waits (bounded) to be
/// told to return; a panic after the publication, if asked.
struct GreetsThenPublishes {
    flush: bool,
    panic: bool,
    published: std::sync::Mutex<std::sync::mpsc::Sender<eserver::ConnId>>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Handler for GreetsThenPublishes {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        ctx.reply(b"hello").unwrap();
        if self.flush {
            ctx.flush();
        } else {
            ctx.queue();
        }
        self.published.lock().unwrap().send(ctx.id()).unwrap();
        let _ = self
            .go
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        ctx.reply(b"late").unwrap();
        if self.panic {
            panic!("handler bug in on_open, after its greeting was queued");
        }
    }

    fn on_message(&self, _conn: &mut (), _ctx: &mut Ctx<'_>, _msg: &[u8]) {}
}

/// From the last note's list: `Ctx::queue` and `Ctx::flush` did nothing in
/// `on_open`, so a greeting was written only when `on_open` returned, and a
/// send from another thread to the id `on_open` had just published reached
/// the peer first. Now a queued greeting goes ahead of that send, a flushed
/// one is on the wire while `on_open` still runs, and a queued one is
/// written when `on_open` returns with no send to write it, also if
/// `on_open` then panics (its later reply is not).
#[test]
fn a_greeting_queued_or_flushed_in_on_open_goes_ahead_of_sends_to_the_published_id() {
    let cases = [
        (false, false, true),
        (true, false, true),
        (false, true, true),
        (false, false, false),
        (false, true, false),
    ];
    for (flush, panic, send) in cases {
        let (published, ids) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel();
        let handler = GreetsThenPublishes {
            flush,
            panic,
            published: std::sync::Mutex::new(published),
            go: std::sync::Mutex::new(wait),
        };
        let server = start(handler, 1, |c| c);
        let mut client = Client::connect(server.local_addr().unwrap());
        let id = ids.recv_timeout(Duration::from_secs(10)).unwrap();
        if flush {
            match client.recv_within(Duration::from_secs(5)) {
                Ok(Some(greeting)) => assert_eq!(greeting, b"hello"),
                other => panic!("the flush in on_open wrote nothing ({other:?})"),
            }
        }
        if send {
            server.handle().send(id, b"news").unwrap();
        }
        go.send(()).unwrap();
        let case = format!("flush {flush}, panic {panic}, send {send}");
        if !flush {
            match client.recv_within(Duration::from_secs(5)) {
                Ok(Some(greeting)) => assert_eq!(greeting, b"hello", "{case}"),
                other => panic!("{case}: no greeting ({other:?})"),
            }
        }
        if panic && !send {
            client.expect_closed();
            wait_for_one_handler_panic(&server);
        } else if panic {
            // The send went behind the queued greeting; the close may cut
            // it (a close now), never put it first.
            match client.recv_within(Duration::from_secs(5)) {
                Ok(Some(next)) => assert_eq!(next, b"news"),
                Ok(None) => {}
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            }
            client.expect_closed();
            wait_for_one_handler_panic(&server);
        } else {
            if send {
                assert_eq!(client.recv(), b"news", "{case}");
            }
            assert_eq!(client.recv(), b"late", "{case}");
        }
    }
}

/// Greets, then panics in `on_open`.
struct PanicsOnOpen;

impl Handler for PanicsOnOpen {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        ctx.reply(b"hello").unwrap();
        panic!("handler bug in on_open");
    }

    fn on_message(&self, _conn: &mut (), _ctx: &mut Ctx<'_>, _msg: &[u8]) {}
}

/// A review finding: a panicking `on_open`'s replies were dropped but
/// still counted in `msgs_out`.
#[test]
fn a_panicking_on_open_sends_and_counts_none_of_its_replies() {
    let server = start(PanicsOnOpen, 1, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    client.expect_closed();
    // Counted in the same merge of the worker's tally as the panic.
    wait_for_one_handler_panic(&server);
    assert_eq!(server.handle().stats().msgs_out, 0);
}

#[test]
fn many_clients_in_parallel_with_one_hostile() {
    let server = start(Echo, 4, |c| c);
    let addr = server.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let hostile = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            // At least one round, however late this thread gets to run.
            let mut closed = 0;
            loop {
                let mut c = Client::connect(addr);
                c.send_bytes(&[0xff, 0xff, 0xff, 0x7f]);
                c.expect_closed();
                closed += 1;
                if stop.load(Ordering::Relaxed) {
                    break closed;
                }
            }
        })
    };
    concurrent_clients_on(addr, 20, 100);
    stop.store(true, Ordering::Relaxed);
    assert!(hostile.join().unwrap() > 0);
}

fn concurrent_clients_on(addr: std::net::SocketAddr, clients: u32, frames: u32) {
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for seq in 0..frames {
                    let p = token_payload(client, seq, 64);
                    c.send(&p);
                    assert_eq!(c.recv(), p);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

/// Echo, except that `QUIT` is answered with `BYE_FRAMES` frames of 64 KiB
/// and a close after flush, and `BYE` with `bye` and a close after flush.
struct Quitter;

const BYE_FRAMES: usize = 64;

impl Handler for Quitter {
    type Conn = ();

    fn on_open(&self, _: &mut Ctx<'_>) {}

    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        if msg == b"QUIT" {
            for i in 0..BYE_FRAMES {
                ctx.reply(&vec![i as u8; 64 << 10]).unwrap();
            }
            ctx.close_after_flush();
        } else if msg == b"BYE" {
            ctx.reply(b"bye").unwrap();
            ctx.close_after_flush();
        } else {
            ctx.reply(msg).unwrap();
        }
    }
}

/// A close after flush with bytes from the peer still unread: Linux answers
/// a close with unread input with a reset, which drops what is still in
/// the server's send buffer. The peer here sends a last frame after `QUIT`
/// (the server no longer reads it) and reads slowly; it must still receive
/// every byte of the goodbye, then the end of stream.
#[test]
fn a_close_after_flush_delivers_everything_though_the_peer_sent_more() {
    let server = start(Quitter, 2, |c| c);
    let mut client = small_window_client(&server);
    client.send(b"QUIT");
    // The server reads QUIT, starts the goodbye and reads no more.
    std::thread::sleep(Duration::from_millis(100));
    client.send(b"one more thing");
    for i in 0..BYE_FRAMES {
        match client.recv_within(Duration::from_secs(10)) {
            Ok(Some(frame)) => assert_eq!(frame, vec![i as u8; 64 << 10], "frame {i}"),
            other => panic!("frame {i} of {BYE_FRAMES} of the goodbye lost: {other:?}"),
        }
    }
    client.expect_closed();
}

/// The same when the goodbye leaves with the turn's own write (nothing
/// left queued, the common case): the peer's bytes behind `BYE` (more than
/// one read of the server's) were left unread, and the close was a reset
/// (a review finding: only a close that waited for the writer was made
/// graceful). The peer must get `bye`, then a clean end of stream.
#[test]
fn a_close_after_flush_with_nothing_left_queued_is_not_a_reset() {
    let server = start(Quitter, 2, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    let mut burst = frame(b"BYE");
    for _ in 0..100 {
        burst.extend_from_slice(&frame(&[b'x'; 1000]));
    }
    client.send_bytes(&burst);
    assert_eq!(client.recv(), b"bye");
    match client.recv_within(Duration::from_secs(10)) {
        Ok(None) => {}
        other => panic!("expected a clean end of stream after bye, got {other:?}"),
    }
}

/// A client with a small receive window (4 KiB) connected to `server`.
fn small_window_client(server: &eserver::Running) -> Client {
    let addr = server.local_addr().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    Client::from_stream(std::net::TcpStream::from(socket))
}

/// Sends `QUIT` and reads the goodbye slowly until the server has written
/// all of it to its kernel and closed the connection (most of it still in
/// the server's send buffer: the client's window is small). Returns the
/// next frame to read.
///
/// Slowly: before each frame the client gives the server time to close.
/// So the server fills its send buffer before every read and closes with
/// much of the goodbye unsent; and the stats, which a worker merges only at
/// the end of an event batch, show the close before the client could have
/// read what was left. (Reading at full speed, a server slower than the
/// client wrote in step with it, closed with nearly nothing unsent, and the
/// client read it all before the close was counted: a CI failure.)
fn quit_and_read_until_closed(server: &eserver::Running, client: &mut Client) -> usize {
    client.send(b"QUIT");
    let mut next = 0;
    let closed = || server.handle().stats().closed_total() > 0;
    while !wait_until(Duration::from_millis(20), closed) {
        let stats = server.handle().stats();
        assert!(next < BYE_FRAMES, "the server never closed: {stats}");
        match client.recv_within(Duration::from_secs(10)) {
            Ok(Some(frame)) => assert_eq!(frame, vec![next as u8; 64 << 10], "frame {next}"),
            other => panic!("frame {next} of the goodbye lost: {other:?}"),
        }
        next += 1;
    }
    assert!(
        next < BYE_FRAMES - 1,
        "the goodbye was all read before the close"
    );
    next
}

/// A client closed after flush (see `quit_and_read_until_closed`) sends a
/// few bytes more and reads on. Returns the server and what became of the
/// rest of the goodbye: all of it and a clean end of stream, or the first
/// thing that went wrong.
fn send_after_the_close(linger: Duration) -> (eserver::Running, Result<(), String>) {
    send_after_the_close_with(|c| c.linger(linger), !linger.is_zero(), &[b"late"])
}

/// [`send_after_the_close`] with the server configured by `configure`
/// (`lingers`: to linger), and the client sending each of `late` (50 ms
/// apart) after the close.
fn send_after_the_close_with(
    configure: impl FnOnce(eserver::Config) -> eserver::Config,
    lingers: bool,
    late: &[&[u8]],
) -> (eserver::Running, Result<(), String>) {
    let server = start(Quitter, 2, configure);
    let mut client = small_window_client(&server);
    let next = quit_and_read_until_closed(&server, &mut client);
    if lingers {
        wait_for_stats(server.handle(), "the socket to linger", |s| {
            s.lingering == 1
        });
    }
    for bytes in late {
        client.send(bytes);
        // Let the late bytes reach the server before going on.
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in next..BYE_FRAMES {
        match client.recv_within(Duration::from_secs(10)) {
            Ok(Some(frame)) => assert_eq!(frame, vec![i as u8; 64 << 10], "frame {i}"),
            other => return (server, Err(format!("frame {i} of {BYE_FRAMES}: {other:?}"))),
        }
    }
    let end = match client.recv_within(Duration::from_secs(10)) {
        Ok(None) => Ok(()),
        other => Err(format!("after the goodbye: {other:?}")),
    };
    (server, end)
}

/// A peer that sends after the server has closed its connection after
/// flush: the lingering close reads and drops its bytes until its FIN. The
/// peer gets every byte of the goodbye, then a clean end of stream, and its
/// own close ends the linger.
#[test]
fn a_peer_that_sends_after_the_close_after_flush_still_gets_every_reply() {
    let (server, outcome) = send_after_the_close(Duration::from_secs(5));
    outcome.unwrap();
    // The client is gone: its FIN ends the linger, none cut short.
    wait_for_stats(server.handle(), "the linger to end", |s| {
        s.lingering == 0 && s.lingers == 1
    });
    let stats = server.handle().stats();
    assert_eq!((stats.lingers, stats.lingers_cut), (1, 0), "{stats}");
}

/// An audit's finding: the bytes a lingering socket may drop were 4 read
/// budgets, so a server tuned for fairness (`read_budget` 1 KiB) lingered
/// for 4 KiB: a peer still uploading when the server said goodbye went
/// past it, the socket was closed, and its next bytes drew the reset the
/// linger exists to prevent. The linger's budget now has a floor of its own
/// (1 MiB).
#[test]
fn a_small_read_budget_does_not_cut_the_linger_short() {
    let (server, outcome) = send_after_the_close_with(
        |mut c| {
            c.read_budget = 1024;
            c.linger(Duration::from_secs(5))
        },
        true,
        &[&[7; 8 << 10], b"more"],
    );
    outcome.unwrap();
    wait_for_stats(server.handle(), "the linger to end", |s| {
        s.lingering == 0 && s.lingers == 1
    });
    let stats = server.handle().stats();
    assert_eq!((stats.lingers, stats.lingers_cut), (1, 0), "{stats}");
}

/// The same without lingering: the late bytes reach a closed socket, Linux
/// answers with a reset, and the reset drops the rest of the goodbye from
/// the server's send buffer. (What the test above guards against; if this
/// one ever passes, the kernel no longer behaves so and the test above
/// proves nothing.)
#[test]
fn without_lingering_a_late_send_costs_the_peer_its_last_replies() {
    let (server, outcome) = send_after_the_close(Duration::ZERO);
    let lost = outcome.expect_err("every reply arrived though the socket did not linger");
    assert!(lost.contains("ConnectionReset"), "{lost}");
    assert_eq!(server.handle().stats().lingers, 0);
}

/// Lingering is bounded in time: a peer that never closes its end (and
/// stops reading, so replies stay unacknowledged) is let go when the linger
/// time runs out.
#[test]
fn a_peer_that_never_closes_is_let_go_after_the_linger_time() {
    let server = start(Quitter, 2, |c| c.linger(Duration::from_millis(200)));
    let mut client = small_window_client(&server);
    quit_and_read_until_closed(&server, &mut client);
    wait_for_stats(server.handle(), "the socket to linger", |s| s.lingers == 1);
    // The client keeps its end open, and reads and says nothing.
    wait_for_stats(server.handle(), "the linger time to run out", |s| {
        s.lingering == 0 && s.lingers_cut == 1
    });
}

/// The shutdown drain lingers only for replies still unacknowledged: a
/// client that read its reply and keeps its idle connection open (without
/// closing on the server's FIN) does not hold the stop to its deadline.
#[test]
fn the_drain_does_not_linger_for_an_idle_peer_with_every_reply_read() {
    let server = start(Quitter, 2, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"ping");
    assert_eq!(client.recv(), b"ping");
    let began = std::time::Instant::now();
    let stats = server.stop(Duration::from_secs(5));
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "the stop waited {:?} for an idle peer",
        began.elapsed()
    );
    assert_eq!((stats.lingers, stats.closed_total()), (0, 1), "{stats}");
    client.expect_closed();
}

/// A linger that began while the server ran (the client read its reply and
/// the end of stream, and keeps its end open) protects nothing once every
/// reply is acknowledged: the shutdown drain lets it go at its first look
/// rather than hold the stop to the drain's deadline. (Without the drain's
/// look, the stop took the whole 10 s and cut the linger.)
#[test]
fn the_drain_lets_go_a_linger_whose_replies_are_all_acknowledged() {
    let server = start(Quitter, 2, |c| c.linger(Duration::from_secs(60)));
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"BYE");
    assert_eq!(client.recv(), b"bye");
    let end = client.recv_within(Duration::from_secs(10));
    assert!(matches!(end, Ok(None)), "the FIN: {end:?}");
    wait_for_stats(server.handle(), "the socket to linger", |s| {
        s.lingering == 1
    });
    let began = std::time::Instant::now();
    let stats = server.stop(Duration::from_secs(10));
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "the stop waited {:?} for a linger that protects nothing",
        began.elapsed()
    );
    assert_eq!((stats.lingers, stats.lingers_cut), (1, 0), "{stats}");
    assert_eq!(stats.lingering, 0, "{stats}");
}

/// Echoes; a `slow` message first keeps its handler busy for 1.5 s.
struct SlowOnCue;

impl Handler for SlowOnCue {
    type Conn = ();

    fn on_open(&self, _: &mut Ctx<'_>) {}

    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        if msg == b"slow" {
            std::thread::sleep(Duration::from_millis(1500));
        }
        ctx.reply(msg).unwrap();
    }
}

/// An audit's finding: the frame clock restarts at the end of the turn
/// that completes a frame, and a frame timer that came due during that
/// turn (a handler taking its time) still saw the old clock and asked for
/// the close, which ended the turn abortively: the reply to the frame the
/// peer had completed in time was dropped. The timer now leaves a
/// connection whose side is held, and looks again shortly. Here the frame
/// starts at 0, completes at 0.3 s, its handler runs to 1.8 s, the timer
/// is due at 1 s and runs at 1.2 s.
#[test]
fn a_frame_completed_in_time_survives_a_slow_handler_past_its_deadline() {
    // Every worker polls: the other worker serves the other client while
    // the handler holds this one (a standby worker could sleep through it).
    let server = start(SlowOnCue, 2, |mut c| {
        c.frame_timeout = Some(Duration::from_secs(1));
        c.idle_wait = eserver::IdleWait::Poll;
        c
    });
    let mut client = Client::connect(server.local_addr().unwrap());
    let mut other = Client::connect(server.local_addr().unwrap());
    let began = std::time::Instant::now();
    let whole = frame(b"slow");
    client.send_bytes(&whole[..5]);
    std::thread::sleep(Duration::from_millis(300));
    client.send_bytes(&whole[5..]);
    // At 1.2 s, past the timer's due time and inside the slow turn: a
    // message from another client, so that the other worker (blocked in
    // epoll_wait, not told of a timer its peer set) wakes and runs the
    // timers now.
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(began.elapsed()));
    other.send(b"ping");
    assert_eq!(other.recv(), b"ping");
    assert!(
        began.elapsed() < Duration::from_millis(1700),
        "the other client's round trip came after the slow turn: {:?}",
        began.elapsed()
    );
    match client.recv_within(Duration::from_secs(10)) {
        Ok(Some(reply)) => assert_eq!(reply, b"slow"),
        other => panic!(
            "the reply was dropped ({other:?}): {}",
            server.handle().stats()
        ),
    }
    client.send(b"still here");
    assert_eq!(client.recv(), b"still here");
    let stats = server.handle().stats();
    assert_eq!(stats.closed_total(), 0, "{stats}");
}

/// The slowloris property itself (an audit found no test held it): a peer
/// that keeps sending bytes of one frame, a byte every 100 ms, without ever
/// completing it, is closed for the frame timeout about a timeout after
/// the frame began. Bytes alone do not restart the clock; only a completed
/// frame does.
#[test]
fn a_trickle_that_never_completes_a_frame_is_closed_at_the_frame_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let server = start(Echo, 2, |mut c| {
        c.frame_timeout = Some(TIMEOUT);
        c
    });
    let mut client = Client::connect(server.local_addr().unwrap());
    let began = std::time::Instant::now();
    client.send_bytes(&100u32.to_le_bytes());
    let closed = |s: &eserver::Stats| s.closed_for(CloseReason::FrameTimeout) == 1;
    let mut sent = 0;
    while !closed(&server.handle().stats()) && began.elapsed() < 5 * TIMEOUT {
        std::thread::sleep(Duration::from_millis(100));
        if sent < 99 && client.stream.write_all(b"x").is_ok() {
            sent += 1;
        }
    }
    let took = began.elapsed();
    let stats = server.handle().stats();
    assert!(closed(&stats), "still open after {took:?}: {stats}");
    assert!(
        took >= TIMEOUT && took < 2 * TIMEOUT + Duration::from_millis(500),
        "closed {took:?} after the frame began (timeout {TIMEOUT:?})"
    );
    assert!(
        stats.bytes_in >= 4 + 5,
        "the trickle never reached the server: {stats}"
    );
    client.expect_closed();
}

/// A zero timeout means "never" for every timeout in `Config`, as it does
/// for `--idle-timeout 0` and the others on the command line: not a close
/// of every connection at its first check.
#[test]
fn zero_timeouts_close_nobody() {
    let server = start(Echo, 2, |mut c| {
        c.idle_timeout = Some(Duration::ZERO);
        c.frame_timeout = Some(Duration::ZERO);
        c.send_timeout = Some(Duration::ZERO);
        c
    });
    let mut client = Client::connect(server.local_addr().unwrap());
    // Half a frame, then a pause: an incomplete frame and no traffic.
    let whole = frame(b"slow but steady");
    let (head, tail) = whole.split_at(5);
    client.send_bytes(head);
    std::thread::sleep(Duration::from_millis(200));
    client.send_bytes(tail);
    assert_eq!(client.recv(), b"slow but steady");
    // Idle with nothing pending.
    std::thread::sleep(Duration::from_millis(200));
    client.send(b"still here");
    assert_eq!(client.recv(), b"still here");
    let stats = server.handle().stats();
    assert_eq!(stats.closed_total(), 0, "{stats}");
}

/// Connection churn against long timeouts: every connection leaves an idle
/// timer and a frame timer behind (it sends half a frame and goes), and
/// each would wait out its hour in the timer heap. The heap drops the
/// closed connections' entries as it grows, so it holds what the open
/// connections need, not what every connection that came and went did.
#[test]
fn connection_churn_does_not_pile_up_timers() {
    const CONNECTIONS: usize = 3_000;
    let server = start(Echo, 2, |mut c| {
        c.idle_timeout = Some(Duration::from_secs(3600));
        c.frame_timeout = Some(Duration::from_secs(3600));
        c
    });
    let addr = server.local_addr().unwrap();
    let half = &frame(b"never finished")[..6];
    for _ in 0..CONNECTIONS {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(half).unwrap();
        // A reset: no linger, no TIME_WAIT on this side.
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    wait_for_stats(server.handle(), "every connection closed", |s| {
        s.closed_total() == CONNECTIONS as u64 && s.open == 0
    });
    let stats = server.handle().stats();
    // The heap is compacted from 1,024 entries (`server::timers`'s floor),
    // to twice what is live then (a few connections here, more if the
    // server lags behind the resets); without that, two entries per
    // connection: 6,000. Half of that leaves room for a lagging server.
    assert!(
        stats.timers <= 3_000,
        "{} timers held: {stats}",
        stats.timers
    );
    assert_eq!(stats.closed_for(CloseReason::IdleTimeout), 0, "{stats}");
    assert_eq!(stats.closed_for(CloseReason::FrameTimeout), 0, "{stats}");
}

/// An audit finding: over lines framing, a line ending `\r\r\n` decoded to
/// a payload ending in `\r`, which the encoder refused, so the echo app
/// closed the peer without an answer. Every line comes back now: `\n` and
/// `\r\n` lines as `\n` lines, a payload ending in `\r` with `\r\n`.
#[test]
fn every_line_comes_back_over_lines_framing() {
    use std::io::{BufRead, BufReader};
    let server = start(Echo, 1, |c| {
        c.framing(Framing::Lines(eserver::framing::Lines::new(64)))
    });
    let addr = server.local_addr().unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    stream
        .write_all(b"plain\ncrlf\r\nends in cr\r\r\n\nlast\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut got = Vec::new();
    for _ in 0..5 {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line).unwrap();
        got.push(line);
    }
    let want: [&[u8]; 5] = [b"plain\n", b"crlf\n", b"ends in cr\r\r\n", b"\n", b"last\n"];
    assert_eq!(got, want);
}

/// An audit's finding (invariant R): Linux stops a read at TCP urgent data
/// (`MSG_OOB`) once it has copied anything, so a read came back short with
/// bytes still queued behind the mark, and the reader, taking a short read
/// for a drained socket, waited for an edge that had already come: the
/// frame behind the mark was never answered. An event with EPOLLPRI now
/// makes the reader read on to EAGAIN. (The urgent byte itself is not in
/// the stream: without SO_OOBINLINE the kernel keeps it aside.)
#[test]
fn urgent_data_does_not_strand_the_bytes_behind_it() {
    let server = start(common::HoldsOnHold(Duration::from_millis(200)), 1, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"hold");
    // While the worker holds: frame A, an urgent byte, frame B.
    std::thread::sleep(Duration::from_millis(50));
    client.send_bytes(&frame(b"before the mark"));
    socket2::SockRef::from(&client.stream)
        .send_out_of_band(b"!")
        .unwrap();
    client.send_bytes(&frame(b"after the mark"));
    assert_eq!(client.recv(), b"hold");
    assert_eq!(client.recv(), b"before the mark");
    assert_eq!(client.recv(), b"after the mark");
}

/// Echo that records what each `on_close` learned: (reason, unread).
#[derive(Default)]
struct RecordsUnread(std::sync::Mutex<Vec<(CloseReason, usize)>>);

impl Handler for RecordsUnread {
    type Conn = ();
    fn on_open(&self, _: &mut Ctx<'_>) {}
    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        let _ = ctx.reply(msg);
    }
    fn on_close(&self, _: (), info: eserver::CloseInfo<'_>) {
        self.0.lock().unwrap().push((info.reason, info.unread));
    }
}

/// An audit's finding: `CloseInfo::unread` promises to count an incomplete
/// frame, but the peer's end of stream and the input budget released the
/// buffer before the close counted it, so both reported 0.
#[test]
fn unread_counts_the_incomplete_frame_a_close_dropped() {
    let handler = Arc::new(RecordsUnread::default());
    let server = start(Arc::clone(&handler), 1, |mut c| {
        c.max_in_total = 64 << 10;
        c
    });
    let addr = server.local_addr().unwrap();

    // End of stream mid-frame: 4 bytes of header, 3 of a 10-byte payload.
    let mut a = Client::connect(addr);
    a.send(b"whole");
    assert_eq!(a.recv(), b"whole");
    a.send_bytes(&[10, 0, 0, 0, b'a', b'b', b'c']);
    std::thread::sleep(Duration::from_millis(50));
    a.stream.shutdown(Shutdown::Write).unwrap();
    a.expect_closed();

    // The input budget refuses a frame past it: whatever of it had arrived
    // and was held is unread (at least the uncharged 16 KiB).
    let mut b = Client::connect(addr);
    let mut big = frame(&vec![7u8; 1 << 20]);
    big.truncate(200 << 10);
    let _ = b.stream.write_all(&big);
    b.expect_closed();

    assert!(
        wait_until(Duration::from_secs(10), || handler.0.lock().unwrap().len()
            == 2),
        "both closes reported: {:?}",
        handler.0.lock().unwrap()
    );
    let closes = handler.0.lock().unwrap().clone();
    assert!(closes.contains(&(CloseReason::Eof, 7)), "{closes:?}");
    let (_, unread) = closes
        .iter()
        .find(|(reason, _)| *reason == CloseReason::InputBudget)
        .unwrap_or_else(|| panic!("no input-budget close: {closes:?}"));
    assert!(
        (16 << 10..=200 << 10).contains(unread),
        "{unread} bytes unread: {closes:?}"
    );
}
