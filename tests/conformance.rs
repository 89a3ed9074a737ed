//! The simulated kernel against the real one: every behaviour the server
//! relies on, written once against [`Kernel`] and run on `LinuxSys` (loopback
//! sockets) and on `SimSys`, with the same expectations. A behaviour that is
//! not checked here is not trusted in the simulation.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use eserver::sys::sim::{SimClient, SimConfig, SimSys};
use eserver::sys::{
    Errno, Event, Fd, Interest, LinuxSys, ListenAddr, ListenOptions, Readiness, Sys,
};
use socket2::Socket;

/// A kernel under test, with a way to play the client side.
trait Kernel: Sys + Sized {
    type Client;
    fn client_connect(&self, addr: &ListenAddr) -> Self::Client;
    fn client_write(&self, c: &mut Self::Client, data: &[u8]);
    /// Bytes available now; `Ok(empty)` at end of stream.
    fn client_read(&self, c: &mut Self::Client) -> Result<Vec<u8>, Errno>;
    fn client_shutdown(&self, c: &mut Self::Client);
    /// An ordinary close (FIN, or RST if input is left unread).
    fn client_close(&self, c: Self::Client);
    /// RST (SO_LINGER 0 close).
    fn client_reset(&self, c: Self::Client);
    /// A listener on another host, for the server's own `connect`.
    type Remote;
    fn remote_listen(&self) -> (SocketAddr, Self::Remote);
    /// The remote accepts the oldest dial (on loopback the handshake is
    /// already done; the simulation completes it here).
    fn remote_accept(&self, remote: &Self::Remote, addr: SocketAddr) -> Self::Client;
    /// A reachable address nobody listens on.
    fn closed_addr(&self) -> SocketAddr;
    fn lowest_free(&self) -> Fd {
        let fd = self.eventfd().unwrap();
        self.close(fd).unwrap();
        fd
    }
}

impl Kernel for LinuxSys {
    type Client = TcpStream;

    fn client_connect(&self, addr: &ListenAddr) -> TcpStream {
        let ListenAddr::Tcp(addr) = addr else {
            panic!("tcp only")
        };
        let s = TcpStream::connect(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    fn client_write(&self, c: &mut TcpStream, data: &[u8]) {
        c.set_nonblocking(false).unwrap();
        c.write_all(data).unwrap();
        c.set_nonblocking(true).unwrap();
        settle();
    }

    fn client_read(&self, c: &mut TcpStream) -> Result<Vec<u8>, Errno> {
        let mut all = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return Ok(all),
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return if all.is_empty() {
                        Err(Errno::EAGAIN)
                    } else {
                        Ok(all)
                    };
                }
                Err(e) => return Err(Errno(e.raw_os_error().unwrap())),
            }
        }
    }

    fn client_shutdown(&self, c: &mut TcpStream) {
        c.shutdown(std::net::Shutdown::Write).unwrap();
        settle();
    }

    fn client_close(&self, c: TcpStream) {
        drop(c);
        settle();
    }

    fn client_reset(&self, c: TcpStream) {
        let s = Socket::from(c);
        s.set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
        settle();
    }

    type Remote = TcpListener;

    fn remote_listen(&self) -> (SocketAddr, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (listener.local_addr().unwrap(), listener)
    }

    fn remote_accept(&self, remote: &TcpListener, _addr: SocketAddr) -> TcpStream {
        let (s, _) = remote.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        settle();
        s
    }

    fn closed_addr(&self) -> SocketAddr {
        // A port just released: nothing listens there.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }
}

/// Loopback delivers synchronously, but give the peer's stack a moment.
fn settle() {
    std::thread::sleep(Duration::from_millis(20));
}

impl Kernel for SimSys {
    type Client = SimClient;

    fn client_connect(&self, addr: &ListenAddr) -> SimClient {
        self.connect(addr).unwrap()
    }

    fn client_write(&self, c: &mut SimClient, data: &[u8]) {
        let mut at = 0;
        while at < data.len() {
            at += self.client_send(*c, &data[at..]).unwrap();
        }
    }

    fn client_read(&self, c: &mut SimClient) -> Result<Vec<u8>, Errno> {
        let mut all = Vec::new();
        loop {
            match SimSys::client_recv(self, *c, 65536) {
                Ok(data) if data.is_empty() => return Ok(all),
                Ok(data) => all.extend(data),
                Err(e) if e.is_would_block() && !all.is_empty() => return Ok(all),
                Err(e) => return Err(e),
            }
        }
    }

