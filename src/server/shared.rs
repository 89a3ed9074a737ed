//! What every worker and every `ServerHandle` share: the epoll instance, the
//! slots, the pool, the task queue, the counters and the server's phase.
//!
//! This is also where the paths that any thread may take live: sending to a
//! connection, asking for a close, reclaiming a slot, waking a worker. None of
//! them calls the handler (a user thread sending a message must never find
//! itself running someone's `on_close`): work that needs a connection's read
//! side is queued as a [`Task`] for a worker.
//!
//! # Invariants
//!
//! - **C.** A slot's descriptor number is never closed while a connection
//!   or a stale handle could use it: closing a connection `dup2`s the
//!   placeholder over it ([`Shared::release_number`]); if that fails the
//!   slot is retired, never reused, and the socket left under it is taken
//!   out of epoll and shut for writing (the peer sees its end; no events
//!   come for it). The one number closed while the server runs is a *free*
//!   slot's, given back under EMFILE so that `accept` or a dial's `socket`
//!   can run ([`Shared::release_a_free_number`]: the slot, which has no connection,
//!   no side held and no syscall in flight, stops claiming it under the
//!   pool's lock before it is closed); every other number is closed at
//!   teardown, after every worker stopped.
//! - After teardown no path touches a descriptor. The workers have exited
//!   first; a call from another thread that may make a syscall (a send, a
//!   dial, a wake-up) announces itself and then checks for the teardown
//!   ([`Shared::enter`]), and the teardown marks itself and then waits for
//!   the calls announced: either the call sees the teardown and makes no
//!   syscall, or the teardown closes nothing before the call has returned.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::config::{IdleWait, SlowReceiver, WriteInterest};
use super::handle::{ConnectError, Control, ParkerTurns, SendError};
use super::stats::{Counters, Now, Stats};
use super::timers::{Timer, Timers};
use crate::core::futex::Futex;
use crate::core::outq::{Budget, Chunk, Refusal};
use crate::core::parking::Parking;
use crate::core::pool::{Checkout, Pool};
use crate::core::slab::Slab;
use crate::core::slot::{Limits, SlotCore, WriteReport};
use crate::core::standby::Standby;
use crate::core::state::{EndRead, Reclaimer, Release, State};
use crate::core::writer::{Sink, SinkError};
use crate::core::{CloseReason, ConnId};
use crate::framing::Framing;
use crate::handler::CloseMode;
use crate::sys::{Errno, Fd, FileId, Interest, ListenAddr, Shutdown, Sys};

use super::linger::Lingering;

/// Tokens at or above this are the event loop's own, not connections'.
pub(crate) const CONTROL_TOKEN: u64 = 1 << 63;
/// The waker eventfd's token.
pub(crate) const WAKER_TOKEN: u64 = CONTROL_TOKEN;
/// Listener `i` has token `LISTENER_TOKEN + i`.
pub(crate) const LISTENER_TOKEN: u64 = CONTROL_TOKEN + 1;

/// Work that needs a worker, queued by any thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Task {
    /// Give the connection a read turn: resume a paused reader, continue one
    /// stopped by its budget, or perform a requested close.
    Read(ConnId),
    /// Try the listeners again (a slot or a descriptor was freed).
    Accept,
    /// Start a graceful shutdown.
    Drain,
}

/// The server's phase.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const STOPPED: u8 = 2;

/// A listening socket.
#[derive(Debug)]
pub(crate) struct Listener {
    pub fd: Fd,
    pub addr: ListenAddr,
    /// A Unix listener's socket file, as bound: removed at shutdown only
    /// while its path still names it.
    pub file: Option<FileId>,
    /// When to try it again after a failed `accept`.
    pub backoff: crate::core::backoff::AcceptBackoff,
}

impl Listener {
    /// Whether connections from it are TCP (and get TCP_NODELAY).
    pub fn is_tcp(&self) -> bool {
        matches!(self.addr, ListenAddr::Tcp(_))
    }
}

/// The kernel descriptors a server owns besides the slots' numbers.
#[derive(Debug)]
pub(crate) struct Descriptors {
    pub epoll: Fd,
    pub waker: Fd,
    pub placeholder: Fd,
    pub listeners: Vec<Listener>,
}

