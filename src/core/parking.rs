//! Parking: `ServerHandle::set_active_workers(n)` lets only the first `n`
//! workers run; the others park until the count is raised or the server
//! stops, and a caller may wait until a number of them have parked
//! (`with_workers_parked`).
//!
//! Parked workers and waiters sleep on one futex word through the caller's
//! [`Futex`], like standby, so that the simulated kernel schedules them (a
//! worker parked on a `std` condition variable would hold the simulation's
//! baton forever) and the loom model `standby_liveness_when_a_worker_parks`
//! runs this file.
//!
//! # Invariants
//!
//! - **A worker's `parked` flag is set exactly while it is inside
//!   [`Parking::park`]**, from before its first check to after its last. A
//!   worker that must park and has no flag set ([`Parking::pending`]) is
//!   still in the event loop, and will look at the active count before its
//!   next `epoll_wait` once woken.
//! - **No lost wake-up.** Every change a sleeper waits for (the active
//!   count, the parked flags, the stop or drain, which the caller reports
//!   with [`Parking::changed`]) is followed by a bump of `seq` and a wake-up of
//!   every sleeper; a sleeper reads `seq` before it checks, and sleeps only
//!   while `seq` still holds what it read. A change that lands between the
//!   check and the sleep makes the sleep return at once. The bump is a
//!   `SeqCst` read-modify-write after the change and the read a `SeqCst`
//!   load before the check, so a sleeper that reads the bumped value also
//!   sees the change. The wake-up call is skipped when no thread is
//!   counted in `sleepers`: a sleeper counts itself before it reads the
//!   word and the waker bumps the word before it reads the count, with a
//!   `SeqCst` fence between on each side, so one the waker did not count
//!   reads the bump. (The fences, not `SeqCst` accesses alone, because loom
//!   checks fences; the loom model deadlocks without either.)
//! - **Parking is outside standby's argument.** A worker that parks leaves
//!   `epoll_wait` without coming back to standby's check, so its caller wakes
//!   the standing workers first (see [`crate::core::standby`]).

use super::futex::Futex;
use crate::sync::{AtomicBool, AtomicU32, AtomicUsize, Ordering, fence};

/// Which workers may run, and which have parked. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Parking {
    /// Workers with an index below this run; the others park.
    active: AtomicUsize,
    /// Per worker index: inside [`Parking::park`]. Flags rather than a
    /// count, so that a worker on its way out of `park` (seen as parked
    /// until it leaves) is told apart from one that must still park.
    parked: Box<[AtomicBool]>,
    /// The futex word: bumped after every change a sleeper waits for.
    seq: AtomicU32,
    /// Threads in [`Parking::wait_until`]: a change with none skips the
    /// wake-up call (on the simulated kernel, a scheduling point).
    sleepers: AtomicUsize,
}

