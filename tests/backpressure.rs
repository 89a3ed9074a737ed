//! Invariant S and flow control on the real kernel: a client with a tiny
//! receive buffer that stops reading still gets every reply, whole and in
//! order; the server takes the EPOLLOUT path (counted) and stops reading the
//! client while its output is over `max_out` instead of buffering without
//! bound.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Client, frame, start, wait_for_stats, wait_until};
use eserver::apps::Echo;
use socket2::{Domain, Socket, Type};

fn tiny_receive_buffer_client(addr: SocketAddr) -> Client {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    Client::from_stream(TcpStream::from(socket))
}

/// A tiny-buffer client whose writer thread sends `count` 16 KiB frames
/// while nobody reads the replies yet. Returns the client (to read with),
/// the payloads in order, and the writer.
fn flood_without_reading(
    server: &eserver::Running,
    count: u32,
) -> (Client, Vec<Vec<u8>>, std::thread::JoinHandle<()>) {
    let client = tiny_receive_buffer_client(server.local_addr().unwrap());
    let payloads: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let mut p = i.to_le_bytes().to_vec();
            p.resize(16 << 10, (i % 251) as u8);
            p
        })
        .collect();
    let wire: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
    let mut writer = Client::from_stream(client.stream.try_clone().unwrap());
    let sender = std::thread::spawn(move || writer.send_bytes(&wire));
    (client, payloads, sender)
}

#[test]
fn a_client_that_stops_reading_gets_everything_and_the_server_arms_epollout() {
    // A small max_out so flow control engages well before the total.
    let server = start(Echo, 2, |c| c.max_out(64 << 10));
    let handle = server.handle().clone();
    // 32 MiB of replies: far more than the kernel's socket buffers hold.
    let (mut client, payloads, sender) = flood_without_reading(&server, 2000);
    // Do not read: the server's writes hit EAGAIN, it arms EPOLLOUT and
    // pauses the reader (the client never reads meanwhile, so waiting for
    // it is bounded by the server, not by the scheduler).
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = handle.stats();
            s.epollout_arms >= 1 && s.reader_pauses >= 1
        }),
        "EPOLLOUT never armed or the reader never paused: {}",
        handle.stats()
    );
    let stalled = handle.stats();
    assert!(
        stalled.msgs_in < 2000,
        "the server read everything while the client did not read: no flow control ({stalled})"
    );
    for (i, p) in payloads.iter().enumerate() {
        assert_eq!(&client.recv(), p, "reply {i}");
    }
    sender.join().unwrap();
    wait_for_stats(&handle, "every request counted", |s| s.msgs_in == 2000);
    assert_eq!(handle.stats().open, 1);
}

#[test]
fn epollout_is_never_armed_when_the_client_keeps_up() {
    let server = start(Echo, 2, |c| c);
    let mut client = Client::connect(server.local_addr().unwrap());
    for i in 0..500u32 {
        client.send(&i.to_le_bytes());
        assert_eq!(client.recv(), i.to_le_bytes());
    }
    assert_eq!(
        server.handle().stats().epollout_arms,
        0,
        "send first: no EPOLLOUT without EAGAIN"
    );
}

/// Greets every connection with 4 MiB, far more than a socket buffer.
struct BigGreeting;

impl eserver::Handler for BigGreeting {
    type Conn = ();

    fn on_open(&self, ctx: &mut eserver::Ctx<'_>) {
        ctx.reply(&vec![b'g'; 4 << 20]).unwrap();
    }

    fn on_message(&self, _conn: &mut (), ctx: &mut eserver::Ctx<'_>, msg: &[u8]) {
        ctx.reply(msg).unwrap();
    }
}

/// Regression (found by the simulation): a greeting that does not fit the
/// socket buffer was flushed before the connection was registered, so
/// arming EPOLLOUT failed and the connection was closed.
#[test]
fn a_greeting_larger_than_the_socket_buffer_arrives_whole() {
    let server = start(BigGreeting, 2, |c| c.max_out(64 << 10));
    let mut client = tiny_receive_buffer_client(server.local_addr().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(client.recv(), vec![b'g'; 4 << 20]);
    client.send(b"after");
    assert_eq!(client.recv(), b"after");
}

#[test]
fn registered_write_interest_delivers_everything_without_rearming() {
    // The alternative to invariant S kept for measurement: EPOLLOUT in the
    // registration for good. It must be as correct, and never re-arm.
    let server = start(Echo, 2, |c| eserver::Config {
        write_interest: eserver::WriteInterest::Registered,
        ..c.max_out(64 << 10)
    });
    let handle = server.handle().clone();
    let (mut client, payloads, sender) = flood_without_reading(&server, 500);
    std::thread::sleep(Duration::from_millis(300));
    for (i, p) in payloads.iter().enumerate() {
        assert_eq!(&client.recv(), p, "reply {i}");
    }
    sender.join().unwrap();
    wait_for_stats(&handle, "every request counted", |s| s.msgs_in == 500);
    let done = handle.stats();
    assert!(
        done.epollout_arms <= 1,
        "re-armed with EPOLLOUT registered: {done}"
    );
}