/// The shared state. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Shared<S: Sys> {
    pub sys: S,
    pub fds: Descriptors,
    pub slots: Slab<SlotCore>,
    pub pool: Pool,
    pub limits: Limits,
    /// Output queued across all connections, against `max_out_total`.
    pub budget: std::sync::Arc<Budget>,
    /// Input held for incomplete frames across all connections (past each
    /// one's uncharged first bytes), against `max_in_total`.
    pub in_budget: std::sync::Arc<Budget>,
    pub framing: Framing,
    pub read_budget: usize,
    pub frame_budget: usize,
    pub events_per_wait: usize,
    pub slow_receiver: SlowReceiver,
    pub write_interest: WriteInterest,
    pub idle_timeout: Option<Duration>,
    pub frame_timeout: Option<Duration>,
    pub send_timeout: Option<Duration>,
    /// Sockets closed after flush that wait for their peer's FIN.
    pub lingering: Lingering,
    pub counters: Counters,
    /// Ownership of the listeners: one acceptor at a time, with a pending mark
    /// (the same protocol as a connection's read side, generation 0).
    pub acceptor: State,
    /// Accepting stopped on a full pool or exhausted resources (descriptors,
    /// memory); the next slot returned to the pool (a reclaim, or a dial
    /// that failed) schedules a retry.
    pub accept_blocked: AtomicBool,
    /// When the acceptor last warned that the pool is full (`now_ms() + 1`;
    /// 0: never): at most one warning a minute, however the pool flips
    /// between full and not under churn (only the acceptor touches it).
    pub pool_full_warned: AtomicU64,
    /// The listener the next accept turn starts at: the one after the last
    /// that gave a connection (only the acceptor touches it).
    pub accept_from: AtomicUsize,
    /// Deadlines for the workers' `epoll_wait` timeouts.
    pub timers: Timers,
    listeners_closed: AtomicBool,
    tasks: Mutex<VecDeque<Task>>,
    phase: AtomicU8,
    /// When a graceful shutdown gives up waiting (on `Sys::now`'s clock).
    deadline: Mutex<Option<Duration>>,
    forced: AtomicBool,
    torn_down: AtomicBool,
    /// Calls that may touch a descriptor from any thread, announced (see
    /// [`Shared::enter`]): the teardown waits for them, so none can use a
    /// number after it was closed (C).
    calls_in_progress: AtomicUsize,
    /// Worker threads started.
    workers: AtomicUsize,
    /// Worker threads not yet exited (set with `workers`, before any
    /// starts): the last one out knows it is.
    alive: AtomicUsize,
    /// Which workers may run; the others park on its futex word.
    parking: Parking,
    /// Taken by `with_workers_parked` callers in turn.
    parker: ParkerTurns,
    /// A `with_workers_parked` section holds the workers: set only while
    /// every worker is parked and the server runs, it keeps them parked even
    /// once a shutdown begins (its drain waits for the section's closure,
    /// which was promised that no handler runs).
    section: AtomicBool,
    /// Orders a section's start against a shutdown's phase change: either
    /// the section starts while the server runs, and the shutdown leaves
    /// its workers parked, or the shutdown comes first, and no section
    /// starts.
    section_lock: Mutex<()>,
    /// Idle workers other than the poller sleep here.
    pub standby: Standby,
}

/// A timeout longer than this (a century) means none: no timer is kept for
/// it, since its deadline would never come (and could overflow the clock).
pub(crate) const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A configured timeout, or `None` for never: zero and anything past
/// [`NEVER`] mean never, for every timeout alike (a zero timeout would
/// otherwise close each connection at its first check).
fn timeout_or_never(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero() && *t <= NEVER)
}

/// Writes a connection through `Sys`, and arms/disarms its EPOLLOUT.
///
/// The slot's descriptor number is read at each call, not when the sink is
/// made: every call comes from a thread that holds the write side of an
/// open connection (checked by generation), so the slot cannot be freed,
/// and its number re-pinned (`SlotCore::pin_fd`), under it; a number read
/// before that check could be an earlier occupant's, given to another
/// connection since.
pub(crate) struct SysSink<'a, S: Sys> {
    sys: &'a S,
    epoll: Fd,
    token: u64,
    slot: &'a SlotCore,
    /// EPOLLOUT is in the registration for good ([`WriteInterest::Registered`]).
    registered: bool,
    /// Idle timeouts are on: a write that moved bytes marks the slot active.
    marks_activity: bool,
}

/// A clock reading in whole milliseconds, as the slots' activity marks
/// hold it.
fn millis(now: Duration) -> u64 {
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

fn sink_error(errno: Errno) -> SinkError {
    if errno.is_would_block() {
        SinkError::WouldBlock
    } else if errno == Errno::EINTR {
        SinkError::Interrupted
    } else {
        SinkError::Failed(errno.0)
    }
}

impl<S: Sys> Sink for SysSink<'_, S> {
    fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
        let written = match bufs {
            [one] => self.sys.send(self.slot.fd(), one),
            _ => self.sys.send_vectored(self.slot.fd(), bufs),
        }
        .map_err(sink_error)?;
        // Marked here, while the write side is held, not by the caller once
        // it is given back: the idle timer leaves a connection whose write
        // side is held alone, and must find the mark fresh once it is not.
        if written > 0 && self.marks_activity {
            self.slot.touch(millis(self.sys.now()));
        }
        Ok(written)
    }

    fn set_write_interest(&mut self, armed: bool) -> Result<(), SinkError> {
        if self.registered {
            return Ok(());
        }
        let interest = if armed {
            Interest::ReadWrite
        } else {
            Interest::Read
        };
        self.sys
            .epoll_modify(self.epoll, self.slot.fd(), interest, self.token)
            .map_err(sink_error)
    }

    fn may_disarm(&self) -> bool {
        !self.registered && !self.slot.is_connecting()
    }
}

