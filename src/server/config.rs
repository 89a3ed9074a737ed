//! Server configuration, with defaults a demanding user can live with.

use std::net::{Ipv4Addr, SocketAddr};

use crate::framing::{Codec, Framing};
use crate::sys::{ListenAddr, ListenOptions};

/// The default listen address: 127.0.0.1:7878.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7878);

/// The default per-connection output limit: 1 MiB.
pub const DEFAULT_MAX_OUT: usize = 1 << 20;

/// The default server-wide output budget: 256 MiB across all connections.
pub const DEFAULT_MAX_OUT_TOTAL: usize = 256 << 20;

/// The default server-wide input budget: 256 MiB held for incomplete
/// frames across all connections (see [`Config::max_in_total`]).
pub const DEFAULT_MAX_IN_TOTAL: usize = 256 << 20;

/// The default read budget per turn: 256 KiB, then the connection goes to
/// the back of the line.
pub const DEFAULT_READ_BUDGET: usize = 256 << 10;

/// The default frame budget per turn: 256 frames, then the connection goes
/// to the back of the line.
pub const DEFAULT_FRAME_BUDGET: usize = 256;

/// The default number of events taken per `epoll_wait`.
pub const DEFAULT_EVENTS_PER_WAIT: usize = 256;

/// How long a close after flush waits, by default, for the peer to close
/// its end (see [`Config::linger`]): 5 seconds, nginx's `lingering_timeout`.
pub const DEFAULT_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// How long output may wait, the kernel taking none of it, before the
/// connection is closed, by default (see [`Config::send_timeout`]): a
/// minute, nginx's `send_timeout`.
pub const DEFAULT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a connection may hold an incomplete frame, completing none,
/// before it is closed, by default (see [`Config::frame_timeout`]): a
/// minute, nginx's `client_header_timeout`. On by default because it is
/// the slowloris defence, and a peer that is not attacking never needs a
/// minute for one frame (an 8 MiB frame at 140 KB/s).
pub const DEFAULT_FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The longest linger a config may ask for: a day.
pub const MAX_LINGER: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The most connections a pool gets when nothing else limits it.
pub const DEFAULT_MAX_CONNS_CAP: usize = 1 << 20;

/// Most worker threads a server takes: each has its own event array and
/// stack, so a mistyped count would otherwise abort on allocation before
/// anything could be said about it.
pub const MAX_THREADS: usize = 4096;

/// Most events taken per `epoll_wait` (the array is allocated per worker).
pub const MAX_EVENTS_PER_WAIT: usize = 1 << 16;

/// Most event entries all the workers' arrays hold together (12 bytes
/// each: 12 MiB), so that two values each in range cannot together ask for
/// gigabytes: [`MAX_THREADS`] workers at the default
/// [`DEFAULT_EVENTS_PER_WAIT`], or 16 at [`MAX_EVENTS_PER_WAIT`].
pub const MAX_EVENTS_TOTAL: usize = 1 << 20;

/// What to do when a send from elsewhere finds the receiver's output full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowReceiver {
    /// Refuse the send and close the receiver: a peer that does not read its
    /// replies cannot hold server memory or stall the senders (default).
    #[default]
    Close,
    /// Refuse the send (the caller sees `SendError::Full`) and count it; the
    /// receiver stays open.
    Refuse,
}

/// When a connection's registration asks for write-readiness (EPOLLOUT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteInterest {
    /// Invariant S: write first; arm EPOLLOUT with `EPOLL_CTL_MOD` only
    /// after a write met EAGAIN, and disarm it once the queue drains
    /// (default).
    #[default]
    AfterEagain,
    /// The common alternative, kept to measure S against: EPOLLOUT is in
    /// the registration for the connection's whole life (no `EPOLL_CTL_MOD`
    /// ever), and every event then carries write-readiness too.
    Registered,
}

