//! Outbound connections (`ServerHandle::connect`): served by the same
//! workers, slots, framing and handler as accepted ones.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;
use std::time::Duration;

use common::{start, wait_until};
use eserver::apps::Echo;
use eserver::sys::fault::{FaultConfig, FaultSys, Scripted};
use eserver::sys::{Errno, LinuxSys};
use eserver::{
    CloseInfo, CloseReason, Config, ConnId, ConnectError, ConnectFailure, Ctx, Handler, Server,
    WriteInterest,
};

/// A client application: on open it sends `count` numbered messages, then
/// checks that each echo comes back in order.
#[derive(Default)]
struct Pinger {
    count: u32,
    events: Mutex<Vec<String>>,
    /// The address each connection was told of: `on_open`'s peer address,
    /// or the one `on_connect_failed` names.
    addrs: Mutex<Vec<(ConnId, Option<SocketAddr>)>>,
}

impl Pinger {
    fn log(&self, event: String) {
        self.events.lock().unwrap().push(event);
    }
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
    /// Checks that each of `ids` was told `addr`, once.
    fn expect_addr(&self, ids: &[ConnId], addr: SocketAddr) {
        let addrs = self.addrs.lock().unwrap();
        for id in ids {
            let told: Vec<_> = addrs.iter().filter(|(i, _)| i == id).collect();
            assert_eq!(told, [&(*id, Some(addr))], "{id}'s address");
        }
    }
}

/// The handler: the shared record, so the test can read it.
struct App(std::sync::Arc<Pinger>);

impl std::ops::Deref for App {
    type Target = Pinger;
    fn deref(&self) -> &Pinger {
        &self.0
    }
}

impl Handler for App {
    type Conn = u32;

    fn on_open(&self, ctx: &mut Ctx<'_>) -> u32 {
        self.log(format!("open {}", ctx.id()));
        self.addrs.lock().unwrap().push((ctx.id(), ctx.peer_addr()));
        for i in 0..self.count {
            ctx.reply(format!("{} {i}", ctx.id()).as_bytes()).unwrap();
        }
        0
    }

    fn on_message(&self, next: &mut u32, ctx: &mut Ctx<'_>, msg: &[u8]) {
        let expected = format!("{} {next}", ctx.id());
        assert_eq!(msg, expected.as_bytes(), "echo out of order or wrong peer");
        *next += 1;
        if *next == self.count {
            self.log(format!("done {}", ctx.id()));
            ctx.close();
        }
    }

    fn on_close(&self, _: u32, info: CloseInfo<'_>) {
        self.log(format!("close {} {}", info.id, info.reason.name()));
    }

    fn on_connect_failed(&self, failure: ConnectFailure<'_>) {
        let id = failure.id;
        self.log(format!("failed {id} {}", failure.error.name()));
        self.addrs.lock().unwrap().push((id, Some(failure.addr)));
    }
}

fn client(pinger: &std::sync::Arc<Pinger>) -> eserver::Running {
    Server::bind(
        Config::default().without_listeners().threads(2),
        App(std::sync::Arc::clone(pinger)),
    )
    .unwrap()
    .start()
    .unwrap()
}

#[test]
fn outbound_connections_are_served_like_accepted_ones() {
    let echo = start(Echo, 2, |c| c);
    let addr = echo.local_addr().unwrap();
    let pinger = std::sync::Arc::new(Pinger {
        count: 50,
        ..Pinger::default()
    });
    let client = client(&pinger);
    let ids: Vec<ConnId> = (0..200)
        .map(|_| client.handle().connect(addr).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || {
            client.handle().stats().closed_for(CloseReason::Handler) == 200
        }),
        "not every connection got its 50 echoes: {:?}",
        client.handle().stats()
    );
    let events = pinger.events();
    for id in &ids {
        for what in ["open", "done", "close"] {
            let line = match what {
                "close" => format!("close {id} handler"),
                _ => format!("{what} {id}"),
            };
            assert_eq!(
                events.iter().filter(|e| **e == line).count(),
                1,
                "{line} once"
            );
        }
    }
    // `on_open` names the address dialled, as it names an accepted peer.
    pinger.expect_addr(&ids, addr);
    // Counters merge at the end of a worker's batch: read them once the
    // workers have stopped.
    let stats = client.stop(Duration::from_secs(1));
    assert_eq!(stats.connects, 200);
    assert_eq!(stats.connected, 200);
    assert_eq!(stats.msgs_in, 200 * 50);
    echo.stop(Duration::from_secs(1));
}

/// Connects 20 times to a port nobody listens on (`then` runs after each
/// connect) and checks each failure is reported once, as ECONNREFUSED, with
/// no `on_open`/`on_close`, and that every slot went back to the pool.
fn refused_twenty_times(then: impl Fn(&eserver::ServerHandle, ConnId)) -> eserver::Stats {
    // A port with nothing listening: bind, note it, close.
    let addr: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let client = client(&pinger);
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = client.handle().connect(addr).unwrap();
        then(client.handle(), id);
        ids.push(id);
    }
    assert!(
        wait_until(Duration::from_secs(10), || pinger.events().len() == 20),
        "{:?}",
        pinger.events()
    );
    let events = pinger.events();
    for id in &ids {
        assert!(
            events.contains(&format!("failed {id} ECONNREFUSED")),
            "{id} not reported as refused: {events:?}"
        );
    }
    assert!(
        events.iter().all(|e| e.starts_with("failed")),
        "on_open/on_close for a connection never established: {events:?}"
    );
    // The failure names the address dialled: a handler need not look the
    // id up (the failure can come before `connect` returned it).
    pinger.expect_addr(&ids, addr);
    // The close is counted in the worker's tally, merged after its turn
    // (and a slot a send still held goes back when the send returns): wait.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let stats = client.handle().stats();
            stats.open == 0 && stats.closed_total() == 20
        }),
        "every slot back in the pool, every failure counted: {}",
        client.handle().stats()
    );
    assert!(!client.handle().is_open(ids[0]));
    client.stop(Duration::from_secs(1))
}

#[test]
fn a_refused_connect_is_reported_once_and_frees_its_slot() {
    let stats = refused_twenty_times(|_, _| {});
    assert_eq!(stats.closed_for(CloseReason::ConnectFailed(0)), 20);
}

#[test]
fn a_send_that_meets_the_connect_error_still_reports_it() {
    // A send queued right after `connect` may be the call that meets (and,
    // on Linux, consumes) the refusal: the handler must still hear
    // ECONNREFUSED, once, and the connection must still close.
    refused_twenty_times(|handle, id| {
        let _ = handle.send(id, b"too early");
    });
}

