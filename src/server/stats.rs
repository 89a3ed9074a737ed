//! Counters: what the server did, by kind, since it started.
//!
//! Workers count into a plain per-worker [`Tally`] on the hot path and merge
//! it into the shared atomics once per event batch, so two workers never
//! fight over a counter's cache line per message. Sends from other threads
//! count into the atomics directly. All counters are `Relaxed`: they are
//! reports, never used to decide anything.

use std::fmt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crate::core::CloseReason;
use crate::sys::Errno;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Plain counters, added up by one thread.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Tally {
            $( $(#[$doc])* pub $name: u64, )*
            /// Connections closed, by [`CloseReason::index`].
            pub closed: [u64; CloseReason::ALL.len()],
            /// The most bytes seen queued for one connection (a maximum,
            /// not a sum).
            pub queue_peak: u64,
        }

        /// The shared, atomic counters.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( $name: AtomicU64, )*
            closed: [AtomicU64; CloseReason::ALL.len()],
            accept_errors: AcceptErrors,
            queue_peak: AtomicU64,
        }

        impl Counters {
            /// Adds `tally` and zeroes it.
            pub(crate) fn merge(&self, tally: &mut Tally) {
                $( if tally.$name != 0 { self.$name.fetch_add(tally.$name, Ordering::Relaxed); } )*
                for (slot, n) in self.closed.iter().zip(tally.closed.iter()) {
                    if *n != 0 {
                        slot.fetch_add(*n, Ordering::Relaxed);
                    }
                }
                if tally.queue_peak != 0 {
                    self.queue_peak.fetch_max(tally.queue_peak, Ordering::Relaxed);
                }
                *tally = Tally::default();
            }

            /// A consistent-enough copy of every counter.
            pub(crate) fn snapshot(&self, now: Now) -> Stats {
                Stats {
                    open: now.open,
                    lingering: now.lingering,
                    input_held: now.input_held,
                    timers: now.timers,
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                    closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
                    accept_errors: self.accept_errors.snapshot(),
                    queue_peak: self.queue_peak.load(Ordering::Relaxed),
                }
            }
        }

        /// A snapshot of the server's counters ([`crate::ServerHandle::stats`]).
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct Stats {
            /// Connections open now.
            pub open: u64,
            /// Closed connections whose sockets linger now, waiting for
            /// their peers' FIN (see [`crate::Config::linger`]).
            pub lingering: u64,
            /// Bytes held now for incomplete frames, across connections,
            /// against [`crate::Config::max_in_total`] (each connection's
            /// first bytes uncharged).
            pub input_held: u64,
            /// Timer entries scheduled now, those of closed connections not
            /// yet dropped included: at most twice the live entries at the
            /// heap's last compaction (at least 1,024), so bounded by the
            /// connections open at a time, not by how many came and went
            /// (see `server::timers`).
            pub timers: u64,
            $( $(#[$doc])* pub $name: u64, )*
            /// Connections closed, by [`CloseReason::index`].
            pub closed: [u64; CloseReason::ALL.len()],
            /// Accept failures, by errno: EMFILE, ENFILE, ECONNABORTED,
            /// ENOBUFS (ENOMEM counted with it), the first eight other
            /// errnos seen each apart, and any further errnos together as
            /// `Errno(0)`. Kinds never seen are left out. An accepted
            /// connection that epoll would not register (ENOSPC: the
            /// watch limit), or that could not be `dup2`'d onto its slot's
            /// number, counts here too, under that call's errno: it was
            /// never served.
            pub accept_errors: Vec<(Errno, u64)>,
            /// The most bytes seen queued for one connection.
            pub queue_peak: u64,
        }

        impl Stats {
            /// Every counter of the list, by name, in declaration order:
            /// the stats line shows each one that is not zero.
            fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name), )*]
            }

            /// A snapshot with only the `which`th listed counter set, to
            /// `value`.
            #[cfg(test)]
            fn one_counter_set(which: usize, value: u64) -> Stats {
                let mut at = 0;
                let mut next = || {
                    at += 1;
                    if at - 1 == which { value } else { 0 }
                };
                Stats {
                    $( $name: next(), )*
                    ..Stats::default()
                }
            }

            /// A snapshot whose listed counters are each `base` plus
            /// their position: every one distinct and not zero.
            #[cfg(test)]
            fn every_counter_set(base: u64) -> Stats {
                let mut n = base;
                let mut next = || {
                    n += 1;
                    n
                };
                Stats {
                    $( $name: next(), )*
                    ..Stats::default()
                }
            }
        }
    };
}