    fn client_shutdown(&self, c: &mut SimClient) {
        SimSys::client_shutdown(self, *c).unwrap();
    }

    fn client_close(&self, c: SimClient) {
        SimSys::client_close(self, c).unwrap();
    }

    fn client_reset(&self, c: SimClient) {
        SimSys::client_reset(self, c).unwrap();
    }

    type Remote = ();

    fn remote_listen(&self) -> (SocketAddr, ()) {
        let addr: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        self.listen_remote(addr);
        (addr, ())
    }

    fn remote_accept(&self, _remote: &(), addr: SocketAddr) -> SimClient {
        self.accept_remote(addr).unwrap()
    }

    fn closed_addr(&self) -> SocketAddr {
        "127.0.0.3:5000".parse().unwrap()
    }
}

const EXPECT: Option<Duration> = Some(Duration::from_secs(2));
const NONE: Option<Duration> = Some(Duration::from_millis(50));

/// A listener, an epoll with it registered, and one accepted connection.
struct Setup<K: Kernel> {
    epoll: Fd,
    listener: Fd,
    addr: ListenAddr,
    conn: Fd,
    client: K::Client,
}

const LISTENER: u64 = 1 << 63;
const CONN: u64 = 42;

fn wait<K: Kernel>(k: &K, epoll: Fd, timeout: Option<Duration>) -> Vec<(u64, Readiness)> {
    let mut events = [Event::default(); 16];
    let n = k.epoll_wait(epoll, &mut events, timeout).unwrap();
    events[..n]
        .iter()
        .map(|e| (e.token(), e.readiness()))
        .collect()
}

fn setup<K: Kernel>(k: &K) -> Setup<K> {
    let listener = k
        .listen(&"127.0.0.1:0".parse().unwrap(), &ListenOptions::default())
        .unwrap();
    let addr = k.local_addr(listener).unwrap();
    let epoll = k.epoll_create().unwrap();
    k.epoll_add(epoll, listener, Interest::Read, LISTENER)
        .unwrap();
    let client = k.client_connect(&addr);
    assert_eq!(wait(k, epoll, EXPECT).first().map(|e| e.0), Some(LISTENER));
    let (conn, _) = k.accept(listener).unwrap();
    k.epoll_add(epoll, conn, Interest::Read, CONN).unwrap();
    assert!(
        wait(k, epoll, NONE).is_empty(),
        "a fresh connection is not readable"
    );
    Setup {
        epoll,
        listener,
        addr,
        conn,
        client,
    }
}

fn teardown<K: Kernel>(k: &K, s: Setup<K>) {
    for fd in [s.conn, s.listener, s.epoll] {
        let _ = k.close(fd);
    }
}

