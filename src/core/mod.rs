//! The I/O-free concurrency core.
//!
//! Everything here is plain data and atomics: no syscalls, no descriptors, no
//! clocks. It holds the answers to the questions several threads can ask about
//! one connection at the same instant, which are exactly the questions the
//! original EServer got wrong or left open:
//!
//! | question | answer | module |
//! |---|---|---|
//! | who reads it now? who writes it now? | the ownership word, with pending bits | [`state`] |
//! | where do the reader's and writer's data live? | in cells opened by ownership proofs | [`cell`] |
//! | where do messages wait, and how many? | a bounded FIFO of whole messages | [`outq`] |
//! | how does output reach the wire? | send first, EPOLLOUT only after EAGAIN | [`writer`] |
//! | what does a connection slot hold? | the four above, put together | [`slot`] |
//! | which slot does the next connection get? | the oldest freed | [`pool`] |
//! | where do slots live? | pages that never move | [`slab`] |
//! | which connection does a handle name? | `(slot, generation)` | [`ConnId`] |
//! | which idle workers may sleep outside `epoll_wait`? | one poller at least, always | [`standby`] |
//! | when is a failing listener tried again? | its own backoff, one mutator | [`backoff`] |
//! | which workers run, which are parked? | an active count and a futex word | [`parking`] |
//! | how does the core sleep without a syscall? | through the caller's futex | [`futex`] |
//!
//! The loom models in `tests/loom.rs` compile these files (all but `slab`)
//! against loom's atomics and cells and explore their interleavings; see
//! [`crate::sync`].
//!
//! Only [`ConnId`], [`CloseReason`] and [`MAX_SLOTS`] are public. The rest
//! stays inside the crate, because the cells' soundness rests on callers
//! this crate controls (see `cell`):
//!
//! ```compile_fail,E0603
//! use eserver::core::cell::OwnerCell;
//! ```

// Crate-internal: the cells' soundness rests on every caller passing the
// proof of the slot a cell belongs to, which only this crate's slot types
// guarantee. (The loom models compile these files themselves.)
pub(crate) mod backoff;
pub(crate) mod cell;
pub(crate) mod futex;
mod id;
pub(crate) mod outq;
pub(crate) mod parking;
pub(crate) mod pool;
mod reason;
pub(crate) mod slab;
pub(crate) mod slot;
pub(crate) mod standby;
pub(crate) mod state;
pub(crate) mod writer;

pub use id::{ConnId, MAX_SLOTS};
pub use reason::CloseReason;
