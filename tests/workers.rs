//! Runtime worker control (the original EServer's `es_syncworkers`): park
//! workers down to none, resume, run code while all are parked; nothing is
//! lost.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, frame, start, wait_until};
use eserver::apps::Echo;
use eserver::{Config, Ctx, Handler, Server};

#[test]
fn pausing_under_load_keeps_connections_and_loses_nothing() {
    let server = start(Echo, 3, |c| c);
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();
    let mut clients: Vec<Client> = (0..8).map(|_| Client::connect(addr)).collect();
    // Load before the pause.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&(i as u32).to_le_bytes());
        assert_eq!(c.recv(), (i as u32).to_le_bytes());
    }
    handle.set_active_workers(0);
    assert!(
        wait_until(Duration::from_secs(5), || handle.workers().2 == 3),
        "{:?}",
        handle.workers()
    );
    // Requests sent while paused wait in the kernel: no reply, no close.
    for (i, c) in clients.iter_mut().enumerate() {
        let burst: Vec<u8> = (0..500u32)
            .flat_map(|n| frame(&(i as u32 * 1000 + n).to_le_bytes()))
            .collect();
        c.send_bytes(&burst);
    }
    for c in &mut clients {
        c.expect_silence(Duration::from_millis(50));
    }
    // One worker back, then all: every reply arrives, in order.
    handle.set_active_workers(1);
    assert!(wait_until(Duration::from_secs(5), || handle.workers().2 == 2));
    handle.set_active_workers(3);
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..500u32 {
            assert_eq!(c.recv(), (i as u32 * 1000 + n).to_le_bytes());
        }
    }
    assert_eq!(handle.stats().open, 8);
}

/// A count set before `start` holds: a server can start paused. (It used
/// to be overwritten with every worker when the workers started.)
#[test]
fn a_count_set_before_start_holds() {
    let config = Config::default()
        .listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())
        .threads(2);
    let server = Server::bind(config, Echo).unwrap();
    let handle = server.handle();
    handle.set_active_workers(0);
    let server = server.start().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || handle.workers() == (2, 0, 2)),
        "{:?}",
        handle.workers()
    );
    // Connections wait in the backlog, requests in the kernel.
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"held");
    client.expect_silence(Duration::from_millis(100));
    handle.set_active_workers(1);
    assert_eq!(client.recv(), b"held");
    assert_eq!(handle.workers().1, 1);
}

/// A review finding: a count set before `start` was clamped to the workers
/// started so far (none), so `set_active_workers(1)` before `start` left
/// every worker parked, and so did `with_workers_parked` before `start`
/// (its restore of "all" became 0). The count is clamped to the configured
/// workers now.
#[test]
fn a_nonzero_count_or_a_parked_closure_before_start_holds() {
    for how in ["set_active_workers(1)", "with_workers_parked"] {
        let config = Config::default()
            .listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())
            .threads(2);
        let server = Server::bind(config, Echo).unwrap();
        let handle = server.handle();
        let want = if how == "with_workers_parked" {
            handle.with_workers_parked(|| ()).unwrap();
            (2, 2, 0)
        } else {
            handle.set_active_workers(1);
            (2, 1, 1)
        };
        let server = server.start().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || handle.workers() == want),
            "{how}: {:?}, expected {want:?}",
            handle.workers()
        );
        let mut client = Client::connect(server.local_addr().unwrap());
        client.send(b"served");
        assert_eq!(
            client.recv_within(Duration::from_secs(5)).unwrap(),
            Some(b"served".to_vec()),
            "{how}"
        );
    }
}

#[test]
fn code_runs_while_every_worker_is_parked() {
    let server = start(Echo, 2, |c| c);
    let handle = server.handle().clone();
    let mut client = Client::connect(server.local_addr().unwrap());
    let parked = handle.with_workers_parked(|| handle.workers()).unwrap();
    assert_eq!(
        parked,
        (2, 0, 2),
        "(started, active, parked) while the closure ran"
    );
    client.send(b"after");
    assert_eq!(client.recv(), b"after", "workers resumed");
    assert_eq!(handle.workers().1, 2);
}

