//! The application's side: what to do with a connection's messages.
//!
//! A [`Handler`] sees decoded payloads and never a descriptor. The event loop
//! calls it on the thread that holds the connection's read side, so the
//! per-connection state ([`Handler::Conn`]) is owned by that side and needs no
//! lock: invariant R guarantees one caller at a time, in stream order.
//!
//! Lifecycle, per connection, in this order: [`Handler::on_open`] once,
//! then [`Handler::on_message`] for each frame, then [`Handler::on_close`]
//! once (also when `on_message` panicked: a panic closes
//! only that connection, and of the panicking call's replies only those it
//! had flushed or queued ([`Ctx::flush`], [`Ctx::queue`]) are written; the
//! rest are dropped). A panic in `on_open` leaves no [`Handler::Conn`] to
//! close: the connection is closed ([`CloseReason::HandlerPanic`]) after
//! what `on_open` flushed or queued is written, the rest of its replies
//! dropped, and `on_close` is not called. An outbound connection that
//! ends before `on_open` (its connect failed, or it was closed while
//! connecting) gets [`Handler::on_connect_failed`] instead of all three.
//! A connection the server could not set up (an accepted one that epoll
//! would not register, [`CloseReason::RegisterFailed`]) gets no handler
//! call at all: it was never served.

use std::net::SocketAddr;

use crate::core::{CloseReason, ConnId};
use crate::framing::{Codec, FrameError, Framing};
use crate::server::ServerHandle;
use crate::sys::Errno;

/// How a connection should be closed, when a handler asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseMode {
    /// After this turn: replies produced so far get one attempt, then the
    /// connection is closed whether or not they were all written. An
    /// abortive close: no FIN-and-drain, so if the peer's input is left
    /// unread (or arrives later) the kernel answers with a reset, which can
    /// drop replies still in the send buffer. For a goodbye that must
    /// arrive, use [`CloseMode::AfterFlush`] (and `Config::linger`).
    Now,
    /// Once everything queued has been written; reading stops at once.
    AfterFlush,
}

/// An application served by the event loop. See the [module docs](self).
pub trait Handler: Send + Sync + 'static {
    /// Per-connection state, owned by the connection's read side.
    type Conn: Send + 'static;

    /// A connection was accepted, or an outbound one established. Replies
    /// made here are sent before anything else (except, on an outbound
    /// connection, messages sent to it before it was established: see
    /// [`ServerHandle::connect`]); `ctx.close()` refuses the connection. If
    /// this call publishes the connection's id (in a registry that other
    /// threads send through), [`Ctx::queue`] the greeting first: replies
    /// left in `ctx` are written when the call returns, and a send to the
    /// published id may come before them.
    fn on_open(&self, ctx: &mut Ctx<'_>) -> Self::Conn;

    /// A whole frame arrived; `msg` is its payload (valid only during the call).
    fn on_message(&self, conn: &mut Self::Conn, ctx: &mut Ctx<'_>, msg: &[u8]);

    /// The connection is closed (its descriptor is already released and sends
    /// to it fail). Called once per connection whose `on_open` returned,
    /// also after a panic in `on_message`. Its slot is back in the pool
    /// (unless a send on another thread still holds it, for the moments
    /// until that send returns), so a dial from here can have it when the
    /// closed connection took the last slot; so in `on_connect_failed`. It
    /// is not reserved for this call: a connection waiting in a listener's
    /// backlog, which the freed slot lets a worker accept, or another
    /// thread's dial, may take it first (the dial is then refused
    /// `PoolFull`).
    /// The same slot may already serve a new connection (another id), whose
    /// `on_open` can come before this call; `stats().open` no longer
    /// counts this one (but for that send's moments, as above).
    fn on_close(&self, conn: Self::Conn, info: CloseInfo<'_>) {
        let _ = (conn, info);
    }
    /// An outbound connection ([`ServerHandle::connect`]) ended before
    /// `on_open` ran: its connect failed (refused, timed out, the server shut
    /// down), or it was closed through the handle first (`ECANCELED`; with
    /// `close_after_flush` its queued messages are still written, and the
    /// connect may have completed), or writing those messages failed.
    /// `on_open` and `on_close` are never called for it. Exactly one of
    /// `on_open` and `on_connect_failed` runs per outbound connection. The
    /// server has logged it.
    ///
    /// It can run before `connect` has returned the id to its caller (a
    /// refused connect on loopback fails at once): the address dialled
    /// comes with it, so a handler need not look the id up in a map its
    /// caller may not have filled yet.
    fn on_connect_failed(&self, failure: ConnectFailure<'_>) {
        let _ = failure;
    }
}

/// What [`Handler::on_close`] learns.
#[derive(Debug)]
#[non_exhaustive]
pub struct CloseInfo<'a> {
    /// The closed connection.
    pub id: ConnId,
    /// Why it was closed.
    pub reason: CloseReason,
    /// Bytes that had arrived and were never delivered as messages: the
    /// rest of a read after a frame whose handler closed the connection,
    /// or an incomplete frame (also one cut off by the peer's end of
    /// stream, or refused by the input budget). (Bytes still in the kernel
    /// are not counted.)
    pub unread: usize,
    /// The server, to notify other connections.
    pub server: &'a ServerHandle,
}

