//! The read side of a connection: read turns, dispatch, and close.
//!
//! A thread that wins the read side (see [`crate::core::state`]) runs *turns*
//! until the ownership word lets it go. One turn:
//!
//! 1. reads until the socket is drained (a short read, or EAGAIN), the
//!    connection's read budget (bytes) or frame budget is spent, or the
//!    peer's output is over `max_out` (flow control);
//! 2. decodes the whole frames in place and calls the handler, whose replies
//!    collect in the worker's output buffer; frames past the frame budget
//!    wait in the read buffer for the next turn;
//! 3. writes that buffer in one go at the end, or earlier in 64 KiB batches
//!    when the replies grow past that (send first; the out-queue and
//!    EPOLLOUT only if the kernel does not take it all).
//!
//! A turn stopped by the budget puts the connection at the back of this
//! worker's task list: edge-triggered epoll will not report bytes that are
//! already buffered, so without that requeue they would wait for the next
//! arrival. So does an activation that has run [`TURNS_PER_ACTIVATION`]
//! turns: a peer that keeps sending, each turn ending on a short read while
//! another worker's event for it leaves a pending mark, would otherwise
//! hold this worker for as long as it sends, and the rest of this worker's
//! events and tasks would wait (edge-triggered epoll reports none of them
//! again).
//!
//! An outbound connection's first turns check its connect instead of
//! reading: once it completes, `on_open` runs as for an accepted connection;
//! if it fails, the connection is closed and the handler hears of it through
//! `on_connect_failed`. A dial closed after flush while still connecting
//! never opens: once connected it writes what was queued for it, and the
//! handler hears `on_connect_failed` (ECANCELED), never `on_open`. The turn
//! that sees the connect complete goes on to read: the completion's event may have carried the peer's first bytes or
//! its FIN, and no later edge would announce them (R).
//!
//! Closing is also a read-side act, so the handler's `on_close` runs on the
//! thread that owns the per-connection state, exactly once, after the
//! descriptor number is made safe.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use super::linger::Ended;
use super::readbuf::{ReadBuf, Refused};
use super::shared::Task;
use super::stats::Tally;
use super::timers::Timer;
use super::worker::{Env, Local};
use crate::core::cell::{OwnerCell, ReadSide};
use crate::core::slot::{SlotCore, WriteReport};
use crate::core::state::{Begin, EndRead, Flags, ReadOwner, Release};
use crate::core::{CloseReason, ConnId};
use crate::framing::{Codec, Decoded, FrameError};
use crate::handler::{CloseInfo, CloseMode, ConnectFailure, Ctx, Handler};
use crate::sys::{Errno, Fd, Shutdown, Sys};

/// Turns one activation of the read side runs before it yields: the rest
/// wait at the back of the worker's task list, behind the events and tasks
/// already there. Each turn ends drained or on its budget; more turns come
/// only while other workers keep leaving pending marks (new data on every
/// turn), so this bounds one peer's hold on a worker.
pub(crate) const TURNS_PER_ACTIVATION: u32 = 8;

/// Replies of one turn are written early once they reach this size, so a
/// turn's output buffer stays small whatever the pipelining depth.
pub(crate) const FLUSH_AT: usize = 64 << 10;

/// The most a worker's output buffer keeps between turns: a turn's replies
/// stop collecting at [`FLUSH_AT`], so only a single reply larger than that
/// grows it past this, and it is cut back after its flush.
const OUT_KEPT: usize = 2 * FLUSH_AT;

/// Cuts a worker's emptied output buffer back to [`FLUSH_AT`] if it grew
/// past [`OUT_KEPT`]. The buffer is the worker's, kept between turns so
/// that replies allocate nothing; one large reply must not pin its size
/// for good (it counts in no budget), whether it was written or queued.
fn keep_out_small(out: &mut Vec<u8>) {
    debug_assert!(out.is_empty(), "cut back only once its replies are out");
    if out.capacity() > OUT_KEPT {
        out.shrink_to(FLUSH_AT);
    }
}

