//! The futex, as the core sees it: a word to sleep on while it holds a
//! value, and a wake-up. The core never makes the call itself: the server
//! passes its `Sys` (Linux, or the simulated kernel, which turns a sleep into
//! a scheduling point), and `tests/loom.rs` passes a futex built on loom's
//! mutex and condition variable.
//!
//! # Contract
//!
//! - The compare in [`Futex::wait`] and the sleep are one step with respect
//!   to [`Futex::wake`] on the same word: a sleeper that compared before a
//!   waker's bump is asleep when the waker looks, so it is woken. Every user
//!   bumps the word before waking, and reads it before checking what it
//!   waits for; so no wake-up is lost between the check and the sleep.
//! - A wait may return without a wake-up (a signal, a changed word, a
//!   timeout): every user re-checks in a loop.

use std::time::Duration;

use crate::sync::AtomicU32;

/// The two futex operations the core needs, with Linux's semantics.
pub(crate) trait Futex {
    /// What a failed call reports.
    type Error: std::fmt::Display;
    /// Sleeps while `word` holds `expected` (compared atomically with
    /// respect to [`Futex::wake`]), until woken or `timeout` passes. A
    /// return without a wake-up is allowed: callers re-check.
    fn wait(
        &self,
        word: &AtomicU32,
        expected: u32,
        timeout: Option<Duration>,
    ) -> Result<(), Self::Error>;
    /// Wakes up to `n` threads sleeping on `word`; returns how many it woke.
    fn wake(&self, word: &AtomicU32, n: u32) -> Result<usize, Self::Error>;
}

/// A futex for single-threaded unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::RefCell;
    use std::time::Duration;

    use super::Futex;
    use crate::sync::AtomicU32;

    /// Records the calls; a wait returns at once (allowed: callers re-check)
    /// and a wake-up wakes nobody.
    #[derive(Default)]
    pub(crate) struct Recorder {
        /// The `expected` value of each wait.
        pub(crate) waits: RefCell<Vec<u32>>,
        /// The `n` of each wake-up.
        pub(crate) wakes: RefCell<Vec<u32>>,
    }

    impl Futex for Recorder {
        type Error = std::convert::Infallible;

        fn wait(
            &self,
            _word: &AtomicU32,
            expected: u32,
            _timeout: Option<Duration>,
        ) -> Result<(), Self::Error> {
            self.waits.borrow_mut().push(expected);
            Ok(())
        }

        fn wake(&self, _word: &AtomicU32, n: u32) -> Result<usize, Self::Error> {
            self.wakes.borrow_mut().push(n);
            Ok(0)
        }
    }
}
