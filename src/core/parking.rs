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
//! - **`parked` counts the workers inside [`Parking::park`]**, from before
//!   their first check to after their last; it never exceeds the workers
//!   that called it.
//! - **No lost wake-up.** Every change a sleeper waits for (the active
//!   count, the parked count, the stop, which the caller reports with
//!   [`Parking::changed`]) is followed by a bump of `seq` and a wake-up of
//!   every sleeper; a sleeper reads `seq` before it checks, and sleeps only
//!   while `seq` still holds what it read. A change that lands between the
//!   check and the sleep makes the sleep return at once. The bump is a
//!   `SeqCst` read-modify-write after the change and the read a `SeqCst`
//!   load before the check, so a sleeper that reads the bumped value also
//!   sees the change.
//! - **Parking is outside standby's argument.** A worker that parks leaves
//!   `epoll_wait` without coming back to standby's check, so its caller wakes
//!   the standing workers first (see [`crate::core::standby`]).

use super::futex::Futex;
use crate::sync::{AtomicU32, AtomicUsize, Ordering};

/// Which workers may run, and which have parked. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Parking {
    /// Workers with an index below this run; the others park.
    active: AtomicUsize,
    /// Workers inside [`Parking::park`].
    parked: AtomicUsize,
    /// The futex word: bumped after every change a sleeper waits for.
    seq: AtomicU32,
}

impl Default for Parking {
    fn default() -> Self {
        Self::new()
    }
}

impl Parking {
    /// Every worker may run.
    pub(crate) fn new() -> Self {
        Self {
            active: AtomicUsize::new(usize::MAX),
            parked: AtomicUsize::new(0),
            seq: AtomicU32::new(0),
        }
    }

    /// Workers allowed to run now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Workers parked now.
    pub(crate) fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    /// Lets only the first `n` workers run, and wakes the parked ones and the
    /// waiters to look. Workers that must park are the caller's to wake (they
    /// may be in `epoll_wait` or standing by).
    pub(crate) fn set_active<F: Futex>(&self, n: usize, futex: &F) -> Result<(), F::Error> {
        self.active.store(n, Ordering::SeqCst);
        self.changed(futex)
    }

    /// Wakes every sleeper to re-check, after a change it waits for (the
    /// caller's stop).
    pub(crate) fn changed<F: Futex>(&self, futex: &F) -> Result<(), F::Error> {
        self.seq.fetch_add(1, Ordering::SeqCst);
        futex.wake(&self.seq, u32::MAX).map(drop)
    }

    /// Parks worker `index` until it may run again or `stopped()`. On a
    /// futex error (only a bug gets one) it returns early with the error,
    /// still counted out of `parked`.
    pub(crate) fn park<F: Futex>(
        &self,
        index: usize,
        futex: &F,
        stopped: impl Fn() -> bool,
    ) -> Result<(), F::Error> {
        self.parked.fetch_add(1, Ordering::SeqCst);
        let result = self
            .changed(futex)
            .and_then(|()| self.wait_until(futex, || index < self.active() || stopped()));
        let before = self.parked.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "parked count underflow");
        let told = self.changed(futex);
        result.and(told)
    }

    /// Waits until at least `n` workers are parked, or `stopped()`.
    pub(crate) fn wait_parked<F: Futex>(
        &self,
        n: usize,
        futex: &F,
        stopped: impl Fn() -> bool,
    ) -> Result<(), F::Error> {
        self.wait_until(futex, || self.parked() >= n || stopped())
    }

    fn wait_until<F: Futex>(&self, futex: &F, done: impl Fn() -> bool) -> Result<(), F::Error> {
        loop {
            let seq = self.seq.load(Ordering::SeqCst);
            if done() {
                return Ok(());
            }
            futex.wait(&self.seq, seq, None)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::core::futex::testing::Recorder;

    #[test]
    fn an_active_worker_does_not_sleep() {
        crate::sync::model(|| {
            let parking = Parking::new();
            let futex = Recorder::default();
            parking.set_active(2, &futex).unwrap_or_else(|e| match e {});
            parking
                .park(1, &futex, || false)
                .unwrap_or_else(|e| match e {});
            assert!(futex.waits.borrow().is_empty());
            assert_eq!(parking.parked(), 0);
            // Its coming and going is announced, to whoever waits for it.
            assert_eq!(*futex.wakes.borrow(), [u32::MAX; 3]);
        });
    }

    #[test]
    fn a_parked_worker_sleeps_counted_until_stopped() {
        crate::sync::model(|| {
            let parking = Parking::new();
            let futex = Recorder::default();
            parking.set_active(1, &futex).unwrap_or_else(|e| match e {});
            let checks = Cell::new(0);
            let stopped = || {
                checks.set(checks.get() + 1);
                assert_eq!(parking.parked(), 1, "counted while it checks");
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
            parking
                .wait_parked(0, &futex, || false)
                .unwrap_or_else(|e| match e {});
            assert_eq!(futex.waits.borrow().len(), 2, "0 parked: no wait");
        });
    }
}