/// Data owned by a connection's read side.
#[derive(Debug)]
pub(crate) struct ReaderSide<U> {
    /// The handler's per-connection state (`None` between connections).
    pub user: Option<U>,
    /// Bytes of an incomplete frame.
    pub buf: ReadBuf,
}

impl<U> Default for ReaderSide<U> {
    fn default() -> Self {
        Self {
            user: None,
            buf: ReadBuf::default(),
        }
    }
}

/// The read side's cell in a slot.
pub(crate) type ReaderCell<U> = OwnerCell<ReaderSide<U>, ReadSide>;

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Give the side back (`requeue`: more input may be waiting).
    Done { requeue: bool },
    /// Close the connection (for this reason, or the recorded one).
    Close(Option<CloseReason>),
}

/// Why a read loop or a dispatch stopped.
#[derive(Debug)]
enum Stop {
    /// The socket is drained.
    Drained,
    /// The read budget or the frame budget is spent.
    Budget,
    /// Output over `max_out`: stop reading until it drains.
    Paused,
    /// End of stream.
    Eof,
    /// A read failed.
    Failed(Errno),
    /// The codec refused a frame.
    BadFrame(FrameError),
    /// The handler panicked.
    Panic,
    /// The handler asked to close.
    Handler(CloseMode),
    /// The input budget refused the buffer an incomplete frame needed.
    InputBudget(Refused),
}

impl<S: Sys, H: Handler> Env<S, H> {
    /// An event (or a task) says connection `id` may have input.
    pub(crate) fn on_readable(&self, local: &mut Local, id: ConnId, hup: bool) {
        let shared = &*self.shared;
        // `get_or_create`: an outbound connection's first event may be the
        // first time a worker sees its slot.
        let (Some(slot), Some(cell)) = (
            shared.slot(id),
            self.readers.get_or_create(id.slot() as usize),
        ) else {
            local.tally.stale_events += 1;
            return;
        };
        match slot.state().begin_read(id.generation(), hup) {
            Begin::Acquired(owner, flags) => self.serve(local, id, slot, cell, owner, flags, None),
            Begin::Deferred => {}
            Begin::Stale => local.tally.stale_events += 1,
        }
    }

