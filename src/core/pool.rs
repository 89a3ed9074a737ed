//! The slot pool: which slots are free, handed out oldest-freed first.
//!
//! Slots are created lazily, up to a capacity, and never destroyed; a freed
//! slot goes to the back of a FIFO and is reused only after every slot freed
//! before it. Together with the generation bump on close this keeps a slot's
//! next occupant as far away in time as the pool allows from its last one,
//! which is what makes a stale handle's generation check cheap insurance
//! rather than the only line of defence.
//!
//! # Invariants
//!
//! - A slot index is either checked out or in the free list, never both, and
//!   never twice in the free list (checked in debug builds).
//! - `checked_out + free.len() == created - retired <= capacity`.
//! - `reserved <= free.len() + (capacity - created)`: a reservation
//!   ([`Pool::reserve`]) is a promise of a slot, kept by
//!   [`Pool::checkout_reserved`]; other checkouts see only what is left.
//! - Once closed ([`Pool::close_if_idle`], the server's last step before it
//!   stops) no slot is handed out or promised: a connect racing the stop
//!   either got its slot first, and the stop waits for it, or gets none.

use std::collections::VecDeque;

use crate::sync::{Mutex, lock};

/// How many free slots [`Pool::with_oldest_free`] looks at, oldest first.
pub const FREE_SCAN: usize = 64;

/// A slot handed out by [`Pool::checkout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkout {
    /// A slot used before: it owns a pinned descriptor number already.
    Reused(u32),
    /// A slot never used: it adopts the new connection's descriptor number.
    Fresh(u32),
}

impl Checkout {
    /// The slot index.
    pub fn index(self) -> u32 {
        match self {
            Checkout::Reused(index) | Checkout::Fresh(index) => index,
        }
    }
}

#[derive(Debug)]
struct Inner {
    free: VecDeque<u32>,
    created: u32,
    retired: u32,
    capacity: u32,
    /// Slots promised to reservations and not yet checked out.
    reserved: u32,
    /// Nothing more is handed out (see [`Pool::close_if_idle`]).
    closed: bool,
    #[cfg(debug_assertions)]
    is_free: Vec<bool>,
}

impl Inner {
    /// Slots a plain checkout may take: free or never created, and not
    /// promised to a reservation.
    fn unpromised(&self) -> u32 {
        if self.closed {
            return 0;
        }
        let free = u32::try_from(self.free.len()).unwrap_or(u32::MAX);
        free.saturating_add(self.capacity - self.created)
            .saturating_sub(self.reserved)
    }

    /// Every reservation can still be kept (the module's invariant).
    fn debug_check(&self) {
        debug_assert!(
            self.reserved as usize <= self.free.len() + (self.capacity - self.created) as usize,
            "{} reservations for {} free and {} never created slots",
            self.reserved,
            self.free.len(),
            self.capacity - self.created
        );
    }

    /// The oldest freed slot, else a fresh one.
    fn take(&mut self) -> Option<Checkout> {
        if let Some(index) = self.free.pop_front() {
            #[cfg(debug_assertions)]
            {
                debug_assert!(self.is_free[index as usize], "free list held a busy slot");
                self.is_free[index as usize] = false;
            }
            return Some(Checkout::Reused(index));
        }
        if self.created < self.capacity {
            let index = self.created;
            self.created += 1;
            #[cfg(debug_assertions)]
            self.is_free.push(false);
            return Some(Checkout::Fresh(index));
        }
        None
    }
}

/// The free list of slot indices. See the [module docs](self).
#[derive(Debug)]
pub struct Pool {
    inner: Mutex<Inner>,
}

impl Pool {
    /// A pool that will create at most `capacity` slots.
    pub fn new(capacity: u32) -> Self {
        Self {
            inner: Mutex::new(Inner {
                free: VecDeque::new(),
                created: 0,
                retired: 0,
                capacity,
                reserved: 0,
                closed: false,
                #[cfg(debug_assertions)]
                is_free: Vec::new(),
            }),
        }
    }

