//! [`FaultSys`]: any [`Sys`], with faults injected from a seed.
//!
//! Wraps the real kernel or the simulated one and, call by call, with the
//! probabilities of a [`FaultConfig`], makes things go wrong the way kernels
//! do: reads and writes cut short (down to one byte), EAGAIN, EINTR, a reset
//! peer (ECONNRESET, EPIPE), EMFILE/ENFILE/ECONNABORTED from `accept`, EMFILE
//! from `dup` (with the same probability), EBUSY from `dup2`, spurious readiness events, futex waits that return at
//! once (as a signal makes them: callers re-check), and, over a simulated
//! kernel, other threads running right after a call returns (a preemption).
//!
//! Faults stay within what a kernel may do, because the server is entitled to
//! rely on the rest (see the contract in [`crate::sys`]):
//!
//! - a read cut short, or an EAGAIN on a read or write, is followed by a
//!   readiness event for that descriptor (as if the rest arrived, or the
//!   space freed, just after), which wakes a thread blocked in `epoll_wait`
//!   as an arrival would: a real short read means "drained for now" and a
//!   real EAGAIN is always followed by an edge. The event carries only
//!   what the descriptor's registration asked for (and ERR and HUP, as
//!   the kernel's do): write-readiness after a write's EAGAIN reaches a
//!   registration with EPOLLOUT, and none other, so the injector never
//!   stands in for a server that forgot to arm it (invariant S);
//! - an injected reset is final for that descriptor: later reads see end of
//!   stream and later writes EPIPE, until the number is closed or replaced;
//! - `close` interrupted by EINTR has still closed the descriptor (Linux);
//! - EMFILE and ENFILE from `accept` leave the connection pending with no new
//!   edge, exactly as Linux does (which is what stalls naive servers).
//!
//! The same seed injects the same faults at the same calls, so a failing run
//! on the simulated kernel replays.
//!
//! A test can also script faults: [`FaultSys::fail_next`] makes the next
//! `accept`s, `dup2`s, `epoll_add`s or `connect`s fail with errnos of its
//! choosing (any errno, for the error paths no probability reaches). A
//! scripted failure is returned
//! before the call draws any fault from the generator (only the
//! preemption after the call, if [`FaultConfig::preempt`] is set, still
//! draws), and a run that scripts nothing draws exactly as before, so
//! recorded seeds replay.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::rng::SplitMix64;
use super::{
    Errno, Event, Fd, FileId, Interest, ListenAddr, ListenOptions, Readiness, Shutdown, Sys,
    SysResult,
};

/// Fault probabilities, per call (0.0 never, 1.0 always).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Seeds every decision.
    pub seed: u64,
    /// A read is offered fewer bytes than asked (at least one).
    pub short_read: f64,
    /// A write is offered fewer bytes than given (at least one).
    pub short_write: f64,
    /// A read or write fails with EAGAIN.
    pub eagain: f64,
    /// A read, write, accept, dup2, close or epoll_wait fails with EINTR.
    pub eintr: f64,
    /// A read fails with ECONNRESET, a write with EPIPE.
    pub reset: f64,
    /// `accept` fails with EMFILE, ENFILE or ECONNABORTED, and `dup` with
    /// EMFILE.
    pub accept_error: f64,
    /// `dup2` fails with EBUSY.
    pub dup2_busy: f64,
    /// `epoll_wait` reports an extra event for a registered descriptor.
    pub spurious: f64,
    /// `futex_wait` returns at once without sleeping (standby and parking
    /// must re-check). 0 in [`FaultConfig::benign`] and
    /// [`FaultConfig::hostile`], so that seeds found before it existed
    /// replay; the simulation tests draw it separately.
    pub futex_early: f64,
    /// A call returns, and other threads run before its caller goes on (a
    /// real kernel may deschedule a thread at any return to user space;
    /// the simulated one otherwise switches only as a call begins, so the
    /// code between two calls would run as one step). 0 in
    /// [`FaultConfig::benign`] and [`FaultConfig::hostile`], like
    /// `futex_early`; the simulation tests draw it separately.
    pub preempt: f64,
}

impl FaultConfig {
    /// No faults at all.
    pub fn none(seed: u64) -> Self {
        Self {
            seed,
            short_read: 0.0,
            short_write: 0.0,
            eagain: 0.0,
            eintr: 0.0,
            reset: 0.0,
            accept_error: 0.0,
            dup2_busy: 0.0,
            spurious: 0.0,
            futex_early: 0.0,
            preempt: 0.0,
        }
    }

