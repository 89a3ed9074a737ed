//! Lingering close: the end of a close after flush whose peer has not
//! closed yet.
//!
//! A close after flush sends a FIN behind the replies (`shutdown(SHUT_WR)`)
//! and drops what the peer has sent so far. It must not `close(2)` while the
//! peer may still send: bytes that reach a closed socket make Linux answer
//! with a reset, and a reset discards whatever of the replies is still in
//! the send buffer (the part the peer's full receive window has not taken
//! yet; some stacks, Windows', also drop what they acknowledged and their
//! application has not read). So the socket lingers (during the shutdown
//! drain, only with replies unacknowledged; see `Env::close_gracefully`): a
//! second descriptor for it, outside any slot, is watched for input, which
//! is read and dropped until the peer's FIN, an error, the drop budget or
//! the deadline; then it is closed.
//!
//! Invariants:
//! - The slot does not wait. Its number is covered by the placeholder as for
//!   any close (C) and the slot is reused at once; the socket lives on only
//!   through its second number, registered with a token of its own
//!   (`LINGER_TOKEN | key`). The slot's registration is deleted, so no event
//!   of a lingering socket names a slot.
//! - A key is never reused: an event for a socket that has stopped lingering
//!   finds nothing and is ignored.
//! - One thread at a time uses a lingering number: the one that set the
//!   entry's `busy` flag (under the table's lock, which is never held across
//!   a syscall). An event that finds it busy leaves a mark (`again`), and
//!   the owner reads once more before letting go, so no edge is lost (the
//!   same protocol as a connection's read side, in small); a deadline that
//!   finds it busy leaves `expired`, and the owner closes. The owner removes
//!   the entry before it closes the number, so no thread uses a number after
//!   it is closed.
//! - Bounded: at most `capacity` sockets linger (the descriptor budget's
//!   share for them, see `server::fdlimit`), each for at most the linger
//!   time and `budget` dropped bytes (counting what the close dropped before
//!   it lingered). Past the capacity, or when the second number cannot be
//!   had (EMFILE), the close happens at once, as it would without lingering.
//! - The shutdown drain waits only for what a reset could cost: it looks at
//!   the lingering sockets every `DRAIN_POLL` and lets go those whose peer
//!   has acknowledged every reply and the FIN (`release_acknowledged`), the
//!   same rule `Env::close_gracefully` applies to closes during the drain.
//! - One timer at a time: every socket lingers for the same time, so the
//!   deadlines follow the keys' order (up to the clock's skew between two
//!   starts), and only the earliest needs a timer in the heap. The timer
//!   ends what is due and asks for the next; the heap holds at most one
//!   linger timer however many sockets linger or have lingered.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::core::ConnId;
use crate::sys::{Errno, Fd, Interest, Sys};

/// Tokens of lingering sockets: this bit set, the key below it. Within the
/// event loop's own range (at or above `CONTROL_TOKEN`), clear of the waker
/// and listener tokens.
pub(crate) const LINGER_TOKEN: u64 = (1 << 63) | (1 << 62);

/// Bytes a lingering socket may drop, in read budgets of the server: a peer
/// that goes on sending after the FIN is not listening for replies.
const BUDGETS: usize = 4;

/// The least a lingering socket may drop, whatever the read budget: a peer
/// still uploading when the server said goodbye has up to a window's worth
/// of bytes in flight, and cutting it short draws the reset the linger
/// exists to prevent. (The read budget is a per-turn fairness setting; a
/// small one once cut the linger to a few KiB.)
const MIN_BUDGET: usize = 1 << 20;

/// The bytes a lingering socket may drop, for a server reading up to
/// `read_budget` bytes a turn: a few read budgets, and at least 1 MiB.
pub(crate) fn drop_budget(read_budget: usize) -> usize {
    read_budget.saturating_mul(BUDGETS).max(MIN_BUDGET)
}

/// How a lingering close ended, or why a socket does not linger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Still lingering: the peer has not closed.
    Lingering,
    /// The peer closed (or its socket failed): a clean end.
    Peer,
    /// The peer sent more than the drop budget after the FIN.
    Budget,
    /// The linger time ran out.
    Timeout,
    /// The shutdown drain ended it: the peer has acknowledged every reply
    /// and the FIN, so a reset could cost it nothing a Linux peer keeps.
    Acknowledged,
    /// The key names no lingering socket (a late event).
    Unknown,
}