/// Tries to park every worker from inside a handler.
struct ParksFromHandler;

impl Handler for ParksFromHandler {
    type Conn = ();

    fn on_open(&self, _ctx: &mut Ctx<'_>) {}

    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, _msg: &[u8]) {
        let result = ctx.server().with_workers_parked(|| ());
        ctx.reply(if result.is_none() {
            b"refused"
        } else {
            b"parked"
        })
        .unwrap();
    }
}

#[test]
fn a_worker_cannot_wait_for_itself_to_park() {
    let server = start(ParksFromHandler, 2, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"park everyone");
    assert_eq!(client.recv(), b"refused");
}

/// Regression (found in review): a count lowered after a shutdown began
/// parked the workers the drain needed, and nothing would ever set the
/// stop, so `join` never returned. Workers now park only while the server
/// runs.
#[test]
fn lowering_the_count_during_a_drain_does_not_stall_the_shutdown() {
    for _ in 0..20 {
        let server = start(Echo, 2, |c| c);
        let handle = server.handle().clone();
        let mut client = Client::connect(server.local_addr().unwrap());
        client.send(b"before");
        assert_eq!(client.recv(), b"before");
        handle.shutdown(Duration::from_millis(100));
        handle.set_active_workers(0);
        let (done, joined) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(server.join());
        });
        assert!(
            joined.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the server did not stop: {:?}",
            handle.workers()
        );
    }
}

/// Two threads parking every worker at once: each closure runs with every
/// worker parked (without serialising them, the first to finish restored
/// the count while the other's closure still ran).
#[test]
fn concurrent_parkers_each_run_with_every_worker_parked() {
    let server = start(Echo, 2, |c| c);
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();
    let parkers: Vec<_> = (0..2)
        .map(|_| {
            let handle = handle.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for _ in 0..300 {
                    let during = handle
                        .with_workers_parked(|| {
                            // Long enough for the other parker to finish.
                            std::thread::sleep(Duration::from_micros(200));
                            handle.workers()
                        })
                        .unwrap();
                    if during.2 != during.0 {
                        seen.push(during);
                    }
                }
                seen
            })
        })
        .collect();
    for parker in parkers {
        let seen = parker.join().unwrap();
        assert!(
            seen.is_empty(),
            "closures ran with workers running: {seen:?}"
        );
    }
    assert_eq!(handle.workers().1, 2, "the count restored");
    assert!(
        wait_until(Duration::from_secs(5), || handle.workers() == (2, 2, 0)),
        "{:?}",
        handle.workers()
    );
    let mut client = Client::connect(addr);
    client.send(b"after");
    assert_eq!(client.recv(), b"after");
}

/// A call nested in the closure runs at once (every worker is already
/// parked; waiting for its own turn would deadlock), and a closure that
/// panics still lets the workers run again.
#[test]
fn nested_and_panicking_parkers_leave_the_server_running() {
    let server = start(Echo, 2, |c| c);
    let handle = server.handle().clone();
    let mut client = Client::connect(server.local_addr().unwrap());
    let nested = handle
        .with_workers_parked(|| handle.with_workers_parked(|| handle.workers()))
        .unwrap();
    assert_eq!(nested, Some((2, 0, 2)), "the inner closure ran, all parked");
    client.send(b"after nesting");
    assert_eq!(client.recv(), b"after nesting");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handle.with_workers_parked(|| panic!("the closure fails"))
    }));
    assert!(panicked.is_err());
    assert_eq!(handle.workers().1, 2, "the count restored after the panic");
    client.send(b"after a panic");
    assert_eq!(client.recv(), b"after a panic");
    assert!(
        handle.with_workers_parked(|| ()).is_some(),
        "the turn given back"
    );
}