    /// Frequent harmless faults (short I/O, EAGAIN, EINTR, spurious events)
    /// and no lost connections: every reply must still arrive.
    pub fn benign(seed: u64) -> Self {
        Self {
            short_read: 0.2,
            short_write: 0.3,
            eagain: 0.1,
            eintr: 0.05,
            dup2_busy: 0.05,
            spurious: 0.1,
            ..Self::none(seed)
        }
    }

    /// Everything, including resets and accept failures.
    pub fn hostile(seed: u64) -> Self {
        Self {
            reset: 0.01,
            accept_error: 0.1,
            ..Self::benign(seed)
        }
    }
}

/// How many faults of each kind were injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Reads cut short.
    pub short_reads: u64,
    /// Writes cut short.
    pub short_writes: u64,
    /// EAGAIN returned.
    pub eagain: u64,
    /// EINTR returned.
    pub eintr: u64,
    /// ECONNRESET / EPIPE returned.
    pub resets: u64,
    /// accept errors (and dup EMFILEs) returned.
    pub accept_errors: u64,
    /// dup2 EBUSY returned.
    pub dup2_busy: u64,
    /// Extra readiness events reported.
    pub spurious: u64,
    /// Futex waits returned at once.
    pub futex_early: u64,
    /// Calls after which other threads ran before the caller went on.
    pub preempted: u64,
    /// Scripted failures returned (see [`FaultSys::fail_next`]).
    pub scripted: u64,
}

#[derive(Debug)]
struct State {
    config: FaultConfig,
    rng: SplitMix64,
    /// What each (epoll, number) was last registered with.
    regs: BTreeMap<(Fd, Fd), (u64, Interest)>,
    /// Events to report at the next `epoll_wait`, per epoll.
    pending: BTreeMap<Fd, VecDeque<Event>>,
    /// Epolls with events queued since the last poke (see
    /// [`FaultSys::poke`]).
    to_poke: BTreeSet<Fd>,
    /// Eventfds created through this wrapper (and not closed).
    eventfds: BTreeSet<Fd>,
    counts: FaultCounts,
    /// Numbers on which a reset was injected (for tests to excuse them).
    resets: Vec<Fd>,
    /// Numbers whose connection an injected reset killed: as after a real
    /// reset, reads see end of stream and writes fail, until the number is
    /// closed or made to refer to something else.
    dead: BTreeSet<Fd>,
    /// Scripted failures, per call, first due first.
    scripted: BTreeMap<Scripted, VecDeque<Errno>>,
    /// Listeners (by address) on which every `accept` fails, and how.
    failing_listeners: Vec<(ListenAddr, Errno)>,
}

/// The calls [`FaultSys::fail_next`] can script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scripted {
    /// `accept`: a scripted failure leaves the connection pending, as
    /// EMFILE does (no new edge announces it).
    Accept,
    /// `dup2`.
    Dup2,
    /// `epoll_add` (registering a descriptor fails: ENOSPC past
    /// `fs.epoll.max_user_watches`, or ENOMEM).
    EpollAdd,
    /// `connect` (a dial fails at once: EMFILE from its `socket`,
    /// ENETUNREACH, EADDRNOTAVAIL with the ephemeral ports used up...);
    /// no socket is made.
    Connect,
}

impl State {
    fn roll(&mut self, p: f64) -> bool {
        self.rng.chance(p)
    }

    /// The next scripted failure of `call`, counted.
    fn take_scripted(&mut self, call: Scripted) -> Option<Errno> {
        let errno = self.scripted.get_mut(&call)?.pop_front()?;
        self.counts.scripted += 1;
        Some(errno)
    }

    /// Whether this call is interrupted (EINTR), counted.
    fn interrupted(&mut self) -> bool {
        let hit = self.roll(self.config.eintr);
        self.counts.eintr += u64::from(hit);
        hit
    }

    /// A cut of `len`: somewhere in `1..len` (`len > 1`).
    fn cut(&mut self, len: usize) -> usize {
        1 + self.rng.below(len as u64 - 1) as usize
    }