impl Parking {
    /// Every one of `workers` may run.
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            active: AtomicUsize::new(usize::MAX),
            parked: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            seq: AtomicU32::new(0),
            sleepers: AtomicUsize::new(0),
        }
    }

    /// Sets the active count before any worker runs: nobody sleeps yet, so
    /// no wake-up (which, on the simulated kernel, would be a scheduling
    /// point and shift every seed's schedule).
    #[cfg(test)]
    pub(crate) fn init_active(&self, n: usize) {
        self.active.store(n, Ordering::SeqCst);
    }

    /// The workers start: `n` may run, unless a count was set before (a
    /// server started paused), which holds. No wake-up: nobody sleeps yet
    /// (and on the simulated kernel a wake-up is a scheduling point, which
    /// would shift every seed's schedule).
    pub(crate) fn start(&self, n: usize) {
        let _ = self
            .active
            .compare_exchange(usize::MAX, n, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The workers configured (started or not).
    pub(crate) fn workers(&self) -> usize {
        self.parked.len()
    }

    /// Workers allowed to run now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Workers parked now (including any on its way out).
    pub(crate) fn parked(&self) -> usize {
        self.parked
            .iter()
            .filter(|flag| flag.load(Ordering::SeqCst))
            .count()
    }

    /// Whether a worker that must park (index at or past the active count)
    /// is not parked.
    pub(crate) fn pending(&self) -> bool {
        self.parked
            .iter()
            .skip(self.active())
            .any(|flag| !flag.load(Ordering::SeqCst))
    }

    /// Lets only the first `n` workers run, and wakes the parked ones and the
    /// waiters to look. Workers that must park are the caller's to wake (they
    /// may be in `epoll_wait` or standing by).
    // The server stores the count under its section lock and wakes after
    // (`store_active`, `changed`); the loom models use this one step.
    #[cfg_attr(not(loom), allow(dead_code))]
    pub(crate) fn set_active<F: Futex>(&self, n: usize, futex: &F) -> Result<(), F::Error> {
        self.store_active(n);
        self.changed(futex)
    }

    /// Sets the count without waking anyone: the caller calls
    /// [`Parking::changed`] next (outside a lock it holds, say).
    pub(crate) fn store_active(&self, n: usize) {
        self.active.store(n, Ordering::SeqCst);
    }

    /// Wakes every sleeper to re-check, after a change it waits for (the
    /// caller's stop or drain).
    pub(crate) fn changed<F: Futex>(&self, futex: &F) -> Result<(), F::Error> {
        self.seq.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `wait_until` (store buffering: the bump
        // and the sleeper's count cannot both go unseen). A sleeper that is
        // not counted here reads the word after this bump, so it sees the
        // change and does not sleep.
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        futex.wake(&self.seq, u32::MAX).map(drop)
    }

    /// Parks worker `index` until it may run again or `released()` (the
    /// caller's stop or drain). On a futex error (only a bug gets one) it
    /// returns early with the error, no longer counted as parked.
    pub(crate) fn park<F: Futex>(
        &self,
        index: usize,
        futex: &F,
        released: impl Fn() -> bool,
    ) -> Result<(), F::Error> {
        let Some(flag) = self.parked.get(index) else {
            debug_assert!(false, "worker {index} of {}", self.parked.len());
            return Ok(());
        };
        let was = flag.swap(true, Ordering::SeqCst);
        debug_assert!(!was, "worker {index} parked twice");
        let result = self
            .changed(futex)
            .and_then(|()| self.wait_until(futex, || index < self.active() || released()));
        flag.store(false, Ordering::SeqCst);
        let told = self.changed(futex);
        result.and(told)
    }

    /// Waits until at least `n` workers are parked, or `released()`.
    pub(crate) fn wait_parked<F: Futex>(
        &self,
        n: usize,
        futex: &F,
        released: impl Fn() -> bool,
    ) -> Result<(), F::Error> {
        self.wait_until(futex, || self.parked() >= n || released())
    }

    fn wait_until<F: Futex>(&self, futex: &F, done: impl Fn() -> bool) -> Result<(), F::Error> {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let result = loop {
            let seq = self.seq.load(Ordering::SeqCst);
            if done() {
                break Ok(());
            }
            if let Err(error) = futex.wait(&self.seq, seq, None) {
                break Err(error);
            }
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::core::futex::testing::Recorder;

    #[test]
    fn pending_means_a_worker_that_must_park_is_not_parked() {
        crate::sync::model(|| {
            let parking = Parking::new(3);
            assert!(!parking.pending(), "every worker may run");
            parking.init_active(1);
            assert!(parking.pending());
            // Worker 1 parked, or on its way out: worker 2 still must park.
            parking.parked[1].store(true, Ordering::SeqCst);
            assert!(parking.pending());
            assert_eq!(parking.parked(), 1);
            // Raised to 2 while worker 1 is on its way out: worker 2 is
            // still pending though as many are flagged as must park.
            parking.init_active(2);
            assert!(parking.pending());
            parking.parked[2].store(true, Ordering::SeqCst);
            assert!(!parking.pending());
            parking.init_active(0);
            assert!(parking.pending(), "worker 0 is not parked");
        });
    }

    #[test]
    fn an_active_worker_does_not_sleep() {
        crate::sync::model(|| {
            let parking = Parking::new(2);
            let futex = Recorder::default();
            parking.set_active(2, &futex).unwrap_or_else(|e| match e {});
            parking
                .park(1, &futex, || false)
                .unwrap_or_else(|e| match e {});
            assert!(futex.waits.borrow().is_empty());
            assert_eq!(parking.parked(), 0);
            // Its coming and going bump the word; with nobody asleep, no
            // wake-up call.
            assert_eq!(parking.seq.load(Ordering::SeqCst), 3);
            assert!(futex.wakes.borrow().is_empty());
            // With a sleeper counted, a change wakes every sleeper.
            parking.sleepers.store(1, Ordering::SeqCst);
            parking.changed(&futex).unwrap_or_else(|e| match e {});
            assert_eq!(*futex.wakes.borrow(), [u32::MAX]);
        });
    }

    #[test]
    fn a_parked_worker_sleeps_counted_until_stopped() {
        crate::sync::model(|| {
            let parking = Parking::new(2);
            let futex = Recorder::default();
            parking.set_active(1, &futex).unwrap_or_else(|e| match e {});
            let checks = Cell::new(0);
            let stopped = || {
                checks.set(checks.get() + 1);
                assert_eq!(parking.parked(), 1, "counted while it checks");
                assert_eq!(parking.sleepers.load(Ordering::SeqCst), 1);
                checks.get() > 2
            };
            parking
                .park(1, &futex, stopped)
                .unwrap_or_else(|e| match e {});
            assert_eq!(checks.get(), 3);
            // Each sleep on the word's value read before its check: the
            // set_active bump (1), the park's own (2).
            assert_eq!(*futex.waits.borrow(), [2, 2]);
            assert_eq!(parking.parked(), 0);
            assert_eq!(parking.sleepers.load(Ordering::SeqCst), 0);
            parking
                .wait_parked(0, &futex, || false)
                .unwrap_or_else(|e| match e {});
            assert_eq!(futex.waits.borrow().len(), 2, "0 parked: no wait");
        });
    }
}