impl<S: Sys> Shared<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sys: S,
        fds: Descriptors,
        capacity: u32,
        limits: Limits,
        max_out_total: usize,
        max_in_total: usize,
        framing: Framing,
        read_budget: usize,
        frame_budget: usize,
        events_per_wait: usize,
        slow_receiver: SlowReceiver,
        write_interest: WriteInterest,
        idle_wait: IdleWait,
        timeouts: (Option<Duration>, Option<Duration>, Option<Duration>),
        linger: (Option<Duration>, usize),
        workers: usize,
    ) -> Self {
        let send_timeout = timeout_or_never(timeouts.2);
        let limits = Limits {
            watch_sends: send_timeout.is_some(),
            ..limits
        };
        let acceptor = State::new();
        if let Some((_, owner)) = acceptor.open() {
            let _ = acceptor.end_read(owner);
        }
        Self {
            sys,
            fds,
            slots: Slab::new(capacity as usize),
            pool: Pool::new(capacity),
            limits,
            budget: std::sync::Arc::new(Budget::new(max_out_total)),
            in_budget: std::sync::Arc::new(Budget::new(max_in_total)),
            framing,
            read_budget,
            frame_budget,
            events_per_wait,
            slow_receiver,
            write_interest,
            idle_timeout: timeout_or_never(timeouts.0),
            frame_timeout: timeout_or_never(timeouts.1),
            send_timeout,
            lingering: Lingering::new(linger.0, linger.1, super::linger::drop_budget(read_budget)),
            counters: Counters::default(),
            acceptor,
            accept_blocked: AtomicBool::new(false),
            pool_full_warned: AtomicU64::new(0),
            accept_from: AtomicUsize::new(0),
            timers: Timers::default(),
            listeners_closed: AtomicBool::new(false),
            tasks: Mutex::new(VecDeque::new()),
            phase: AtomicU8::new(RUNNING),
            deadline: Mutex::new(None),
            forced: AtomicBool::new(false),
            torn_down: AtomicBool::new(false),
            calls_in_progress: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
            alive: AtomicUsize::new(0),
            parking: Parking::new(workers),
            parker: ParkerTurns::default(),
            section: AtomicBool::new(false),
            section_lock: Mutex::new(()),
            standby: Standby::new(match idle_wait {
                IdleWait::Poll => None,
                IdleWait::Standby { busy_below } => Some(busy_below),
            }),
        }
    }

    /// The clock, in milliseconds (for per-slot timestamps).
    pub(crate) fn now_ms(&self) -> u64 {
        millis(self.sys.now())
    }

    /// Schedules the send timer a write operation on `id` armed (see
    /// [`WriteReport::send_timer`]).
    pub(crate) fn schedule_send_timer(&self, id: ConnId, report: &WriteReport<'_>) {
        if let (Some(mark), Some(timeout)) = (report.send_timer, self.send_timeout) {
            let at = self.sys.now().saturating_add(timeout);
            self.schedule_timer(at, Timer::Send(id, mark));
        }
    }

    /// Records activity on `slot` if idle timeouts are on.
    pub(crate) fn touch(&self, slot: &SlotCore) {
        if self.idle_timeout.is_some() {
            slot.touch(self.now_ms());
        }
    }

    /// The slot a connection id names (which may hold a later connection).
    pub(crate) fn slot(&self, id: ConnId) -> Option<&SlotCore> {
        self.slots.get(id.slot() as usize)
    }

    /// Whether connection `id` is open (its slot holds that generation,
    /// open): a timer for one that is not does nothing when it fires.
    pub(crate) fn is_open_id(&self, id: ConnId) -> bool {
        self.slot(id)
            .is_some_and(|slot| slot.state().open_generation() == Some(id.generation()))
    }

    /// A sink writing connection `id` through the slot's pinned number.
    pub(crate) fn sink<'a>(&'a self, id: ConnId, slot: &'a SlotCore) -> SysSink<'a, S> {
        SysSink {
            sys: &self.sys,
            epoll: self.fds.epoll,
            token: id.to_u64(),
            slot,
            registered: self.write_interest == WriteInterest::Registered,
            marks_activity: self.idle_timeout.is_some(),
        }
    }

    /// The lock that orders a parked section's start and end against the
    /// active count's changes and a shutdown's phase change. Held for no
    /// system call.
    fn lock_section(&self) -> std::sync::MutexGuard<'_, ()> {
        self.section_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_running(&self) -> bool {
        self.phase.load(Ordering::Acquire) == RUNNING
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.phase.load(Ordering::Acquire) == DRAINING
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.phase.load(Ordering::Acquire) == STOPPED
    }

    /// Queues `task` for a worker; `wake` also wakes one (needed unless the
    /// caller is a worker that will look at the queue before it sleeps).
    pub(crate) fn defer(&self, task: Task, wake: bool) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(task);
        if wake {
            self.wake();
        }
    }

    /// Announces a call that may make a syscall on the server's
    /// descriptors from any thread (a `ServerHandle`'s): `None` once the
    /// teardown has begun, and the call must then make none. Announced,
    /// then the teardown checked; the teardown marks itself, then waits for
    /// announced calls (both sides fenced): either this call sees the
    /// teardown, or the teardown waits for the returned guard to drop. The
    /// calls announced make no blocking syscall and never call the handler,
    /// so that wait is short.
    pub(crate) fn enter(&self) -> Option<Entered<'_>> {
        // Late callers stay out of the count the teardown waits on, so a
        // loop of them cannot keep it from reaching zero. (Only a hint: the
        // check after the announcement is the one that decides.)
        if self.torn_down.load(Ordering::Relaxed) {
            return None;
        }
        self.calls_in_progress.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let entered = Entered(&self.calls_in_progress);
        (!self.torn_down.load(Ordering::SeqCst)).then_some(entered)
    }

    /// Wakes one worker from `epoll_wait`.
    pub(crate) fn wake(&self) {
        let Some(_entered) = self.enter() else {
            return;
        };
        if let Err(errno) = self.sys.eventfd_wake(self.fds.waker) {
            log::error!("waking a worker: eventfd write: {errno}");
        }
    }

    /// Schedules a timer. The pollers computed their timeouts without it,
    /// and nothing else may bring an event (a connect that never completes):
    /// a caller that is not a worker (which looks before it waits) wakes one
    /// when this timer is the new earliest.
    pub(crate) fn schedule_timer(&self, at: Duration, timer: Timer) {
        let is_open = |id: ConnId| self.is_open_id(id);
        if self.timers.schedule(at, timer, is_open) && !super::worker::is_worker_of(self) {
            self.wake();
        }
    }

    /// The futex for standby and parking, through this server's `Sys`.
    pub(crate) fn futex(&self) -> SysFutex<'_, S> {
        SysFutex(&self.sys)
    }

    /// Whether tasks are waiting.
    pub(crate) fn has_tasks(&self) -> bool {
        !self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Moves every waiting task to the back of `into`.
    pub(crate) fn take_tasks(&self, into: &mut VecDeque<Task>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if into.is_empty() {
            std::mem::swap(&mut *tasks, into);
        } else {
            into.append(&mut tasks);
        }
    }

    /// Records how many worker threads run (before they start); all may
    /// run unless `set_active_workers` was called before.
    pub(crate) fn set_worker_count(&self, n: usize) {
        self.workers.store(n, Ordering::Release);
        self.alive.store(n, Ordering::Release);
        self.parking.start(n);
    }

    /// A worker exits; `true` for the last one. (A start that failed to
    /// spawn them all never gets here with 0: it stops the server itself.)
    pub(crate) fn worker_exited(&self) -> bool {
        self.alive.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Workers allowed to run now.
    pub(crate) fn active_workers(&self) -> usize {
        self.parking.active()
    }

    /// Lets only the first `n` workers run; the others park when they next
    /// look (each is woken to look).
    pub(crate) fn set_active(&self, n: usize) {
        {
            // Decided and stored under the section's lock, so that a
            // section cannot start between the decision and the store (a
            // count raised then would let workers out during its closure).
            let _section = self.lock_section();
            self.store_active(n);
        }
        self.active_changed();
    }

    /// Stores the count `n` asks for, as things stand (the caller holds the
    /// section's lock): 0 while a parked section holds the workers; every
    /// worker once a shutdown has begun (the drain needs them). Clamped to
    /// the workers configured, not to those started: before `start` none
    /// has, and the count must hold from the start.
    fn store_active(&self, n: usize) {
        let n = if self.section.load(Ordering::SeqCst) {
            0
        } else if self.is_running() {
            n
        } else {
            usize::MAX
        };
        self.parking.store_active(n.min(self.parking.workers()));
    }

    /// Wakes whoever waits on the count, after a change. (System calls: never
    /// under the section's lock, which the simulated kernel's scheduler
    /// could not see a thread blocked on.)
    fn active_changed(&self) {
        if let Err(errno) = self.parking.changed(&self.futex()) {
            log::error!("set_active_workers: futex_wake: {errno}");
        }
        self.standby.wake_all(&self.futex());
        // Workers blocked in epoll_wait must look: the wake-up is passed on
        // from worker to worker while some that should park have not.
        self.wake();
    }

    /// Whether worker `index` must park: only while the server runs (a
    /// drain needs every worker, and `begin_shutdown` wakes the parked).
    pub(crate) fn should_park(&self, index: usize) -> bool {
        index >= self.active_workers() && self.is_running()
    }

    /// Whether some worker that must park has not parked yet.
    pub(crate) fn park_pending(&self) -> bool {
        self.is_running() && self.parking.pending()
    }

    /// Workers parked now.
    pub(crate) fn parked_workers(&self) -> usize {
        self.parking.parked()
    }

    /// Parks worker `index` until it may run again or the server stops
    /// running (drains or stops).
    pub(crate) fn park_until_active(&self, index: usize) {
        if let Err(errno) = self.parking.park(index, &self.futex(), || {
            !self.is_running() && !self.section.load(Ordering::SeqCst)
        }) {
            // Only a bug (a bad address) gets here; the caller parks again.
            log::error!("worker {index}: parking: futex: {errno}");
            std::thread::sleep(super::worker::DRAIN_POLL);
        }
    }

    /// Waits until `n` workers are parked (or the server stops).
    pub(crate) fn wait_parked(&self, n: usize) {
        while let Err(errno) = self
            .parking
            .wait_parked(n, &self.futex(), || self.is_stopped())
        {
            log::error!("waiting for {n} parked workers: futex_wait: {errno}");
            std::thread::sleep(super::worker::DRAIN_POLL);
        }
    }

    /// Acts on what a write-side operation reported. `wake`: whether a task
    /// queued here needs a worker woken (false when the caller is a worker).
    pub(crate) fn settle_write(
        &self,
        id: ConnId,
        slot: &SlotCore,
        report: WriteReport<'_>,
        wake: bool,
    ) {
        self.counters.add(|t| {
            t.bytes_out += report.written as u64;
            t.epollout_arms += u64::from(report.arms);
            t.queued(report.queued);
        });
        self.schedule_send_timer(id, &report);
        if report.resume || report.close_requested {
            self.defer(Task::Read(id), wake);
        }
        if let Some(reclaimer) = report.reclaim {
            self.reclaim(id.slot(), slot, reclaimer, wake);
        }
    }

    /// Resets a reclaimed slot and returns it to the pool (or retires it),
    /// then lets a blocked acceptor try again.
    pub(crate) fn reclaim(
        &self,
        index: u32,
        slot: &SlotCore,
        reclaimer: Reclaimer<'_>,
        wake: bool,
    ) {
        slot.reset(&reclaimer);
        if slot.is_retired() {
            if slot.state().generation() == 0 {
                log::warn!(
                    "slot {index} retired: it served 2^32 connections, and the next would reuse its first's id"
                );
            }
            self.pool.retire(index);
            self.counters.add(|t| t.slots_retired += 1);
            self.retry_blocked_accept(wake);
        } else {
            self.checkin(index, wake);
        }
    }

    /// Returns slot `index` to the pool, then lets a blocked acceptor try
    /// again: whatever returns a slot, a connection pending in the backlog
    /// may be waiting for it.
    fn checkin(&self, index: u32, wake: bool) {
        self.pool.checkin(index);
        self.retry_blocked_accept(wake);
    }

    fn retry_blocked_accept(&self, wake: bool) {
        // AcqRel: pairs with the acceptor, which sets the flag and then
        // re-checks the pool; one of the two always sees the other.
        if self.accept_blocked.swap(false, Ordering::AcqRel) {
            self.defer(Task::Accept, wake);
        }
    }

    /// Puts a new connection's descriptor on a free slot. A fresh slot (or
    /// one whose number was released under EMFILE) adopts `fd` for life; a
    /// reused slot gets it `dup2`'d onto its pinned number and `fd` is
    /// closed (invariant C). On failure `fd` is closed and nothing is held.
    /// `reserved`: take the slot a `Pool::reserve` promised (the acceptor),
    /// rather than any slot left (an outbound connect, which learns of a
    /// full pool from the error).
    pub(crate) fn adopt(&self, fd: Fd, reserved: bool) -> Result<(u32, &SlotCore), Unadopted> {
        let checkout = if reserved {
            self.pool.checkout_reserved()
        } else {
            self.pool.checkout()
        };
        let Some(checkout) = checkout else {
            let _ = self.sys.close(fd);
            return Err(Unadopted::PoolFull);
        };
        let index = checkout.index();
        let Some(slot) = self.slots.get_or_create(index as usize) else {
            log::error!("slot {index} is past the slab's capacity; dropping the connection");
            let _ = self.sys.close(fd);
            self.pool.retire(index);
            return Err(Unadopted::PoolFull);
        };
        match checkout {
            _ if slot.fd() < 0 => slot.pin_fd(fd),
            Checkout::Fresh(_) => slot.pin_fd(fd),
            Checkout::Reused(_) => {
                let pinned = slot.fd();
                let mut moved = self.sys.dup2(fd, pinned);
                // Bounded: EINTR and EBUSY are transient, but never loop forever.
                for _ in 0..8 {
                    if !matches!(moved, Err(e) if e == Errno::EINTR || e == Errno::EBUSY) {
                        break;
                    }
                    moved = self.sys.dup2(fd, pinned);
                }
                let _ = self.sys.close(fd);
                if let Err(errno) = moved {
                    log::error!(
                        "dup2({fd}, {pinned}) for a new connection: {errno}; connection dropped"
                    );
                    // The acceptor runs on a worker; a dial on any thread.
                    self.checkin(index, !reserved);
                    return Err(Unadopted::Dup2(errno));
                }
            }
        }
        Ok((index, slot))
    }

    /// Starts an outbound connection (see [`ServerHandle::connect`]).
    ///
    /// [`ServerHandle::connect`]: super::ServerHandle::connect
    fn start_connect(&self, addr: SocketAddr) -> Result<ConnId, ConnectError> {
        let Some(_entered) = self.enter() else {
            return Err(ConnectError::ShuttingDown { addr });
        };
        if self.is_draining() || self.is_stopped() {
            return Err(ConnectError::ShuttingDown { addr });
        }
        let sys_error = |syscall, errno| ConnectError::Sys {
            addr,
            syscall,
            errno,
        };
        if !self.pool.can_checkout() {
            if self.is_draining() || self.is_stopped() {
                return Err(ConnectError::ShuttingDown { addr });
            }
            return Err(ConnectError::PoolFull {
                addr,
                capacity: self.pool.capacity() as usize,
            });
        }
        let fd = match self.sys.connect(addr) {
            // Out of numbers while a free slot holds one: give it back and
            // try once more, as accept does (once: a dial has a caller to
            // tell, and the numbers may be someone else's).
            Err(errno) if errno == Errno::EMFILE && self.release_a_free_number() => {
                self.sys.connect(addr)
            }
            other => other,
        }
        .map_err(|e| sys_error("connect", e))?;
        let (index, slot) = self.adopt(fd, false).map_err(|why| match why {
            // Closed by the drain's last step.
            Unadopted::PoolFull if self.is_draining() || self.is_stopped() => {
                ConnectError::ShuttingDown { addr }
            }
            Unadopted::PoolFull => ConnectError::PoolFull {
                addr,
                capacity: self.pool.capacity() as usize,
            },
            Unadopted::Dup2(errno) => sys_error("dup2", errno),
        })?;
        let fd = slot.fd();
        if let Err(errno) = self.sys.set_nodelay(fd) {
            log::debug!("TCP_NODELAY on descriptor {fd}: {errno}");
        }
        let Some((generation, mut owner)) =
            slot.open_outbound(std::sync::Arc::clone(&self.budget), addr)
        else {
            log::error!("slot {index} was handed out while in use; retiring it");
            // As for an accepted connection in the same case: the dialled
            // socket must not live on unseen under the number (a peer would
            // see a connection that never ends). Only a bug gets here.
            self.release_number(ConnId::new(index, 0), slot);
            self.pool.retire(index);
            return Err(sys_error("open", Errno::EBUSY));
        };
        let id = ConnId::new(index, generation);
        self.counters.add(|t| t.connects += 1);
        // Registered with EPOLLOUT: the connect's completion (or failure) is
        // the first write-readiness edge. The read side is ours until it is
        // registered; the worker that gets the edge takes it from there.
        if let Err(errno) = self
            .sys
            .epoll_add(self.fds.epoll, fd, Interest::ReadWrite, id.to_u64())
        {
            // A local limit, as for an accepted connection: not the
            // connect's failure, and not the remote's.
            self.abort_connect(id, slot, owner, CloseReason::RegisterFailed(errno.0));
            return Err(sys_error("epoll_ctl(ADD)", errno));
        }
        // Hand the read side over: an edge that arrived meanwhile becomes a
        // worker's read task.
        let mut missed = false;
        loop {
            match slot.state().end_read(owner) {
                EndRead::Released => break,
                EndRead::Again(next, _) => {
                    missed = true;
                    owner = next;
                }
                // Only a shutdown can know the id already (the idle timer
                // starts below, once the read side is handed over).
                EndRead::Close(next) => {
                    self.abort_connect(id, slot, next, CloseReason::Shutdown);
                    return Err(ConnectError::ShuttingDown { addr });
                }
            }
        }
        // The idle timeout bounds the connect too. A timer for a dial that
        // a worker has closed meanwhile is dropped when it fires (and the
        // touch of a slot reused since only delays its new occupant's idle
        // check, by at most one timeout).
        if let Some(idle) = self.idle_timeout {
            slot.touch(self.now_ms());
            self.schedule_timer(self.sys.now().saturating_add(idle), Timer::Idle(id));
        }
        // The drain gives the connections it lists a last turn; a dial
        // that passed its shutdown check, but opened after the list was
        // made, takes its turn itself (still connecting with nothing
        // queued, it is cancelled rather than held to the deadline). The
        // fences pair with `begin_drain`'s: either this dial sees the
        // phase, or the drain's list sees the dial open.
        fence(Ordering::SeqCst);
        if missed || self.is_draining() {
            self.defer(Task::Read(id), true);
        }
        Ok(id)
    }

    /// Closes an outbound connection before any handler call: the caller of
    /// `connect` holds its read side and learns of the failure directly.
    fn abort_connect<'s>(
        &self,
        id: ConnId,
        slot: &'s SlotCore,
        owner: crate::core::state::ReadOwner<'s>,
        reason: CloseReason,
    ) {
        let _ = slot.begin_close(&owner);
        self.release_number(id, slot);
        slot.connect_done(&owner);
        // The caller of `connect` learns of the failure; no handler call.
        let _ = slot.take_unopened(&owner);
        self.counters.add(|t| t.close(reason));
        log::info!("{id} closed: {reason}");
        if let Release::Reclaim(reclaimer) = slot.finish_close(owner) {
            self.reclaim(id.slot(), slot, reclaimer, true);
        }
    }

    /// Out of descriptor numbers (EMFILE): closes the pinned number of the
    /// oldest free slot that still holds one (a slot that gave its number
    /// away before, to a number something else then took, is passed over),
    /// so that `accept` or a dial's `socket` can take it; the slot adopts
    /// whatever number it is given when it is next used. Safe for invariant
    /// C: a free slot has no connection, no side held, and nothing can be
    /// in a syscall on its number; and the slot stops claiming the number
    /// before anything can reuse it. Not for ENFILE: a free slot's number
    /// shares the placeholder's file, so closing it frees no file.
    pub(crate) fn release_a_free_number(&self) -> bool {
        // Under the pool's lock: a dial checking this slot out meanwhile
        // would read the number still pinned and `dup2` onto it after we
        // close it, maybe over a peer that `accept` just got.
        let Some(fd) = self
            .pool
            .with_oldest_free(|i| self.slots.get(i as usize)?.unpin())
        else {
            return false;
        };
        log::info!("out of descriptors: released the number {fd} of a free slot");
        self.counters.add(|t| t.numbers_released += 1);
        let _ = self.sys.close(fd);
        true
    }

    /// Makes a closed connection's number safe: the placeholder is `dup2`'d
    /// over it, releasing the socket, so the number stays ours and a stale
    /// write can only hit the placeholder. Retires the slot on failure.
    pub(crate) fn release_number(&self, id: ConnId, slot: &SlotCore) {
        let fd = slot.fd();
        let mut last = Errno::EBADF;
        for _ in 0..8 {
            match self.sys.dup2(self.fds.placeholder, fd) {
                Ok(()) => return,
                // EINTR: try again. EBUSY: an open racing on the same number,
                // which only a foreign thread of this process can cause.
                Err(errno) if errno == Errno::EINTR || errno == Errno::EBUSY => last = errno,
                Err(errno) => {
                    last = errno;
                    break;
                }
            }
        }
        log::error!(
            "{id}: dup2(placeholder, {fd}) failed: {last}; retiring the slot so its number is never reused"
        );
        // The socket lives on under the number, which must not be closed
        // (invariant C): take it out of epoll, so that what the peer sends
        // raises no events for a closed generation, then send the peer its
        // FIN. Not SHUT_RD: Linux answers data reaching a socket that sent
        // its FIN and is shut for reading with a reset, which would undo a
        // lingering close (whose socket this is too). Its buffers are this failure's cost. Errors change
        // nothing: a lingering close already took the registration and
        // sent the FIN.
        let _ = self.sys.epoll_delete(self.fds.epoll, fd);
        let _ = self.sys.shutdown(fd, Shutdown::Write);
        slot.retire();
    }

    /// Asks a worker to close `id` (now, or once its output is flushed).
    pub(crate) fn request_close(&self, id: ConnId, mode: CloseMode, reason: CloseReason) -> bool {
        let Some(slot) = self.slot(id) else {
            return false;
        };
        if mode == CloseMode::AfterFlush {
            // The reader stays away meanwhile (the queue holds it). A read
            // turn must follow: drained already, it closes; otherwise it
            // counts the linger, and the writer that settles the last byte
            // requests the close (see `SlotCore::close_after_flush`).
            return match slot.close_after_flush_first(id.generation(), reason) {
                None => false,
                Some((_, first)) => {
                    if first {
                        self.defer(Task::Read(id), true);
                    }
                    true
                }
            };
        }
        if slot.request_close(id.generation(), reason) {
            self.defer(Task::Read(id), true);
            return true;
        }
        false
    }

    /// Starts a graceful shutdown with `grace` to flush (idempotent; a
    /// second call can only bring the deadline closer).
    pub(crate) fn begin_shutdown(&self, grace: Duration) {
        if self.is_stopped() {
            return;
        }
        let deadline = self.sys.now().saturating_add(grace);
        {
            let mut current = self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
            *current = Some(current.map_or(deadline, |d| d.min(deadline)));
        }
        let began = {
            // The phase change and the count under the section's lock: a
            // section starts either before (and its workers stay parked
            // until it ends: `store_active` keeps 0) or not at all.
            let _section = self.lock_section();
            // Release: workers that see DRAINING must see the deadline.
            let began = self
                .phase
                .compare_exchange(RUNNING, DRAINING, Ordering::Release, Ordering::Relaxed)
                .is_ok();
            // Parked workers are needed to drain. After the phase change: a
            // worker parks only while the server runs, so one that parked on
            // a count lowered just before must see the drain when woken.
            self.store_active(usize::MAX);
            began
        };
        if began {
            self.defer(Task::Drain, true);
        } else {
            self.wake();
        }
        self.active_changed();
        // Draining workers poll (with the drain's timeout) rather than stand by.
        self.standby.wake_all(&self.futex());
    }

    /// Whether the graceful shutdown's deadline has passed, so closes must
    /// be forced; the second result is true the first time it is seen.
    pub(crate) fn deadline_passed(&self) -> (bool, bool) {
        let passed = self
            .deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|d| self.sys.now() >= d);
        (passed, passed && !self.forced.swap(true, Ordering::AcqRel))
    }

    /// Whether the shutdown deadline passed more than
    /// [`GIVE_UP`](super::worker::GIVE_UP) ago.
    pub(crate) fn past_give_up(&self) -> bool {
        self.deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|d| self.sys.now() >= d.saturating_add(super::worker::GIVE_UP))
    }

    /// Time left before the shutdown deadline.
    pub(crate) fn until_deadline(&self) -> Option<Duration> {
        let deadline = (*self.deadline.lock().unwrap_or_else(PoisonError::into_inner))?;
        Some(deadline.saturating_sub(self.sys.now()))
    }

    /// Marks the server stopped (every connection is closed) and wakes the
    /// workers so they exit.
    pub(crate) fn mark_stopped(&self) {
        self.phase.store(STOPPED, Ordering::Release);
        if let Err(errno) = self.parking.changed(&self.futex()) {
            log::error!("stop: waking parked workers: futex_wake: {errno}");
        }
        self.standby.wake_all(&self.futex());
        self.wake();
    }

    /// Ids of the connections open now.
    pub(crate) fn open_connections(&self) -> Vec<ConnId> {
        (0..self.pool.created())
            .filter_map(|index| {
                let generation = self.slots.get(index as usize)?.state().open_generation()?;
                Some(ConnId::new(index, generation))
            })
            .collect()
    }

    /// Stops listening (once): unregisters and closes the listeners, and
    /// removes Unix socket files. The caller holds the acceptor side.
    pub(crate) fn close_listeners(&self) {
        if self.listeners_closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for listener in &self.fds.listeners {
            let _ = self.sys.epoll_delete(self.fds.epoll, listener.fd);
            // The file goes first, while the socket is live: a new server
            // refuses a live socket's path, so none can have taken it over
            // between the check that it is still ours and its removal.
            if let (ListenAddr::Unix(path), Some(file)) = (&listener.addr, listener.file) {
                match self.sys.unlink_socket(path, file) {
                    Ok(true) => {}
                    Ok(false) => log::info!(
                        "socket file {} is no longer the one bound (taken over by another server?): left in place",
                        path.display()
                    ),
                    Err(errno) => log::warn!("removing socket file {}: {errno}", path.display()),
                }
            }
            if let Err(errno) = self.sys.close(listener.fd) {
                log::warn!("closing listener {}: {errno}", listener.addr);
            }
        }
        log::info!("stopped accepting connections");
    }

    /// Closes every descriptor the server owns. Only after all workers have
    /// exited; idempotent.
    pub(crate) fn close_descriptors(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.phase.store(STOPPED, Ordering::Release);
        // No slot for a dial that has not taken one yet (a stop that did not
        // go through the drain's last step, which closes the pool itself).
        self.pool.close();
        // Calls from other threads announced before the mark finish first
        // (see `enter`): a send still holding a write side (a drain that
        // gave up), a dial about to `dup2`, a wake-up about to write the
        // eventfd. None may use a number closed below, which the program
        // could have reused.
        fence(Ordering::SeqCst);
        while self.calls_in_progress.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        // A handle thread may wait for parked workers that exited.
        if let Err(errno) = self.parking.changed(&self.futex()) {
            log::error!("teardown: waking parking waiters: futex_wake: {errno}");
        }
        self.close_listeners();
        for index in 0..self.pool.created() {
            if let Some(slot) = self.slots.get(index as usize) {
                if slot.state().open_generation().is_some() {
                    // Unreachable after a drain; keep the queue closed anyway.
                    slot.queue().close();
                }
                let fd = slot.fd();
                if fd >= 0 {
                    let _ = self.sys.close(fd);
                }
            }
        }
        self.lingering.close_all(&self.sys, true);
        for fd in [self.fds.waker, self.fds.placeholder, self.fds.epoll] {
            let _ = self.sys.close(fd);
        }
    }
}

