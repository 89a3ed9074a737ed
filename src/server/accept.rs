//! Accepting: drain the listeners, move each connection onto a slot's
//! pinned number, register it, and hand it to the handler.
//!
//! One thread accepts at a time (the listeners' ownership word, with the same
//! pending protocol as a connection's read side). Outbound connects
//! (`ServerHandle::connect`, from any thread) take slots too, so the acceptor
//! *reserves* a slot before each `accept` and the accepted connection takes
//! exactly that one: looking for room and then taking it let a connect
//! take the last slot in between, and the accepted peer was dropped unserved
//! (found by the simulation once it could dial out).
//!
//! # Invariants
//!
//! - **C.** A reused slot's number is always open (a live socket or the
//!   placeholder), so `accept` can never return it; the new connection is
//!   `dup2`'d onto it and its temporary number closed at once. A fresh slot
//!   adopts the accepted number, and keeps it until it is free and gives it
//!   back under EMFILE (see `Shared::release_a_free_number`).
//! - **Full pool: leave it in the backlog.** When no slot is free the pending
//!   connections stay in the kernel's backlog (TCP pushes back on clients),
//!   and the next slot returned to the pool (a reclaim, or a dial that
//!   failed) schedules another accept round: edge-triggered
//!   epoll would never announce those already-pending connections again.
//!   The same retry follows EMFILE/ENFILE/ENOBUFS/ENOMEM.
//! - **No failure strands the backlog.** Every accept error but those that
//!   concern one connection only (try the next) schedules a retry on a
//!   backoff timer, an errno this module does not know included.
//! - **No failure spins.** Failures that concern one connection (and
//!   EINTR) count against the turn's budget, and a run of `ACCEPT_BUDGET`
//!   of them in a row counts as the listener's own failure: the same
//!   connection can be refused on every try (a security module refuses it
//!   before the kernel takes it off the backlog).
//! - **A flood does not keep a worker.** While connections keep arriving,
//!   each one's edge can hand the acceptor back for another turn; an
//!   activation yields after `TURNS_PER_ACTIVATION` turns, or after a turn
//!   that spent a listener's budget, and one task runs the rest: after the
//!   worker's other events (as a connection's read side does), or, when
//!   the activation took connections this worker must now serve, on
//!   whichever worker polls next (see below).
//! - **A failing listener backs off on its own**
//!   ([`AcceptBackoff`](crate::core::backoff::AcceptBackoff)): its retry
//!   waits 10 ms, doubling to 1 s, and only its own success starts the wait
//!   over. Until its retry comes, a listener that failed for a reason of
//!   its own (not exhaustion, which a freed slot or descriptor may end
//!   sooner) is passed over by the turns that other listeners' connections
//!   bring; a resting listener always has a retry coming. Each turn first
//!   takes the retries that came.
//! - **Every listener gets its turn.** A turn starts at the listener after
//!   the last one that gave a connection: with the pool full a turn takes
//!   one connection, and always starting at the first listener starved the
//!   others while it had a backlog.
//! - **A full epoll watch table does not drain the backlog.** Registering
//!   an accepted connection can fail for want of watches
//!   (`fs.epoll.max_user_watches`: ENOSPC) or memory; that connection is
//!   closed, and its listener rests on the backoff as for a failure of its
//!   own, so the connections behind it stay in the backlog rather than
//!   each being accepted and dropped. Counted and logged with accept's
//!   failures.
//! - A connection is registered with epoll while the acceptor holds its read
//!   side, so nothing (no event, no close request) can touch it before
//!   `on_open` has run and its state is in place.
//! - **No handler runs under the acceptor.** The connections a worker
//!   accepts keep their read sides held, unserved, until the acceptor's
//!   activation ends; only then does the worker run their `on_open` and
//!   first turns. A slow handler delays its own connection, the others
//!   this worker took in the same activation (at most a listener's budget
//!   a turn), and this worker's other work; never the accepting: another
//!   worker takes it up at the next listener edge, or, when the activation
//!   ended with its budget spent, from the task it leaves for any worker.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::config::WriteInterest;
use super::conn::{ReaderCell, TURNS_PER_ACTIVATION, Turn};
use super::shared::{Task, Unadopted};
use super::timers::Timer;
use super::worker::{Env, Local};
use crate::core::slot::SlotCore;
use crate::core::state::{Begin, EndRead, Flags, ReadOwner};
use crate::core::{CloseReason, ConnId};
use crate::handler::{CloseMode, Ctx, Handler};
use crate::sys::{Errno, Fd, Interest, Sys};

