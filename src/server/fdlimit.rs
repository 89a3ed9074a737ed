//! Invariant L: the descriptor budget, settled before anything is served.
//!
//! Every connection costs one descriptor number for the life of its slot
//! (the pinned number), and accepting needs one more, briefly. A socket that
//! lingers after its close (see `server::linger`) holds a second number for
//! a while. At start the server raises the soft `RLIMIT_NOFILE` to the hard
//! limit, then sizes the pool from what is left after the descriptors the
//! program has open already, its own, and some headroom for the program
//! embedding it, less a share for
//! lingering sockets; what the pool leaves, up to one per slot, is how many
//! may linger at once. Asking for more connections than fit is a start-up
//! error that says which limit to raise, not an EMFILE storm later.

use super::StartError;
use super::config::{Config, DEFAULT_MAX_CONNS_CAP};
use crate::core::MAX_SLOTS;
use crate::sys::Sys;

/// Descriptors kept out of the pool: stdio, epoll, eventfd, placeholder,
/// accept's temporary number, and headroom for the embedding program.
const RESERVED: u64 = 24;

/// Of [`RESERVED`]: the numbers of stdin, stdout and stderr.
const STDIO: u64 = 3;

/// A pool sized from the limit leaves this fraction (1/16) of the numbers
/// it could have had to lingering sockets.
const LINGER_SHARE: u64 = 16;

/// What the start-up check settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdPlan {
    /// Slots in the pool.
    pub capacity: u32,
    /// Sockets that may linger at once (0 with lingering off).
    pub linger: u32,
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
    // What the program has open at start is not ours to plan with (a
    // database pool, log files, another server's listeners and pinned
    // numbers so far; not what another server's pool pins later): planning
    // for the whole limit would meet EMFILE later. Stdio is in `RESERVED`.
    // Not known (no /proc, or EMFILE already): planned as before, from the
    // limit alone.
    let open = match sys.open_descriptors() {
        Ok(open) => open.saturating_sub(STDIO),
        Err(errno) => {
            log::info!("counting open descriptors: {errno}; planning from the limit alone");
            0
        }
    };
    let reserved = RESERVED + config.listen.len() as u64 + open;
    let lingers = config.linger.is_some_and(|t| !t.is_zero());
    let available = soft.saturating_sub(reserved);
    let capacity = match config.max_conns {
        Some(asked) if asked as u64 > available => {
            return Err(StartError::FdLimit {
                asked,
                soft,
                hard,
                reserved,
                open,
            });
        }
        Some(asked) => asked,
        None if available == 0 => {
            return Err(StartError::FdLimit {
                asked: 1,
                soft,
                hard,
                reserved,
                open,
            });
        }
        None => {
            let share = if lingers { available / LINGER_SHARE } else { 0 };
            usize::try_from(available - share)
                .unwrap_or(usize::MAX)
                .min(DEFAULT_MAX_CONNS_CAP)
        }
    };
    let capacity = u32::try_from(capacity)
        .unwrap_or(u32::MAX)
        .min(MAX_SLOTS - 1);
    // What the pool leaves of the available numbers, at most one per slot.
    let linger = if lingers {
        let left = available.saturating_sub(u64::from(capacity));
        u32::try_from(left.min(u64::from(capacity))).unwrap_or(u32::MAX)
    } else {
        0
    };
    Ok(FdPlan {
        capacity,
        linger,
        soft,
        hard,
        raised_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::sim::{SimConfig, SimSys};
    use std::time::Duration;

    /// A simulated kernel with limits of 1024 (soft and hard).
    fn limits_of_1024() -> SimSys {
        SimSys::new(SimConfig {
            fd_limit: 1024,
            hard_limit: 1024,
            ..SimConfig::default()
        })
    }

    /// The plan for `config` under limits of 1024 (soft and hard).
    fn plan_for(config: Config) -> FdPlan {
        let sim = limits_of_1024();
        plan(&sim, &config).unwrap()
    }

    #[test]
    fn a_pool_sized_from_the_limit_leaves_a_share_for_lingering() {
        // 1024 less 24 reserved and one listener: 999 numbers.
        let plan = plan_for(Config::default());
        assert_eq!((plan.capacity, plan.linger), (999 - 999 / 16, 999 / 16));
        let off = plan_for(Config::default().linger(Duration::ZERO));
        assert_eq!((off.capacity, off.linger), (999, 0));
    }

    #[test]
    fn a_pool_of_a_given_size_leaves_the_rest_up_to_one_per_slot() {
        let plan = plan_for(Config::default().max_conns(100));
        assert_eq!((plan.capacity, plan.linger), (100, 100));
        let plan = plan_for(Config::default().max_conns(900));
        assert_eq!((plan.capacity, plan.linger), (900, 99));
        let plan = plan_for(Config::default().max_conns(999));
        assert_eq!((plan.capacity, plan.linger), (999, 0), "all taken");
    }

    /// An audit finding: the plan ignored the descriptors the program had
    /// open already (another server in the process, a database pool), so
    /// it planned for numbers that were taken, and the shortfall came later
    /// as EMFILE. With 100 open beyond stdio, a limit of 1024 leaves 899
    /// numbers, not 999.
    #[test]
    fn descriptors_open_already_are_not_planned_with() {
        let sim = limits_of_1024();
        let stdio = sim.fd_table().len();
        let taken: Vec<_> = (0..100).map(|_| sim.placeholder().unwrap()).collect();
        assert_eq!(sim.fd_table().len(), stdio + taken.len());
        let config = Config::default().linger(Duration::ZERO);
        assert_eq!(plan(&sim, &config).unwrap().capacity, 899);
        let err = plan(&sim, &config.max_conns(950)).unwrap_err();
        assert!(matches!(err, StartError::FdLimit { .. }), "{err}");
        assert!(err.to_string().contains("100 open already"), "{err}");
    }

    /// A review finding: the error for an absurd `max_conns` overflowed
    /// adding the reserved numbers (a panic in debug builds, a wrong count
    /// in release ones).
    #[test]
    fn the_error_for_too_many_connections_counts_without_overflow() {
        let sim = limits_of_1024();
        let err = plan(&sim, &Config::default().max_conns(usize::MAX)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("need {} file descriptors", u64::MAX)),
            "{text}"
        );
    }
}