    /// The oldest freed slot, else a fresh one, else `None` (the pool is
    /// full, or what is left is reserved).
    pub fn checkout(&self) -> Option<Checkout> {
        let mut inner = lock(&self.inner);
        if inner.unpromised() == 0 {
            return None;
        }
        let taken = inner.take();
        inner.debug_check();
        taken
    }

    /// Promises the caller a slot for [`Pool::checkout_reserved`], if one
    /// is left: a caller that must act before it takes the slot (`accept`)
    /// cannot then lose it to another. Returns whether it got the promise.
    pub fn reserve(&self) -> bool {
        let mut inner = lock(&self.inner);
        if inner.unpromised() == 0 {
            return false;
        }
        inner.reserved += 1;
        inner.debug_check();
        true
    }

    /// Gives back a promise unused.
    pub fn unreserve(&self) {
        let mut inner = lock(&self.inner);
        debug_assert!(inner.reserved > 0, "unreserve without a reservation");
        inner.reserved = inner.reserved.saturating_sub(1);
    }

    /// Takes the slot a [`Pool::reserve`] promised (`None` only if there
    /// was no promise: a caller's bug).
    pub fn checkout_reserved(&self) -> Option<Checkout> {
        let mut inner = lock(&self.inner);
        debug_assert!(
            inner.reserved > 0,
            "checkout_reserved without a reservation"
        );
        inner.reserved = inner.reserved.checked_sub(1)?;
        let taken = inner.take();
        inner.debug_check();
        taken
    }

    /// Runs `f` on freed slots, oldest first (the order [`Pool::checkout`]
    /// hands them out in), until it returns `Some`, holding the pool's lock:
    /// no checkout can take a slot while `f` runs on it, and whoever checks
    /// it out next sees what `f` did. Looks at the oldest
    /// [`FREE_SCAN`] free slots at most: the lock is not held for a walk
    /// of the whole pool.
    pub fn with_oldest_free<R>(&self, f: impl FnMut(u32) -> Option<R>) -> Option<R> {
        let inner = lock(&self.inner);
        inner.free.iter().copied().take(FREE_SCAN).find_map(f)
    }

    /// Whether [`Pool::checkout`] would hand out a slot now.
    pub fn can_checkout(&self) -> bool {
        lock(&self.inner).unpromised() > 0
    }

    /// Returns a reclaimed slot; it will be handed out after all slots
    /// returned before it.
    pub fn checkin(&self, index: u32) {
        let mut inner = lock(&self.inner);
        debug_assert!(index < inner.created, "checkin of a slot never created");
        #[cfg(debug_assertions)]
        {
            debug_assert!(
                !inner.is_free[index as usize],
                "slot {index} checked in twice"
            );
            inner.is_free[index as usize] = true;
        }
        inner.free.push_back(index);
    }

    /// Takes a checked-out slot out of service for good (its descriptor
    /// number could not be made safe, or its generation wrapped); the
    /// pool's capacity shrinks by one.
    pub fn retire(&self, index: u32) {
        let mut inner = lock(&self.inner);
        debug_assert!(index < inner.created, "retire of a slot never created");
        inner.retired += 1;
    }

    /// Slots handed out and not yet returned (nor retired).
    pub fn in_use(&self) -> u32 {
        let inner = lock(&self.inner);
        inner.created - inner.retired - inner.free.len() as u32
    }

    /// Closes the pool whatever is in use (a forced stop).
    pub fn close(&self) {
        lock(&self.inner).closed = true;
    }

    /// Closes the pool if no slot is checked out or promised, in one step
    /// with that check: afterwards nothing is handed out, so nothing can be
    /// in use once the caller acts on the answer. Returns whether it closed.
    pub fn close_if_idle(&self) -> bool {
        let mut inner = lock(&self.inner);
        let in_use = inner.created - inner.retired - inner.free.len() as u32;
        if in_use == 0 && inner.reserved == 0 {
            inner.closed = true;
        }
        inner.closed
    }