/// The counters the stats line shows in its first part (always) or in a
/// group of their own (when one of the group is not zero); the rest are
/// shown each when not zero.
const SHOWN_IN_GROUPS: [&str; 18] = [
    "accepted",
    "msgs_in",
    "msgs_out",
    "bytes_in",
    "bytes_out",
    "stale_events",
    "epollout_arms",
    "reader_pauses",
    "pool_full",
    "sends_full",
    "standbys",
    "standby_wakes",
    "lingers",
    "lingers_cut",
    "lingers_refused",
    "worker_panics",
    "connects",
    "connected",
];

counters! {
    /// Connections accepted.
    accepted,
    /// Outbound connections started (`ServerHandle::connect`).
    connects,
    /// Outbound connects whose completion the connection's read side saw
    /// (`on_open` runs next, unless the dial was closed while connecting:
    /// then `on_connect_failed`). A dial whose close was carried out before
    /// that look (a close after flush that its first write completed) is
    /// not counted, though the kernel completed its connect.
    connected,
    /// Frames received and dispatched to the handler.
    msgs_in,
    /// Replies and sends queued or written.
    msgs_out,
    /// Payload and header bytes read.
    bytes_in,
    /// Bytes written.
    bytes_out,
    /// Events for a connection generation that is gone (ignored).
    stale_events,
    /// Times write-readiness (EPOLLOUT) was armed after EAGAIN. With
    /// [`crate::WriteInterest::Registered`], where EPOLLOUT stays in every
    /// registration and no `epoll_ctl` arms it, one per connection whose
    /// output met EAGAIN (its writer then holds the interest as armed for
    /// good), not one per EAGAIN.
    epollout_arms,
    /// Times a reader stopped because its output was over `max_out`, or
    /// because it had output queued while the server-wide output budget
    /// (`max_out_total`) was over.
    reader_pauses,
    /// Read sides requeued: a turn cut short by the read or frame budget,
    /// an activation that ran its turns in a row (a peer that keeps
    /// sending yields the worker to the rest of its events), or a paused
    /// turn resumed by its own later flush.
    budget_requeues,
    /// Accept attempts that found every slot busy (connection left pending).
    pool_full,
    /// Sends refused because the target's output was full (or the message
    /// alone was larger than its limit).
    sends_full,
    /// Sends refused because the target was closed or the handle stale.
    sends_closed,
    /// Slots taken out of service: their number could not be made safe, or
    /// their generation wrapped (2^32 connections served).
    slots_retired,
    /// Free slots' numbers given back so `accept` or a dial could run after
    /// EMFILE.
    numbers_released,
    /// Closes after flush whose socket lingered for the peer's FIN (see
    /// [`crate::Config::linger`]).
    lingers,
    /// Lingering closes ended by the linger time, the drop budget or the
    /// shutdown drain's forced close, not by the peer (their peers may see
    /// a reset).
    lingers_cut,
    /// Closes after flush that should have lingered but could not (the
    /// descriptor budget's share for lingering used up, EMFILE, a failed
    /// epoll registration, or the server torn down): closed at once.
    lingers_refused,
    /// Times a worker stood by (slept on the standby futex while another
    /// worker polled; see [`crate::IdleWait`]). A sleep lasts 10 ms at
    /// most; one that ends quietly and is taken again counts again, so an
    /// idle server's standing workers add up to 100 a second each.
    standbys,
    /// Times a poller found work waiting and woke a standing-by worker that
    /// slept (at most `standbys`: wake-ups for stop, drain and
    /// `set_active_workers` are not counted).
    standby_wakes,
    /// Workers that panicked: a bug in eserver, not in a handler (handler
    /// panics are caught and close only their connection). Each starts a
    /// shutdown.
    worker_panics,
}

impl Stats {
    /// Connections closed, all reasons together.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }

    /// Connections closed for `reason`.
    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()]
    }

    /// Accept failures of `errno`'s kind (see [`Stats::accept_errors`]:
    /// `Errno(0)` for the errnos past those counted apart).
    pub fn accept_errors_for(&self, errno: Errno) -> u64 {
        self.accept_errors
            .iter()
            .find(|(e, _)| *e == errno)
            .map_or(0, |(_, n)| *n)
    }
}

