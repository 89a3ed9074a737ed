//! `eserver serve`: run a built-in application until told to stop.
//!
//! Signals are blocked in every thread and received on the main thread:
//! SIGINT/SIGTERM start a graceful drain (stop accepting, flush queued
//! replies for up to `--drain-timeout`, close, print the final stats, exit
//! 0); a second one exits at once (status 1). SIGHUP prints the stats line.

use std::time::{Duration, Instant};

use eserver::apps::{EServerDemo, Echo, PubSub};
use eserver::framing::Framing;
use eserver::sys::signals::{self, Signal};
use eserver::{Config, Handler, IdleWait, Running, Server, WriteInterest};
use log::LevelFilter;

use crate::args::{App, LogLevel, ServeArgs};
use crate::logger;

/// Serves until stopped; returns the exit status.
pub fn run(args: ServeArgs) -> i32 {
    // Before any thread exists (the log writer's too), so that every
    // thread inherits the mask and the signals reach this one only.
    let blocked = signals::block_termination();
    logger::init(match args.log_level {
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warn => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
    });
    if let Err(e) = blocked {
        log::error!("blocking signals: {e}");
        return 2;
    }
    match serve(&args) {
        Ok(code) => code,
        Err(message) => {
            log::error!("{message}");
            2
        }
    }
}

fn serve(args: &ServeArgs) -> Result<i32, String> {
    let framing = Framing::from_name(&args.framing, args.max_frame)?;
    let mut config = Config {
        listen: args.listen.clone(),
        threads: args.threads,
        max_conns: args.max_conns,
        framing,
        max_out: args.max_out,
        max_out_total: args.max_out_total,
        max_in_total: args.max_in_total,
        idle_timeout: positive(args.idle_timeout),
        frame_timeout: positive(args.frame_timeout),
        send_timeout: positive(args.send_timeout),
        linger: positive(args.linger),
        write_interest: match args.write_interest {
            crate::args::WriteInterestArg::AfterEagain => WriteInterest::AfterEagain,
            crate::args::WriteInterestArg::Registered => WriteInterest::Registered,
        },
        idle_wait: match args.idle_wait {
            crate::args::IdleWaitArg::Standby => IdleWait::Standby {
                busy_below: std::time::Duration::from_micros(args.busy_below_us),
            },
            crate::args::IdleWaitArg::Poll => IdleWait::Poll,
        },
        ..Config::default()
    };
    config.listen_options.reuse_port = args.reuse_port;
    let running = match args.app {
        App::Echo => start(config, Echo)?,
        App::EserverDemo => start(config, EServerDemo)?,
        App::Pubsub => start(config, PubSub::default())?,
    };
    log::info!("serving {:?} with {} framing", args.app, args.framing);
    Ok(wait_for_signals(running, args))
}

fn start<H: Handler>(config: Config, handler: H) -> Result<Running, String> {
    Server::bind(config, handler)
        .and_then(Server::start)
        .map_err(|e| e.to_string())
}

/// A timeout from a number of seconds; 0 (or less) means none.
fn positive(s: f64) -> Option<Duration> {
    (s > 0.0).then(|| seconds(s))
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// How long after a worker's panic the server may take to stop (its
/// 1 s grace, then the drain's 1 s give-up, and a margin) before the
/// process exits without it.
const PANIC_WAIT: Duration = Duration::from_secs(5);

fn wait_for_signals(running: Running, args: &ServeArgs) -> i32 {
    let interval = seconds(args.stats_interval);
    // None: no periodic stats (an interval of 0, or one too long to add).
    let after_interval = || {
        (!interval.is_zero())
            .then(|| Instant::now().checked_add(interval))
            .flatten()
    };
    let mut next_stats = after_interval();
    let mut draining = false;
    let mut panicked_at: Option<Instant> = None;
    loop {
        let tick = if draining {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(250)
        };
        match signals::wait(tick) {
            Ok(Some(Signal::Interrupt | Signal::Terminate)) if draining => {
                log::warn!("second signal: exiting without waiting for the drain");
                log::info!("final stats: {}", running.handle().stats());
                // At once: not through `Running`'s drop, which joins the
                // workers, and a worker that does not finish would keep
                // the process.
                log::logger().flush();
                std::process::exit(1);
            }
            Ok(Some(signal @ (Signal::Interrupt | Signal::Terminate))) => {
                running.shutdown(seconds(args.drain_timeout));
                draining = true;
                log::info!("{signal:?}: draining (up to {:.1}s)", args.drain_timeout);
            }
            Ok(Some(Signal::HangUp)) => log::info!("stats: {}", running.handle().stats()),
            Ok(None) => {}
            Err(e) => log::error!("waiting for signals: {e}"),
        }
        if running.is_finished() {
            // Only a worker's panic stops the server without a signal (see
            // `Stats::worker_panics`). Exit 1, so a supervisor restarts it.
            let stats = running.join();
            log::info!("final stats: {stats}");
            if stats.worker_panics > 0 || !draining {
                log::error!(
                    "{} worker panic(s) stopped the server{}; exiting with status 1",
                    stats.worker_panics,
                    if draining { " during the drain" } else { "" }
                );
                return 1;
            }
            return 0;
        }
        // A panic's stop ends within its grace and the drain's give-up,
        // unless a worker never comes back (a handler that does not
        // return): then exit without it, as a second signal does.
        if panicked_at.is_none() && running.handle().stats().worker_panics > 0 {
            panicked_at = Some(Instant::now());
        }
        if panicked_at.is_some_and(|at| at.elapsed() >= PANIC_WAIT) {
            log::error!(
                "a worker panicked and the server has not stopped {PANIC_WAIT:?} later; exiting with status 1"
            );
            log::info!("final stats: {}", running.handle().stats());
            log::logger().flush();
            std::process::exit(1);
        }
        if next_stats.is_some_and(|at| Instant::now() >= at) {
            log::info!("stats: {}", running.handle().stats());
            next_stats = after_interval();
        }
    }
}