/// Dials again from `on_connect_failed`, `left` more times, and records
/// each failure and each redial's result.
struct Redials {
    left: std::sync::atomic::AtomicU32,
    events: Mutex<Vec<String>>,
}

impl Handler for Redials {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        self.events
            .lock()
            .unwrap()
            .push(format!("open {}", ctx.id()));
    }

    fn on_message(&self, _: &mut (), _: &mut Ctx<'_>, _: &[u8]) {}

    fn on_connect_failed(&self, failure: ConnectFailure<'_>) {
        let mut events = self.events.lock().unwrap();
        events.push(format!("failed {}", failure.error.name()));
        let left = self.left.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.left
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            let redial = failure.server.connect(failure.addr);
            events.push(match redial {
                Ok(_) => "redialled".to_string(),
                Err(e) => format!("redial refused: {e}"),
            });
        }
    }
}

/// A connect audit's finding: `on_connect_failed` (and `on_close`) ran
/// before the closed connection's slot went back to the pool, so with every
/// slot in use a handler that dialled again from there ("to dial again", as
/// `ConnectFailure::server` says) was refused `PoolFull`, its only slot
/// being the one that had just failed: a reconnect loop at capacity lost a
/// connection per failure. And the refusal itself: with the one slot held
/// by a pending dial, a second dial is refused as `PoolFull`, naming the
/// pool's size.
#[test]
fn a_handler_at_capacity_can_dial_again_from_on_connect_failed() {
    let refused: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let app = std::sync::Arc::new(Redials {
        left: std::sync::atomic::AtomicU32::new(3),
        events: Mutex::new(Vec::new()),
    });
    let config = Config::default()
        .without_listeners()
        .threads(2)
        .max_conns(1);
    let client = Server::bind(config, std::sync::Arc::clone(&app))
        .unwrap()
        .start()
        .unwrap();
    client.handle().connect(refused).unwrap();
    let events = || app.events.lock().unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(10), || events().len() == 7),
        "{:?}",
        events()
    );
    let want: Vec<String> = ["failed ECONNREFUSED", "redialled"]
        .repeat(3)
        .into_iter()
        .chain(["failed ECONNREFUSED"])
        .map(String::from)
        .collect();
    assert_eq!(events(), want);

    // The one slot held by a dial still connecting: the next is refused.
    let (listener, addr, fillers) = unanswering_listener();
    let pending = client.handle().connect(addr).unwrap();
    match client.handle().connect(addr) {
        Err(eserver::ConnectError::PoolFull { addr: to, capacity }) => {
            assert_eq!((to, capacity), (addr, 1));
        }
        other => panic!("a second dial with the one slot in use: {other:?}"),
    }
    assert!(client.handle().close(pending));
    assert!(
        wait_until(Duration::from_secs(5), || events().len() == 8),
        "{:?}",
        events()
    );
    assert_eq!(events()[7], "failed ECANCELED");
    drop((listener, fillers));
    client.stop(Duration::from_secs(1));
}

/// A client server over the fault layer, with `max_conns` slots, no
/// listeners, and the [`App`] of `pinger`.
fn faulty_client(
    pinger: &std::sync::Arc<Pinger>,
    max_conns: usize,
) -> (FaultSys<LinuxSys>, eserver::Running) {
    let sys = FaultSys::new(LinuxSys::new(), FaultConfig::none(11));
    let config = Config::default()
        .without_listeners()
        .threads(2)
        .max_conns(max_conns);
    let running = Server::with_sys(sys.clone(), config, App(std::sync::Arc::clone(pinger)))
        .unwrap()
        .start()
        .unwrap();
    (sys, running)
}

/// A dial whose `epoll_ctl(ADD)` fails (a local limit: ENOSPC past
/// `fs.epoll.max_user_watches`) tells its caller, naming the call, with no
/// handler call; its socket is closed (the remote sees the end at once, not
/// a connection that never speaks), its slot is back, and the close is
/// counted as the local limit it is, not as a failed connect.
#[test]
fn a_dial_whose_registration_fails_tells_its_caller_and_holds_nothing() {
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap();
    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let (sys, client) = faulty_client(&pinger, 1);
    sys.fail_next(Scripted::EpollAdd, &[Errno(libc::ENOSPC)]);
    match client.handle().connect(addr) {
        Err(ConnectError::Sys {
            addr: to,
            syscall: "epoll_ctl(ADD)",
            errno,
        }) if to == addr && errno == Errno(libc::ENOSPC) => {}
        other => panic!("a dial whose registration fails: {other:?}"),
    }
    assert_eq!(sys.counts().scripted, 1);
    let mut dropped = accept_within(&target);
    dropped
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    match std::io::Read::read(&mut dropped, &mut buf) {
        Ok(0) => {}
        other => panic!("the failed dial's socket was left open: {other:?}"),
    }
    let stats = client.handle().stats();
    assert_eq!(stats.open, 0, "{stats}");
    assert_eq!(
        stats.closed_for(CloseReason::RegisterFailed(0)),
        1,
        "{stats}"
    );
    assert_eq!(
        stats.closed_for(CloseReason::ConnectFailed(0)),
        0,
        "{stats}"
    );
    // The one slot is back: the next dial gets it and is served.
    let id = client.handle().connect(addr).unwrap();
    let mut peer = accept_within(&target);
    expect_bytes(&mut peer, &common::frame(format!("{id} 0").as_bytes()));
    assert_eq!(pinger.events(), [format!("open {id}")], "handler calls");
    client.stop(Duration::from_secs(1));
}