/// A peer that keeps sending must not keep a worker to itself. Each of its
/// turns ends on a short read, but new bytes arrive during the turn, and
/// the other worker's event for them leaves a pending mark, so the
/// ownership word hands the read side straight back for another turn.
/// Without a bound on turns per activation the worker never went back to
/// `epoll_wait`, and the rest of its batch waited for as long as the peer
/// sent. The interleaving is forced through a call hook: after each `recv`
/// the server makes, one more frame is sent and the other worker is given
/// time to take its edge; and the hook counts the `recv`s each thread makes
/// between two of its waits.
#[test]
fn a_peer_that_keeps_sending_does_not_keep_a_worker() {
    use std::io::Write;
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    /// Frames the hook sends, one per `recv`: an unbounded activation
    /// would make about this many reads without a wait.
    const FRAMES: usize = 200;
    let left = Arc::new(AtomicUsize::new(0));
    let peer: Arc<OnceLock<Mutex<TcpStream>>> = Arc::new(OnceLock::new());
    let after_recv = {
        let (left, peer) = (Arc::clone(&left), Arc::clone(&peer));
        move || {
            let take = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if take.is_ok() {
                if let Some(peer) = peer.get() {
                    peer.lock().unwrap().write_all(&frame(&[7u8; 60])).unwrap();
                }
                // The other worker takes the new bytes' edge meanwhile
                // and, finding the read side held, leaves its mark.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let (server, most) = counting_calls_between_waits("recv", 7, after_recv);
    let mut client = Client::connect(server.local_addr().unwrap());
    peer.set(Mutex::new(client.stream.try_clone().unwrap()))
        .ok()
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .handle()
        .stats()
        .open
        == 1));
    left.store(FRAMES, Ordering::SeqCst);
    client.send(&[7u8; 60]);
    for i in 0..=FRAMES {
        match client.recv_within(Duration::from_secs(5)) {
            Ok(Some(reply)) => assert_eq!(reply, [7u8; 60]),
            other => panic!("echo {i} of {}: {other:?}", FRAMES + 1),
        }
    }
    let most = most.load(Ordering::Relaxed);
    // An activation yields after 8 turns (conn.rs's `TURNS_PER_ACTIVATION`),
    // and a worker runs the yielded activation once more from its task list
    // before it waits again; a turn here makes one or two reads.
    let bound = 2 * 8 * 2;
    eprintln!("most recvs by one thread between two of its waits: {most}");
    assert!(
        most <= bound,
        "one thread made {most} recvs between two of its waits (bound {bound})"
    );
    // The premise (a review asked for it): the hook's frames did hand the
    // read side back for more turns (16 seen); one turn alone is a
    // schedule that shows nothing.
    assert!(most > 2, "no activation went past one turn ({most} recvs)");
}

/// A worker that panics (a bug in eserver: handler panics are caught where
/// the handler is called) stops the whole server, after a short grace for
/// the other connections. Before, the other worker served on: the
/// connection the dead worker was reading stayed stuck, and nothing but
/// the log said the server was a worker short. The bug is stood in for by
/// a panic in a call hook, on the read path, outside any handler call.
#[test]
fn a_worker_that_panics_stops_the_server() {
    let (server, _victim, mut bystander) = a_worker_panics_in_a_read(2, 11);
    assert!(
        wait_until(Duration::from_secs(10), || server.is_finished()),
        "the server serves on with a worker short"
    );
    let stats = server.join();
    assert_eq!(stats.worker_panics, 1, "{stats}");
    // The bystander's connection was closed by the stop, not left open.
    bystander.expect_closed();
}

/// A server of `threads` workers, two clients served once, and then a
/// worker that panics (a call hook, on the read path, outside any handler)
/// in the read of the first client's next frame: (server, that client, the
/// other).
fn a_worker_panics_in_a_read(threads: usize, seed: u64) -> (eserver::Running, Client, Client) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let armed = Arc::new(AtomicBool::new(false));
    let hook = {
        let armed = Arc::clone(&armed);
        move |call: &'static str| {
            if call == "recv" && armed.swap(false, Ordering::SeqCst) {
                panic!("injected: a bug in a worker");
            }
        }
    };
    let server = serve_with_hook_on(threads, Echo, seed, false, hook);
    let addr = server.local_addr().unwrap();
    let mut victim = Client::connect(addr);
    let mut bystander = Client::connect(addr);
    for client in [&mut victim, &mut bystander] {
        client.send(b"before");
        assert_eq!(client.recv(), b"before");
    }
    armed.store(true, Ordering::SeqCst);
    victim.send(b"the read that panics");
    (server, victim, bystander)
}

