//! One connection slot's shared part: ownership word, out-queue, write side.
//!
//! [`SlotCore`] puts the protocols of [`super::state`], [`super::outq`] and
//! [`super::writer`] together into the operations the event loop needs:
//! *send* from anywhere, *flush* on write-readiness, *reply* at the end of a
//! read turn (send first), *request close*, and the read-side owner's *close*.
//! It does no I/O of its own: writes go through a [`Sink`].
//!
//! # Invariants
//!
//! - **W.** A message is queued before the write side is tried, and the write
//!   side is only given up through [`State::end_write`], which re-checks the
//!   pending mark; so a queued message always has a writer that will see it.
//! - **C.** Closing first closes the out-queue (under its lock), then marks the
//!   word closed: a send either queued before the close (and is dropped with the
//!   connection, never delivered elsewhere) or is refused.
//! - The descriptor number is pinned: set when the slot is first used and
//!   kept across connections (covered by the placeholder between them). The
//!   only release is [`SlotCore::unpin`], of a *free* slot (no connection, no
//!   side held, nothing can be in a syscall on it), when `accept` has run out
//!   of numbers; the slot adopts a new number when next used.
//! - An outbound connection ([`SlotCore::open_outbound`]) starts with its
//!   write side armed, because its registration asks for EPOLLOUT (the
//!   connect completes with write-readiness); a drained writer keeps it
//!   armed until the read side has seen the connect complete
//!   ([`SlotCore::connect_done`]), then the next writer pass disarms it.
//! - An outbound connection is *unopened* from `open_outbound` until its
//!   read-side owner takes the mark, the address dialled
//!   ([`SlotCore::take_unopened`]), just before `on_open` or at its close;
//!   a close that takes it reports a failed connect, to that address.
//!   Connecting implies unopened (checked there), not the reverse: the
//!   connect can complete and the connection close before `on_open`.

use std::io::IoSlice;
use std::net::SocketAddr;

use super::CloseReason;
use super::cell::{OwnerCell, ReadSide, WriteSide};
use super::outq::{self, Budget, Chunk, OutQueue, Refusal};
use super::state::{Begin, EndWrite, ReadOwner, Reclaimer, Release, State, TryBegin, WriteOwner};
use super::writer::{Flush, Flushed, Sink, SinkError, WriterSide};
use crate::sync::{AtomicBool, AtomicI32, AtomicU64, Mutex, MutexGuard, Ordering, lock};

/// Output limits shared by all connections of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Queued bytes past which sends from elsewhere are refused and the
    /// connection's own reader is paused.
    pub max_out: usize,
    /// Queued bytes at or below which a paused reader resumes.
    pub low_water: usize,
    /// Count the bytes the kernel takes and arm a send timer when output
    /// waits (the server has a send timeout).
    pub watch_sends: bool,
}

impl Limits {
    /// `max_out`, resuming readers at half of it.
    pub fn new(max_out: usize) -> Self {
        Self {
            max_out,
            low_water: max_out / 2,
            watch_sends: false,
        }
    }
}

/// What a write-side operation did, for the caller to act on.
#[derive(Debug, Default)]
#[must_use = "a reclaim, a resume or a close request must be acted upon"]
pub struct WriteReport<'a> {
    /// Bytes written.
    pub written: usize,
    /// Times write-readiness was armed.
    pub arms: u32,
    /// A reader paused by flow control must be scheduled for a read turn.
    pub resume: bool,
    /// This operation requested a close (write failure, or a lingering close
    /// drained): a read-side turn must perform it.
    pub close_requested: bool,
    /// The connection was closed and this thread released its last side:
    /// reset the slot and return it to the pool.
    pub reclaim: Option<Reclaimer<'a>>,
    /// Bytes queued for the connection right after this operation queued
    /// its own (for the high-water mark).
    pub queued: usize,
    /// Output waits on a full kernel buffer and this operation armed the
    /// send timer (see [`SlotCore::arm_send_timer`]): the caller schedules
    /// it, with this mark (the queue's [`OutQueue::taken`] when armed).
    /// Only with [`Limits::watch_sends`].
    pub send_timer: Option<u64>,
    /// This operation paused the reader, which was not paused before.
    pub paused_now: bool,
}

impl WriteReport<'_> {
    fn absorb(&mut self, flush: &Flush) {
        self.written += flush.written;
        self.arms += u32::from(flush.armed);
        self.resume |= flush.settled.resume;
    }
}

/// What [`SlotCore::begin_close`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// The recorded reason, if any (a cause, else a completed close after
    /// flush's reason).
    pub reason: Option<CloseReason>,
    /// Queued bytes dropped unsent.
    pub dropped: usize,
    /// The close completes a close after flush the peer did not start, no
    /// other cause recorded, nothing dropped: it may end gracefully.
    pub after_flush: bool,
}

/// "A timer is scheduled for connection `generation`": the flag behind the
/// frame and the send timers. It names its generation (generation + 1; 0:
/// none), so a stale timer (its connection closed, and the slot reused,
/// while it looked; its re-arm holds neither side) can neither leave the
/// next connection's flag up with no timer behind it nor take that flag
/// down, nor, arming late, take a newer generation's flag. Every access
/// but `arm`'s first guess is a read-modify-write: loom builds impossible
/// histories from a store racing a swap (tokio-rs/loom#254).
#[derive(Debug)]
struct TimerFlag(AtomicU64);

