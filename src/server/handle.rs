//! [`ServerHandle`]: reach a running server's connections from any thread.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use super::stats::Stats;
use crate::core::ConnId;
use crate::core::outq::Chunk;
use crate::framing::{Codec, FrameError, Framing};
use crate::handler::CloseMode;
use crate::sys::{Errno, ListenAddr};

/// Why a send was not queued.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection is closed or closing (its close was asked for, it
    /// closes once its output is flushed, or a write to it failed), or the
    /// handle names an earlier occupant of its slot. Nothing was queued, so
    /// nothing can reach the slot's next occupant.
    Closed(ConnId),
    /// The connection's queued output would pass `max_out` (a slow
    /// receiver; under the default policy it is also being closed), or the
    /// server's queued output would pass `max_out_total` (`server_wide`; the
    /// receiver is left alone).
    Full {
        /// The receiver.
        conn: ConnId,
        /// Bytes queued (the connection's, or the server's if `server_wide`).
        queued: usize,
        /// The limit that was hit.
        limit: usize,
        /// The server-wide budget was hit, not the connection's limit.
        server_wide: bool,
    },
    /// The message alone is larger than the receiver's whole output limit
    /// (`max_out`, or `max_out_total` if that is smaller): it could never be
    /// queued, so the receiver is left alone (this is not a slow receiver).
    TooLarge {
        /// The intended receiver.
        conn: ConnId,
        /// The framed message's length (the payload's, when the payload
        /// alone is over the limit: such a send is refused before it is
        /// framed).
        len: usize,
        /// The receiver's output limit.
        limit: usize,
    },
    /// The payload cannot be framed (too large for `max_frame`, ...).
    Frame {
        /// The intended receiver.
        conn: ConnId,
        /// What the codec refused.
        error: FrameError,
    },
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Closed(conn) => write!(f, "send to {conn}: connection closed"),
            SendError::Full {
                conn,
                queued,
                limit,
                server_wide: false,
            } => write!(
                f,
                "send to {conn}: output full ({queued} bytes queued, limit {limit})"
            ),
            SendError::Full {
                conn,
                queued,
                limit,
                server_wide: true,
            } => write!(
                f,
                "send to {conn}: server output budget full ({queued} bytes queued in all, budget {limit})"
            ),
            SendError::TooLarge { conn, len, limit } => write!(
                f,
                "send to {conn}: a {len}-byte message is larger than the output limit of {limit} bytes"
            ),
            SendError::Frame { conn, error } => write!(f, "send to {conn}: {error}"),
        }
    }
}
impl std::error::Error for SendError {}

/// Why [`ServerHandle::connect`] could not start a connection. (A connect
/// that starts but fails later is reported to
/// [`Handler::on_connect_failed`](crate::Handler::on_connect_failed).)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// A syscall failed at once (no descriptors, no route, ...).
    Sys {
        /// Where the connection was going.
        addr: SocketAddr,
        /// The call that failed.
        syscall: &'static str,
        /// Its errno.
        errno: Errno,
    },
    /// Every slot is in use (`max_conns`).
    PoolFull {
        /// Where the connection was going.
        addr: SocketAddr,
        /// The pool's size.
        capacity: usize,
    },
    /// The server is shutting down.
    ShuttingDown {
        /// Where the connection was going.
        addr: SocketAddr,
    },
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Sys {
                addr,
                syscall,
                errno,
            } => write!(f, "connect to {addr}: {syscall}: {errno}"),
            ConnectError::PoolFull { addr, capacity } => write!(
                f,
                "connect to {addr}: every one of the {capacity} connection slots is in use"
            ),
            ConnectError::ShuttingDown { addr } => {
                write!(f, "connect to {addr}: the server is shutting down")
            }
        }
    }
}
impl std::error::Error for ConnectError {}

/// A frame encoded once, to send to many connections without copying it.
#[derive(Clone, Debug)]
pub struct Frame(Arc<[u8]>);

