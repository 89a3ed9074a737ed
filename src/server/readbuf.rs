//! A connection's read buffer: allocated only while a frame is incomplete.
//!
//! Most turns decode every frame straight out of the worker's scratch
//! buffer, and a connection at a frame boundary owns no buffer at all (an
//! idle connection costs no read memory). Only the bytes of an incomplete
//! frame are kept here, and released as soon as it is empty again.
//!
//! The buffer grows with the bytes that arrive, doubling at most per read,
//! toward the length the codec announced; never to that length at once. A
//! header costs a peer 4 bytes and may announce the largest frame allowed:
//! sizing for it up front would let 64 connections sending 5 bytes each hold
//! half a GiB of zero-filled memory.
//!
//! Past a first [`UNCHARGED`] bytes, each connection's buffer draws on a
//! server-wide [`Budget`] (`Config::max_in_total`): however many peers
//! send large frames slowly, what they can make the server hold is bounded
//! by one figure, not by connections times `max_frame`. A buffer that would
//! grow past it is refused, and the connection is closed
//! (`CloseReason::InputBudget`); frames decoded straight from the worker's
//! scratch buffer, and partial frames that fit the uncharged buffer (up to
//! 16 KiB with their length known, lines up to 12 KiB), never draw on it.
//! The tail of a read left over when a turn stops early (the frame budget,
//! or output over `max_out`) is charged but not refused (see
//! [`ReadBuf::keep`]): the bound is soft by at most one read's tail per
//! connection.
//!
//! # Invariants
//!
//! - `start <= end <= data.len()`; the bytes not yet decoded are
//!   `data[start..end]`; `data` is fully initialised (no `unsafe` needed to
//!   read into it).
//! - Memory follows what arrived: [`ReadBuf::keep`] and [`ReadBuf::spare`]
//!   size or grow the buffer to at most `2 * undecoded + MIN_READ` bytes,
//!   whatever length was announced, and a frame completing in a charged
//!   buffer ([`ReadBuf::consume`]) cuts it back within that bound.
//! - Between turns, an uncharged buffer holds at most
//!   `max(8 * undecoded, 2 * TRIM_MIN)` bytes ([`ReadBuf::trim`]): memory
//!   a peer pins is proportional to the bytes it sent, not a read's room.
//! - The charge on the budget is `data.len() - UNCHARGED` (or 0), taken
//!   before the buffer grows and given back when it is released or dropped,
//!   or, past the new size, when a completed frame shrinks it.

use std::sync::Arc;

use crate::core::outq::Budget;

/// Bytes read but not yet decoded.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// How many of the undecoded bytes the codec last found incomplete
    /// (`Codec::decode_from`'s hint).
    seen: usize,
    /// What `data` holds past [`UNCHARGED`], taken from the input budget.
    charge: Charge,
    /// Bytes that arrived and were dropped undecoded ([`ReadBuf::discard`],
    /// a refused [`ReadBuf::keep`]): counted in [`ReadBuf::take_unread`].
    discarded: usize,
}

/// The least spare room offered to one read.
const MIN_READ: usize = 16 << 10;

/// Bytes of buffer each connection holds without drawing on the input
/// budget: a frame cut by a read boundary always fits.
pub(crate) const UNCHARGED: usize = MIN_READ;

/// A charged buffer holding no more than this is shrunk to the uncharged
/// size (leaving room for a read of at least as much again).
const SHRINK_AT: usize = UNCHARGED / 2;

/// The least a buffer is trimmed to between turns ([`ReadBuf::trim`]).
const TRIM_MIN: usize = 512;

/// The input budget refused a buffer this large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The buffer size asked for.
    pub size: usize,
}

/// Bytes taken from the input budget, given back when dropped.
#[derive(Debug, Default)]
struct Charge {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl Charge {
    /// Gives the whole charge back: the buffer is dropped.
    fn clear(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give_back(std::mem::take(&mut self.bytes));
        }
    }

    /// Gives back the charge past a buffer of `size` bytes in all: the
    /// buffer was shrunk to that.
    fn shrink_to(&mut self, size: usize) {
        let want = size.saturating_sub(UNCHARGED);
        debug_assert!(want <= self.bytes, "a read buffer shrank by growing");
        let back = self.bytes.saturating_sub(want);
        if let Some(budget) = &self.budget {
            budget.give_back(back);
        }
        self.bytes -= back;
    }

