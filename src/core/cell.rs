//! Data owned by whichever thread holds one side of a connection.
//!
//! The reader's buffers and the handler's per-connection state belong to the
//! read side; the writer's in-flight messages and its EPOLLOUT flag belong to
//! the write side. Neither needs a lock: the ownership word in
//! [`super::state`] already guarantees a single owner (invariants R and W), and
//! an [`OwnerCell`] only opens for a caller that shows the proof of ownership
//! ([`ReadOwner`], [`WriteOwner`] or [`Reclaimer`]).
//!
//! This is one of the two places in the crate with `unsafe` (the other is
//! the Linux syscall layer). Its soundness is the correctness of the
//! ownership word, which the loom models in `tests/loom.rs` check (loom's
//! `UnsafeCell` reports any two accesses that are not ordered by the word's
//! acquire/release pairs), and that every cell is opened with the proof of
//! its own slot, which only this crate's callers can promise: the module is
//! not public. (It was, and an audit showed safe code outside the crate
//! could open a cell with a proof from another slot, or nest two opens.)
#![allow(unsafe_code)]

use std::marker::PhantomData;

use super::state::{ReadOwner, Reclaimer, WriteOwner};
use crate::sync::UnsafeCell;

/// Marker for data owned by the read side.
#[derive(Debug)]
pub enum ReadSide {}

/// Marker for data owned by the write side.
#[derive(Debug)]
pub enum WriteSide {}

/// A proof of ownership of side `S` of the slot whose cell is being opened.
pub trait Holds<S> {}

impl Holds<ReadSide> for ReadOwner<'_> {}
impl Holds<WriteSide> for WriteOwner<'_> {}
impl Holds<ReadSide> for Reclaimer<'_> {}
impl Holds<WriteSide> for Reclaimer<'_> {}

/// A value that only the owner of side `S` of its slot may touch.
#[derive(Debug)]
pub struct OwnerCell<T, S> {
    value: UnsafeCell<T>,
    side: PhantomData<fn() -> S>,
}

// SAFETY: the value is only reached through `with`, which requires a proof of
// ownership of side `S`; the ownership word hands each side to one thread at a
// time, with Acquire on taking and Release on giving up, so accesses from
// different threads are never concurrent and are ordered. `T: Send` because
// the value moves between the threads that successively own the side.
unsafe impl<T: Send, S> Sync for OwnerCell<T, S> {}

impl<T: Default, S> Default for OwnerCell<T, S> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T, S> OwnerCell<T, S> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Self {
            value: UnsafeCell::new(value),
            side: PhantomData,
        }
    }

    /// Runs `f` with exclusive access to the value. `proof` must come from the
    /// ownership word of the slot this cell belongs to, and `f` must not open
    /// this cell again. The type cannot see either, so the module is
    /// crate-internal: the slot types keep each cell with its word and check
    /// every proof against it (`SlotCore::check_proof`), and the server's
    /// reader cells are opened only with the proof of their own slot.
    pub fn with<R>(&self, proof: &impl Holds<S>, f: impl FnOnce(&mut T) -> R) -> R {
        let _ = proof;
        self.value.with_mut(|ptr| {
            // SAFETY: `proof` shows this thread owns side `S` of this slot, and
            // the ownership word gives each side to at most one thread at a
            // time with acquire/release ordering, so no other reference to
            // the value exists for the duration of `f`, and the pointer is
            // valid (it comes from the cell we borrow).
            f(unsafe { &mut *ptr })
        })
    }
}
