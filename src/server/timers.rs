//! Timers, without a thread or a timerfd: a heap of deadlines that the
//! workers turn into `epoll_wait` timeouts.
//!
//! A worker about to wait asks for the earliest deadline and waits no longer
//! than that; after its batch it pops what is due and acts on it. Timers are
//! scheduled through `Shared::schedule_timer`: a worker is about to wait
//! again and looks then; any other thread (a `connect`) wakes a poller when
//! its timer is the new earliest, so some worker always waits with the
//! earliest deadline in mind.
//!
//! Per-connection timers are cancelled in O(1) by doing nothing: an entry
//! names its connection by `(slot, generation)`, and one whose connection is
//! gone is dropped when it fires. A connection has at most one idle entry
//! (re-armed when it fires early), one frame entry (armed while it holds an
//! incomplete frame) and one send entry (armed while its output waits on a
//! full kernel buffer). Lingering sockets share one timer (see
//! `server::linger`), and each listener has at most one retry.
//!
//! Left at that, the entries of closed connections would wait out their
//! timeouts: peers opening and resetting connections at 20,000 a second
//! against an hour's idle timeout would grow the heap by 72 million
//! entries. So the heap is compacted: a push that finds it at its
//! compaction mark first drops every entry whose connection is gone (what
//! firing would do), then sets the mark at twice what is left (at least
//! [`COMPACT_FLOOR`]). Invariant: the heap never holds more than
//! `max(COMPACT_FLOOR, 2 x the live entries at the last compaction)`, and
//! the live entries are bounded by the connections open (three each) plus
//! the listeners and one; compacting costs O(1) per push, amortised.
//!
//! The price is a pause: a compaction scans every entry (a look at its
//! slot's state word) under the heap's lock, which every worker takes
//! before it waits, so at very large connection counts all workers stall
//! for the scan, once per as many pushes as it keeps entries. Filtering
//! outside the lock would need the scanned deadlines kept visible to
//! `next` meanwhile; not done.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::core::ConnId;

/// What a timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Try the listeners again after listener `.0`'s accept failed with an
    /// error that does not concern one connection only (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM, or one not known): no edge will announce the
    /// connections already pending. One at a time per listener.
    AcceptRetry(usize),
    /// Check a connection for inactivity.
    Idle(ConnId),
    /// Check a connection for a frame left incomplete too long.
    Frame(ConnId),
    /// Check a connection for output that the kernel stopped taking: the
    /// mark is the queue's bytes taken when the timer was armed.
    Send(ConnId, u64),
    /// End the lingering closes whose time has run out (one such timer at a
    /// time; see `server::linger`).
    Linger,
}

/// The heap is compacted no sooner than at this many entries.
pub(crate) const COMPACT_FLOOR: usize = 1024;

/// The deadlines. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Timers {
    heap: Mutex<Heap>,
}

#[derive(Debug)]
struct Heap {
    entries: BinaryHeap<Reverse<(Duration, Timer)>>,
    /// A push that finds this many entries compacts first.
    compact_at: usize,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            heap: Mutex::new(Heap {
                entries: BinaryHeap::new(),
                compact_at: COMPACT_FLOOR,
            }),
        }
    }
}

impl Timer {
    /// The connection a per-connection timer is for.
    pub(crate) fn conn(&self) -> Option<ConnId> {
        match *self {
            Timer::Idle(id) | Timer::Frame(id) | Timer::Send(id, _) => Some(id),
            Timer::AcceptRetry(_) | Timer::Linger => None,
        }
    }
}