    /// Moves injected events for `epoll` into `events` from index `n` on,
    /// as many as fit; returns the new count.
    fn take_pending(&mut self, epoll: Fd, events: &mut [Event], mut n: usize) -> usize {
        if let Some(pending) = self.pending.get_mut(&epoll) {
            while n < events.len() {
                let Some(event) = pending.pop_front() else {
                    break;
                };
                events[n] = event;
                n += 1;
            }
        }
        n
    }

    /// Reports `fd` ready (for `readiness`, as far as each registration
    /// asked for it) at the next `epoll_wait` of each epoll it is registered
    /// with, and marks those epolls to be poked.
    fn queue_pending(&mut self, fd: Fd, readiness: Readiness) {
        let targets: Vec<(Fd, u64, Readiness)> = self
            .regs
            .iter()
            .filter(|((_, f), _)| *f == fd)
            .map(|((ep, _), (token, interest))| {
                // Linux reports only what a registration asked for (and
                // errors and hang-ups always): an injected EAGAIN must not
                // stand in for the EPOLLOUT the server forgot to arm
                // (invariant S).
                let mask =
                    interest.readiness().bits() | Readiness::ERR.bits() | Readiness::HUP.bits();
                (*ep, *token, Readiness::from_bits(readiness.bits() & mask))
            })
            .filter(|(_, _, asked)| *asked != Readiness::empty())
            .collect();
        for (ep, token, asked) in targets {
            self.pending
                .entry(ep)
                .or_default()
                .push_back(Event::new(token, asked));
            self.to_poke.insert(ep);
        }
    }
}

/// Told about every injected reset, with the descriptor it hit (a
/// simulated kernel records it against the connection, so a test can excuse
/// that connection's early end).
pub type ResetObserver = Arc<dyn Fn(Fd) + Send + Sync>;

/// Run with a wrapped call's name, on the calling thread, after the call
/// returns ([`FaultSys::with_call_hook`]) or before the kernel sees it
/// ([`FaultSys::with_entry_hook`]): a test can hold a thread there, between
/// a syscall and what the server does before or after it, to force an
/// interleaving.
pub type CallHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// A fault-injecting [`Sys`]. See the [module docs](self). Clones share
/// the generator and the counts.
pub struct FaultSys<S: Sys> {
    inner: S,
    state: Arc<Mutex<State>>,
    observer: Option<ResetObserver>,
    hook: Option<CallHook>,
    entry_hook: Option<CallHook>,
    /// The inner kernel cannot queue injected readiness (the real one):
    /// blocking waits are cut into slices, so an injected event whose poke
    /// was absorbed (another thread drained the eventfd first) waits at
    /// most one slice.
    sliced: bool,
}

/// The longest blocking wait over a kernel that cannot inject readiness.
const SLICE: Duration = Duration::from_millis(10);

impl<S: Sys> std::fmt::Debug for FaultSys<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultSys")
            .field("inner", &self.inner)
            .field("counts", &self.lock().counts)
            .finish()
    }
}

impl<S: Sys + Clone> Clone for FaultSys<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            state: Arc::clone(&self.state),
            observer: self.observer.clone(),
            hook: self.hook.clone(),
            entry_hook: self.entry_hook.clone(),
            sliced: self.sliced,
        }
    }
}

impl<S: Sys> FaultSys<S> {
    /// Wraps `inner` with the faults of `config`.
    pub fn new(inner: S, config: FaultConfig) -> Self {
        // Asking about no descriptor changes nothing, and tells which kind
        // of kernel this is.
        let sliced = !inner.inject_readiness(-1, Readiness::empty());
        Self {
            sliced,
            inner,
            state: Arc::new(Mutex::new(State {
                config,
                rng: SplitMix64::new(config.seed),
                regs: BTreeMap::new(),
                pending: BTreeMap::new(),
                to_poke: BTreeSet::new(),
                eventfds: BTreeSet::new(),
                counts: FaultCounts::default(),
                resets: Vec::new(),
                dead: BTreeSet::new(),
                scripted: BTreeMap::new(),
                failing_listeners: Vec::new(),
            })),
            observer: None,
            hook: None,
            entry_hook: None,
        }
    }

