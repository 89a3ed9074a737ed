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
//!   every worker slept: take the one whose check came last in the
//!   modification order of `pollers`; the poller it saw left `epoll_wait`
//!   after that check, and its own check, sequenced after its leaving,
//!   read a later value: a contradiction. So some worker always polls or is
//!   on its way back to `epoll_wait`, and an edge-triggered event stays in the
//!   ready list until it does.
//! - **Timers.** A poller may have computed its timeout before a timer was
//!   set; a standing worker sleeps no longer than the earliest timer, so
//!   some worker always waits with the earliest deadline in mind.
//! - **Stop, drain, `set_workers`, shared tasks.** A worker checks them after
//!   announcing itself; whoever changes them then wakes every standing
//!   worker ([`Standby::wake_all`]): either the waker sees the announcement
//!   or the worker sees the change (both sides are `SeqCst`).
//! - With [`IdleWait::Poll`] nothing here runs: every worker polls.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence};
use std::time::Duration;

use super::config::IdleWait;
use crate::sys::Sys;

/// The standby state shared by the workers. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Standby {
    /// `None`: every worker polls ([`IdleWait::Poll`]).
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
    pub(crate) fn new(idle_wait: IdleWait) -> Self {
        Self {
            busy_below: match idle_wait {
                IdleWait::Poll => None,
                IdleWait::Standby { busy_below } => Some(busy_below),
            },
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
    /// slept.
    pub(crate) fn stand_by<S: Sys>(
        &self,
        sys: &S,
        timeout: Option<Duration>,
        may: impl FnOnce() -> bool,
    ) -> bool {
        let seq = self.seq.load(Ordering::SeqCst);
        self.standing.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `wake_all`: the state `may` reads is
        // written before it with weaker orderings.
        fence(Ordering::SeqCst);
        let sleep = self.pollers.load(Ordering::SeqCst) > 0 && may();
        if sleep {
            if let Err(errno) = sys.futex_wait(&self.seq, seq, timeout) {
                // Only a bug (a bad address) gets here; the caller polls next.
                log::error!("standby: futex_wait: {errno}");
            }
        }
        let before = self.standing.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "standing count underflow");
        sleep
    }

    /// Wakes one standing worker, if any: there is more work than the
    /// pollers take. Returns whether it woke a sleeper (a worker that has
    /// announced itself but not slept yet sees the bumped word and does not
    /// sleep, and is not counted).
    pub(crate) fn wake_one<S: Sys>(&self, sys: &S) -> bool {
        if self.standing.load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.seq.fetch_add(1, Ordering::SeqCst);
        match sys.futex_wake(&self.seq, 1) {
            Ok(woken) => woken > 0,
            Err(errno) => {
                log::error!("standby: futex_wake: {errno}");
                false
            }
        }
    }

    /// Wakes every standing worker (stop, drain, `set_workers`). Call after
    /// making the change they must see.
    pub(crate) fn wake_all<S: Sys>(&self, sys: &S) {
        fence(Ordering::SeqCst);
        if !self.enabled() || self.standing.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.seq.fetch_add(1, Ordering::SeqCst);
        if let Err(errno) = sys.futex_wake(&self.seq, u32::MAX).map(drop) {
            log::error!("standby: futex_wake (all): {errno}");
        }
    }
}