    /// Slots created so far (the highest index ever handed out, plus one).
    pub fn created(&self) -> u32 {
        lock(&self.inner).created
    }

    /// The most slots this pool will create.
    pub fn capacity(&self) -> u32 {
        lock(&self.inner).capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A review finding: on EMFILE the acceptor asked only the oldest free
    /// slot for its number; once that one had given its number away (to a
    /// number some other code then took), the numbers of the free slots
    /// behind it were never offered. The search now goes on past a slot
    /// that has none.
    #[test]
    fn the_search_for_a_free_number_passes_slots_without_one() {
        crate::sync::model(|| {
            let pool = Pool::new(4);
            let slots: Vec<u32> = (0..3)
                .map(|_| pool.checkout().expect("room").index())
                .collect();
            for &i in &slots {
                pool.checkin(i);
            }
            let asked = std::cell::RefCell::new(Vec::new());
            let found = pool.with_oldest_free(|i| {
                asked.borrow_mut().push(i);
                // The oldest free slot already gave its number away.
                (i != slots[0]).then_some(i)
            });
            assert_eq!(found, Some(slots[1]));
            assert_eq!(*asked.borrow(), [slots[0], slots[1]], "oldest first");
        });
    }

    /// Closing in one step with the last look at what is in use: after it
    /// nothing is handed out, and it does not close while a slot is out or
    /// promised (the drain must wait for that connection).
    #[test]
    fn close_if_idle_closes_only_an_idle_pool_and_then_hands_out_nothing() {
        crate::sync::model(|| {
            let pool = Pool::new(4);
            let a = pool.checkout().expect("room").index();
            assert!(!pool.close_if_idle(), "a slot is out");
            pool.checkin(a);
            assert!(pool.reserve());
            assert!(!pool.close_if_idle(), "a slot is promised");
            pool.unreserve();
            assert!(pool.close_if_idle());
            assert_eq!(pool.checkout(), None);
            assert!(!pool.reserve());
            assert!(!pool.can_checkout());
        });
    }

    #[test]
    fn fresh_until_something_is_freed_then_fifo() {
        crate::sync::model(|| {
            let pool = Pool::new(4);
            let a = pool.checkout().expect("room");
            let b = pool.checkout().expect("room");
            let c = pool.checkout().expect("room");
            assert_eq!(
                (a, b, c),
                (Checkout::Fresh(0), Checkout::Fresh(1), Checkout::Fresh(2))
            );
            pool.checkin(1);
            pool.checkin(0);
            assert_eq!(
                pool.checkout(),
                Some(Checkout::Reused(1)),
                "oldest freed first"
            );
            assert_eq!(pool.checkout(), Some(Checkout::Reused(0)));
            assert_eq!(pool.checkout(), Some(Checkout::Fresh(3)));
            assert_eq!(pool.checkout(), None, "full");
            assert_eq!(pool.in_use(), 4);
            pool.retire(2);
            assert_eq!(pool.in_use(), 3);
        });
    }

    #[test]
    fn a_reservation_keeps_its_slot_from_other_checkouts() {
        crate::sync::model(|| {
            let pool = Pool::new(2);
            assert!(pool.reserve());
            assert!(pool.checkout().is_some(), "one slot is not promised");
            assert!(!pool.can_checkout(), "the other is promised");
            assert_eq!(pool.checkout(), None);
            assert!(!pool.reserve(), "nothing left to promise");
            assert_eq!(pool.checkout_reserved(), Some(Checkout::Fresh(1)));
            pool.checkin(0);
            assert!(pool.reserve());
            pool.unreserve();
            assert_eq!(pool.checkout(), Some(Checkout::Reused(0)), "given back");
        });
    }
}
