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
use eserver::{Config, Handler, IdleWait, Running, Server, StartError, WriteInterest};
use log::LevelFilter;

use crate::args::{App, IdleWaitArg, LogLevel, ServeArgs};
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

/// The largest frame when `--max-frame` is not given.
const DEFAULT_MAX_FRAME: usize = 8 << 20;

/// Refuses settings that contradict each other, and warns of flags the
/// other settings make meaningless (a setting silently ignored would look
/// like one that works).
fn check_settings(args: &ServeArgs, max_frame: usize) -> Result<(), String> {
    if args.app == App::Pubsub {
        if args.framing == "raw" {
            return Err(
                "--app pubsub needs message boundaries: --framing raw has none \
                 (use len-le, len-be or lines)"
                    .into(),
            );
        }
        if max_frame < eserver::apps::pubsub::LONGEST_REPLY {
            return Err(format!(
                "--max-frame {max_frame} is too small for --app pubsub: its replies take up \
                 to {} bytes (OK UNSUB and a 256-byte topic)",
                eserver::apps::pubsub::LONGEST_REPLY
            ));
        }
    }
    if args.framing == "raw" && args.max_frame.is_some() {
        log::warn!("--max-frame has no effect with --framing raw (no frames)");
    }
    if args.idle_wait == IdleWaitArg::Poll && args.busy_below_us.is_some() {
        log::warn!("--busy-below-us has no effect with --idle-wait poll");
    }
    if args.framing != "raw" && args.max_in_total < max_frame {
        log::warn!(
            "--max-in-total {} is below --max-frame {max_frame}: a frame longer than {} bytes \
             (the budget and the 16K each connection holds outside it) closes its connection",
            args.max_in_total,
            args.max_in_total.saturating_add(16 << 10)
        );
    }
    Ok(())
}

fn serve(args: &ServeArgs) -> Result<i32, String> {
    let max_frame = args.max_frame.unwrap_or(DEFAULT_MAX_FRAME);
    check_settings(args, max_frame)?;
    let framing = Framing::from_name(&args.framing, max_frame).map_err(|e| with_flag_names(&e))?;
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
            IdleWaitArg::Standby => IdleWait::Standby {
                busy_below: args
                    .busy_below_us
                    .map_or(eserver::server::config::DEFAULT_BUSY_BELOW, |us| {
                        std::time::Duration::from_micros(us)
                    }),
            },
            IdleWaitArg::Poll => IdleWait::Poll,
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
        .map_err(|e| match e {
            StartError::Config(why) => {
                format!("invalid configuration: {}", with_flag_names(&why))
            }
            e => e.to_string(),
        })
}

/// A configuration refusal in the words of the command line: the library
/// names its `Config` fields, the user typed flags.
fn with_flag_names(why: &str) -> String {
    // Longest first: `max_out` is the start of `max_out_total`.
    const NAMES: [(&str, &str); 7] = [
        ("max_out_total", "--max-out-total"),
        ("max_out", "--max-out"),
        ("max_conns", "--max-conns"),
        ("threads", "--threads"),
        ("linger", "--linger"),
        ("the framing's max_frame", "--max-frame"),
        ("listen addresses", "--listen addresses"),
    ];
    for (field, flag) in NAMES {
        if let Some(rest) = why.strip_prefix(field) {
            if rest.starts_with(' ') {
                return format!("{flag}{rest}");
            }
        }
    }
    why.to_string()
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
