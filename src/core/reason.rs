//! Why a connection was closed: one name per cause, for counters and logs.

use std::fmt;

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
    /// The replies to the complete frames before it are written first.
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
    /// An outbound connection ([`connect`](crate::ServerHandle::connect))
    /// could not be established; the errno.
    ConnectFailed(i32),
    /// Output waited for longer than the send timeout with the kernel
    /// taking none of it: the peer stopped reading.
    SendTimeout,
    /// An incomplete frame needed more buffer than the server-wide input
    /// budget had left (`Config::max_in_total`).
    InputBudget,
    /// A connection could not be registered with epoll (a local limit,
    /// such as `fs.epoll.max_user_watches` for ENOSPC, not the peer's
    /// doing); the errno. An accepted one is counted with accept's errors
    /// too; a dial's caller gets the error from `connect`.
    RegisterFailed(i32),
}

impl CloseReason {
    /// Every reason, in counter order.
    pub const ALL: [CloseReason; 15] = [
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
        CloseReason::ConnectFailed(0),
        CloseReason::SendTimeout,
        CloseReason::InputBudget,
        CloseReason::RegisterFailed(0),
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
            CloseReason::ConnectFailed(_) => 11,
            CloseReason::SendTimeout => 12,
            CloseReason::InputBudget => 13,
            CloseReason::RegisterFailed(_) => 14,
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
            CloseReason::ConnectFailed(_) => "connect_failed",
            CloseReason::SendTimeout => "send_timeout",
            CloseReason::InputBudget => "input_budget",
            CloseReason::RegisterFailed(_) => "register_failed",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Reset(errno)
            | CloseReason::WriteFailed(errno)
            | CloseReason::ConnectFailed(errno)
            | CloseReason::RegisterFailed(errno) => {
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
    fn indices_match_all() {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }
}
