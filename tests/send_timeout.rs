//! The send timeout on the real kernel: a peer that stops reading is closed
//! once its output has waited a whole timeout with the kernel taking none
//! of it (so it no longer holds its queued output, its share of the
//! server-wide budget, or a close after flush, for good); a peer that reads
//! slowly, or is idle with nothing to receive, is never closed for it.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Client, start, wait_for_stats};
use eserver::{CloseReason, Ctx, Handler};
use socket2::{Domain, Socket, Type};

/// Greets every connection with this many frames of 1 MiB, then echoes.
/// Far more than the kernel buffers between the server and a peer that
/// does not read (on loopback, the server's send buffer grows to a few
/// MiB): the rest waits in the server.
struct Greeter(usize);

/// The bytes of a greeting of `frames` frames on the wire.
const fn greeting_bytes(frames: usize) -> usize {
    frames * ((1 << 20) + 4)
}

impl Handler for Greeter {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        let frame = vec![7; 1 << 20];
        for _ in 0..self.0 {
            ctx.reply(&frame).unwrap();
        }
    }

    fn on_message(&self, _: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        ctx.reply(msg).unwrap();
    }
}

/// A client with a small receive window (4 KiB), so the server's output
/// waits on it at once.
fn small_window_client(addr: SocketAddr) -> Client {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    Client::from_stream(std::net::TcpStream::from(socket))
}

#[test]
fn a_peer_that_reads_nothing_is_closed_after_the_send_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let server = start(Greeter(8), 2, |c| c.send_timeout(TIMEOUT));
    let connected = Instant::now();
    let _client = small_window_client(server.local_addr().unwrap());
    wait_for_stats(server.handle(), "the send timeout", |s| {
        s.closed_for(CloseReason::SendTimeout) == 1 && s.closed_total() == 1 && s.open == 0
    });
    // Never before a whole timeout.
    assert!(connected.elapsed() >= TIMEOUT, "{:?}", connected.elapsed());
}

#[test]
fn a_peer_that_reads_slowly_is_never_closed() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let server = start(Greeter(24), 2, |c| c.send_timeout(TIMEOUT));
    let mut client = small_window_client(server.local_addr().unwrap());
    // The greeting (24 MiB and headers) in bursts of 1 MiB, 100 ms
    // apart: 24 bursts, about two and a half seconds, most of them with
    // output waiting in the server, and the kernel takes some of it many
    // times within every timeout (the server's writes wait for a third of
    // its send buffer to drain: one or two bursts, a few hundred ms).
    let started = Instant::now();
    let mut left = greeting_bytes(24);
    let mut buf = vec![0; 64 << 10];
    while left > 0 {
        let mut burst = (1 << 20).min(left);
        while burst > 0 {
            let want = burst.min(buf.len());
            let n = client.stream.read(&mut buf[..want]).unwrap();
            assert!(n > 0, "closed with {left} bytes of the greeting unread");
            burst -= n;
            left -= n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started.elapsed() > 2 * TIMEOUT, "{:?}", started.elapsed());
    // The output did wait on the client.
    assert!(server.handle().stats().epollout_arms > 0);
    // Idle with nothing to receive: no send timeout either.
    std::thread::sleep(2 * TIMEOUT);
    client.send(b"still here");
    assert_eq!(client.recv(), b"still here");
    let stats = server.handle().stats();
    assert_eq!(stats.closed_total(), 0, "{stats}");
}

/// A zero send timeout means "never" (as `--send-timeout 0` does), not a
/// close at the first look: a peer whose output waits on it (the premise,
/// checked: the writer met EAGAIN) is not closed however long it waits.
/// (`zero_timeouts_close_nobody` in tests/echo.rs covers the other
/// timeouts; its client reads everything, so no write of its ever waits.)
#[test]
fn a_zero_send_timeout_closes_nobody() {
    let server = start(Greeter(4), 2, |c| c.send_timeout(Duration::ZERO));
    let mut client = small_window_client(server.local_addr().unwrap());
    wait_for_stats(server.handle(), "the greeting to wait", |s| {
        s.epollout_arms > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut left = greeting_bytes(4);
    let mut buf = vec![0; 64 << 10];
    while left > 0 {
        let n = client.stream.read(&mut buf[..left.min(64 << 10)]).unwrap();
        assert!(n > 0, "closed with {left} bytes of the greeting unread");
        left -= n;
    }
    client.send(b"still here");
    assert_eq!(client.recv(), b"still here");
    let stats = server.handle().stats();
    assert_eq!(stats.closed_total(), 0, "{stats}");
}