/// A dial that finds the descriptor table full (EMFILE from its `socket`)
/// while a free slot still pins a number gives that number back and tries
/// once more, as accept does: with room in the pool, descriptor pressure
/// from the server's own idle numbers does not refuse it. With no number
/// to give back, the caller is told, naming the call.
#[test]
fn a_dial_out_of_descriptors_takes_a_free_slots_number() {
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap();
    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let (sys, client) = faulty_client(&pinger, 2);
    // No slot has a number yet: nothing to give back.
    sys.fail_next(Scripted::Connect, &[Errno::EMFILE]);
    match client.handle().connect(addr) {
        Err(ConnectError::Sys {
            addr: to,
            syscall: "connect",
            errno: Errno::EMFILE,
        }) if to == addr => {}
        other => panic!("a dial out of descriptors, none to give back: {other:?}"),
    }
    // One connection, served and closed: its free slot keeps its number.
    let first = client.handle().connect(addr).unwrap();
    let mut peer = accept_within(&target);
    expect_bytes(&mut peer, &common::frame(format!("{first} 0").as_bytes()));
    assert!(client.handle().close(first));
    common::wait_for_stats(client.handle(), "the first dial's close", |s| {
        s.open == 0 && s.closed_total() == 1
    });
    sys.fail_next(Scripted::Connect, &[Errno::EMFILE]);
    let second = client.handle().connect(addr);
    assert_eq!(sys.counts().scripted, 2);
    let second = second.unwrap_or_else(|e| {
        panic!(
            "a free slot held a number to give back: {e} ({})",
            client.handle().stats()
        )
    });
    let mut peer = accept_within(&target);
    expect_bytes(&mut peer, &common::frame(format!("{second} 0").as_bytes()));
    assert_eq!(client.handle().stats().numbers_released, 1);
    client.stop(Duration::from_secs(1));
}

/// Reads from `peer` until `want.len()` bytes came, and checks them.
fn expect_bytes(peer: &mut std::net::TcpStream, want: &[u8]) {
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    while got.len() < want.len() {
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(peer, &mut buf).unwrap();
        assert!(n > 0, "closed early; got {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, want);
}

/// "early", then the `on_open` reply of connection `id`, as framed bytes.
fn early_then_reply(id: ConnId) -> Vec<u8> {
    [
        common::frame(b"early"),
        common::frame(format!("{id} 0").as_bytes()),
    ]
    .concat()
}

/// Regression (a CI flake): this test used to send right after `connect`
/// to a listener that answers at once, assuming the connect was still
/// pending. On loopback it completes within microseconds, so a test thread
/// preempted between the two calls sent after `on_open` had replied, and
/// the reply came first; the server kept its promise (only sends made
/// before `on_open` go first), the test did not. Here the connect really is
/// pending in the kernel: the listener's accept queue is full, so Linux
/// drops the SYN until the retransmission about 1 s later.
/// A listener with backlog 0 that nobody accepts from: once one
/// connection is established, its accept queue is full and Linux drops
/// further SYNs (retransmitted at 1 s, 3 s, ...).
/// Accepts one connection within 10 s, or fails the test: a blocking
/// accept would hang it if the dial never came.
fn accept_within(listener: &TcpListener) -> std::net::TcpStream {
    listener.set_nonblocking(true).unwrap();
    let mut accepted = None;
    let got = wait_until(Duration::from_secs(10), || {
        accepted = listener.accept().ok();
        accepted.is_some()
    });
    listener.set_nonblocking(false).unwrap();
    assert!(got, "no connection to accept within 10 s");
    let (stream, _) = accepted.unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

fn backlog_zero_listener() -> (socket2::Socket, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    (listener, addr)
}

/// A listener whose accept queue is full (nobody accepts): Linux drops the
/// SYNs of further connects (retried at 1 s, 3 s, ...), so they neither
/// complete nor fail. Keep all three returned values alive while needed.
fn unanswering_listener() -> (socket2::Socket, SocketAddr, Vec<socket2::Socket>) {
    use socket2::{Domain, Socket, Type};
    let (listener, addr) = backlog_zero_listener();
    let fillers = (0..3)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    (listener, addr, fillers)
}

/// A [`backlog_zero_listener`] whose accept queue one established
/// connection (the filler, returned: keep it) fills, so that a dial's SYN
/// is dropped until its retransmission about 1 s later.
fn full_listener() -> (socket2::Socket, SocketAddr, std::net::TcpStream) {
    let (listener, addr) = backlog_zero_listener();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    (listener, addr, filler)
}

/// Makes room in a [`full_listener`]'s queue and accepts dial `id`'s
/// retransmitted SYN (bounded: no blocking accept).
fn admit_the_dial(
    listener: &socket2::Socket,
    filler: std::net::TcpStream,
    id: ConnId,
) -> std::net::TcpStream {
    listener.set_nonblocking(true).unwrap();
    let (first, _) = listener.accept().unwrap();
    drop((first, filler));
    let mut accepted = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            accepted = listener.accept().ok();
            accepted.is_some()
        }),
        "{id}: the retransmitted SYN never arrived"
    );
    let (peer, _) = accepted.unwrap();
    peer.set_nonblocking(false).unwrap();
    peer.into()
}

#[test]
fn sends_before_the_connect_completes_are_delivered_first() {
    let (listener, addr, filler) = full_listener();

    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let client = client(&pinger);
    let id = client.handle().connect(addr).unwrap();
    client.handle().send(id, b"early").unwrap();
    // The premise: the connect is still pending, so `on_open` has not run.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pinger.events(), Vec::<String>::new(), "{id}: not pending");

    let mut peer = admit_the_dial(&listener, filler, id);
    expect_bytes(&mut peer, &early_then_reply(id));
    client.stop(Duration::from_secs(1));
}

/// A client dialling a fresh listener while its workers are parked: `then`
/// runs right after `connect`, before any worker can see the connection,
/// and may accept the peer's end there (else it is accepted after).
/// Returns the client, its record, the id and the peer's end.
fn dial_while_parked(
    then: impl FnOnce(&eserver::ServerHandle, ConnId, &TcpListener) -> Option<std::net::TcpStream>,
) -> (
    eserver::Running,
    std::sync::Arc<Pinger>,
    ConnId,
    std::net::TcpStream,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let client = client(&pinger);
    let handle = client.handle();
    let (id, peer) = handle
        .with_workers_parked(|| {
            let id = handle.connect(addr).unwrap();
            let peer = then(handle, id, &listener);
            (id, peer)
        })
        .unwrap();
    // Loopback completes the handshake without the workers.
    let peer = peer.unwrap_or_else(|| accept_within(&listener));
    (client, pinger, id, peer)
}

/// The same promise when the kernel has completed the connect but no
/// worker has seen it yet: sends made while the workers are parked (so
/// before `on_open` can run) still go first.
#[test]
fn sends_before_a_worker_sees_the_connect_are_delivered_first() {
    let (client, _, id, mut peer) = dial_while_parked(|handle, id, listener| {
        // The premise: the handshake completed under the parked workers
        // (loopback needs no worker for it; the listener's accept shows
        // it, not a sleep).
        let peer = accept_within(listener);
        handle.send(id, b"early").unwrap();
        Some(peer)
    });
    expect_bytes(&mut peer, &early_then_reply(id));
    client.stop(Duration::from_secs(1));
}

