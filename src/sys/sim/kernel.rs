//! The simulated kernel's state and operations, with no scheduling.
//!
//! Faithful to Linux where a server can tell the difference:
//!
//! - **Descriptors.** An fd table with the lowest-free-number rule and a
//!   settable limit (EMFILE). Numbers refer to *open file descriptions* with
//!   reference counts; `dup2` makes two numbers share one; a description is
//!   released when its last number is closed *and* no syscall still uses it
//!   (as `fdget`/`fdput` do), which is when a socket really closes.
//! - **epoll.** Registrations are keyed by (description, number) and are
//!   dropped only when the description is released: closing one number of a
//!   description still open elsewhere keeps its events coming. Every wake-up
//!   of a description (data arriving, space freed, a peer hanging up) puts its
//!   registrations on the ready list if they are not there yet, even if
//!   earlier data was never read; `epoll_wait` reports an entry with the
//!   description's readiness *now* and, edge-triggered, does not requeue it.
//!   Several waiters may take entries for the same description in turn.
//!   `EPOLL_CTL_ADD`/`MOD` re-check readiness and queue a ready description.
//!   Reading never wakes anything; freeing space wakes a writer only once it
//!   has met a full buffer (a short write, EAGAIN, or an epoll poll that
//!   found no room, as `tcp_poll` marks it) and a third of the buffer is
//!   free again.
//! - **Streams.** TCP-like connections between a simulated client and the
//!   server, with a finite buffer each way (short writes when nearly full,
//!   EAGAIN when full), FIN (half-close), RST (the peer's next call fails with
//!   ECONNRESET, a read only once the input that arrived before it is read;
//!   later ones see end of stream or EPIPE; after the peer's FIN, with the
//!   server's write side open, reads see end of stream and the error is
//!   EPIPE, as `tcp_reset` leaves it in CLOSE_WAIT), and a listen backlog.
//!   One buffer each way stands for the sender's send queue and the
//!   receiver's receive queue together; a reset *from the server's end*
//!   (its close with input unread, or bytes reaching its closed socket)
//!   discards all of it that the client has not read, and counts it
//!   ([`ResetLoss`]): Linux purges the unacknowledged send
//!   queue (`tcp_write_queue_purge`), and some peers' stacks (Windows')
//!   drop even what arrived but was not read. Pessimistic on purpose: a
//!   close after flush must not lose replies to a reset (the lingering
//!   close exists for this), and the simulation's checks see every byte
//!   a reset could cost.
//!   An `accept` that fails with EMFILE leaves the connection pending and
//!   raises no new edge.
//! - **Outbound connections.** `connect` reaches loopback addresses only
//!   (anything else is ENETUNREACH at once). A *remote listener* the harness
//!   opened with [`Kernel::listen_remote`] queues the dial, which stays in
//!   progress (no readiness; reads and writes EAGAIN; SO_ERROR clear and no
//!   peer) until the harness answers it. Accepting completes it, waking the
//!   socket, and the harness plays the remote peer like any client.
//!   Refusing it, or dialling a loopback address nobody listens on, leaves
//!   a pending ECONNREFUSED and every readiness bit (`tcp_done` after the
//!   RST): the first of SO_ERROR, `recv` or `send` takes the error, then
//!   reads see end of stream, writes EPIPE, and the socket has no peer
//!   (SO_ERROR clear, `getpeername` ENOTCONN). A dial the server closes
//!   before the answer is forgotten by the remote. Dialling the server's own
//!   listeners is not modelled (EOPNOTSUPP).

// The simulation's own consistency: an `expect` here fails only on a bug of
// the simulator (never on anything the server or a client does), and must
// stop the test loudly.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, VecDeque};
use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::sys::{Errno, Event, Fd, Interest, ListenAddr, Readiness, Shutdown};

/// An open file description.
pub(crate) type DescId = u64;

const EPOLLET: u32 = libc::EPOLLET as u32;

/// Always reported, whatever the interest (as Linux does).
const ALWAYS: u32 = Readiness::ERR.bits() | Readiness::HUP.bits();

/// What the harness can check afterwards: accepted numbers and registrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `accept` returned this number.
    Accepted(Fd),
    /// `epoll_ctl(ADD)` of this number with this token.
    Registered(Fd, u64),
    /// `close` of this number, and whether it referred to the placeholder
    /// (a free slot giving its number back) rather than anything else.
    Closed(Fd, bool),
    /// `connect` (outbound) returned this number.
    Dialed(Fd),
}

/// What a reset from the server's end cost a client, and what the
/// server's close looked like: enough to tell a close after flush that
/// gave up on the peer (its linger ran its time or its byte budget) from
/// one that lost replies it should not have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetLoss {
    /// Bytes for the client that the reset discarded unread.
    pub bytes: usize,
    /// The server had shut its end for writing (a close after flush).
    pub after_shutdown: bool,
    /// From that shutdown to the release of the server's description (how
    /// long the close lingered), once both happened.
    pub shut_for: Option<Duration>,
    /// Bytes the server read after that shutdown (what the close dropped).
    pub read_after_shutdown: usize,
}

/// One direction of a connection.
#[derive(Debug, Default)]
struct Pipe {
    buf: VecDeque<u8>,
    cap: usize,
    /// The writer shut down (FIN after the buffered bytes).
    fin: bool,
    /// The writer met a full buffer and waits for space.
    nospace: bool,
}

impl Pipe {
    fn space(&self) -> usize {
        self.cap.saturating_sub(self.buf.len())
    }
}

/// One end's state.
#[derive(Debug, Default)]
struct End {
    /// This end's descriptor/handle is closed.
    closed: bool,
    /// This end shut down writing.
    shut_wr: bool,
    /// A reset arrived and not yet reported (ECONNRESET).
    error: bool,
    /// The connection was reset: reads see end of stream, writes EPIPE.
    dead: bool,
}

/// Where a connection's handshake stands, seen from the server's end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Dial {
    /// Accepted from a listener, or a dial the remote accepted.
    #[default]
    Established,
    /// A dial the remote has not answered (SYN_SENT).
    InProgress,
    /// A dial refused (its pending error is ECONNREFUSED), or abandoned by a
    /// `shutdown` while in progress.
    Refused,
}

