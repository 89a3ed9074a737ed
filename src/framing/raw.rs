//! Raw bytes: every read is a message.

use super::{Codec, Decoded, FrameError};

/// No framing: whatever bytes are buffered form one message, and a message
/// is sent as is. Message boundaries are those of the reads, so this suits
/// byte-stream protocols (an echo of bytes, a proxy), not request/response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Raw;

impl Codec for Raw {
    fn decode(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        if buf.is_empty() {
            return Ok(Decoded::Incomplete { need: None });
        }
        Ok(Decoded::Frame {
            payload: 0..buf.len(),
            consumed: buf.len(),
        })
    }

    fn encode(&self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), FrameError> {
        for part in parts {
            out.extend_from_slice(part);
        }
        Ok(())
    }

    fn max_payload(&self) -> usize {
        usize::MAX
    }
}