impl<S: Sys> Drop for Shared<S> {
    fn drop(&mut self) {
        self.close_descriptors();
    }
}

/// A call announced by [`Shared::enter`], until dropped.
pub(crate) struct Entered<'a>(&'a AtomicUsize);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why [`Shared::adopt`] found no slot for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unadopted {
    PoolFull,
    Dup2(Errno),
}

impl<S: Sys> Control for Shared<S> {
    fn connect(&self, addr: SocketAddr) -> Result<ConnId, ConnectError> {
        self.start_connect(addr)
    }

    fn send_chunk(&self, id: ConnId, chunk: Chunk) -> Result<(), SendError> {
        let (Some(_entered), Some(slot)) = (self.enter(), self.slot(id)) else {
            self.counters.add(|t| t.sends_closed += 1);
            return Err(SendError::Closed(id));
        };
        let mut sink = self.sink(id, slot);
        match slot.send(id.generation(), chunk, self.limits, &mut sink) {
            Ok(report) => {
                self.counters.add(|t| t.msgs_out += 1);
                self.settle_write(id, slot, report, true);
                Ok(())
            }
            Err(Refusal::Closed) => {
                self.counters.add(|t| t.sends_closed += 1);
                Err(SendError::Closed(id))
            }
            Err(Refusal::TooLarge { len, limit }) => {
                // The sender's mistake, not the receiver's: it stays open.
                self.counters.add(|t| t.sends_full += 1);
                Err(SendError::TooLarge {
                    conn: id,
                    len,
                    limit,
                })
            }
            Err(Refusal::Full { queued, limit }) => {
                self.counters.add(|t| t.sends_full += 1);
                if self.slow_receiver == SlowReceiver::Close
                    && slot.request_close(id.generation(), CloseReason::SlowReceiver)
                {
                    log::info!(
                        "{id}: output full ({queued} of {limit} bytes queued): closing slow receiver"
                    );
                    self.defer(Task::Read(id), true);
                }
                Err(SendError::Full {
                    conn: id,
                    queued,
                    limit,
                    server_wide: false,
                })
            }
            Err(Refusal::Budget { queued, limit }) => {
                // The server, not this receiver, is over its budget: refuse,
                // but never close a receiver for it.
                self.counters.add(|t| t.sends_full += 1);
                Err(SendError::Full {
                    conn: id,
                    queued,
                    limit,
                    server_wide: true,
                })
            }
        }
    }