/// A connection between a simulated client and the server.
#[derive(Debug, Default)]
struct Conn {
    to_server: Pipe,
    to_client: Pipe,
    server: End,
    client: End,
    /// The server's description, once accepted.
    server_desc: Option<DescId>,
    /// Still in a listener's backlog.
    pending: bool,
    /// A fault injector reset it (so its early end is excused).
    faulted: bool,
    /// Tokens its server socket was registered with, in order.
    tokens: Vec<u64>,
    peer: u16,
    /// The server dialled it (`connect`), and how far that got.
    dial: Dial,
    /// A reset reached the server's end after the client's FIN, with the
    /// server's write side still open (CLOSE_WAIT): `tcp_reset` leaves EPIPE
    /// pending there, not ECONNRESET.
    reset_in_close_wait: bool,
    /// When the server last moved bytes on it (read or wrote), or took it
    /// (its accept, or its dial: the answer is the remote's doing, and the
    /// server may not have seen it yet). Writes count since the server
    /// marks a write's activity before it gives the write side back, and
    /// its idle timer leaves a connection whose write side is held alone.
    last_io: Duration,
    /// The longest the server went without moving bytes on it, between two
    /// such moments, since its last read before it shut the connection
    /// for writing (or since it took the connection): see `Conn::moved`.
    idle_since_read: Duration,
    /// When the server's description of it was released.
    closed_at: Option<Duration>,
    /// Bytes for the client that a reset from the server's end discarded
    /// before the client read them (see the module docs).
    lost_to_reset: usize,
    /// When the server first shut its end for writing.
    shut_wr_at: Option<Duration>,
    /// Bytes the server read after it shut its end for writing (what a
    /// close after flush, lingering or not, read and dropped).
    read_after_shut: usize,
}

impl Conn {
    /// The server read (`read`) or wrote bytes on it at `now`. A read made
    /// before the server's shutdown of its write side starts the idle
    /// record over: the server's idle timer decides only while no side is
    /// held, after every move before it was marked, and once it has asked
    /// for the close no read turn reads; so the stretch that explains an
    /// idle close starts at or after the last such read. (Writes can
    /// follow the decision, from other threads; reads after the shutdown
    /// belong to the close itself, a lingering one.)
    fn moved(&mut self, now: Duration, read: bool) {
        let gap = now.saturating_sub(self.last_io);
        self.idle_since_read = if read && !self.server.shut_wr {
            Duration::ZERO
        } else {
            self.idle_since_read.max(gap)
        };
        self.last_io = now;
    }

    /// A fresh connection with `buffer` bytes each way.
    fn new(buffer: usize, peer: u16) -> Self {
        Self {
            to_server: Pipe {
                cap: buffer,
                ..Pipe::default()
            },
            to_client: Pipe {
                cap: buffer,
                ..Pipe::default()
            },
            peer,
            ..Self::default()
        }
    }

    /// The remote refused the dial (an RST to the SYN): the error is
    /// pending, and the socket is done (`tcp_done`).
    fn refuse(&mut self) {
        self.dial = Dial::Refused;
        self.server.error = true;
        self.server.dead = true;
    }

    /// A reset reaches the server's end: its error is pending, and the
    /// socket is done (`tcp_done`), whatever input it has not read yet.
    fn reset_server(&mut self) {
        self.reset_in_close_wait = self.to_server.fin && !self.server.shut_wr;
        self.server.error = true;
        self.server.dead = true;
    }

    /// A reset from the server's end reaches the client: its error is
    /// pending, the connection is done, and what it had not read of the
    /// server's bytes is gone (see the module docs).
    fn reset_client(&mut self) {
        self.client.error = true;
        self.client.dead = true;
        self.lost_to_reset += self.to_client.buf.len();
        self.to_client.buf.clear();
    }

    /// The error a reset or refusal left pending on the server's end.
    fn server_errno(&self) -> Errno {
        if self.dial == Dial::Refused {
            Errno::ECONNREFUSED
        } else if self.reset_in_close_wait {
            Errno::EPIPE
        } else {
            Errno::ECONNRESET
        }
    }
}

#[derive(Debug)]
struct Listener {
    addr: ListenAddr,
    backlog: VecDeque<u64>,
    max_backlog: usize,
}

#[derive(Debug, Clone, Copy)]
struct Reg {
    events: u32,
    data: u64,
    queued: bool,
}

#[derive(Debug, Default)]
struct Epoll {
    interest: BTreeMap<(DescId, Fd), Reg>,
    ready: VecDeque<(DescId, Fd)>,
    waiters: VecDeque<usize>,
}

#[derive(Debug)]
enum Kind {
    Stdio,
    /// The server's end of a connection.
    Stream(u64),
    /// A socket whose peer is gone: reads see end of stream, writes EPIPE.
    Placeholder,
    Listener(Listener),
    Epoll(Epoll),
    EventFd(u64),
}

#[derive(Debug)]
struct Desc {
    /// Numbers referring to it, plus syscalls in progress on it.
    refs: usize,
    /// Registrations watching it: (epoll description, number).
    watchers: Vec<(DescId, Fd)>,
    kind: Kind,
    /// Threads inside a read / a write of it (the R and W check).
    reading: Option<usize>,
    writing: Option<usize>,
}

/// Which half of a syscall pair a thread is in, for the R/W check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    Read,
    Write,
}

/// The simulated kernel. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Kernel {
    fds: Vec<Option<DescId>>,
    pub fd_limit: usize,
    pub hard_limit: usize,
    descs: BTreeMap<DescId, Desc>,
    next_desc: DescId,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    next_port: u16,
    buffer: usize,
    backlog: usize,
    /// Scheduler threads to wake once the current operation is done.
    pub to_wake: Vec<usize>,
    /// Threads asleep in `futex_wait`, by the word's address, in order.
    futex_waiters: BTreeMap<usize, VecDeque<usize>>,
    /// Remote listeners (outside the server's process): their unanswered
    /// dials, oldest first.
    remotes: BTreeMap<SocketAddr, VecDeque<u64>>,
    pub history: Vec<Record>,
    pub violations: Vec<String>,
    /// The scheduler's clock, set before each operation (see
    /// `SimSys::with_kernel`).
    pub now: Duration,
}

impl Kernel {
    pub(crate) fn new(buffer: usize, backlog: usize, fd_limit: usize, hard_limit: usize) -> Self {
        let mut kernel = Self {
            fds: Vec::new(),
            fd_limit,
            hard_limit,
            descs: BTreeMap::new(),
            next_desc: 1,
            conns: BTreeMap::new(),
            next_conn: 1,
            next_port: 7000,
            buffer: buffer.max(1),
            backlog: backlog.max(1),
            to_wake: Vec::new(),
            futex_waiters: BTreeMap::new(),
            remotes: BTreeMap::new(),
            history: Vec::new(),
            violations: Vec::new(),
            now: Duration::ZERO,
        };
        // 0, 1, 2 are taken, as in any process.
        for _ in 0..3 {
            let desc = kernel.new_desc(Kind::Stdio);
            kernel.fds.push(Some(desc));
            kernel.desc_mut(desc).refs = 1;
        }
        kernel
    }