    /// Runs turns while this thread holds the read side. `first` replaces
    /// the first turn (a freshly opened connection starts with one done).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn serve<'s>(
        &self,
        local: &mut Local,
        id: ConnId,
        slot: &'s SlotCore,
        cell: &ReaderCell<H::Conn>,
        mut owner: ReadOwner<'s>,
        mut flags: Flags,
        mut first: Option<Turn>,
    ) {
        let mut requeue = false;
        let mut turns = 0;
        loop {
            let turn = match first.take() {
                Some(turn) => turn,
                None if flags.close_requested() => Turn::Close(None),
                // The budget is spent for this activation: consume the pending
                // mark without reading, and let the requeued task read later.
                None if requeue => Turn::Done { requeue: true },
                // A handle's close after flush of a dial not connected yet,
                // with nothing queued (see `read_turn`).
                None if slot.is_connecting() && slot.queue().reader_turn().1 => Turn::Close(None),
                // The drain's last turn for a dial still connecting, with
                // nothing to flush: cancelled, not waited for (the connect
                // may take the whole grace period). Decided under the
                // queue's lock, so a send is either flushed or refused.
                None if slot.is_connecting()
                    && self.shared.is_draining()
                    && slot.queue().linger_own_if_drained(CloseReason::Shutdown) =>
                {
                    Turn::Close(Some(CloseReason::Shutdown))
                }
                None if slot.is_connecting() => {
                    match self.connect_turn(local, id, slot, cell, &owner) {
                        // Connected: the completion's event may have
                        // carried the peer's first bytes or its FIN, and
                        // this turn consumed it (edge-triggered: no other
                        // edge comes for them). Read now, as after any edge.
                        Turn::Done { requeue: false } if !slot.is_connecting() => cell
                            .with(&owner, |reader| {
                                self.read_turn(local, id, slot, &owner, reader, flags)
                            }),
                        turn => turn,
                    }
                }
                None => cell.with(&owner, |reader| {
                    self.read_turn(local, id, slot, &owner, reader, flags)
                }),
            };
            match turn {
                Turn::Done { requeue: again } => {
                    requeue |= again;
                    match slot.state().end_read(owner) {
                        EndRead::Released => break,
                        EndRead::Again(next, next_flags) => {
                            owner = next;
                            flags = next_flags;
                            turns += 1;
                            // Yield: the remaining turns run from the task
                            // list (the turns after this only take the
                            // pending marks).
                            requeue |= turns >= TURNS_PER_ACTIVATION;
                        }
                        EndRead::Close(next) => {
                            self.close(local, id, slot, cell, next, None);
                            return;
                        }
                    }
                }
                Turn::Close(reason) => {
                    self.close(local, id, slot, cell, owner, reason);
                    return;
                }
            }
        }
        if requeue {
            local.tally.budget_requeues += 1;
            local.tasks.push_back(Task::Read(id));
        }
    }

    /// A turn of an outbound connection whose connect was pending: on
    /// success it becomes an ordinary connection (`on_open`, greeting); on
    /// failure it is closed, and `close` reports it to the handler.
    fn connect_turn(
        &self,
        local: &mut Local,
        id: ConnId,
        slot: &SlotCore,
        cell: &ReaderCell<H::Conn>,
        owner: &ReadOwner<'_>,
    ) -> Turn {
        let shared = &*self.shared;
        match shared.sys.connect_status(slot.fd()) {
            // A spurious or early edge: the completion brings another.
            Ok(false) => Turn::Done { requeue: false },
            Ok(true) => {
                slot.connect_done(owner);
                local.tally.connected += 1;
                shared.touch(slot);
                // Write-readiness was kept armed for the connect: a writer
                // pass disarms it now, unless output is pending (invariant
                // S). If a writer is busy, the pending mark makes it look
                // again and see the connect done.
                let mut sink = shared.sink(id, slot);
                if let Some(report) = slot.writable(id.generation(), shared.limits, &mut sink) {
                    shared.schedule_send_timer(id, &report);
                    local.tally.bytes_out += report.written as u64;
                    local.tally.epollout_arms += u64::from(report.arms);
                    debug_assert!(report.reclaim.is_none(), "{id}: reclaimed under its reader");
                    if report.close_requested {
                        return Turn::Close(None);
                    }
                }
                // A close after flush asked for (through the handle) while
                // the connect was pending cancels the open: the queued
                // messages are still written, then the dial is reported as
                // cancelled, with no `on_open` and none of its replies.
                // Decided under the queue's lock: a close asked for after
                // this look comes after the open, as for any connection.
                if slot.queue().lingers() {
                    return Turn::Done { requeue: false };
                }
                self.start(local, id, slot, cell, owner, None)
            }
            Err(errno) => Turn::Close(Some(CloseReason::ConnectFailed(errno.0))),
        }
    }

    /// One read turn. See the [module docs](self).
    fn read_turn(
        &self,
        local: &mut Local,
        id: ConnId,
        slot: &SlotCore,
        owner: &ReadOwner<'_>,
        reader: &mut ReaderSide<H::Conn>,
        flags: Flags,
    ) -> Turn {
        let shared = &*self.shared;
        let draining = shared.is_draining();
        let (held, drained) = slot.queue().reader_turn();
        if held {
            // Paused by flow control, or waiting to close once flushed: a
            // close after flush from a handle, with everything written, is
            // done here (no reply of ours is uncounted between turns).
            if drained {
                return Turn::Close(None);
            }
            return if draining {
                self.linger(slot, CloseReason::Shutdown)
            } else {
                Turn::Done { requeue: false }
            };
        }
        let ReaderSide { user, buf } = reader;
        let Some(user) = user.as_mut() else {
            debug_assert!(false, "{id}: read turn without handler state");
            return Turn::Close(None);
        };
        let Local {
            scratch,
            out,
            tally,
            ..
        } = local;
        let fd = slot.fd();
        let mut budget = shared.read_budget;
        let mut frames = shared.frame_budget;
        let (bytes_before, msgs_before) = (tally.bytes_in, tally.msgs_in);
        // Frames left buffered by a pause or by the frame budget come first.
        let (mut need, mut stop) = if buf.is_empty() {
            (None, None)
        } else {
            let seen = buf.seen();
            let (consumed, need, stop) = self.dispatch_frames(
                out,
                tally,
                id,
                slot,
                owner,
                user,
                &mut frames,
                buf.filled(),
                seen,
            );
            buf.consume(consumed);
            buf.set_seen(stop.is_none());
            (need, stop)
        };
        while stop.is_none() {
            let from_buf = !buf.is_empty();
            let (result, asked) = if from_buf {
                let most = shared.framing.max_incomplete();
                let spare = match buf.spare(need, most, &shared.in_budget) {
                    Ok(spare) => spare,
                    Err(refused) => {
                        stop = Some(Stop::InputBudget(refused));
                        break;
                    }
                };
                let asked = spare.len();
                (shared.sys.recv(fd, spare), asked)
            } else {
                (shared.sys.recv(fd, scratch), scratch.len())
            };
            let n = match result {
                Ok(0) => {
                    stop = Some(Stop::Eof);
                    break;
                }
                Ok(n) => n,
                Err(errno) if errno.is_would_block() => break,
                Err(errno) if errno == Errno::EINTR => continue,
                Err(errno) => {
                    stop = Some(Stop::Failed(errno));
                    break;
                }
            };
            tally.bytes_in += n as u64;
            // Frames are decoded where the bytes landed: in the connection's
            // buffer behind a partial frame, else straight from scratch.
            let (data, seen): (&[u8], usize) = if from_buf {
                buf.commit(n);
                (buf.filled(), buf.seen())
            } else {
                (&scratch[..n], 0)
            };
            let (consumed, next_need, dispatch_stop) =
                self.dispatch_frames(out, tally, id, slot, owner, user, &mut frames, data, seen);
            if from_buf {
                buf.consume(consumed);
            } else if consumed < n {
                // Refusable only if what is left is one incomplete frame,
                // not the tail of a turn that stopped early.
                let incomplete = dispatch_stop.is_none();
                let kept = buf.keep(
                    &scratch[consumed..n],
                    next_need,
                    &shared.in_budget,
                    incomplete,
                );
                if let Err(refused) = kept {
                    stop = Some(Stop::InputBudget(refused));
                    break;
                }
            }
            // What is left was found incomplete, unless dispatch stopped early.
            buf.set_seen(dispatch_stop.is_none());
            need = next_need;
            if dispatch_stop.is_some() {
                stop = dispatch_stop;
                break;
            }
            budget = budget.saturating_sub(n);
            // A short read drained the socket; more bytes will raise a new
            // edge. After a hang-up no edge comes: read on to end of stream.
            if n < asked && !flags.peer_hup() {
                break;
            }
            if budget == 0 {
                stop = Some(Stop::Budget);
                break;
            }
        }
        // An incomplete frame waits for its next bytes in a buffer sized
        // to what arrived, not to the read's room: when the peer has paused
        // (drained) or this reader must wait (paused). Not on a turn cut by
        // its budget, which goes on at once, nor on one that closes.
        if !buf.is_empty() && matches!(stop, None | Some(Stop::Paused)) {
            buf.trim(need);
        }
        // The turn's replies, coalesced into one write.
        let paused = self.flush(out, tally, id, slot, owner);
        if tally.bytes_in != bytes_before {
            shared.touch(slot);
        }
        // Whether the reader is left held, looked at once (under the queue's
        // lock) and only after a turn that paused. Only this thread pauses
        // its reader, in its own flush; a resume by another thread after
        // this look is followed by a turn (a pending mark: this thread
        // still holds the read side).
        let held = (paused || matches!(stop, Some(Stop::Paused))) && slot.queue().holds_reader();
        if let Some(timeout) = shared.frame_timeout {
            // A reader left held is the server's stall, not the peer's: the
            // clock stops, and the first turn after the resume starts it
            // again.
            if held {
                slot.set_frame_since(None);
            } else {
                self.track_incomplete_frame(id, slot, buf, tally.msgs_in != msgs_before, timeout);
            }
        }
        match stop.unwrap_or(Stop::Drained) {
            Stop::Drained if draining => self.linger(slot, CloseReason::Shutdown),
            Stop::Drained => Turn::Done { requeue: false },
            // The writer that resumes a paused reader queues its turn, but
            // a resume by this turn's own later flush (a handler that
            // flushed twice) queues none: the reader is this thread.
            Stop::Paused => Turn::Done { requeue: !held },
            Stop::Budget => Turn::Done { requeue: !paused },
            Stop::Eof => {
                if !buf.is_empty() {
                    log::debug!(
                        "{id}: peer closed mid-frame; {} buffered bytes dropped",
                        buf.len()
                    );
                    buf.discard();
                }
                // Half-close: every complete frame has its reply queued;
                // close once they are written.
                self.linger(slot, CloseReason::Eof)
            }
            Stop::Failed(errno) => Turn::Close(Some(CloseReason::Reset(errno.0))),
            Stop::BadFrame(error) => {
                log::warn!("{id}: {error}; closing the connection once its replies are written");
                // What follows a bad header cannot be framed: dropped, and
                // nothing more is read. The replies to the complete frames
                // before it still go out, then the close (graceful, with
                // the lingering close taking what the peer sends after).
                buf.discard();
                self.linger(slot, CloseReason::BadFrame)
            }
            Stop::Panic => Turn::Close(Some(CloseReason::HandlerPanic)),
            Stop::Handler(CloseMode::Now) => Turn::Close(Some(CloseReason::Handler)),
            Stop::Handler(CloseMode::AfterFlush) => self.linger(slot, CloseReason::Handler),
            Stop::InputBudget(refused) => {
                log::warn!(
                    "{id}: an incomplete frame needs a {}-byte buffer, past the input budget \
                     ({} of {} bytes held across connections); closing the connection",
                    refused.size,
                    shared.in_budget.queued(),
                    shared.in_budget.max()
                );
                buf.discard();
                // The replies to its complete frames still go out.
                self.linger(slot, CloseReason::InputBudget)
            }
        }
    }

    /// Decodes and dispatches the whole frames of `data`, at most `frames`
    /// of them (counted down); the first `seen` bytes were found incomplete
    /// before. Returns the bytes consumed, the size of the incomplete frame
    /// left (if the codec knows it), and why it stopped early, if it did
    /// (`None`: the rest is incomplete).
    #[allow(clippy::too_many_arguments)]
    fn dispatch_frames(
        &self,
        out: &mut Vec<u8>,
        tally: &mut Tally,
        id: ConnId,
        slot: &SlotCore,
        owner: &ReadOwner<'_>,
        user: &mut H::Conn,
        frames: &mut usize,
        data: &[u8],
        mut seen: usize,
    ) -> (usize, Option<usize>, Option<Stop>) {
        let codec = &self.shared.framing;
        let mut at = 0;
        loop {
            if *frames == 0 {
                // The rest waits in the read buffer; the requeued turn
                // dispatches it before reading again.
                return (at, None, Some(Stop::Budget));
            }
            let (payload, consumed) = match codec.decode_from(&data[at..], seen) {
                Ok(Decoded::Frame { payload, consumed }) => (payload, consumed),
                Ok(Decoded::Incomplete { need }) => return (at, need, None),
                Err(error) => return (at, None, Some(Stop::BadFrame(error))),
            };
            let msg = &data[at + payload.start..at + payload.end];
            at += consumed;
            seen = 0;
            *frames -= 1;
            tally.msgs_in += 1;
            let mut close = None;
            // The earlier frames' replies stay; a panicking call's go.
            let before = out.len();
            let (handled, replies, spent, mut paused, flushed, queued) = {
                let mut flush_now = |out: &mut Vec<u8>, write: bool| {
                    self.flush_call(out, write, tally, id, slot, owner)
                };
                let mut ctx = Ctx::new(
                    id,
                    codec,
                    out,
                    &mut close,
                    &self.handle,
                    None,
                    &mut flush_now,
                );
                let handled = catch_unwind(AssertUnwindSafe(|| {
                    self.handler.on_message(user, &mut ctx, msg)
                }));
                (
                    handled,
                    ctx.replies,
                    ctx.spent,
                    ctx.paused,
                    ctx.flushed,
                    ctx.queued,
                )
            };
            // Replies a `Ctx::queue` left in the out-queue are written now,
            // panic or not: they were made before whatever panicked.
            if queued {
                paused |= self.write_queued(tally, id, slot, owner);
            }
            *frames = frames.saturating_sub(spent);
            if handled.is_err() {
                // Half a response (a header without its body) must not
                // reach the peer before the close. After a `Ctx::flush`,
                // what is left is all this call's.
                out.truncate(if flushed { 0 } else { before });
                log::error!("{id}: handler panicked in on_message; closing the connection");
                return (at, None, Some(Stop::Panic));
            }
            tally.msgs_out += replies;
            if let Some(mode) = close {
                return (at, None, Some(Stop::Handler(mode)));
            }
            if paused {
                return (at, None, Some(Stop::Paused));
            }
            if out.len() >= FLUSH_AT && self.flush(out, tally, id, slot, owner) {
                return (at, None, Some(Stop::Paused));
            }
            if consumed == 0 {
                debug_assert!(false, "codec made no progress");
                return (at, None, None);
            }
        }
    }

    /// The server's side of [`Ctx::flush`] (`write`) and [`Ctx::queue`]
    /// during a handler call whose replies collect in `out`; returns
    /// whether the reader must pause for flow control.
    pub(crate) fn flush_call(
        &self,
        out: &mut Vec<u8>,
        write: bool,
        tally: &mut Tally,
        id: ConnId,
        slot: &SlotCore,
        owner: &ReadOwner<'_>,
    ) -> bool {
        if !write {
            slot.queue_reply(owner, out);
            keep_out_small(out);
            false
        } else if out.is_empty() {
            self.write_queued(tally, id, slot, owner)
        } else {
            self.flush(out, tally, id, slot, owner)
        }
    }

    /// Writes the replies collected in `out` (send first); returns whether
    /// the reader must now pause for flow control.
    pub(crate) fn flush(
        &self,
        out: &mut Vec<u8>,
        tally: &mut Tally,
        id: ConnId,
        slot: &SlotCore,
        owner: &ReadOwner<'_>,
    ) -> bool {
        if out.is_empty() {
            return false;
        }
        let mut sink = self.shared.sink(id, slot);
        let (report, paused) =
            slot.reply(owner, id.generation(), out, self.shared.limits, &mut sink);
        keep_out_small(out);
        self.settle_reply(tally, id, report, paused)
    }

    /// Acts on what writing the reader's replies reported; returns `paused`.
    fn settle_reply(
        &self,
        tally: &mut Tally,
        id: ConnId,
        report: WriteReport<'_>,
        paused: bool,
    ) -> bool {
        self.shared.schedule_send_timer(id, &report);
        tally.bytes_out += report.written as u64;
        tally.epollout_arms += u64::from(report.arms);
        tally.queued(report.queued);
        // The reader is this thread: a resume needs no task, a close request
        // is seen by `end_read`, and nothing is reclaimed while we read.
        debug_assert!(report.reclaim.is_none(), "{id}: reclaimed under its reader");
        // Counted once per pause: a reader already paused that flushes
        // again (a handler's `Ctx::flush`, then the turn's end) stays paused.
        if report.paused_now {
            tally.reader_pauses += 1;
        }
        paused
    }

    /// Writes what a `Ctx::queue` left in the out-queue; returns whether the
    /// reader must now pause for flow control.
    pub(crate) fn write_queued(
        &self,
        tally: &mut Tally,
        id: ConnId,
        slot: &SlotCore,
        owner: &ReadOwner<'_>,
    ) -> bool {
        let mut sink = self.shared.sink(id, slot);
        let (report, paused) =
            slot.write_queued(owner, id.generation(), self.shared.limits, &mut sink);
        self.settle_reply(tally, id, report, paused)
    }

    /// Keeps the frame clock: it starts when the reader first holds an
    /// incomplete frame, restarts whenever a frame completes, and stops when
    /// nothing is held; a timer closes the connection if it runs out.
    fn track_incomplete_frame(
        &self,
        id: ConnId,
        slot: &SlotCore,
        buf: &ReadBuf,
        progressed: bool,
        timeout: Duration,
    ) {
        if buf.is_empty() {
            slot.set_frame_since(None);
            return;
        }
        if progressed || slot.frame_since().is_none() {
            slot.set_frame_since(Some(self.shared.now_ms()));
            if slot.arm_frame_timer(id.generation()) {
                self.shared.schedule_timer(
                    self.shared.sys.now().saturating_add(timeout),
                    Timer::Frame(id),
                );
            }
        }
    }

    /// Closes once the output is flushed (now, if it already is). The
    /// reason is recorded with the linger, and a close now takes it from
    /// there (`Close(None)`), so that `close` sees a close after flush
    /// complete and ends it gracefully, as when the writer completes it.
    pub(crate) fn linger(&self, slot: &SlotCore, reason: CloseReason) -> Turn {
        let mut queue = slot.queue();
        if queue.linger_own(reason) {
            Turn::Close(None)
        } else {
            Turn::Done { requeue: false }
        }
    }

    /// Closes connection `id`; the caller holds its read side.
    pub(crate) fn close<'s>(
        &self,
        local: &mut Local,
        id: ConnId,
        slot: &'s SlotCore,
        cell: &ReaderCell<H::Conn>,
        owner: ReadOwner<'s>,
        reason: Option<CloseReason>,
    ) {
        let closing = slot.begin_close(&owner);
        let dropped = closing.dropped;
        if reason.is_none() && closing.after_flush {
            self.close_gracefully(local, id, slot.fd());
        }
        let reason = reason.or(closing.reason).unwrap_or(CloseReason::Requested);
        // Invariant C: the number is never closed, only covered.
        self.shared.release_number(id, slot);
        let (user, unread) = cell.with(&owner, |reader| {
            let unread = reader.buf.take_unread();
            (reader.user.take(), unread)
        });
        let dialled = slot.take_unopened(&owner);
        if slot.is_connecting() {
            slot.connect_done(&owner);
        }
        local.tally.close(reason);
        log_close(id, reason, dropped, dialled);
        // The slot goes back before the handler hears of the close (unless
        // a send on another thread still holds its write side: that thread
        // returns it), so a handler that dials again from `on_close` or
        // `on_connect_failed` finds it free when the pool was full.
        match slot.finish_close(owner) {
            Release::Reclaim(reclaimer) => self.shared.reclaim(id.slot(), slot, reclaimer, false),
            Release::Released => {}
        }
        if let Some(addr) = dialled {
            // No `on_open` (the connect failed, or the connection closed
            // before it ran), so no `on_close` either.
            let errno = match reason {
                // A send queued before the connect completed can be the one
                // that meets (and consumes) the connect's error.
                CloseReason::ConnectFailed(errno)
                | CloseReason::WriteFailed(errno)
                | CloseReason::Reset(errno) => Errno(errno),
                // A dial that never connects, with a send queued behind it.
                CloseReason::IdleTimeout | CloseReason::SendTimeout => Errno::ETIMEDOUT,
                _ => Errno::ECANCELED,
            };
            let failure = ConnectFailure {
                id,
                addr,
                error: errno,
                server: &self.handle,
            };
            let report = || self.handler.on_connect_failed(failure);
            if catch_unwind(AssertUnwindSafe(report)).is_err() {
                log::error!("{id}: handler panicked in on_connect_failed");
            }
        }
        if let Some(user) = user {
            let info = CloseInfo {
                id,
                reason,
                unread,
                server: &self.handle,
            };
            if catch_unwind(AssertUnwindSafe(|| self.handler.on_close(user, info))).is_err() {
                log::error!("{id}: handler panicked in on_close");
            }
        }
    }
}