#[derive(Debug)]
struct Entry {
    /// The second number (-1 until the owner that starts the linger has it).
    fd: Fd,
    conn: ConnId,
    dropped: usize,
    /// When the linger time runs out (on `Sys::now`'s clock).
    deadline: Duration,
    /// A thread is using `fd`.
    busy: bool,
    /// An event came while busy: read again before letting go.
    again: bool,
    /// The time ran out: close at the next look.
    expired: bool,
}

#[derive(Debug, Default)]
struct Table {
    entries: BTreeMap<u64, Entry>,
    next: u64,
    /// The deadline of the linger timer in the heap, if one is.
    timer: Option<Duration>,
    /// Torn down: no new socket may linger.
    closed: bool,
    /// When the drain's last look for lingers that protect nothing began,
    /// plus what it took (so a long look over many sockets is not followed
    /// at once by another).
    released_at: Option<Duration>,
    /// A thread is making that look: no other starts one.
    releasing: bool,
}

impl Table {
    /// Arms the timer for the earliest deadline still to come, unless one
    /// is armed; returns the deadline to schedule.
    fn arm(&mut self) -> Option<Duration> {
        if self.timer.is_some() {
            return None;
        }
        let next = self.entries.values().find(|e| !e.expired)?.deadline;
        self.timer = Some(next);
        Some(next)
    }
}

/// The lingering sockets. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Lingering {
    table: Mutex<Table>,
    time: Option<Duration>,
    capacity: usize,
    budget: usize,
}

/// A socket that started to linger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Started {
    /// Its key (its events' token is `LINGER_TOKEN | key`).
    pub key: u64,
    /// How its first look ended (`Lingering`: it lingers on).
    pub ended: Ended,
    /// A linger timer to schedule, at this deadline.
    pub timer: Option<Duration>,
}