/// When every worker has died (here the only one), nobody is left to drain:
/// the server used to stay half up until joined, its listener still taking
/// connections into a backlog nobody accepts, its connections open and
/// silent, and `with_workers_parked` waiting (on the last note's list of
/// things left alone). The last worker out now stops it: the listener and
/// every connection are closed, and a section runs at once.
#[test]
fn a_server_whose_every_worker_died_stops_without_being_joined() {
    let (server, mut victim, mut bystander) = a_worker_panics_in_a_read(1, 13);
    let addr = server.local_addr().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || server.is_finished()),
        "the worker did not exit"
    );
    // Not joined yet: the connections are closed all the same.
    bystander.expect_closed();
    victim.expect_closed();
    let refused = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_err()
    });
    assert!(refused, "the listener still takes connections");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let handle = server.handle().clone();
    std::thread::spawn(move || {
        let _ = done_tx.send(handle.with_workers_parked(|| "ran"));
    });
    let ran = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("with_workers_parked waited for a join");
    assert_eq!(ran, Some("ran"));
    assert_eq!(server.join().worker_panics, 1);
}

/// An audit finding: the acceptor's activation had no bound on its turns.
/// While connections kept arriving, each new one's edge went to the other
/// worker, which found the acceptor held and left a pending mark, and the
/// ownership word handed the acceptor straight back for another turn:
/// the worker accepting never went back to `epoll_wait`, and the rest of
/// its events and tasks waited for as long as the flood lasted. The
/// interleaving is forced through a call hook: after each `accept` the
/// server makes, one more client connects and the other worker is given
/// time to take its edge; the hook counts the `accept`s each thread makes
/// between two of its waits.
#[test]
fn a_flood_of_connections_does_not_keep_a_worker() {
    use std::net::{SocketAddr, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    /// Connections the hook makes, one per `accept`: an unbounded
    /// activation would make about this many accepts without a wait.
    const CONNECTS: usize = 2000;
    let left = Arc::new(AtomicUsize::new(0));
    let target: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
    let clients: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
    let after_accept = {
        let (left, target, clients) =
            (Arc::clone(&left), Arc::clone(&target), Arc::clone(&clients));
        move || {
            let take = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if let (Ok(_), Some(addr)) = (take, target.get()) {
                clients
                    .lock()
                    .unwrap()
                    .push(TcpStream::connect(addr).unwrap());
                // The other worker takes the new connection's edge
                // meanwhile and, finding the acceptor held, leaves its
                // mark.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let (server, most) = counting_calls_between_waits("accept", 13, after_accept);
    let addr = server.local_addr().unwrap();
    target.set(addr).unwrap();
    left.store(CONNECTS, Ordering::SeqCst);
    let first = TcpStream::connect(addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || server.handle().stats().accepted
            > CONNECTS as u64),
        "accepted {} of {}",
        server.handle().stats().accepted,
        CONNECTS + 1
    );
    let most = most.load(Ordering::Relaxed);
    // An activation yields after 8 turns (`TURNS_PER_ACTIVATION`, as for a
    // connection's read side), each of at most 64 accepts per listener, or
    // after a turn that spent its 64; the rest is a task, which this
    // worker or the other runs (the one that polls next: the accepting
    // worker serves the connections it took first), at most once more
    // before a wait. (Here every turn spends its budget: 64 or 128 are
    // seen; before the bound, about every one of the 2,000.)
    let bound = 2 * 8 * 64;
    eprintln!("most accepts by one thread between two of its waits: {most}");
    assert!(
        most <= bound,
        "one activation made {most} accepts without a wait (bound {bound})"
    );
    // The premise: an activation met a full backlog and spent a turn's
    // budget of 64 (a review's finding: since the rest of the flood may go
    // to the other worker, more than 64 between two waits is a race).
    assert!(
        most >= 64,
        "no activation spent a turn's budget ({most} accepts)"
    );
    drop(first);
    drop(server);
}

thread_local! {
    /// Counted calls this thread made since its last `epoll_wait`.
    static SINCE_WAIT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The harness of the tests that a busy peer or a flood does not keep a
/// worker: an echo server of two workers, both polling (the idle one is
/// in `epoll_wait` for every edge), over a kernel whose call hook counts,
/// per thread, the `counted` calls it makes between two of its waits, and
/// runs `after` after each one (to force the interleaving). Returns the
/// server and the most counted calls one thread made between two waits.
fn counting_calls_between_waits(
    counted: &'static str,
    seed: u64,
    after: impl Fn() + Send + Sync + 'static,
) -> (
    eserver::Running,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let most = Arc::new(AtomicUsize::new(0));
    let hook = {
        let most = Arc::clone(&most);
        move |call: &'static str| {
            if call == counted {
                SINCE_WAIT.with(|n| {
                    n.set(n.get() + 1);
                    most.fetch_max(n.get(), Ordering::Relaxed);
                });
                after();
            } else if call == "epoll_wait" {
                SINCE_WAIT.with(|n| n.set(0));
            }
        }
    };
    (serve_with_hook(Echo, seed, true, hook), most)
}

/// An audit's finding: once a shutdown's deadline had passed, every worker
/// waited with a zero timeout, so while one worker was held (a slow
/// handler, here for 550 ms past a 50 ms grace) the others spun on
/// `epoll_wait` until it let go. Past the deadline they now poll every
/// 10 ms, as before it.
#[test]
fn workers_do_not_spin_past_the_shutdown_deadline() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let waits = Arc::new(AtomicUsize::new(0));
    let hook = {
        let waits = Arc::clone(&waits);
        move |call: &'static str| {
            if call == "epoll_wait" {
                waits.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let server = serve_with_hook(
        common::HoldsOnHold(Duration::from_millis(600)),
        3,
        true,
        hook,
    );
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"hold");
    // The handler is holding its worker now.
    std::thread::sleep(Duration::from_millis(50));
    let before = waits.load(Ordering::Relaxed);
    let stopping = std::time::Instant::now();
    server.stop(Duration::from_millis(50));
    let stopped_in = stopping.elapsed();
    let during = waits.load(Ordering::Relaxed) - before;
    // The premise: the stop did wait for the held worker, far past its
    // deadline (a handler that had not begun by then leaves nothing to
    // spin for, and the count below would pass without meaning).
    assert!(
        stopped_in >= Duration::from_millis(300),
        "the stop took {stopped_in:?}: no worker was held past its deadline"
    );
    eprintln!("{during} epoll_wait calls during a shutdown held 550 ms past its deadline");
    // About 60 at one per 10 ms; a spin makes tens of thousands.
    assert!(during < 2_000, "{during} waits: the free worker spun");
}

/// An audit's finding: `with_workers_parked` promises that no handler runs
/// while its closure does, but a shutdown begun during the closure (here,
/// by the closure itself) raised the active count and woke every parked
/// worker into the drain at once. The drain now waits for the closure.
#[test]
fn a_shutdown_during_a_parked_section_waits_for_it() {
    let server = start(Echo, 2, |c| c);
    let handle = server.handle().clone();
    let (started, _, _) = handle.workers();
    let parked_after_shutdown = handle
        .with_workers_parked(|| {
            handle.shutdown(Duration::from_secs(1));
            std::thread::sleep(Duration::from_millis(100));
            handle.workers().2
        })
        .unwrap();
    assert_eq!(
        parked_after_shutdown, started,
        "workers left the parked section while its closure ran"
    );
    // And the drain still happens once the section ends.
    let stats = server.join();
    assert_eq!(stats.worker_panics, 0);
}

/// A review's finding on the first fix of the test above: a section that
/// held the workers from its start deadlocked when a worker died before
/// parking (the dead one never parks, the section kept the rest parked
/// through the shutdown, and nobody drained). A section now holds the
/// workers only once every one of them is parked. Here a worker is held
/// inside a read while the section waits for it, then panics.
#[test]
fn a_worker_that_dies_while_a_section_waits_for_it_does_not_hang_the_server() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, mpsc};

    let armed = Arc::new(AtomicBool::new(false));
    let (inside_tx, inside_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (inside_tx, go_rx) = (Mutex::new(inside_tx), Mutex::new(go_rx));
    let hook = {
        let armed = Arc::clone(&armed);
        move |call: &'static str| {
            if call == "recv" && armed.swap(false, Ordering::SeqCst) {
                let _ = inside_tx.lock().unwrap().send(());
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(20));
                panic!("injected: a bug in a worker");
            }
        }
    };
    let server = serve_with_hook(Echo, 12, false, hook);
    let mut victim = Client::connect(server.local_addr().unwrap());
    victim.send(b"before");
    assert_eq!(victim.recv(), b"before");
    armed.store(true, Ordering::SeqCst);
    victim.send(b"the read that panics");
    inside_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the worker reached the read");
    let handle = server.handle().clone();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(handle.with_workers_parked(|| "ran"));
    });
    // The section waits for the held worker; then it dies.
    std::thread::sleep(Duration::from_millis(100));
    go_tx.send(()).unwrap();
    let ran = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("with_workers_parked hung after a worker died");
    assert_eq!(ran, Some("ran"));
    assert!(
        wait_until(Duration::from_secs(10), || server.is_finished()),
        "the server did not stop"
    );
    assert_eq!(server.join().worker_panics, 1);
}