impl<S: Sys, H: Handler> Env<S, H> {
    /// The end of a close after flush that the peer did not start: a FIN
    /// behind the replies, then what the peer has sent already is read and
    /// dropped. Bytes left unread at close make the kernel answer with a
    /// reset (RFC 1122, 4.2.2.13), and the reset drops whatever of the
    /// replies is still in the socket's send buffer. If the peer has not
    /// closed its end, the socket lingers (see `server::linger`) for the
    /// bytes the peer may still send (during the shutdown drain, only if
    /// some replies are unacknowledged).
    fn close_gracefully(&self, local: &mut Local, id: ConnId, fd: Fd) {
        let shared = &*self.shared;
        let sys = &shared.sys;
        // Whether a reset could cost the peer replies. While the server
        // runs: whenever the peer has not closed (some stacks, Windows',
        // drop even acknowledged data their application has not read when
        // a reset comes). While it drains for shutdown: only with replies
        // unacknowledged (SIOCOUTQ, read before the FIN, which counts in
        // it), which is all a Linux peer can lose; idle peers that keep
        // their connections open then do not hold the shutdown to its
        // deadline. (An error: assume the worst.)
        let at_risk = shared.lingering.time().is_some()
            && (!shared.is_draining() || sys.unacked(fd) != Ok(0));
        if let Err(errno) = sys.shutdown(fd, Shutdown::Write) {
            log::debug!("{id}: shutdown(SHUT_WR) before a close after flush: {errno}");
            return;
        }
        let budget = shared.read_budget;
        let mut left = budget;
        let peer_open = loop {
            if left == 0 {
                break true;
            }
            match sys.recv(fd, &mut local.scratch) {
                Ok(0) => break false,
                Ok(n) => left = left.saturating_sub(n),
                Err(errno) if errno == Errno::EINTR => {}
                Err(errno) if errno.is_would_block() => break true,
                // A reset: nothing is left to protect.
                Err(_) => break false,
            }
        };
        if !(peer_open && at_risk) {
            return;
        }
        let lingering = &shared.lingering;
        let epoll = shared.fds.epoll;
        match lingering.start(
            sys,
            epoll,
            id,
            fd,
            sys.now(),
            budget - left,
            &mut local.scratch,
        ) {
            Ok(started) => {
                local.tally.lingers += 1;
                if matches!(started.ended, Ended::Budget | Ended::Timeout) {
                    local.tally.lingers_cut += 1;
                }
                if let Some(at) = started.timer {
                    shared.schedule_timer(at, Timer::Linger);
                }
            }
            Err(why) => {
                local.tally.lingers_refused += 1;
                log::debug!("{id}: closing without lingering: {why}");
            }
        }
    }
}