impl Lingering {
    /// Sockets linger up to `time` (`None` or zero: never), at most
    /// `capacity` at once, each dropping at most `budget` bytes (see
    /// [`drop_budget`]).
    pub(crate) fn new(time: Option<Duration>, capacity: usize, budget: usize) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            time: time.filter(|t| !t.is_zero() && capacity > 0),
            capacity,
            budget,
        }
    }

    /// How long a socket may linger (`None`: lingering is off).
    pub(crate) fn time(&self) -> Option<Duration> {
        self.time
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sockets lingering now.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Makes connection `id`'s socket, on number `fd` (registered with
    /// `epoll`), linger from `now`, having dropped `dropped` bytes already:
    /// a second number for it, registered under a key of its own, and the
    /// slot's registration deleted; then reads what came meanwhile. `Err`
    /// says why the socket cannot linger (the caller's close then happens at
    /// once). The caller holds the read side of `id` and has sent the FIN.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start<S: Sys>(
        &self,
        sys: &S,
        epoll: Fd,
        id: ConnId,
        fd: Fd,
        now: Duration,
        dropped: usize,
        scratch: &mut [u8],
    ) -> Result<Started, String> {
        let Some(time) = self.time else {
            return Err("lingering is off".into());
        };
        let key = {
            let mut table = self.lock();
            if table.closed {
                return Err("the server is torn down".into());
            }
            if table.entries.len() >= self.capacity {
                return Err(format!(
                    "{} sockets linger already, the descriptor budget's share",
                    table.entries.len()
                ));
            }
            let key = table.next;
            table.next += 1;
            debug_assert!(key < 1 << 62, "linger keys ran into the token bits");
            // Counted (and owned) from here: the capacity holds against
            // concurrent starts.
            table.entries.insert(
                key,
                Entry {
                    fd: -1,
                    conn: id,
                    dropped,
                    deadline: now.saturating_add(time),
                    busy: true,
                    again: false,
                    expired: false,
                },
            );
            key
        };
        let second = match sys.dup(fd) {
            Ok(second) => second,
            Err(errno) => {
                self.lock().entries.remove(&key);
                return Err(format!("fcntl(F_DUPFD_CLOEXEC): {errno}"));
            }
        };
        if let Some(entry) = self.lock().entries.get_mut(&key) {
            entry.fd = second;
        }
        // The entry exists before the registration: its first event (ADD
        // reports readiness already there) finds it, busy, and leaves a mark.
        if let Err(errno) = sys.epoll_add(epoll, second, Interest::Read, LINGER_TOKEN | key) {
            self.lock().entries.remove(&key);
            let _ = sys.close(second);
            return Err(format!("epoll_ctl(ADD) of {second}: {errno}"));
        }
        // The placeholder's dup2 over `fd` will not end this registration
        // (the socket lives on through `second`); its events would name the
        // slot's next connection's number. Should it fail, they are only
        // stale events (the generation has moved on).
        if let Err(errno) = sys.epoll_delete(epoll, fd) {
            log::warn!("{id}: epoll_ctl(DEL) of {fd} before lingering: {errno}");
        }
        // What came since the caller's last read raised no edge of ours.
        let ended = self.own(sys, key, second, dropped, false, scratch);
        // Armed only now: a start that failed above must not leave the
        // table believing a timer is in the heap when none was scheduled.
        let timer = self.lock().arm();
        Ok(Started { key, ended, timer })
    }

    /// Input (or a hang-up) on the lingering socket `key`: drop what came;
    /// close it if the peer is done or over the budget.
    pub(crate) fn on_event<S: Sys>(&self, sys: &S, key: u64, scratch: &mut [u8]) -> Ended {
        let (fd, dropped) = {
            let mut table = self.lock();
            let Some(entry) = table.entries.get_mut(&key) else {
                return Ended::Unknown;
            };
            if entry.busy {
                entry.again = true;
                return Ended::Lingering;
            }
            entry.busy = true;
            (entry.fd, entry.dropped)
        };
        self.own(sys, key, fd, dropped, false, scratch)
    }

    /// The linger timer fired at `now`: every socket whose time has run out
    /// gets a last look (the peer's FIN may be in), then is closed (by its
    /// owner, if another thread reads it). Returns how many were cut short
    /// here, and the next timer to schedule.
    pub(crate) fn expire_due<S: Sys>(
        &self,
        sys: &S,
        now: Duration,
        scratch: &mut [u8],
    ) -> (usize, Option<Duration>) {
        self.lock().timer = None;
        let mut cut = 0;
        loop {
            let picked = {
                let mut table = self.lock();
                let mut picked = None;
                for (key, entry) in table.entries.iter_mut() {
                    if entry.deadline > now {
                        break;
                    }
                    if entry.expired {
                        continue; // its owner closes it
                    }
                    entry.expired = true;
                    if !entry.busy {
                        entry.busy = true;
                        picked = Some((*key, entry.fd, entry.dropped));
                        break;
                    }
                }
                picked
            };
            let Some((key, fd, dropped)) = picked else {
                break;
            };
            if matches!(
                self.own(sys, key, fd, dropped, false, scratch),
                Ended::Timeout | Ended::Budget
            ) {
                cut += 1;
            }
        }
        (cut, self.lock().arm())
    }

    /// The shutdown drain's look, by one thread at a time and at most once
    /// every `every` (after the last look's end): ends the lingers that
    /// protect nothing any more, those whose peer has acknowledged every
    /// reply and the FIN (SIOCOUTQ is 0), after a last read of what came. A
    /// linger that began while the server ran may protect a peer that had
    /// read everything (see `Env::close_gracefully`); left alone, it would
    /// hold the stop to the drain's deadline. Returns how many it let go,
    /// and how many it cut short (a deadline or the drop budget met while it
    /// held the socket: counted here, as `on_event` counts its own).
    pub(crate) fn release_acknowledged<S: Sys>(
        &self,
        sys: &S,
        now: Duration,
        every: Duration,
        scratch: &mut [u8],
    ) -> (usize, usize) {
        let keys: Vec<u64> = {
            let mut table = self.lock();
            if table.entries.is_empty()
                || table.releasing
                || table
                    .released_at
                    .is_some_and(|at| now < at.saturating_add(every))
            {
                return (0, 0);
            }
            table.releasing = true;
            table.entries.keys().copied().collect()
        };
        let began = sys.now();
        let (mut released, mut cut) = (0, 0);
        for key in keys {
            let (fd, dropped) = {
                let mut table = self.lock();
                match table.entries.get_mut(&key) {
                    Some(entry) if !entry.busy && !entry.expired => {
                        entry.busy = true;
                        (entry.fd, entry.dropped)
                    }
                    // Its owner, or the deadline, ends it.
                    _ => continue,
                }
            };
            // An error: assume the worst, as the close does.
            let acknowledged = sys.unacked(fd) == Ok(0);
            // A look even when it lingers on: an event that came while this
            // thread held it left only a mark.
            match self.own(sys, key, fd, dropped, acknowledged, scratch) {
                Ended::Acknowledged => released += 1,
                Ended::Timeout | Ended::Budget => cut += 1,
                Ended::Lingering | Ended::Peer | Ended::Unknown => {}
            }
        }
        let took = sys.now().saturating_sub(began);
        let mut table = self.lock();
        table.releasing = false;
        table.released_at = Some(now.saturating_add(took));
        (released, cut)
    }

    /// Closes every lingering socket now (a forced shutdown), or has its
    /// owner close it; `for_good` (the teardown, once no worker runs): none
    /// may linger after, busy or not. Returns how many were closed here.
    pub(crate) fn close_all<S: Sys>(&self, sys: &S, for_good: bool) -> usize {
        let idle: Vec<Entry> = {
            let mut table = self.lock();
            table.closed |= for_good;
            for entry in table.entries.values_mut() {
                entry.expired = true;
            }
            let keys: Vec<u64> = (table.entries.iter())
                .filter(|(_, e)| for_good || !e.busy)
                .map(|(k, _)| *k)
                .collect();
            keys.iter()
                .filter_map(|k| table.entries.remove(k))
                .collect()
        };
        for entry in idle.iter().filter(|e| e.fd >= 0) {
            close(sys, entry, Ended::Timeout);
        }
        idle.len()
    }

    /// The owner's loop: read and drop until EAGAIN, then let go unless a
    /// mark asks for another look; close when the peer is done, the budget
    /// is spent or the time is up, or (`acknowledged`: the drain found every
    /// reply acknowledged) once what came is read.
    fn own<S: Sys>(
        &self,
        sys: &S,
        key: u64,
        fd: Fd,
        mut dropped: usize,
        acknowledged: bool,
        scratch: &mut [u8],
    ) -> Ended {
        loop {
            let read = drop_input(sys, fd, &mut dropped, scratch, self.budget);
            let (ended, removed) = {
                let mut table = self.lock();
                let Some(entry) = table.entries.get_mut(&key) else {
                    debug_assert!(false, "a lingering entry removed under its owner");
                    return Ended::Unknown;
                };
                entry.dropped = dropped;
                let ended = match read {
                    // A mark first, even past the time: the event behind
                    // it may be the peer's FIN, which ends the linger as
                    // the peer's (a close with it unread would reset the
                    // peer, whose replies may still be arriving). The
                    // budget bounds the looks.
                    Ended::Lingering if entry.again => {
                        entry.again = false;
                        continue;
                    }
                    Ended::Lingering if entry.expired => Ended::Timeout,
                    Ended::Lingering if acknowledged => Ended::Acknowledged,
                    Ended::Lingering => {
                        entry.busy = false;
                        return Ended::Lingering;
                    }
                    ended => ended,
                };
                (ended, table.entries.remove(&key))
            };
            if let Some(entry) = removed {
                close(sys, &entry, ended);
            }
            return ended;
        }
    }
}

