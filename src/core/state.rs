//! The per-connection ownership word: who reads, who writes, who reclaims.
//!
//! Every slot has one `AtomicU64`: its generation in the high 32 bits, its
//! flags in the low 32. All the cross-thread decisions about a connection are
//! compare-exchanges on this one word, so they are totally ordered and none
//! can be decided on a stale view.
//!
//! ```text
//!  63                32 31                                   0
//! +--------------------+--------------------------------------+
//! |     generation     | HUP FREE CLOSED CLOSE_REQ WP W RP R  |
//! +--------------------+--------------------------------------+
//! ```
//!
//! # Invariants
//!
//! - **R (one reader, no lost edge).** At most one thread holds `READING`.
//!   [`State::begin_read`] on a held word sets `READ_PENDING` instead of
//!   waiting. [`State::end_read`] clears `READING` only with a compare-exchange
//!   that fails if `READ_PENDING` was set meanwhile, so the holder reads again:
//!   every event is followed by a read that starts after it.
//! - **W (one writer).** The same protocol on `WRITING` / `WRITE_PENDING`.
//!   A sender queues its message *before* it tries the word, so a pending bit
//!   always has a message (or a readiness edge) behind it.
//! - **C (reclaim once, after both sides).** Only the `READING` holder sets
//!   `CLOSED`. Once `CLOSED` is set nothing can acquire either side, and the
//!   compare-exchange that releases the last held side moves the word to
//!   `FREE` with generation + 1. Exactly one thread sees
//!   [`EndWrite::Reclaim`] or [`Release::Reclaim`] per connection.
//! - A `FREE` word has no other flag, and only [`State::open`] leaves `FREE`.
//!
//! Ownership is proved by values: [`ReadOwner`], [`WriteOwner`] and
//! [`Reclaimer`] can only be made here, are consumed by the calls that give the
//! side up, and are what [`super::cell::OwnerCell`] asks for before it hands
//! out the data that the side owns.
//!
//! # Memory orderings
//!
//! - Taking a side (`begin_*`, `try_begin_write`, `open`) is `Acquire`: the new
//!   owner must see what the last owner wrote into that side's cell.
//! - Giving a side up (`end_*` when it clears the flag) is `Release`, pairing
//!   with that `Acquire`.
//! - Leaving a pending mark is `Release` (part of the `AcqRel` of
//!   `begin_*`), and consuming it in `end_*` is `Acquire`: the owner's next
//!   read or flush must start after the event that left the mark. A mark is
//!   always left with a read-modify-write, never decided from a plain load,
//!   which could see a mark already consumed.
//! - Requesting or marking a close is `Relaxed`: the close reason travels
//!   through the out-queue's mutex, and the owner's compare-exchange cannot
//!   miss the bit.
//! - Reclaiming is `AcqRel`: the reclaimer must see the other side's last
//!   writes (it resets both cells). Its reset comes after the
//!   compare-exchange, so the word cannot publish it: it reaches the next
//!   occupant through the pool's mutex (checkin, then checkout), which
//!   every reopen goes through. A path that reopened a slot without the
//!   pool would need its own ordering.
//!
//! Each ordering, weakened one at a time, against the loom models of
//! `tests/loom.rs` (preemption bound 2):
//!
//! | ordering | weakened to | model that fails |
//! |---|---|---|
//! | `begin_read` AcqRel | Release | `read_ownership`, `close_races_…`: concurrent access to the reader cell |
//! | `begin_read` AcqRel | Acquire | `read_ownership`: an edge is lost |
//! | `end_read` release, Release | Relaxed | `read_ownership`, `close_races_…`: concurrent access |
//! | `end_read` consume, Acquire | Relaxed | `read_ownership`: an edge is lost |
//! | `try_begin_write` Acquire | Relaxed | `write_ownership_and_epollout`: concurrent access to the writer cell |
//! | `begin_write` AcqRel | Release | `write_ownership_and_epollout` |
//! | `begin_write` AcqRel | Acquire | none, at bound 2 or 3, the dial models with and without an `on_open` reply included: a message behind the mark travels under the out-queue's mutex, which orders it on its own. Keep it: for a dial the mark is also what carries the connect's completion (`connect_done`) to the writer that must then disarm, and no model shows that this is covered by something else |
//! | `end_write` consume, Acquire | Relaxed | none, the same models at the same bounds; kept for the same reason |
//! | `end_write` release, Release | Relaxed | all three write/close/pool models |
//! | `end_write` / `release_closed` release of a closed side, Release | Relaxed | `close_races_…`, `pool_generations_…` |
//! | reclaim AcqRel (both places) | Release | `close_races_…`, `pool_generations_…` |
//! | reclaim AcqRel (both places) | Acquire | none: the reset, made after the compare-exchange, reaches the next occupant through the pool's mutex (checkin, then checkout) |
//! | `open` Acquire | Relaxed | none, for the same reason |
//!
//! On x86-64 every read-modify-write is a full barrier, so none of these
//! choices costs anything there; they matter on weaker hardware and to the
//! compiler.

