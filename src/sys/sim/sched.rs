//! The baton: real threads, one running at a time, switched at every syscall
//! in an order chosen from a seed.
//!
//! The server's workers are ordinary OS threads running the production event
//! loop. Every call they make into the simulated kernel is a *scheduling
//! point*: the thread hands the baton to a thread picked by a seeded
//! generator (possibly itself) and waits until the baton comes back. Only the
//! baton holder runs, so everything between two syscalls (atomics, the
//! out-queue's mutex, the pool) happens in an order fixed by the seed, and the
//! same seed replays the same run exactly.
//!
//! This works because the server never holds one of its locks across a
//! syscall (a thread parked at a scheduling point holds none), and never
//! blocks except in `epoll_wait` and `futex_wait` (standby and parking),
//! which the simulated kernel turns into [`Sched::block`].
//!
//! Virtual time moves by a small step at every scheduling point, and when
//! every thread is blocked it jumps to the earliest deadline. A driver thread (the test, playing the
//! clients) can wait for *quiescence*: every other thread blocked with nothing
//! to do.
//!
//! If a test panics, or no thread can ever run again, the scheduler switches
//! to *free-running*: the baton is abandoned, every thread runs, and deadlines
//! expire at once, so the server can still shut down and the failure be
//! reported instead of hanging.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use crate::sys::rng::SplitMix64;

/// Lines of trace kept for failure reports.
const TRACE_LINES: usize = 80;

/// Virtual time each scheduling point costs. Time passes while threads
/// work, as on a real machine: a thread that spins without ever blocking
/// still reaches its deadlines.
const STEP_TIME: Duration = Duration::from_micros(10);

static NEXT_SCHED: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Runnable,
    Blocked {
        deadline: Option<Duration>,
    },
    /// The driver, waiting until nothing else can run; gives up after
    /// `budget` more steps.
    Quiescing {
        budget: u64,
    },
    Detached,
    Exited,
}

#[derive(Debug)]
struct Thread {
    name: String,
    /// It called [`Sched::attach`]: the test's driver, ordered after every
    /// other thread whatever its name (see [`Sched::runnable`]).
    driver: bool,
    status: Status,
    /// A wake-up arrived (possibly before the thread blocked).
    woken: bool,
    /// The last block ended by its deadline rather than a wake-up.
    timed_out: bool,
    /// It has held the baton at least once (from then on it may only run
    /// while holding it).
    started: bool,
}

#[derive(Debug)]
struct State {
    threads: Vec<Thread>,
    current: Option<usize>,
    rng: SplitMix64,
    now: Duration,
    steps: u64,
    free: bool,
    failure: Option<String>,
    trace: VecDeque<String>,
}

#[derive(Debug)]
struct Shared {
    id: u64,
    state: Mutex<State>,
    cv: Condvar,
}

/// How a [`Sched::block`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Another thread woke this one.
    Woken,
    /// The deadline passed.
    TimedOut,
}

/// The scheduler of one simulated kernel. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Sched {
    shared: Arc<Shared>,
}

/// A thread's membership in schedulers, dropped (and so reported as exited)
/// when the thread ends. Weak: a thread that outlives a scheduler (a test's
/// driver running scenario after scenario) must not keep it alive.
struct Membership(Vec<(Weak<Shared>, usize)>);

impl Drop for Membership {
    fn drop(&mut self) {
        for (shared, index) in self.0.drain(..) {
            if let Some(shared) = shared.upgrade() {
                Sched { shared }.exit(index);
            }
        }
    }
}

thread_local! {
    static MEMBERSHIP: RefCell<Membership> = const { RefCell::new(Membership(Vec::new())) };
}

