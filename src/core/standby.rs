//! Standby: while one worker can carry the load, one worker waits in
//! `epoll_wait` and the others sleep on a futex; a second joins when work
//! piles up.
//!
//! Why: with every worker blocked in `epoll_wait` on the one epoll instance,
//! the kernel hands each new event to a sleeping worker, so at a load one
//! worker could carry alone, every worker wakes often and finds little to do
//! each time; the wake-ups and the cache lines that bounce between cores cost
//! more than the work. (Measured with `ci/bench.sh`, see `BENCHMARKS.md`.)
//!
//! The protocol, for a worker about to wait with no task queued:
//!
//! - A *poller* is a worker in a blocking `epoll_wait` (counted in
//!   `pollers` from just before the call to just after it).
//! - A poller whose wait returned events within `busy_below` (or a
//!   zero-timeout wait that brought events) is *busy*: work arrives faster
//!   than a worker sleeps and wakes, and it wakes one standing-by worker,
//!   which becomes another poller. Under a load that needs every worker,
//!   every worker polls.
//! - A worker that is not busy (its last wait was longer, or brought
//!   nothing) stands by instead of polling if another worker polls.
//!
//! # Invariants
//!
//! - **No event waits for a sleeper.** A worker sleeps in standby only after
//!   announcing itself (`standing`) and then seeing another poller. Suppose
//!   every worker slept: take the one whose check read the latest value of
//!   `pollers` (the argument needs only coherence on `pollers`); the poller
//!   it saw left `epoll_wait` after that check, and its own check, sequenced
//!   after its leaving, read a later value: a contradiction. So some worker
//!   always polls or is on its way back to `epoll_wait`, and an
//!   edge-triggered event stays in the ready list until it does. (A
//!   zero-timeout wait, taken while tasks are queued, does not count as
//!   polling: it only keeps others from sleeping.)
//! - **A worker that leaves** `epoll_wait` without coming back to its own
//!   check (one that parks for `set_active_workers`, or exits) is outside that
//!   argument: it wakes every standing worker first ([`Standby::wake_all`]).
//!   Without that, a worker could stand by on seeing the parker still
//!   polling, and nobody would poll (`tests/standby.rs`,
//!   `parking_a_worker_never_leaves_the_others_asleep`, and the loom model
//!   `standby_liveness_when_a_worker_parks`).
//! - **Timers.** A poller may have computed its timeout before a timer was
//!   set; a standing worker sleeps no longer than the earliest timer, so
//!   some worker always waits with the earliest deadline in mind.
//! - **Stop, drain, `set_active_workers`.** A worker checks them after announcing
//!   itself; whoever changes them then wakes every standing worker
//!   ([`Standby::wake_all`]): either the waker sees the announcement or the
//!   worker sees the change (a `SeqCst` fence on each side). Shared tasks
//!   need no wake-up here: they are queued with a write to the waker
//!   eventfd, which the poller (there always is one) takes.
//! - **No lost wake-up.** A worker reads the futex word before it announces
//!   itself, and every wake-up bumps the word before waking: a wake-up that
//!   comes between the checks and the sleep makes the sleep return at once.
//! - **A slow turn.** The argument above promises a poller *on its way
//!   back*, not how soon: the only poller may take one event (not busy)
//!   and then run a long turn (a slow handler), with events for other
//!   connections waiting in the ready list. So a standing worker sleeps at
//!   most [`RECHECK`], then looks again: it polls if nobody does, and
//!   stands by again otherwise. Another connection's event waits at most
//!   about that long behind a slow turn (`tests/standby.rs`,
//!   `a_slow_turn_on_the_only_poller_does_not_stall_the_other_connections`).
//! - With `IdleWait::Poll` (`busy_below` of `None`) nothing here runs:
//!   every worker polls.
//!
//! Like the rest of the core it makes no syscall of its own: the futex is
//! the caller's [`Futex`] (the server's `Sys`; in `tests/loom.rs`, a futex
//! built on loom's mutex and condition variable). The loom models
//! `standby_liveness_and_stop_*` run this file under two busy policies and
//! fail (a deadlock) if a worker sleeps without seeing a poller, if either
//! fence is removed, or if the word is read after the checks;
//! `standby_liveness_when_a_worker_parks` fails if a parking worker does not
//! wake the standing ones, if `set_active_workers` does not, or if `may`
//! lets a worker told to park stand by.