/// A dial closed through the handle (after flush) before `on_open` could
/// run: its queued message still reaches the peer, then the end of stream,
/// and the handler hears `on_connect_failed(ECANCELED)` once, with no
/// `on_open` or `on_close`. (The race where the connect's own first flush
/// completes the close is `tests/sim.rs`
/// `regression_a_dial_closed_by_its_first_flush_is_reported_as_failed`.)
#[test]
fn a_dial_closed_before_it_opens_is_reported_as_cancelled() {
    let (client, pinger, id, mut peer) = dial_while_parked(|handle, id, _| {
        handle.send(id, b"bye").unwrap();
        assert!(handle.close_after_flush(id));
        None
    });
    expect_bytes(&mut peer, &common::frame(b"bye"));
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut peer, &mut rest).unwrap();
    assert_eq!(rest, b"", "end of stream after the queued message");
    assert!(
        wait_until(Duration::from_secs(5), || !pinger.events().is_empty()),
        "{id}: the handler never heard of the dial"
    );
    let stats = client.stop(Duration::from_secs(1));
    assert_eq!(pinger.events(), [format!("failed {id} ECANCELED")]);
    assert_eq!((stats.open, stats.closed_total()), (0, 1));
}

/// A connect audit's finding: a dial closed after flush while its connect
/// was pending got `on_open` if a message was still queued when the connect
/// completed (here one larger than the socket buffers), so its greeting
/// went out behind the message, after the close was decided, and the end
/// was `on_close`; only a dial whose queue was written in full first was
/// reported as documented, `on_connect_failed(ECANCELED)`.
#[test]
fn a_dial_closed_after_flush_while_connecting_never_opens_however_much_is_queued() {
    let (listener, addr, filler) = full_listener();
    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let config = Config::default()
        .without_listeners()
        .threads(2)
        .max_out(16 << 20);
    let client = Server::bind(config, App(std::sync::Arc::clone(&pinger)))
        .unwrap()
        .start()
        .unwrap();
    let id = client.handle().connect(addr).unwrap();
    let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    client.handle().send(id, &big).unwrap();
    assert!(client.handle().close_after_flush(id));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pinger.events(), Vec::<String>::new(), "{id}: not pending");

    let mut peer = admit_the_dial(&listener, filler, id);
    // The connect completes while the message is far from written (the
    // peer reads nothing yet): the moment the old code opened.
    std::thread::sleep(Duration::from_millis(200));
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut peer, &mut got).unwrap();
    let want = common::frame(&big);
    assert_eq!(got.len(), want.len(), "{id}: the message, and nothing else");
    assert!(got == want, "{id}: the message arrived altered");
    assert!(
        wait_until(Duration::from_secs(5), || !pinger.events().is_empty()),
        "{id}: the handler never heard of the dial"
    );
    let stats = client.stop(Duration::from_secs(1));
    assert_eq!(pinger.events(), [format!("failed {id} ECANCELED")]);
    // The premise: the connect completed with the close pending.
    assert_eq!((stats.connected, stats.closed_total()), (1, 1));
}

/// A client with one dial to an [`unanswering_listener`], still pending
/// (checked): the listener's parts (keep them alive: their full queue keeps
/// the connect pending), the client's record, the client and the dial.
#[allow(clippy::type_complexity)]
fn pending_dial() -> (
    (socket2::Socket, Vec<socket2::Socket>),
    std::sync::Arc<Pinger>,
    eserver::Running,
    ConnId,
) {
    let (listener, addr, fillers) = unanswering_listener();
    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let client = client(&pinger);
    let id = client.handle().connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pinger.events(), Vec::<String>::new(), "{id}: not pending");
    ((listener, fillers), pinger, client, id)
}

/// A dial still connecting, with nothing queued, closed after flush: it is
/// cancelled at once (a read turn finds the linger drained), not when the
/// connect completes, which a full accept queue delays by seconds.
#[test]
fn a_pending_dial_closed_after_flush_with_nothing_queued_is_cancelled_at_once() {
    let (_unanswering, pinger, client, id) = pending_dial();
    assert!(client.handle().close_after_flush(id));
    // The full accept queue drops the SYN and its retransmissions (1 s and
    // 3 s after the connect): before the second, the dial can only have
    // ended by being cancelled. (600 ms before, too tight on a busy machine.)
    assert!(
        wait_until(Duration::from_secs(2), || !pinger.events().is_empty()),
        "{id}: still waiting for the connect"
    );
    assert_eq!(pinger.events(), [format!("failed {id} ECANCELED")]);
    client.stop(Duration::from_secs(1));
}

/// A dial that never connects, with a send queued behind it, meets the
/// send timeout (its output waits and nothing is taken): it is reported as
/// a connect that timed out (ETIMEDOUT), as the idle timeout reports it,
/// not as cancelled.
#[test]
fn a_pending_dial_with_a_send_queued_times_out_as_etimedout() {
    let (_listener, addr, _fillers) = unanswering_listener();
    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let client = Server::bind(
        Config::default()
            .without_listeners()
            .threads(2)
            .send_timeout(Duration::from_millis(300)),
        App(std::sync::Arc::clone(&pinger)),
    )
    .unwrap()
    .start()
    .unwrap();
    let id = client.handle().connect(addr).unwrap();
    client
        .handle()
        .send(id, b"queued while connecting")
        .unwrap();
    // Before the SYN's second retransmission (3 s), the connect cannot have
    // completed (the accept queue is full) nor failed on its own.
    assert!(
        wait_until(Duration::from_millis(2500), || !pinger.events().is_empty()),
        "{id}: still waiting for the connect: {}",
        client.handle().stats()
    );
    assert_eq!(pinger.events(), [format!("failed {id} ETIMEDOUT")]);
    // Counted when the worker's batch ends: waited for.
    assert!(wait_until(Duration::from_secs(5), || client
        .handle()
        .stats()
        .closed_for(CloseReason::SendTimeout)
        == 1));
    client.stop(Duration::from_secs(1));
}

