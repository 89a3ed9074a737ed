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
//!
//! The loom models in `tests/loom_*.rs` compile these files (all but `slab`)
//! against loom's atomics and cells and explore their interleavings; see
//! [`crate::sync`].

pub mod cell;
pub mod outq;
pub mod pool;
pub mod slab;
pub mod slot;
pub mod state;
pub mod writer;

use std::fmt;

/// The most slots a pool may have: slot indices stay below 2^31 so that
/// connection tokens never collide with the event loop's control tokens.
pub const MAX_SLOTS: u32 = 1 << 31;

/// A connection's identity: its slot and the slot's generation when the
/// connection was opened. A slot's generation is bumped on every close, so an
/// id outlives its connection harmlessly: every operation on a stale id is
/// refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    slot: u32,
    generation: u32,
}

impl ConnId {
    /// The id of the connection in `slot` at `generation`.
    pub const fn new(slot: u32, generation: u32) -> Self {
        Self { slot, generation }
    }

    /// The slot index.
    pub const fn slot(self) -> u32 {
        self.slot
    }

    /// The slot's generation when this connection was opened.
    pub const fn generation(self) -> u32 {
        self.generation
    }

    /// Packs the id into 64 bits (slot high, generation low), as carried in
    /// an epoll event's `data.u64`. Below 2^63 for any valid slot.
    pub const fn to_u64(self) -> u64 {
        ((self.slot as u64) << 32) | self.generation as u64
    }

    /// Unpacks [`ConnId::to_u64`].
    pub const fn from_u64(raw: u64) -> Self {
        Self {
            slot: (raw >> 32) as u32,
            generation: raw as u32,
        }
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}.{}", self.slot, self.generation)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a connection was closed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CloseReason {
    /// The peer closed its side; every reply to a complete frame was flushed.
    Eof,
    /// Reading failed (ECONNRESET and friends); the errno.
    Reset(i32),
    /// Writing failed (EPIPE, ECONNRESET, ...); the errno.
    WriteFailed(i32),
    /// The peer sent a frame the codec rejects (over the size limit, ...).
    BadFrame,
    /// The handler asked for the close.
    Handler,
    /// The handler panicked while serving this connection.
    HandlerPanic,
    /// Closed through a `ServerHandle`.
    Requested,
    /// A send from elsewhere found its output queue full (slow receiver).
    SlowReceiver,
    /// No bytes either way for longer than the idle timeout.
    IdleTimeout,
    /// A frame stayed incomplete for longer than the frame timeout.
    FrameTimeout,
    /// The server shut down.
    Shutdown,
}

impl CloseReason {
    /// Every reason, in counter order.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::Eof,
        CloseReason::Reset(0),
        CloseReason::WriteFailed(0),
        CloseReason::BadFrame,
        CloseReason::Handler,
        CloseReason::HandlerPanic,
        CloseReason::Requested,
        CloseReason::SlowReceiver,
        CloseReason::IdleTimeout,
        CloseReason::FrameTimeout,
        CloseReason::Shutdown,
    ];

    /// A stable index for counters (position in [`CloseReason::ALL`]).
    pub const fn index(self) -> usize {
        match self {
            CloseReason::Eof => 0,
            CloseReason::Reset(_) => 1,
            CloseReason::WriteFailed(_) => 2,
            CloseReason::BadFrame => 3,
            CloseReason::Handler => 4,
            CloseReason::HandlerPanic => 5,
            CloseReason::Requested => 6,
            CloseReason::SlowReceiver => 7,
            CloseReason::IdleTimeout => 8,
            CloseReason::FrameTimeout => 9,
            CloseReason::Shutdown => 10,
        }
    }

    /// A short name for logs and counters.
    pub const fn name(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::Reset(_) => "reset",
            CloseReason::WriteFailed(_) => "write_failed",
            CloseReason::BadFrame => "bad_frame",
            CloseReason::Handler => "handler",
            CloseReason::HandlerPanic => "handler_panic",
            CloseReason::Requested => "requested",
            CloseReason::SlowReceiver => "slow_receiver",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::FrameTimeout => "frame_timeout",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Reset(errno) | CloseReason::WriteFailed(errno) => {
                write!(
                    f,
                    "{} ({})",
                    self.name(),
                    std::io::Error::from_raw_os_error(*errno)
                )
            }
            _ => f.write_str(self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_round_trips_and_stays_below_control_tokens() {
        let id = ConnId::new(MAX_SLOTS - 1, u32::MAX);
        assert_eq!(ConnId::from_u64(id.to_u64()), id);
        assert!(id.to_u64() < 1 << 63);
    }

    #[test]
    fn close_reason_indices_match_all() {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }
}