impl fmt::Display for Stats {
    /// The one-line stats log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "open={} accepted={} closed={} msgs_in={} msgs_out={} bytes_in={} bytes_out={} stale_events={} epollout_arms={} pauses={} pool_full={} sends_full={}",
            self.open,
            self.accepted,
            self.closed_total(),
            self.msgs_in,
            self.msgs_out,
            self.bytes_in,
            self.bytes_out,
            self.stale_events,
            self.epollout_arms,
            self.reader_pauses,
            self.pool_full,
            self.sends_full,
        )?;
        let reasons: Vec<String> = CloseReason::ALL
            .iter()
            .filter(|r| self.closed[r.index()] > 0)
            .map(|r| format!("{}={}", r.name(), self.closed[r.index()]))
            .collect();
        if !reasons.is_empty() {
            write!(f, " closed_by=[{}]", reasons.join(","))?;
        }
        if self.standbys > 0 || self.standby_wakes > 0 {
            write!(
                f,
                " standbys={} standby_wakes={}",
                self.standbys, self.standby_wakes
            )?;
        }
        if self.lingers > 0 || self.lingers_cut > 0 || self.lingers_refused > 0 {
            write!(
                f,
                " lingering={} lingers={} lingers_cut={} lingers_refused={}",
                self.lingering, self.lingers, self.lingers_cut, self.lingers_refused
            )?;
        }
        if self.worker_panics > 0 {
            write!(f, " worker_panics={}", self.worker_panics)?;
        }
        if self.input_held > 0 {
            write!(f, " input_held={}", self.input_held)?;
        }
        if self.timers > 0 {
            write!(f, " timers={}", self.timers)?;
        }
        if self.connects > 0 || self.connected > 0 {
            // Only a server that makes outbound connections shows them.
            write!(
                f,
                " connects={} connected={}",
                self.connects, self.connected
            )?;
        }
        for (name, value) in self.counters() {
            if value > 0 && !SHOWN_IN_GROUPS.contains(&name) {
                write!(f, " {name}={value}")?;
            }
        }
        if self.queue_peak > 0 {
            write!(f, " queue_peak={}", self.queue_peak)?;
        }
        if !self.accept_errors.is_empty() {
            let errors: Vec<String> = self
                .accept_errors
                .iter()
                .map(|(e, n)| match (e.0, e.name()) {
                    (0, _) => format!("others={n}"),
                    (raw, "errno") => format!("errno{raw}={n}"),
                    (_, name) => format!("{name}={n}"),
                })
                .collect();
            write!(f, " accept_errors=[{}]", errors.join(","))?;
        }
        Ok(())
    }
}

/// The figures a snapshot reads from the server's state rather than from
/// the counters.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Now {
    pub open: u64,
    pub lingering: u64,
    pub input_held: u64,
    pub timers: u64,
}

/// Accept errors by errno: a few well-known ones, then the first
/// [`OTHER_ERRNOS`] others each apart, then the rest together.
///
/// Each errno has its own count so that the log's "1st, 2nd, 4th, 8th..."
/// rule applies per errno: with one shared count, the first of a second
/// unknown errno could fall on, say, the 3rd shared failure and never be
/// logged.
#[derive(Debug, Default)]
struct AcceptErrors {
    emfile: AtomicU64,
    enfile: AtomicU64,
    econnaborted: AtomicU64,
    enobufs: AtomicU64,
    others: [OtherErrno; OTHER_ERRNOS],
    rest: AtomicU64,
}

/// How many errnos, besides the well-known ones, are counted apart.
const OTHER_ERRNOS: usize = 8;

/// One errno's count, claimed by the first failure with that errno.
#[derive(Debug, Default)]
struct OtherErrno {
    /// 0 while unclaimed; then the errno, for good.
    errno: AtomicI32,
    count: AtomicU64,
}

impl AcceptErrors {
    fn counter(&self, errno: Errno) -> &AtomicU64 {
        match errno {
            Errno::EMFILE => &self.emfile,
            Errno::ENFILE => &self.enfile,
            Errno::ECONNABORTED => &self.econnaborted,
            Errno::ENOBUFS | Errno::ENOMEM => &self.enobufs,
            // Errno 0 is the unclaimed mark; a kernel never returns it.
            Errno(0) => &self.rest,
            Errno(e) => self.other(e).unwrap_or(&self.rest),
        }
    }

    /// The count claimed for `e`, claiming a free one if `e` has none.
    fn other(&self, e: i32) -> Option<&AtomicU64> {
        for other in &self.others {
            // Relaxed: the errno is the only word claimed, and a count read
            // before its claim is seen only misses the failure being counted.
            let claimed =
                match other
                    .errno
                    .compare_exchange(0, e, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => e,
                    Err(owner) => owner,
                };
            if claimed == e {
                return Some(&other.count);
            }
        }
        None
    }

