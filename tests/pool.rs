//! Invariant C on the real kernel: a stale handle reaches nobody, and a full
//! pool leaves connections pending without losing them. (Slot reuse order and
//! descriptor numbers are checked in `tests/fd_numbers.rs`, alone in its
//! process.)
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, Tagged, start, wait_until};
use eserver::{ConnId, ListenAddr, SendError};

#[test]
fn a_stale_handle_reaches_nobody() {
    let server = start(Tagged, 2, |c| c.max_conns(1));
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();

    let (mut first, old) = Client::connect_tagged(addr);
    assert_eq!(handle.send(old, b"to the first"), Ok(()));
    assert_eq!(first.recv(), b"to the first");
    first.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(wait_until(Duration::from_secs(5), || !handle.is_open(old)));

    // The only slot goes to a new client.
    let (mut second, new) = Client::connect_tagged(addr);
    assert_eq!(new.slot(), old.slot());
    assert_ne!(new.generation(), old.generation());

    assert_eq!(handle.send(old, b"leak"), Err(SendError::Closed(old)));
    assert!(!handle.close(old), "a stale close is refused too");
    second.expect_silence(Duration::from_millis(300));

    // The live handle still works, and the connection was not closed.
    handle.send(new, b"to the second").unwrap();
    assert_eq!(second.recv(), b"to the second");
    second.send(b"echo");
    assert_eq!(second.recv(), b"echo");
    assert!(handle.stats().sends_closed >= 1);
}

#[test]
fn a_full_pool_leaves_connections_pending_until_a_slot_frees() {
    let server = start(Tagged, 2, |c| c.max_conns(2));
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();
    let (a, a_id) = Client::connect_tagged(addr);
    let (_b, _) = Client::connect_tagged(addr);
    // The third connects (the kernel completes the handshake) but waits in
    // the backlog: no greeting yet.
    let mut c = Client::connect(addr);
    c.expect_silence(Duration::from_millis(300));
    // Counted when the acceptor's batch ends: waited for, not read once.
    assert!(
        wait_until(Duration::from_secs(5), || handle.stats().pool_full >= 1),
        "the full pool was never counted: {}",
        handle.stats()
    );
    // Freeing a slot lets it in, with no new connection to wake the listener.
    a.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(wait_until(Duration::from_secs(5), || !handle.is_open(a_id)));
    let greeting = c.recv();
    assert_eq!(greeting, format!("{} 1", a_id.slot()).as_bytes());
    c.send(b"in");
    assert_eq!(c.recv(), b"in");
}

/// A review finding: with the pool full, every accept turn started at the
/// first listener and took one connection from it, so while it had a
/// backlog, a connection pending on another listener was never accepted,
/// however many slots freed.
#[test]
fn a_full_pool_serves_every_listener_in_turn() {
    let server = start(Tagged, 1, |mut c| {
        c.listen.push(ListenAddr::from(
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        ));
        c.max_conns(1)
    });
    let addrs: Vec<SocketAddr> = server
        .local_addrs()
        .iter()
        .map(|a| match a {
            ListenAddr::Tcp(addr) => *addr,
            other => panic!("not TCP: {other:?}"),
        })
        .collect();
    let handle = server.handle().clone();
    // The only slot, taken through the first listener.
    let (first, first_id) = Client::connect_tagged(addrs[0]);
    // One connection waits on the second listener, then two on the first.
    let mut other = Client::connect(addrs[1]);
    let mut queued = Client::connect(addrs[0]);
    let _behind = Client::connect(addrs[0]);
    other.expect_silence(Duration::from_millis(100));
    // The slot frees: the second listener's turn.
    first.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(wait_until(Duration::from_secs(5), || !handle.is_open(first_id)));
    let greeting = String::from_utf8(other.recv()).unwrap();
    let mut parts = greeting.split(' ').map(|p| p.parse::<u32>().unwrap());
    let other_id = ConnId::new(parts.next().unwrap(), parts.next().unwrap());
    // And once it frees again, the first listener's.
    other.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(wait_until(Duration::from_secs(5), || !handle.is_open(other_id)));
    queued.recv();
}
