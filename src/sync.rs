//! The one switch between `std` and `loom` synchronisation types.
//!
//! Everything in [`crate::core`] reaches atomics, mutexes and cells through this
//! module, never through `std` directly. A normal build uses `std`; a build with
//! `RUSTFLAGS="--cfg loom"` (see `ci/loom.sh`) uses loom's model-checked types.
//! The loom tests in `tests/loom.rs` compile the same core source files a
//! second time against their own loom-backed `sync` module (`#[path]`
//! includes), so plain `cargo test` model-checks the production code.
//!
//! `UnsafeCell` follows loom's closure API (`with` / `with_mut`) in both
//! builds, so code that touches a cell is written once and loom can see every
//! access.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// `std::cell::UnsafeCell` behind loom's closure API.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Locks `mutex`, ignoring poisoning.
///
/// No code in this crate runs user callbacks while holding one of its own
/// mutexes, so a poisoned lock can only come from a bug in a short critical
/// section that left the data consistent (they never hold a half-done update
/// across a call that can panic); refusing service forever would be worse.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Runs a test body: directly with `std`, as a loom model under `--cfg loom`
/// (and in the loom harness, which defines its own `model`). The core's unit
/// tests go through it, so the same assertions run under both.
#[cfg(all(test, not(loom)))]
pub(crate) fn model(body: impl Fn() + Sync + Send + 'static) {
    body();
}

/// See the `std` version.
#[cfg(all(test, loom))]
pub(crate) fn model(body: impl Fn() + Sync + Send + 'static) {
    loom::model(body);
}