/// The count stays 0 while a section's closure runs, whoever raises it
/// (here the closure itself), and the section's end restores the count
/// from before it. (A review found the same raise let workers out when it
/// landed between the workers parking and the section starting; that race
/// is closed by deciding both under one lock, which this test cannot time.)
#[test]
fn the_count_stays_zero_during_a_parked_section() {
    let server = start(Echo, 2, |c| c);
    let handle = server.handle().clone();
    let (started, _, _) = handle.workers();
    let parked = handle
        .with_workers_parked(|| {
            handle.set_active_workers(2);
            std::thread::sleep(Duration::from_millis(100));
            handle.workers().2
        })
        .unwrap();
    assert_eq!(parked, started, "workers left the section while it ran");
    assert!(
        wait_until(Duration::from_secs(5), || handle.workers() == (2, 2, 0)),
        "{:?}",
        handle.workers()
    );
}

/// A review's finding: a section asked for after a shutdown on a server
/// that never started waited for a stop that could never come (no worker
/// to drain). With no worker started, the closure runs at once.
#[test]
fn a_parked_section_on_a_server_that_never_started_runs_at_once() {
    let config = Config::default()
        .listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())
        .threads(2);
    let server = Server::bind(config, Echo).unwrap();
    let handle = server.handle();
    handle.shutdown(Duration::from_secs(1));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(handle.with_workers_parked(|| "ran"));
    });
    let ran = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("with_workers_parked waited for a server that never started");
    assert_eq!(ran, Some("ran"));
    drop(server);
}