/// Accept calls that took a connection, or failed for one connection only,
/// per listener per turn before other events run.
const ACCEPT_BUDGET: usize = 64;

/// At most one "pool full" warning this often: at capacity under churn, the
/// pool is full again after every accept.
const POOL_FULL_WARN_EVERY_MS: u64 = 60_000;

/// Free slots' numbers given back per accept turn on EMFILE (bounded, in
/// case something else keeps taking the freed numbers).
const MAX_UNPIN_PER_TURN: usize = 4;

/// Accept failures that concern one connection only: try the next one.
fn is_per_connection(errno: Errno) -> bool {
    matches!(
        errno.0,
        libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
    )
}

/// Failures to register an accepted connection with epoll that the next
/// connection would meet too: the user's watch table is full
/// (`fs.epoll.max_user_watches`), or the kernel's memory.
fn is_registration_exhaustion(errno: Errno) -> bool {
    matches!(errno.0, libc::ENOSPC | libc::ENOMEM)
}

/// Accept failures from exhausted resources: retry when something is freed.
fn is_exhaustion(errno: Errno) -> bool {
    matches!(
        errno.0,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

/// A connection accepted and registered (or refused registration:
/// `failed`), its read side held, waiting for its first turns until the
/// acceptor's activation has ended.
struct Accepted<'s, U> {
    id: ConnId,
    slot: &'s SlotCore,
    cell: &'s ReaderCell<U>,
    owner: ReadOwner<'s>,
    peer: Option<SocketAddr>,
    failed: Option<CloseReason>,
}

impl<S: Sys, H: Handler> Env<S, H> {
    /// A listener is readable (or a retry was scheduled).
    pub(crate) fn on_acceptable(&self, local: &mut Local) {
        let mut accepted = Vec::new();
        self.accept_activation(local, &mut accepted);
        // The acceptor is free: another worker can accept while these
        // connections' handlers run.
        for conn in accepted {
            self.first_turns(local, conn);
        }
    }

    /// The acceptor's activation: its turns, while this thread holds its
    /// ownership word. The connections taken are left in `accepted`.
    fn accept_activation<'s>(
        &'s self,
        local: &mut Local,
        accepted: &mut Vec<Accepted<'s, H::Conn>>,
    ) {
        let acceptor = &self.shared.acceptor;
        let Begin::Acquired(mut owner, _) = acceptor.begin_read(0, false) else {
            return;
        };
        // As a connection's read side (see `conn.rs`): while connections
        // keep arriving, every one's edge can leave a pending mark and hand
        // the acceptor back for another turn. After
        // `TURNS_PER_ACTIVATION` turns, or a turn that spent a listener's
        // budget, the turns left only take the marks, and one task runs
        // the rest later, after this worker's other events.
        let mut turns = 0;
        let mut requeue = false;
        loop {
            if !requeue {
                requeue = self.accept_turn(local, accepted);
            }
            match acceptor.end_read(owner) {
                EndRead::Released => break,
                EndRead::Again(next, _) => {
                    owner = next;
                    turns += 1;
                    requeue |= turns >= TURNS_PER_ACTIVATION;
                }
                EndRead::Close(next) => {
                    // Nobody requests a close of the acceptor.
                    debug_assert!(false, "close requested on the acceptor");
                    owner = next;
                }
            }
        }
        if requeue {
            if accepted.is_empty() {
                local.tasks.push_back(Task::Accept);
            } else {
                // This worker serves what it took first, and a slow handler
                // among them must not hold back the rest of the backlog (no
                // new edge will announce it): any worker may carry on.
                self.shared.defer(Task::Accept, true);
            }
        }
    }

    /// One pass over the listeners; returns whether one of them spent its
    /// budget (its backlog may hold more: no edge will say so).
    fn accept_turn<'s>(
        &'s self,
        local: &mut Local,
        accepted: &mut Vec<Accepted<'s, H::Conn>>,
    ) -> bool {
        let shared = &*self.shared;
        if shared.is_draining() || shared.is_stopped() {
            shared.close_listeners();
            return false;
        }
        let mut spent_a_budget = false;
        let mut unpinned = 0;
        let listeners = &shared.fds.listeners;
        for listener in listeners {
            listener.backoff.take_due();
        }
        // Relaxed (both): only the acceptor, one thread at a time under the
        // acceptor's ownership word, reads and writes it.
        let start = shared.accept_from.load(Ordering::Relaxed);
        for index in (0..listeners.len()).map(|i| (start + i) % listeners.len()) {
            let listener = &listeners[index];
            if listener.backoff.is_resting() {
                continue;
            }
            // Connections taken and failures that concern one connection
            // both spend the budget; the latter's run is counted apart.
            let mut spent = 0;
            let mut refused_in_row = 0;
            loop {
                if spent == ACCEPT_BUDGET {
                    spent_a_budget = true;
                    break;
                }
                // Reserved before `accept`: an outbound connect on another
                // thread could otherwise take the last slot between the look
                // and the take, and the accepted peer would be dropped.
                if !self.reserve_one(local) {
                    return spent_a_budget;
                }
                let result = shared.sys.accept(listener.fd);
                if result.is_err() {
                    shared.pool.unreserve();
                }
                match result {
                    Ok((fd, peer)) => {
                        spent += 1;
                        refused_in_row = 0;
                        shared.accept_from.store(index + 1, Ordering::Relaxed);
                        let Some(errno) = self.open(local, fd, peer, listener.is_tcp(), accepted)
                        else {
                            listener.backoff.succeeded();
                            continue;
                        };
                        if !is_registration_exhaustion(errno) {
                            continue;
                        }
                        // epoll's watch table (or memory) is full: the next
                        // connection would fail the same way, and taking it
                        // off the backlog only to drop it serves nobody. The
                        // listener rests until its backoff timer (10 ms,
                        // doubling to 1 s; a registration that succeeds
                        // starts it over): resting, not only waiting, since
                        // every new connection's edge asks for a turn.
                        if let Some(wait) = listener.backoff.failed(true) {
                            shared
                                .schedule_timer(shared.sys.now() + wait, Timer::AcceptRetry(index));
                        }
                        break;
                    }
                    Err(errno) if errno.is_would_block() => break,
                    // Tried again at once, but like a failure that
                    // concerns one connection: a run of them as long as
                    // the budget is the listener's own failure (below), so
                    // a call interrupted every time cannot spin the worker.
                    Err(errno) if errno == Errno::EINTR && refused_in_row + 1 < ACCEPT_BUDGET => {
                        spent += 1;
                        refused_in_row += 1;
                    }
                    Err(errno) => {
                        let seen = shared.counters.accept_error(errno);
                        // Log the 1st, 2nd, 4th, 8th... of each kind: a storm
                        // stays visible without flooding the log.
                        if seen.is_power_of_two() {
                            log::warn!("accept on {}: {errno} (seen {seen} times)", listener.addr);
                        }
                        if is_per_connection(errno) {
                            spent += 1;
                            refused_in_row += 1;
                            if refused_in_row < ACCEPT_BUDGET {
                                continue;
                            }
                            // Not one connection's failure after all: the
                            // same connection can fail every time (a
                            // security module refuses it before the kernel
                            // takes it off the backlog). Back off as for
                            // the listener's own failure, rather than spin.
                        }
                        // Out of numbers, but a free slot holds one: give it
                        // back and try again at once. EMFILE only: ENFILE is
                        // the system's file table, and a free slot's number
                        // shares the placeholder's file, so closing it frees
                        // no file.
                        if errno == Errno::EMFILE
                            && unpinned < MAX_UNPIN_PER_TURN
                            && shared.release_a_free_number()
                        {
                            unpinned += 1;
                            continue;
                        }
                        let exhausted = is_exhaustion(errno);
                        if exhausted {
                            // Retry when a slot's descriptor is freed.
                            shared.accept_blocked.store(true, Ordering::Release);
                        }
                        // And on a backoff timer, whatever the errno: the
                        // descriptors may be someone else's, and an error
                        // not known here may pass; either way no edge will
                        // announce the connections pending meanwhile. The
                        // backoff (up to a second) keeps a lasting one from
                        // spinning; a listener failing for a reason of its
                        // own rests until then.
                        if let Some(wait) = listener.backoff.failed(!exhausted) {
                            shared
                                .schedule_timer(shared.sys.now() + wait, Timer::AcceptRetry(index));
                        }
                        break;
                    }
                }
            }
        }
        spent_a_budget
    }

    /// Reserves a slot for the next accepted connection; if none is left,
    /// arranges for the next slot returned to retry accepting, and leaves pending
    /// connections in the backlog.
    fn reserve_one(&self, local: &mut Local) -> bool {
        let shared = &*self.shared;
        // Set the flag, then look again: a reclaim either happened before the
        // second look (room) or will see the flag (retry). The pool's mutex
        // orders the two.
        let reserved = shared.pool.reserve() || {
            shared.accept_blocked.store(true, Ordering::Release);
            shared.pool.reserve()
        };
        if reserved {
            return true;
        }
        local.tally.pool_full += 1;
        // Relaxed: only the acceptor, one thread at a time, touches it.
        let warned = &shared.pool_full_warned;
        let now = shared.now_ms();
        let last = warned.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last - 1) >= POOL_FULL_WARN_EVERY_MS {
            warned.store(now.saturating_add(1), Ordering::Relaxed);
            log::warn!(
                "pool full at {} connection(s), the most this server takes (see --max-conns and \
                 RLIMIT_NOFILE): further connections wait in the backlog until one closes \
                 (pool_full counts the times; at most one such warning a minute)",
                shared.pool.capacity()
            );
        } else {
            log::debug!("pool full: leaving further connections in the backlog");
        }
        false
    }

    /// Sets up an accepted connection, on the slot reserved for it, and
    /// leaves it in `accepted`, its read side held, for its first turns.
    /// Returns the errno if registering it with epoll failed (its first
    /// turn closes it).
    fn open<'s>(
        &'s self,
        local: &mut Local,
        fd: Fd,
        peer: Option<SocketAddr>,
        tcp: bool,
        accepted: &mut Vec<Accepted<'s, H::Conn>>,
    ) -> Option<Errno> {
        let shared = &*self.shared;
        let (index, slot) = match shared.adopt(fd, true) {
            Ok(adopted) => adopted,
            // Only past the slab's capacity (logged): the reservation holds.
            Err(Unadopted::PoolFull) => {
                local.tally.pool_full += 1;
                return None;
            }
            // Counted with accept's failures, as a failed registration
            // is: taken off the backlog, never served (`adopt` logged it).
            Err(Unadopted::Dup2(errno)) => {
                shared.counters.accept_error(errno);
                return None;
            }
        };
        let Some(cell) = self.readers.get_or_create(index as usize) else {
            log::error!("slot {index} has no reader cell; dropping the connection");
            shared.release_number(ConnId::new(index, 0), slot);
            shared.pool.retire(index);
            return None;
        };
        let fd = slot.fd();
        if tcp {
            if let Err(errno) = shared.sys.set_nodelay(fd) {
                log::debug!("TCP_NODELAY on descriptor {fd}: {errno}");
            }
        }
        let Some((generation, owner)) = slot.open(Arc::clone(&shared.budget)) else {
            log::error!("slot {index} was handed out while in use; retiring it");
            // As for a missing reader cell: the accepted socket must not
            // live on unseen under the number. (Only a bug gets here, and
            // `adopt` has already put the new socket on the number of
            // whatever the slot served: no choice here saves that one.)
            shared.release_number(ConnId::new(index, 0), slot);
            shared.pool.retire(index);
            return None;
        };
        let id = ConnId::new(index, generation);
        local.tally.accepted += 1;
        if let Some(idle) = shared.idle_timeout {
            slot.touch(shared.now_ms());
            shared.schedule_timer(shared.sys.now().saturating_add(idle), Timer::Idle(id));
        }
        // Registered before the greeting is written: if the greeting does not
        // fit the socket buffer, the writer arms EPOLLOUT with EPOLL_CTL_MOD,
        // which needs the registration. (Events that arrive meanwhile find the
        // read side held and leave a pending mark.)
        let interest = match shared.write_interest {
            WriteInterest::AfterEagain => Interest::Read,
            WriteInterest::Registered => Interest::ReadWrite,
        };
        let registered = shared
            .sys
            .epoll_add(shared.fds.epoll, fd, interest, id.to_u64());
        let failed = match registered {
            Ok(()) => None,
            Err(errno) => {
                // Counted with accept's failures: the connection was taken
                // off the backlog and never served. Logged as those are
                // (the 1st, 2nd, 4th... of each errno): a full watch table
                // fails every connection until one closes.
                let seen = shared.counters.accept_error(errno);
                if seen.is_power_of_two() {
                    let why = if errno.0 == libc::ENOSPC {
                        " (fs.epoll.max_user_watches reached)"
                    } else {
                        ""
                    };
                    log::error!(
                        "{id}: epoll_ctl(ADD, {fd}): {errno}{why}; closing the connection \
                         (seen {seen} times)"
                    );
                }
                Some(CloseReason::RegisterFailed(errno.0))
            }
        };
        accepted.push(Accepted {
            id,
            slot,
            cell,
            owner,
            peer,
            failed,
        });
        registered.err()
    }

    /// Runs an accepted connection's `on_open` (or closes it, if it could
    /// not be registered) and serves it until its read side is free.
    fn first_turns(&self, local: &mut Local, conn: Accepted<'_, H::Conn>) {
        let Accepted {
            id,
            slot,
            cell,
            owner,
            peer,
            failed,
        } = conn;
        let first = match failed {
            None => self.start(local, id, slot, cell, &owner, peer),
            Some(reason) => Turn::Close(Some(reason)),
        };
        if self.shared.is_draining() {
            local.tasks.push_back(Task::Read(id));
        }
        self.serve(local, id, slot, cell, owner, Flags::default(), Some(first));
    }

    /// Runs `on_open` for a registered connection whose read side this
    /// thread holds, and writes its greeting (send first). Returns the
    /// connection's first turn.
    pub(crate) fn start(
        &self,
        local: &mut Local,
        id: ConnId,
        slot: &SlotCore,
        cell: &ReaderCell<H::Conn>,
        owner: &ReadOwner<'_>,
        peer: Option<SocketAddr>,
    ) -> Turn {
        let shared = &*self.shared;
        // From here an outbound connection's end is `on_close`'s (or
        // nobody's, if `on_open` panics), no longer `on_connect_failed`'s.
        let peer = slot.take_unopened(owner).or(peer);
        let mut close = None;
        let Local { out, tally, .. } = local;
        let (opened, replies, queued) = {
            let mut flush_now = |out: &mut Vec<u8>, write: bool| {
                self.flush_call(out, write, tally, id, slot, owner)
            };
            let mut ctx = Ctx::new(
                id,
                &shared.framing,
                out,
                &mut close,
                &self.handle,
                peer,
                &mut flush_now,
            );
            let opened = catch_unwind(AssertUnwindSafe(|| self.handler.on_open(&mut ctx)));
            (opened, ctx.replies, ctx.queued)
        };
        // Replies a `Ctx::queue` left in the out-queue are written now, panic
        // or not (as after `on_message`): a greeting queued ahead of the
        // connection's id being published must not wait behind later sends.
        // A flush-paused reader is seen by its next turn (the queue holds it).
        if queued {
            self.write_queued(tally, id, slot, owner);
        }
        // A panicking call's replies not yet flushed or queued are dropped,
        // and none of its replies are counted.
        if opened.is_ok() {
            tally.msgs_out += replies;
        }
        match opened {
            Ok(user) => {
                cell.with(owner, |reader| {
                    debug_assert!(
                        reader.user.is_none() && reader.buf.is_empty(),
                        "{id}: leftovers in a new slot"
                    );
                    reader.user = Some(user);
                });
            }
            Err(_) => {
                log::error!("{id}: handler panicked in on_open; closing the connection");
                out.clear();
                return Turn::Close(Some(CloseReason::HandlerPanic));
            }
        }
        self.flush(out, tally, id, slot, owner);
        match close {
            Some(CloseMode::Now) => Turn::Close(Some(CloseReason::Handler)),
            Some(CloseMode::AfterFlush) => self.linger(slot, CloseReason::Handler),
            None => Turn::Done { requeue: false },
        }
    }
}