/// How long a blocking `epoll_wait` that brought events may have taken and
/// still count as busy, waking a standing-by worker: 200 µs. Measured
/// (`BENCHMARKS.md`): at 10 µs only waits that found events already queued
/// counted, and with 1,000 connections at depth 1, where the server and the
/// client hand work back and forth, the second worker slept through
/// stretches it could have served; at 200 µs that scenario kept the
/// throughput of every worker polling, and depth 16 kept most of the CPU
/// saved.
pub const DEFAULT_BUSY_BELOW: std::time::Duration = std::time::Duration::from_micros(200);

/// How workers with nothing to do wait (see `core::standby`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleWait {
    /// One worker waits in `epoll_wait`; the others sleep on a futex until
    /// a wait returns events within `busy_below` (work arrives faster than
    /// one worker sleeps and wakes), and one more worker joins (default). At
    /// a load one worker carries, the others stay asleep instead of being
    /// woken for every few events, which saves CPU; the price is latency
    /// when bursts arrive while a worker sleeps (see `Poll`). A sleeping
    /// worker looks again every 10 ms and polls if nobody does, so a slow
    /// turn on the one polling worker (a slow handler) holds other
    /// connections' events back about that long at most, not for the whole
    /// turn.
    Standby {
        /// A wait that brought events in less than this counts as busy
        /// ([`DEFAULT_BUSY_BELOW`]).
        busy_below: std::time::Duration,
    },
    /// Every worker waits in `epoll_wait` on the shared epoll instance, and
    /// the kernel wakes one per new event. Costs more CPU per request, but
    /// every worker is there when a burst arrives: with clients that keep
    /// one request in flight it served a median 7 % more requests per
    /// second than standby in our runs (`BENCHMARKS.md`).
    Poll,
}

impl Default for IdleWait {
    fn default() -> Self {
        IdleWait::Standby {
            busy_below: DEFAULT_BUSY_BELOW,
        }
    }
}

