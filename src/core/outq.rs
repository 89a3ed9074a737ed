//! The bounded out-queue: whole messages, FIFO, with a byte limit.
//!
//! Any thread may queue a message for a connection; only the write-side owner
//! takes them off (into its in-flight list, see [`super::writer`]). The queue
//! lives under a mutex that is never held across a syscall: pushing, swapping
//! the list out and settling byte counts are the only critical sections.
//!
//! # Invariants
//!
//! - **C (no wrong peer).** A message is accepted only if the handle's
//!   generation equals the queue's `open` generation, checked under the same
//!   lock that closing takes to clear it. A stale handle can therefore never
//!   queue into the slot's next occupant.
//! - **Bounded.** `bytes` counts every queued and in-flight byte. A send from
//!   elsewhere that would take it past the limit is refused ([`Refusal::Full`]);
//!   replies to the connection's own requests are always accepted, and the
//!   reader stops reading (`paused`) while `bytes` is over the limit, so the
//!   overshoot is at most one read turn's replies.
//! - **Entries follow bytes.** A small message queued behind others is
//!   joined to the last one when that is small too (up to
//!   [`COALESCE_MAX`]), so the waiting list holds at most 2 + `bytes` / 1 KiB
//!   entries however tiny the messages (checked with `debug_assert!`), and
//!   a drained list gives its room back ([`OutQueue::release_spare`]). The
//!   limits count payload bytes; what an entry costs beyond them is then a
//!   few percent at most.
//! - **Memory follows bytes.** An owned message in the queue has at most
//!   twice its length plus [`ROOM_SLACK`] bytes of room: one with more
//!   (a buffer that once held far more) is trimmed as it is queued
//!   ([`Chunk::fitted`]; the outq unit tests check it), so the limits,
//!   which count lengths, bound the memory held too (an entry that small
//!   messages are joined onto, under [`COALESCE_MAX`] bytes, may double
//!   its room as it grows). The slot copies a
//!   turn's replies out of a roomy worker buffer rather than hand the
//!   buffer over, so the worker keeps its room.
//! - **Bounded, server-wide.** Every change of `bytes` is mirrored in the
//!   server's [`Budget`], so the sum over all connections is known: a send
//!   from elsewhere that would take it past the budget is refused too (its
//!   bytes are reserved with one compare-exchange, so concurrent senders to
//!   different connections cannot pass the budget together), and a
//!   reader with output of its own queued is paused while the server is over
//!   budget (a reader with nothing queued goes on: its replies go straight to
//!   the kernel). The overshoot is at most one read turn's replies per
//!   connection.
//! - Once a close-after-flush is requested (`linger`), nothing more is
//!   accepted: every accepted message is written before the close. The
//!   reader's own replies are still taken, but queued, never written
//!   directly ([`OutQueue::takes_direct_write`]): a direct write's remainder
//!   is counted only after the kernel took the first part, so a close
//!   requested in between would tear the reply. Once the linger is done
//!   (everything written, the close requested by the writer), replies are
//!   dropped whole.
//! - **A linger waits for the turn under way.** A linger asked for by a
//!   thread that holds no side ([`OutQueue::linger`]) may find the reader
//!   mid-turn, with replies not counted yet. Until a read turn has started
//!   since ([`OutQueue::reader_turn`], between turns nothing is uncounted),
//!   the writer never completes it, even with nothing left to write: the
//!   reader's next turn does, or counts it so the writer may. A linger asked
//!   for by the read-side owner after its flush ([`OutQueue::linger_own`])
//!   is counted at once.
//! - Flow control is decided under the lock: the reader pauses and the writer
//!   resumes it in critical sections of this one mutex, so a pause can never be
//!   set after the drain that should have lifted it.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;

use super::CloseReason;
use crate::sync::{AtomicUsize, Ordering};

/// Small messages are joined in the waiting list up to this many bytes
/// (see [`OutQueue`]'s `enqueue`): every list entry but the first two then
/// follows one over half this size, so entries are bounded by the bytes
/// counted.
pub const COALESCE_MAX: usize = 4096;

