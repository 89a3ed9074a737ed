//! Connection identity: `(slot, generation)`.
//!
//! A slot's generation is bumped on every close, so an id outlives its
//! connection harmlessly: every operation on a stale id is refused (by the
//! ownership word and by the out-queue, which both compare generations).
//! Generations are 32 bits: a slot retires before its generation would
//! wrap (after 2^32 connections), so no id ever names two connections.

use std::fmt;

/// The most slots a pool may have: slot indices stay below 2^31 so that
/// connection tokens never collide with the event loop's control tokens.
pub const MAX_SLOTS: u32 = 1 << 31;

/// A connection's identity: its slot and the slot's generation when the
/// connection was opened. A slot's generation is bumped on every close, so an
/// id outlives its connection harmlessly: every operation on a stale id is
/// refused.
///
/// An id means something only to the server that gave it: every server's
/// slots start at generation 0, so another server's handle (in the same
/// process) takes it for a connection of its own.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_round_trips_and_stays_below_control_tokens() {
        let id = ConnId::new(MAX_SLOTS - 1, u32::MAX);
        assert_eq!(ConnId::from_u64(id.to_u64()), id);
        assert!(id.to_u64() < 1 << 63);
    }
}