/// How to run a server. `Config::default()` serves on 127.0.0.1:7878 with
/// one worker per CPU and length-prefixed little-endian frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Addresses to listen on (TCP, or `ListenAddr::Unix`). Empty: a
    /// client-only event loop, whose connections come from
    /// [`ServerHandle::connect`](crate::ServerHandle::connect).
    pub listen: Vec<ListenAddr>,
    /// Backlog and SO_REUSEPORT.
    pub listen_options: ListenOptions,
    /// Worker threads; 0 means one per available CPU.
    pub threads: usize,
    /// The most simultaneous connections; `None` sizes the pool from the
    /// file descriptor limit.
    pub max_conns: Option<usize>,
    /// The message framing.
    pub framing: Framing,
    /// Bytes queued for one connection past which sends from elsewhere are
    /// refused and the connection's own reader pauses.
    pub max_out: usize,
    /// Bytes queued across all connections past which sends are refused and
    /// readers with output queued pause: ten thousand slow readers, each
    /// paused at `max_out`, cannot add up to an out-of-memory.
    ///
    /// A soft bound. A reader with nothing queued is not paused (so readers
    /// that hold the budget cannot stall the others), and the replies of
    /// its turn are always taken: whatever the kernel does not take of them
    /// is queued past the budget. So each connection can add one turn's
    /// replies before it pauses: up to 64 KiB (a turn writes its replies
    /// once they reach that) plus the replies to one frame, whatever size
    /// the handler makes them (for echo, the frame's size, up to
    /// `max_frame`); `send_timeout` closes it if its peer then reads none
    /// of it. Keep `max_frame` (and so echo-like replies) small where many
    /// untrusted peers may send large frames and not read.
    pub max_out_total: usize,
    /// Bytes held for incomplete frames across all connections: a frame
    /// that needs more buffer than is left closes its connection
    /// (`CloseReason::InputBudget`), after the replies to its complete
    /// frames. Each connection's first 16 KiB of buffer are not counted, so
    /// frames up to 16 KiB (lines up to 12 KiB) always fit however a read
    /// cuts them; frames decoded straight from a read never count. Without
    /// it, peers sending large frames slowly could hold up to connections
    /// times `max_frame`.
    ///
    /// A soft bound: the tail of a read left over when a turn stops early
    /// (its frame budget spent, or its output over `max_out`) is counted
    /// but never refused (a buffer of at most 128 KiB per connection, kept
    /// until its next turn), so a client that pipelines small frames hard
    /// is never closed for it. Set it
    /// above the framing's `max_frame`: a frame larger than this plus 16 KiB
    /// can never be received (0 allows only frames that fit the 16 KiB).
    pub max_in_total: usize,
    /// Close a connection that has sent and received nothing for this long
    /// (`None`, zero, or over a century: never).
    pub idle_timeout: Option<std::time::Duration>,
    /// Close a connection that holds an incomplete frame, and completes no
    /// frame, for this long: the slowloris defence. On by default
    /// ([`DEFAULT_FRAME_TIMEOUT`]); `None`, zero, or over a century: never.
    pub frame_timeout: Option<std::time::Duration>,
    /// Close a connection whose output has waited this long with the
    /// kernel taking none of it: a peer that stopped reading would
    /// otherwise hold its queued output, its share of `max_out_total`, and
    /// a close after flush, for good. Checked once per timeout, so the close
    /// comes between one and two timeouts after the last write that the
    /// kernel took bytes from, and only if output waited all along. On by
    /// default ([`DEFAULT_SEND_TIMEOUT`]); `None`, zero, or over a
    /// century: never.
    pub send_timeout: Option<std::time::Duration>,
    /// How long a close after flush may wait for the peer to close its end
    /// (`None` or zero: not at all). Until then the server's FIN is out and
    /// input is read and dropped, so that bytes the peer sends late do not
    /// make the kernel reset the connection and drop replies still in its
    /// send buffer. At most a day (longer is a start error,
    /// `StartError::Config`).
    pub linger: Option<std::time::Duration>,
    /// Bytes read from one connection per turn before others get a turn.
    pub read_budget: usize,
    /// Frames dispatched for one connection per turn before others get a
    /// turn. Bytes alone do not bound a turn's time: 256 KiB of 8-byte
    /// frames is 32,768 handler calls. Frames read past the budget wait in
    /// the connection's read buffer for its next turn. A handler whose one
    /// frame does the work of many spends more of it
    /// ([`Ctx::spend`](crate::Ctx::spend)): a pub/sub publication a frame
    /// per subscriber.
    pub frame_budget: usize,
    /// Events taken per `epoll_wait`.
    pub events_per_wait: usize,
    /// Policy for sends from elsewhere to a connection whose output is full.
    pub slow_receiver: SlowReceiver,
    /// When EPOLLOUT is asked for (see [`WriteInterest`]).
    pub write_interest: WriteInterest,
    /// How idle workers wait (see [`IdleWait`]).
    pub idle_wait: IdleWait,
    /// Raise the soft RLIMIT_NOFILE to the hard limit at start.
    pub raise_nofile: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![ListenAddr::Tcp(DEFAULT_LISTEN)],
            listen_options: ListenOptions::default(),
            threads: 0,
            max_conns: None,
            framing: Framing::default(),
            max_out: DEFAULT_MAX_OUT,
            max_out_total: DEFAULT_MAX_OUT_TOTAL,
            max_in_total: DEFAULT_MAX_IN_TOTAL,
            idle_timeout: None,
            frame_timeout: Some(DEFAULT_FRAME_TIMEOUT),
            send_timeout: Some(DEFAULT_SEND_TIMEOUT),
            linger: Some(DEFAULT_LINGER),
            read_budget: DEFAULT_READ_BUDGET,
            frame_budget: DEFAULT_FRAME_BUDGET,
            events_per_wait: DEFAULT_EVENTS_PER_WAIT,
            slow_receiver: SlowReceiver::default(),
            write_interest: WriteInterest::default(),
            idle_wait: IdleWait::default(),
            raise_nofile: true,
        }
    }
}