impl Frame {
    /// The encoded bytes (header included).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The operations a handle needs, implemented by the server's shared state
/// (this keeps `ServerHandle` free of the server's type parameters).
pub(crate) trait Control: Send + Sync + fmt::Debug + 'static {
    fn send_chunk(&self, id: ConnId, chunk: Chunk) -> Result<(), SendError>;
    /// Refuses a send of `len` bytes (over `limit`, the largest a send can
    /// queue) before it is framed: `Closed` as `send_chunk` would for a
    /// connection that takes nothing new, `TooLarge` otherwise; counted.
    fn refuse_oversized(&self, id: ConnId, len: usize, limit: usize) -> SendError;
    fn connect(&self, addr: SocketAddr) -> Result<ConnId, ConnectError>;
    fn framing(&self) -> &Framing;
    fn close(&self, id: ConnId, mode: CloseMode) -> bool;
    fn is_open(&self, id: ConnId) -> bool;
    fn shutdown(&self, grace: Duration);
    fn stats(&self) -> Stats;
    fn max_send(&self) -> usize;
    fn local_addrs(&self) -> Vec<ListenAddr>;
    /// Closes every descriptor; only once the workers have exited.
    fn teardown(&self);
    fn set_active_workers(&self, n: usize);
    /// Starts a `with_workers_parked` section if every worker is parked
    /// and the server runs (`false` otherwise): until it ends, the workers
    /// stay parked even once a shutdown begins, and the count stays 0.
    fn hold_workers(&self) -> bool;
    /// Ends the section (the count is then the caller's to restore).
    fn release_workers(&self);
    /// Whether the server runs (no shutdown has begun).
    fn serving(&self) -> bool;
    /// (started, allowed to run, parked)
    fn workers(&self) -> (usize, usize, usize);
    fn wait_parked(&self, n: usize);
    /// Turns for `with_workers_parked` callers.
    fn parker_turns(&self) -> &ParkerTurns;
    /// Whether the calling thread is a worker (of any server).
    fn on_a_worker(&self) -> bool;
}

/// `with_workers_parked` callers take turns: a second one would save the
/// count the first lowered, and the first's restore would unpark the
/// workers while the second's `f` runs. A call nested in `f` (same thread)
/// already has every worker parked and runs at once.
#[derive(Debug, Default)]
pub(crate) struct ParkerTurns {
    turn: Mutex<()>,
    /// The thread holding the turn.
    holder: Mutex<Option<ThreadId>>,
}

impl ParkerTurns {
    /// Whether the calling thread holds the turn (a nested call).
    fn is_mine(&self) -> bool {
        *lock(&self.holder) == Some(std::thread::current().id())
    }

    /// Waits for the turn.
    fn take(&self) -> Turn<'_> {
        let guard = lock(&self.turn);
        *lock(&self.holder) = Some(std::thread::current().id());
        Turn {
            turns: self,
            _guard: guard,
        }
    }
}

/// A turn, given back on drop (also when `f` panics).
struct Turn<'a> {
    turns: &'a ParkerTurns,
    _guard: MutexGuard<'a, ()>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *lock(&self.turns.holder) = None;
    }
}

/// Restores the active count on drop (also when `f` panics).
struct Restore<'a> {
    control: &'a dyn Control,
    active: usize,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        // The section ends first: a shutdown begun during it then raises
        // the count for its drain (`set_active` once the server no longer
        // runs), and wakes the parked workers into it.
        self.control.release_workers();
        self.control.set_active_workers(self.active);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cloneable handle to a server: send to or close any connection by id,
/// from any thread (worker or not), read the counters, shut down.
///
/// Sends go out directly when the connection's write side is free (send
/// first) and are queued otherwise; they never block and never run handler
/// code on the calling thread.
///
/// A handler that sends to *its own* connection through the handle may
/// overtake the replies it has made so far in the same turn: those wait in
/// the turn's output until it ends, while the send may go to the kernel at
/// once. To keep them in order, reply instead (`Ctx::reply`, or
/// `Ctx::reply_raw` with a [`Frame`]'s bytes), as `apps::PubSub` does for
/// a publisher subscribed to its own topic.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<dyn Control>,
}

