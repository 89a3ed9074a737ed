//! Termination signals, received synchronously.
//!
//! The binary blocks SIGINT, SIGTERM and SIGHUP in every thread (the mask is
//! inherited by threads spawned afterwards) and waits for them with
//! `sigtimedwait` on its main thread. No handler runs in signal context, so
//! nothing here needs to be async-signal-safe, and the main thread doubles as
//! the periodic stats ticker.

use std::time::Duration;

use super::{cvt, errno};
use crate::sys::{Errno, SysResult};

/// A signal the server reacts to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP.
    HangUp,
}

fn termination_set() -> SysResult<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        cvt(libc::sigemptyset(&mut set))?;
        cvt(libc::sigaddset(&mut set, libc::SIGINT))?;
        cvt(libc::sigaddset(&mut set, libc::SIGTERM))?;
        cvt(libc::sigaddset(&mut set, libc::SIGHUP))?;
    }
    Ok(set)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and in every
/// thread it spawns from now on. Call before starting the server.
pub fn block_termination() -> SysResult<()> {
    let set = termination_set()?;
    // SAFETY: `set` is initialised; the old mask is not requested.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(Errno(ret));
    }
    Ok(())
}

/// Waits up to `timeout` for a blocked termination signal.
pub fn wait(timeout: Duration) -> SysResult<Option<Signal>> {
    let set = termination_set()?;
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are initialised and outlive the call; no
    // siginfo is requested.
    let signo = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    if signo < 0 {
        let e = errno();
        return if e.is_would_block() || e == Errno::EINTR {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(match signo {
        libc::SIGINT => Some(Signal::Interrupt),
        libc::SIGTERM => Some(Signal::Terminate),
        libc::SIGHUP => Some(Signal::HangUp),
        _ => None,
    })
}