impl Timers {
    /// Schedules `timer` at `at` (on `Sys::now`'s clock). `is_open` says
    /// whether a connection is still open; if the heap is at its mark, the
    /// entries of connections that are not are dropped first.
    /// Returns whether it is now the earliest deadline (a waiting worker
    /// may need to shorten its wait).
    pub(crate) fn schedule(
        &self,
        at: Duration,
        timer: Timer,
        is_open: impl Fn(ConnId) -> bool,
    ) -> bool {
        let mut heap = self.heap.lock().unwrap_or_else(PoisonError::into_inner);
        if heap.entries.len() >= heap.compact_at {
            // Firing would drop them: a closed connection never reopens
            // under the same generation.
            heap.entries
                .retain(|Reverse((_, timer))| timer.conn().is_none_or(&is_open));
            heap.compact_at = (2 * heap.entries.len()).max(COMPACT_FLOOR);
        }
        heap.entries.push(Reverse((at, timer)));
        debug_assert!(heap.entries.len() <= heap.compact_at);
        heap.entries
            .peek()
            .is_some_and(|Reverse((first, _))| *first >= at)
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Duration> {
        self.heap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .peek()
            .map(|Reverse((at, _))| *at)
    }

    /// Moves every timer due at `now` to `into`.
    pub(crate) fn take_due(&self, now: Duration, into: &mut Vec<Timer>) {
        let heap = &mut self
            .heap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries;
        while let Some(Reverse((at, _))) = heap.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, timer))) = heap.pop() {
                into.push(timer);
            }
        }
    }

    /// Entries in the heap, those of closed connections not yet dropped
    /// included (`Stats::timers`).
    pub(crate) fn len(&self) -> usize {
        self.heap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_out_in_deadline_order() {
        let timers = Timers::default();
        let ms = Duration::from_millis;
        assert!(
            timers.schedule(ms(30), Timer::AcceptRetry(0), |_| true),
            "the first is the earliest"
        );
        assert!(
            timers.schedule(ms(10), Timer::AcceptRetry(0), |_| true),
            "a new earliest"
        );
        assert!(
            !timers.schedule(ms(20), Timer::AcceptRetry(0), |_| true),
            "not the earliest"
        );
        assert_eq!(timers.next(), Some(ms(10)));
        let mut due = Vec::new();
        timers.take_due(ms(25), &mut due);
        assert_eq!(due.len(), 2);
        assert_eq!(timers.next(), Some(ms(30)));
        assert_eq!(timers.len(), 1);
    }

    /// Connections opened and closed with long timeouts pending: the
    /// entries of the closed ones are dropped when the heap reaches its
    /// mark, the open ones' and the others kept, so the heap stays within
    /// twice the live entries (or the floor) however many connections
    /// come and go.
    #[test]
    fn entries_of_closed_connections_are_compacted_away() {
        let timers = Timers::default();
        let hour = Duration::from_secs(3600);
        // Slot 0 stays open (its generation 1); every other connection
        // closes at once.
        let open = |id: ConnId| id.slot() == 0 && id.generation() == 1;
        let kept = ConnId::new(0, 1);
        timers.schedule(hour, Timer::Idle(kept), open);
        timers.schedule(hour, Timer::Frame(kept), open);
        timers.schedule(hour, Timer::AcceptRetry(0), open);
        timers.schedule(hour, Timer::Linger, open);
        let mut most = 0;
        for n in 0..100_000u32 {
            let gone = ConnId::new(1 + n % 500, n / 500 + 1);
            timers.schedule(hour, Timer::Idle(gone), open);
            timers.schedule(hour, Timer::Send(gone, 0), open);
            most = most.max(timers.len());
        }
        assert!(most <= COMPACT_FLOOR, "the heap reached {most} entries");
        // What is left: the four live ones, and closed ones since the last
        // compaction; firing them all returns the live ones intact.
        let mut due = Vec::new();
        timers.take_due(hour, &mut due);
        for live in [
            Timer::Idle(kept),
            Timer::Frame(kept),
            Timer::AcceptRetry(0),
            Timer::Linger,
        ] {
            assert_eq!(due.iter().filter(|t| **t == live).count(), 1, "{live:?}");
        }
    }

    /// Live entries are never dropped, and the mark rises with them: with
    /// more live entries than the floor, compaction still leaves each
    /// push O(1) amortised (the heap doubles between compactions).
    #[test]
    fn live_entries_past_the_floor_raise_the_mark() {
        let timers = Timers::default();
        let at = Duration::from_secs(1);
        let live = 3 * COMPACT_FLOOR;
        for slot in 0..live as u32 {
            timers.schedule(at, Timer::Idle(ConnId::new(slot, 1)), |_| true);
        }
        assert_eq!(timers.len(), live);
        let mut due = Vec::new();
        timers.take_due(at, &mut due);
        assert_eq!(due.len(), live);
    }
}