fn read_all<K: Kernel>(k: &K, fd: Fd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match k.recv(fd, &mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.is_would_block() => return out,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

// ---------------------------------------------------------------- the checks

/// `accept` and every new descriptor get the lowest free number.
fn lowest_free_number<K: Kernel>(k: &K) {
    let a = k.eventfd().unwrap();
    let b = k.eventfd().unwrap();
    assert!(b > a);
    k.close(a).unwrap();
    assert_eq!(
        k.eventfd().unwrap(),
        a,
        "the lowest free number is reused first"
    );
    k.close(a).unwrap();
    k.close(b).unwrap();
}

/// Calls on a number that is not open fail with EBADF, never a panic (an
/// audit found LinuxSys's `local_addr` and `connect_status` panicking on
/// -1, and its `dup2(n, n)` succeeding for a closed `n`).
fn bad_descriptors_are_ebadf<K: Kernel>(k: &K) {
    assert_eq!(k.local_addr(-1).err(), Some(Errno::EBADF));
    assert_eq!(k.connect_status(-1).err(), Some(Errno::EBADF));
    let free = k.lowest_free();
    assert_eq!(k.dup2(free, free).err(), Some(Errno::EBADF));
    let open = k.eventfd().unwrap();
    assert_eq!(k.dup2(open, open), Ok(()), "an open number onto itself");
    k.close(open).unwrap();
}

/// At the soft limit, new descriptors fail with EMFILE; and an accept that
/// fails so leaves the connection pending, with no new edge.
fn fd_limit_and_emfile_on_accept<K: Kernel>(k: &K) {
    let s = setup(k);
    // The client first: on the real kernel its socket is one of ours too.
    let mut waiting = k.client_connect(&s.addr);
    assert_eq!(
        wait(k, s.epoll, EXPECT).first().map(|e| e.0),
        Some(LISTENER)
    );
    let (soft, _) = k.nofile_limit().unwrap();
    let free = k.lowest_free() as u64;
    k.set_nofile_soft_limit(free).unwrap();
    assert_eq!(k.eventfd(), Err(Errno::EMFILE));
    assert_eq!(k.accept(s.listener).map(|_| ()), Err(Errno::EMFILE));
    assert!(
        wait(k, s.epoll, NONE).is_empty(),
        "no new edge for a connection already pending"
    );
    k.set_nofile_soft_limit(soft).unwrap();
    let (fd, _) = k.accept(s.listener).expect("still pending after EMFILE");
    k.client_write(&mut waiting, b"x");
    let mut buf = [0u8; 4];
    assert_eq!(k.recv(fd, &mut buf), Ok(1));
    k.close(fd).unwrap();
    teardown(k, s);
}

/// `dup2(x, x)` does nothing; `dup2` over an open number releases what it
/// held; a description lives while any number refers to it.
fn dup2_and_reference_counts<K: Kernel>(k: &K) {
    let mut s = setup(k);
    assert_eq!(k.dup2(s.conn, s.conn), Ok(()));
    // A second number for the same socket.
    let other = k.eventfd().unwrap();
    k.dup2(s.conn, other).unwrap();
    k.close(s.conn).unwrap();
    k.client_write(&mut s.client, b"still open");
    let mut buf = [0u8; 32];
    assert_eq!(
        k.recv(other, &mut buf),
        Ok(10),
        "the socket lives through its other number"
    );
    // Covering the last number releases the socket: the peer sees the end.
    let placeholder = k.placeholder().unwrap();
    k.dup2(placeholder, other).unwrap();
    let_network_deliver();
    assert_eq!(
        k.client_read(&mut s.client),
        Ok(Vec::new()),
        "peer sees end of stream"
    );
    // The placeholder: end of stream for reads, EPIPE for writes.
    assert_eq!(k.recv(other, &mut buf), Ok(0));
    assert_eq!(k.send(other, b"x"), Err(Errno::EPIPE));
    k.close(other).unwrap();
    k.close(placeholder).unwrap();
    s.conn = k.eventfd().unwrap();
    teardown(k, s);
}

/// Registrations belong to (description, number): closing one number of a
/// description that is open elsewhere keeps its events coming; covering the
/// last number of a registered description drops the registration.
fn registrations_follow_descriptions<K: Kernel>(k: &K) {
    let mut s = setup(k);
    let alias = k.eventfd().unwrap();
    k.dup2(s.conn, alias).unwrap();
    k.close(s.conn).unwrap();
    k.client_write(&mut s.client, b"a");
    assert_eq!(
        wait(k, s.epoll, EXPECT).first().map(|e| e.0),
        Some(CONN),
        "events outlive the closed number"
    );
    assert!(
        k.epoll_delete(s.epoll, s.conn).is_err(),
        "the closed number cannot be unregistered"
    );
    // Cover the last number: the socket is released, its registration too.
    let placeholder = k.placeholder().unwrap();
    k.dup2(placeholder, alias).unwrap();
    assert_eq!(
        k.epoll_modify(s.epoll, alias, Interest::Read, CONN),
        Err(Errno::ENOENT),
        "the registration went with the description"
    );
    assert!(wait(k, s.epoll, NONE).is_empty());
    k.close(alias).unwrap();
    k.close(placeholder).unwrap();
    s.conn = k.eventfd().unwrap();
    teardown(k, s);
}

/// Edge-triggered: every arrival queues the descriptor again even if earlier
/// data was never read; reading raises no edge; each edge is reported once.
fn every_arrival_is_an_edge<K: Kernel>(k: &K) {
    let mut s = setup(k);
    k.client_write(&mut s.client, b"one");
    let first = wait(k, s.epoll, EXPECT);
    assert_eq!(first.len(), 1);
    assert!(first[0].1.contains(Readiness::IN));
    assert!(
        wait(k, s.epoll, NONE).is_empty(),
        "an edge is reported once"
    );
    // Not read; more arrives: a new edge (a second worker would get it).
    k.client_write(&mut s.client, b"two");
    assert_eq!(
        wait(k, s.epoll, EXPECT).len(),
        1,
        "new data, new edge, undrained or not"
    );
    assert_eq!(read_all(k, s.conn), b"onetwo");
    assert!(wait(k, s.epoll, NONE).is_empty(), "reading raises no edge");
    teardown(k, s);
}

/// `EPOLL_CTL_MOD` re-checks readiness: still-buffered data is reported
/// again, and arming write interest on a writable socket reports it at once.
fn modify_rechecks_readiness<K: Kernel>(k: &K) {
    let mut s = setup(k);
    k.client_write(&mut s.client, b"unread");
    assert_eq!(wait(k, s.epoll, EXPECT).len(), 1);
    assert!(wait(k, s.epoll, NONE).is_empty());
    k.epoll_modify(s.epoll, s.conn, Interest::Read, CONN)
        .unwrap();
    let again = wait(k, s.epoll, EXPECT);
    assert_eq!(again.len(), 1, "MOD reports data still buffered");
    assert!(again[0].1.contains(Readiness::IN));
    let _ = read_all(k, s.conn);
    k.epoll_modify(s.epoll, s.conn, Interest::ReadWrite, CONN)
        .unwrap();
    let writable = wait(k, s.epoll, EXPECT);
    assert!(
        writable
            .first()
            .is_some_and(|e| e.1.contains(Readiness::OUT)),
        "arming OUT on a writable socket"
    );
    teardown(k, s);
}

/// Writes are cut short when the buffer is nearly full and fail with EAGAIN
/// when it is full; once the peer reads, an EPOLLOUT edge comes.
fn short_writes_eagain_and_the_epollout_edge<K: Kernel>(k: &K) {
    let mut s = setup(k);
    k.epoll_modify(s.epoll, s.conn, Interest::ReadWrite, CONN)
        .unwrap();
    let _ = wait(k, s.epoll, EXPECT);
    let chunk = vec![7u8; 1 << 16];
    let mut sent = 0usize;
    let mut short = false;
    let blocked = loop {
        match k.send(s.conn, &chunk) {
            Ok(n) => {
                short |= n < chunk.len();
                sent += n;
            }
            Err(e) if e.is_would_block() => break true,
            Err(e) => panic!("send: {e}"),
        }
        if sent > 64 << 20 {
            break false;
        }
    };
    assert!(blocked, "a peer that does not read fills the buffer");
    assert!(
        short,
        "the write before EAGAIN took only part of the buffer"
    );
    assert!(wait(k, s.epoll, NONE).is_empty(), "no EPOLLOUT while full");
    // The peer reads everything: space, and an edge.
    let mut received = 0;
    while received < sent {
        match k.client_read(&mut s.client) {
            Ok(data) => received += data.len(),
            Err(e) if e.is_would_block() => let_network_deliver(),
            Err(e) => panic!("client read: {e}"),
        }
    }
    let events = wait(k, s.epoll, EXPECT);
    assert!(
        events.iter().any(|e| e.1.contains(Readiness::OUT)),
        "EPOLLOUT once the peer made room"
    );
    teardown(k, s);
}

/// Half-close: EPOLLRDHUP with the data, then end of stream.
fn half_close_is_rdhup<K: Kernel>(k: &K) {
    let mut s = setup(k);
    k.client_write(&mut s.client, b"last words");
    let _ = wait(k, s.epoll, EXPECT);
    k.client_shutdown(&mut s.client);
    expect_half_close_edge(k, s.epoll);
    assert_eq!(read_all(k, s.conn), b"last words");
    let mut buf = [0u8; 8];
    assert_eq!(
        k.recv(s.conn, &mut buf),
        Ok(0),
        "end of stream after the data"
    );
    // The other direction still works.
    assert_eq!(k.send(s.conn, b"reply"), Ok(5));
    let_network_deliver();
    assert_eq!(k.client_read(&mut s.client), Ok(b"reply".to_vec()));
    teardown(k, s);
}

/// The edge a client's half-close raises: readable, with EPOLLRDHUP.
fn expect_half_close_edge<K: Kernel>(k: &K, epoll: Fd) {
    let events = wait(k, epoll, EXPECT);
    assert!(
        events
            .first()
            .is_some_and(|e| e.1.contains(Readiness::IN | Readiness::RDHUP)),
        "{events:?}"
    );
}

/// The edge a reset raises: EPOLLERR and EPOLLHUP.
fn expect_reset_edge<K: Kernel>(k: &K, epoll: Fd) {
    let events = wait(k, epoll, EXPECT);
    assert!(
        events
            .first()
            .is_some_and(|e| e.1.contains(Readiness::ERR) && e.1.contains(Readiness::HUP)),
        "{events:?}"
    );
}

/// A close after the client's own half-close, with nothing unread, sends
/// nothing (its FIN went with the shutdown): no new edge. (The simulation
/// raised one, which would rescue a server that had lost the shutdown's.)
fn close_after_half_close_raises_no_edge<K: Kernel>(k: &K) {
    let mut s = setup(k);
    k.client_shutdown(&mut s.client);
    expect_half_close_edge(k, s.epoll);
    let mut buf = [0u8; 8];
    assert_eq!(k.recv(s.conn, &mut buf), Ok(0));
    let Setup { client, .. } = s;
    k.client_close(client);
    assert!(
        wait(k, s.epoll, NONE).is_empty(),
        "a close after a half-close raised an edge"
    );
    for fd in [s.conn, s.listener, s.epoll] {
        k.close(fd).unwrap();
    }
}

/// Reset: EPOLLERR/EPOLLHUP; the next read fails with ECONNRESET, later
/// writes with EPIPE (never SIGPIPE).
fn reset_is_econnreset_then_epipe<K: Kernel>(k: &K) {
    let s = setup(k);
    let Setup { client, .. } = s;
    k.client_reset(client);
    expect_reset_edge(k, s.epoll);
    let mut buf = [0u8; 8];
    assert_eq!(k.recv(s.conn, &mut buf), Err(Errno::ECONNRESET));
    assert_eq!(k.recv(s.conn, &mut buf), Ok(0));
    assert_eq!(k.send(s.conn, b"x"), Err(Errno::EPIPE));
    for fd in [s.conn, s.listener, s.epoll] {
        k.close(fd).unwrap();
    }
}

/// A reset does not take back what already arrived: the input queued
/// before it is read first, then the reset's ECONNRESET, then end of
/// stream. (The simulation once dropped the queued input, so the server's
/// path for complete frames followed by a reset in one turn never ran.)
fn reset_after_data_reads_the_data_first<K: Kernel>(k: &K) {
    let mut s = setup(k);
    k.client_write(&mut s.client, b"last words");
    let Setup { client, .. } = s;
    k.client_reset(client);
    let_network_deliver();
    let mut buf = [0u8; 64];
    assert_eq!(k.recv(s.conn, &mut buf), Ok(10), "the queued input first");
    assert_eq!(&buf[..10], b"last words");
    assert_eq!(k.recv(s.conn, &mut buf), Err(Errno::ECONNRESET));
    assert_eq!(k.recv(s.conn, &mut buf), Ok(0));
    for fd in [s.conn, s.listener, s.epoll] {
        k.close(fd).unwrap();
    }
}

/// A reset after the client's FIN (the server in CLOSE_WAIT): reads see the
/// input, then end of stream, never the error; the write takes it as EPIPE
/// (`tcp_reset` leaves EPIPE there, not ECONNRESET), and later writes see
/// EPIPE too. (The simulation answered ECONNRESET to the read, so the
/// server's path for "end of stream, then the write fails" never ran.)
fn reset_after_fin_is_end_of_stream_then_epipe<K: Kernel>(k: &K) {
    let mut s = setup(k);
    k.client_write(&mut s.client, b"last words");
    k.client_shutdown(&mut s.client);
    expect_half_close_edge(k, s.epoll);
    let Setup { client, .. } = s;
    k.client_reset(client);
    expect_reset_edge(k, s.epoll);
    assert_eq!(read_all(k, s.conn), b"last words");
    let mut buf = [0u8; 8];
    assert_eq!(
        k.recv(s.conn, &mut buf),
        Ok(0),
        "end of stream, not the error"
    );
    assert_eq!(k.send(s.conn, b"x"), Err(Errno::EPIPE), "the reset's error");
    assert_eq!(k.send(s.conn, b"x"), Err(Errno::EPIPE));
    assert_eq!(k.recv(s.conn, &mut buf), Ok(0));
    for fd in [s.conn, s.listener, s.epoll] {
        k.close(fd).unwrap();
    }
}

/// A reply to a client that closed (FIN, nothing unread) is taken, and the
/// reset it draws makes the next write fail with EPIPE while reads still
/// see end of stream: the common way a server learns that its peer left
/// before the last reply.
fn write_after_the_peer_closed_draws_a_reset<K: Kernel>(k: &K) {
    let s = setup(k);
    let Setup { client, .. } = s;
    k.client_close(client);
    expect_half_close_edge(k, s.epoll);
    let mut buf = [0u8; 8];
    assert_eq!(k.recv(s.conn, &mut buf), Ok(0));
    assert_eq!(k.send(s.conn, b"reply"), Ok(5), "the kernel takes it");
    let_network_deliver();
    expect_reset_edge(k, s.epoll);
    assert_eq!(
        k.recv(s.conn, &mut buf),
        Ok(0),
        "end of stream, not the error"
    );
    assert_eq!(k.send(s.conn, b"x"), Err(Errno::EPIPE));
    for fd in [s.conn, s.listener, s.epoll] {
        k.close(fd).unwrap();
    }
}

/// The backlog holds connections until accepted; accept then says EAGAIN.
fn backlog_and_accept<K: Kernel>(k: &K) {
    let s = setup(k);
    let clients: Vec<_> = (0..5).map(|_| k.client_connect(&s.addr)).collect();
    assert_eq!(
        wait(k, s.epoll, EXPECT).first().map(|e| e.0),
        Some(LISTENER)
    );
    let mut accepted = Vec::new();
    loop {
        match k.accept(s.listener) {
            Ok((fd, _)) => accepted.push(fd),
            Err(e) if e.is_would_block() => break,
            Err(e) => panic!("accept: {e}"),
        }
    }
    assert_eq!(accepted.len(), clients.len());
    for fd in accepted {
        k.close(fd).unwrap();
    }
    teardown(k, s);
}

/// An eventfd wakes `epoll_wait` once per write; reading it resets it.
fn eventfd_wakes<K: Kernel>(k: &K) {
    let epoll = k.epoll_create().unwrap();
    let fd = k.eventfd().unwrap();
    k.epoll_add(epoll, fd, Interest::Read, 9).unwrap();
    assert!(wait(k, epoll, NONE).is_empty());
    k.eventfd_wake(fd).unwrap();
    assert_eq!(wait(k, epoll, EXPECT).first().map(|e| e.0), Some(9));
    k.eventfd_wake(fd).unwrap();
    assert_eq!(wait(k, epoll, EXPECT).len(), 1, "each write is an edge");
    k.eventfd_drain(fd).unwrap();
    assert!(wait(k, epoll, NONE).is_empty());
    k.close(fd).unwrap();
    k.close(epoll).unwrap();
}

/// An outbound connect completes with write-readiness: then the socket has
/// its peer, and carries bytes both ways like an accepted one.
fn dial_completes_with_write_readiness<K: Kernel>(k: &K) {
    let (addr, remote) = k.remote_listen();
    let epoll = k.epoll_create().unwrap();
    let fd = k.connect(addr).unwrap();
    k.epoll_add(epoll, fd, Interest::ReadWrite, CONN).unwrap();
    let mut peer = k.remote_accept(&remote, addr);
    let events = wait(k, epoll, EXPECT);
    assert!(
        events.first().is_some_and(|e| e.0 == CONN
            && e.1.contains(Readiness::OUT)
            && !e
                .1
                .intersects(Readiness::ERR | Readiness::HUP | Readiness::IN)),
        "{events:?}"
    );
    assert_eq!(k.connect_status(fd), Ok(true));
    k.client_write(&mut peer, b"hi");
    assert_eq!(wait(k, epoll, EXPECT).first().map(|e| e.0), Some(CONN));
    assert_eq!(read_all(k, fd), b"hi");
    assert_eq!(k.send(fd, b"yo"), Ok(2));
    let_network_deliver();
    assert_eq!(k.client_read(&mut peer), Ok(b"yo".to_vec()));
    k.close(fd).unwrap();
    k.close(epoll).unwrap();
}

/// A refused connect raises every readiness bit; SO_ERROR reports
/// ECONNREFUSED once, and after that the socket has no peer, reads see end
/// of stream and writes EPIPE. A read before SO_ERROR takes the error instead.
fn refused_dial_reports_the_error_once<K: Kernel>(k: &K) {
    let addr = k.closed_addr();
    let epoll = k.epoll_create().unwrap();
    let fd = k.connect(addr).unwrap();
    k.epoll_add(epoll, fd, Interest::ReadWrite, CONN).unwrap();
    let events = wait(k, epoll, EXPECT);
    let all = Readiness::IN | Readiness::OUT | Readiness::RDHUP | Readiness::HUP | Readiness::ERR;
    assert!(
        events
            .first()
            .is_some_and(|e| e.0 == CONN && e.1.contains(all)),
        "{events:?}"
    );
    assert_eq!(k.connect_status(fd), Err(Errno::ECONNREFUSED));
    assert_eq!(k.connect_status(fd), Ok(false));
    let mut buf = [0u8; 8];
    assert_eq!(k.recv(fd, &mut buf), Ok(0));
    assert_eq!(k.send(fd, b"x"), Err(Errno::EPIPE));
    k.close(fd).unwrap();

    let fd = k.connect(addr).unwrap();
    k.epoll_add(epoll, fd, Interest::ReadWrite, CONN).unwrap();
    assert_eq!(wait(k, epoll, EXPECT).first().map(|e| e.0), Some(CONN));
    assert_eq!(k.recv(fd, &mut buf), Err(Errno::ECONNREFUSED));
    assert_eq!(k.connect_status(fd), Ok(false));
    assert_eq!(k.recv(fd, &mut buf), Ok(0));
    k.close(fd).unwrap();
    k.close(epoll).unwrap();
}

/// The real network gets a moment (a no-op in effect for the simulation).
fn let_network_deliver() {
    settle();
}

// ---------------------------------------------------------------- runners

/// Checks on the real kernel share the process's descriptor limit: one at a time.
static LINUX: Mutex<()> = Mutex::new(());

fn on_linux(check: fn(&LinuxSys)) {
    let _one_at_a_time = LINUX
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    check(&LinuxSys::new());
}

fn on_sim(check: fn(&SimSys)) {
    let sim = SimSys::new(SimConfig {
        // Not a multiple of the checks' write sizes, like a real buffer.
        buffer: 100_000,
        fd_limit: 4096,
        hard_limit: 4096,
        ..SimConfig::default()
    });
    sim.attach();
    check(&sim);
    assert!(sim.violations().is_empty());
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod linux {
            $( #[test] fn $check() { super::on_linux(super::$check::<eserver::sys::LinuxSys>); } )*
        }
        mod sim {
            $( #[test] fn $check() { super::on_sim(super::$check::<eserver::sys::sim::SimSys>); } )*
        }
    };
}

conformance!(
    lowest_free_number,
    bad_descriptors_are_ebadf,
    fd_limit_and_emfile_on_accept,
    dup2_and_reference_counts,
    registrations_follow_descriptions,
    every_arrival_is_an_edge,
    modify_rechecks_readiness,
    short_writes_eagain_and_the_epollout_edge,
    half_close_is_rdhup,
    close_after_half_close_raises_no_edge,
    reset_is_econnreset_then_epipe,
    reset_after_data_reads_the_data_first,
    reset_after_fin_is_end_of_stream_then_epipe,
    write_after_the_peer_closed_draws_a_reset,
    backlog_and_accept,
    eventfd_wakes,
    dial_completes_with_write_readiness,
    refused_dial_reports_the_error_once,
);

/// Where the simulation is more pessimistic than Linux, on purpose (see
/// `sys::sim::kernel`'s module docs): a reset from the server's end (its
/// close with input unread) discards every byte the client has not read,
/// where Linux purges only its unacknowledged send queue, and counts them,
/// with whether the server had shut its end for writing first (the
/// scenario's check 12 reads them).
#[test]
fn sim_a_reset_from_the_server_discards_what_the_client_has_not_read() {
    on_sim(|k| {
        for graceful in [false, true] {
            let mut s = setup(k);
            assert_eq!(k.send(s.conn, b"reply"), Ok(5));
            k.client_write(&mut s.client, b"unread");
            if graceful {
                k.shutdown(s.conn, eserver::sys::Shutdown::Write).unwrap();
            }
            k.close(s.conn).unwrap();
            // One call: the first thing the client sees is the reset.
            assert_eq!(
                k.client_recv(s.client, 64),
                Err(Errno::ECONNRESET),
                "the reply is gone with the reset"
            );
            let loss = k.reset_loss(s.client);
            assert_eq!((loss.bytes, loss.after_shutdown), (5, graceful));
            for fd in [s.listener, s.epoll] {
                k.close(fd).unwrap();
            }
        }
    });
}
