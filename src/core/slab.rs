//! Lazily allocated, never moved storage for slots.
//!
//! Page `k` holds `BASE << k` slots, so a pool sized for a million connections
//! costs nothing until connections arrive, and a slot's address never changes
//! once its page exists (handles and in-flight operations can hold `&T`
//! without a lock). Pages are created on first use and live as long as the
//! slab.

use std::sync::OnceLock;

/// Slots in page 0; page `k` has `BASE << k`.
const BASE: usize = 64;

/// Paged storage for up to `capacity` values of `T`.
#[derive(Debug)]
pub struct Slab<T> {
    pages: Box<[OnceLock<Box<[T]>>]>,
    capacity: usize,
}

/// Page number and offset of slot `index`.
fn locate(index: usize) -> (usize, usize) {
    let i = index / BASE + 1;
    let page = (usize::BITS - 1 - i.leading_zeros()) as usize;
    let start = BASE * ((1 << page) - 1);
    (page, index - start)
}

impl<T> Slab<T> {
    /// Room for `capacity` slots; allocates nothing yet.
    pub fn new(capacity: usize) -> Self {
        let pages = if capacity == 0 {
            0
        } else {
            locate(capacity - 1).0 + 1
        };
        Self {
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
            capacity,
        }
    }

    /// Slot `index`, if its page exists.
    pub fn get(&self, index: usize) -> Option<&T> {
        if index >= self.capacity {
            return None;
        }
        let (page, offset) = locate(index);
        self.pages.get(page)?.get()?.get(offset)
    }
}

impl<T: Default> Slab<T> {
    /// Slot `index`, creating its page if needed; `None` past the capacity.
    pub fn get_or_create(&self, index: usize) -> Option<&T> {
        if index >= self.capacity {
            return None;
        }
        let (page, offset) = locate(index);
        let slots = self.pages.get(page)?.get_or_init(|| {
            // The last page stops at the capacity.
            let start = BASE * ((1 << page) - 1);
            let len = (BASE << page).min(self.capacity - start);
            (0..len).map(|_| T::default()).collect()
        });
        slots.get(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_double_and_indices_are_stable() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(63), (0, 63));
        assert_eq!(locate(64), (1, 0));
        assert_eq!(locate(191), (1, 127));
        assert_eq!(locate(192), (2, 0));
        let slab: Slab<u8> = Slab::new(200);
        assert!(slab.get(100).is_none(), "page not created yet");
        let first = slab.get_or_create(100).expect("in capacity") as *const u8;
        assert_eq!(slab.get(100).expect("created") as *const u8, first);
        assert!(slab.get_or_create(200).is_none(), "past capacity");
        assert!(slab.get_or_create(199).is_some());
    }

    /// An audit finding (bounded memory): the last page was allocated
    /// whole, past the capacity: a pool of 1,000 slots allocated 1,024
    /// when its 961st connection arrived (slots and readers alike).
    #[test]
    fn the_last_page_stops_at_the_capacity() {
        let slab: Slab<u8> = Slab::new(200);
        assert!(slab.get_or_create(199).is_some());
        let last = slab.pages[2].get().expect("created").len();
        assert_eq!(last, 8, "slots 192 to 199");
        let full: Slab<u8> = Slab::new(192);
        assert!(full.get_or_create(191).is_some());
        assert_eq!(full.pages.len(), 2);
        assert_eq!(full.pages[1].get().expect("created").len(), 128);
    }
}