/// A review finding: a graceful stop's last turn for a dial still
/// connecting, with nothing queued for it, only looked at the connect, so
/// the stop waited for the whole grace period (or for the connect, which a
/// full accept queue delays by seconds). Nothing is left to flush: it is
/// cancelled at once.
#[test]
fn a_graceful_stop_cancels_a_pending_dial_with_nothing_queued_at_once() {
    let (_unanswering, pinger, client, id) = pending_dial();
    let grace = Duration::from_secs(10);
    let stopping = std::time::Instant::now();
    let stats = client.stop(grace);
    assert!(
        stopping.elapsed() < grace / 2,
        "{id}: the stop took {:?}",
        stopping.elapsed()
    );
    assert_eq!(pinger.events(), [format!("failed {id} ECANCELED")]);
    assert_eq!((stats.open, stats.closed_total()), (0, 1));
}

/// Regression: `connect` from a thread that is not a worker schedules the
/// connection's idle timer, but the workers were already waiting with
/// timeouts computed without it (here: none at all), so a connect that
/// neither completes nor fails was never timed out. The peer is a listener
/// whose accept queue is full: Linux drops the SYNs (retried at 1 s, 3 s,
/// ...), so no event ever comes.
/// Dials through another server's handle, from its own worker, on any
/// message; replies with the dial's id.
struct DialsThrough {
    other: std::sync::OnceLock<eserver::ServerHandle>,
    to: SocketAddr,
}

impl Handler for DialsThrough {
    type Conn = ();
    fn on_open(&self, _: &mut Ctx<'_>) {}
    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, _msg: &[u8]) {
        let id = self.other.get().unwrap().connect(self.to).unwrap();
        ctx.reply(id.to_string().as_bytes()).unwrap();
    }
}

/// An audit's finding (a lost wake-up): a worker thread skipped waking its
/// server for a new earliest timer, since it would look at the timers
/// before its next wait; but "a worker" was any server's worker. A dial
/// through another server's handle, made from this server's worker, armed
/// the other server's idle timer without waking it, and the other
/// server's worker slept on in a wait with no timeout.
#[test]
fn a_dial_from_another_servers_worker_still_times_out() {
    let (_listener, addr, fillers) = unanswering_listener();
    let pinger = std::sync::Arc::new(Pinger::default());
    let mut config = Config::default().without_listeners().threads(1);
    config.idle_timeout = Some(Duration::from_millis(200));
    let dialer = Server::bind(config, App(std::sync::Arc::clone(&pinger)))
        .unwrap()
        .start()
        .unwrap();
    let through = std::sync::Arc::new(DialsThrough {
        other: std::sync::OnceLock::new(),
        to: addr,
    });
    through.other.set(dialer.handle().clone()).unwrap();
    let front = start(std::sync::Arc::clone(&through), 1, |c| c);
    // Let the dialer's worker settle into a wait with no timeout.
    std::thread::sleep(Duration::from_millis(50));
    let mut client = common::Client::connect(front.local_addr().unwrap());
    client.send(b"dial");
    let id = String::from_utf8(client.recv()).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            dialer.handle().stats().closed_for(CloseReason::IdleTimeout) == 1
        }),
        "{id}: the dial outlived its 200 ms idle timeout by 4.8 s: {:?} {:?}",
        pinger.events(),
        dialer.handle().stats()
    );
    dialer.stop(Duration::from_secs(1));
    drop(fillers);
}

#[test]
fn a_hanging_connect_from_another_thread_still_times_out() {
    // Kept open to the end: their full queue is what makes the connect hang.
    let (_listener, addr, fillers) = unanswering_listener();

    let pinger = std::sync::Arc::new(Pinger {
        count: 1,
        ..Pinger::default()
    });
    let mut config = Config::default().without_listeners().threads(2);
    config.idle_timeout = Some(Duration::from_millis(200));
    let client = Server::bind(config, App(std::sync::Arc::clone(&pinger)))
        .unwrap()
        .start()
        .unwrap();
    // Let every worker settle into a wait with no timeout (no timer yet).
    std::thread::sleep(Duration::from_millis(50));
    let id = client.handle().connect(addr).unwrap();
    // Without the fix it never times out; 5 s leaves room for a loaded
    // machine (and the SYN retransmissions at 1 s and 3 s still find the
    // accept queue full).
    assert!(
        wait_until(Duration::from_secs(5), || {
            client.handle().stats().closed_for(CloseReason::IdleTimeout) == 1
        }),
        "{id}: the connect outlived its 200 ms idle timeout by 4.8 s: {:?} {:?}",
        pinger.events(),
        client.handle().stats()
    );
    client.stop(Duration::from_secs(1));
    drop(fillers);
}

/// A client that says nothing first: it records what it hears.
#[derive(Default, Clone)]
struct Hearer(std::sync::Arc<Mutex<Vec<String>>>);

impl Hearer {
    fn heard(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Handler for Hearer {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        self.0.lock().unwrap().push(format!("open {}", ctx.id()));
    }

    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        let msg = String::from_utf8_lossy(msg);
        self.0
            .lock()
            .unwrap()
            .push(format!("{} heard {msg}", ctx.id()));
    }

    fn on_close(&self, _: (), info: CloseInfo<'_>) {
        let reason = info.reason.name();
        self.0
            .lock()
            .unwrap()
            .push(format!("close {} {reason}", info.id));
    }

    fn on_connect_failed(&self, failure: ConnectFailure<'_>) {
        let (id, error) = (failure.id, failure.error.name());
        self.0.lock().unwrap().push(format!("failed {id} {error}"));
    }
}

/// Dials while the workers are parked and lets the peer act (`peer_acts`)
/// before any worker sees the connect complete, so the completion and the
/// peer's bytes (or its FIN) reach the client as one event. The client
/// sends nothing on open: no later write-space event can report the
/// readiness again. Returns the client, its record, the id and the peer.
fn peer_acts_before_the_connect_is_seen(
    write_interest: WriteInterest,
    peer_acts: impl FnOnce(&mut std::net::TcpStream),
) -> (eserver::Running, Hearer, ConnId, std::net::TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hearer = Hearer::default();
    let mut config = Config::default().without_listeners().threads(2);
    config.write_interest = write_interest;
    let client = Server::bind(config, hearer.clone())
        .unwrap()
        .start()
        .unwrap();
    let handle = client.handle();
    let (id, peer) = handle
        .with_workers_parked(|| {
            let id = handle.connect(addr).unwrap();
            // Loopback completes the handshake without the workers.
            let mut peer = accept_within(&listener);
            peer_acts(&mut peer);
            std::thread::sleep(Duration::from_millis(50));
            (id, peer)
        })
        .unwrap();
    (client, hearer, id, peer)
}