/// One line per closed connection: peers that misbehaved or failed at
/// `info`, ordinary ends at `debug`.
fn log_close(id: ConnId, reason: CloseReason, dropped: usize, dialled: Option<SocketAddr>) {
    let mut unsent = if dropped > 0 {
        format!(" ({dropped} queued bytes not sent)")
    } else {
        String::new()
    };
    if let Some(addr) = dialled {
        // A dial that never opened: say where it was going.
        unsent.push_str(&format!(" (dialling {addr})"));
    }
    match reason {
        // Ordinary ends: visible with --log-level debug.
        CloseReason::Eof
        | CloseReason::Handler
        | CloseReason::Requested
        | CloseReason::Shutdown => {
            log::debug!("{id} closed: {reason}{unsent}");
        }
        // Already logged, with the details, where they were detected: one
        // line per peer.
        CloseReason::BadFrame
        | CloseReason::HandlerPanic
        | CloseReason::SlowReceiver
        | CloseReason::IdleTimeout
        | CloseReason::FrameTimeout
        | CloseReason::SendTimeout
        | CloseReason::InputBudget
        | CloseReason::RegisterFailed(_) => {}
        CloseReason::Reset(_) | CloseReason::WriteFailed(_) | CloseReason::ConnectFailed(_) => {
            log::info!("{id} closed: {reason}{unsent}")
        }
    }
}