/// A loopback server of two workers running `handler` over a real kernel
/// whose call hook is `hook` (to count calls, or to stand in for a bug);
/// `poll`: every worker in `epoll_wait` (no standby).
fn serve_with_hook<H: Handler>(
    handler: H,
    seed: u64,
    poll: bool,
    hook: impl Fn(&'static str) + Send + Sync + 'static,
) -> eserver::Running {
    serve_with_hook_on(2, handler, seed, poll, hook)
}

/// [`serve_with_hook`] with `threads` workers.
fn serve_with_hook_on<H: Handler>(
    threads: usize,
    handler: H,
    seed: u64,
    poll: bool,
    hook: impl Fn(&'static str) + Send + Sync + 'static,
) -> eserver::Running {
    use eserver::sys::LinuxSys;
    use eserver::sys::fault::{FaultConfig, FaultSys};
    let sys = FaultSys::new(LinuxSys::new(), FaultConfig::none(seed))
        .with_call_hook(std::sync::Arc::new(hook));
    let mut config = Config::default()
        .listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())
        .threads(threads);
    if poll {
        config.idle_wait = eserver::IdleWait::Poll;
    }
    Server::with_sys(sys, config, handler)
        .unwrap()
        .start()
        .unwrap()
}

/// The next frame is answered: the connection was not closed as idle
/// right after `what`. Then the control: left silent, it is closed as idle
/// about a timeout later (the timer was live all along; a server whose
/// idle timer never fired would pass the first part).
fn still_open(client: &mut Client, server: &eserver::Running, what: &str) {
    client.send(b"still open");
    match client.recv_within(Duration::from_secs(5)) {
        Ok(Some(echo)) => assert_eq!(echo, b"still open"),
        other => panic!(
            "closed as idle right after {what} ({other:?}): {}",
            server.handle().stats()
        ),
    }
    let quiet = std::time::Instant::now();
    client.expect_closed();
    assert!(
        quiet.elapsed() < Duration::from_secs(2),
        "a silent connection closed {:?} after its last frame (idle timeout 200 ms)",
        quiet.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(5), || server
            .handle()
            .stats()
            .closed_for(eserver::CloseReason::IdleTimeout)
            == 1),
        "{}",
        server.handle().stats()
    );
}