impl Config {
    /// Listens nowhere: a client-only event loop, whose connections all
    /// come from [`ServerHandle::connect`](crate::ServerHandle::connect).
    pub fn without_listeners(mut self) -> Self {
        self.listen.clear();
        self
    }

    /// Listens on `addr` only.
    pub fn listen(mut self, addr: impl Into<ListenAddr>) -> Self {
        self.listen = vec![addr.into()];
        self
    }

    /// Uses `threads` workers (0: one per CPU; at most [`MAX_THREADS`]).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Uses `framing`.
    pub fn framing(mut self, framing: Framing) -> Self {
        self.framing = framing;
        self
    }

    /// Allows at most `max_conns` connections.
    pub fn max_conns(mut self, max_conns: usize) -> Self {
        self.max_conns = Some(max_conns);
        self
    }

    /// Sets the per-connection output limit.
    pub fn max_out(mut self, max_out: usize) -> Self {
        self.max_out = max_out;
        self
    }

    /// Lets a close after flush wait up to `time` for the peer's FIN (zero:
    /// not at all; see [`Config::linger`]).
    pub fn linger(mut self, time: std::time::Duration) -> Self {
        self.linger = Some(time);
        self
    }

    /// Closes a connection whose output waits `time` with the kernel taking
    /// none of it (see [`Config::send_timeout`]).
    pub fn send_timeout(mut self, time: std::time::Duration) -> Self {
        self.send_timeout = Some(time);
        self
    }

    /// The worker count this config resolves to.
    pub fn worker_count(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Checks values that would make the server misbehave rather than fail.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_out == 0 {
            return Err("max_out must be at least 1 byte".into());
        }
        if self.max_out_total == 0 {
            // Every send would be refused, and every reader with output
            // paused: a server that cannot work.
            return Err("max_out_total must be at least 1 byte".into());
        }
        if self.read_budget == 0 {
            return Err("read_budget must be at least 1 byte".into());
        }
        if self.frame_budget == 0 {
            return Err("frame_budget must be at least 1 frame".into());
        }
        if self.events_per_wait == 0 || self.events_per_wait > MAX_EVENTS_PER_WAIT {
            return Err(format!(
                "events_per_wait {} is out of range: 1 to {MAX_EVENTS_PER_WAIT}",
                self.events_per_wait
            ));
        }
        if self.threads > MAX_THREADS {
            return Err(format!(
                "threads {} is more than the most a server takes, {MAX_THREADS}",
                self.threads
            ));
        }
        let workers = self.worker_count();
        if workers.saturating_mul(self.events_per_wait) > MAX_EVENTS_TOTAL {
            return Err(format!(
                "{workers} threads of events_per_wait {} each hold more event entries than a \
                 server takes, {MAX_EVENTS_TOTAL}: lower one of them",
                self.events_per_wait
            ));
        }
        if let Some(linger) = self.linger.filter(|t| *t > MAX_LINGER) {
            return Err(format!(
                "linger {linger:?} is longer than the most a server waits, {MAX_LINGER:?}"
            ));
        }
        if self.max_conns == Some(0) {
            return Err("max_conns must be at least 1".into());
        }
        if self.framing.max_payload() == 0 {
            // Only empty frames pass: a peer that sends any payload is
            // closed.
            return Err("the framing's max_frame must be at least 1 byte".into());
        }
        // The second of two overlapping addresses would fail to bind with
        // EADDRINUSE, reported as another process listening there (or,
        // with `reuse_port`, be taken silently as a second listener).
        for (i, a) in self.listen.iter().enumerate() {
            if let Some(b) = self.listen[..i].iter().find(|b| overlap(a, b)) {
                return Err(format!(
                    "listen addresses {b} and {a} overlap (the same socket path, or the same port on the same or every address): list each once"
                ));
            }
        }
        Ok(())
    }
}