/// A review finding (invariant R): the connect's completion and the
/// peer's first bytes arrived as one event; the connect turn ran `on_open`
/// and released the read side, and nothing read the bytes (edge-triggered
/// epoll raises no new edge for them), so a peer that speaks first was
/// never heard.
///
/// With invariant S the `EPOLL_CTL_MOD` that disarms the connect's EPOLLOUT
/// re-reports the readiness and hid the bug; with EPOLLOUT registered for
/// the connection's life nothing did. Both settings are checked.
#[test]
fn a_peer_that_speaks_first_is_heard_though_its_bytes_came_with_the_connect() {
    heard_after_the_peer_acts("first message", "heard hello first", |peer| {
        use std::io::Write;
        peer.write_all(&common::frame(b"hello first")).unwrap();
    });
}

/// The same with the peer's end of stream: the dial is closed (EOF), not
/// left open until an idle timer, or forever.
#[test]
fn a_peer_that_hangs_up_at_once_is_heard_though_its_fin_came_with_the_connect() {
    heard_after_the_peer_acts("end of stream", "eof", |peer| {
        peer.shutdown(std::net::Shutdown::Write).unwrap();
    });
}

/// Under both write-interest settings: once the peer has acted (`act`)
/// before the connect is seen, the client must record `want` (an entry of
/// its record for this dial, which names it) within 5 s.
fn heard_after_the_peer_acts(what: &str, want: &str, act: fn(&mut std::net::TcpStream)) {
    for interest in [WriteInterest::AfterEagain, WriteInterest::Registered] {
        let (client, hearer, id, _peer) = peer_acts_before_the_connect_is_seen(interest, act);
        let heard = || {
            hearer
                .heard()
                .iter()
                .any(|e| e.contains(&id.to_string()) && e.ends_with(want))
        };
        assert!(
            wait_until(Duration::from_secs(5), heard),
            "{interest:?}, {id}: the peer's {what} was never read: {:?}",
            hearer.heard()
        );
        client.stop(Duration::from_secs(1));
    }
}

/// Hold points a client's `point` may name (1 to `HOLD_POINTS`).
const HOLD_POINTS: usize = 2;

/// Threads held at chosen syscalls (through `FaultSys::with_call_hook`):
/// after `arm(n)`, the next call for which the client's `point` says `n`
/// stops its thread until `go(n)`. Each point has its own release: with one
/// shared between two held threads, a release meant for one could reach the
/// other, whichever took the receiver first (a race that hung a test once,
/// under load).
struct Holds {
    armed: std::sync::Arc<std::sync::atomic::AtomicU8>,
    reached: std::sync::mpsc::Receiver<u8>,
    go: Vec<std::sync::mpsc::Sender<()>>,
}

impl Holds {
    fn arm(&self, point: u8) {
        self.armed.store(point, std::sync::atomic::Ordering::SeqCst);
    }
    fn reached(&self, point: u8) {
        // Bounded: a hold point never reached fails the test, not hangs it.
        let reached = self.reached.recv_timeout(Duration::from_secs(20));
        assert_eq!(reached, Ok(point), "hold point {point} not reached in 20 s");
    }
    fn go(&self, point: u8) {
        self.go[usize::from(point) - 1].send(()).unwrap();
    }
}

/// Hold points for a dial racing a worker: 1 = the dial (on a thread not
/// the server's) after its `connect`, 2 = a worker at its next
/// `worker_call`, 0 = anything else.
fn dial_and_worker(call: &str, worker_call: &str) -> u8 {
    let on_worker = std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("eserver-"));
    match (call, on_worker) {
        ("connect", false) => 1,
        (call, true) if call == worker_call => 2,
        _ => 0,
    }
}

/// A one-worker client (no listeners) on `FaultSys` over the real kernel,
/// without faults, whose calls stop where `point` (a call's name to a hold
/// point, 0 for none) and [`Holds::arm`] say.
fn client_with_holds(point: fn(&'static str) -> u8) -> (eserver::Running, Hearer, Holds) {
    client_with_holds_and(point, Config::default().without_listeners().threads(1))
}

/// [`client_with_holds`] with `config`.
fn client_with_holds_and(
    point: fn(&'static str) -> u8,
    config: Config,
) -> (eserver::Running, Hearer, Holds) {
    client_with_holds_at(point, config, Hold::AfterCall)
}

/// Where a held thread stops: after its call returned, or before the
/// kernel sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    AfterCall,
    BeforeCall,
}

/// [`client_with_holds_and`], holding threads where `hold` says.
fn client_with_holds_at(
    point: fn(&'static str) -> u8,
    config: Config,
    hold: Hold,
) -> (eserver::Running, Hearer, Holds) {
    use eserver::sys::LinuxSys;
    use eserver::sys::fault::{FaultConfig, FaultSys};
    use std::sync::atomic::{AtomicU8, Ordering};
    let armed = std::sync::Arc::new(AtomicU8::new(0));
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (go, go_rx): (Vec<_>, Vec<_>) = (0..HOLD_POINTS)
        .map(|_| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            (tx, Mutex::new(rx))
        })
        .unzip();
    let hook_armed = std::sync::Arc::clone(&armed);
    let hook = move |call| {
        let which = point(call);
        if which != 0
            && hook_armed
                .compare_exchange(which, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            reached_tx.send(which).unwrap();
            go_rx[usize::from(which) - 1]
                .lock()
                .unwrap()
                .recv()
                .unwrap();
        }
    };
    let sys = FaultSys::new(LinuxSys::new(), FaultConfig::none(0));
    let sys = match hold {
        Hold::AfterCall => sys.with_call_hook(std::sync::Arc::new(hook)),
        Hold::BeforeCall => sys.with_entry_hook(std::sync::Arc::new(hook)),
    };
    let hearer = Hearer::default();
    let running = Server::with_sys(sys, config, hearer.clone())
        .unwrap()
        .start()
        .unwrap();
    let holds = Holds { armed, reached, go };
    (running, hearer, holds)
}

/// A review finding (invariant C at shutdown): a `connect` from a
/// non-worker thread that had passed the shutdown check could go on after
/// the teardown had closed every descriptor of the server, and `dup2` its
/// socket onto a slot's pinned number, which by then could be a descriptor
/// the embedding program had opened. The teardown now waits for dials in
/// progress. The dial is held (a call hook) right after its `connect`
/// syscall while the server stops; the program then opens sockets
/// ([`ProgramSockets`]); the dial goes on; none of the program's sockets may
/// be replaced or see a byte, and the dial must be refused.
#[test]
fn a_dial_racing_the_teardown_never_lands_on_the_programs_descriptors() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // 1 = the dial after its `connect`; 2 = a worker's next wake-up call.
    let (running, hearer, held) = client_with_holds(|call| dial_and_worker(call, "eventfd_wake"));
    let handle = running.handle().clone();
    // A first dial, closed, so the next one reuses its slot and `dup2`s
    // onto the slot's pinned number.
    let first = handle.connect(addr).unwrap();
    let _peer = accept_within(&listener);
    assert!(wait_until(Duration::from_secs(5), || hearer
        .heard()
        .contains(&format!("open {first}"))));
    handle.close(first);
    assert!(wait_until(Duration::from_secs(5), || handle.stats().open == 0));

    held.arm(1);
    let dialer = std::thread::spawn(move || handle.connect(addr));
    held.reached(1);
    held.arm(2);
    let stopper = std::thread::spawn(move || running.stop(Duration::from_millis(100)));
    // The drain decided to stop, and the pool is closed: the dial will be
    // refused however late the stop runs from here.
    held.reached(2);
    held.go(2);
    // Without the fix the stop completes meanwhile, its numbers closed.
    std::thread::sleep(Duration::from_millis(300));
    let sockets = ProgramSockets::open(16);
    held.go(1);
    // And the dial is refused: had it been handed an id, no worker would be
    // left to report its open, close or failure (a review finding).
    let dialed = dialer.join().unwrap();
    assert!(
        matches!(dialed, Err(eserver::ConnectError::ShuttingDown { .. })),
        "{dialed:?}"
    );
    stopper.join().unwrap();
    sockets.assert_untouched();
}