use crate::sync::{AtomicU64, Ordering};

/// A thread is reading, decoding and dispatching this connection.
const READING: u32 = 1 << 0;
/// An event arrived while `READING` was held; the holder must read again.
const READ_PENDING: u32 = 1 << 1;
/// A thread is writing this connection.
const WRITING: u32 = 1 << 2;
/// Output was queued while `WRITING` was held; the holder must look again.
const WRITE_PENDING: u32 = 1 << 3;
/// Someone asked for the connection to be closed; the next read-side owner does it.
const CLOSE_REQ: u32 = 1 << 4;
/// The connection is closed: nothing may acquire a side; reclaim when both are free.
const CLOSED: u32 = 1 << 5;
/// The slot is in (or on its way to) the free list.
const FREE: u32 = 1 << 6;
/// The peer hung up (EPOLLRDHUP/EPOLLHUP/EPOLLERR was seen), or sent urgent
/// data (EPOLLPRI): a short read is not a drained socket; read to the end.
/// It stays for the connection's life (a read more per turn, for a peer
/// that sent urgent data).
const PEER_HUP: u32 = 1 << 7;

const ALL_FLAGS: u32 =
    READING | READ_PENDING | WRITING | WRITE_PENDING | CLOSE_REQ | CLOSED | FREE | PEER_HUP;

const fn pack(generation: u32, flags: u32) -> u64 {
    ((generation as u64) << 32) | flags as u64
}

const fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

// The flags must fit the low half of the word, below the generation.
const _: () = assert!(ALL_FLAGS.leading_zeros() >= 24);

/// A snapshot of a word's flags, as seen by the thread that changed it.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(u32);

impl Flags {
    /// The peer hung up (or sent urgent data): the reader must read until
    /// end of stream (or EAGAIN), since no further edge will come for bytes
    /// already buffered.
    pub fn peer_hup(self) -> bool {
        self.0 & PEER_HUP != 0
    }

    /// A close was requested and the read-side owner must perform it.
    pub fn close_requested(self) -> bool {
        self.0 & CLOSE_REQ != 0
    }
}

impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(u32, &str); 8] = [
            (READING, "READING"),
            (READ_PENDING, "READ_PENDING"),
            (WRITING, "WRITING"),
            (WRITE_PENDING, "WRITE_PENDING"),
            (CLOSE_REQ, "CLOSE_REQ"),
            (CLOSED, "CLOSED"),
            (FREE, "FREE"),
            (PEER_HUP, "PEER_HUP"),
        ];
        let mut list = f.debug_set();
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                list.entry(&format_args!("{name}"));
            }
        }
        list.finish()
    }
}

/// Proof that this thread holds the read side of a slot.
#[must_use = "the read side stays held until end_read or release_closed"]
#[derive(Debug)]
pub struct ReadOwner<'a> {
    state: &'a State,
}

/// Proof that this thread holds the write side of a slot.
#[must_use = "the write side stays held until end_write"]
#[derive(Debug)]
pub struct WriteOwner<'a> {
    state: &'a State,
}

/// Proof that this thread moved the slot to `FREE` and nobody holds a side:
/// it may reset both sides' data before the slot goes back to the pool.
#[must_use = "a reclaimed slot must be reset and returned to the pool"]
#[derive(Debug)]
pub struct Reclaimer<'a> {
    state: &'a State,
}