/// Reads and drops the socket's input until EAGAIN (still lingering), end of
/// stream or an error (the peer is done), or past `budget` bytes in all.
fn drop_input<S: Sys>(
    sys: &S,
    fd: Fd,
    dropped: &mut usize,
    scratch: &mut [u8],
    budget: usize,
) -> Ended {
    loop {
        match sys.recv(fd, scratch) {
            Ok(0) => return Ended::Peer,
            Ok(n) => {
                *dropped = dropped.saturating_add(n);
                if *dropped > budget {
                    return Ended::Budget;
                }
            }
            Err(errno) if errno.is_would_block() => return Ended::Lingering,
            Err(errno) if errno == Errno::EINTR => {}
            // A reset from the peer: nothing is left to protect.
            Err(_) => return Ended::Peer,
        }
    }
}

/// Closes a lingering socket's number, its entry already removed (see the
/// module docs). Closing the last number of the socket also ends its epoll
/// registration.
fn close<S: Sys>(sys: &S, entry: &Entry, ended: Ended) {
    match ended {
        Ended::Budget => log::info!(
            "{}: {} bytes arrived after the server's FIN; closing (the peer may see a reset)",
            entry.conn,
            entry.dropped
        ),
        Ended::Timeout => log::debug!(
            "{}: the peer did not close within the linger time; closing",
            entry.conn
        ),
        Ended::Acknowledged => log::debug!(
            "{}: shutting down, and the peer has acknowledged every reply; closing",
            entry.conn
        ),
        _ => {}
    }
    if let Err(errno) = sys.close(entry.fd) {
        log::warn!(
            "{}: close({}) after lingering: {errno}",
            entry.conn,
            entry.fd
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Shutdown;
    use crate::sys::fault::{FaultConfig, FaultSys};
    use crate::sys::sim::{SimClient, SimSys};

    /// A simulated kernel with an epoll and an accepted connection whose
    /// server end (registered, FIN sent) is ready to linger.
    fn closing_connection() -> (SimSys, Fd, SimClient, Fd) {
        let (sim, epoll, mut conns) = closing_connections(&[b""]);
        let (client, fd) = conns.remove(0);
        (sim, epoll, client, fd)
    }

    /// [`closing_connection`], one for each of `replies`: the server sent
    /// it before its FIN, and the client has not read it.
    fn closing_connections(replies: &[&[u8]]) -> (SimSys, Fd, Vec<(SimClient, Fd)>) {
        let (sim, listener, addr) = crate::scenario::tests::sim_with_listener_fd();
        let epoll = sim.epoll_create().unwrap();
        let conns = (replies.iter().zip(7..))
            .map(|(reply, token)| {
                let client = sim.connect(&addr).unwrap();
                let (fd, _) = sim.accept(listener).unwrap();
                sim.epoll_add(epoll, fd, Interest::Read, token).unwrap();
                assert_eq!(sim.send(fd, reply).unwrap(), reply.len());
                sim.shutdown(fd, Shutdown::Write).unwrap();
                (client, fd)
            })
            .collect();
        (sim, epoll, conns)
    }

    /// `sim`, where every `dup` fails with EMFILE.
    fn out_of_descriptors(sim: &SimSys) -> FaultSys<SimSys> {
        FaultSys::new(
            sim.clone(),
            FaultConfig {
                accept_error: 1.0,
                ..FaultConfig::none(1)
            },
        )
    }

    const ID: ConnId = ConnId::new(0, 1);
    const SECOND: Duration = Duration::from_secs(1);

    fn start(
        lingering: &Lingering,
        sim: &SimSys,
        epoll: Fd,
        fd: Fd,
        now: Duration,
    ) -> Result<Started, String> {
        lingering.start(sim, epoll, ID, fd, now, 0, &mut [0u8; 16])
    }

    #[test]
    fn a_lingering_socket_drops_input_until_the_peers_fin() {
        let (sim, epoll, client, fd) = closing_connection();
        let lingering = Lingering::new(Some(5 * SECOND), 4, 256);
        let mut scratch = [0u8; 16];
        let descriptions = sim.live_descriptions();
        let started = start(&lingering, &sim, epoll, fd, SECOND).unwrap();
        assert_eq!(started.ended, Ended::Lingering);
        assert_eq!(
            started.timer,
            Some(6 * SECOND),
            "the first linger arms the timer"
        );
        // The slot's number is given up (the placeholder would cover it):
        // the socket lives on through its second number only.
        sim.close(fd).unwrap();
        assert_eq!(sim.live_descriptions(), descriptions, "the socket lingers");
        assert_eq!(lingering.len(), 1);
        sim.client_send(client, b"late bytes").unwrap();
        // Only the second number's registration hears of it: the slot's
        // (token 7) was deleted, or it would outlive the slot's number.
        assert!(sim.readable_registrations(7).is_empty());
        let token = LINGER_TOKEN | started.key;
        let input = sim.readable_registrations(LINGER_TOKEN);
        assert_eq!(input.iter().map(|(_, t)| *t).collect::<Vec<_>>(), [token]);
        assert_eq!(
            lingering.on_event(&sim, started.key, &mut scratch),
            Ended::Lingering
        );
        assert!(
            sim.readable_registrations(LINGER_TOKEN).is_empty(),
            "read to EAGAIN"
        );
        sim.client_close(client).unwrap();
        assert_eq!(
            lingering.on_event(&sim, started.key, &mut scratch),
            Ended::Peer
        );
        assert_eq!(lingering.len(), 0);
        assert_eq!(
            sim.live_descriptions(),
            descriptions - 1,
            "the socket is released"
        );
        // Keys are not reused: a late event finds nothing; the timer, when
        // it fires, has nothing to do and asks for no other.
        assert_eq!(
            lingering.on_event(&sim, started.key, &mut scratch),
            Ended::Unknown
        );
        assert_eq!(
            lingering.expire_due(&sim, 6 * SECOND, &mut scratch),
            (0, None)
        );
    }

    /// The drain's look lets go only the lingers whose replies the peer has
    /// all taken (the simulated kernel's SIOCOUTQ counts what the client
    /// has not read), and looks at most once every `every`.
    #[test]
    fn the_drain_lets_go_only_lingers_whose_replies_are_all_taken() {
        const EVERY: Duration = Duration::from_millis(10);
        let (sim, epoll, conns) = closing_connections(&[b"read", b"unread"]);
        let lingering = Lingering::new(Some(5 * SECOND), 4, 256);
        let mut scratch = [0u8; 16];
        let [(read, read_fd), (unread, unread_fd)] = conns[..] else {
            unreachable!()
        };
        assert_eq!(sim.client_recv(read, 16).unwrap(), b"read");
        for fd in [read_fd, unread_fd] {
            start(&lingering, &sim, epoll, fd, SECOND).unwrap();
            sim.close(fd).unwrap();
        }
        let descriptions = sim.live_descriptions();
        let mut release = |now| lingering.release_acknowledged(&sim, now, EVERY, &mut scratch);
        assert_eq!(release(2 * SECOND), (1, 0));
        assert_eq!(lingering.len(), 1, "the unread reply keeps its linger");
        assert_eq!(sim.live_descriptions(), descriptions - 1);
        // A clean end for the client that had read everything: its FIN, no
        // reset.
        assert_eq!(sim.client_recv(read, 16).unwrap(), b"");
        // The other client reads its reply now; the next look, not one
        // within `every` of the last (its start, plus what it took: the
        // simulated clock moves a little with each call), lets it go.
        assert_eq!(sim.client_recv(unread, 16).unwrap(), b"unread");
        assert_eq!(release(2 * SECOND + EVERY / 2), (0, 0), "looked too soon");
        assert_eq!(lingering.len(), 1);
        assert_eq!(release(2 * SECOND + 2 * EVERY), (1, 0));
        assert_eq!(lingering.len(), 0);
        assert_eq!(sim.client_recv(unread, 16).unwrap(), b"");
    }

    #[test]
    fn the_budget_counts_what_was_dropped_before_the_linger() {
        let (sim, epoll, client, fd) = closing_connection();
        // 16 bytes may be dropped in all, 10 of them before the linger.
        let lingering = Lingering::new(Some(5 * SECOND), 4, 16);
        let mut scratch = [0u8; 8];
        let started = lingering
            .start(&sim, epoll, ID, fd, SECOND, 10, &mut scratch)
            .unwrap();
        sim.client_send(client, &[b'x'; 6]).unwrap();
        assert_eq!(
            lingering.on_event(&sim, started.key, &mut scratch),
            Ended::Lingering
        );
        sim.client_send(client, b"x").unwrap();
        assert_eq!(
            lingering.on_event(&sim, started.key, &mut scratch),
            Ended::Budget
        );
        assert_eq!(lingering.len(), 0);
    }

    #[test]
    fn one_timer_ends_what_is_due_and_asks_for_the_next() {
        let lingering = Lingering::new(Some(5 * SECOND), 8, 256);
        let mut scratch = [0u8; 8];
        let mut kept = Vec::new();
        let mut timers = Vec::new();
        for at in [1, 2, 3] {
            let (sim, epoll, client, fd) = closing_connection();
            let started = start(&lingering, &sim, epoll, fd, at * SECOND).unwrap();
            timers.extend(started.timer);
            kept.push((sim, client, started.key));
        }
        assert_eq!(timers, [6 * SECOND], "one timer, for the earliest");
        // The second peer closes early; its linger ends by itself.
        let (sim, client, key) = &kept[1];
        sim.client_close(*client).unwrap();
        assert_eq!(lingering.on_event(sim, *key, &mut scratch), Ended::Peer);
        // The timer fires (the simulations share no clock; time is given):
        // the first is due and cut, the next timer is for the third.
        let (sim, _, _) = &kept[0];
        assert_eq!(
            lingering.expire_due(sim, 6 * SECOND, &mut scratch),
            (1, Some(8 * SECOND))
        );
        assert_eq!(lingering.len(), 1);
        let (sim, _, _) = &kept[2];
        assert_eq!(
            lingering.expire_due(sim, 8 * SECOND, &mut scratch),
            (1, None)
        );
        assert_eq!(lingering.len(), 0);
    }

    #[test]
    fn past_the_capacity_or_without_a_second_number_the_close_is_at_once() {
        let (sim, epoll, _client, fd) = closing_connection();
        let lingering = Lingering::new(Some(5 * SECOND), 1, 256);
        start(&lingering, &sim, epoll, fd, SECOND).unwrap();
        let (sim2, epoll2, _client2, fd2) = closing_connection();
        let full = start(&lingering, &sim2, epoll2, fd2, SECOND);
        assert!(full.is_err_and(|e| e.contains("linger already")));

        let (sim, epoll, _client, fd) = closing_connection();
        let descriptions = sim.live_descriptions();
        let emfile = out_of_descriptors(&sim);
        let lingering = Lingering::new(Some(5 * SECOND), 4, 256);
        let refused = lingering.start(&emfile, epoll, ID, fd, SECOND, 0, &mut [0u8; 8]);
        assert!(refused.is_err_and(|e| e.contains("EMFILE")));
        assert_eq!(lingering.len(), 0, "no entry left behind");
        assert_eq!(sim.live_descriptions(), descriptions, "nothing leaked");
    }

    /// Starts a linger on a fresh closing connection; then its owner takes
    /// an event, and right after the owner's first `recv` of it (which
    /// finds nothing) a call hook runs `meanwhile` once, as the peer and a
    /// second worker acting while the owner reads. Returns the simulation,
    /// the table, and what the owner's event ended in.
    fn the_owner_reads_while(
        meanwhile: impl Fn(&SimSys, SimClient, &Lingering, u64) + Send + Sync + 'static,
    ) -> (SimSys, std::sync::Arc<Lingering>, Ended) {
        the_owner_looks_while(b"", meanwhile, |lingering, hooked, key, scratch| {
            lingering.on_event(hooked, key, scratch)
        })
    }

    /// [`the_owner_reads_while`], with `reply` unread by the client before
    /// the FIN and `look` as the owner's look (an event, the drain's...).
    fn the_owner_looks_while<T>(
        reply: &[u8],
        meanwhile: impl Fn(&SimSys, SimClient, &Lingering, u64) + Send + Sync + 'static,
        look: impl FnOnce(&Lingering, &FaultSys<SimSys>, u64, &mut [u8]) -> T,
    ) -> (SimSys, std::sync::Arc<Lingering>, T) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, OnceLock};

        let (sim, epoll, mut conns) = closing_connections(&[reply]);
        let (client, fd) = conns.remove(0);
        let lingering = Arc::new(Lingering::new(Some(5 * SECOND), 4, 256));
        let armed = Arc::new(AtomicBool::new(false));
        let key = Arc::new(OnceLock::new());
        let hook: crate::sys::fault::CallHook = {
            let (sim, lingering, armed, key) =
                (sim.clone(), lingering.clone(), armed.clone(), key.clone());
            Arc::new(move |call| {
                if call == "recv" && armed.swap(false, Ordering::SeqCst) {
                    meanwhile(&sim, client, &lingering, *key.get().unwrap());
                }
            })
        };
        let hooked = FaultSys::new(sim.clone(), FaultConfig::none(0)).with_call_hook(hook);
        let mut scratch = [0u8; 16];
        let started = lingering
            .start(&hooked, epoll, ID, fd, SECOND, 0, &mut scratch)
            .unwrap();
        key.set(started.key).unwrap();
        armed.store(true, Ordering::SeqCst);
        let looked = look(&lingering, &hooked, started.key, &mut scratch);
        assert!(!armed.load(Ordering::SeqCst), "the hook ran");
        (sim, lingering, looked)
    }

    fn event_from_another_worker(sim: &SimSys, lingering: &Lingering, key: u64) {
        let plain = FaultSys::new(sim.clone(), FaultConfig::none(0));
        let ended = lingering.on_event(&plain, key, &mut [0u8; 16]);
        assert_eq!(ended, Ended::Lingering, "the owner is busy");
    }

    /// R in small, without a schedule to depend on: bytes arrive, and their
    /// event comes, while the owner is between its last read and letting
    /// go (a call hook plays the peer and the second worker, after the
    /// owner's `recv` that found nothing). The event finds the entry busy
    /// and leaves a mark; the owner must read once more, or the bytes stay
    /// unread with no edge to come.
    #[test]
    fn an_event_while_the_owner_reads_makes_it_read_again() {
        // An event (say, a spurious one) the owner takes: nothing to read,
        // and then the hook's bytes and event.
        let (sim, _, ended) = the_owner_reads_while(|sim, client, lingering, key| {
            sim.client_send(client, b"meanwhile").unwrap();
            event_from_another_worker(sim, lingering, key);
        });
        assert_eq!(ended, Ended::Lingering);
        assert!(
            sim.readable_registrations(LINGER_TOKEN).is_empty(),
            "the bytes that came with the mark were left unread"
        );
    }

    /// A linger audit's finding: the owner looked at the time before the
    /// mark, so a FIN that arrived (its event leaving the mark) while the
    /// owner read, just as the time ran out, ended the linger as a timeout
    /// with the FIN unread: counted cut, and the close a reset.
    #[test]
    fn a_fin_marked_while_the_owner_reads_ends_the_linger_as_the_peers_at_its_deadline() {
        let (_, lingering, ended) = the_owner_reads_while(|sim, client, lingering, key| {
            // While the owner reads: the peer's FIN, its event (a mark:
            // the owner is busy), and the deadline.
            sim.client_close(client).unwrap();
            event_from_another_worker(sim, lingering, key);
            let plain = FaultSys::new(sim.clone(), FaultConfig::none(0));
            let (cut, _) = lingering.expire_due(&plain, 10 * SECOND, &mut [0u8; 16]);
            assert_eq!(cut, 0, "the owner closes its own entry");
        });
        assert_eq!(ended, Ended::Peer, "the FIN, not the time, ended it");
        assert_eq!(lingering.len(), 0);
    }

    /// A start that fails (no second number) must not leave the table
    /// believing a timer is armed: the next linger would get none, and
    /// never end by time.
    #[test]
    fn a_failed_start_leaves_no_timer_armed() {
        let (sim, epoll, _client, fd) = closing_connection();
        let emfile = out_of_descriptors(&sim);
        let lingering = Lingering::new(Some(5 * SECOND), 4, 256);
        let refused = lingering.start(&emfile, epoll, ID, fd, SECOND, 0, &mut [0u8; 8]);
        assert!(refused.is_err());
        let started = start(&lingering, &sim, epoll, fd, 2 * SECOND).unwrap();
        assert_eq!(
            started.timer,
            Some(7 * SECOND),
            "a timer for the next linger"
        );
    }

    #[test]
    fn off_means_no_linger() {
        let (sim, epoll, _client, fd) = closing_connection();
        for lingering in [
            Lingering::new(Some(Duration::ZERO), 4, 256),
            Lingering::new(None, 4, 256),
            Lingering::new(Some(SECOND), 0, 256),
        ] {
            assert_eq!(lingering.time(), None);
            assert!(start(&lingering, &sim, epoll, fd, SECOND).is_err());
        }
    }

    /// A review finding: the drain's look counted only the lingers it let
    /// go. One whose time ran out while the look held it (the timer, on
    /// another worker, found it busy and left it to the owner) was closed
    /// as cut short by the look, and counted by no one.
    #[test]
    fn a_linger_cut_while_the_drain_looks_at_it_is_counted_there() {
        let (_, lingering, (released, cut)) = the_owner_looks_while(
            b"unread",
            |sim, _, lingering, _| {
                let plain = FaultSys::new(sim.clone(), FaultConfig::none(0));
                assert_eq!(
                    lingering.expire_due(&plain, 60 * SECOND, &mut [0u8; 16]),
                    (0, None),
                    "the timer leaves the held socket to its owner"
                );
            },
            |lingering, hooked, _, scratch| {
                lingering.release_acknowledged(hooked, 2 * SECOND, SECOND, scratch)
            },
        );
        assert_eq!((released, cut), (0, 1));
        assert_eq!(lingering.len(), 0);
    }

    /// R for the drain's look, which owns the socket as an event does: an
    /// event that comes while it reads (bytes from a peer with a reply
    /// unread, so the socket lingers on) leaves a mark, and the look reads
    /// again before letting go.
    #[test]
    fn an_event_while_the_drain_looks_makes_it_read_again() {
        let (sim, lingering, looked) = the_owner_looks_while(
            b"unread",
            |sim, client, lingering, key| {
                sim.client_send(client, b"meanwhile").unwrap();
                event_from_another_worker(sim, lingering, key);
            },
            |lingering, hooked, _, scratch| {
                lingering.release_acknowledged(hooked, 2 * SECOND, SECOND, scratch)
            },
        );
        assert_eq!(looked, (0, 0), "the reply is unread: it lingers on");
        assert_eq!(lingering.len(), 1);
        assert!(
            sim.readable_registrations(LINGER_TOKEN).is_empty(),
            "the bytes that came with the mark were left unread"
        );
    }
}