/// Descriptors the embedding program opens once the server has stopped:
/// Unix socket pairs, which take the lowest free numbers. A server that
/// still used a number it had closed would write to one of them (its other
/// end receives the bytes: data delivered to the wrong peer) or `dup2` over
/// it (its number names another file).
struct ProgramSockets(Vec<(std::os::unix::net::UnixStream, std::path::PathBuf)>);

impl ProgramSockets {
    fn open(pairs: usize) -> Self {
        let mut ends = Vec::new();
        for _ in 0..pairs {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            for end in [a, b] {
                end.set_nonblocking(true).unwrap();
                let names = Self::names(&end);
                ends.push((end, names));
            }
        }
        Self(ends)
    }

    /// What the descriptor's number names (`socket:[inode]`).
    fn names(end: &std::os::unix::net::UnixStream) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", end.as_raw_fd())).unwrap()
    }

    fn assert_untouched(&self) {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        for (end, names) in &self.0 {
            let fd = end.as_raw_fd();
            let now = Self::names(end);
            assert_eq!(
                &now, names,
                "descriptor {fd} of the program now names another file"
            );
            let mut buf = [0u8; 64];
            match (&*end).read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!(
                    "descriptor {fd} of the program: its other end was written to, or closed: {other:?}"
                ),
            }
        }
    }
}

/// A call on a thread of the program, held at hold point 1 while the
/// server stops: the client (one worker, holds where `point` and `hold`
/// say) dials a listener of the test's, which accepts and never reads.
/// `call` runs on a thread named "caller" (see [`on_caller`]) with the handle and the
/// connection's id; once it is held, the server stops with `grace`; once
/// the stop has returned, or after `within` (with the teardown waiting for
/// the held call, it has not), the program opens sockets; then the call
/// goes on. None of the program's sockets may see a byte. Returns the
/// call's result.
fn a_held_call_racing_the_stop<T: Send + 'static>(
    point: fn(&'static str) -> u8,
    config: Config,
    hold: Hold,
    call: impl FnOnce(eserver::ServerHandle, ConnId) -> T + Send + 'static,
    grace: Duration,
    within: Duration,
) -> T {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (running, hearer, held) = client_with_holds_at(point, config, hold);
    let handle = running.handle().clone();
    let id = handle.connect(addr).unwrap();
    let _peer = accept_within(&listener);
    assert!(wait_until(Duration::from_secs(5), || hearer
        .heard()
        .contains(&format!("open {id}"))));

    held.arm(1);
    let caller = std::thread::Builder::new()
        .name("caller".into())
        .spawn(move || call(handle, id))
        .unwrap();
    held.reached(1);
    let stopper = std::thread::spawn(move || running.stop(grace));
    wait_until(within, || stopper.is_finished());
    let sockets = ProgramSockets::open(16);
    held.go(1);
    let result = caller.join().unwrap();
    stopper.join().unwrap();
    sockets.assert_untouched();
    result
}

/// Hold point 1 for the thread named "caller" at any of `calls`.
fn on_caller(call: &str, calls: &[&str]) -> u8 {
    let named = std::thread::current().name() == Some("caller");
    u8::from(named && calls.contains(&call))
}

/// A review finding (invariant C at shutdown): a `ServerHandle`
/// send on a thread of the program could hold a connection's write side
/// past the drain's give-up. The workers stopped, the teardown closed every
/// number, and the send went on writing through the slot's number, by then
/// a descriptor the program had opened. The teardown now waits for calls
/// from other threads in progress. The sender is held (a call hook) after
/// its first, partial, write of a message larger than the socket takes (the
/// peer reads nothing); the server stops with no grace, so the forced close
/// cannot reclaim the slot and the drain gives up a second later (without
/// the fix, the stop then returns, its numbers closed).
#[test]
fn a_send_held_past_the_give_up_never_reaches_the_programs_sockets() {
    let _ = a_held_call_racing_the_stop(
        |call| on_caller(call, &["send", "send_vectored"]),
        Config::default()
            .without_listeners()
            .threads(1)
            .max_out(32 << 20),
        Hold::AfterCall,
        |handle, id| handle.send_raw(id, vec![7u8; 16 << 20]),
        Duration::ZERO,
        Duration::from_secs(3),
    );
}

/// A review finding (invariant C at shutdown): a wake-up from a
/// thread of the program (here a `close` asking a worker for the close)
/// checked that the server was not torn down, then wrote the waker's
/// eventfd; a teardown in between closed that number, and the program could
/// have reused it. The wake is held (a call hook) just before its write;
/// the stop's own wake-up reaches the worker, which closes the connection
/// (the drain would anyway) and stops.
#[test]
fn a_wake_racing_the_teardown_never_reaches_the_programs_sockets() {
    let closed = a_held_call_racing_the_stop(
        |call| on_caller(call, &["eventfd_wake"]),
        Config::default().without_listeners().threads(1),
        Hold::BeforeCall,
        |handle, id| handle.close(id),
        Duration::from_secs(1),
        Duration::from_secs(2),
    );
    assert!(closed, "the close was asked of an open connection");
}