use std::time::Duration;

use super::futex::Futex;
use crate::sync::{AtomicU32, AtomicUsize, Ordering, fence};

/// The longest a standing worker sleeps before it looks again (see "A
/// slow turn" in the [module docs](self)). Short enough that a slow
/// handler delays other connections by no more than a scheduling quantum
/// or two; long enough that an idle server's standing workers wake a
/// hundred times a second at most (one `futex` call each).
pub(crate) const RECHECK: Duration = Duration::from_millis(10);

/// How [`Standby::stand_by`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stood {
    /// It did not sleep: nobody else polls, or `may` said no.
    No,
    /// It slept, and a wake-up (or a failed wait) ended the sleep: poll.
    Woken,
    /// It slept, and the word is as it read it: the timeout passed, the
    /// futex returned early, or a wake-up whose bump came before this
    /// worker read the word (meant for a worker standing by then) woke it.
    /// The caller tells these apart by the clock: a sleep that ran its
    /// time looks again (standing by again if another worker still polls);
    /// one cut short polls, as woken.
    Quiet,
}

/// The standby state shared by the workers. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Standby {
    /// `None`: every worker polls (`IdleWait::Poll`).
    busy_below: Option<Duration>,
    /// Workers in a blocking `epoll_wait`.
    pollers: AtomicUsize,
    /// Workers standing by, or announced and about to.
    standing: AtomicUsize,
    /// The futex word: bumped by every wake-up, so a sleeper that has not
    /// gone to sleep yet does not miss one.
    seq: AtomicU32,
}

impl Standby {
    /// `busy_below`: `None` when every worker polls.
    pub(crate) fn new(busy_below: Option<Duration>) -> Self {
        Self {
            busy_below,
            pollers: AtomicUsize::new(0),
            standing: AtomicUsize::new(0),
            seq: AtomicU32::new(0),
        }
    }

    /// Whether idle workers stand by at all.
    pub(crate) fn enabled(&self) -> bool {
        self.busy_below.is_some()
    }

    /// A worker enters a blocking `epoll_wait`.
    pub(crate) fn enter_poll(&self) {
        self.pollers.fetch_add(1, Ordering::SeqCst);
    }