    fn refuse_oversized(&self, id: ConnId, len: usize, limit: usize) -> SendError {
        let takes = self.enter().is_some()
            && self
                .slot(id)
                .is_some_and(|slot| slot.queue().takes_new(id.generation()));
        if takes {
            self.counters.add(|t| t.sends_full += 1);
            SendError::TooLarge {
                conn: id,
                len,
                limit,
            }
        } else {
            self.counters.add(|t| t.sends_closed += 1);
            SendError::Closed(id)
        }
    }

    fn framing(&self) -> &Framing {
        &self.framing
    }

    fn close(&self, id: ConnId, mode: CloseMode) -> bool {
        self.request_close(id, mode, CloseReason::Requested)
    }

    fn is_open(&self, id: ConnId) -> bool {
        self.is_open_id(id)
    }

    fn shutdown(&self, grace: Duration) {
        self.begin_shutdown(grace);
    }

    fn stats(&self) -> Stats {
        self.counters.snapshot(Now {
            open: u64::from(self.pool.in_use()),
            lingering: self.lingering.len() as u64,
            input_held: self.in_budget.queued() as u64,
            timers: self.timers.len() as u64,
        })
    }

    fn max_send(&self) -> usize {
        crate::core::outq::max_message(self.limits.max_out, Some(&self.budget))
    }

