//! Invariant C on the real kernel: a stale handle reaches nobody, and a full
//! pool leaves connections pending without losing them. (Slot reuse order and
//! descriptor numbers are checked in `tests/fd_numbers.rs`, alone in its
//! process.)
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, Tagged, start, wait_until};
use eserver::SendError;

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
    assert!(handle.stats().pool_full >= 1);
    // Freeing a slot lets it in, with no new connection to wake the listener.
    a.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(wait_until(Duration::from_secs(5), || !handle.is_open(a_id)));
    let greeting = c.recv();
    assert_eq!(greeting, format!("{} 1", a_id.slot()).as_bytes());
    c.send(b"in");
    assert_eq!(c.recv(), b"in");
}
