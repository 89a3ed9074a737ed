//! Command-line arguments.

use clap::{Args, Parser, Subcommand, ValueEnum};
use eserver::ListenAddr;
use eserver::server::config::MAX_LINGER;

/// A hardened, multi-threaded, edge-triggered epoll TCP server.
#[derive(Debug, Parser)]
#[command(
    name = "eserver",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `eserver [OPTIONS]` is `eserver serve [OPTIONS]`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an application (the default: `eserver [OPTIONS]` serves too).
    Serve(ServeArgs),
    /// Load a server and verify every reply: throughput and latency.
    Bench(crate::bench::BenchArgs),
}

/// The built-in applications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum App {
    /// Reply to each frame with its payload.
    #[default]
    Echo,
    /// Reply `^^^` + payload + payload + `$$$`, unframed (the original EServer demo).
    EserverDemo,
    /// Topic fan-out: SUB topic, UNSUB topic, PUB topic payload.
    Pubsub,
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// Start, stop, stats, rejected peers.
    #[default]
    Info,
    /// Every connection's close, with its reason.
    Debug,
}

/// `eserver serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: IP:PORT (an IPv4 or [IPv6] address; host names are
    /// not looked up) or unix:PATH. Repeatable.
    #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:7878")]
    pub listen: Vec<ListenAddr>,
    /// Worker threads (default: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Message framing: len-le (EServer's wire format), len-be, lines, raw.
    #[arg(long, default_value = "len-le")]
    pub framing: String,
    /// The application to serve.
    #[arg(long, value_enum, default_value_t = App::Echo)]
    pub app: App,
    /// Most simultaneous connections (default: sized from RLIMIT_NOFILE, at
    /// most 2^20).
    #[arg(long)]
    pub max_conns: Option<usize>,
    /// Largest frame accepted (bytes; K/M/G suffixes, powers of 1024;
    /// default 8M). Not used by raw framing.
    #[arg(long, value_parser = parse_size)]
    pub max_frame: Option<usize>,
    /// Output queued per connection before its reader pauses and sends from
    /// other connections are refused (bytes; K/M/G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub max_out: usize,
    /// Output queued across all connections past which sends are refused and
    /// readers pause (bytes; K/M/G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub max_out_total: usize,
    /// Input held for incomplete frames across all connections, past which
    /// a frame that needs more closes its connection (bytes; K/M/G
    /// suffixes; each connection's first 16K not counted).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub max_in_total: usize,
    /// Seconds without a byte either way after which a connection is closed
    /// (0: never).
    #[arg(long, value_parser = parse_seconds, default_value_t = 0.0)]
    pub idle_timeout: f64,
    /// Seconds a connection may hold an incomplete frame without completing
    /// one before it is closed: the slowloris defence (0: never).
    #[arg(long, value_parser = parse_seconds, default_value_t = 60.0)]
    pub frame_timeout: f64,
    /// Seconds output may wait with the peer reading none of it before the
    /// connection is closed: a peer that stops reading frees its queued
    /// output (0: never).
    #[arg(long, value_parser = parse_seconds, default_value_t = 60.0)]
    pub send_timeout: f64,
    /// Seconds a close after flush waits for the peer to close its end,
    /// reading and dropping what it still sends, so that late bytes do not
    /// make the kernel reset the connection and drop the last replies (0:
    /// close at once; at most a day).
    #[arg(long, value_parser = parse_linger, default_value_t = 5.0)]
    pub linger: f64,
    /// Seconds to flush queued replies after SIGINT/SIGTERM before closing anyway.
    #[arg(long, value_parser = parse_seconds, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// Seconds between stats lines (0: none).
    #[arg(long, value_parser = parse_seconds, default_value_t = 5.0)]
    pub stats_interval: f64,
    /// Set SO_REUSEPORT, so several processes can share the port.
    #[arg(long)]
    pub reuse_port: bool,
    /// When to ask for EPOLLOUT: after-eagain (invariant S, the default), or
    /// registered for the connection's life (the common alternative, kept to
    /// measure S against; see BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = WriteInterestArg::AfterEagain)]
    pub write_interest: WriteInterestArg,
    /// How idle workers wait: standby (one worker in epoll_wait, the others
    /// asleep until work piles up; the default), or poll (every worker in
    /// epoll_wait, kept to measure standby against; see BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = IdleWaitArg::Standby)]
    pub idle_wait: IdleWaitArg,
    /// With standby: microseconds under which a wait that brought events
    /// counts as busy and wakes a standing-by worker (default 200).
    #[arg(long)]
    pub busy_below_us: Option<u64>,
    /// Log verbosity.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

/// `--write-interest` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum WriteInterestArg {
    /// Arm EPOLLOUT only after EAGAIN; disarm when drained.
    #[default]
    AfterEagain,
    /// EPOLLOUT in the registration, never modified.
    Registered,
}

/// `--idle-wait` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum IdleWaitArg {
    /// One worker polls; the others stand by until a wait finds work waiting.
    #[default]
    Standby,
    /// Every worker waits in epoll_wait.
    Poll,
}

impl Default for ServeArgs {
    fn default() -> Self {
        // Same values as the clap defaults above, for `eserver` with no arguments.
        match Cli::try_parse_from(["eserver"]) {
            Ok(Cli {
                command: None,
                serve,
            }) => serve,
            _ => unreachable!("the default serve arguments parse"),
        }
    }
}

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    s.parse()
}

/// Seconds: a number, 0 or more (`inf` allowed: never); a positive one
/// must be at least a nanosecond (less would be a zero timeout).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let seconds: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if seconds.is_nan() || seconds < 0.0 {
        return Err(format!("{s:?} is not a number of seconds, 0 or more"));
    }
    if seconds > 0.0 && seconds < 1e-9 {
        return Err(format!("{s:?} is shorter than a nanosecond (0 means none)"));
    }
    Ok(seconds)
}