    /// A worker left a blocking `epoll_wait`.
    pub(crate) fn leave_poll(&self) {
        let before = self.pollers.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "a poller left that never entered");
    }

    /// Whether a wait that took `waited` (`None`: a zero-timeout wait) and
    /// brought `events` was busy.
    pub(crate) fn is_busy(&self, waited: Option<Duration>, events: usize) -> bool {
        match (self.busy_below, waited) {
            (None, _) => false,
            (Some(_), None) => events > 0,
            (Some(limit), Some(waited)) => events > 0 && waited < limit,
        }
    }

    /// Stands by until woken or `timeout` passes, unless no other worker
    /// polls or `may` (checked after announcing) says no. Returns whether it
    /// slept, and if so whether a wake-up ended the sleep.
    pub(crate) fn stand_by<F: Futex>(
        &self,
        futex: &F,
        timeout: Option<Duration>,
        may: impl FnOnce() -> bool,
    ) -> Stood {
        let seq = self.seq.load(Ordering::SeqCst);
        self.standing.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `wake_all`: the state `may` reads is
        // written before it with weaker orderings.
        fence(Ordering::SeqCst);
        let sleep = self.pollers.load(Ordering::SeqCst) > 0 && may();
        let stood = if !sleep {
            Stood::No
        } else if let Err(error) = futex.wait(&self.seq, seq, timeout) {
            // Only a bug (a bad address) gets here; the caller polls next
            // rather than stand by again at once.
            log::error!("standby: futex_wait: {error}");
            Stood::Woken
        } else if self.seq.load(Ordering::SeqCst) == seq {
            Stood::Quiet
        } else {
            Stood::Woken
        };
        let before = self.standing.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "standing count underflow");
        stood
    }

    /// Wakes one standing worker, if any: there is more work than the
    /// pollers take. Returns whether it woke a sleeper (a worker that has
    /// announced itself but not slept yet sees the bumped word and does not
    /// sleep, and is not counted).
    pub(crate) fn wake_one<F: Futex>(&self, futex: &F) -> bool {
        if self.standing.load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.seq.fetch_add(1, Ordering::SeqCst);
        match futex.wake(&self.seq, 1) {
            Ok(woken) => woken > 0,
            Err(error) => {
                log::error!("standby: futex_wake: {error}");
                false
            }
        }
    }

    /// Wakes every standing worker (stop, drain, `set_active_workers`). Call after
    /// making the change they must see.
    pub(crate) fn wake_all<F: Futex>(&self, futex: &F) {
        fence(Ordering::SeqCst);
        if !self.enabled() || self.standing.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.seq.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = futex.wake(&self.seq, u32::MAX) {
            log::error!("standby: futex_wake (all): {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::futex::testing::Recorder;

    #[test]
    fn busy_means_events_within_the_threshold() {
        crate::sync::model(|| {
            let us = Duration::from_micros;
            let standby = Standby::new(Some(us(200)));
            assert!(standby.is_busy(Some(us(199)), 1));
            assert!(!standby.is_busy(Some(us(200)), 1), "the bound is exclusive");
            assert!(!standby.is_busy(Some(us(10)), 0), "no events, not busy");
            assert!(standby.is_busy(None, 3), "a zero-timeout wait with events");
            let poll = Standby::new(None);
            assert!(!poll.enabled());
            assert!(!poll.is_busy(Some(us(1)), 5), "every worker polls anyway");
        });
    }

    #[test]
    fn no_worker_stands_by_unless_another_polls() {
        crate::sync::model(|| {
            let standby = Standby::new(Some(Duration::ZERO));
            let futex = Recorder::default();
            let stood = standby.stand_by(&futex, None, || panic!("asked with nobody polling"));
            assert_eq!(stood, Stood::No);
            assert!(futex.waits.borrow().is_empty());
            assert_eq!(standby.standing.load(Ordering::SeqCst), 0);
        });
    }

    #[test]
    fn a_worker_stands_by_while_another_polls_unless_told_not_to() {
        crate::sync::model(|| {
            let standby = Standby::new(Some(Duration::ZERO));
            let futex = Recorder::default();
            standby.enter_poll();
            assert_eq!(
                standby.stand_by(&futex, None, || false),
                Stood::No,
                "`may` said no"
            );
            assert!(futex.waits.borrow().is_empty());
            // The recorder's wait returns at once, and nobody bumped the word.
            assert_eq!(standby.stand_by(&futex, None, || true), Stood::Quiet);
            // It sleeps on the word's value from before it announced itself.
            assert_eq!(*futex.waits.borrow(), [0]);
            assert_eq!(standby.standing.load(Ordering::SeqCst), 0);
            standby.leave_poll();
        });
    }

    /// A futex whose wait returns as if a wake-up had come: it bumps the
    /// word first.
    struct WokenAtOnce;

    impl Futex for WokenAtOnce {
        type Error = std::convert::Infallible;

        fn wait(&self, word: &AtomicU32, _: u32, _: Option<Duration>) -> Result<(), Self::Error> {
            word.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn wake(&self, _: &AtomicU32, _: u32) -> Result<usize, Self::Error> {
            Ok(0)
        }
    }

    #[test]
    fn a_sleep_ended_by_a_wake_up_is_told_from_a_quiet_one() {
        crate::sync::model(|| {
            let standby = Standby::new(Some(Duration::ZERO));
            standby.enter_poll();
            assert_eq!(standby.stand_by(&WokenAtOnce, None, || true), Stood::Woken);
            assert_eq!(
                standby.stand_by(&Recorder::default(), None, || true),
                Stood::Quiet
            );
            standby.leave_poll();
        });
    }

    #[test]
    fn wake_ups_bump_the_word_only_when_someone_stands_by() {
        crate::sync::model(|| {
            let standby = Standby::new(Some(Duration::ZERO));
            let futex = Recorder::default();
            assert!(!standby.wake_one(&futex));
            standby.wake_all(&futex);
            assert!(futex.wakes.borrow().is_empty());
            assert_eq!(standby.seq.load(Ordering::SeqCst), 0);
            // Announced (as between `standing` and the sleep).
            standby.standing.fetch_add(1, Ordering::SeqCst);
            assert!(!standby.wake_one(&futex), "the recorder woke nobody");
            standby.wake_all(&futex);
            assert_eq!(*futex.wakes.borrow(), [1, u32::MAX]);
            assert_eq!(standby.seq.load(Ordering::SeqCst), 2);
            standby.standing.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