    fn local_addrs(&self) -> Vec<ListenAddr> {
        self.fds.listeners.iter().map(|l| l.addr.clone()).collect()
    }

    fn teardown(&self) {
        self.close_descriptors();
    }

    fn set_active_workers(&self, n: usize) {
        self.set_active(n);
    }

    fn hold_workers(&self) -> bool {
        let _section = self.lock_section();
        // Every worker parked, and kept so: the count is 0 (another thread
        // may have raised it since, and a worker it woke still shows its
        // parked flag on its way out).
        let all_parked = self.parked_workers() >= self.workers.load(Ordering::Acquire);
        let held = self.is_running() && all_parked && self.active_workers() == 0;
        self.section.store(held, Ordering::SeqCst);
        held
    }

    fn release_workers(&self) {
        let _section = self.lock_section();
        self.section.store(false, Ordering::SeqCst);
    }

    fn on_a_worker(&self) -> bool {
        super::worker::is_any_worker()
    }

    fn serving(&self) -> bool {
        self.is_running()
    }

    fn workers(&self) -> (usize, usize, usize) {
        (
            self.workers.load(Ordering::Acquire),
            self.active_workers(),
            self.parked_workers(),
        )
    }

    fn wait_parked(&self, n: usize) {
        Shared::wait_parked(self, n);
    }