/// A review finding: a dial's idle timer was scheduled before the dial had
/// registered its socket and handed the read side over. With the dialing
/// thread held past the idle timeout, the timer's close was taken for a
/// shutdown's: `connect` returned `ShuttingDown` on a running server, and
/// the close was counted as one. The timer now starts once the dial is
/// handed over.
#[test]
fn an_idle_timeout_while_the_dial_registers_is_not_a_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        idle_timeout: Some(Duration::from_millis(50)),
        ..Config::default().without_listeners().threads(1)
    };
    let (running, hearer, held) =
        client_with_holds_and(|call| u8::from(call == "epoll_add"), config);
    let handle = running.handle().clone();
    held.arm(1);
    let dialer = std::thread::spawn(move || handle.connect(addr));
    held.reached(1);
    // Well past the idle timeout, with the dial not yet registered.
    std::thread::sleep(Duration::from_millis(300));
    held.go(1);
    let id = dialer.join().unwrap().expect("a running server's dial");
    let _peer = accept_within(&listener);
    // The connection opens, then times out idle: as any other would.
    assert!(
        wait_until(Duration::from_secs(5), || hearer
            .heard()
            .contains(&format!("close {id} idle_timeout"))),
        "{:?}",
        hearer.heard()
    );
    let stats = running.stop(Duration::from_secs(1));
    assert_eq!(stats.closed_for(CloseReason::Shutdown), 0);
    assert_eq!(stats.closed_for(CloseReason::IdleTimeout), 1);
}

/// A review finding: the drain's forced closes at its deadline ran once,
/// over the connections open then. A dial that took its slot after that
/// sweep (while another connection still kept the drain going) and never
/// completed was left open until the drain gave up and stopped, and the
/// handler never heard of it. Two dials to a listener that answers no SYN:
/// the first keeps the drain going; the worker is held inside its forced
/// close (a call hook) while the second takes its slot; then both must be
/// reported.
#[test]
fn a_dial_that_takes_its_slot_after_the_deadline_sweep_is_closed_and_reported() {
    let (_listener, addr, _fillers) = unanswering_listener();
    // Held points: 1 = the racing dial after its `connect`, 2 = a worker
    // at its next `dup2` (covering a closed dial's number).
    let (running, hearer, held) = client_with_holds(|call| dial_and_worker(call, "dup2"));
    let handle = running.handle().clone();
    let first = handle.connect(addr).unwrap();

    held.arm(1);
    let racer_handle = handle.clone();
    let racer = std::thread::spawn(move || racer_handle.connect(addr));
    held.reached(1);
    held.arm(2);
    // No grace: the drain's first step is past the deadline, and its sweep
    // closes the first dial; the hook holds the worker in that close.
    let stopper = std::thread::spawn(move || running.stop(Duration::ZERO));
    held.reached(2);
    held.go(1); // the racing dial takes its slot
    let second = racer.join().unwrap().unwrap();
    held.go(2); // the worker finishes the first close
    stopper.join().unwrap();
    let heard = hearer.heard();
    for id in [first, second] {
        assert!(
            heard.iter().any(|e| e == &format!("failed {id} ECANCELED")),
            "{id}: no outcome reported: {heard:?}"
        );
    }
}

/// The drain's last look and the pool's closing are one step: a dial that
/// passed its shutdown check, held until the drain has decided to stop
/// (the worker is held at the wake-up that follows its decision, before
/// any teardown), must find no slot and be refused. Checked out in that
/// window, it would be handed an id that no worker is left to serve.
#[test]
fn a_dial_after_the_drains_last_look_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // 1 = the dial after its `connect`; 2 = a worker's next wake-up call.
    let (running, _, held) = client_with_holds(|call| dial_and_worker(call, "eventfd_wake"));
    let handle = running.handle().clone();
    held.arm(1);
    let dialer = std::thread::spawn(move || handle.connect(addr));
    held.reached(1);
    held.arm(2);
    let stopper = std::thread::spawn(move || running.stop(Duration::from_secs(1)));
    held.reached(2); // the drain decided to stop: nothing was in use
    held.go(1); // the dial goes on
    let dialed = dialer.join().unwrap();
    held.go(2); // the worker goes on
    stopper.join().unwrap();
    assert!(
        matches!(dialed, Err(eserver::ConnectError::ShuttingDown { .. })),
        "{dialed:?}"
    );
}

/// An audit finding: a dial that passed its shutdown check before the
/// drain began, but opened its slot after the drain had listed the open
/// connections, got no drain turn. Still connecting (its SYNs dropped), it
/// held the stop for the whole grace period, as the dial in
/// `a_graceful_stop_cancels_a_pending_dial_with_nothing_queued_at_once`
/// did before its fix. A dial that opens while the server drains now takes
/// its turn itself. Another dial, with a send queued, keeps the drain going
/// meanwhile (it waits for its connect, to flush).
#[test]
fn a_dial_opened_after_the_drain_began_is_cancelled_at_once() {
    let (_listener, addr, _fillers) = unanswering_listener();
    // 1 = a dial after its `connect` (worker calls are not held).
    let (running, hearer, held) = client_with_holds(|call| dial_and_worker(call, "none"));
    let handle = running.handle().clone();
    let waiting = handle.connect(addr).unwrap();
    handle.send(waiting, b"queued").unwrap();
    held.arm(1);
    let dialer = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.connect(addr))
    };
    held.reached(1);
    handle.shutdown(Duration::from_secs(10));
    // The drain lists the open connections meanwhile: `waiting` only.
    std::thread::sleep(Duration::from_millis(200));
    held.go(1);
    let late = dialer.join().unwrap().unwrap();
    // The SYN and its retransmissions (1 s and 3 s) are dropped: within
    // 2 s, only a cancel can end it.
    assert!(
        wait_until(Duration::from_secs(2), || hearer
            .heard()
            .contains(&format!("failed {late} ECANCELED"))),
        "{late}: a dial opened during the drain was left to the deadline: {:?}",
        hearer.heard()
    );
    assert!(
        !hearer
            .heard()
            .iter()
            .any(|e| e.contains(&waiting.to_string()))
    );
    handle.close(waiting);
    let stats = running.join();
    assert_eq!((stats.open, stats.closed_total()), (0, 2), "{stats}");
}