    // ------------------------------------------------------------ descriptors

    fn new_desc(&mut self, kind: Kind) -> DescId {
        let id = self.next_desc;
        self.next_desc += 1;
        self.descs.insert(
            id,
            Desc {
                refs: 0,
                watchers: Vec::new(),
                kind,
                reading: None,
                writing: None,
            },
        );
        id
    }

    fn desc_mut(&mut self, id: DescId) -> &mut Desc {
        // Callers only pass ids they just looked up.
        self.descs.get_mut(&id).expect("live description")
    }

    fn lookup(&self, fd: Fd) -> Result<DescId, Errno> {
        usize::try_from(fd)
            .ok()
            .and_then(|i| self.fds.get(i).copied().flatten())
            .ok_or(Errno::EBADF)
    }

    /// The lowest free number below the limit.
    fn lowest_free(&self) -> Result<usize, Errno> {
        let free = self
            .fds
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.fds.len());
        if free >= self.fd_limit {
            return Err(Errno::EMFILE);
        }
        Ok(free)
    }

    /// Gives `desc` the lowest free number.
    fn install(&mut self, desc: DescId) -> Result<Fd, Errno> {
        let n = self.lowest_free()?;
        if n == self.fds.len() {
            self.fds.push(None);
        }
        self.fds[n] = Some(desc);
        self.desc_mut(desc).refs += 1;
        Ok(n as Fd)
    }

    fn new_fd(&mut self, kind: Kind) -> Result<Fd, Errno> {
        self.lowest_free()?;
        let desc = self.new_desc(kind);
        self.install(desc)
    }

    /// Drops one reference; releases the description at zero.
    fn unref(&mut self, desc: DescId) {
        let d = self.desc_mut(desc);
        d.refs -= 1;
        if d.refs == 0 {
            self.release(desc);
        }
    }

    /// The last reference is gone: registrations go, and the object closes.
    fn release(&mut self, desc: DescId) {
        let Some(d) = self.descs.remove(&desc) else {
            return;
        };
        for (ep, fd) in d.watchers {
            if let Some(Kind::Epoll(epoll)) = self.descs.get_mut(&ep).map(|e| &mut e.kind) {
                epoll.interest.remove(&(desc, fd));
                epoll.ready.retain(|k| *k != (desc, fd));
            }
        }
        match d.kind {
            Kind::Stream(conn) => self.server_closed(conn),
            Kind::Listener(listener) => {
                for conn in listener.backlog {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.pending = false;
                        c.client.error = true;
                        c.client.dead = true;
                    }
                }
            }
            Kind::Epoll(epoll) => {
                for (watched, fd) in epoll.interest.keys() {
                    if let Some(w) = self.descs.get_mut(watched) {
                        w.watchers.retain(|k| *k != (desc, *fd));
                    }
                }
            }
            Kind::Stdio | Kind::Placeholder | Kind::EventFd(_) => {}
        }
    }

    pub(crate) fn close(&mut self, fd: Fd) -> Result<(), Errno> {
        let desc = self.lookup(fd)?;
        self.fds[fd as usize] = None;
        let placeholder = matches!(
            self.descs.get(&desc).map(|d| &d.kind),
            Some(Kind::Placeholder)
        );
        self.history.push(Record::Closed(fd, placeholder));
        self.unref(desc);
        Ok(())
    }

    pub(crate) fn dup2(&mut self, from: Fd, to: Fd) -> Result<(), Errno> {
        let desc = self.lookup(from)?;
        if from == to {
            return Ok(());
        }
        let target = usize::try_from(to).map_err(|_| Errno::EBADF)?;
        if target >= self.fd_limit {
            return Err(Errno::EBADF);
        }
        while self.fds.len() <= target {
            self.fds.push(None);
        }
        let old = self.fds[target].replace(desc);
        self.desc_mut(desc).refs += 1;
        if let Some(old) = old {
            self.unref(old);
        }
        Ok(())
    }

    /// `fcntl(F_DUPFD_CLOEXEC, 0)`: the lowest free number for `fd`'s
    /// description.
    pub(crate) fn dup(&mut self, fd: Fd) -> Result<Fd, Errno> {
        let desc = self.lookup(fd)?;
        self.install(desc)
    }

    /// A thread starts a read or write on `fd`: takes a reference for the
    /// call's duration (so a concurrent close does not release the socket
    /// under it) and checks that no other thread is in the same half.
    pub(crate) fn enter(&mut self, fd: Fd, busy: Busy, thread: usize) -> Result<DescId, Errno> {
        let desc = self.lookup(fd)?;
        let d = self.desc_mut(desc);
        d.refs += 1;
        let slot = match busy {
            Busy::Read => &mut d.reading,
            Busy::Write => &mut d.writing,
        };
        let clash = slot.filter(|other| *other != thread);
        *slot = Some(thread);
        if let Some(other) = clash {
            let what = if busy == Busy::Read { "read" } else { "write" };
            self.violations.push(format!(
                "two threads inside a {what} of descriptor {fd} (threads {other} and {thread})"
            ));
        }
        Ok(desc)
    }

    /// The end of a call started with [`Kernel::enter`].
    pub(crate) fn leave(&mut self, desc: DescId, busy: Busy) {
        if let Some(d) = self.descs.get_mut(&desc) {
            match busy {
                Busy::Read => d.reading = None,
                Busy::Write => d.writing = None,
            }
        }
        self.unref(desc);
    }

    // ------------------------------------------------------------ readiness

    fn poll(&self, desc: DescId) -> u32 {
        let Some(d) = self.descs.get(&desc) else {
            return 0;
        };
        let (r_in, r_out, r_rdhup, r_hup, r_err) = (
            Readiness::IN.bits(),
            Readiness::OUT.bits(),
            Readiness::RDHUP.bits(),
            Readiness::HUP.bits(),
            Readiness::ERR.bits(),
        );
        match &d.kind {
            Kind::Stdio => 0,
            Kind::Placeholder => r_in | r_out | r_rdhup | r_hup,
            Kind::EventFd(count) => r_out | if *count > 0 { r_in } else { 0 },
            Kind::Listener(l) => {
                if l.backlog.is_empty() {
                    0
                } else {
                    r_in
                }
            }
            Kind::Epoll(e) => {
                if e.ready.is_empty() {
                    0
                } else {
                    r_in
                }
            }
            Kind::Stream(conn) => {
                let Some(c) = self.conns.get(conn) else {
                    return 0;
                };
                if c.dial == Dial::InProgress {
                    return 0;
                }
                let mut mask = 0;
                if !c.to_server.buf.is_empty() || c.to_server.fin || c.server.error || c.server.dead
                {
                    mask |= r_in;
                }
                if c.to_server.fin || c.server.dead {
                    mask |= r_rdhup;
                }
                if c.to_client.space() > 0 || c.server.shut_wr || c.server.dead || c.server.error {
                    mask |= r_out;
                }
                if c.server.dead || (c.to_server.fin && c.server.shut_wr) {
                    mask |= r_hup;
                }
                if c.server.error {
                    mask |= r_err;
                }
                mask
            }
        }
    }

    /// [`Kernel::poll`] as epoll runs it, with `tcp_poll`'s side effect: a
    /// connection found with no room to write is marked as waiting for
    /// space (SOCK_NOSPACE), so the peer's next read that frees room wakes
    /// it. Without the mark, a write-readiness edge harvested while a write
    /// that filled the buffer exactly (no EAGAIN) was pending would be lost
    /// for good, where Linux reports it once the peer reads.
    fn poll_marking(&mut self, desc: DescId) -> u32 {
        let mask = self.poll(desc);
        if mask & Readiness::OUT.bits() == 0 {
            if let Some(Kind::Stream(conn)) = self.descs.get(&desc).map(|d| &d.kind) {
                let conn = *conn;
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.dial == Dial::Established {
                        c.to_client.nospace = true;
                    }
                }
            }
        }
        mask
    }

    /// A fault injector's arrival on `fd` (see `Sys::inject_readiness`):
    /// queues its registrations as a real one would; the harvest reports
    /// only what is in fact ready.
    pub(crate) fn inject_readiness(&mut self, fd: Fd, readiness: Readiness) {
        let Ok(desc) = self.lookup(fd) else {
            return;
        };
        // An injected EAGAIN on a write stands for a full buffer: the kernel
        // marks the writer as waiting for space (SOCK_NOSPACE), so the
        // reader's next read wakes it even if the socket is full right now.
        if readiness.contains(Readiness::OUT) {
            if let Some(Kind::Stream(conn)) = self.descs.get(&desc).map(|d| &d.kind) {
                let conn = *conn;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.to_client.nospace = true;
                }
            }
        }
        self.wakeup(desc, readiness.bits());
    }

    /// A wake-up on `desc` for `bits`: queue its matching registrations.
    fn wakeup(&mut self, desc: DescId, bits: u32) {
        let watchers = match self.descs.get(&desc) {
            Some(d) => d.watchers.clone(),
            None => return,
        };
        for (ep, fd) in watchers {
            self.queue(ep, desc, fd, bits);
        }
    }

    fn queue(&mut self, ep: DescId, desc: DescId, fd: Fd, bits: u32) {
        let Some(Kind::Epoll(epoll)) = self.descs.get_mut(&ep).map(|e| &mut e.kind) else {
            return;
        };
        let Some(reg) = epoll.interest.get_mut(&(desc, fd)) else {
            return;
        };
        if (reg.events | ALWAYS) & bits == 0 {
            return;
        }
        if !reg.queued {
            reg.queued = true;
            epoll.ready.push_back((desc, fd));
        }
        // One waiter per wake-up, first come first served (exclusive wake).
        if let Some(waiter) = epoll.waiters.pop_front() {
            self.to_wake.push(waiter);
        }
    }

    fn server_desc(&self, conn: u64) -> Option<DescId> {
        self.conns.get(&conn).and_then(|c| c.server_desc)
    }

    // ------------------------------------------------------------ epoll

    pub(crate) fn epoll_create(&mut self) -> Result<Fd, Errno> {
        self.new_fd(Kind::Epoll(Epoll::default()))
    }

    fn epoll_of(&mut self, ep: Fd) -> Result<DescId, Errno> {
        let id = self.lookup(ep)?;
        match self.descs.get(&id).map(|d| &d.kind) {
            Some(Kind::Epoll(_)) => Ok(id),
            _ => Err(Errno::EINVAL),
        }
    }

    fn epoll_mut(&mut self, ep: DescId) -> &mut Epoll {
        match &mut self.desc_mut(ep).kind {
            Kind::Epoll(epoll) => epoll,
            _ => unreachable!("checked by epoll_of"),
        }
    }

    pub(crate) fn epoll_ctl(
        &mut self,
        ep: Fd,
        fd: Fd,
        op: Option<(Interest, u64)>,
        add: bool,
    ) -> Result<(), Errno> {
        let ep = self.epoll_of(ep)?;
        let desc = self.lookup(fd)?;
        if desc == ep {
            return Err(Errno::EINVAL);
        }
        let key = (desc, fd);
        let exists = self.epoll_mut(ep).interest.contains_key(&key);
        match (op, add) {
            (Some((interest, data)), true) => {
                if exists {
                    return Err(Errno::EEXIST);
                }
                let events = interest.readiness().bits() | EPOLLET;
                self.epoll_mut(ep).interest.insert(
                    key,
                    Reg {
                        events,
                        data,
                        queued: false,
                    },
                );
                self.desc_mut(desc).watchers.push((ep, fd));
                self.history.push(Record::Registered(fd, data));
                if let Some(Kind::Stream(conn)) = self.descs.get(&desc).map(|d| &d.kind) {
                    let conn = *conn;
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.tokens.push(data);
                    }
                }
            }
            (Some((interest, data)), false) => {
                let reg = self
                    .epoll_mut(ep)
                    .interest
                    .get_mut(&key)
                    .ok_or(Errno::ENOENT)?;
                reg.events = interest.readiness().bits() | EPOLLET;
                reg.data = data;
            }
            (None, _) => {
                let epoll = self.epoll_mut(ep);
                epoll.interest.remove(&key).ok_or(Errno::ENOENT)?;
                epoll.ready.retain(|k| *k != key);
                self.desc_mut(desc).watchers.retain(|w| *w != (ep, fd));
                return Ok(());
            }
        }
        // ADD and MOD re-check readiness (ep_insert / ep_modify).
        let ready = self.poll_marking(desc);
        if ready != 0 {
            self.queue(ep, desc, fd, ready);
        }
        Ok(())
    }

    /// Takes ready events; `None` if there are none (the caller may block,
    /// after [`Kernel::add_waiter`]).
    pub(crate) fn epoll_harvest(&mut self, ep: Fd, out: &mut [Event]) -> Result<usize, Errno> {
        let ep = self.epoll_of(ep)?;
        let mut n = 0;
        while n < out.len() {
            let Some(key) = self.epoll_mut(ep).ready.pop_front() else {
                break;
            };
            let now = self.poll_marking(key.0);
            let epoll = self.epoll_mut(ep);
            let Some(reg) = epoll.interest.get_mut(&key) else {
                continue;
            };
            reg.queued = false;
            let revents = now & (reg.events | ALWAYS);
            if revents != 0 {
                out[n] = Event::new(reg.data, Readiness::from_bits(revents));
                n += 1;
            }
            // Edge-triggered: not requeued.
        }
        Ok(n)
    }

    pub(crate) fn add_waiter(&mut self, ep: Fd, thread: usize) -> Result<(), Errno> {
        let ep = self.epoll_of(ep)?;
        let epoll = self.epoll_mut(ep);
        if !epoll.waiters.contains(&thread) {
            epoll.waiters.push_back(thread);
        }
        Ok(())
    }

    pub(crate) fn remove_waiter(&mut self, ep: Fd, thread: usize) {
        if let Ok(ep) = self.epoll_of(ep) {
            self.epoll_mut(ep).waiters.retain(|t| *t != thread);
        }
    }

    // ------------------------------------------------------------ eventfd

    pub(crate) fn eventfd(&mut self) -> Result<Fd, Errno> {
        self.new_fd(Kind::EventFd(0))
    }

    pub(crate) fn eventfd_add(&mut self, fd: Fd) -> Result<(), Errno> {
        let desc = self.lookup(fd)?;
        match &mut self.desc_mut(desc).kind {
            Kind::EventFd(count) => *count += 1,
            _ => return Err(Errno::EINVAL),
        }
        self.wakeup(desc, Readiness::IN.bits());
        Ok(())
    }

    pub(crate) fn eventfd_reset(&mut self, fd: Fd) -> Result<(), Errno> {
        let desc = self.lookup(fd)?;
        match &mut self.desc_mut(desc).kind {
            Kind::EventFd(count) => *count = 0,
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    // ------------------------------------------------------------ futex

    /// Puts `thread` to sleep on the word at `key`.
    pub(crate) fn futex_sleep(&mut self, key: usize, thread: usize) {
        self.futex_waiters.entry(key).or_default().push_back(thread);
    }

    /// Takes `thread` off the word at `key` (its sleep ended).
    pub(crate) fn futex_unsleep(&mut self, key: usize, thread: usize) {
        if let Some(waiters) = self.futex_waiters.get_mut(&key) {
            waiters.retain(|t| *t != thread);
        }
    }

    /// Wakes up to `n` sleepers on the word at `key`, first come first
    /// served; returns how many it woke.
    pub(crate) fn futex_wake(&mut self, key: usize, n: u32) -> usize {
        let Some(waiters) = self.futex_waiters.get_mut(&key) else {
            return 0;
        };
        let mut woken = 0;
        for _ in 0..n {
            let Some(thread) = waiters.pop_front() else {
                break;
            };
            self.to_wake.push(thread);
            woken += 1;
        }
        if waiters.is_empty() {
            self.futex_waiters.remove(&key);
        }
        woken
    }

    pub(crate) fn placeholder(&mut self) -> Result<Fd, Errno> {
        self.new_fd(Kind::Placeholder)
    }

    // ------------------------------------------------------------ listeners

    pub(crate) fn listen(&mut self, addr: &ListenAddr, backlog: i32) -> Result<Fd, Errno> {
        let addr = match addr {
            ListenAddr::Tcp(a) if a.port() == 0 => {
                self.next_port += 1;
                ListenAddr::Tcp(SocketAddr::new(a.ip(), self.next_port))
            }
            other => other.clone(),
        };
        let taken = self
            .descs
            .values()
            .any(|d| matches!(&d.kind, Kind::Listener(l) if l.addr == addr));
        if taken {
            return Err(Errno::EADDRINUSE);
        }
        let max_backlog = usize::try_from(backlog).unwrap_or(1).clamp(1, self.backlog);
        self.new_fd(Kind::Listener(Listener {
            addr,
            backlog: VecDeque::new(),
            max_backlog,
        }))
    }

    pub(crate) fn local_addr(&self, fd: Fd) -> Result<ListenAddr, Errno> {
        let desc = self.lookup(fd)?;
        match self.descs.get(&desc).map(|d| &d.kind) {
            Some(Kind::Listener(l)) => Ok(l.addr.clone()),
            _ => Err(Errno::EINVAL),
        }
    }

    pub(crate) fn accept(&mut self, fd: Fd) -> Result<(Fd, Option<SocketAddr>), Errno> {
        let desc = self.lookup(fd)?;
        let tcp = match self.descs.get(&desc).map(|d| &d.kind) {
            Some(Kind::Listener(l)) if l.backlog.is_empty() => return Err(Errno::EAGAIN),
            Some(Kind::Listener(l)) => matches!(l.addr, ListenAddr::Tcp(_)),
            _ => return Err(Errno::EINVAL),
        };
        // No number: the connection stays pending, and no new edge comes.
        self.lowest_free()?;
        let conn = match &mut self.desc_mut(desc).kind {
            Kind::Listener(l) => l.backlog.pop_front().expect("checked non-empty"),
            _ => unreachable!("checked above"),
        };
        let stream = self.new_desc(Kind::Stream(conn));
        let fd = self.install(stream)?;
        let c = self
            .conns
            .get_mut(&conn)
            .expect("backlog holds live connections");
        c.pending = false;
        c.server_desc = Some(stream);
        c.last_io = self.now;
        let peer = tcp.then(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), c.peer));
        self.history.push(Record::Accepted(fd));
        Ok((fd, peer))
    }

    // ------------------------------------------------------------ streams (server side)

    fn stream_conn(&mut self, desc: DescId) -> Result<Option<&mut Conn>, Errno> {
        match self.descs.get(&desc).map(|d| &d.kind) {
            Some(Kind::Stream(conn)) => {
                let conn = *conn;
                Ok(self.conns.get_mut(&conn))
            }
            Some(Kind::Placeholder) => Ok(None),
            _ => Err(Errno::ENOTCONN),
        }
    }

    pub(crate) fn recv(&mut self, desc: DescId, buf: &mut [u8]) -> Result<usize, Errno> {
        let now = self.now;
        let Some(c) = self.stream_conn(desc)? else {
            return Ok(0); // the placeholder: end of stream
        };
        if c.dial == Dial::InProgress {
            return Err(Errno::EAGAIN);
        }
        if c.to_server.buf.is_empty() {
            // A reset's error comes after the input that arrived before it
            // (`tcp_recvmsg` takes the queue first, `sk_err` once it is
            // empty), and not at all once the peer's FIN arrived: end of
            // stream (SOCK_DONE) is checked before `sk_err`, which stays
            // pending for the next write or SO_ERROR.
            if c.to_server.fin {
                return Ok(0);
            }
            if c.server.error {
                c.server.error = false;
                c.server.dead = true;
                return Err(c.server_errno());
            }
            return if c.to_server.fin || c.server.dead {
                Ok(0)
            } else {
                Err(Errno::EAGAIN)
            };
        }
        let n = buf.len().min(c.to_server.buf.len());
        for (dst, src) in buf.iter_mut().zip(c.to_server.buf.drain(..n)) {
            *dst = src;
        }
        c.moved(now, true);
        if c.server.shut_wr {
            c.read_after_shut += n;
        }
        // Space for the client: it is not in epoll; it just sees room.
        if c.to_server.space() * 3 >= c.to_server.cap {
            c.to_server.nospace = false;
        }
        Ok(n)
    }

    pub(crate) fn send(&mut self, desc: DescId, bufs: &[IoSlice<'_>]) -> Result<usize, Errno> {
        let now = self.now;
        let Some(c) = self.stream_conn(desc)? else {
            return Err(Errno::EPIPE); // the placeholder
        };
        if c.dial == Dial::InProgress {
            // `sk_stream_wait_connect` with no time to wait.
            return Err(Errno::EAGAIN);
        }
        if c.server.error {
            c.server.error = false;
            c.server.dead = true;
            return Err(c.server_errno());
        }
        if c.server.dead || c.server.shut_wr {
            return Err(Errno::EPIPE);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if c.client.closed {
            // The peer is gone: the bytes vanish and a reset comes back.
            // The server counts them written all the same.
            if len > 0 {
                c.moved(now, false);
            }
            c.reset_server();
            let conn_desc = desc;
            self.wakeup(
                conn_desc,
                ALWAYS | Readiness::IN.bits() | Readiness::OUT.bits(),
            );
            return Ok(len);
        }
        let space = c.to_client.space();
        if space == 0 {
            c.to_client.nospace = true;
            return Err(Errno::EAGAIN);
        }
        let mut n = 0;
        for buf in bufs {
            let take = buf.len().min(space - n);
            c.to_client.buf.extend(&buf[..take]);
            n += take;
            if n == space {
                break;
            }
        }
        if n < len {
            c.to_client.nospace = true;
        }
        if n > 0 {
            c.moved(now, false);
        }
        Ok(n)
    }

    pub(crate) fn shutdown(&mut self, fd: Fd, how: Shutdown) -> Result<(), Errno> {
        let now = self.now;
        let desc = self.lookup(fd)?;
        let Some(c) = self.stream_conn(desc)? else {
            return Ok(());
        };
        if c.dial == Dial::InProgress {
            // `inet_shutdown` of a SYN_SENT socket disconnects it: the dial
            // is abandoned (the remote forgets it when it answers).
            c.dial = Dial::Refused;
            c.server.dead = true;
            self.wakeup(desc, ALWAYS | Readiness::IN.bits() | Readiness::OUT.bits());
            return Ok(());
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            c.server.shut_wr = true;
            c.shut_wr_at.get_or_insert(now);
            c.to_client.fin = true;
        }
        self.wakeup(desc, Readiness::OUT.bits() | Readiness::HUP.bits());
        Ok(())
    }

    /// `SIOCOUTQ`. One buffer per direction stands for the server's send
    /// queue and the client's receive queue together, so what the client
    /// has not read counts as unacknowledged: the simulation lingers
    /// whenever a real kernel might have to.
    pub(crate) fn unacked(&mut self, fd: Fd) -> Result<usize, Errno> {
        let desc = self.lookup(fd)?;
        Ok(self.stream_conn(desc)?.map_or(0, |c| c.to_client.buf.len()))
    }

    pub(crate) fn is_stream(&self, fd: Fd) -> Result<bool, Errno> {
        let desc = self.lookup(fd)?;
        Ok(matches!(
            self.descs.get(&desc).map(|d| &d.kind),
            Some(Kind::Stream(_) | Kind::Placeholder)
        ))
    }

    /// The server's description of `conn` was released.
    fn server_closed(&mut self, conn: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.server.closed = true;
        c.server_desc = None;
        c.closed_at = Some(self.now);
        if !c.to_server.buf.is_empty() && !c.server.dead {
            // Closing with unread input resets the connection (RFC 2525).
            c.reset_client();
        } else {
            c.to_client.fin = true;
        }
    }

    // ------------------------------------------------------------ outbound

    /// The server's `connect`: see the [module docs](self).
    pub(crate) fn dial(&mut self, addr: SocketAddr) -> Result<Fd, Errno> {
        let own = self
            .descs
            .values()
            .any(|d| matches!(&d.kind, Kind::Listener(l) if l.addr == ListenAddr::Tcp(addr)));
        if own {
            return Err(Errno::EOPNOTSUPP);
        }
        if !addr.ip().is_loopback() {
            return Err(Errno(libc::ENETUNREACH));
        }
        self.lowest_free()?;
        let id = self.next_conn;
        self.next_conn += 1;
        let mut conn = Conn::new(self.buffer, addr.port());
        // The server's idle clock runs from its dial, answered or not.
        conn.last_io = self.now;
        let listening = self.remotes.contains_key(&addr);
        if listening {
            conn.dial = Dial::InProgress;
        } else {
            // Loopback answers a SYN to a closed port with an RST at once.
            conn.refuse();
        }
        let stream = self.new_desc(Kind::Stream(id));
        conn.server_desc = Some(stream);
        self.conns.insert(id, conn);
        let fd = self.install(stream)?;
        if let Some(queue) = self.remotes.get_mut(&addr) {
            queue.push_back(id);
        }
        self.history.push(Record::Dialed(fd));
        Ok(fd)
    }

    /// `getsockopt(SO_ERROR)`, then whether the socket has a peer.
    pub(crate) fn connect_status(&mut self, fd: Fd) -> Result<bool, Errno> {
        let desc = self.lookup(fd)?;
        let Some(c) = self.stream_conn(desc)? else {
            return Ok(true); // the placeholder: a connected socket pair
        };
        if c.server.error {
            c.server.error = false;
            c.server.dead = true;
            return Err(c.server_errno());
        }
        // No peer while the dial is in progress, nor once it failed or the
        // connection was reset (`getpeername`: ENOTCONN).
        Ok(c.dial == Dial::Established && !c.server.dead)
    }

    /// Opens a remote listener at `addr`, outside the server's process.
    pub(crate) fn listen_remote(&mut self, addr: SocketAddr) {
        self.remotes.entry(addr).or_default();
    }

    /// The remote at `addr` answers its oldest dial still wanted (the
    /// server has not closed it): accepts it, completing the server's
    /// connect, or refuses it. Returns the connection, if there was a dial.
    pub(crate) fn answer(&mut self, addr: SocketAddr, accept: bool) -> Option<u64> {
        loop {
            let id = self.remotes.get_mut(&addr)?.pop_front()?;
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.server.closed || c.dial != Dial::InProgress {
                continue;
            }
            if accept {
                c.dial = Dial::Established;
            } else {
                c.refuse();
            }
            if let Some(desc) = c.server_desc {
                // `sk_state_change`: a wake-up with no key, so every
                // registration is queued and the harvest reports what holds.
                self.wakeup(
                    desc,
                    ALWAYS | Readiness::IN.bits() | Readiness::OUT.bits() | Readiness::RDHUP.bits(),
                );
            }
            return Some(id);
        }
    }

    // ------------------------------------------------------------ clients

    pub(crate) fn connect(&mut self, addr: &ListenAddr) -> Result<u64, Errno> {
        let buffer = self.buffer;
        let listener = self
            .descs
            .iter()
            .find(|(_, d)| matches!(&d.kind, Kind::Listener(l) if l.addr == *addr))
            .map(|(id, _)| *id)
            .ok_or(Errno::ECONNREFUSED)?;
        let Kind::Listener(l) = &self.desc_mut(listener).kind else {
            unreachable!("found as a listener");
        };
        if l.backlog.len() >= l.max_backlog {
            return Err(Errno::ECONNREFUSED);
        }
        let id = self.next_conn;
        self.next_conn += 1;
        let mut conn = Conn::new(buffer, 40000u16.wrapping_add(id as u16));
        conn.pending = true;
        self.conns.insert(id, conn);
        if let Kind::Listener(l) = &mut self.desc_mut(listener).kind {
            l.backlog.push_back(id);
        }
        self.wakeup(listener, Readiness::IN.bits());
        Ok(id)
    }

    fn client(&mut self, id: u64) -> Result<&mut Conn, Errno> {
        self.conns.get_mut(&id).ok_or(Errno::EBADF)
    }

    pub(crate) fn client_send(&mut self, id: u64, data: &[u8]) -> Result<usize, Errno> {
        let c = self.client(id)?;
        if c.client.closed {
            return Err(Errno::EBADF);
        }
        if c.client.error {
            c.client.error = false;
            c.client.dead = true;
            return Err(Errno::ECONNRESET);
        }
        if c.client.dead || c.client.shut_wr {
            return Err(Errno::EPIPE);
        }
        if c.server.closed {
            // Data to a closed socket: gone, and a reset comes back.
            c.reset_client();
            return Ok(data.len());
        }
        let space = c.to_server.space();
        if space == 0 {
            c.to_server.nospace = true;
            return Err(Errno::EAGAIN);
        }
        let n = space.min(data.len());
        c.to_server.buf.extend(&data[..n]);
        if n < data.len() {
            c.to_server.nospace = true;
        }
        if n > 0 {
            if let Some(desc) = self.server_desc(id) {
                self.wakeup(desc, Readiness::IN.bits());
            }
        }
        Ok(n)
    }

    /// Bytes for the client; `Ok(empty)` at end of stream.
    pub(crate) fn client_recv(&mut self, id: u64, max: usize) -> Result<Vec<u8>, Errno> {
        let c = self.client(id)?;
        if c.client.closed {
            return Err(Errno::EBADF);
        }
        if !c.to_client.buf.is_empty() && max > 0 {
            let n = max.min(c.to_client.buf.len());
            let data: Vec<u8> = c.to_client.buf.drain(..n).collect();
            let wake = c.to_client.nospace && c.to_client.space() * 3 >= c.to_client.cap;
            if wake {
                c.to_client.nospace = false;
                if let Some(desc) = self.server_desc(id) {
                    self.wakeup(desc, Readiness::OUT.bits());
                }
            }
            return Ok(data);
        }
        if c.client.error {
            c.client.error = false;
            c.client.dead = true;
            return Err(Errno::ECONNRESET);
        }
        if c.to_client.fin || c.client.dead {
            return Ok(Vec::new());
        }
        Err(Errno::EAGAIN)
    }

    pub(crate) fn client_shutdown(&mut self, id: u64) -> Result<(), Errno> {
        let c = self.client(id)?;
        c.client.shut_wr = true;
        // A second shutdown sends nothing: no segment, no edge.
        let new_fin = !c.to_server.fin;
        c.to_server.fin = true;
        if let (true, Some(desc)) = (new_fin, self.server_desc(id)) {
            self.wakeup(desc, Readiness::IN.bits() | Readiness::RDHUP.bits());
        }
        Ok(())
    }

    /// Closes the client's socket: FIN, or RST if input was left unread
    /// (`abort`: RST regardless, as with SO_LINGER 0).
    pub(crate) fn client_close(&mut self, id: u64, abort: bool) -> Result<(), Errno> {
        let c = self.client(id)?;
        if c.client.closed {
            return Err(Errno::EBADF);
        }
        c.client.closed = true;
        c.client.shut_wr = true;
        let reset = abort || !c.to_client.buf.is_empty();
        // A close after the client's own shutdown, with nothing unread,
        // sends no segment (the FIN went with the shutdown): no edge, as on
        // Linux. (Raising one here rescued a server that had lost the
        // shutdown's edge.)
        let new_fin = !reset && !c.to_server.fin;
        c.to_client.buf.clear();
        if reset {
            // An RST closes the server's socket at once: EPOLLHUP and
            // EPOLLRDHUP with the error (tcp_done sets SHUTDOWN_MASK). What
            // already arrived stays to be read (only the send queue is purged).
            c.reset_server();
        } else {
            c.to_server.fin = true;
        }
        if let (true, Some(desc)) = (reset || new_fin, self.server_desc(id)) {
            let bits = if reset {
                ALWAYS | Readiness::IN.bits() | Readiness::OUT.bits() | Readiness::RDHUP.bits()
            } else {
                Readiness::IN.bits() | Readiness::RDHUP.bits()
            };
            self.wakeup(desc, bits);
        }
        Ok(())
    }

    // ------------------------------------------------------------ inspection

    /// Every open number and what it refers to, for leak checks.
    pub(crate) fn fd_table(&self) -> Vec<(Fd, &'static str, DescId)> {
        self.fds
            .iter()
            .enumerate()
            .filter_map(|(fd, desc)| {
                let desc = (*desc)?;
                let kind = match self.descs.get(&desc).map(|d| &d.kind) {
                    Some(Kind::Stdio) => "stdio",
                    Some(Kind::Stream(_)) => "stream",
                    Some(Kind::Placeholder) => "placeholder",
                    Some(Kind::Listener(_)) => "listener",
                    Some(Kind::Epoll(_)) => "epoll",
                    Some(Kind::EventFd(_)) => "eventfd",
                    None => "dangling",
                };
                Some((fd as Fd, kind, desc))
            })
            .collect()
    }

    /// Every registration of every epoll: (watched description, number,
    /// registration).
    fn all_registrations(&self) -> impl Iterator<Item = (DescId, Fd, &Reg)> {
        self.descs
            .values()
            .filter_map(|d| match &d.kind {
                Kind::Epoll(epoll) => Some(epoll),
                _ => None,
            })
            .flat_map(|epoll| epoll.interest.iter())
            .map(|((desc, fd), reg)| (*desc, *fd, reg))
    }

    /// Registrations with write interest armed: (number, token).
    pub(crate) fn write_interest(&self) -> Vec<(Fd, u64)> {
        let out = Readiness::OUT.bits();
        self.all_registrations()
            .filter(|(_, _, reg)| reg.events & out != 0)
            .map(|(_, fd, reg)| (fd, reg.data))
            .collect()
    }

    /// Registrations whose token has every bit of `bits` (and, if
    /// `readable`, whose socket has input: bytes, end of stream or an error
    /// waiting now): (number, token).
    pub(crate) fn registrations(&self, bits: u64, readable: bool) -> Vec<(Fd, u64)> {
        let input = Readiness::IN.bits()
            | Readiness::RDHUP.bits()
            | Readiness::HUP.bits()
            | Readiness::ERR.bits();
        self.all_registrations()
            .filter(|(_, _, reg)| reg.data & bits == bits)
            .filter(|(desc, _, _)| !readable || self.poll(*desc) & input != 0)
            .map(|(_, fd, reg)| (fd, reg.data))
            .collect()
    }

    /// Live descriptions (for leak checks: every released one is gone).
    pub(crate) fn live_descriptions(&self) -> usize {
        self.descs.len()
    }

    /// Connections whose server end is open and established, whose writer
    /// does not wait for room (so its reader is not paused for flow
    /// control) or never will get it (the client closed, or a reset ended
    /// the connection), and which hold input the server has not read:
    /// (client id, bytes). With every thread idle, each is a lost edge.
    pub(crate) fn stranded_input(&self) -> Vec<(u64, usize)> {
        self.conns
            .iter()
            .filter(|(_, c)| {
                // A client that closed never reads again: the room its
                // server's writer waits for never comes, and a server that
                // lost the close's edge would be excused for good.
                let waits_for_room = c.to_client.nospace && !c.client.closed && !c.server.dead;
                c.server_desc.is_some()
                    && !c.server.closed
                    && c.dial == Dial::Established
                    && !waits_for_room
                    && !c.to_server.buf.is_empty()
            })
            .map(|(id, c)| (*id, c.to_server.buf.len()))
            .collect()
    }

    /// Bytes sent by client `id` that the server has not read.
    pub(crate) fn unread_by_server(&self, id: u64) -> usize {
        self.conns.get(&id).map_or(0, |c| c.to_server.buf.len())
    }

    /// The longest the server went without moving bytes on client `id`'s
    /// connection since its last read before its shutdown (see
    /// `Conn::moved`), up to closing its end (`None`: not closed). An
    /// idle-timeout close needs one such stretch at least as long as the
    /// timeout (less the activity mark's millisecond).
    pub(crate) fn idle_before_close(&self, id: u64) -> Option<Duration> {
        let c = self.conns.get(&id)?;
        let last = c.closed_at?.saturating_sub(c.last_io);
        Some(c.idle_since_read.max(last))
    }

    /// Whether the server has closed its end of client `id`'s connection.
    pub(crate) fn server_closed_conn(&self, id: u64) -> bool {
        self.conns.get(&id).is_some_and(|c| c.server.closed)
    }

    /// Marks the connection behind `fd` as hit by an injected fault.
    pub(crate) fn mark_faulted(&mut self, fd: Fd) {
        let Ok(desc) = self.lookup(fd) else {
            return;
        };
        if let Some(Kind::Stream(conn)) = self.descs.get(&desc).map(|d| &d.kind) {
            let conn = *conn;
            if let Some(c) = self.conns.get_mut(&conn) {
                c.faulted = true;
            }
        }
    }

    /// The first token client `id`'s server socket was registered with.
    pub(crate) fn client_token(&self, id: u64) -> Option<u64> {
        self.conns.get(&id).and_then(|c| c.tokens.first().copied())
    }

    /// What a reset from the server's end cost client `id` (see
    /// [`ResetLoss`]).
    pub(crate) fn reset_loss(&self, id: u64) -> ResetLoss {
        self.conns
            .get(&id)
            .map_or(ResetLoss::default(), |c| ResetLoss {
                bytes: c.lost_to_reset,
                after_shutdown: c.server.shut_wr,
                shut_for: c
                    .shut_wr_at
                    .zip(c.closed_at)
                    .map(|(shut, closed)| closed.saturating_sub(shut)),
                read_after_shutdown: c.read_after_shut,
            })
    }

    /// Whether an injected fault hit client `id`'s connection.
    pub(crate) fn was_faulted(&self, id: u64) -> bool {
        self.conns.get(&id).is_some_and(|c| c.faulted)
    }

    /// Whether client `id` is still waiting in a backlog.
    pub(crate) fn is_pending(&self, id: u64) -> bool {
        self.conns.get(&id).is_some_and(|c| c.pending)
    }
}
