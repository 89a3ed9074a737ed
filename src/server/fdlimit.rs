//! Invariant L: the descriptor budget, settled before anything is served.
//!
//! Every connection costs one descriptor number for the life of its slot
//! (the pinned number), and accepting needs one more, briefly. At start the
//! server raises the soft `RLIMIT_NOFILE` to the hard limit, then sizes the
//! pool from what is left after its own descriptors and some headroom for the
//! program embedding it. Asking for more connections than that is a start-up
//! error that says which limit to raise, not an EMFILE storm later.

use super::StartError;
use super::config::{Config, DEFAULT_MAX_CONNS_CAP};
use crate::core::MAX_SLOTS;
use crate::sys::Sys;

/// Descriptors kept out of the pool: stdio, epoll, eventfd, placeholder,
/// accept's temporary number, and headroom for the embedding program.
const RESERVED: u64 = 24;

/// What the start-up check settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdPlan {
    /// Slots in the pool.
    pub capacity: u32,
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// The soft limit before we raised it, if we did.
    pub raised_from: Option<u64>,
}

/// Raises the soft limit (if configured) and sizes the pool.
pub(crate) fn plan<S: Sys>(sys: &S, config: &Config) -> Result<FdPlan, StartError> {
    let (mut soft, hard) = sys.nofile_limit().map_err(|errno| StartError::Sys {
        call: "getrlimit(RLIMIT_NOFILE)",
        errno,
    })?;
    let mut raised_from = None;
    if config.raise_nofile && soft < hard {
        match sys.set_nofile_soft_limit(hard) {
            Ok(()) => {
                raised_from = Some(soft);
                soft = hard;
            }
            Err(errno) => {
                log::warn!("could not raise RLIMIT_NOFILE from {soft} to {hard}: {errno}")
            }
        }
    }
    let reserved = RESERVED + config.listen.len() as u64;
    let available = soft.saturating_sub(reserved);
    let capacity = match config.max_conns {
        Some(asked) if asked as u64 > available => {
            return Err(StartError::FdLimit {
                asked,
                soft,
                hard,
                reserved,
            });
        }
        Some(asked) => asked,
        None if available == 0 => {
            return Err(StartError::FdLimit {
                asked: 1,
                soft,
                hard,
                reserved,
            });
        }
        None => usize::try_from(available)
            .unwrap_or(usize::MAX)
            .min(DEFAULT_MAX_CONNS_CAP),
    };
    let capacity = u32::try_from(capacity)
        .unwrap_or(u32::MAX)
        .min(MAX_SLOTS - 1);
    Ok(FdPlan {
        capacity,
        soft,
        hard,
        raised_from,
    })
}
