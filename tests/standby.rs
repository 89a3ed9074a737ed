//! Standby ([`IdleWait::Standby`], the default): at a light load one worker
//! waits in `epoll_wait` and the others sleep; when work piles up, a sleeper
//! is woken and serves too; with [`IdleWait::Poll`] nobody stands by. Echo
//! stays byte-exact throughout. (The simulation checks the protocol itself:
//! `tests/sim.rs` draws standby with several thresholds.)
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, frame, start, wait_until};
use eserver::apps::Echo;
use eserver::{IdleWait, Stats};

/// One client, one request at a time, `pause` between them.
fn ping_pong(addr: SocketAddr, rounds: u32, pause: Duration) {
    let mut client = Client::connect(addr);
    for i in 0..rounds {
        client.send(&i.to_le_bytes());
        assert_eq!(client.recv(), i.to_le_bytes());
        std::thread::sleep(pause);
    }
}

/// `clients` clients, each sending `frames` frames in one burst while it
/// reads the replies, checked in order.
fn bursts(addr: SocketAddr, clients: u32, frames: u32) {
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                let mut reader = Client::from_stream(client.stream.try_clone().unwrap());
                let wire: Vec<u8> = (0..frames)
                    .flat_map(|n| frame(&(c * 1_000_000 + n).to_le_bytes()))
                    .collect();
                let writer = std::thread::spawn(move || client.send_bytes(&wire));
                for n in 0..frames {
                    assert_eq!(reader.recv(), (c * 1_000_000 + n).to_le_bytes());
                }
                writer.join().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn standby_counts(stats: &Stats) -> (u64, u64) {
    (stats.standbys, stats.standby_wakes)
}

#[test]
fn at_a_light_load_the_other_workers_stand_by() {
    let server = start(Echo, 3, |c| c);
    // A millisecond between requests: every wait sleeps longer than the
    // default busy threshold (200 µs).
    ping_pong(server.local_addr().unwrap(), 100, Duration::from_millis(1));
    let stats = server.handle().stats();
    assert!(
        stats.standbys > 0,
        "one request at a time, yet no worker stood by: {:?}",
        standby_counts(&stats)
    );
}

#[test]
fn when_work_piles_up_a_standing_worker_is_woken() {
    let server = start(Echo, 2, |c| c);
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();
    // Quiet first, so a worker stands by; then bursts until one is woken
    // (each burst leaves events waiting; a few tries absorb a scheduler
    // that happens to run the poller late every time).
    ping_pong(addr, 20, Duration::from_millis(1));
    for _ in 0..5 {
        bursts(addr, 8, 2_000);
        // A wake is counted when the woken worker's batch ends: wait for
        // the count a moment, not a single look.
        if wait_until(Duration::from_millis(100), || {
            handle.stats().standby_wakes > 0
        }) {
            break;
        }
    }
    let stats = handle.stats();
    assert!(
        stats.standby_wakes > 0,
        "bursts from 8 clients never woke a standing worker: {:?}",
        standby_counts(&stats)
    );
}

#[test]
fn with_idle_wait_poll_no_worker_stands_by() {
    let server = start(Echo, 3, |mut c| {
        c.idle_wait = IdleWait::Poll;
        c
    });
    let addr = server.local_addr().unwrap();
    ping_pong(addr, 100, Duration::from_millis(1));
    bursts(addr, 8, 2_000);
    let handle = server.handle();
    // Counters are merged after each batch, a moment after its replies.
    assert!(wait_until(Duration::from_secs(5), || handle
        .stats()
        .msgs_in
        == 100 + 8 * 2_000));
    assert_eq!(standby_counts(&handle.stats()), (0, 0));
}

/// Regression: a worker that parks (`set_active_workers`) leaves
/// `epoll_wait` without coming back to stand by or poll, so it must wake the
/// standing workers first. Before the fix, a worker could announce itself
/// just after `set_active`'s wake-up looked for sleepers, see the worker
/// about to park still polling, and sleep; the parker, not busy, woke
/// nobody; then nobody polled until a timer (with none set: never). Each
/// round parks the second worker at a different moment of the first one's
/// turn, then needs a reply that only a poller can give.
#[test]
fn parking_a_worker_never_leaves_the_others_asleep() {
    let server = start(Echo, 2, |mut c| {
        // Never busy: a worker that polled once stands by whenever it can.
        c.idle_wait = IdleWait::Standby {
            busy_below: Duration::ZERO,
        };
        c
    });
    let handle = server.handle().clone();
    let mut client = Client::connect(server.local_addr().unwrap());
    for round in 0..3_000u32 {
        client.send(&round.to_le_bytes());
        let at = std::time::Instant::now();
        while at.elapsed() < Duration::from_micros(u64::from(round % 60)) {
            std::hint::spin_loop();
        }
        handle.set_active_workers(1);
        assert_eq!(client.recv(), round.to_le_bytes());
        client.send(b"after");
        match client.recv_within(Duration::from_secs(2)) {
            Ok(Some(reply)) => assert_eq!(reply, b"after"),
            other => panic!(
                "round {round}: no reply with one worker active ({other:?}); \
                 workers {:?}, standbys {:?}",
                handle.workers(),
                standby_counts(&handle.stats())
            ),
        }
        handle.set_active_workers(2);
    }
    // The premise: workers did stand by (the race is between a parking
    // worker and one standing by).
    let stats = handle.stats();
    assert!(stats.standbys > 0, "{stats}");
}

/// An audit's finding: at a light load the only poller could take one
/// event and then run a long turn (a slow handler) while the other workers
/// slept in standby with no timeout, so every other connection's events
/// waited in the ready list for the whole turn: with two workers, one slow
/// request stalled every client. A standing worker now sleeps at most
/// `STANDBY_RECHECK` (10 ms) before it looks again, and polls if nobody
/// does.
#[test]
fn a_slow_turn_on_the_only_poller_does_not_stall_the_other_connections() {
    let hold = Duration::from_secs(2);
    let server = start(common::HoldsOnHold(hold), 2, |c| c);
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();
    let mut slow = Client::connect(addr);
    let mut other = Client::connect(addr);
    // Quiet, one request at a time: one worker polls, the other stands by.
    ping_pong(addr, 20, Duration::from_millis(1));
    assert!(
        wait_until(Duration::from_secs(5), || handle.stats().standbys > 0),
        "no worker stood by: {:?}",
        standby_counts(&handle.stats())
    );
    std::thread::sleep(Duration::from_millis(50));
    slow.send(b"hold");
    std::thread::sleep(Duration::from_millis(100));
    let at = std::time::Instant::now();
    other.send(b"quick");
    assert_eq!(other.recv(), b"quick");
    let waited = at.elapsed();
    assert!(
        waited < hold / 2,
        "a reply waited {waited:?} behind another connection's slow turn: {:?}",
        standby_counts(&handle.stats())
    );
    assert_eq!(slow.recv(), b"hold");
}