/// Two loopback workers, all polling, closing connections idle for 200 ms.
fn idle_after_200_ms() -> Config {
    let mut config = Config::default()
        .listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())
        .threads(2);
    config.idle_timeout = Some(Duration::from_millis(200));
    config.idle_wait = eserver::IdleWait::Poll;
    config
}

/// A review's finding: a read turn marks the connection active at its end,
/// so the idle timer, on another worker, could find the mark stale while
/// the turn held bytes it had just read, and close the connection as idle
/// right after answering them. The timer now leaves a connection whose
/// read turn is under way alone. Here the turn is held (a call hook after
/// the `recv` that read the frame) past the idle deadline while the other
/// worker's timer fires.
#[test]
fn a_connection_read_just_before_its_idle_deadline_is_not_closed_as_idle() {
    use std::sync::atomic::Ordering;

    let (sys, armed) = common::holds_once("recv", Duration::from_millis(300), 14);
    let config = idle_after_200_ms();
    let server = Server::with_sys(sys, config, Echo)
        .unwrap()
        .start()
        .unwrap();
    let mut client = Client::connect(server.local_addr().unwrap());
    client.send(b"first");
    assert_eq!(client.recv(), b"first");
    // 100 ms into the idle timeout: the next frame's read is held 300 ms,
    // past the deadline.
    std::thread::sleep(Duration::from_millis(100));
    armed.store(true, Ordering::SeqCst);
    client.send(b"just in time");
    assert_eq!(client.recv(), b"just in time");
    assert!(!armed.load(Ordering::SeqCst), "the hook never ran");
    still_open(&mut client, &server, "a read");
}

/// Sends each connection's id to the test as it opens; echoes.
struct ReportsIds(std::sync::mpsc::Sender<eserver::ConnId>);

impl Handler for ReportsIds {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        let _ = self.0.send(ctx.id());
    }

    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        ctx.reply(msg).unwrap();
    }
}

/// The write side's twin of the test above (left alone in an earlier
/// note): a write marks the connection active after it gives the write
/// side back, so the idle timer could find the mark stale while another
/// thread's write was moving bytes, and close the connection right after
/// the server had written to it. The timer now also leaves a connection
/// whose write is under way alone. Here a `ServerHandle::send` from the
/// test's thread is held (a call hook after the `send` that wrote it) past
/// the idle deadline while a worker's timer fires.
#[test]
fn a_connection_written_just_before_its_idle_deadline_is_not_closed_as_idle() {
    use std::sync::atomic::Ordering;

    let (sys, armed) = common::holds_once("send", Duration::from_millis(250), 15);
    let config = idle_after_200_ms();
    let (ids_tx, ids) = std::sync::mpsc::channel();
    let server = Server::with_sys(sys, config, ReportsIds(ids_tx))
        .unwrap()
        .start()
        .unwrap();
    let mut client = Client::connect(server.local_addr().unwrap());
    let id = ids.recv_timeout(Duration::from_secs(5)).unwrap();
    // 100 ms into the idle timeout the server writes; the write is held
    // 250 ms, past the deadline.
    std::thread::sleep(Duration::from_millis(100));
    armed.store(true, Ordering::SeqCst);
    server.handle().send(id, b"push").unwrap();
    assert!(!armed.load(Ordering::SeqCst), "the hook never ran");
    assert_eq!(client.recv(), b"push");
    still_open(&mut client, &server, "a write");
}