impl TimerFlag {
    fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Marks a timer scheduled for `generation`; `true` if none was (the
    /// caller then schedules one). A flag an older generation left (a stale
    /// arm that landed after the slot was reset) is taken over; a newer
    /// generation's is left alone, and the caller, stale, schedules nothing
    /// (generations only grow: a slot retires before its wraps).
    fn arm(&self, generation: u32) -> bool {
        let tag = u64::from(generation) + 1;
        let mut current = self.0.load(Ordering::SeqCst);
        loop {
            if current >= tag {
                return false;
            }
            match self
                .0
                .compare_exchange(current, tag, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// `generation`'s timer fired (another generation's flag is left).
    fn disarm(&self, generation: u32) {
        let tag = u64::from(generation) + 1;
        let _ = self
            .0
            .compare_exchange(tag, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// No timer is scheduled (a reset slot).
    fn clear(&self) {
        let _ = self.0.swap(0, Ordering::SeqCst);
    }
}

/// The part of a slot that any thread may touch. See the [module docs](self).
#[derive(Debug)]
pub struct SlotCore {
    state: State,
    queue: Mutex<OutQueue>,
    writer: OwnerCell<WriterSide, WriteSide>,
    fd: AtomicI32,
    retired: AtomicBool,
    /// When bytes last moved either way (ms on the server's clock).
    last_active: AtomicU64,
    /// Since when the reader holds an incomplete frame and has completed
    /// none (ms + 1; 0: no incomplete frame).
    frame_since: AtomicU64,
    /// A frame timer is scheduled.
    frame_timer: TimerFlag,
    /// A send timer is scheduled.
    send_timer: TimerFlag,
    /// An outbound connection whose connect has not completed yet.
    connecting: AtomicBool,
    /// An outbound connection whose `on_open` has not run: if it closes
    /// now, the handler hears `on_connect_failed`. Outlives `connecting`:
    /// the connect can complete and the connection still close before
    /// `on_open` (its first flush fails, or completes a close after flush).
    /// Holds the address dialled, for `on_open` and `on_connect_failed`:
    /// boxed, so that the slots of accepted connections (most of them)
    /// pay 8 bytes for it rather than a `SocketAddr`'s 32, and a dial pays
    /// one allocation.
    unopened: OwnerCell<Option<Box<SocketAddr>>, ReadSide>,
}

impl Default for SlotCore {
    fn default() -> Self {
        Self::new()
    }
}

impl SlotCore {
    /// A free slot with no descriptor number yet.
    pub fn new() -> Self {
        Self {
            state: State::new(),
            queue: Mutex::new(OutQueue::new()),
            writer: OwnerCell::new(WriterSide::new()),
            fd: AtomicI32::new(-1),
            retired: AtomicBool::new(false),
            last_active: AtomicU64::new(0),
            frame_since: AtomicU64::new(0),
            frame_timer: TimerFlag::new(),
            send_timer: TimerFlag::new(),
            connecting: AtomicBool::new(false),
            unopened: OwnerCell::new(None),
        }
    }

    /// The ownership word.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The out-queue, locked. Never hold it across a syscall.
    pub fn queue(&self) -> MutexGuard<'_, OutQueue> {
        lock(&self.queue)
    }

    /// The slot's pinned descriptor number, or -1 before first use.
    pub fn fd(&self) -> i32 {
        // Relaxed: the number is written only while the slot is free and
        // out of everyone's reach but the writer's: pinned before an `open`
        // by the thread that checked the slot out, or unpinned (`unpin`,
        // under EMFILE) under the pool's mutex while it sits in the free
        // list. Every later reader got the slot through the pool's mutex or
        // the word's Acquire, which order it after that write.
        self.fd.load(Ordering::Relaxed)
    }

    /// Releases the pinned number of a free slot (the caller closes it); the
    /// slot adopts a new number when next used. `None` if it has none, or if
    /// the slot is not free (then nothing changes).
    pub fn unpin(&self) -> Option<i32> {
        if self.state.open_generation().is_some() || !self.state.is_free() {
            debug_assert!(false, "unpin of a slot in use");
            return None;
        }
        let fd = self.fd.swap(-1, Ordering::Relaxed);
        (fd >= 0).then_some(fd)
    }

    /// Pins the descriptor number on the slot's first use (or its first
    /// use after `unpin` gave the last one back).
    pub fn pin_fd(&self, fd: i32) {
        debug_assert!(fd >= 0, "pinning an invalid descriptor");
        let previous = self.fd.swap(fd, Ordering::Relaxed);
        debug_assert_eq!(
            previous, -1,
            "a slot's descriptor number is pinned for life"
        );
    }

    /// Takes the slot out of service for good: its descriptor number could
    /// not be made safe (called by the closer before it releases the read
    /// side), or its generation wrapped (by [`SlotCore::reset`]), so it must
    /// never be handed to another connection.
    pub fn retire(&self) {
        // Relaxed: published to the reclaimer by `release_closed` (Release)
        // and the reclaiming compare-exchange (Acquire).
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Whether [`SlotCore::retire`] was called.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Records that bytes moved at `now_ms` (for the idle timeout).
    pub fn touch(&self, now_ms: u64) {
        // Relaxed: a timestamp read by the idle timer, which at worst sees
        // it a moment late and re-checks later.
        self.last_active.store(now_ms, Ordering::Relaxed);
    }

    /// When bytes last moved.
    pub fn last_active(&self) -> u64 {
        self.last_active.load(Ordering::Relaxed)
    }

    /// Records since when the reader holds an incomplete frame (`None`: it
    /// holds none).
    pub fn set_frame_since(&self, since_ms: Option<u64>) {
        // SeqCst, with `arm_frame_timer` and `disarm_frame_timer`: the
        // reader stores this then arms; the timer disarms then loads this. In
        // a single total order one of them sees the other, so an incomplete
        // frame always has a timer.
        self.frame_since
            .store(since_ms.map_or(0, |s| s + 1), Ordering::SeqCst);
    }

    /// Stops the frame clock if it still reads `since_ms` (the timer found
    /// the reader held: the server, not the peer, stopped reading). The
    /// reader's next turn starts it again.
    pub fn stop_frame_clock(&self, since_ms: u64) {
        // SeqCst, as `set_frame_since`. A failure means the reader set a
        // new time, and armed a timer for it (see `set_frame_since`).
        let _ =
            self.frame_since
                .compare_exchange(since_ms + 1, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Since when the reader holds an incomplete frame.
    pub fn frame_since(&self) -> Option<u64> {
        self.frame_since.load(Ordering::SeqCst).checked_sub(1)
    }

    /// Marks a frame timer scheduled for connection `generation`; `true` if
    /// none was (schedule one). See `TimerFlag`.
    pub fn arm_frame_timer(&self, generation: u32) -> bool {
        self.frame_timer.arm(generation)
    }

    /// The frame timer of connection `generation` fired.
    pub fn disarm_frame_timer(&self, generation: u32) {
        self.frame_timer.disarm(generation);
    }

    /// The write side's owner found the kernel buffer full (`blocked`) or
    /// not: arms the send timer if output now waits and none is armed for
    /// this connection, and hands the caller the mark to schedule it with.
    fn watch_send(
        &self,
        generation: u32,
        limits: Limits,
        blocked: bool,
        report: &mut WriteReport<'_>,
    ) {
        if limits.watch_sends && blocked && self.arm_send_timer(generation) {
            report.send_timer = Some(self.queue().taken());
        }
    }

    /// Marks a send timer scheduled for connection `generation`; `true` if
    /// none was (schedule one). With [`SlotCore::disarm_send_timer`], the
    /// frame timer's protocol: the writer queues output, then arms; the
    /// timer disarms, then looks at the queue; one of them sees the other
    /// (SeqCst), so waiting output always has a timer. See `TimerFlag` for
    /// why the flag names its generation.
    pub fn arm_send_timer(&self, generation: u32) -> bool {
        self.send_timer.arm(generation)
    }

    /// The send timer of connection `generation` fired: a new one may be
    /// armed.
    pub fn disarm_send_timer(&self, generation: u32) {
        self.send_timer.disarm(generation);
    }

    /// Opens the (checked out, free) slot for a new connection, counting
    /// its output in the server's `budget`; the caller becomes its reader.
    /// `None` if the slot was not free.
    pub fn open(&self, budget: std::sync::Arc<Budget>) -> Option<(u32, ReadOwner<'_>)> {
        let (generation, owner) = self.state.open()?;
        self.queue().open(generation, budget);
        Some((generation, owner))
    }

    /// Opens the slot for an outbound connection whose socket is (about to
    /// be) registered with write-readiness, because a non-blocking connect
    /// completes with EPOLLOUT. The write side starts armed, so the first
    /// flush that finds nothing to write disarms it: invariant S (armed only
    /// while something is pending, here the connect) holds from the start.
    pub fn open_outbound(
        &self,
        budget: std::sync::Arc<Budget>,
        addr: SocketAddr,
    ) -> Option<(u32, ReadOwner<'_>)> {
        let (generation, owner) = self.open(budget)?;
        // Release: an event's dispatcher that sees the flag (Acquire) also
        // sees the open slot.
        self.connecting.store(true, Ordering::Release);
        self.unopened
            .with(&owner, |dialled| *dialled = Some(Box::new(addr)));
        let Begin::Acquired(mut writer, _) = self.state.begin_write(generation) else {
            debug_assert!(false, "a new connection's write side is held");
            return Some((generation, owner));
        };
        self.with_writer(&writer, WriterSide::assume_armed);
        loop {
            match self.state.end_write(writer) {
                EndWrite::Released => break,
                EndWrite::Again(again) => writer = again,
                // We hold the read side: nothing can be reclaimed.
                EndWrite::Reclaim(_) => {
                    debug_assert!(false, "reclaimed under its reader");
                    break;
                }
            }
        }
        Some((generation, owner))
    }

    /// Whether the connection is outbound and its connect has not completed.
    pub fn is_connecting(&self) -> bool {
        self.connecting.load(Ordering::Acquire)
    }

    /// The connect completed (either way); called by the read-side owner.
    pub fn connect_done(&self, _reader: &ReadOwner<'_>) {
        // Release: a writer that later takes the write side (ordered after
        // this by the word's pending mark) must see it, to disarm.
        self.connecting.store(false, Ordering::Release);
    }

    /// If the connection is outbound and `on_open` has not run, the
    /// address dialled; from now on it counts as opened. Called by the
    /// read-side owner just before `on_open`, or when it closes the
    /// connection (`Some`: report the close as a failed connect).
    pub fn take_unopened(&self, reader: &ReadOwner<'_>) -> Option<SocketAddr> {
        self.check_proof(reader.state());
        // No store for an accepted connection's open: the mark is read,
        // and written only for a dial.
        let dialled = self.unopened.with(reader, |dialled| match dialled {
            Some(_) => dialled.take().map(|addr| *addr),
            None => None,
        });
        debug_assert!(
            dialled.is_some() || !self.is_connecting(),
            "connecting, but already counted as opened"
        );
        dialled
    }

    /// Checks that a proof of ownership was taken on this slot's word. Not
    /// debug-only: opening this slot's cells with another slot's proof would
    /// be a data race, and the check is one comparison.
    fn check_proof(&self, state: &State) {
        assert!(
            std::ptr::eq(state, &self.state),
            "an ownership proof from another slot"
        );
    }

    /// Runs `f` on the write side's data.
    fn with_writer<R>(&self, owner: &WriteOwner<'_>, f: impl FnOnce(&mut WriterSide) -> R) -> R {
        self.check_proof(owner.state());
        self.writer.with(owner, f)
    }

    /// Queues `chunk` for connection `generation` from any thread and
    /// flushes if the write side is free.
    pub fn send(
        &self,
        generation: u32,
        chunk: Chunk,
        limits: Limits,
        sink: &mut impl Sink,
    ) -> Result<WriteReport<'_>, Refusal> {
        let queued = self.queue().push(generation, chunk, limits.max_out)?;
        let mut report = WriteReport {
            queued,
            ..WriteReport::default()
        };
        // Queued first, then the word: if a writer holds the side, the
        // pending mark we leave makes it look again and find the message.
        if let Begin::Acquired(owner, _) = self.state.begin_write(generation) {
            self.drive(generation, owner, limits, sink, &mut report);
        }
        Ok(report)
    }

    /// Closes connection `generation` for `reason` once everything queued
    /// for it is written, from a thread that may hold neither side (a
    /// handle). `None` if it is not open (any more); otherwise whether
    /// nothing is counted as left to write, and whether this call was the
    /// first to ask. After the first ask a read-side turn must be scheduled
    /// (see [`OutQueue::reader_turn`](super::outq::OutQueue::reader_turn));
    /// a later ask changes nothing and needs no turn of its own, so a caller
    /// that asks again and again does not pile up tasks.
    ///
    /// The close is never requested from here, nor by a writer before that
    /// turn has started: a read turn in progress may hold replies it has not
    /// counted yet (not queued, or written send-first with a remainder the
    /// kernel did not take). They are counted by the end of that turn; the
    /// next turn's start closes if everything is written, and otherwise lets
    /// the writer that settles the last byte request the close.
    pub fn close_after_flush_first(
        &self,
        generation: u32,
        reason: CloseReason,
    ) -> Option<(bool, bool)> {
        let mut queue = self.queue();
        if queue.open_generation() != Some(generation) {
            return None;
        }
        let first = !queue.lingers();
        Some((queue.linger(reason), first))
    }

    /// [`SlotCore::close_after_flush_first`]'s first answer (for the tests
    /// and models, which ask once).
    #[cfg(any(test, loom))]
    pub fn close_after_flush(&self, generation: u32, reason: CloseReason) -> Option<bool> {
        self.close_after_flush_first(generation, reason)
            .map(|(drained, _)| drained)
    }

    /// Flushes connection `generation` on a write-readiness event.
    pub fn writable(
        &self,
        generation: u32,
        limits: Limits,
        sink: &mut impl Sink,
    ) -> Option<WriteReport<'_>> {
        match self.state.begin_write(generation) {
            Begin::Acquired(owner, _) => {
                let mut report = WriteReport::default();
                self.drive(generation, owner, limits, sink, &mut report);
                Some(report)
            }
            Begin::Deferred => Some(WriteReport::default()),
            Begin::Stale => None,
        }
    }

    /// Writes the replies of one read turn (`buf`, emptied on return): sent
    /// straight to the kernel when nothing else is queued, queued otherwise.
    /// Returns what the write side did and whether the reader must now pause
    /// (its queued output is over `max_out`).
    pub fn reply(
        &self,
        reader: &ReadOwner<'_>,
        generation: u32,
        buf: &mut Vec<u8>,
        limits: Limits,
        sink: &mut impl Sink,
    ) -> (WriteReport<'_>, bool) {
        self.check_proof(reader.state());
        let mut report = WriteReport::default();
        if !buf.is_empty() {
            match self.state.try_begin_write(generation) {
                TryBegin::Acquired(owner) => {
                    let direct = self.with_writer(&owner, |w| w.is_idle())
                        && self.queue().takes_direct_write();
                    if direct {
                        self.send_first(generation, &owner, limits, buf, sink, &mut report);
                    } else {
                        // Copied (if at all) before the queue's lock is taken.
                        let chunk = reply_chunk(buf);
                        self.queue().push_reply(chunk);
                    }
                    self.drive(generation, owner, limits, sink, &mut report);
                }
                TryBegin::Busy => {
                    // Copied (if at all) before the queue's lock is taken.
                    let chunk = reply_chunk(buf);
                    self.queue().push_reply(chunk);
                    self.drive_or_mark(generation, limits, sink, &mut report);
                }
                TryBegin::Stale => debug_assert!(false, "connection closed under its reader"),
            }
            buf.clear();
        }
        let paused = self.pause_if_over(limits, &mut report);
        (report, paused)
    }

    /// Decided after a flush: only output still queued holds the reader.
    fn pause_if_over(&self, limits: Limits, report: &mut WriteReport<'_>) -> bool {
        let (was, paused, queued) = {
            let mut queue = self.queue();
            let was = queue.is_paused();
            (was, queue.pause_if_over(limits.max_out), queue.bytes())
        };
        report.queued = report.queued.max(queued);
        report.paused_now |= paused && !was;
        paused
    }

    /// Moves the replies in `buf` (emptied, its room kept) into the
    /// out-queue without writing them: anything sent to the connection
    /// from elsewhere after this goes after them. The caller then writes
    /// them ([`SlotCore::write_queued`]) before its turn ends.
    pub fn queue_reply(&self, reader: &ReadOwner<'_>, buf: &mut Vec<u8>) {
        self.check_proof(reader.state());
        if !buf.is_empty() {
            // A copy the size of the replies: the buffer keeps its room
            // for the turn, and the queue holds no more than it counts.
            // Made before the queue's lock is taken.
            let chunk = Chunk::Owned(buf.as_slice().to_vec());
            self.queue().push_reply(chunk);
            buf.clear();
        }
    }

    /// Writes what waits in the out-queue (after [`SlotCore::queue_reply`]),
    /// from the reader's thread; returns what the write side did and
    /// whether the reader must now pause.
    pub fn write_queued(
        &self,
        reader: &ReadOwner<'_>,
        generation: u32,
        limits: Limits,
        sink: &mut impl Sink,
    ) -> (WriteReport<'_>, bool) {
        self.check_proof(reader.state());
        let mut report = WriteReport::default();
        self.drive_or_mark(generation, limits, sink, &mut report);
        let paused = self.pause_if_over(limits, &mut report);
        (report, paused)
    }

    /// From the reader's thread, with output queued: takes the write side
    /// and drives it, or leaves the pending mark that makes its holder
    /// write what was queued.
    fn drive_or_mark<'a>(
        &'a self,
        generation: u32,
        limits: Limits,
        sink: &mut impl Sink,
        report: &mut WriteReport<'a>,
    ) {
        match self.state.begin_write(generation) {
            Begin::Acquired(owner, _) => self.drive(generation, owner, limits, sink, report),
            Begin::Deferred => {}
            Begin::Stale => debug_assert!(false, "connection closed under its reader"),
        }
    }

    /// Writes `buf` directly (nothing else is queued or in flight); whatever
    /// the kernel does not take goes in flight and arms write-readiness.
    fn send_first(
        &self,
        generation: u32,
        owner: &WriteOwner<'_>,
        limits: Limits,
        buf: &mut Vec<u8>,
        sink: &mut impl Sink,
        report: &mut WriteReport<'_>,
    ) {
        let mut offset = 0;
        let failure = loop {
            match sink.write(&[IoSlice::new(&buf[offset..])]) {
                Ok(0) => break None,
                Ok(n) => {
                    offset += n;
                    report.written += n;
                    if offset == buf.len() {
                        return;
                    }
                }
                Err(SinkError::Interrupted) => {}
                Err(SinkError::WouldBlock) => break None,
                Err(SinkError::Failed(errno)) => break Some(errno),
            }
        };
        let failure = failure.or_else(|| {
            let rest = if offset == 0 {
                reply_chunk(buf)
            } else {
                Chunk::Owned(buf[offset..].to_vec())
            };
            self.queue().add_in_flight(rest.len());
            match self.with_writer(owner, |w| w.hold_remainder(rest, sink)) {
                Ok(armed) => {
                    report.arms += u32::from(armed);
                    self.watch_send(generation, limits, true, report);
                    None
                }
                Err(SinkError::Failed(errno)) => Some(errno),
                Err(_) => Some(0),
            }
        });
        if let Some(errno) = failure {
            // Final, as for a failed flush: a later reply of this turn must
            // not follow a torn one onto the wire (invariant W).
            self.with_writer(owner, |w| w.fail(errno));
            self.queue().fail();
            report.close_requested |=
                self.request_close(generation, CloseReason::WriteFailed(errno));
        }
    }

    /// Flushes until the write side can be given up, acting on what each
    /// flush found.
    fn drive<'a>(
        &'a self,
        generation: u32,
        mut owner: WriteOwner<'a>,
        limits: Limits,
        sink: &mut impl Sink,
        report: &mut WriteReport<'a>,
    ) {
        loop {
            let flush = self.with_writer(&owner, |w| w.flush(&self.queue, sink, limits.low_water));
            report.absorb(&flush);
            let blocked = flush.flushed == Flushed::Blocked;
            self.watch_send(generation, limits, blocked, report);
            if let Flushed::Failed(errno) = flush.flushed {
                report.close_requested |=
                    self.request_close(generation, CloseReason::WriteFailed(errno));
            } else if flush.settled.linger_done {
                report.close_requested |= self.state.request_close(generation);
            }
            match self.state.end_write(owner) {
                EndWrite::Released => return,
                EndWrite::Again(again) => owner = again,
                EndWrite::Reclaim(reclaimer) => {
                    report.reclaim = Some(reclaimer);
                    return;
                }
            }
        }
    }

    /// Asks for connection `generation` to be closed for `reason` by its
    /// read-side owner. Returns `true` if this call made the request (the
    /// caller must then see that a read-side turn happens); `false` if the
    /// connection is not open, its close was already requested, or a close
    /// after flush has written all its output (that close stands).
    pub fn request_close(&self, generation: u32, reason: CloseReason) -> bool {
        self.request_close_with(generation, reason, State::request_close)
    }

    /// As [`SlotCore::request_close`], but refused while either side is
    /// held, in the same step (see [`State::request_close_unheld`]): the
    /// idle timer's close, which a turn or a write under way makes moot
    /// (bytes moved, marked only at its end).
    pub fn request_idle_close(&self, generation: u32) -> bool {
        self.request_close_with(
            generation,
            CloseReason::IdleTimeout,
            State::request_close_unheld,
        )
    }

    /// As [`SlotCore::request_close`], but refused while the read side is
    /// held, in the same step (see [`State::request_close_unread`]): the
    /// frame timer's close, which a turn under way may make moot (a frame
    /// completed: the clock restarts only at the turn's end).
    pub fn request_frame_close(&self, generation: u32) -> bool {
        self.request_close_with(
            generation,
            CloseReason::FrameTimeout,
            State::request_close_unread,
        )
    }

    fn request_close_with(
        &self,
        generation: u32,
        reason: CloseReason,
        request: fn(&State, u32) -> bool,
    ) -> bool {
        let mut queue = self.queue();
        if queue.open_generation() != Some(generation) {
            return false;
        }
        if queue.linger_drained() && !queue.is_broken() {
            // A close after flush has written everything: it is the close,
            // and the reader's next turn makes it, gracefully. Winning here
            // would make it abortive and rename it. (Not if a write failed:
            // that dropped the output, the close cannot be graceful, and
            // the reader may be staying away for good.)
            return false;
        }
        // The request and its reason together, under the queue's lock (which
        // `begin_close` takes to read the reason): a request that fails, the
        // close being already requested, must not rename that close.
        let requested = request(&self.state, generation);
        if requested {
            queue.set_close_reason(reason);
        }
        requested
    }

    /// Starts closing (the caller holds the read side): closes the out-queue
    /// to senders, drops what waited, and marks the word closed. Returns
    /// what the queue knew, read under the one lock that closes it.
    pub fn begin_close(&self, reader: &ReadOwner<'_>) -> Closing {
        self.check_proof(reader.state());
        let closing = {
            let mut queue = self.queue();
            let reason = queue.close_reason();
            let after_flush = queue.closing_after_flush();
            let dropped = queue.close();
            Closing {
                reason,
                dropped,
                after_flush: after_flush && dropped == 0,
            }
        };
        self.state.mark_closed(reader);
        closing
    }

    /// Releases the read side of a closed connection (after the caller has
    /// made the descriptor safe and cleared the reader's data).
    pub fn finish_close<'a>(&'a self, reader: ReadOwner<'a>) -> Release<'a> {
        self.state.release_closed(reader)
    }

    /// Resets the shared part of a reclaimed slot for its next occupant;
    /// returns the number of unwritten bytes dropped. A slot whose
    /// generation has wrapped (it served 2^32 connections) is retired: its
    /// next occupant would get its first's id, which a `ConnId` kept since
    /// could still name.
    pub fn reset(&self, reclaimer: &Reclaimer<'_>) -> usize {
        self.check_proof(reclaimer.state());
        let dropped = self.writer.with(reclaimer, |w| w.reset());
        self.queue().reset();
        self.last_active.store(0, Ordering::Relaxed);
        self.frame_since.store(0, Ordering::SeqCst);
        self.frame_timer.clear();
        self.send_timer.clear();
        self.connecting.store(false, Ordering::Relaxed);
        self.unopened.with(reclaimer, |dialled| *dialled = None);
        // The reclaiming compare-exchange, this thread's, bumped it; slots
        // start at 0, so 0 now means it wrapped.
        if self.state.generation() == 0 {
            self.retire();
        }
        dropped
    }
}

/// A read turn's replies (`buf`, emptied) as one message for the queue or
/// the writer, which count its length: the buffer itself when its room is
/// about its length (no copy), or else a copy of the replies' size, the
/// buffer keeping its room for the worker's next turn. Handing over a
/// buffer that once held a large turn would pin all of its room under a
/// count of a few bytes (invariant L; see `core::outq`).
fn reply_chunk(buf: &mut Vec<u8>) -> Chunk {
    if outq::is_fitted(buf) {
        return Chunk::Owned(std::mem::take(buf));
    }
    let copy = buf.as_slice().to_vec();
    buf.clear();
    Chunk::Owned(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A review finding: a timer's re-arm holds neither side, so its
    /// connection can close and the slot open for the next between its
    /// generation check and its arm. A flag without a generation then stayed
    /// up for the next connection with no timer behind it (the stale timer
    /// is dropped when it fires), and that connection's timer never ran.
    #[test]
    fn a_stale_timers_arm_neither_blocks_nor_clears_the_next_connections() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (stale, next) = (7, 8);
            // Frame timer: the stale arm lands after the slot was reused.
            assert!(slot.arm_frame_timer(stale));
            assert!(slot.arm_frame_timer(next), "blocked by a stale arm");
            assert!(!slot.arm_frame_timer(next), "armed twice");
            slot.disarm_frame_timer(stale);
            assert!(!slot.arm_frame_timer(next), "cleared by a stale disarm");
            slot.disarm_frame_timer(next);
            assert!(slot.arm_frame_timer(next));
            // Send timer: the same.
            assert!(slot.arm_send_timer(stale));
            assert!(slot.arm_send_timer(next), "blocked by a stale arm");
            assert!(!slot.arm_send_timer(next), "armed twice");
            slot.disarm_send_timer(stale);
            assert!(!slot.arm_send_timer(next), "cleared by a stale disarm");
            slot.disarm_send_timer(next);
            assert!(slot.arm_send_timer(next));
        });
    }

    /// An audit's finding: a stale timer's re-arm that landed after the next
    /// connection armed its own overwrote the flag with the stale tag, so
    /// the next connection's following arm found "none armed" and scheduled
    /// a second timer while its first was pending: two chains, each
    /// re-arming the other, for the connection's life. A stale arm no
    /// longer takes a newer generation's flag.
    #[test]
    fn a_stale_timers_late_arm_gives_the_next_connection_no_second_timer() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (stale, next) = (7, 8);
            assert!(slot.arm_frame_timer(next));
            assert!(!slot.arm_frame_timer(stale), "a stale arm took the flag");
            assert!(!slot.arm_frame_timer(next), "a second timer for next");
            assert!(slot.arm_send_timer(next));
            assert!(!slot.arm_send_timer(stale), "a stale arm took the flag");
            assert!(!slot.arm_send_timer(next), "a second timer for next");
        });
    }

    /// Takes nothing (the kernel buffer is full), or, once `fail` is set,
    /// fails with EPIPE.
    struct Stuck {
        fail: bool,
    }

    impl Sink for Stuck {
        fn write(&mut self, _bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
            if self.fail {
                Err(SinkError::Failed(libc::EPIPE))
            } else {
                Err(SinkError::WouldBlock)
            }
        }

        fn set_write_interest(&mut self, _armed: bool) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// A review's finding on `a_drained_close_after_flush_is_not_overtaken`'s
    /// fix: a close after flush the reader had counted, with output still
    /// queued, whose flush then failed, dropped the output (so the linger
    /// read as drained) and the write failure's close was refused like any
    /// other late request; nothing was left to close the connection.
    #[test]
    fn a_failed_flush_closes_a_lingering_connection() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (generation, owner) = open_slot(&slot);
            let limits = Limits::new(1 << 20);
            let mut sink = Stuck { fail: false };
            let queued = slot
                .send(
                    generation,
                    Chunk::Owned(b"queued".to_vec()),
                    limits,
                    &mut sink,
                )
                .expect("queued");
            assert!(!queued.close_requested && queued.written == 0);
            assert_eq!(
                slot.close_after_flush(generation, CloseReason::Requested),
                Some(false),
                "output waits"
            );
            // The reader's turn counts the linger and stays away.
            assert_eq!(slot.queue().reader_turn(), (true, false));
            sink.fail = true;
            let report = slot.writable(generation, limits, &mut sink).expect("open");
            assert!(report.close_requested, "nothing closes the connection");
            let closing = slot.begin_close(&owner);
            assert_eq!(closing.reason, Some(CloseReason::WriteFailed(libc::EPIPE)));
        });
    }

    /// A review finding: once a close after flush had completed (the writer
    /// requested the close), a timer's later request failed but still
    /// recorded its reason, and `on_close` reported the timeout instead of
    /// the close the handler asked for.
    #[test]
    fn a_close_request_that_fails_records_no_reason() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (generation, owner) = slot
                .open(std::sync::Arc::new(Budget::new(usize::MAX)))
                .expect("a free slot opens");
            assert_eq!(
                slot.close_after_flush(generation, CloseReason::Handler),
                Some(true)
            );
            // What the writer does when the lingering queue has drained.
            assert!(slot.state().request_close(generation));
            assert!(!slot.request_close(generation, CloseReason::IdleTimeout));
            let closing = slot.begin_close(&owner);
            assert_eq!(closing.reason, Some(CloseReason::Handler));
        });
    }

    /// An audit's finding: a close after flush with nothing left to write
    /// waits for the reader's next turn to make it; a close requested
    /// meanwhile (a handle's `close`, a timer, the drain's deadline) won,
    /// turned the graceful close into an abortive one (no FIN behind the
    /// replies, no linger) and renamed it, though `ServerHandle::close`
    /// promises to refuse once a close after flush has written everything.
    #[test]
    fn a_drained_close_after_flush_is_not_overtaken() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (generation, owner) = slot
                .open(std::sync::Arc::new(Budget::new(usize::MAX)))
                .expect("a free slot opens");
            assert_eq!(
                slot.close_after_flush(generation, CloseReason::Requested),
                Some(true)
            );
            assert!(!slot.request_close(generation, CloseReason::IdleTimeout));
            let closing = slot.begin_close(&owner);
            assert_eq!(closing.reason, Some(CloseReason::Requested));
            assert!(closing.after_flush, "the close must stay graceful");
        });
    }

    /// A sink that takes `first` bytes, then fails once with a transient
    /// error (ENOBUFS), then takes everything; it records the wire.
    struct Wire {
        first: usize,
        failed: bool,
        bytes: Vec<u8>,
    }

    impl Wire {
        fn failing_after(first: usize) -> Self {
            Self {
                first,
                failed: false,
                bytes: Vec::new(),
            }
        }
    }

    impl Sink for Wire {
        fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
            let mut room = if self.bytes.len() < self.first {
                self.first - self.bytes.len()
            } else if !self.failed {
                self.failed = true;
                return Err(SinkError::Failed(libc::ENOBUFS));
            } else {
                usize::MAX
            };
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(room);
                self.bytes.extend_from_slice(&buf[..take]);
                room -= take;
                n += take;
            }
            Ok(n)
        }

        fn set_write_interest(&mut self, _armed: bool) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// Opens `slot`, closes its connection and reclaims it, as a server
    /// does; returns the generation the connection had.
    fn serve_one(slot: &SlotCore) -> u32 {
        let (generation, owner) = open_slot(slot);
        let _ = slot.begin_close(&owner);
        let Release::Reclaim(reclaimer) = slot.finish_close(owner) else {
            panic!("no writer holds the side: the closer reclaims");
        };
        slot.reset(&reclaimer);
        generation
    }

    /// An audit finding (invariant C): generations are 32 bits, and a
    /// slot's wrapped after 2^32 connections, so the next occupant got the
    /// first's id, and a `ConnId` kept since (a subscriber list not yet
    /// cleaned) would reach a peer it never named. A slot whose generation
    /// wraps now retires.
    #[test]
    fn a_slot_retires_before_its_generation_wraps() {
        crate::sync::model(|| {
            let slot = SlotCore {
                state: State::at_generation(u32::MAX - 1),
                ..SlotCore::new()
            };
            assert_eq!(serve_one(&slot), u32::MAX - 1);
            assert!(!slot.is_retired(), "generations remain");
            assert_eq!(serve_one(&slot), u32::MAX);
            assert!(
                slot.is_retired(),
                "the next occupant would get generation 0 again"
            );
        });
    }

    fn open_slot(slot: &SlotCore) -> (u32, ReadOwner<'_>) {
        slot.open(std::sync::Arc::new(Budget::new(usize::MAX)))
            .expect("a free slot opens")
    }

    /// A review finding: a send-first write that failed with a transient
    /// error only requested the close; the stream was not marked failed, so
    /// the same turn's next reply was written straight after the torn one
    /// (`fir` then `second.`), and handle sends were still accepted.
    #[test]
    fn a_failed_send_first_write_breaks_the_stream_for_good() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (generation, owner) = open_slot(&slot);
            let limits = Limits::new(1 << 20);
            let mut wire = Wire::failing_after(3);
            let mut first = b"first.".to_vec();
            let (report, _) = slot.reply(&owner, generation, &mut first, limits, &mut wire);
            assert!(report.close_requested, "a failed write closes");
            let mut second = b"second.".to_vec();
            let (report, _) = slot.reply(&owner, generation, &mut second, limits, &mut wire);
            assert_eq!(report.written, 0);
            assert_eq!(wire.bytes, b"fir", "nothing follows a torn message");
            assert_eq!(
                slot.send(generation, Chunk::Owned(b"x".to_vec()), limits, &mut wire)
                    .err(),
                Some(Refusal::Closed),
                "a broken stream takes no sends"
            );
        });
    }

    /// Takes `first` bytes, then says the buffer is full; arming
    /// write-readiness fails (`epoll_ctl` out of memory).
    struct Unarmable {
        first: usize,
        bytes: Vec<u8>,
    }

    impl Sink for Unarmable {
        fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
            let room = self.first - self.bytes.len();
            if room == 0 {
                return Err(SinkError::WouldBlock);
            }
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(room - n);
                self.bytes.extend_from_slice(&buf[..take]);
                n += take;
            }
            Ok(n)
        }

        fn set_write_interest(&mut self, _armed: bool) -> Result<(), SinkError> {
            Err(SinkError::Failed(libc::ENOMEM))
        }
    }

    /// An audit's finding: a send-first write whose remainder could not
    /// arm write-readiness left the remainder in flight, and the flush that
    /// followed (on the broken stream) took the queue's pending list into
    /// that non-empty in-flight list: a debug build's worker panicked
    /// holding both sides, and a release build kept the remainder counted.
    #[test]
    fn a_remainder_that_cannot_arm_is_dropped_with_the_stream() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (generation, owner) = open_slot(&slot);
            let limits = Limits::new(1 << 20);
            let mut sink = Unarmable {
                first: 3,
                bytes: Vec::new(),
            };
            let mut first = b"first.".to_vec();
            let (report, _) = slot.reply(&owner, generation, &mut first, limits, &mut sink);
            assert!(report.close_requested, "a failed arm closes");
            assert_eq!(sink.bytes, b"fir");
            let closing = slot.begin_close(&owner);
            assert_eq!(closing.reason, Some(CloseReason::WriteFailed(libc::ENOMEM)));
            assert_eq!(
                slot.queue().bytes(),
                0,
                "the remainder is dropped, not left counted"
            );
        });
    }

    /// An audit's finding (invariant L): a turn's replies that the kernel
    /// did not take were handed over in the worker's own buffer, whatever
    /// its room: a few KiB after a turn that held 100 KiB pinned the 100
    /// KiB under a count of a few. They are copied out of a roomy buffer
    /// now, which keeps its room for the next turn; a fitted one is still
    /// handed over whole (no copy).
    #[test]
    fn replies_left_to_the_writer_take_no_more_than_their_size() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (generation, owner) = open_slot(&slot);
            let limits = Limits::new(1 << 20);
            // The kernel takes nothing: the whole reply is the remainder.
            struct Full;
            impl Sink for Full {
                fn write(&mut self, _: &[IoSlice<'_>]) -> Result<usize, SinkError> {
                    Err(SinkError::WouldBlock)
                }
                fn set_write_interest(&mut self, _: bool) -> Result<(), SinkError> {
                    Ok(())
                }
            }
            let mut buf = Vec::with_capacity(128 << 10);
            buf.extend_from_slice(&[1u8; 2 << 10]);
            let (report, _) = slot.reply(&owner, generation, &mut buf, limits, &mut Full);
            assert!(!report.close_requested);
            assert_eq!(slot.queue().bytes(), 2 << 10, "the remainder is counted");
            assert!(buf.is_empty());
            assert!(
                buf.capacity() >= 128 << 10,
                "the worker's buffer went to the writer ({} bytes of room left)",
                buf.capacity()
            );
            // Now queued behind that remainder: the same.
            buf.extend_from_slice(&[2u8; 2 << 10]);
            let _ = slot.reply(&owner, generation, &mut buf, limits, &mut Full);
            assert_eq!(slot.queue().bytes(), 4 << 10);
            assert!(
                buf.capacity() >= 128 << 10,
                "the worker's buffer was queued"
            );
            // A buffer about its replies' size is handed over, not copied.
            let mut fitted = vec![3u8; 2 << 10];
            let _ = slot.reply(&owner, generation, &mut fitted, limits, &mut Full);
            assert_eq!(fitted.capacity(), 0, "a fitted buffer was copied");
        });
    }

    /// A review finding: a write-readiness pass that found nothing to write
    /// completed a handle's close after flush while a read turn was under
    /// way, so that turn's reply was dropped, though the docs promise the
    /// replies of a turn under way are written first.
    #[test]
    fn a_close_after_flush_waits_for_the_turn_under_way() {
        crate::sync::model(|| {
            let slot = SlotCore::new();
            let (generation, owner) = open_slot(&slot);
            let limits = Limits::new(1 << 20);
            let mut wire = Wire::failing_after(usize::MAX);
            // A handle closes the connection while its reader is mid-turn.
            assert_eq!(
                slot.close_after_flush(generation, CloseReason::Requested),
                Some(true)
            );
            // An EPOLLOUT pass with nothing to write.
            let report = slot
                .writable(generation, limits, &mut wire)
                .expect("the connection is open");
            assert!(!report.close_requested, "the turn under way is not over");
            // The turn ends with its reply.
            let mut reply = b"bye.".to_vec();
            let (report, _) = slot.reply(&owner, generation, &mut reply, limits, &mut wire);
            assert!(!report.close_requested, "the next turn decides");
            assert_eq!(wire.bytes, b"bye.", "the turn's reply is written");
            // The next turn finds the linger drained and closes.
            assert_eq!(slot.queue().reader_turn(), (true, true));
        });
    }
}
