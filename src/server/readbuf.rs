//! A connection's read buffer: allocated only while a frame is incomplete.
//!
//! Most turns decode every frame straight out of the worker's scratch
//! buffer, and a connection at a frame boundary owns no buffer at all (an
//! idle connection costs no read memory). Only the bytes of an incomplete
//! frame are kept here, in a buffer sized for that frame when the codec
//! knows its length, and released as soon as it is empty again.
//!
//! # Invariants
//!
//! - `start <= end <= data.len()`; the bytes not yet decoded are
//!   `data[start..end]`; `data` is fully initialised (no `unsafe` needed to
//!   read into it).
//! - The buffer never grows past what one frame needs plus one read.

/// Bytes read but not yet decoded.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

/// The least spare room offered to one read.
const MIN_READ: usize = 16 << 10;

impl ReadBuf {
    /// Whether no undecoded byte is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The undecoded bytes.
    pub(crate) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Undecoded bytes held.
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    /// Drops `n` decoded bytes from the front; releases the memory once empty.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len(), "consumed more than was buffered");
        self.start += n;
        if self.start == self.end {
            self.release();
        }
    }

    /// Keeps `bytes` (the undecoded tail of a scratch read), with room for a
    /// frame of `need` bytes in all when the codec knows it.
    pub(crate) fn keep(&mut self, bytes: &[u8], need: Option<usize>) {
        debug_assert!(self.is_empty(), "keep over undecoded bytes");
        let size = need.unwrap_or(0).max(bytes.len()).max(MIN_READ);
        if self.data.len() < size {
            self.data = vec![0; size];
        }
        self.data[..bytes.len()].copy_from_slice(bytes);
        self.start = 0;
        self.end = bytes.len();
    }

    /// Room to read into: enough to complete a frame of `need` bytes in all
    /// (when known), and never less than a quarter of [`MIN_READ`].
    pub(crate) fn spare(&mut self, need: Option<usize>) -> &mut [u8] {
        let held = self.len();
        let required = need.unwrap_or(0).saturating_sub(held).max(MIN_READ / 4);
        if self.data.len() - self.end < required {
            if self.start > 0 {
                // Move the undecoded bytes to the front before growing.
                self.data.copy_within(self.start..self.end, 0);
                self.start = 0;
                self.end = held;
            }
            if self.data.len() - self.end < required {
                self.data.resize(self.end + required.max(MIN_READ), 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Records `n` bytes read into [`ReadBuf::spare`].
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(
            self.end + n <= self.data.len(),
            "committed past the spare room"
        );
        self.end += n;
    }

    /// Frees the memory.
    pub(crate) fn release(&mut self) {
        *self = Self::default();
    }

    /// Bytes of memory held (for tests and stats).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.data.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_reads_and_releases() {
        let mut buf = ReadBuf::default();
        assert_eq!(buf.capacity(), 0);
        buf.keep(b"abc", Some(100_000));
        assert!(
            buf.capacity() >= 100_000,
            "sized for the whole frame at once"
        );
        let spare = buf.spare(Some(100_000));
        assert!(spare.len() >= 100_000 - 3);
        spare[..2].copy_from_slice(b"de");
        buf.commit(2);
        assert_eq!(buf.filled(), b"abcde");
        buf.consume(2);
        assert_eq!(buf.filled(), b"cde");
        buf.consume(3);
        assert!(buf.is_empty());
        assert_eq!(buf.capacity(), 0, "released when empty");
    }

    #[test]
    fn compacts_before_growing() {
        let mut buf = ReadBuf::default();
        buf.keep(&[1; MIN_READ], None);
        buf.consume(MIN_READ - 2);
        let before = buf.capacity();
        let spare = buf.spare(None);
        assert!(spare.len() >= MIN_READ - 2);
        assert_eq!(buf.filled(), [1, 1]);
        assert_eq!(
            buf.capacity(),
            before,
            "compaction made room without growing"
        );
    }
}
