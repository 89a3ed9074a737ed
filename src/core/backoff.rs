//! One listener's accept backoff: when to try a listener again after its
//! `accept` failed, and whether accept turns pass it over meanwhile.
//!
//! The wait is 10 ms, doubling to 1 s, and only the listener's own success
//! starts it over. A listener that failed for a reason of its own (not
//! exhaustion, which a freed slot or descriptor may end sooner) *rests*:
//! the turns that other listeners' connections bring pass it over until its
//! retry comes.
//!
//! # Invariants
//!
//! - **One mutator.** Everything but `due` changes only in an accept turn,
//!   under the listeners' ownership word (one acceptor at a time, the word
//!   ordering one after the next): [`AcceptBackoff::failed`],
//!   [`AcceptBackoff::take_due`], [`AcceptBackoff::succeeded`]. The retry
//!   timer, on any worker, only marks the retry due
//!   ([`AcceptBackoff::fired`]) and then asks for an accept turn. (A first
//!   version cleared the flags from the timer's thread: a failure on the
//!   acceptor between its two stores left the listener resting with no
//!   retry coming, passed over for good. Found in review; the loom model
//!   `a_listener_failing_as_its_retry_fires_is_never_left_resting` replays
//!   it.)
//! - **A resting listener has a retry coming**: `resting` is set only by a
//!   failure that claims the retry or finds it claimed (`pending`), and
//!   `pending` is cleared only when a turn takes the retry's `due` mark,
//!   which clears `resting` in the same step.
//! - At most one retry per listener is pending.

use std::time::Duration;

use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// The first and the longest wait before retrying a listener whose
/// `accept` failed for want of descriptors or memory, or for a reason not
/// known (doubling in between).
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One listener's accept backoff. See the [module docs](self).
///
/// Relaxed, every field but `due`: only the acceptor touches them, and the
/// ownership word orders one acceptor after the last.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// The current wait, in milliseconds (0: the last accept succeeded).
    ms: AtomicU64,
    /// A retry is scheduled and its due mark not yet taken.
    pending: AtomicBool,
    /// Passed over by accept turns until the retry's due mark is taken.
    resting: AtomicBool,
    /// The retry's timer fired (set by any worker, taken by the acceptor).
    due: AtomicBool,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl AcceptBackoff {
    /// A listener that has not failed.
    pub fn new() -> Self {
        Self {
            ms: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            resting: AtomicBool::new(false),
            due: AtomicBool::new(false),
        }
    }

    /// The listener failed (acceptor only): the wait before its retry, to
    /// schedule, or `None` if one is already pending. `rest`: pass the
    /// listener over until then.
    pub fn failed(&self, rest: bool) -> Option<Duration> {
        if rest {
            self.resting.store(true, Ordering::Relaxed);
        }
        if self.pending.load(Ordering::Relaxed) {
            return None;
        }
        self.pending.store(true, Ordering::Relaxed);
        let min = BACKOFF_MIN.as_millis() as u64;
        let max = BACKOFF_MAX.as_millis() as u64;
        let ms = (self.ms.load(Ordering::Relaxed) * 2).clamp(min, max);
        self.ms.store(ms, Ordering::Relaxed);
        Some(Duration::from_millis(ms))
    }

    /// The retry's timer fired (any thread): the next accept turn takes it.
    /// The caller then asks for an accept turn.
    pub fn fired(&self) {
        // Release: pairs with `take_due`. (The turn asked for is ordered
        // after this by the ownership word anyway.) A swap, not a store:
        // loom loses a store that races a swap (tokio-rs/loom#254), as the
        // slot's timer flags note too.
        self.due.swap(true, Ordering::Release);
    }

    /// At the start of an accept turn (acceptor only): a retry that came
    /// ends the rest, and a new one may be scheduled.
    pub fn take_due(&self) {
        if self.due.swap(false, Ordering::AcqRel) {
            self.pending.store(false, Ordering::Relaxed);
            self.resting.store(false, Ordering::Relaxed);
        }
    }

    /// An accept succeeded (acceptor only): the next failure waits the
    /// shortest time.
    pub fn succeeded(&self) {
        if self.ms.load(Ordering::Relaxed) != 0 {
            self.ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether accept turns pass the listener over for now.
    pub fn is_resting(&self) -> bool {
        let resting = self.resting.load(Ordering::Relaxed);
        debug_assert!(
            !resting || self.pending.load(Ordering::Relaxed),
            "resting with no retry coming"
        );
        resting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listeners_backoff_doubles_to_a_second_and_only_its_success_starts_it_over() {
        crate::sync::model(|| {
            let backoff = AcceptBackoff::new();
            let ms = Duration::from_millis;
            let mut waits = Vec::new();
            for _ in 0..9 {
                waits.push(backoff.failed(false).expect("a retry"));
                assert_eq!(backoff.failed(false), None, "one retry at a time");
                backoff.fired();
                backoff.take_due();
            }
            let expected: Vec<Duration> = [10, 20, 40, 80, 160, 320, 640, 1000, 1000]
                .into_iter()
                .map(ms)
                .collect();
            assert_eq!(waits, expected);
            backoff.succeeded();
            assert_eq!(backoff.failed(false), Some(ms(10)));
        });
    }

    #[test]
    fn a_listener_rests_until_a_turn_takes_its_retry() {
        crate::sync::model(|| {
            let backoff = AcceptBackoff::new();
            // Exhaustion: a freed slot may end it sooner, so no rest.
            assert!(backoff.failed(false).is_some());
            assert!(!backoff.is_resting());
            // Its own failure while a retry is pending: it rests until then.
            assert_eq!(backoff.failed(true), None);
            assert!(backoff.is_resting());
            // The timer alone changes nothing the acceptor reads...
            backoff.fired();
            assert!(backoff.is_resting());
            // ...until a turn takes the retry.
            backoff.take_due();
            assert!(!backoff.is_resting());
            assert!(backoff.failed(true).is_some(), "a new retry");
        });
    }
}
