//! Newline-terminated lines, with a length limit.

use super::{Codec, DEFAULT_MAX_FRAME, Decoded, FrameError};

/// Lines ending in `\n`; a `\r` just before it is not part of the payload.
/// A line whose payload is over `max_line` bytes is an error, reported as soon
/// as `max_line + 2` bytes have arrived without a newline. Encoding ends a
/// line with `\n`, or with `\r\n` when the payload itself ends in `\r` (so
/// that it decodes whole): every payload a peer's line decodes to, which
/// holds no `\n`, can be sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lines {
    max_line: usize,
}

impl Default for Lines {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Lines {
    /// Lines of at most `max_line` payload bytes.
    pub fn new(max_line: usize) -> Self {
        Self { max_line }
    }
}

impl Codec for Lines {
    fn decode(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        self.decode_from(buf, 0)
    }

    fn decode_from(&self, buf: &[u8], seen: usize) -> Result<Decoded, FrameError> {
        // Room for the payload, a '\r' and the '\n'.
        let window = buf.len().min(self.max_line.saturating_add(2));
        // The first `seen` bytes held no newline when last decoded.
        let from = seen.min(window);
        let newline = buf[from..window]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| from + i);
        let Some(newline) = newline else {
            if buf.len() >= self.max_line.saturating_add(2) {
                return Err(FrameError::LineTooLong { max: self.max_line });
            }
            return Ok(Decoded::Incomplete { need: None });
        };
        let end = if newline > 0 && buf[newline - 1] == b'\r' {
            newline - 1
        } else {
            newline
        };
        if end > self.max_line {
            return Err(FrameError::LineTooLong { max: self.max_line });
        }
        Ok(Decoded::Frame {
            payload: 0..end,
            consumed: newline + 1,
        })
    }

    fn encode(&self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), FrameError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_line {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_line,
            });
        }
        if parts.iter().any(|p| p.contains(&b'\n')) {
            return Err(FrameError::NewlineInPayload);
        }
        // Decoding drops one '\r' before the newline: a payload that ends
        // in one gets a second, so that it comes back whole.
        let ends_in_cr = parts
            .iter()
            .rev()
            .find(|p| !p.is_empty())
            .is_some_and(|p| p.ends_with(b"\r"));
        out.reserve(len + 2);
        for part in parts {
            out.extend_from_slice(part);
        }
        if ends_in_cr {
            out.push(b'\r');
        }
        out.push(b'\n');
        Ok(())
    }

    fn max_payload(&self) -> usize {
        self.max_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_lf() {
        let codec = Lines::new(10);
        assert_eq!(
            codec.decode(b"ab\r\ncd"),
            Ok(Decoded::Frame {
                payload: 0..2,
                consumed: 4
            })
        );
        assert_eq!(
            codec.decode(b"\n"),
            Ok(Decoded::Frame {
                payload: 0..0,
                consumed: 1
            })
        );
        assert_eq!(codec.decode(b"abc"), Ok(Decoded::Incomplete { need: None }));
    }

    #[test]
    fn limit() {
        let codec = Lines::new(3);
        assert!(matches!(
            codec.decode(b"abc\r\n"),
            Ok(Decoded::Frame { .. })
        ));
        assert_eq!(
            codec.decode(b"abcd\n"),
            Err(FrameError::LineTooLong { max: 3 })
        );
        assert_eq!(
            codec.decode(b"abcde"),
            Err(FrameError::LineTooLong { max: 3 })
        );
        assert_eq!(
            codec.decode(b"abcd"),
            Ok(Decoded::Incomplete { need: None })
        );
    }

    #[test]
    fn a_payload_ending_in_cr_gets_a_crlf() {
        let mut out = Vec::new();
        assert_eq!(Lines::new(10).encode(&[b"a\r", b""], &mut out), Ok(()));
        assert_eq!(out, b"a\r\r\n");
        assert_eq!(
            Lines::new(2).decode(&out),
            Ok(Decoded::Frame {
                payload: 0..2,
                consumed: 4
            })
        );
    }

    #[test]
    fn encode_refuses_newlines() {
        let mut out = Vec::new();
        assert_eq!(
            Lines::new(10).encode(&[b"a\nb"], &mut out),
            Err(FrameError::NewlineInPayload)
        );
        assert!(out.is_empty());
    }
}