/// What [`Handler::on_connect_failed`] learns.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnectFailure<'a> {
    /// The outbound connection ([`ServerHandle::connect`]'s id).
    pub id: ConnId,
    /// The address dialled.
    pub addr: SocketAddr,
    /// Why it failed: the connect's errno, a write's, `ETIMEDOUT` (the
    /// idle or send timeout), or `ECANCELED` for any other close before
    /// the connect completed (through the handle, by the shutdown, or as a
    /// slow receiver when sends overflowed its `max_out`).
    pub error: Errno,
    /// The server, to dial again or tell other connections.
    pub server: &'a ServerHandle,
}

/// The server's side of [`Ctx::flush`] and [`Ctx::queue`]: writes the
/// turn's replies so far (`true`), or only moves them into the out-queue
/// (`false`); returns whether the reader must pause for flow control.
pub(crate) type Flusher<'a> = &'a mut dyn FnMut(&mut Vec<u8>, bool) -> bool;

/// A handler's view of the connection it is serving, during one call.
pub struct Ctx<'a> {
    pub(crate) id: ConnId,
    pub(crate) codec: &'a Framing,
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) close: &'a mut Option<CloseMode>,
    pub(crate) server: &'a ServerHandle,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) replies: u64,
    /// Frames of the turn's budget this call spent beyond its own.
    pub(crate) spent: usize,
    /// Writes the call's replies so far; returns whether the reader must
    /// pause for flow control.
    pub(crate) flusher: Flusher<'a>,
    /// A [`Ctx::flush`] found the connection's output over its limit.
    pub(crate) paused: bool,
    /// A [`Ctx::flush`] wrote this call's replies so far (or a
    /// [`Ctx::queue`] queued them).
    pub(crate) flushed: bool,
    /// A [`Ctx::queue`] left replies in the out-queue that no flush has
    /// written since: the server writes them when the call returns.
    pub(crate) queued: bool,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("id", &self.id)
            .field("queued", &self.out.len())
            .field("close", &self.close)
            .finish()
    }
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(
        id: ConnId,
        codec: &'a Framing,
        out: &'a mut Vec<u8>,
        close: &'a mut Option<CloseMode>,
        server: &'a ServerHandle,
        peer: Option<SocketAddr>,
        flusher: Flusher<'a>,
    ) -> Self {
        Self {
            id,
            codec,
            out,
            close,
            server,
            peer,
            replies: 0,
            spent: 0,
            flusher,
            paused: false,
            flushed: false,
            queued: false,
        }
    }

    /// Writes the turn's replies so far now: to the kernel if it takes
    /// them, queued otherwise, and in either case ahead of anything sent to
    /// this connection from now on. Replies otherwise leave at the end of
    /// the read turn, and a send from another connection's thread can
    /// overtake them. Flush before making visible a state that lets others
    /// send here (a subscription, say), so that what they send cannot come
    /// before the reply that announced it. It costs a write, so not for
    /// every reply. In `on_open` too: a greeting flushed (or queued) before
    /// the handler publishes the new connection's id goes ahead of anything
    /// sent to that id.
    pub fn flush(&mut self) {
        if !self.out.is_empty() || self.queued {
            self.paused |= (self.flusher)(self.out, true);
            self.flushed = true;
            self.queued = false;
        }
    }

    /// Puts the turn's replies so far in the connection's out-queue,
    /// without writing them (no system call): anything sent to this
    /// connection from now on goes after them, and they are written by the
    /// next [`Ctx::flush`], or when the call returns (another thread's send
    /// to this connection may write them sooner). Use it to make visible,
    /// under a lock of your own, a state that lets others send here,
    /// together with the reply that announces it: take the lock, queue the
    /// reply, make the state visible, drop the lock, flush. (Queued before
    /// the lock, the reply could be written, and seen, before the state
    /// is; flushed under the lock, the lock would be held across a write.)
    /// In `on_open` as in `on_message` (a greeting queued before the
    /// connection's id is registered where others find it).
    pub fn queue(&mut self) {
        if !self.out.is_empty() {
            (self.flusher)(self.out, false);
            self.flushed = true;
            self.queued = true;
        }
    }

    /// Counts `frames` more against this read turn's frame budget (in
    /// `on_message`; elsewhere it does nothing). A message that does the
    /// work of many (a publication sent on to many subscribers) spends what
    /// it costs, so that the worker turns to other connections sooner: once
    /// the budget is spent the turn ends after this call, and the
    /// connection's next frames wait for its next turn.
    pub fn spend(&mut self, frames: usize) {
        self.spent = self.spent.saturating_add(frames);
    }

    /// The connection being served.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The peer's address, during `on_open` only (store it in the
    /// connection state if you need it later): an accepted TCP
    /// connection's peer, or the address an outbound one dialled. `None`
    /// for Unix sockets.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The server, to send to other connections or close them.
    pub fn server(&self) -> &ServerHandle {
        self.server
    }

    /// Replies with one frame carrying `payload`. Replies of one read turn
    /// are coalesced: written at the end of the turn, or earlier once 64 KiB
    /// have collected (between two frames, never inside a call).
    pub fn reply(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        self.reply_parts(&[payload])
    }

    /// Replies with one frame carrying the concatenation of `parts`
    /// (no intermediate copy).
    pub fn reply_parts(&mut self, parts: &[&[u8]]) -> Result<(), FrameError> {
        self.codec.encode(parts, self.out)?;
        self.replies += 1;
        Ok(())
    }

    /// Replies with `bytes` as they are, without framing (for protocols whose
    /// answers are not framed like their requests, such as EServer's demo).
    pub fn reply_raw(&mut self, bytes: &[u8]) {
        self.reply_raw_parts(&[bytes]);
    }

    /// Replies with the concatenation of `parts` as it is, without framing.
    pub fn reply_raw_parts(&mut self, parts: &[&[u8]]) {
        for part in parts {
            self.out.extend_from_slice(part);
        }
        self.replies += 1;
    }

    /// Closes the connection after this turn (see [`CloseMode::Now`]).
    pub fn close(&mut self) {
        *self.close = Some(CloseMode::Now);
    }

    /// Closes the connection once its output is flushed (see
    /// [`CloseMode::AfterFlush`]).
    pub fn close_after_flush(&mut self) {
        self.close.get_or_insert(CloseMode::AfterFlush);
    }
}

/// A shared handler, so the application can keep an `Arc` of its state (to
/// read counters, or reach it from other threads) while the server runs.
impl<H: Handler> Handler for std::sync::Arc<H> {
    type Conn = H::Conn;

    fn on_open(&self, ctx: &mut Ctx<'_>) -> Self::Conn {
        (**self).on_open(ctx)
    }

    fn on_message(&self, conn: &mut Self::Conn, ctx: &mut Ctx<'_>, msg: &[u8]) {
        (**self).on_message(conn, ctx, msg);
    }

    fn on_close(&self, conn: Self::Conn, info: CloseInfo<'_>) {
        (**self).on_close(conn, info);
    }

    fn on_connect_failed(&self, failure: ConnectFailure<'_>) {
        (**self).on_connect_failed(failure);
    }
}
