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

const TIMEOUT: Duration = Duration::from_millis(300);

/// Greets every connection with `GREETING` bytes, then echoes.
struct Greeter;

/// Far more than the kernel buffers between the server and a peer that
/// does not read (on loopback, the server's send buffer grows to a few
/// MiB): the rest waits in the server.
const GREETING: usize = 8 << 20;

impl Handler for Greeter {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        ctx.reply(&vec![7; GREETING]).unwrap();
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
    let server = start(Greeter, 2, |c| c.send_timeout(TIMEOUT));
    let connected = Instant::now();
    let _client = small_window_client(server.local_addr().unwrap());
    wait_for_stats(server.handle(), "the send timeout", |s| {
        s.closed_for(CloseReason::SendTimeout) == 1
    });
    // Never before a whole timeout.
    assert!(connected.elapsed() >= TIMEOUT, "{:?}", connected.elapsed());
    let stats = server.handle().stats();
    assert_eq!((stats.open, stats.closed_total()), (0, 1), "{stats}");
}

#[test]
fn a_peer_that_reads_slowly_is_never_closed() {
    let server = start(Greeter, 2, |c| c.send_timeout(TIMEOUT));
    let mut client = small_window_client(server.local_addr().unwrap());
    // The greeting (its 4-byte header too) in bursts of 512 KiB, 100 ms
    // apart: 16 bursts, about a second and a half, the first ten or so with
    // output waiting in the server, but the kernel takes some of it within
    // every timeout.
    let started = Instant::now();
    let mut left = GREETING + 4;
    let mut buf = vec![0; 64 << 10];
    while left > 0 {
        let mut burst = (512 << 10).min(left);
        while burst > 0 {
            let want = burst.min(buf.len());
            let n = client.stream.read(&mut buf[..want]).unwrap();
            assert!(n > 0, "closed with {left} bytes of the greeting unread");
            burst -= n;
            left -= n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started.elapsed() > 3 * TIMEOUT, "{:?}", started.elapsed());
    // The output did wait on the client.
    assert!(server.handle().stats().epollout_arms > 0);
    // Idle with nothing to receive: no send timeout either.
    std::thread::sleep(3 * TIMEOUT);
    client.send(b"still here");
    assert_eq!(client.recv(), b"still here");
    let stats = server.handle().stats();
    assert_eq!(stats.closed_total(), 0, "{stats}");
}