impl Sched {
    /// A scheduler whose choices all follow from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                id: NEXT_SCHED.fetch_add(1, Ordering::Relaxed),
                state: Mutex::new(State {
                    threads: Vec::new(),
                    current: None,
                    rng: SplitMix64::new(seed),
                    now: Duration::ZERO,
                    steps: 0,
                    free: false,
                    failure: None,
                    trace: VecDeque::new(),
                }),
                cv: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// This thread's index, registering it (by its name) on first contact.
    fn me(&self) -> usize {
        let found = MEMBERSHIP.with(|m| {
            let mut m = m.borrow_mut();
            m.0.retain(|(s, _)| s.strong_count() > 0);
            m.0.iter()
                .find(|(s, _)| s.upgrade().is_some_and(|s| s.id == self.shared.id))
                .map(|(_, i)| *i)
        });
        if let Some(index) = found {
            return index;
        }
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        let index = {
            let mut state = self.lock();
            state.threads.push(Thread {
                name,
                driver: false,
                status: Status::Runnable,
                woken: false,
                timed_out: false,
                started: false,
            });
            let index = state.threads.len() - 1;
            if state.current.is_none() {
                state.current = Some(index);
            }
            self.shared.cv.notify_all();
            index
        };
        MEMBERSHIP.with(|m| m.borrow_mut().0.push((Arc::downgrade(&self.shared), index)));
        index
    }

    /// Makes the calling thread a scheduled participant (or re-attaches it
    /// after [`Sched::detach`]) and waits for the baton.
    pub fn attach(&self) {
        let me = self.me();
        let mut state = self.lock();
        state.threads[me].driver = true;
        if state.threads[me].status == Status::Detached {
            state.threads[me].status = Status::Runnable;
        }
        if state.current.is_none() {
            state.current = Some(me);
        }
        self.wait_turn(state, me);
    }

    /// The calling thread stops taking part (before it blocks outside the
    /// kernel, e.g. joining threads); it runs freely until re-attached.
    pub fn detach(&self) {
        let me = self.me();
        let mut state = self.lock();
        state.threads[me].status = Status::Detached;
        if state.current == Some(me) {
            self.pass(&mut state, me);
        }
    }