/// `--linger`: seconds, as [`parse_seconds`], but at most a day (the most
/// a server waits for a peer; no "never", which would let one idle peer
/// hold a socket for good).
pub fn parse_linger(s: &str) -> Result<f64, String> {
    let seconds = parse_seconds(s)?;
    if seconds > MAX_LINGER.as_secs_f64() {
        return Err(format!(
            "{s:?} is longer than a linger may be, {} seconds (a day)",
            MAX_LINGER.as_secs()
        ));
    }
    Ok(seconds)
}

/// `4096`, `64K`, `8M`, `1G` (also `KiB`, `MiB`, `GiB`): bytes, powers of 1024.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: usize = number.parse().map_err(|e: std::num::ParseIntError| {
        if *e.kind() == std::num::IntErrorKind::PosOverflow {
            format!("{s:?} is too large")
        } else {
            format!("{s:?} is not a size (e.g. 4096, 64K, 8M)")
        }
    })?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit {other:?} (use K, M or G)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert!(parse_size("8X").is_err());
        assert!(parse_size("").is_err());
        // Too many digits is too large, not "not a size" (an audit's
        // finding); and so is a unit that overflows.
        assert_eq!(
            parse_size("99999999999999999999"),
            Err("\"99999999999999999999\" is too large".to_string())
        );
        assert_eq!(
            parse_size("99999999999G"),
            Err("\"99999999999G\" is too large".to_string())
        );
    }

    /// The README's synopsis, `eserver [serve] [OPTIONS]`: serve options
    /// work without the subcommand (they used to be refused as unexpected).
    #[test]
    fn serve_options_without_the_subcommand_are_serve_options() {
        let cli = Cli::try_parse_from(["eserver", "--threads", "3", "--linger", "2"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!((cli.serve.threads, cli.serve.linger), (3, 2.0));
        let cli = Cli::try_parse_from(["eserver", "serve", "--threads", "3"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(s)) if s.threads == 3));
        assert!(
            Cli::try_parse_from(["eserver", "--threads", "3", "bench"]).is_err(),
            "serve options before another command"
        );
    }

    /// A review finding: NaN and negative seconds were taken as "none" or
    /// 0 (`--drain-timeout NaN` dropped every queued reply at SIGTERM), and
    /// a positive value under a nanosecond became a zero timeout that closed
    /// every connection at once.
    #[test]
    fn nonsense_seconds_are_refused() {
        for option in [
            "--idle-timeout",
            "--frame-timeout",
            "--send-timeout",
            "--linger",
            "--drain-timeout",
            "--stats-interval",
        ] {
            let linger = option == "--linger";
            for value in ["NaN", "-1", "1e-12", "soon"] {
                let parsed = Cli::try_parse_from(["eserver", &format!("{option}={value}")]);
                assert!(parsed.is_err(), "{option} {value} was taken");
            }
            for value in ["0", "0.5", "86400", "inf"] {
                let parsed = Cli::try_parse_from(["eserver", option, value]);
                // A linger is at most a day: refused here, not at start.
                let taken = !(linger && value == "inf");
                assert_eq!(parsed.is_ok(), taken, "{option} {value}");
            }
        }
        let err = parse_seconds("NaN").unwrap_err();
        assert!(err.contains("NaN"), "{err}");
        let err = parse_linger("86401").unwrap_err();
        assert!(err.contains("a day"), "{err}");
    }

    #[test]
    fn no_arguments_serve_the_defaults() {
        let args = ServeArgs::default();
        assert_eq!(args.app, App::Echo);
        assert_eq!(args.framing, "len-le");
        assert_eq!(
            args.listen,
            vec!["127.0.0.1:7878".parse::<ListenAddr>().unwrap()]
        );
    }

    /// A host name is refused with a word on why (an audit's finding: the
    /// error said "neither HOST:PORT", which `localhost:7878` is).
    #[test]
    fn a_listen_address_must_be_an_ip_address() {
        let err = "localhost:7878".parse::<ListenAddr>().unwrap_err();
        assert!(err.contains("host names are not looked up"), "{err}");
        assert!("[::1]:7878".parse::<ListenAddr>().is_ok());
        let err = "unix:".parse::<ListenAddr>().unwrap_err();
        assert!(err.contains("needs a path"), "{err}");
    }

    /// The binary's timeouts are the library's: a drop-in server defends
    /// itself (the frame timeout, the slowloris defence, included) without
    /// flags.
    #[test]
    fn the_binary_timeouts_are_the_library_defaults() {
        use eserver::server::config::{
            DEFAULT_FRAME_TIMEOUT, DEFAULT_LINGER, DEFAULT_SEND_TIMEOUT,
        };
        let args = ServeArgs::default();
        let config = eserver::Config::default();
        let secs = |d: std::time::Duration| d.as_secs_f64();
        assert_eq!(args.frame_timeout, secs(DEFAULT_FRAME_TIMEOUT));
        assert_eq!(config.frame_timeout, Some(DEFAULT_FRAME_TIMEOUT));
        assert_eq!(args.send_timeout, secs(DEFAULT_SEND_TIMEOUT));
        assert_eq!(config.send_timeout, Some(DEFAULT_SEND_TIMEOUT));
        assert_eq!(args.linger, secs(DEFAULT_LINGER));
        assert_eq!(config.linger, Some(DEFAULT_LINGER));
        // Off by default: quiet long-lived connections (pub/sub
        // subscribers) are normal, and the pool bounds how many there are.
        assert_eq!(args.idle_timeout, 0.0);
        assert_eq!(config.idle_timeout, None);
    }
}