impl ReadOwner<'_> {
    /// The word this proof was taken on.
    pub fn state(&self) -> &State {
        self.state
    }
}

impl WriteOwner<'_> {
    /// The word this proof was taken on.
    pub fn state(&self) -> &State {
        self.state
    }
}

impl Reclaimer<'_> {
    /// The word this proof was taken on.
    pub fn state(&self) -> &State {
        self.state
    }
}

/// The outcome of [`State::begin_read`] or [`State::begin_write`].
#[derive(Debug)]
pub enum Begin<O> {
    /// This thread now owns the side.
    Acquired(O, Flags),
    /// Another thread owns the side; the pending bit is set, so it will look
    /// again before it lets go.
    Deferred,
    /// The handle's generation is not the slot's, or the connection is closed.
    Stale,
}

/// The outcome of [`State::try_begin_write`].
#[derive(Debug)]
pub enum TryBegin<'a> {
    /// This thread now owns the write side.
    Acquired(WriteOwner<'a>),
    /// Another thread owns the write side; nothing was changed.
    Busy,
    /// The handle's generation is not the slot's, or the connection is closed.
    Stale,
}

/// The outcome of [`State::end_read`].
#[derive(Debug)]
pub enum EndRead<'a> {
    /// The read side is free.
    Released,
    /// An event arrived during the turn: read again (the side is still held).
    Again(ReadOwner<'a>, Flags),
    /// A close was requested: perform it (the side is still held).
    Close(ReadOwner<'a>),
}

/// The outcome of [`State::end_write`].
#[derive(Debug)]
pub enum EndWrite<'a> {
    /// The write side is free.
    Released,
    /// Output was queued during the flush: flush again (the side is still held).
    Again(WriteOwner<'a>),
    /// The connection was closed and this was the last side held: reclaim.
    Reclaim(Reclaimer<'a>),
}

/// The outcome of [`State::release_closed`].
#[derive(Debug)]
pub enum Release<'a> {
    /// The writer still holds its side; it will reclaim.
    Released,
    /// No side is held any more: reclaim.
    Reclaim(Reclaimer<'a>),
}

/// The ownership word of one slot. See the [module docs](self).
#[derive(Debug)]
pub struct State {
    word: AtomicU64,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// A free slot at generation 0.
    pub fn new() -> Self {
        Self {
            word: AtomicU64::new(pack(0, FREE)),
        }
    }

    /// A free slot whose next occupant gets `generation` (tests of the
    /// wrap-around).
    #[cfg(test)]
    pub(crate) fn at_generation(generation: u32) -> Self {
        Self {
            word: AtomicU64::new(pack(generation, FREE)),
        }
    }

    /// The generation the slot has now (the next occupant's, when free).
    pub fn generation(&self) -> u32 {
        // Relaxed: a report, not a decision; decisions are compare-exchanges.
        unpack(self.word.load(Ordering::Relaxed)).0
    }

    /// Whether the slot is free (in, or on its way to, the free list).
    pub fn is_free(&self) -> bool {
        // Relaxed: asked about a slot in the free list while the pool's mutex
        // is held (`Pool::with_oldest_free`), which orders it after the
        // reclaim that freed it and before any checkout that takes it.
        unpack(self.word.load(Ordering::Relaxed)).1 & FREE != 0
    }

    /// Whether a read turn or a write holds either side now, in one look.
    /// Acquire: a side given up (`end_read`, `end_write`: Release) before
    /// this look has its writes seen after it (the idle timer reads the
    /// activity mark the side's holder left).
    pub fn is_side_held(&self) -> bool {
        unpack(self.word.load(Ordering::Acquire)).1 & (READING | WRITING) != 0
    }

    /// The generation of the open connection in this slot, if there is one.
    pub fn open_generation(&self) -> Option<u32> {
        // Relaxed: callers use the answer only as a handle to try; every
        // operation on the handle re-checks it with a compare-exchange.
        let (generation, flags) = unpack(self.word.load(Ordering::Relaxed));
        (flags & (FREE | CLOSED) == 0).then_some(generation)
    }

    /// Hands a free slot to a new connection and makes the caller its reader
    /// (so nothing can dispatch or close it before the caller has set it up).
    ///
    /// Returns `None` if the word was not `FREE`: the pool handed out a slot
    /// that is in use, an invariant violation the caller must not paper over.
    pub fn open(&self) -> Option<(u32, ReadOwner<'_>)> {
        let current = self.word.load(Ordering::Relaxed);
        let (generation, flags) = unpack(current);
        if flags != FREE {
            debug_assert!(false, "open on a slot that is not free: {:?}", Flags(flags));
            return None;
        }
        // Acquire: see the last occupant's sides' writes. The reclaimer's
        // reset of both cells, made after its compare-exchange, is ordered
        // before this open by the pool's mutex (checkin, then checkout).
        match self.word.compare_exchange(
            current,
            pack(generation, READING),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => Some((generation, ReadOwner { state: self })),
            Err(actual) => {
                debug_assert!(
                    false,
                    "free slot changed under open: {:?}",
                    Flags(unpack(actual).1)
                );
                None
            }
        }
    }

    /// Claims the read side for an event on connection `generation`, or leaves
    /// a pending mark for the thread that holds it. `hup` records that the
    /// event reported a hang-up, so the reader reads to end of stream.
    pub fn begin_read(&self, generation: u32, hup: bool) -> Begin<ReadOwner<'_>> {
        let hup_bit = if hup { PEER_HUP } else { 0 };
        // Relaxed: only a first guess for the compare-exchange below.
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let (g, flags) = unpack(current);
            if g != generation || flags & (FREE | CLOSED) != 0 {
                return Begin::Stale;
            }
            let add = if flags & READING != 0 {
                READ_PENDING
            } else {
                READING
            };
            let new = flags | add | hup_bit;
            // Always a read-modify-write, even when the mark is already set:
            // a plain load could see a mark the reader has since consumed,
            // and this event would be lost (loom's `read_ownership` model
            // found exactly that). AcqRel: Acquire when this takes READING
            // (the reader cell's last writes, released by `end_read`, must be
            // visible); Release when it leaves the mark, so the reader that
            // consumes it (Acquire) reads after this event.
            match self.word.compare_exchange_weak(
                current,
                pack(g, new),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) if add == READING => {
                    return Begin::Acquired(ReadOwner { state: self }, Flags(new));
                }
                Ok(_) => return Begin::Deferred,
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives up the read side, unless an event arrived during the turn
    /// ([`EndRead::Again`]) or a close was requested ([`EndRead::Close`]).
    pub fn end_read(&self, owner: ReadOwner<'_>) -> EndRead<'_> {
        debug_assert!(
            std::ptr::eq(owner.state, self),
            "read proof from another slot"
        );
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let (g, flags) = unpack(current);
            debug_assert!(
                flags & READING != 0 && flags & (FREE | CLOSED) == 0,
                "end_read without holding the read side: {:?}",
                Flags(flags)
            );
            if flags & CLOSE_REQ != 0 {
                return EndRead::Close(ReadOwner { state: self });
            }
            let (new, ordering) = if flags & READ_PENDING != 0 {
                // Acquire: the next read must start after the event that left
                // the mark (released by `begin_read`). We keep the side.
                (flags & !READ_PENDING, Ordering::Acquire)
            } else {
                // Release: the next reader must see this turn's writes to the
                // reader cell (buffered partial frame, handler state).
                (flags & !READING, Ordering::Release)
            };
            // This compare-exchange is the re-check: it fails if a pending
            // mark or a close request landed since the load, and we loop.
            match self.word.compare_exchange_weak(
                current,
                pack(g, new),
                ordering,
                Ordering::Relaxed,
            ) {
                Ok(_) if new & READING != 0 => {
                    return EndRead::Again(ReadOwner { state: self }, Flags(new));
                }
                Ok(_) => return EndRead::Released,
                Err(actual) => current = actual,
            }
        }
    }

    /// Claims the write side if nobody holds it, without leaving a pending
    /// mark when somebody does. For a writer that has not queued its bytes
    /// yet (the reader's send-first path): on [`TryBegin::Busy`] it must queue
    /// them and then call [`State::begin_write`].
    pub fn try_begin_write(&self, generation: u32) -> TryBegin<'_> {
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let (g, flags) = unpack(current);
            if g != generation || flags & (FREE | CLOSED) != 0 {
                return TryBegin::Stale;
            }
            if flags & WRITING != 0 {
                return TryBegin::Busy;
            }
            // Acquire: see the writer cell as the last writer left it.
            match self.word.compare_exchange_weak(
                current,
                pack(g, flags | WRITING),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return TryBegin::Acquired(WriteOwner { state: self }),
                Err(actual) => current = actual,
            }
        }
    }

    /// Claims the write side for queued output (or an EPOLLOUT event), or
    /// leaves a pending mark for the thread that holds it.
    pub fn begin_write(&self, generation: u32) -> Begin<WriteOwner<'_>> {
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let (g, flags) = unpack(current);
            if g != generation || flags & (FREE | CLOSED) != 0 {
                return Begin::Stale;
            }
            let add = if flags & WRITING != 0 {
                WRITE_PENDING
            } else {
                WRITING
            };
            let new = flags | add;
            // Always a read-modify-write, as in `begin_read`. AcqRel: Acquire
            // when this takes WRITING (the writer cell, as in
            // `try_begin_write`); Release when it leaves the mark for the
            // writer, who consumes it with Acquire.
            match self.word.compare_exchange_weak(
                current,
                pack(g, new),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) if add == WRITING => {
                    return Begin::Acquired(WriteOwner { state: self }, Flags(new));
                }
                Ok(_) => return Begin::Deferred,
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives up the write side, unless output was queued during the flush
    /// ([`EndWrite::Again`]), or reclaims the slot if the connection was
    /// closed and the read side is free ([`EndWrite::Reclaim`]).
    pub fn end_write(&self, owner: WriteOwner<'_>) -> EndWrite<'_> {
        debug_assert!(
            std::ptr::eq(owner.state, self),
            "write proof from another slot"
        );
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let (g, flags) = unpack(current);
            debug_assert!(
                flags & WRITING != 0 && flags & FREE == 0,
                "end_write without holding the write side: {:?}",
                Flags(flags)
            );
            let (new, ordering) = if flags & CLOSED != 0 {
                if flags & READING == 0 {
                    // AcqRel: Acquire the closer's last reader-cell writes
                    // (released by `release_closed`) before resetting them
                    // (the reset, made after, reaches the next occupant
                    // through the pool's mutex).
                    (pack(g.wrapping_add(1), FREE), Ordering::AcqRel)
                } else {
                    // Release: the closer, who will reclaim, must see our
                    // last writer-cell writes.
                    (
                        pack(g, flags & !(WRITING | WRITE_PENDING)),
                        Ordering::Release,
                    )
                }
            } else if flags & WRITE_PENDING != 0 {
                // Acquire: pairs with the Release of the `begin_write` that
                // left the mark (the message itself also comes through the
                // out-queue's mutex).
                (pack(g, flags & !WRITE_PENDING), Ordering::Acquire)
            } else {
                // Release: the next writer must see the writer cell as we left it.
                (pack(g, flags & !WRITING), Ordering::Release)
            };
            match self
                .word
                .compare_exchange_weak(current, new, ordering, Ordering::Relaxed)
            {
                Ok(_) => {
                    let (_, new_flags) = unpack(new);
                    return if new_flags & FREE != 0 {
                        EndWrite::Reclaim(Reclaimer { state: self })
                    } else if new_flags & WRITING != 0 {
                        EndWrite::Again(WriteOwner { state: self })
                    } else {
                        EndWrite::Released
                    };
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Asks for connection `generation` to be closed by its read-side owner.
    /// Returns `false` if it is stale, closed, or a close is already pending
    /// (so exactly one request per connection is acted upon).
    pub fn request_close(&self, generation: u32) -> bool {
        self.request_close_unless(generation, 0)
    }

    /// As [`State::request_close`], but also `false` while either side is
    /// held, in the same atomic step as the request: for the idle timer,
    /// whose look at the activity mark is void if a read turn or a write
    /// began since (a turn that began between a separate look at the sides
    /// and the request would read, and dispatch, fresh bytes before the
    /// close it then carried out as idle). A whole turn begun and ended
    /// between the timer's look at the mark and this step is not seen.
    pub fn request_close_unheld(&self, generation: u32) -> bool {
        self.request_close_unless(generation, READING | WRITING)
    }

    /// As [`State::request_close`], but also `false` while the read side is
    /// held, in the same atomic step: for the frame timer, whose look at the
    /// frame clock is void if a read turn is under way (it may be
    /// completing the frame; the clock restarts at its end). A write under
    /// way is no reason to wait: it says nothing of the peer's frame, and a
    /// server writing steadily would hold the close off for good.
    pub fn request_close_unread(&self, generation: u32) -> bool {
        self.request_close_unless(generation, READING)
    }

    fn request_close_unless(&self, generation: u32, busy: u32) -> bool {
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let (g, flags) = unpack(current);
            if g != generation || flags & (FREE | CLOSED | CLOSE_REQ | busy) != 0 {
                return false;
            }
            // Relaxed: the request carries no data (the reason travels in the
            // out-queue, under its mutex); the reader's `end_read` CAS cannot
            // miss the bit.
            match self.word.compare_exchange_weak(
                current,
                pack(g, flags | CLOSE_REQ),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Marks the connection closed. Called by the read-side owner when it
    /// starts the close: from now on every `begin_*` is stale, so no new owner
    /// can appear and the last side to be released reclaims.
    pub fn mark_closed(&self, owner: &ReadOwner<'_>) {
        debug_assert!(
            std::ptr::eq(owner.state, self),
            "read proof from another slot"
        );
        // Relaxed: what others do with CLOSED (refuse) needs no data from us.
        let previous = self.word.fetch_or(u64::from(CLOSED), Ordering::Relaxed);
        debug_assert!(
            unpack(previous).1 & READING != 0 && unpack(previous).1 & (FREE | CLOSED) == 0,
            "mark_closed without holding the read side: {:?}",
            Flags(unpack(previous).1)
        );
    }

    /// Releases the read side of a closed connection; reclaims the slot if
    /// the write side is free too.
    pub fn release_closed(&self, owner: ReadOwner<'_>) -> Release<'_> {
        debug_assert!(
            std::ptr::eq(owner.state, self),
            "read proof from another slot"
        );
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let (g, flags) = unpack(current);
            debug_assert!(
                flags & READING != 0 && flags & CLOSED != 0 && flags & FREE == 0,
                "release_closed on a word that is not closed and read-held: {:?}",
                Flags(flags)
            );
            let (new, ordering) = if flags & WRITING == 0 {
                // AcqRel: Acquire the writer's last writer-cell writes
                // (released by its `end_write`) before resetting them.
                (pack(g.wrapping_add(1), FREE), Ordering::AcqRel)
            } else {
                // Release: the writer, who will reclaim, must see our last
                // reader-cell writes.
                (
                    pack(g, flags & !(READING | READ_PENDING | CLOSE_REQ)),
                    Ordering::Release,
                )
            };
            match self
                .word
                .compare_exchange_weak(current, new, ordering, Ordering::Relaxed)
            {
                Ok(_) if unpack(new).1 & FREE != 0 => {
                    return Release::Reclaim(Reclaimer { state: self });
                }
                Ok(_) => return Release::Released,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(state: &State) -> (u32, ReadOwner<'_>) {
        state.open().expect("fresh slot is free")
    }

    /// A review finding: the idle timer looked at the sides, then asked for
    /// the close; a read turn that began between the two read fresh bytes
    /// and then closed the connection as idle. The request that needs both
    /// sides free fails while either is held.
    #[test]
    fn an_idle_request_fails_while_a_side_is_held() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, owner) = open(&state);
            assert!(!state.request_close_unheld(generation), "read side held");
            assert!(matches!(state.end_read(owner), EndRead::Released));
            let Begin::Acquired(writer, _) = state.begin_write(generation) else {
                panic!("the write side is free");
            };
            assert!(!state.request_close_unheld(generation), "write side held");
            assert!(matches!(state.end_write(writer), EndWrite::Released));
            assert!(state.request_close_unheld(generation), "both sides free");
            assert!(
                !state.request_close(generation),
                "one request is acted upon"
            );
        });
    }

    /// A review finding: the frame timer's close, made to wait for a read
    /// turn under way (which may be completing the frame), also waited for
    /// the write side, which says nothing of the peer's frame: a server
    /// writing to a peer steadily could hold the close off for good while
    /// the peer trickled a frame. It waits for the read side only.
    #[test]
    fn a_frame_request_waits_for_the_read_side_only() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, owner) = open(&state);
            assert!(!state.request_close_unread(generation), "read side held");
            assert!(matches!(state.end_read(owner), EndRead::Released));
            let Begin::Acquired(writer, _) = state.begin_write(generation) else {
                panic!("the write side is free");
            };
            assert!(
                state.request_close_unread(generation),
                "a write under way does not hold it off"
            );
            assert!(!state.request_close_unread(generation), "asked once");
            let _ = state.end_write(writer);
        });
    }

    #[test]
    fn a_second_reader_defers_and_the_first_reads_again() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, owner) = open(&state);
            assert!(matches!(
                state.begin_read(generation, false),
                Begin::Deferred
            ));
            let EndRead::Again(owner, _) = state.end_read(owner) else {
                panic!("pending event was lost");
            };
            assert!(matches!(state.end_read(owner), EndRead::Released));
            assert!(matches!(
                state.begin_read(generation, false),
                Begin::Acquired(..)
            ));
        });
    }

    #[test]
    fn hang_up_is_sticky_until_reclaim() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, owner) = open(&state);
            assert!(matches!(
                state.begin_read(generation, true),
                Begin::Deferred
            ));
            let EndRead::Again(owner, flags) = state.end_read(owner) else {
                panic!("pending event was lost");
            };
            assert!(flags.peer_hup());
            assert!(matches!(state.end_read(owner), EndRead::Released));
            let Begin::Acquired(_owner, flags) = state.begin_read(generation, false) else {
                panic!("read side should be free");
            };
            assert!(flags.peer_hup());
        });
    }

    #[test]
    fn writer_defers_and_rechecks() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, reader) = open(&state);
            let TryBegin::Acquired(writer) = state.try_begin_write(generation) else {
                panic!("write side should be free");
            };
            assert!(matches!(state.try_begin_write(generation), TryBegin::Busy));
            assert!(matches!(state.begin_write(generation), Begin::Deferred));
            let EndWrite::Again(writer) = state.end_write(writer) else {
                panic!("pending output was lost");
            };
            assert!(matches!(state.end_write(writer), EndWrite::Released));
            assert!(matches!(state.end_read(reader), EndRead::Released));
        });
    }

    #[test]
    fn close_reclaims_once_after_the_writer_leaves() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, reader) = open(&state);
            let Begin::Acquired(writer, _) = state.begin_write(generation) else {
                panic!("write side should be free");
            };
            assert!(state.request_close(generation));
            assert!(
                !state.request_close(generation),
                "a second request is refused"
            );
            let EndRead::Close(reader) = state.end_read(reader) else {
                panic!("close request was lost");
            };
            state.mark_closed(&reader);
            assert!(matches!(state.begin_read(generation, false), Begin::Stale));
            assert!(matches!(state.begin_write(generation), Begin::Stale));
            assert!(matches!(state.release_closed(reader), Release::Released));
            assert!(matches!(state.end_write(writer), EndWrite::Reclaim(_)));
            assert_eq!(state.generation(), generation + 1);
            assert_eq!(state.open_generation(), None);
            let (next, _reader) = open(&state);
            assert_eq!(next, generation + 1);
            assert!(matches!(state.begin_write(generation), Begin::Stale));
        });
    }

    #[test]
    fn close_without_writer_reclaims_at_release() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, reader) = open(&state);
            state.mark_closed(&reader);
            assert!(matches!(state.release_closed(reader), Release::Reclaim(_)));
            assert_eq!(state.generation(), generation + 1);
        });
    }

    #[test]
    fn stale_generation_is_refused_everywhere() {
        crate::sync::model(|| {
            let state = State::new();
            let (generation, reader) = open(&state);
            let stale = generation.wrapping_sub(1);
            assert!(matches!(state.begin_read(stale, false), Begin::Stale));
            assert!(matches!(state.begin_write(stale), Begin::Stale));
            assert!(matches!(state.try_begin_write(stale), TryBegin::Stale));
            assert!(!state.request_close(stale));
            assert!(matches!(state.end_read(reader), EndRead::Released));
        });
    }
}