/// Whether one server cannot listen on both `a` and `b`. Port 0 never
/// overlaps (each bind picks a free port); IPv4 and IPv6 addresses are
/// kept apart (an IPv6 listener is bound IPv6-only).
fn overlap(a: &ListenAddr, b: &ListenAddr) -> bool {
    match (a, b) {
        (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => {
            a.port() != 0
                && a.port() == b.port()
                && a.is_ipv4() == b.is_ipv4()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        }
        (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
        _ => false,
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        ListenAddr::Tcp(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A review finding: `max_out_total` 0 was taken, and the server then
    /// refused every send.
    #[test]
    fn limits_of_zero_are_refused() {
        let zero_total = Config {
            max_out_total: 0,
            ..Config::default()
        };
        assert_eq!(
            zero_total.validate(),
            Err("max_out_total must be at least 1 byte".into())
        );
        assert!(Config::default().max_out(0).validate().is_err());
        assert_eq!(Config::default().validate(), Ok(()));
    }

    /// An audit's finding: the worker count and the events per wait were
    /// each bounded, not their product, so a config in range could ask
    /// for gigabytes of event arrays and abort rather than be refused.
    #[test]
    fn threads_and_events_per_wait_are_bounded_together() {
        let config = |threads, events_per_wait| Config {
            threads,
            events_per_wait,
            ..Config::default()
        };
        assert!(
            config(MAX_THREADS, DEFAULT_EVENTS_PER_WAIT)
                .validate()
                .is_ok()
        );
        assert!(config(16, MAX_EVENTS_PER_WAIT).validate().is_ok());
        // Each in range, 3 GiB of event arrays together (an audit's finding).
        let error = config(MAX_THREADS, MAX_EVENTS_PER_WAIT)
            .validate()
            .unwrap_err();
        assert!(error.contains("event entries"), "{error}");
        assert!(!error.contains("  "), "{error:?}");
        assert!(config(17, MAX_EVENTS_PER_WAIT).validate().is_err());
    }

    /// An audit's finding: a repeated `--listen` address (or a port on
    /// every address and on one) was taken, and the second bind's
    /// EADDRINUSE was reported as another process listening there.
    #[test]
    fn overlapping_listen_addresses_are_refused() {
        let config = |addrs: &[&str]| Config {
            listen: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ..Config::default()
        };
        for refused in [
            &["127.0.0.1:7878", "127.0.0.1:7878"][..],
            &["0.0.0.0:7878", "127.0.0.1:7878"],
            &["[::1]:7878", "[::]:7878"],
            &["unix:/tmp/a.sock", "127.0.0.1:1", "unix:/tmp/a.sock"],
        ] {
            let error = config(refused).validate().unwrap_err();
            assert!(error.contains("overlap"), "{refused:?}: {error}");
            // A review found a lost line continuation in this message.
            assert!(
                !error.contains("  "),
                "{refused:?}: a run of spaces in {error:?}"
            );
        }
        for taken in [
            &["127.0.0.1:0", "127.0.0.1:0"][..],
            &["127.0.0.1:7878", "127.0.0.2:7878"],
            &["127.0.0.1:7878", "[::1]:7878"],
            &["0.0.0.0:7878", "[::]:7878"],
            &["127.0.0.1:7878", "127.0.0.1:7879"],
            &["unix:/tmp/a.sock", "unix:/tmp/b.sock"],
        ] {
            assert_eq!(config(taken).validate(), Ok(()), "{taken:?}");
        }
    }

    /// An audit finding: a `max_frame` of 0 (`--max-frame 0`) was taken, and
    /// the server then closed every peer that sent a payload.
    #[test]
    fn a_max_frame_of_zero_is_refused() {
        for name in ["len-le", "len-be", "lines"] {
            let framing = Framing::from_name(name, 0).unwrap();
            assert_eq!(
                Config::default().framing(framing).validate(),
                Err("the framing's max_frame must be at least 1 byte".into()),
                "{name}"
            );
            let framing = Framing::from_name(name, 1).unwrap();
            assert_eq!(Config::default().framing(framing).validate(), Ok(()));
        }
        let raw = Framing::from_name("raw", 0).unwrap();
        assert_eq!(Config::default().framing(raw).validate(), Ok(()));
    }
}