/// `on_open` of the first connection sleeps; records whether a second
/// connection's `on_open` began while it slept.
#[derive(Default)]
struct SlowFirstOpen {
    opened: std::sync::atomic::AtomicU32,
    first_sleeping: std::sync::atomic::AtomicBool,
    first_done: std::sync::atomic::AtomicBool,
    overlapped: std::sync::atomic::AtomicBool,
    /// Connections opened while the first one's `on_open` slept.
    during_the_sleep: std::sync::atomic::AtomicU32,
}

impl Handler for SlowFirstOpen {
    type Conn = ();
    fn on_open(&self, _: &mut Ctx<'_>) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.opened.fetch_add(1, SeqCst) == 0 {
            self.first_sleeping.store(true, SeqCst);
            std::thread::sleep(Duration::from_millis(500));
            self.first_done.store(true, SeqCst);
        } else if !self.first_done.load(SeqCst) {
            self.overlapped.store(true, SeqCst);
            self.during_the_sleep.fetch_add(1, SeqCst);
        }
    }
    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        let _ = ctx.reply(msg);
    }
}

/// An audit's finding: the worker that accepted a connection ran its
/// `on_open` and first turns while it still held the acceptor, so one slow
/// handler stopped every worker from accepting: a second client waited in
/// the backlog for the first one's `on_open` with another worker idle. The
/// accepted connections are now served once the acceptor is free.
#[test]
fn a_slow_on_open_does_not_stop_the_other_workers_accepting() {
    use std::sync::atomic::Ordering::SeqCst;
    let app = std::sync::Arc::new(SlowFirstOpen::default());
    let server = start(std::sync::Arc::clone(&app), 2, |c| c);
    let addr = server.local_addr().unwrap();
    let _first = Client::connect(addr);
    assert!(
        wait_until(Duration::from_secs(5), || app.first_sleeping.load(SeqCst)),
        "the first connection's on_open never ran"
    );
    let _second = Client::connect(addr);
    assert!(
        wait_until(Duration::from_secs(5), || app.opened.load(SeqCst) == 2),
        "the second connection was never opened"
    );
    assert!(
        app.overlapped.load(SeqCst),
        "the second connection was opened only after the first's on_open returned"
    );
}

/// A review's finding on the fix above: an activation that spent a
/// listener's budget (64 connections) left the task for the rest of the
/// backlog on its own worker's list, behind the connections it had taken,
/// so one slow `on_open` among them held back the rest, which no new edge
/// would announce, with the other worker idle. The task now goes to any
/// worker. The backlog of 100 is filled while every worker is parked.
#[test]
fn a_slow_on_open_does_not_hold_back_the_rest_of_a_full_backlog() {
    use std::sync::atomic::Ordering::SeqCst;
    const CLIENTS: u32 = 100;
    let app = std::sync::Arc::new(SlowFirstOpen::default());
    let server = start(std::sync::Arc::clone(&app), 2, |c| c);
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();
    handle.set_active_workers(0);
    assert!(
        wait_until(Duration::from_secs(5), || handle.workers().2 == 2),
        "{:?}",
        handle.workers()
    );
    let _clients: Vec<Client> = (0..CLIENTS).map(|_| Client::connect(addr)).collect();
    handle.set_active_workers(2);
    assert!(
        wait_until(Duration::from_secs(10), || app.opened.load(SeqCst)
            == CLIENTS),
        "only {} of {CLIENTS} connections opened",
        app.opened.load(SeqCst)
    );
    // The first activation takes 64 (the sleeper among them); the other
    // worker takes the 36 left while it sleeps.
    let during = app.during_the_sleep.load(SeqCst);
    assert!(
        during >= 30,
        "{during} connections opened while the first on_open slept"
    );
}