    fn snapshot(&self) -> Vec<(Errno, u64)> {
        let known = [
            (Errno::EMFILE, &self.emfile),
            (Errno::ENFILE, &self.enfile),
            (Errno::ECONNABORTED, &self.econnaborted),
            (Errno::ENOBUFS, &self.enobufs),
        ];
        // A claim whose errno this thread does not see yet (0) is left
        // out, not shown as the rest: its count is missed for a moment.
        let others = self
            .others
            .iter()
            .map(|o| (Errno(o.errno.load(Ordering::Relaxed)), &o.count))
            .filter(|(e, _)| e.0 != 0);
        known
            .into_iter()
            .chain(others)
            .chain([(Errno(0), &self.rest)])
            .map(|(e, n)| (e, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

impl Counters {
    /// Counts an accept failure; returns how many of its kind were seen.
    pub(crate) fn accept_error(&self, errno: Errno) -> u64 {
        self.accept_errors
            .counter(errno)
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }

    /// Counts one event directly (for threads without a tally).
    pub(crate) fn add(&self, f: impl FnOnce(&mut Tally)) {
        let mut tally = Tally::default();
        f(&mut tally);
        self.merge(&mut tally);
    }
}

impl Tally {
    /// Records bytes queued for one connection (keeps the maximum).
    pub fn queued(&mut self, bytes: usize) {
        self.queue_peak = self.queue_peak.max(bytes as u64);
    }

    /// Counts a close.
    pub fn close(&mut self, reason: CloseReason) {
        self.closed[reason.index()] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No counter is left out of the stats line: each one not zero shows
    /// its value (a counter added to the list shows without more code).
    #[test]
    fn the_stats_line_shows_every_counter_that_is_not_zero() {
        let stats = Stats {
            queue_peak: 999_999,
            ..Stats::every_counter_set(100_000)
        };
        let line = stats.to_string();
        let words: Vec<&str> = line.split([' ', '=', ',', '[', ']']).collect();
        for (name, value) in stats.counters() {
            assert!(
                words.contains(&value.to_string().as_str()),
                "{name}={value} missing from: {line}"
            );
        }
        assert!(line.contains("queue_peak=999999"), "{line}");
        // And each alone (a review's finding: a group shown only for some
        // of its counters hid `lingers_cut` merged before its `lingers`).
        for (which, (name, _)) in stats.counters().into_iter().enumerate() {
            let line = Stats::one_counter_set(which, 777_777).to_string();
            assert!(
                line.contains("=777777"),
                "{name} alone missing from: {line}"
            );
        }
        // Zero counters outside the line's first part stay out of it.
        let quiet = Stats::default().to_string();
        assert!(!quiet.contains("slots_retired"), "{quiet}");
        assert!(quiet.contains("pool_full=0"), "{quiet}");
    }

    /// Each errno not known by name gets its own count (so the log's
    /// powers-of-two rule holds per errno) until the room for them runs
    /// out; the rest share `Errno(0)`.
    #[test]
    fn unknown_accept_errnos_are_counted_apart_until_the_room_runs_out() {
        let counters = Counters::default();
        let eio = Errno(libc::EIO);
        let eproto = Errno(libc::EPROTO);
        assert_eq!(counters.accept_error(eio), 1);
        assert_eq!(counters.accept_error(eio), 2);
        // A second errno starts at 1: its first occurrence is logged.
        assert_eq!(counters.accept_error(eproto), 1);
        assert_eq!(counters.accept_error(eio), 3);
        assert_eq!(counters.accept_error(Errno::EMFILE), 1);
        let more = [
            libc::EPERM,
            libc::EACCES,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ENOPROTOOPT,
            libc::EOPNOTSUPP,
        ];
        for extra in more {
            assert_eq!(counters.accept_error(Errno(extra)), 1);
        }
        // Eight counted apart; a ninth and tenth share the rest.
        assert_eq!(counters.accept_error(Errno(libc::ENOSR)), 1);
        assert_eq!(counters.accept_error(Errno(libc::ETIMEDOUT)), 2);
        assert_eq!(counters.accept_error(eproto), 2);

        let stats = counters.snapshot(Now::default());
        assert_eq!(stats.accept_errors_for(eio), 3);
        assert_eq!(stats.accept_errors_for(eproto), 2);
        assert_eq!(stats.accept_errors_for(Errno::EMFILE), 1);
        for extra in more {
            assert_eq!(stats.accept_errors_for(Errno(extra)), 1);
        }
        assert_eq!(stats.accept_errors_for(Errno(libc::ENOSR)), 0);
        assert_eq!(stats.accept_errors_for(Errno(0)), 2);
        let line = stats.to_string();
        assert!(
            line.contains(
                "accept_errors=[EMFILE=1,errno5=3,EPROTO=2,EPERM=1,errno13=1,\
                 EHOSTUNREACH=1,ENETUNREACH=1,errno92=1,EOPNOTSUPP=1,others=2]"
            ),
            "{line}"
        );
    }
}