    /// Runs `hook` after every wrapped call (see [`CallHook`]).
    pub fn with_call_hook(mut self, hook: CallHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Runs `hook` as every wrapped call begins, before the kernel sees it
    /// (see [`CallHook`]).
    pub fn with_entry_hook(mut self, hook: CallHook) -> Self {
        self.entry_hook = Some(hook);
        self
    }

    /// Calls `observer` with the descriptor of every injected reset.
    pub fn with_reset_observer(mut self, observer: ResetObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The wrapped kernel.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        self.lock().counts
    }

    /// Numbers on which a reset was injected.
    pub fn reset_fds(&self) -> Vec<Fd> {
        self.lock().resets.clone()
    }

    /// Makes the next calls to `call` fail with `errnos`, one call each, in
    /// order, ahead of any random fault (after those already scripted).
    pub fn fail_next(&self, call: Scripted, errnos: &[Errno]) {
        self.lock()
            .scripted
            .entry(call)
            .or_default()
            .extend(errnos.iter().copied());
    }

    /// Makes every `accept` on the listener bound to `addr` fail with
    /// `errno` (counted as scripted) until called again with `None`: a
    /// listener that keeps failing while the others work.
    pub fn fail_accepts_on(&self, addr: &ListenAddr, errno: Option<Errno>) {
        let mut s = self.lock();
        s.failing_listeners.retain(|(a, _)| a != addr);
        if let Some(errno) = errno {
            s.failing_listeners.push((addr.clone(), errno));
        }
    }

    /// Changes the fault probabilities from now on (the generator continues).
    pub fn set_config(&self, config: FaultConfig) {
        self.lock().config = config;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The readiness event owed after a read cut short or an injected
    /// EAGAIN. It must wake a thread blocked in `epoll_wait`, as a real
    /// arrival would: a server may leave one worker blocked there (standby)
    /// and rely on the edge to wake it. A simulated kernel queues it as a
    /// real arrival; over the real kernel it waits in `pending` and a poke
    /// wakes a waiter to collect it.
    fn announce(&self, fd: Fd, readiness: Readiness) {
        if self.inner.inject_readiness(fd, readiness) {
            return;
        }
        self.lock().queue_pending(fd, readiness);
        self.poke();
    }

    /// Wakes a thread blocked in `epoll_wait` on each epoll with events
    /// queued since the last poke, through an eventfd registered with it (the
    /// server's waker, which the server takes for a spurious wake-up); the
    /// queued events are added to what that wait returns.
    fn poke(&self) {
        let wake: Vec<Fd> = {
            let mut s = self.lock();
            let epolls = std::mem::take(&mut s.to_poke);
            epolls
                .into_iter()
                .filter_map(|ep| {
                    s.regs
                        .keys()
                        .find(|(e, f)| *e == ep && s.eventfds.contains(f))
                        .map(|(_, f)| *f)
                })
                .collect()
        };
        for fd in wake {
            let _ = self.inner.eventfd_wake(fd);
        }
    }

    /// The inner `epoll_wait`, in slices if the kernel cannot inject (see
    /// `sliced`); returns early once injected events are waiting.
    fn wait_inner(
        &self,
        epoll: Fd,
        events: &mut [Event],
        timeout: Option<Duration>,
    ) -> SysResult<usize> {
        if !self.sliced || timeout.is_some_and(|t| t <= SLICE) {
            return self.inner.epoll_wait(epoll, events, timeout);
        }
        let deadline = timeout.map(|t| self.inner.now().saturating_add(t));
        loop {
            let left = deadline.map_or(SLICE, |d| d.saturating_sub(self.inner.now()).min(SLICE));
            let n = self.inner.epoll_wait(epoll, events, Some(left))?;
            let pending = self
                .lock()
                .pending
                .get(&epoll)
                .is_some_and(|p| !p.is_empty());
            if n > 0 || pending || deadline.is_some_and(|d| self.inner.now() >= d) {
                return Ok(n);
            }
        }
    }

    /// The faults common to reads and writes, decided before the call.
    fn io_fault(&self, fd: Fd, readiness: Readiness, reset: Errno) -> Option<Errno> {
        {
            let mut s = self.lock();
            let c = s.config;
            if s.interrupted() {
                return Some(Errno::EINTR);
            }
            if s.roll(c.eagain) {
                s.counts.eagain += 1;
                drop(s);
                self.announce(fd, readiness);
                return Some(Errno::EAGAIN);
            }
            if !s.roll(c.reset) {
                return None;
            }
            s.counts.resets += 1;
            s.resets.push(fd);
            s.dead.insert(fd);
        }
        if let Some(observer) = &self.observer {
            observer(fd);
        }
        Some(reset)
    }

    /// How many of `len` bytes to offer a write (all, or a cut).
    fn write_len(&self, len: usize) -> usize {
        let mut s = self.lock();
        let p = s.config.short_write;
        if len > 1 && s.roll(p) {
            s.counts.short_writes += 1;
            s.cut(len)
        } else {
            len
        }
    }
}

impl<S: Sys> FaultSys<S> {
    /// Runs a call between the test's hooks, then maybe lets other threads
    /// run before the caller sees its result (see [`FaultConfig::preempt`]). Draws nothing when
    /// the probability is 0, so seeds found before it existed replay.
    fn after<T>(&self, call: &'static str, f: impl FnOnce() -> T) -> T {
        if let Some(hook) = &self.entry_hook {
            hook(call);
        }
        let result = f();
        if let Some(hook) = &self.hook {
            hook(call);
        }
        let preempt = {
            let mut s = self.lock();
            let p = s.config.preempt;
            let hit = p > 0.0 && s.roll(p);
            s.counts.preempted += u64::from(hit);
            hit
        };
        // The lock is released first: the threads that run meanwhile use it.
        if preempt {
            self.inner.preempt(call);
        }
        result
    }
}

impl<S: Sys> Sys for FaultSys<S> {
    fn epoll_create(&self) -> SysResult<Fd> {
        self.inner.epoll_create()
    }

    fn epoll_add(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()> {
        self.after("epoll_add", || {
            if let Some(errno) = self.lock().take_scripted(Scripted::EpollAdd) {
                return Err(errno);
            }
            self.inner.epoll_add(epoll, fd, interest, token)?;
            self.lock().regs.insert((epoll, fd), (token, interest));
            Ok(())
        })
    }

    fn epoll_modify(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()> {
        self.after("epoll_modify", || {
            self.inner.epoll_modify(epoll, fd, interest, token)?;
            self.lock().regs.insert((epoll, fd), (token, interest));
            Ok(())
        })
    }

    fn epoll_delete(&self, epoll: Fd, fd: Fd) -> SysResult<()> {
        self.lock().regs.remove(&(epoll, fd));
        self.inner.epoll_delete(epoll, fd)
    }

    fn epoll_wait(
        &self,
        epoll: Fd,
        events: &mut [Event],
        timeout: Option<Duration>,
    ) -> SysResult<usize> {
        self.inner.before_call();
        {
            let mut s = self.lock();
            let c = s.config;
            if s.interrupted() {
                // Injected events still waiting must reach another waiter:
                // this thread may not come back to `epoll_wait` soon.
                if s.pending.get(&epoll).is_some_and(|p| !p.is_empty()) {
                    s.to_poke.insert(epoll);
                }
                drop(s);
                self.poke();
                return Err(Errno::EINTR);
            }
            if s.roll(c.spurious) && !s.regs.is_empty() {
                let len = s.regs.len() as u64;
                let pick = s.rng.below(len) as usize;
                let picked = s.regs.iter().nth(pick).map(|(&(ep, _), &reg)| (ep, reg));
                if let Some((ep, (token, interest))) = picked.filter(|(ep, _)| *ep == epoll) {
                    let _ = ep;
                    s.counts.spurious += 1;
                    let readiness = match interest {
                        Interest::Read => Readiness::IN,
                        Interest::ReadWrite => Readiness::IN | Readiness::OUT,
                    };
                    s.pending
                        .entry(epoll)
                        .or_default()
                        .push_back(Event::new(token, readiness));
                }
            }
        }
        // Injected events first (they were announced before anything the
        // kernel queued since), then real ones, without blocking if any
        // injected event was taken.
        let mut n = self.lock().take_pending(epoll, events, 0);
        if n < events.len() {
            let timeout = if n > 0 { Some(Duration::ZERO) } else { timeout };
            match self.wait_inner(epoll, &mut events[n..], timeout) {
                Ok(m) => n += m,
                Err(errno) if n == 0 => return Err(errno),
                Err(_) => {}
            }
        }
        // Events queued while this thread was blocked (it may be the one a
        // poke woke).
        let mut s = self.lock();
        n = s.take_pending(epoll, events, n);
        // Injected events that did not fit wake another waiter, as events
        // left on a ready list would.
        if s.pending.get(&epoll).is_some_and(|p| !p.is_empty()) {
            s.to_poke.insert(epoll);
            drop(s);
            self.poke();
        } else {
            drop(s);
        }
        // Only a completed wait: a test counting what a thread does
        // between its waits sees each wait once.
        if let Some(hook) = &self.hook {
            hook("epoll_wait");
        }
        Ok(n)
    }

    fn listen(&self, addr: &ListenAddr, options: &ListenOptions) -> SysResult<Fd> {
        // The hooks only: no fault and no preemption roll, so the random
        // sequence (and every recorded seed) stays as it was.
        if let Some(hook) = &self.entry_hook {
            hook("listen");
        }
        let result = self.inner.listen(addr, options);
        if let Some(hook) = &self.hook {
            hook("listen");
        }
        result
    }

    fn local_addr(&self, fd: Fd) -> SysResult<ListenAddr> {
        self.inner.local_addr(fd)
    }

    fn accept(&self, listener: Fd) -> SysResult<(Fd, Option<SocketAddr>)> {
        self.after("accept", || {
            self.inner.before_call();
            {
                let mut s = self.lock();
                let c = s.config;
                if let Some(errno) = s.take_scripted(Scripted::Accept) {
                    return Err(errno);
                }
                if !s.failing_listeners.is_empty() {
                    let addr = self.inner.local_addr(listener)?;
                    let failing = s.failing_listeners.iter().find(|(a, _)| *a == addr);
                    if let Some(errno) = failing.map(|(_, errno)| *errno) {
                        s.counts.scripted += 1;
                        return Err(errno);
                    }
                }
                if s.interrupted() {
                    return Err(Errno::EINTR);
                }
                if s.roll(c.accept_error) {
                    s.counts.accept_errors += 1;
                    let errno = [Errno::EMFILE, Errno::ENFILE, Errno::ECONNABORTED]
                        [s.rng.below(3) as usize];
                    return Err(errno);
                }
            }
            let (fd, peer) = self.inner.accept(listener)?;
            self.lock().dead.remove(&fd);
            Ok((fd, peer))
        })
    }

    fn connect(&self, addr: SocketAddr) -> SysResult<Fd> {
        self.after("connect", || {
            if let Some(errno) = self.lock().take_scripted(Scripted::Connect) {
                return Err(errno);
            }
            self.inner.before_call();
            let fd = self.inner.connect(addr)?;
            self.lock().dead.remove(&fd);
            Ok(fd)
        })
    }

    fn connect_status(&self, fd: Fd) -> SysResult<bool> {
        self.after("connect_status", || self.inner.connect_status(fd))
    }

    fn recv(&self, fd: Fd, buf: &mut [u8]) -> SysResult<usize> {
        self.after("recv", || {
            self.inner.before_call();
            if self.lock().dead.contains(&fd) {
                return Ok(0);
            }
            if let Some(errno) = self.io_fault(fd, Readiness::IN, Errno::ECONNRESET) {
                return Err(errno);
            }
            let offered = {
                let mut s = self.lock();
                let p = s.config.short_read;
                if buf.len() > 1 && s.roll(p) {
                    s.counts.short_reads += 1;
                    s.cut(buf.len())
                } else {
                    buf.len()
                }
            };
            let n = self.inner.recv(fd, &mut buf[..offered])?;
            if offered < buf.len() && n == offered {
                // The kernel may hold more: report it as a new arrival.
                self.announce(fd, Readiness::IN);
            }
            Ok(n)
        })
    }

    fn send(&self, fd: Fd, buf: &[u8]) -> SysResult<usize> {
        self.after("send", || {
            self.inner.before_call();
            if self.lock().dead.contains(&fd) {
                return Err(Errno::EPIPE);
            }
            if let Some(errno) = self.io_fault(fd, Readiness::OUT, Errno::EPIPE) {
                return Err(errno);
            }
            let len = self.write_len(buf.len());
            self.inner.send(fd, &buf[..len])
        })
    }

    fn send_vectored(&self, fd: Fd, bufs: &[IoSlice<'_>]) -> SysResult<usize> {
        self.after("send_vectored", || {
            self.inner.before_call();
            if self.lock().dead.contains(&fd) {
                return Err(Errno::EPIPE);
            }
            if let Some(errno) = self.io_fault(fd, Readiness::OUT, Errno::EPIPE) {
                return Err(errno);
            }
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let len = self.write_len(total);
            if len == total {
                return self.inner.send_vectored(fd, bufs);
            }
            let mut left = len;
            let mut cut = Vec::with_capacity(bufs.len());
            for buf in bufs {
                if left == 0 {
                    break;
                }
                let take = buf.len().min(left);
                cut.push(IoSlice::new(&buf[..take]));
                left -= take;
            }
            self.inner.send_vectored(fd, &cut)
        })
    }

    fn shutdown(&self, fd: Fd, how: Shutdown) -> SysResult<()> {
        self.inner.shutdown(fd, how)
    }

    fn unacked(&self, fd: Fd) -> SysResult<usize> {
        self.inner.unacked(fd)
    }

    fn set_nodelay(&self, fd: Fd) -> SysResult<()> {
        self.inner.set_nodelay(fd)
    }

    fn dup2(&self, from: Fd, to: Fd) -> SysResult<()> {
        self.after("dup2", || {
            self.inner.before_call();
            {
                let mut s = self.lock();
                let c = s.config;
                if let Some(errno) = s.take_scripted(Scripted::Dup2) {
                    return Err(errno);
                }
                if s.interrupted() {
                    return Err(Errno::EINTR);
                }
                if s.roll(c.dup2_busy) {
                    s.counts.dup2_busy += 1;
                    return Err(Errno::EBUSY);
                }
            }
            self.inner.dup2(from, to)?;
            self.lock().dead.remove(&to);
            Ok(())
        })
    }

    fn dup(&self, fd: Fd) -> SysResult<Fd> {
        self.after("dup", || {
            self.inner.before_call();
            {
                let mut s = self.lock();
                let c = s.config;
                // Out of descriptors, as `accept` can be: the caller must
                // cope without the copy.
                if s.roll(c.accept_error) {
                    s.counts.accept_errors += 1;
                    return Err(Errno::EMFILE);
                }
            }
            self.inner.dup(fd)
        })
    }

    fn close(&self, fd: Fd) -> SysResult<()> {
        self.after("close", || {
            self.inner.before_call();
            self.inner.close(fd)?;
            let mut s = self.lock();
            s.dead.remove(&fd);
            s.eventfds.remove(&fd);
            if s.interrupted() {
                // Linux: the number is released even when close reports EINTR.
                return Err(Errno::EINTR);
            }
            Ok(())
        })
    }

    fn placeholder(&self) -> SysResult<Fd> {
        self.inner.placeholder()
    }

    fn socket_file(&self, path: &Path) -> SysResult<FileId> {
        self.inner.socket_file(path)
    }

    fn unlink_socket(&self, path: &Path, bound: FileId) -> SysResult<bool> {
        self.inner.unlink_socket(path, bound)
    }

    fn eventfd(&self) -> SysResult<Fd> {
        let fd = self.inner.eventfd()?;
        self.lock().eventfds.insert(fd);
        Ok(fd)
    }

    fn eventfd_wake(&self, fd: Fd) -> SysResult<()> {
        self.after("eventfd_wake", || self.inner.eventfd_wake(fd))
    }

    fn eventfd_drain(&self, fd: Fd) -> SysResult<()> {
        self.inner.eventfd_drain(fd)
    }

    fn futex_wait(
        &self,
        word: &AtomicU32,
        expected: u32,
        timeout: Option<Duration>,
    ) -> SysResult<()> {
        {
            let mut s = self.lock();
            let p = s.config.futex_early;
            if s.roll(p) {
                s.counts.futex_early += 1;
                return Ok(());
            }
        }
        self.inner.futex_wait(word, expected, timeout)
    }

    fn futex_wake(&self, word: &AtomicU32, n: u32) -> SysResult<usize> {
        self.after("futex_wake", || self.inner.futex_wake(word, n))
    }

    fn nofile_limit(&self) -> SysResult<(u64, u64)> {
        self.inner.nofile_limit()
    }

    fn open_descriptors(&self) -> SysResult<u64> {
        self.inner.open_descriptors()
    }

    fn set_nofile_soft_limit(&self, soft: u64) -> SysResult<()> {
        self.inner.set_nofile_soft_limit(soft)
    }

    fn now(&self) -> Duration {
        self.inner.now()
    }

    fn before_call(&self) {
        self.inner.before_call();
    }
}