/// The addresses only: the server's state behind the handle holds every
/// connection's queued messages, which a `{:?}` in a log line (of a
/// [`CloseInfo`](crate::CloseInfo), say, which carries the handle) must not
/// print.
impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addrs", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    pub(crate) fn new(inner: Arc<dyn Control>) -> Self {
        Self { inner }
    }

    pub(crate) fn control(&self) -> &dyn Control {
        &*self.inner
    }

    /// Sends one frame carrying `payload` to connection `id`.
    pub fn send(&self, id: ConnId, payload: &[u8]) -> Result<(), SendError> {
        self.send_parts(id, &[payload])
    }

    /// Sends one frame carrying the concatenation of `parts`.
    pub fn send_parts(&self, id: ConnId, parts: &[&[u8]]) -> Result<(), SendError> {
        // Refused before it is copied: a payload over the limit alone can
        // never be queued, and framing it would cost its size again. (Over
        // the codec's limit too, the codec says so, allocating nothing.)
        let payload = parts.iter().fold(0usize, |n, p| n.saturating_add(p.len()));
        let limit = self.max_send();
        if payload > limit && payload <= self.inner.framing().max_payload() {
            return Err(self.inner.refuse_oversized(id, payload, limit));
        }
        let mut bytes = Vec::new();
        self.inner
            .framing()
            .encode(parts, &mut bytes)
            .map_err(|error| SendError::Frame { conn: id, error })?;
        self.inner.send_chunk(id, Chunk::Owned(bytes))
    }

    /// Sends `bytes` as they are, unframed.
    pub fn send_raw(&self, id: ConnId, bytes: Vec<u8>) -> Result<(), SendError> {
        self.inner.send_chunk(id, Chunk::Owned(bytes))
    }

    /// Encodes a frame once, for [`ServerHandle::send_frame`] to many
    /// connections.
    pub fn frame(&self, parts: &[&[u8]]) -> Result<Frame, FrameError> {
        let mut bytes = Vec::new();
        self.inner.framing().encode(parts, &mut bytes)?;
        Ok(Frame(bytes.into()))
    }

    /// Sends a frame made by [`ServerHandle::frame`]: shared, not copied,
    /// unless it is small (under 2 KiB) and queued behind other output,
    /// where it is copied onto the end of the last queued message, or into
    /// a new entry when that one is shared or full (a flood of small
    /// messages costs bytes, not list entries).
    pub fn send_frame(&self, id: ConnId, frame: &Frame) -> Result<(), SendError> {
        self.inner
            .send_chunk(id, Chunk::Shared(Arc::clone(&frame.0)))
    }

    /// Opens an outbound TCP connection to `addr`, served like an accepted
    /// one: same workers, slots, framing and [`Handler`](crate::Handler).
    ///
    /// The connect is non-blocking: this returns the connection's id at
    /// once, and a worker calls [`Handler::on_open`](crate::Handler::on_open)
    /// when the connect completes (EPOLLOUT), or
    /// [`Handler::on_connect_failed`](crate::Handler::on_connect_failed) if
    /// it fails or is closed first (a close after flush while connecting
    /// included: its queued messages are written once connected, and
    /// `on_open` never runs; `on_close` follows only an `on_open`).
    /// Messages sent to the
    /// id before then are queued and written once connected, before the
    /// replies of `on_open`. On loopback a connect can complete within
    /// microseconds, so a send from another thread may race `on_open`:
    /// to be sure a message goes first, send it from `on_open` itself or
    /// while the workers are parked
    /// ([`ServerHandle::with_workers_parked`]). The idle timeout, if set,
    /// also bounds the connect, and so does the send timeout while a
    /// message waits for it (both reported as `ETIMEDOUT`).
    ///
    /// Errors: the pool is full, the server is shutting down, or a call
    /// failed at once (`connect`, whose errno may be `socket`'s: under
    /// EMFILE a free slot's number is given back and the call tried once
    /// more, as accept does; `dup2`; `epoll_ctl(ADD)`). Nothing is held
    /// after an error, and no handler call follows it.
    pub fn connect(&self, addr: SocketAddr) -> Result<ConnId, ConnectError> {
        self.inner.connect(addr)
    }

    /// Closes connection `id` now (queued output is dropped). Returns false
    /// if it was already closed, or its close was already requested (by a
    /// handle, a timeout, a slow-receiver close, a failed write, or a close
    /// after flush whose output is all written). A close after flush still
    /// writing is made a close now (its queued output dropped), and this
    /// returns true.
    pub fn close(&self, id: ConnId) -> bool {
        self.inner.close(id, CloseMode::Now)
    }

    /// Closes connection `id` once its queued output is written; it is not
    /// read any more meanwhile. The replies of a read turn under way (a
    /// handler closing its own connection this way, say) are written first:
    /// the close waits for the turn to end. Only a reply made after the
    /// queued output was written and the close decided is dropped, and then
    /// whole: no message is ever torn. Returns false if the connection was
    /// already closed; true while it is open, even if a close was already
    /// asked.
    pub fn close_after_flush(&self, id: ConnId) -> bool {
        self.inner.close(id, CloseMode::AfterFlush)
    }

    /// Whether connection `id` is open (a snapshot: it may close right
    /// after). A connection whose close was asked for, or that closes once
    /// flushed, stays open until a worker makes the close, though sends
    /// to it are refused meanwhile ([`SendError::Closed`]).
    pub fn is_open(&self, id: ConnId) -> bool {
        self.inner.is_open(id)
    }

    /// Starts a graceful shutdown: stop accepting, give every connection a
    /// last read turn, flush its replies, close it; connections still open
    /// after `grace` are closed anyway. Returns at once; join the server to
    /// wait.
    pub fn shutdown(&self, grace: Duration) {
        self.inner.shutdown(grace);
    }

    /// Lets only the first `n` worker threads run; the others park after
    /// their current batch (the original EServer's `es_syncworkers`). With 0,
    /// serving pauses: connections stay open, input waits in the kernel,
    /// queued output is kept. Raising `n` wakes parked workers. Once a
    /// shutdown has begun every worker runs whatever the count (the drain
    /// needs them), from the end of any
    /// [`with_workers_parked`](ServerHandle::with_workers_parked) section
    /// under way; during such a section the count stays 0, and the
    /// section's end restores the count from before it. Called before
    /// `start`, the count holds from the start (0 starts the server
    /// paused). Returns at once.
    pub fn set_active_workers(&self, n: usize) {
        self.inner.set_active_workers(n);
    }

    /// Worker threads: (started, allowed to run, parked now).
    pub fn workers(&self) -> (usize, usize, usize) {
        self.inner.workers()
    }

    /// Parks every worker, runs `f` while none runs (no handler code runs
    /// concurrently), then lets the same number run as before, also if `f`
    /// panics. Callers on several threads take turns; a call nested in `f`
    /// runs its closure at once. A shutdown begun while `f` runs (by `f`
    /// itself, say) drains once `f` returns, and the time `f` takes counts
    /// against its grace; once a shutdown has begun, `f` runs after the
    /// server has stopped. `None`, with `f` not run, when called from a
    /// worker thread (of this server: it would wait for itself; of another:
    /// two servers' workers parking each other would wait for each other).
    pub fn with_workers_parked<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        if self.inner.on_a_worker() {
            return None;
        }
        let turns = self.inner.parker_turns();
        if turns.is_mine() {
            return Some(f());
        }
        // Dropped in reverse order: the count restored, then the turn.
        let _turn = turns.take();
        let (_, active, _) = self.inner.workers();
        let _restore = Restore {
            control: &*self.inner,
            active,
        };
        loop {
            self.inner.set_active_workers(0);
            // Re-read: a `start` may have come since.
            let (started, _, _) = self.inner.workers();
            if started == 0 {
                // Not started: no worker to park, none runs.
                break;
            }
            self.inner.wait_parked(started);
            // Every worker parked: hold them (a shutdown from now on waits
            // for `f`). Not held: a shutdown began (the workers drain, and
            // `f` runs once the server has stopped), or another thread
            // raised the count meanwhile (park them again).
            if self.inner.hold_workers() {
                break;
            }
            if !self.inner.serving() {
                self.inner.wait_parked(usize::MAX);
                break;
            }
        }
        Some(f())
    }

    /// The server's counters now. Open and lingering connections are
    /// exact; the rest a worker counts locally and adds in at the end of
    /// each event batch, so a peer may see a reply (or a close) a moment
    /// before the counters do. Wait for a count; do not read it once.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// The largest message a send can ever queue (`max_out`, or
    /// `max_out_total` if smaller): a larger one is refused with
    /// [`SendError::TooLarge`] whatever the receiver does. A handler that
    /// delivers to its own connection as a reply (which is never refused)
    /// can hold itself to the same rule.
    pub fn max_send(&self) -> usize {
        self.inner.max_send()
    }

    /// The addresses the server listens on (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.inner.local_addrs()
    }
}
