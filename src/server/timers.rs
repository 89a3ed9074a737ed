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
//! full kernel buffer), so the heap is bounded by the connections open plus
//! those closed within one timeout. Lingering sockets share one timer (see
//! `server::linger`).

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

/// The deadlines. See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: Mutex<BinaryHeap<Reverse<(Duration, Timer)>>>,
}

impl Timers {
    /// Schedules `timer` at `at` (on `Sys::now`'s clock).
    /// Returns whether it is now the earliest deadline (a waiting worker
    /// may need to shorten its wait).
    pub(crate) fn schedule(&self, at: Duration, timer: Timer) -> bool {
        let mut heap = self.heap.lock().unwrap_or_else(PoisonError::into_inner);
        heap.push(Reverse((at, timer)));
        heap.peek().is_some_and(|Reverse((first, _))| *first >= at)
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Duration> {
        self.heap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .peek()
            .map(|Reverse((at, _))| *at)
    }

    /// Moves every timer due at `now` to `into`.
    pub(crate) fn take_due(&self, now: Duration, into: &mut Vec<Timer>) {
        let mut heap = self.heap.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Reverse((at, _))) = heap.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, timer))) = heap.pop() {
                into.push(timer);
            }
        }
    }

    /// Timers scheduled (for tests: the heap stays bounded).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
            timers.schedule(ms(30), Timer::AcceptRetry(0)),
            "the first is the earliest"
        );
        assert!(
            timers.schedule(ms(10), Timer::AcceptRetry(0)),
            "a new earliest"
        );
        assert!(
            !timers.schedule(ms(20), Timer::AcceptRetry(0)),
            "not the earliest"
        );
        assert_eq!(timers.next(), Some(ms(10)));
        let mut due = Vec::new();
        timers.take_due(ms(25), &mut due);
        assert_eq!(due.len(), 2);
        assert_eq!(timers.next(), Some(ms(30)));
        assert_eq!(timers.len(), 1);
    }
}