    /// Charges for growing the buffer to `size` bytes in all; on refusal
    /// nothing changes. `refusable: false` takes the bytes past the limit
    /// too. A buffer only grows until it is released or shrunk (each gives
    /// back the charge past its new size, see [`Charge::shrink_to`]), so
    /// the charge never shrinks here.
    fn grow(&mut self, size: usize, budget: &Arc<Budget>, refusable: bool) -> Result<(), Refused> {
        let want = size.saturating_sub(UNCHARGED);
        debug_assert!(
            want >= self.bytes,
            "a read buffer shrank with its charge kept"
        );
        let more = want.saturating_sub(self.bytes);
        if more == 0 {
            return Ok(());
        }
        if refusable {
            if !budget.try_take(more) {
                return Err(Refused { size });
            }
        } else {
            budget.take_anyway(more);
        }
        self.budget.get_or_insert_with(|| Arc::clone(budget));
        self.bytes = want;
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.clear();
    }
}

impl ReadBuf {
    /// Whether no undecoded byte is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The undecoded bytes.
    pub(crate) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Undecoded bytes held.
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    /// Drops `n` decoded bytes from the front; releases the memory once
    /// empty; and when a frame completes in a charged buffer, shrinks it to
    /// the uncharged size if what is left fits in half of that, else to
    /// twice what is left if it holds more than `2 * left + MIN_READ`.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len(), "consumed more than was buffered");
        self.start += n;
        if n > 0 {
            // A new frame starts: nothing of it has been decoded yet.
            self.seen = 0;
        }
        if self.start == self.end {
            self.release();
        } else if n > 0 && self.data.len() > UNCHARGED {
            // The first bytes of the next frame would otherwise keep the
            // last large frame's buffer, and its charge on the input
            // budget, until that frame completes: for good, if it never
            // does (and a peer can keep a line from ever completing while
            // completing others: the frame timeout restarts at each).
            let held = self.len();
            if held <= SHRINK_AT {
                self.shrink_to(UNCHARGED);
            } else if self.data.len() > 2 * held + MIN_READ {
                self.shrink_to(2 * held);
            }
        }
    }

    /// Moves the undecoded bytes to a buffer of `size` bytes (at least
    /// [`UNCHARGED`]), and gives back the charge past it.
    fn shrink_to(&mut self, size: usize) {
        let held = self.len();
        let size = size.max(UNCHARGED);
        debug_assert!(held <= size && size < self.data.len());
        let mut data = vec![0; size];
        data[..held].copy_from_slice(self.filled());
        self.data = data;
        self.start = 0;
        self.end = held;
        self.charge.shrink_to(size);
    }

    /// How many of the undecoded bytes the codec found incomplete when it
    /// last looked (0: not looked at since the frame started).
    pub(crate) fn seen(&self) -> usize {
        self.seen
    }

    /// Records that the codec found all the undecoded bytes incomplete
    /// (`incomplete`), or forgets it.
    pub(crate) fn set_seen(&mut self, incomplete: bool) {
        self.seen = if incomplete { self.len() } else { 0 };
    }

    /// Keeps `bytes` (the undecoded tail of a scratch read), with room
    /// toward a frame of `need` bytes in all when the codec knows it (no more
    /// than the bytes kept again: see the module docs).
    /// Refused by the input budget, it keeps nothing (the bytes count as
    /// discarded: see [`ReadBuf::take_unread`]). `refusable: false`
    /// for bytes left over when the turn stopped early (the frame budget,
    /// or output over `max_out`; they may hold complete frames): they are
    /// charged past the limit rather than refused, since they are no more
    /// than one read (bounded per connection) and go on the next turn.
    pub(crate) fn keep(
        &mut self,
        bytes: &[u8],
        need: Option<usize>,
        budget: &Arc<Budget>,
        refusable: bool,
    ) -> Result<(), Refused> {
        debug_assert!(self.is_empty(), "keep over undecoded bytes");
        let size = need
            .unwrap_or(0)
            .min(bytes.len().saturating_mul(2))
            .max(bytes.len())
            .max(MIN_READ);
        debug_assert!(size <= 2 * bytes.len() + MIN_READ);
        if self.data.len() < size {
            if let Err(refused) = self.charge.grow(size, budget, refusable) {
                self.discarded = self.discarded.saturating_add(bytes.len());
                return Err(refused);
            }
            self.data = vec![0; size];
        }
        self.data[..bytes.len()].copy_from_slice(bytes);
        self.start = 0;
        self.end = bytes.len();
        self.seen = 0;
        Ok(())
    }

    /// Room to read into. What a read should be offered: the rest of a
    /// frame of `need` bytes in all, when known, but no more than the bytes
    /// held (or [`MIN_READ`]); when not known, a quarter of [`MIN_READ`]
    /// while fewer than [`UNCHARGED`] bytes are held, then as much as is
    /// held. The buffer grows only when its room is short of that (or of
    /// [`MIN_READ`], if less), and then by that much (by [`MIN_READ`] for a
    /// short line): growth is geometric, a large room is read into without
    /// a reallocation, and a frame that fits the uncharged buffer (up to 16
    /// KiB with its length known, a line up to 12 KiB) never grows it.
    /// Refused by the input budget, the buffer stays as it was.
    ///
    /// Never past `most` bytes (the codec's longest incomplete frame, see
    /// `Framing::max_incomplete`) in all: doubling toward a line of unknown
    /// length once asked for twice the longest line, and the input budget
    /// refused a line it had room for.
    pub(crate) fn spare(
        &mut self,
        need: Option<usize>,
        most: usize,
        budget: &Arc<Budget>,
    ) -> Result<&mut [u8], Refused> {
        let held = self.len();
        // A frame of unknown length grows as geometrically as a known one.
        let (required, grow_by) = match need {
            Some(need) => {
                let rest = need.saturating_sub(held).min(held.max(MIN_READ)).max(1);
                (rest, rest)
            }
            // Up to the uncharged size first (a buffer trimmed between
            // turns regrows there, not past it: see `trim`).
            None if held < UNCHARGED => (MIN_READ / 4, (UNCHARGED - held).max(MIN_READ / 4)),
            None => (held, held),
        };
        // Growing reallocates (exactly, see below): only when the room is
        // short of a useful read, so that growth stays geometric. (Growing
        // whenever the room was short of `required` reallocated on every
        // read through the first half of a large frame.)
        let required = required.min(MIN_READ);
        if self.data.len() - self.end < required {
            if self.start > 0 {
                // Move the undecoded bytes to the front before growing.
                self.data.copy_within(self.start..self.end, 0);
                self.start = 0;
                self.end = held;
            }
            if self.data.len() - self.end < required {
                let mut size = self.end + grow_by;
                // An uncharged buffer grows to the uncharged size and no
                // further in one step: the few bytes of a large frame it
                // holds stay uncharged, and `trim` cuts it back between
                // turns. Grown just past it (to 16 KiB and the bytes held),
                // it was charged for those few bytes and kept whole: a
                // header, then a byte, pinned 16 KiB.
                if self.data.len() < UNCHARGED {
                    size = size.min(UNCHARGED);
                }
                // (Capped, it may not grow at all: a buffer kept at the
                // uncharged size for a codec whose frames are shorter. Its
                // room is at least a byte: `end` is short of `most`.)
                size = size.min(most.max(self.end + 1));
                if size > self.data.len() {
                    self.charge.grow(size, budget, true)?;
                    // Exact: the charge and the invariant's bound are the
                    // memory held, not a `Vec`'s amortised doubling.
                    self.data.reserve_exact(size - self.data.len());
                    self.data.resize(size, 0);
                }
                debug_assert!(
                    self.data.len() <= 2 * held + MIN_READ,
                    "read buffer grown to {} bytes for {held} undecoded",
                    self.data.len()
                );
            }
        }
        Ok(&mut self.data[self.end..])
    }

    /// Records `n` bytes read into [`ReadBuf::spare`].
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(
            self.end + n <= self.data.len(),
            "committed past the spare room"
        );
        self.end += n;
    }

    /// Between turns: cuts an uncharged buffer far larger than what it
    /// holds down to twice that (at least [`TRIM_MIN`]; the whole frame of
    /// `need` bytes when the codec knows it and it is at most four times
    /// what is held, so that a frame cut by a read boundary completes
    /// without growing again). Reads are offered a whole read's room
    /// ([`ReadBuf::spare`]), and a peer that sent a few bytes of a frame,
    /// then paused, would otherwise pin that room (16 KiB for 5 bytes,
    /// outside the input budget) until the frame completed. The next read
    /// grows it again. Charged buffers shrink on their own rule (see
    /// [`ReadBuf::consume`]).
    pub(crate) fn trim(&mut self, need: Option<usize>) {
        let held = self.len();
        let whole = need.filter(|&need| need <= 4 * held).unwrap_or(0);
        let target = (2 * held).max(TRIM_MIN).max(whole);
        if self.data.len() <= UNCHARGED && self.data.len() > 2 * target {
            let mut data = vec![0; target];
            data[..held].copy_from_slice(self.filled());
            self.data = data;
            self.start = 0;
            self.end = held;
        }
        debug_assert!(
            self.data.len() > UNCHARGED || self.data.len() <= 2 * target,
            "an uncharged buffer of {} bytes kept for {held}",
            self.data.len()
        );
    }

    /// Frees the memory (the count of discarded bytes stays).
    pub(crate) fn release(&mut self) {
        let discarded = self.discarded;
        *self = Self::default();
        self.discarded = discarded;
    }

    /// Drops the undecoded bytes, freeing the memory, and counts them as
    /// unread: the connection is closing (end of stream mid-frame, a bad
    /// frame header, or the input budget refused the frame).
    pub(crate) fn discard(&mut self) {
        self.discarded = self.discarded.saturating_add(self.len());
        self.release();
    }

    /// At the connection's close: the bytes that arrived and were never
    /// decoded (held or discarded); leaves the buffer as new.
    pub(crate) fn take_unread(&mut self) -> usize {
        let unread = self.discarded.saturating_add(self.len());
        *self = Self::default();
        unread
    }

    /// Bytes of memory held (for tests and stats).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.data.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget that never refuses.
    fn unlimited() -> Arc<Budget> {
        Arc::new(Budget::new(usize::MAX))
    }

    #[test]
    fn keeps_reads_and_releases() {
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        assert_eq!(buf.capacity(), 0);
        buf.keep(b"abc", Some(100_000), &budget, true).unwrap();
        let spare = buf.spare(Some(100_000), usize::MAX, &budget).unwrap();
        assert!(spare.len() >= MIN_READ / 4);
        spare[..2].copy_from_slice(b"de");
        buf.commit(2);
        assert_eq!(buf.filled(), b"abcde");
        buf.consume(2);
        assert_eq!(buf.filled(), b"cde");
        buf.consume(3);
        assert!(buf.is_empty());
        assert_eq!(buf.capacity(), 0, "released when empty");
    }

    /// A header may announce 8 MiB for 4 bytes sent: the buffer grows with
    /// what arrives (at most doubling per read), not to what was announced.
    #[test]
    fn an_announced_length_is_not_reserved_before_its_bytes_arrive() {
        const FRAME: usize = 8 << 20;
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        buf.keep(&[0, 0, 0x80, 0], Some(FRAME + 4), &budget, true)
            .unwrap();
        assert!(buf.capacity() <= MIN_READ, "kept {} bytes", buf.capacity());
        let spare = buf.spare(Some(FRAME + 4), usize::MAX, &budget).unwrap();
        assert!(spare.len() <= MIN_READ, "offered {} bytes", spare.len());
        // The frame arrives, read after read: every read is offered room, the
        // buffer never holds more than twice what arrived plus one read, and
        // the frame completes.
        let mut reads = 0;
        while buf.len() < FRAME + 4 {
            let missing = FRAME + 4 - buf.len();
            let spare = buf.spare(Some(FRAME + 4), usize::MAX, &budget).unwrap();
            assert!(!spare.is_empty());
            let n = spare.len().min(missing);
            spare[..n].fill(1);
            buf.commit(n);
            reads += 1;
            assert!(
                buf.capacity() <= 2 * buf.len() + MIN_READ,
                "{} bytes held for {} arrived",
                buf.capacity(),
                buf.len()
            );
        }
        assert!(reads < 20, "geometric growth: {reads} reads for 8 MiB");
        assert_eq!(buf.len(), FRAME + 4);
    }

    #[test]
    fn compacts_before_growing() {
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        buf.keep(&[1; MIN_READ], None, &budget, true).unwrap();
        buf.consume(MIN_READ - 2);
        let before = buf.capacity();
        let spare = buf.spare(None, usize::MAX, &budget).unwrap();
        assert!(spare.len() >= MIN_READ - 2);
        assert_eq!(buf.filled(), [1, 1]);
        assert_eq!(
            buf.capacity(),
            before,
            "compaction made room without growing"
        );
    }

    /// Grows `buf` toward a frame of `frame` bytes, read by read, until
    /// it holds the frame or the budget refuses.
    fn fill(buf: &mut ReadBuf, frame: usize, budget: &Arc<Budget>) -> Result<(), Refused> {
        while buf.len() < frame {
            let missing = frame - buf.len();
            let spare = buf.spare(Some(frame), usize::MAX, budget)?;
            let n = spare.len().min(missing);
            spare[..n].fill(7);
            buf.commit(n);
        }
        Ok(())
    }

    /// The buffer past the first UNCHARGED bytes is what the budget
    /// holds, and all of it comes back when the frame is consumed.
    #[test]
    fn the_input_budget_holds_what_the_buffer_holds_past_the_allowance() {
        const FRAME: usize = 600 << 10;
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        buf.keep(&[0; 4], Some(FRAME), &budget, true).unwrap();
        assert_eq!(budget.queued(), 0, "a small partial frame is not charged");
        fill(&mut buf, FRAME, &budget).unwrap();
        assert_eq!(budget.queued(), buf.capacity() - UNCHARGED);
        buf.consume(FRAME);
        assert_eq!(budget.queued(), 0, "given back on release");
    }

    /// A large frame followed by the first bytes of the next: once the
    /// large one is consumed, the buffer shrinks to the uncharged size and
    /// the budget gets its bytes back, though the buffer is not empty (a
    /// peer that never completes the next frame would otherwise hold the
    /// large one's charge for good). A tail past half the uncharged size
    /// keeps a buffer of twice its size, charged past the uncharged size.
    #[test]
    fn a_small_tail_after_a_large_frame_gives_the_charge_back() {
        const FRAME: usize = 600 << 10;
        let budget = unlimited();
        for (tail, shrinks) in [(1, true), (SHRINK_AT, true), (SHRINK_AT + 1, false)] {
            let mut buf = ReadBuf::default();
            buf.keep(&[0; 4], Some(FRAME), &budget, true).unwrap();
            fill(&mut buf, FRAME + tail, &budget).unwrap();
            assert!(budget.queued() > 0);
            let next: Vec<u8> = buf.filled()[FRAME..].to_vec();
            buf.consume(FRAME);
            assert_eq!(buf.filled(), next, "the next frame's bytes are kept");
            if shrinks {
                assert_eq!(budget.queued(), 0, "tail {tail}: charge kept");
                assert!(
                    buf.capacity() <= UNCHARGED,
                    "tail {tail}: {}",
                    buf.capacity()
                );
                // And the next frame still arrives into it.
                let spare = buf.spare(Some(100), usize::MAX, &budget).unwrap();
                assert!(!spare.is_empty());
            } else {
                assert_eq!(budget.queued(), buf.capacity() - UNCHARGED);
            }
            buf.consume(tail);
            assert_eq!(budget.queued(), 0, "given back on release");
        }
    }

    /// An audit's finding: a line's buffer grows by doubling (its length is
    /// unknown), so it ends well past the line; when the line completed
    /// with more than [`SHRINK_AT`] bytes of the next one behind it, the
    /// whole buffer and its charge stayed. A peer that then sent a newline
    /// and another 12 KiB every so often held megabytes of the input
    /// budget for good (the frame timeout restarts at each line), and a
    /// few dozen such peers starved everyone's large frames. Now a
    /// completed frame cuts the buffer back to twice what is left.
    #[test]
    fn a_large_tail_after_a_long_line_gives_back_the_room_past_it() {
        const LINE: usize = 5 << 20;
        const TAIL: usize = 12 << 10;
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        buf.keep(&[b'x'; 4], None, &budget, true).unwrap();
        while buf.len() < LINE + TAIL {
            let missing = LINE + TAIL - buf.len();
            let spare = buf.spare(None, usize::MAX, &budget).unwrap();
            let n = spare.len().min(missing);
            spare[..n].fill(b'x');
            buf.commit(n);
        }
        assert!(buf.capacity() > LINE, "{}", buf.capacity());
        for round in 0..3 {
            buf.consume(buf.len() - TAIL);
            assert_eq!(buf.len(), TAIL);
            assert!(
                buf.capacity() <= 2 * TAIL + MIN_READ,
                "round {round}: {} bytes kept for a {TAIL}-byte tail",
                buf.capacity()
            );
            assert_eq!(budget.queued(), buf.capacity().saturating_sub(UNCHARGED));
            // The newline and the next tail, as that peer sends them.
            let spare = buf.spare(None, usize::MAX, &budget).unwrap();
            let n = spare.len().min(TAIL);
            spare[..n].fill(b'x');
            buf.commit(n);
            if buf.len() < 2 * TAIL {
                let spare = buf.spare(None, usize::MAX, &budget).unwrap();
                let n = spare.len().min(2 * TAIL - buf.len());
                buf.commit(n);
            }
        }
        buf.release();
        assert_eq!(budget.queued(), 0);
    }

    /// Refused, the buffer keeps what it had (nothing is lost or charged
    /// twice), and dropping it gives its charge back.
    #[test]
    fn a_refused_buffer_stays_as_it_was() {
        const MAX: usize = 100 << 10;
        let budget = Arc::new(Budget::new(MAX));
        let mut buf = ReadBuf::default();
        buf.keep(&[0; 4], Some(1 << 20), &budget, true).unwrap();
        let refused = fill(&mut buf, 1 << 20, &budget).unwrap_err();
        assert!(refused.size > MAX + UNCHARGED, "{refused:?}");
        let (held, charged) = (buf.len(), budget.queued());
        assert!(charged <= MAX && charged == buf.capacity() - UNCHARGED);
        assert!(buf.filled().iter().skip(4).all(|&b| b == 7));
        assert_eq!(
            buf.spare(Some(1 << 20), usize::MAX, &budget).map(|_| ()),
            Err(refused)
        );
        assert_eq!((buf.len(), budget.queued()), (held, charged));
        // A keep that does not fit is refused whole.
        let mut other = ReadBuf::default();
        let big = vec![1; MAX];
        assert!(other.keep(&big, None, &budget, true).is_err());
        assert!(other.is_empty());
        drop(buf);
        assert_eq!(budget.queued(), 0);
        other.keep(&big, None, &budget, true).unwrap();
        assert_eq!(budget.queued(), MAX - UNCHARGED);
    }

    /// A review finding: the least room offered to a read (4 KiB) made a
    /// buffer of 16 KiB grow, and draw on the budget, for a frame of 16 KiB
    /// or less cut in its last 4 KiB. Such frames always fit uncharged now,
    /// whatever the budget: length-prefixed frames up to 16 KiB, and lines
    /// (length unknown) up to 12 KiB.
    #[test]
    fn small_frames_cut_anywhere_never_draw_on_the_budget() {
        let none = Arc::new(Budget::new(0));
        for (frame, need) in [(UNCHARGED, true), (UNCHARGED - MIN_READ / 4, false)] {
            for cut in (1..frame).step_by(512) {
                let mut buf = ReadBuf::default();
                let hint = need.then_some(frame);
                buf.keep(&vec![5; cut], hint, &none, true).unwrap();
                while buf.len() < frame {
                    let missing = frame - buf.len();
                    let spare = buf
                        .spare(hint, usize::MAX, &none)
                        .unwrap_or_else(|r| panic!("{frame}-byte frame cut at {cut}: {r:?}"));
                    let n = spare.len().min(missing);
                    spare[..n].fill(5);
                    buf.commit(n);
                }
                assert_eq!(none.queued(), 0);
            }
        }
    }

    /// A review finding: growth whenever the room was short of the rest
    /// of the frame reallocated (and copied everything held) on every read
    /// through the first half of a large frame. Growth is geometric now: an
    /// 8 MiB frame read 64 KiB at a time reallocates about a dozen times.
    #[test]
    fn a_large_frame_grows_the_buffer_geometrically() {
        const FRAME: usize = 8 << 20;
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        buf.keep(&[0; 4], Some(FRAME), &budget, true).unwrap();
        let mut grown = 0;
        while buf.len() < FRAME {
            let before = buf.capacity();
            let missing = FRAME - buf.len();
            let spare = buf.spare(Some(FRAME), usize::MAX, &budget).unwrap();
            let n = spare.len().min(missing).min(64 << 10);
            buf.commit(n);
            grown += usize::from(buf.capacity() != before);
        }
        assert!(grown <= 12, "{grown} reallocations for an 8 MiB frame");
    }

    /// A review finding: growth was at least 16 KiB, so a frame a little
    /// over the uncharged 16 KiB was charged 16 KiB more, not its excess.
    #[test]
    fn a_frame_just_over_the_allowance_is_charged_its_excess() {
        const FRAME: usize = UNCHARGED + (4 << 10);
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        buf.keep(&[0; 4], Some(FRAME), &budget, true).unwrap();
        fill(&mut buf, FRAME, &budget).unwrap();
        assert_eq!(budget.queued(), FRAME - UNCHARGED);
    }

    /// Between turns a few bytes hold a few bytes' worth of buffer (see
    /// `trim`); a frame cut by a read boundary keeps room for its rest.
    #[test]
    fn a_buffer_is_trimmed_to_what_it_holds_between_turns() {
        let budget = unlimited();
        let mut buf = ReadBuf::default();
        buf.keep(&[1; 5], Some(1 << 20), &budget, true).unwrap();
        assert!(buf.capacity() >= MIN_READ, "a read's room to start with");
        buf.trim(Some(1 << 20));
        assert_eq!(buf.capacity(), TRIM_MIN);
        assert_eq!(buf.filled(), [1; 5]);
        // The next read grows it again.
        let spare = buf.spare(Some(1 << 20), usize::MAX, &budget).unwrap();
        assert!(spare.len() >= MIN_READ / 4);

        let mut buf = ReadBuf::default();
        buf.keep(&[2; 2000], Some(4100), &budget, true).unwrap();
        buf.trim(Some(4100));
        assert_eq!(buf.capacity(), 4100, "room for the rest of the frame");
        let before = buf.capacity();
        assert!(buf.spare(Some(4100), usize::MAX, &budget).unwrap().len() >= 2100);
        assert_eq!(buf.capacity(), before, "the rest fits without growing");

        // Nothing to gain: left as it is.
        let mut buf = ReadBuf::default();
        buf.keep(&[3; 6000], None, &budget, true).unwrap();
        let before = buf.capacity();
        buf.trim(None);
        assert_eq!(buf.capacity(), before);
    }

    /// An audit's finding: a line of unknown length grew by doubling, so a
    /// 600 KiB line read 1 KiB at a time once asked for 1 MiB of buffer
    /// past the uncharged 16 KiB, and a 1 MiB input budget (room for any
    /// line of `max_line` 1 MiB) refused it. Growth stops at the longest
    /// incomplete line (`max_line + 2`).
    #[test]
    fn a_line_never_grows_past_the_longest_line() {
        const MAX_LINE: usize = 1 << 20;
        let most = MAX_LINE + 2;
        let budget = Arc::new(Budget::new(1 << 20));
        let mut buf = ReadBuf::default();
        buf.keep(&[b'x'; 1024], None, &budget, true).unwrap();
        while buf.len() < 600 << 10 {
            let held = buf.len();
            let spare = buf
                .spare(None, most, &budget)
                .unwrap_or_else(|r| panic!("refused at {held} bytes: {r:?}"));
            let n = spare.len().min(1024);
            spare[..n].fill(b'x');
            buf.commit(n);
            assert!(buf.data.len() <= most, "{} bytes", buf.data.len());
        }
        // And a codec whose longest incomplete frame (13,000 bytes) is
        // shorter than the buffer `keep` made (16 KiB): with 12,900 bytes
        // held the room (3,484) is short of a useful read, but the cap
        // leaves nothing to grow to; the buffer stays as it is (neither
        // shrunk nor grown: sized `size - data.len()` would underflow) and
        // offers its room.
        let mut short = ReadBuf::default();
        short.keep(&[b'y'; 12_900], None, &budget, true).unwrap();
        let room = short.spare(None, 13_000, &budget).unwrap().len();
        assert_eq!((room, short.data.len()), (MIN_READ - 12_900, MIN_READ));
    }
}