    /// Waits (in real time) until `n` threads have registered, so the
    /// schedule does not depend on how fast the OS starts threads.
    pub fn expect_threads(&self, n: usize) {
        let state = self.lock();
        let _unused = self
            .shared
            .cv
            .wait_while(state, |s| s.threads.len() < n && !s.free)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Makes sure the calling thread holds the baton (a new thread waits for
    /// its first turn); no switch otherwise.
    pub fn enter(&self) {
        let me = self.me();
        let state = self.lock();
        if state.free || state.threads[me].status == Status::Detached || state.current == Some(me) {
            return;
        }
        if state.threads[me].started {
            let mut state = state;
            Self::broken(&mut state, me, "ran without the baton");
            return;
        }
        drop(self.wait_turn_guard(state, me));
    }

    /// A scheduling point: maybe hand the baton to another thread.
    pub fn point(&self, what: &dyn std::fmt::Display) {
        let me = self.me();
        let mut state = self.lock();
        state.now += STEP_TIME;
        if state.free || state.threads[me].status == Status::Detached {
            return;
        }
        if state.current != Some(me) {
            if state.threads[me].started {
                Self::broken(
                    &mut state,
                    me,
                    "reached a scheduling point without the baton",
                );
                return;
            }
            // A thread that just registered does not hold the baton: waiting
            // for it is its scheduling point. (Passing the baton from here
            // would let two threads run at once.)
            drop(self.wait_turn_guard(state, me));
            return;
        }
        state.steps += 1;
        let step = state.steps;
        let line = format!("{step:>6} {}: {what}", state.threads[me].name);
        if state.trace.len() == TRACE_LINES {
            state.trace.pop_front();
        }
        state.trace.push_back(line);
        self.pass(&mut state, me);
        self.wait_turn(state, me);
    }

    /// The calling thread's index in this scheduler (registering it).
    pub fn current_thread(&self) -> usize {
        self.me()
    }

    /// Clears the calling thread's pending wake-up: call before registering
    /// as a waiter somewhere, then [`Sched::block`].
    pub fn prepare_block(&self) -> usize {
        let me = self.me();
        self.lock().threads[me].woken = false;
        me
    }

    /// Blocks until [`Sched::wake`] or until `deadline` on the virtual clock.
    pub fn block(&self, deadline: Option<Duration>) -> Wake {
        let me = self.me();
        let mut state = self.lock();
        if state.threads[me].woken {
            state.threads[me].woken = false;
            return Wake::Woken;
        }
        if state.free || state.threads[me].status == Status::Detached {
            if deadline.is_some() {
                // Free-running: deadlines expire at once, so nothing waits on
                // a clock that no longer moves.
                if let Some(d) = deadline {
                    state.now = state.now.max(d);
                }
                return Wake::TimedOut;
            }
            let mut state = self
                .shared
                .cv
                .wait_while(state, |s| !s.threads[me].woken)
                .unwrap_or_else(PoisonError::into_inner);
            state.threads[me].woken = false;
            return Wake::Woken;
        }
        if state.current != Some(me) {
            Self::broken(&mut state, me, "blocked without the baton");
        }
        state.threads[me].status = Status::Blocked { deadline };
        state.threads[me].timed_out = false;
        self.pass(&mut state, me);
        let mut state = self.wait_turn_guard(state, me);
        state.threads[me].woken = false;
        if std::mem::take(&mut state.threads[me].timed_out) {
            Wake::TimedOut
        } else {
            Wake::Woken
        }
    }

    /// Blocks the calling thread for `d` of virtual time (other threads run,
    /// and the clock moves once nothing else can).
    pub fn sleep(&self, d: Duration) {
        let deadline = self.now().saturating_add(d);
        loop {
            self.prepare_block();
            if self.block(Some(deadline)) == Wake::TimedOut || self.now() >= deadline {
                return;
            }
        }
    }

    /// Wakes thread `index` (blocked, or about to block).
    pub fn wake(&self, index: usize) {
        let mut state = self.lock();
        let thread = &mut state.threads[index];
        thread.woken = true;
        if matches!(thread.status, Status::Blocked { .. }) {
            thread.status = Status::Runnable;
        }
        self.shared.cv.notify_all();
    }

    /// The driver waits until every other thread is blocked with nothing to
    /// do; `Err` if that takes more than `budget` steps (a livelock, or work
    /// that never ends).
    pub fn wait_quiescent(&self, budget: u64) -> Result<(), String> {
        let me = self.me();
        let mut state = self.lock();
        if state.free {
            return Err(state
                .failure
                .clone()
                .unwrap_or_else(|| "scheduler is free-running".into()));
        }
        let until = state.steps + budget;
        state.threads[me].status = Status::Quiescing { budget: until };
        self.pass(&mut state, me);
        let mut state = self.wait_turn_guard(state, me);
        if std::mem::take(&mut state.threads[me].timed_out) {
            return Err(format!(
                "no quiescence within {budget} steps (livelock or lost wake-up)\n{}",
                Self::format_trace(&state)
            ));
        }
        match &state.failure {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// The virtual clock.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// Moves the virtual clock forward (the driver sleeping).
    pub fn advance(&self, by: Duration) {
        let mut state = self.lock();
        state.now += by;
    }

    /// Scheduling points so far.
    pub fn steps(&self) -> u64 {
        self.lock().steps
    }

    /// Why the schedule failed, if it did (every thread blocked forever).
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// The last scheduling points, one per line.
    pub fn trace(&self) -> String {
        Self::format_trace(&self.lock())
    }

    /// Abandons scheduling: every thread runs freely from now on.
    pub fn free_run(&self) {
        let mut state = self.lock();
        state.free = true;
        for thread in &mut state.threads {
            thread.woken = true;
        }
        self.shared.cv.notify_all();
    }

    /// The schedule's own invariant broke (two threads running): record it
    /// and let everyone run, so the failure is reported, not hung on.
    fn broken(state: &mut State, me: usize, what: &str) {
        let message = format!("scheduler: thread {} {what}", state.threads[me].name);
        state.failure.get_or_insert(message);
        state.free = true;
    }

    fn format_trace(state: &State) -> String {
        let mut out = String::new();
        for line in &state.trace {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    fn exit(&self, index: usize) {
        let mut state = self.lock();
        state.threads[index].status = Status::Exited;
        if state.current == Some(index) {
            self.pass(&mut state, index);
        }
        self.shared.cv.notify_all();
    }

    /// Chooses the next baton holder (possibly `me`).
    fn pass(&self, state: &mut State, me: usize) {
        // A quiescing driver past its budget gets the baton back (failure).
        let steps = state.steps;
        for thread in &mut state.threads {
            if let Status::Quiescing { budget } = thread.status {
                if steps >= budget {
                    thread.status = Status::Runnable;
                    thread.timed_out = true;
                }
            }
        }
        let mut runnable = Self::runnable(state);
        if runnable.is_empty() {
            // Nothing can run: quiescence, if the driver waits for it.
            if let Some(i) = state
                .threads
                .iter()
                .position(|t| matches!(t.status, Status::Quiescing { .. }))
            {
                state.threads[i].status = Status::Runnable;
                runnable.push(i);
            }
        }
        if runnable.is_empty() {
            // Then time passes, to the earliest deadline.
            let earliest = state
                .threads
                .iter()
                .filter_map(|t| match t.status {
                    Status::Blocked { deadline } => deadline,
                    _ => None,
                })
                .min();
            if let Some(deadline) = earliest {
                state.now = state.now.max(deadline);
                let now = state.now;
                for thread in &mut state.threads {
                    if let Status::Blocked { deadline: Some(d) } = thread.status {
                        if d <= now {
                            thread.status = Status::Runnable;
                            thread.timed_out = true;
                        }
                    }
                }
                runnable = Self::runnable(state);
            }
        }
        if runnable.is_empty() {
            let everyone_gone = state
                .threads
                .iter()
                .all(|t| matches!(t.status, Status::Exited | Status::Detached));
            if !everyone_gone {
                // Every thread is blocked with no deadline and no driver to
                // wake: a lost wake-up. Record it and let everyone run.
                state.failure = Some(format!(
                    "deadlock: every thread blocked forever\n{}",
                    Self::format_trace(state)
                ));
                state.free = true;
                for thread in &mut state.threads {
                    thread.woken = true;
                }
            }
            state.current = None;
        } else {
            let pick = runnable[state.rng.below(runnable.len() as u64) as usize];
            state.current = Some(pick);
        }
        let _ = me;
        self.shared.cv.notify_all();
    }

    /// Runnable threads, ordered by name: indices follow the real-time order
    /// in which threads first called in, names do not, and the seeded pick
    /// must not depend on the OS. The driver comes last, whatever its name:
    /// it is named after the test that runs it, and a failure must replay
    /// under another test's name. (Last, because the test names that found
    /// the committed seeds all sort after the workers' `eserver-N`.)
    fn runnable(state: &State) -> Vec<usize> {
        let mut runnable: Vec<usize> = state
            .threads
            .iter()
            .enumerate()
            .filter(|(_, t)| t.status == Status::Runnable)
            .map(|(i, _)| i)
            .collect();
        runnable.sort_by(|a, b| {
            let key = |i: &usize| (state.threads[*i].driver, &state.threads[*i].name);
            key(a).cmp(&key(b))
        });
        runnable
    }

    fn wait_turn(&self, state: MutexGuard<'_, State>, me: usize) {
        drop(self.wait_turn_guard(state, me));
    }

    fn wait_turn_guard<'a>(
        &'a self,
        state: MutexGuard<'a, State>,
        me: usize,
    ) -> MutexGuard<'a, State> {
        let mut state = self
            .shared
            .cv
            .wait_while(state, |s| {
                !s.free && s.current != Some(me) && s.threads[me].status != Status::Detached
            })
            .unwrap_or_else(PoisonError::into_inner);
        if state.current.is_none() && !state.free {
            state.current = Some(me);
        }
        if state.current == Some(me) {
            state.threads[me].started = true;
        }
        state
    }
}
