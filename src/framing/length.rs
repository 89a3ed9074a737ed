//! Length-prefixed frames: a 4-byte payload length, then the payload.

use super::{Codec, DEFAULT_MAX_FRAME, Decoded, FrameError};

/// The byte order of the length header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ByteOrder {
    /// Little-endian: EServer's host order on x86-64, the default.
    #[default]
    Little,
    /// Big-endian (network order).
    Big,
}

/// Frames of `u32 length` + `length` payload bytes, with a size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthPrefixed {
    order: ByteOrder,
    max_frame: usize,
}

/// Bytes in the length header.
pub const HEADER: usize = 4;

impl Default for LengthPrefixed {
    fn default() -> Self {
        Self::new(ByteOrder::Little, DEFAULT_MAX_FRAME)
    }
}

impl LengthPrefixed {
    /// A codec with byte order `order` refusing payloads over `max_frame`
    /// bytes (clamped to `u32::MAX`, the most a header can say, and on a
    /// 32-bit target to what leaves room for the header in a `usize`).
    pub fn new(order: ByteOrder, max_frame: usize) -> Self {
        Self {
            order,
            max_frame: max_frame.min(u32::MAX as usize).min(usize::MAX - HEADER),
        }
    }

    /// The header's byte order.
    pub fn order(&self) -> ByteOrder {
        self.order
    }

    /// The header for a payload of `len` bytes.
    pub fn header(&self, len: u32) -> [u8; HEADER] {
        match self.order {
            ByteOrder::Little => len.to_le_bytes(),
            ByteOrder::Big => len.to_be_bytes(),
        }
    }
}

impl Codec for LengthPrefixed {
    fn decode(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let Some(header) = buf.first_chunk::<HEADER>() else {
            return Ok(Decoded::Incomplete { need: None });
        };
        let len = match self.order {
            ByteOrder::Little => u32::from_le_bytes(*header),
            ByteOrder::Big => u32::from_be_bytes(*header),
        } as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        // No overflow: `max_frame <= usize::MAX - HEADER` (see `new`).
        let total = HEADER + len;
        if buf.len() < total {
            return Ok(Decoded::Incomplete { need: Some(total) });
        }
        Ok(Decoded::Frame {
            payload: HEADER..total,
            consumed: total,
        })
    }

    fn encode(&self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), FrameError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        // max_frame <= u32::MAX, so the cast is exact.
        out.reserve(HEADER + len);
        out.extend_from_slice(&self.header(len as u32));
        for part in parts {
            out.extend_from_slice(part);
        }
        Ok(())
    }

    fn max_payload(&self) -> usize {
        self.max_frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_split_across_reads_waits() {
        let codec = LengthPrefixed::default();
        assert_eq!(
            codec.decode(&[3, 0]),
            Ok(Decoded::Incomplete { need: None })
        );
        assert_eq!(
            codec.decode(&[3, 0, 0, 0, b'a']),
            Ok(Decoded::Incomplete { need: Some(7) })
        );
        assert_eq!(
            codec.decode(&[3, 0, 0, 0, b'a', b'b', b'c', 9]),
            Ok(Decoded::Frame {
                payload: 4..7,
                consumed: 7
            })
        );
    }

    #[test]
    fn zero_length_frames() {
        let codec = LengthPrefixed::default();
        assert_eq!(
            codec.decode(&[0, 0, 0, 0]),
            Ok(Decoded::Frame {
                payload: 4..4,
                consumed: 4
            })
        );
    }

    #[test]
    fn exactly_max_frame_is_accepted_one_over_is_refused() {
        let codec = LengthPrefixed::new(ByteOrder::Little, 5);
        assert_eq!(
            codec.decode(&5u32.to_le_bytes()),
            Ok(Decoded::Incomplete { need: Some(9) })
        );
        assert_eq!(
            codec.decode(&6u32.to_le_bytes()),
            Err(FrameError::TooLarge { len: 6, max: 5 })
        );
        let mut out = Vec::new();
        assert!(codec.encode(&[b"12345"], &mut out).is_ok());
        assert_eq!(
            codec.encode(&[b"123", b"456"], &mut out),
            Err(FrameError::TooLarge { len: 6, max: 5 })
        );
        assert_eq!(out.len(), 9, "a refused encode leaves the output alone");
    }

    #[test]
    fn max_header_is_refused_without_payload() {
        let codec = LengthPrefixed::default();
        assert_eq!(
            codec.decode(&[0xff; 4]),
            Err(FrameError::TooLarge {
                len: u32::MAX as u64,
                max: DEFAULT_MAX_FRAME
            })
        );
    }

    #[test]
    fn big_endian_header() {
        let codec = LengthPrefixed::new(ByteOrder::Big, 100);
        let mut out = Vec::new();
        codec.encode(&[b"hi"], &mut out).expect("small frame");
        assert_eq!(out, [0, 0, 0, 2, b'h', b'i']);
        assert_eq!(
            codec.decode(&out),
            Ok(Decoded::Frame {
                payload: 4..6,
                consumed: 6
            })
        );
    }
}