/// The entries a drained list keeps room for (see
/// [`OutQueue::release_spare`]).
pub const KEPT_ENTRIES: usize = 16;

/// Shrinks an empty message list (the waiting one, or the writer's in-flight
/// one) to [`KEPT_ENTRIES`].
pub fn release_spare(list: &mut VecDeque<Chunk>) {
    if list.is_empty() && list.capacity() > KEPT_ENTRIES {
        list.shrink_to(KEPT_ENTRIES);
    }
}

/// A server-wide limit on bytes held across connections: the output
/// queued (shared by every connection's queue; see the [module
/// docs](self)), and, as a second instance, the input held in read buffers
/// for incomplete frames (`Config::max_in_total`).
#[derive(Debug)]
pub struct Budget {
    queued: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes queued across all connections.
    pub fn new(max: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes queued across all connections now.
    pub fn queued(&self) -> usize {
        // Relaxed (all accesses): an accounting counter. Decisions taken on
        // it are soft limits whose overshoot is bounded and documented; it
        // orders nothing else.
        self.queued.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes `n` bytes if they fit under the limit, else nothing: the
    /// input side refuses rather than overshoots.
    pub fn try_take(&self, n: usize) -> bool {
        let mut held = self.queued.load(Ordering::Relaxed);
        loop {
            match held.checked_add(n) {
                Some(total) if total <= self.max => {}
                _ => return false,
            }
            match self.queued.compare_exchange_weak(
                held,
                held + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => held = now,
            }
        }
    }

    /// Takes `n` bytes whatever the limit (an overshoot the caller bounds).
    pub fn take_anyway(&self, n: usize) {
        self.add(n);
    }

    /// Gives back `n` bytes taken with [`Budget::try_take`] or
    /// [`Budget::take_anyway`].
    pub fn give_back(&self, n: usize) {
        debug_assert!(n <= self.queued(), "gave back more than was taken");
        self.sub(n);
    }

    fn add(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn sub(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// The largest message a queue with limit `limit` can ever take, under
/// the server-wide `budget`: a larger one is [`Refusal::TooLarge`].
pub fn max_message(limit: usize, budget: Option<&Budget>) -> usize {
    budget.map_or(limit, |budget| limit.min(budget.max()))
}

/// The room past twice its length that an owned message may keep in the
/// queue (see [`Chunk::fitted`]): a buffer grown by doubling has at most
/// twice its length, and a tiny one up to a few bytes more.
pub const ROOM_SLACK: usize = 64;

/// One queued message: bytes that must reach the wire contiguously.
#[derive(Debug, Clone)]
pub enum Chunk {
    /// A buffer owned by this queue.
    Owned(Vec<u8>),
    /// A buffer shared with other connections' queues (fan-out without copies).
    Shared(Arc<[u8]>),
}

/// Whether `bytes` holds no more memory than the queue may count for it:
/// at most twice its length plus [`ROOM_SLACK`] of room.
pub fn is_fitted(bytes: &Vec<u8>) -> bool {
    bytes.capacity() <= 2 * bytes.len() + ROOM_SLACK
}

impl Chunk {
    /// The message with its room trimmed if it is not [fitted](is_fitted)
    /// (a shared one is counted once per queue anyway, and is the
    /// sender's to size): the queue and its limits count lengths,
    /// and a 5-byte reply in a buffer that once held 128 KiB must not pin
    /// 128 KiB (invariant L).
    pub fn fitted(self) -> Chunk {
        match self {
            Chunk::Owned(mut bytes) if !is_fitted(&bytes) => {
                bytes.shrink_to_fit();
                Chunk::Owned(bytes)
            }
            other => other,
        }
    }
}

impl Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Owned(bytes) => bytes,
            Chunk::Shared(bytes) => bytes,
        }
    }
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The handle is stale or the connection is closed.
    Closed,
    /// The message alone is larger than the connection's output limit (or
    /// the server's whole budget, if that is smaller): it could never be
    /// queued, however fast the receiver reads, so it says nothing about the
    /// receiver.
    TooLarge {
        /// The message's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Queuing would pass the connection's output limit.
    Full {
        /// Bytes already queued or in flight.
        queued: usize,
        /// The limit.
        limit: usize,
    },
    /// Queuing would pass the server-wide output budget.
    Budget {
        /// Bytes queued across all connections.
        queued: usize,
        /// The budget.
        limit: usize,
    },
}

/// What the writer found when it settled its progress with the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// The reader was paused and the queue fell to the low-water mark: the
    /// caller must schedule a read turn (no edge will come for bytes that
    /// arrived while the reader was paused).
    pub resume: bool,
    /// The queue is empty and the connection asked to close once flushed.
    pub linger_done: bool,
}

/// A connection's queue of messages waiting for the write side.
#[derive(Debug, Default)]
pub struct OutQueue {
    open: Option<u32>,
    pending: VecDeque<Chunk>,
    bytes: usize,
    paused: bool,
    linger: bool,
    /// Why the connection closes once flushed (if `linger`).
    linger_reason: Option<CloseReason>,
    /// Every reply of the read side is counted since `linger` was set (a
    /// read turn started since, or the reader set it): the writer may
    /// complete the linger.
    linger_counted: bool,
    /// The lingering close found everything written and was requested: the
    /// close drops whatever is queued after, so nothing more is taken (a
    /// reply is dropped whole rather than torn by the close).
    linger_done: bool,
    /// A write failed: the stream is broken, nothing more is taken.
    broken: bool,
    /// Bytes the writer settled as written since the queue opened: the send
    /// timer's measure of progress, read with `bytes` in one snapshot.
    taken: u64,
    close_reason: Option<CloseReason>,
    /// The server's budget (set while open).
    budget: Option<Arc<Budget>>,
}

impl OutQueue {
    /// A closed, empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the queue for connection `generation`, counting its bytes in
    /// the server's `budget`.
    pub fn open(&mut self, generation: u32, budget: Arc<Budget>) {
        debug_assert!(self.open.is_none(), "queue opened twice");
        debug_assert!(self.is_reset(), "queue opened with leftovers: {self:?}");
        self.open = Some(generation);
        self.budget = Some(budget);
    }

    fn grow(&mut self, n: usize) {
        self.bytes += n;
        if let Some(budget) = &self.budget {
            budget.add(n);
        }
    }

    fn shrink(&mut self, n: usize) {
        debug_assert!(n <= self.bytes, "settled more than was queued");
        let n = n.min(self.bytes);
        self.bytes -= n;
        if let Some(budget) = &self.budget {
            budget.sub(n);
        }
    }

    /// Closes the queue to senders and drops what was waiting; returns the
    /// number of bytes dropped (in-flight bytes are the writer's to drop).
    pub fn close(&mut self) -> usize {
        self.open = None;
        let dropped: usize = self.pending.iter().map(|chunk| chunk.len()).sum();
        self.pending.clear();
        self.shrink(dropped);
        dropped
    }

    /// Forgets everything; for the reclaimer, when no side is held. Bytes
    /// still counted (in flight when the connection closed) leave the budget.
    pub fn reset(&mut self) {
        let left = self.bytes;
        self.shrink(left);
        *self = Self::default();
    }

    fn is_reset(&self) -> bool {
        self.pending.is_empty()
            && self.bytes == 0
            && !self.paused
            && !self.linger
            && self.linger_reason.is_none()
            && !self.linger_counted
            && !self.linger_done
            && !self.broken
            && self.close_reason.is_none()
    }

    /// The generation the queue is open for.
    pub fn open_generation(&self) -> Option<u32> {
        self.open
    }

    /// Whether connection `generation` takes new messages. A connection
    /// closing once flushed takes nothing new: what it accepted is
    /// delivered, and nothing accepted is dropped by the close. One whose
    /// close is asked for takes nothing either: the close would drop it (or
    /// it would be written after the close was decided).
    pub fn takes_new(&self, generation: u32) -> bool {
        self.open == Some(generation) && !self.linger && !self.broken && self.close_reason.is_none()
    }

    /// Queues a message from elsewhere (another connection or thread),
    /// refusing it if the handle is stale or `limit` would be passed.
    /// Returns the bytes now queued.
    pub fn push(&mut self, generation: u32, chunk: Chunk, limit: usize) -> Result<usize, Refusal> {
        if !self.takes_new(generation) {
            return Err(Refusal::Closed);
        }
        // Past the connection's limit, or the server's whole budget: it
        // could never be queued.
        let most = max_message(limit, self.budget.as_deref());
        if chunk.len() > most {
            return Err(Refusal::TooLarge {
                len: chunk.len(),
                limit: most,
            });
        }
        // Nothing to queue, so nothing to refuse: an empty message must not
        // call a receiver over its limit slow (and close it, by default).
        if chunk.is_empty() {
            return Ok(self.bytes);
        }
        if self.bytes.saturating_add(chunk.len()) > limit {
            return Err(Refusal::Full {
                queued: self.bytes,
                limit,
            });
        }
        match &self.budget {
            // Reserved in one step, not checked then added: senders to other
            // connections, each under its own queue's lock, could otherwise
            // pass the check together and the budget with it.
            Some(budget) => {
                if !budget.try_take(chunk.len()) {
                    return Err(Refusal::Budget {
                        queued: budget.queued(),
                        limit: budget.max(),
                    });
                }
                self.bytes += chunk.len();
                self.enqueue(chunk);
            }
            None => self.push_reply(chunk),
        }
        Ok(self.bytes)
    }

    /// Queues replies to the connection's own requests: always accepted (the
    /// caller holds the read side, so the connection is open). The caller
    /// then decides with [`OutQueue::pause_if_over`] whether to stop reading.
    pub fn push_reply(&mut self, chunk: Chunk) {
        debug_assert!(self.open.is_some(), "push into a closed queue");
        if chunk.is_empty() || self.broken || self.linger_done {
            return;
        }
        self.grow(chunk.len());
        self.enqueue(chunk);
    }

    /// Adds a counted message at the back. A small one behind others is
    /// copied onto the end of the last one when that is small too, so
    /// that a flood of tiny messages costs bytes, not list entries
    /// (`bytes` and the limits count payload only; an entry and its
    /// allocation cost tens of bytes more). Whole messages stay whole and
    /// in order: only the bytes of the waiting list are joined, never the
    /// writer's in-flight one.
    fn enqueue(&mut self, chunk: Chunk) {
        if chunk.len() >= COALESCE_MAX / 2 || self.pending.is_empty() {
            // Stored as it is: trimmed first. (One joined onto the last
            // entry below is copied, whatever its room.)
            self.pending.push_back(chunk.fitted());
            return;
        }
        match self.pending.back_mut() {
            Some(Chunk::Owned(last)) if last.len() + chunk.len() <= COALESCE_MAX => {
                last.extend_from_slice(&chunk);
            }
            // Copied, so that the next small one can join it.
            _ => self.pending.push_back(Chunk::Owned(chunk.to_vec())),
        }
        debug_assert!(
            self.pending.len() <= 2 + self.bytes / (COALESCE_MAX / 4),
            "{} entries for {} bytes",
            self.pending.len(),
            self.bytes
        );
    }

    /// The bytes of room the waiting list's owned entries have, all told.
    #[cfg(test)]
    pub fn pending_room(&self) -> usize {
        self.pending
            .iter()
            .map(|chunk| match chunk {
                Chunk::Owned(bytes) => bytes.capacity(),
                Chunk::Shared(_) => 0,
            })
            .sum()
    }

    /// The entries the waiting list has room for.
    #[cfg(test)]
    pub fn spare_room(&self) -> usize {
        self.pending.capacity()
    }

    /// Gives back the waiting list's spare room once it is empty (a burst of
    /// messages must not pin its size for as long as the connection
    /// lives).
    pub fn release_spare(&mut self) {
        release_spare(&mut self.pending);
    }

    /// The writer failed: take nothing more (the connection is closing).
    pub fn fail(&mut self) {
        self.broken = true;
    }

    /// Whether a write failed (see [`OutQueue::fail`]).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Counts bytes the writer put in flight directly (send-first remainder).
    pub fn add_in_flight(&mut self, len: usize) {
        self.grow(len);
    }

    /// Pauses the reader if the queue is over `limit`, or if it has output
    /// queued while the server is over its budget; returns `paused`.
    pub fn pause_if_over(&mut self, limit: usize) -> bool {
        let server_over = self.budget.as_ref().is_some_and(|b| b.queued() > b.max());
        if self.bytes > limit || (self.bytes > 0 && server_over) {
            self.paused = true;
        }
        self.paused
    }

    /// Whether the reader is paused by flow control.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether the reader should stay away: paused by flow control, or the
    /// connection is waiting to close once flushed.
    pub fn holds_reader(&self) -> bool {
        self.paused || self.linger
    }

    /// Whether a close after flush was asked for.
    pub fn lingers(&self) -> bool {
        self.linger
    }

    /// Asks for the connection to close for `reason` once everything queued
    /// is written. Returns `true` if nothing is counted as left to write:
    /// "close now" only for the read-side owner between its turns; from any
    /// other thread a read turn must decide (see `SlotCore::close_after_flush`).
    /// The reason is
    /// provisional: a close that happens first for another cause (a timeout,
    /// a failed write) is recorded as that cause.
    pub fn linger(&mut self, reason: CloseReason) -> bool {
        self.linger = true;
        self.linger_reason.get_or_insert(reason);
        self.bytes == 0
    }

    /// [`OutQueue::linger`] by the read-side owner after its turn's flush:
    /// every reply it made is counted, so the writer may complete the
    /// linger. Returns `true` if nothing is left to write (close now).
    pub fn linger_own(&mut self, reason: CloseReason) -> bool {
        self.linger_counted = true;
        self.linger(reason)
    }

    /// [`OutQueue::linger_own`], but only if nothing is queued or in
    /// flight; returns whether it lingered. One critical section: a send
    /// either came first (and is written) or is refused, never accepted and
    /// then dropped by the close the caller makes.
    pub fn linger_own_if_drained(&mut self, reason: CloseReason) -> bool {
        self.bytes == 0 && self.linger_own(reason)
    }

    /// The read-side owner, between turns (all its replies counted), looks
    /// at the queue: returns whether it must stay away (paused, or
    /// lingering) and whether a linger is drained (close now). A linger
    /// seen here is counted: the writer may complete it from now on.
    pub fn reader_turn(&mut self) -> (bool, bool) {
        if self.linger {
            self.linger_counted = true;
        }
        (self.holds_reader(), self.linger_drained())
    }

    /// Records why the connection is being closed now (the first such
    /// reason wins).
    pub fn set_close_reason(&mut self, reason: CloseReason) {
        self.close_reason.get_or_insert(reason);
    }

    /// Why the connection is being closed: the recorded cause, else the
    /// reason of the close-after-flush that completed.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason.or(self.linger_reason)
    }

    /// Whether closing now completes a close after flush that the peer
    /// did not start (not an end of stream), with no other cause recorded:
    /// the close is graceful, and the reader may let the peer see it as one.
    pub fn closing_after_flush(&self) -> bool {
        self.close_reason.is_none()
            && self
                .linger_reason
                .is_some_and(|reason| reason != CloseReason::Eof)
    }

    /// Whether no message waits for the writer.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// A close after flush is pending and nothing is left to write: the
    /// read-side owner closes at the start of its next turn (between turns it
    /// holds no uncounted reply; see [`OutQueue::reader_turn`]).
    pub fn linger_drained(&self) -> bool {
        self.linger && self.bytes == 0 && self.open.is_some()
    }

    /// Whether the write side's owner may write a reply straight to the
    /// kernel: nothing waits ahead of it, and no close after flush is pending
    /// (see the module docs).
    pub fn takes_direct_write(&self) -> bool {
        self.pending.is_empty() && !self.linger
    }

    /// Queued plus in-flight bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes written and settled since the queue opened (see `taken`).
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Moves every waiting message to `into` (the writer's in-flight list,
    /// which must be empty), in O(1).
    pub fn take_pending(&mut self, into: &mut VecDeque<Chunk>) {
        debug_assert!(into.is_empty(), "in-flight list must be empty to take more");
        std::mem::swap(&mut self.pending, into);
    }

    /// Settles `written` bytes (and `dropped` in-flight bytes) the writer is
    /// done with, and reports whether the reader must be resumed or a lingering
    /// close can proceed. `low_water` is where a paused reader resumes.
    pub fn settle(&mut self, written: usize, dropped: usize, low_water: usize) -> Settled {
        self.shrink(written + dropped);
        self.taken = self.taken.wrapping_add(written as u64);
        let resume = self.paused && self.bytes <= low_water;
        if resume {
            self.paused = false;
        }
        // Only a counted linger: a turn under way may still add replies.
        self.linger_done |=
            self.linger && self.linger_counted && self.bytes == 0 && self.open.is_some();
        Settled {
            resume,
            linger_done: self.linger_done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An audit's finding (invariant L): the queue counts lengths, and held
    /// whatever room a message came with: a few bytes in a buffer that
    /// once held 128 KiB pinned 128 KiB. A roomy message is trimmed as it
    /// is queued, a reply or a send; one grown by doubling is kept as it is.
    #[test]
    fn a_queued_message_holds_about_what_is_counted() {
        crate::sync::model(|| {
            let roomy = || {
                let mut bytes = Vec::with_capacity(128 << 10);
                bytes.extend_from_slice(&[7u8; 2 << 10]);
                Chunk::Owned(bytes)
            };
            let mut q = OutQueue::new();
            q.open(1, Arc::new(Budget::new(usize::MAX)));
            q.push_reply(roomy());
            assert_eq!(q.bytes(), 2 << 10);
            assert!(
                q.pending_room() <= 2 * q.bytes() + ROOM_SLACK,
                "{}",
                q.pending_room()
            );
            assert_eq!(q.push(1, roomy(), 1 << 20), Ok(4 << 10));
            assert!(
                q.pending_room() <= 2 * q.bytes() + 2 * ROOM_SLACK,
                "{}",
                q.pending_room()
            );
            // A fitted buffer is queued as it is: no copy, no realloc.
            let mut doubled = Vec::with_capacity(4 << 10);
            doubled.extend_from_slice(&[8u8; 3 << 10]);
            let at = doubled.as_ptr();
            let Chunk::Owned(kept) = Chunk::Owned(doubled).fitted() else {
                panic!("owned stays owned");
            };
            assert_eq!(kept.as_ptr(), at, "a fitted buffer was copied");
        });
    }

    #[test]
    fn stale_generation_is_refused() {
        crate::sync::model(|| {
            let mut q = OutQueue::new();
            q.open(7, Arc::new(Budget::new(usize::MAX)));
            assert_eq!(q.push(6, Chunk::Owned(vec![1]), 100), Err(Refusal::Closed));
            assert_eq!(q.push(7, Chunk::Owned(vec![1]), 100), Ok(1));
            q.close();
            assert_eq!(q.push(7, Chunk::Owned(vec![1]), 100), Err(Refusal::Closed));
            assert_eq!(q.bytes(), 0, "close drops what was pending");
        });
    }

    /// An audit's finding: `bytes` and the limits count payload only, and
    /// every message took a list entry (and an allocation) of its own, so
    /// a flood of tiny messages held many times the bytes counted. Small
    /// ones are now joined, owned or shared, and the bytes stay whole and
    /// in order.
    #[test]
    fn tiny_messages_cost_bytes_not_entries() {
        crate::sync::model(|| {
            let mut q = OutQueue::new();
            q.open(1, Arc::new(Budget::new(usize::MAX)));
            let shared: Arc<[u8]> = Arc::from(&b"MSG t x"[..]);
            let mut expected = Vec::new();
            for i in 0..120u32 {
                let chunk = match i % 50 {
                    49 => Chunk::Owned(vec![b'b'; 3000]),
                    n if n % 2 == 0 => Chunk::Shared(Arc::clone(&shared)),
                    _ => Chunk::Owned(i.to_le_bytes().to_vec()),
                };
                expected.extend_from_slice(&chunk);
                if i % 7 == 0 {
                    q.push_reply(chunk);
                } else {
                    q.push(1, chunk, usize::MAX).unwrap();
                }
            }
            assert_eq!(q.bytes(), expected.len());
            assert!(
                q.pending.len() <= 2 + q.bytes() / (COALESCE_MAX / 4),
                "{} entries for {} bytes",
                q.pending.len(),
                q.bytes()
            );
            let mut taken = VecDeque::new();
            q.take_pending(&mut taken);
            let wire: Vec<u8> = taken.iter().flat_map(|c| c.iter().copied()).collect();
            assert!(wire == expected, "bytes reordered or lost");
        });
    }

    /// A drained list gives its room back; a list still holding messages
    /// keeps it. (A review found this checked after `take_pending`, which
    /// swaps in an empty list: it could not fail.)
    #[test]
    fn a_drained_list_gives_back_its_room() {
        let mut list: VecDeque<Chunk> = (0..1000).map(|_| Chunk::Owned(vec![1])).collect();
        list.truncate(1);
        release_spare(&mut list);
        assert!(list.capacity() >= 1000, "shrunk while holding a message");
        list.clear();
        release_spare(&mut list);
        assert!(list.capacity() <= KEPT_ENTRIES, "{}", list.capacity());
    }

    /// Audit findings: a send to a connection whose close was asked for
    /// was taken (and dropped by the close); an empty send to one over its
    /// limit was refused as `Full`, which closes the receiver by default.
    #[test]
    fn a_close_asked_for_refuses_sends_and_an_empty_one_is_never_full() {
        crate::sync::model(|| {
            let mut q = OutQueue::new();
            q.open(1, Arc::new(Budget::new(usize::MAX)));
            q.push_reply(Chunk::Owned(vec![0; 12]));
            assert_eq!(q.push(1, Chunk::Owned(Vec::new()), 10), Ok(12));
            assert!(matches!(
                q.push(1, Chunk::Owned(vec![0; 1]), 10),
                Err(Refusal::Full { .. })
            ));
            q.set_close_reason(CloseReason::Requested);
            assert_eq!(
                q.push(1, Chunk::Owned(vec![0; 1]), 100),
                Err(Refusal::Closed)
            );
        });
    }

    #[test]
    fn limit_refuses_sends_but_not_replies() {
        crate::sync::model(|| {
            let mut q = OutQueue::new();
            q.open(1, Arc::new(Budget::new(usize::MAX)));
            assert_eq!(q.push(1, Chunk::Owned(vec![0; 8]), 10), Ok(8));
            assert_eq!(
                q.push(1, Chunk::Owned(vec![0; 3]), 10),
                Err(Refusal::Full {
                    queued: 8,
                    limit: 10
                })
            );
            // Larger than the whole limit: too large, whatever is queued.
            assert_eq!(
                q.push(1, Chunk::Owned(vec![0; 11]), 10),
                Err(Refusal::TooLarge { len: 11, limit: 10 })
            );
            // Larger than the server's whole budget, when that is smaller.
            let mut small = OutQueue::new();
            small.open(1, Arc::new(Budget::new(6)));
            assert_eq!(
                small.push(1, Chunk::Owned(vec![0; 7]), 10),
                Err(Refusal::TooLarge { len: 7, limit: 6 })
            );
            q.push_reply(Chunk::Owned(vec![0; 3]));
            assert!(q.pause_if_over(10), "reply over limit pauses");
            assert!(q.holds_reader());
            let mut inflight = VecDeque::new();
            q.take_pending(&mut inflight);
            assert_eq!(
                q.settle(6, 0, 5),
                Settled {
                    resume: true,
                    linger_done: false
                }
            );
            assert!(!q.holds_reader());
        });
    }

    #[test]
    fn the_server_budget_refuses_sends_and_pauses_readers_with_output() {
        crate::sync::model(|| {
            let budget = Arc::new(Budget::new(10));
            let mut a = OutQueue::new();
            let mut b = OutQueue::new();
            a.open(1, Arc::clone(&budget));
            b.open(1, Arc::clone(&budget));
            assert_eq!(a.push(1, Chunk::Owned(vec![0; 8]), 100), Ok(8));
            assert_eq!(
                b.push(1, Chunk::Owned(vec![0; 3]), 100),
                Err(Refusal::Budget {
                    queued: 8,
                    limit: 10
                }),
                "b is under its own limit, the server is not"
            );
            b.push_reply(Chunk::Owned(vec![0; 3]));
            assert_eq!(budget.queued(), 11);
            assert!(
                b.pause_if_over(100),
                "over budget with output of its own: pause"
            );
            let mut c = OutQueue::new();
            c.open(1, Arc::clone(&budget));
            assert!(
                !c.pause_if_over(100),
                "nothing queued: its replies go straight out"
            );
            a.close();
            b.reset();
            assert_eq!(budget.queued(), 0, "every byte leaves the budget");
        });
    }

    #[test]
    fn linger_completes_when_drained() {
        crate::sync::model(|| {
            let mut q = OutQueue::new();
            q.open(1, Arc::new(Budget::new(usize::MAX)));
            q.push_reply(Chunk::Owned(vec![0; 4]));
            assert!(!q.linger_own(CloseReason::Eof), "bytes still queued");
            assert_eq!(
                q.push(1, Chunk::Owned(vec![1]), 100),
                Err(Refusal::Closed),
                "closing: nothing new"
            );
            let settled = q.settle(4, 0, 50);
            assert!(settled.linger_done);
        });
    }

    /// A review finding: the drain cancelled a dial found with nothing
    /// queued in two steps (look, then close), and a send accepted between
    /// them was dropped by the close. Decided under one lock, a send after
    /// the decision is refused.
    #[test]
    fn lingering_only_if_drained_refuses_later_sends() {
        crate::sync::model(|| {
            let mut q = OutQueue::new();
            q.open(1, Arc::new(Budget::new(usize::MAX)));
            assert!(q.linger_own_if_drained(CloseReason::Shutdown));
            assert_eq!(q.push(1, Chunk::Owned(vec![1]), 100), Err(Refusal::Closed));
            let mut q = OutQueue::new();
            q.open(1, Arc::new(Budget::new(usize::MAX)));
            assert_eq!(q.push(1, Chunk::Owned(vec![1]), 100), Ok(1));
            assert!(
                !q.linger_own_if_drained(CloseReason::Shutdown),
                "a send waits"
            );
            assert_eq!(
                q.push(1, Chunk::Owned(vec![2]), 100),
                Ok(2),
                "not lingering"
            );
        });
    }

    #[test]
    fn a_handles_linger_completes_only_once_a_turn_counted_it() {
        crate::sync::model(|| {
            let lingering = || {
                let mut q = OutQueue::new();
                q.open(1, Arc::new(Budget::new(usize::MAX)));
                q.push_reply(Chunk::Owned(vec![0; 4]));
                assert!(!q.linger(CloseReason::Requested), "bytes still queued");
                q
            };
            // Drained before any turn counted it: the next turn closes.
            let mut q = lingering();
            assert!(
                !q.settle(4, 0, 50).linger_done,
                "a turn under way may still reply"
            );
            assert_eq!(q.reader_turn(), (true, true), "the next turn closes");
            // Counted by a turn first: the writer completes it.
            let mut q = lingering();
            assert_eq!(q.reader_turn(), (true, false));
            assert!(q.settle(4, 0, 50).linger_done, "counted: the writer closes");
        });
    }
}