    fn parker_turns(&self) -> &ParkerTurns {
        &self.parker
    }
}

/// The core's futex ([`Futex`]: standby and parking) through a [`Sys`].
pub(crate) struct SysFutex<'a, S>(&'a S);

#[cfg(not(loom))]
impl<S: Sys> Futex for SysFutex<'_, S> {
    type Error = Errno;

    fn wait(
        &self,
        word: &crate::sync::AtomicU32,
        expected: u32,
        timeout: Option<Duration>,
    ) -> Result<(), Errno> {
        self.0.futex_wait(word, expected, timeout)
    }

    fn wake(&self, word: &crate::sync::AtomicU32, n: u32) -> Result<usize, Errno> {
        self.0.futex_wake(word, n)
    }
}

/// A `--cfg loom` build (`ci/loom.sh`) runs the core's unit tests and never
/// a server, and loom's atomics cannot be handed to the kernel: waiting
/// returns at once (the contract allows any early return) and waking wakes
/// nobody. The loom models of standby and parking have their own futex
/// (`tests/loom.rs`).
#[cfg(loom)]
impl<S: Sys> Futex for SysFutex<'_, S> {
    type Error = Errno;

    fn wait(
        &self,
        _word: &crate::sync::AtomicU32,
        _expected: u32,
        _timeout: Option<Duration>,
    ) -> Result<(), Errno> {
        std::thread::yield_now();
        Ok(())
    }

    fn wake(&self, _word: &crate::sync::AtomicU32, _n: u32) -> Result<usize, Errno> {
        Ok(0)
    }
}
