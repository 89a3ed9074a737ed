//! A worker thread: one of N threads in `epoll_wait` on the one epoll instance.
//!
//! ```text
//!   epoll_wait ──► for each event ──► OUT: write side (flush the queue)
//!       ▲                        ├──► IN/PRI/RDHUP/HUP/ERR: read side (turns)
//!       │                        ├──► listener: accept (64 a listener a turn)
//!       │                        └──► waker: (tasks follow)
//!       └──── tasks (requeued reads, resumes, closes, accept retries) ◄┘
//! ```
//!
//! Several workers may receive events for the same connection at once
//! (edge-triggered epoll does not prevent it); the ownership word decides
//! who acts and leaves a pending mark for the others. A worker blocks only in
//! `epoll_wait`, in standby while another worker polls
//! ([`crate::core::standby`]), or parked by `set_active_workers` (after
//! waking the standing workers; [`crate::core::parking`]), and waits with a
//! zero timeout while tasks are queued.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::Duration;

use super::conn::ReaderCell;
use super::linger::{Ended, LINGER_TOKEN};
use super::shared::{CONTROL_TOKEN, Shared, Task, WAKER_TOKEN};
use super::stats::Tally;
use super::timers::Timer;
use crate::core::slab::Slab;
use crate::core::slot::SlotCore;
use crate::core::standby::{self, Stood};
use crate::core::{CloseReason, ConnId};
use crate::handler::Handler;
use crate::server::ServerHandle;
use crate::sys::{Errno, Event, Readiness, Sys};

/// The worker's read buffer: frames are decoded in place from here.
const SCRATCH: usize = 64 << 10;

/// How often a draining worker looks at the clock and the open count.
pub(crate) const DRAIN_POLL: Duration = Duration::from_millis(10);

/// How soon a frame timer that came due while the connection's read side
/// was held (or its close was refused otherwise) looks again.
pub(crate) const FRAME_RELOOK: Duration = Duration::from_millis(100);

/// How long after the shutdown deadline forced closes may take before the
/// server stops regardless.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(1);

/// The grace a worker's panic gives the rest of the server's connections
/// before it stops (see `Ending`).
pub(crate) const PANIC_GRACE: Duration = Duration::from_secs(1);

thread_local! {
    /// On a worker thread, the address of its server's `Shared` (0
    /// elsewhere). A server's own worker may skip some wake-ups (it looks at
    /// the timers before its next wait) and must not wait for itself to
    /// park; a worker of another server in the same process is neither.
    static WORKER_OF: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether this thread is one of the workers of the server at `shared`.
pub(crate) fn is_worker_of<T>(shared: &T) -> bool {
    WORKER_OF.get() == std::ptr::from_ref(shared).addr()
}

/// Whether this thread is a worker of any server.
pub(crate) fn is_any_worker() -> bool {
    WORKER_OF.get() != 0
}

/// What a worker shares with the others (read-only).
pub(crate) struct Env<S: Sys, H: Handler> {
    pub shared: Arc<Shared<S>>,
    pub readers: Arc<Slab<ReaderCell<H::Conn>>>,
    pub handler: Arc<H>,
    pub handle: ServerHandle,
    /// This worker's number (workers at or past the active count park).
    pub index: usize,
}

/// What a worker owns: its buffers, its task list and its counters.
#[derive(Debug)]
pub(crate) struct Local {
    pub events: Vec<Event>,
    pub scratch: Vec<u8>,
    /// Replies of the current read turn, written at its end.
    pub out: Vec<u8>,
    /// Tasks this worker queued for itself (no wake-up needed).
    pub tasks: VecDeque<Task>,
    /// Tasks being run now (kept to reuse its allocation).
    running: VecDeque<Task>,
    /// Timers due now (kept to reuse its allocation).
    due: Vec<Timer>,
    pub tally: Tally,
    /// The last wait was busy (see `core::standby`), or this worker was
    /// just woken from standby: it polls rather than stand by.
    busy: bool,
}

/// One worker thread's state.
pub(crate) struct Worker<S: Sys, H: Handler> {
    env: Env<S, H>,
    local: Local,
}

impl<S: Sys, H: Handler> Worker<S, H> {
    pub(crate) fn new(env: Env<S, H>) -> Self {
        let events = vec![Event::default(); env.shared.events_per_wait];
        Self {
            env,
            local: Local {
                events,
                scratch: vec![0; SCRATCH],
                out: Vec::new(),
                tasks: VecDeque::new(),
                running: VecDeque::new(),
                due: Vec::new(),
                tally: Tally::default(),
                busy: true,
            },
        }
    }

    /// Serves until the server stops.
    pub(crate) fn run(mut self) {
        let Worker { env, local } = &mut self;
        WORKER_OF.set(std::ptr::from_ref(&*env.shared).addr());
        while !env.shared.is_stopped() {
            if env.shared.should_park(env.index) {
                env.park(local);
                continue;
            }
            if env.stand_by(local) {
                continue;
            }
            env.poll_once(local);
        }
        // What this worker counted since its last merge (the drain's last
        // step, run after the merge, cuts lingering sockets; another worker
        // may have stopped the server meanwhile): the final counts are read
        // once every worker has left.
        env.shared.counters.merge(&mut local.tally);
    }
}

/// A worker thread's body: serves until the server stops, then
/// [`Ending`] (which also covers a panic while the worker is set up).
pub(crate) fn serve<S: Sys, H: Handler>(env: Env<S, H>) {
    let shared = Arc::clone(&env.shared);
    let _ending = Ending(&shared);
    Worker::new(env).run();
}

/// What a worker does as it exits, whether it returned or panicked.
///
/// It passes the stop on: each worker wakes the next one.
///
/// A panic here is a bug in eserver (handler panics are caught where the
/// handler is called), and it stops the whole server, with
/// [`PANIC_GRACE`] for the other workers to flush their connections' replies
/// (a server of one worker has none left to, and stops at once); the
/// drain's give-up ends the stop if the dead worker's slot is never
/// released. The worker may have died
/// holding a connection's read or write side, which nothing else can
/// release, and with a worker short the rest serve on without anyone
/// noticing; a server that stops can be restarted by its supervisor
/// (the binary exits with status 1).
struct Ending<'a, S: Sys>(&'a Shared<S>);

impl<S: Sys> Drop for Ending<'_, S> {
    fn drop(&mut self) {
        let shared = self.0;
        if std::thread::panicking() {
            log::error!(
                "a worker panicked (a bug in eserver, not in a handler): stopping the server, {PANIC_GRACE:?} grace"
            );
            shared.counters.add(|tally| tally.worker_panics += 1);
            shared.begin_shutdown(PANIC_GRACE);
        }
        shared.wake();
        shared.standby.wake_all(&shared.futex());
        // Workers leave a server that runs only by panicking, so if the
        // last one out finds it not stopped, every worker died and no one
        // is left to drain it. Stop it now rather than at the join: its
        // listeners would take connections nobody accepts, and its
        // connections would stay open and silent. Every worker has exited,
        // which is what the teardown asks; it waits for the calls other
        // threads have announced, and wakes a section waiting for workers
        // to park.
        if shared.worker_exited() && !shared.is_stopped() {
            log::error!(
                "every worker has exited, the last with the server still running (each \
                 panicked): closing the listeners and every connection now"
            );
            shared.close_descriptors();
        }
    }
}

impl<S: Sys, H: Handler> Env<S, H> {
    /// One `epoll_wait` and everything it brought.
    pub(crate) fn poll_once(&self, local: &mut Local) {
        let shared = &*self.shared;
        let timeout = if !local.tasks.is_empty() || shared.has_tasks() {
            Some(Duration::ZERO)
        } else if shared.is_draining() {
            // Past the deadline too: what holds the drain then (a handler
            // still running, a slot not yet reclaimed) ends on its own
            // time, and a zero timeout would only spin until it does.
            Some(
                shared
                    .until_deadline()
                    .filter(|left| !left.is_zero())
                    .map_or(DRAIN_POLL, |left| left.min(DRAIN_POLL)),
            )
        } else {
            None
        };
        // No longer than the earliest timer.
        let timeout = match (timeout, shared.timers.next()) {
            (t, None) => t,
            (t, Some(at)) => {
                let left = at.saturating_sub(shared.sys.now());
                Some(t.map_or(left, |t| t.min(left)))
            }
        };
        let standby = &shared.standby;
        let polling = standby.enabled() && timeout != Some(Duration::ZERO);
        let started = polling.then(|| {
            standby.enter_poll();
            shared.sys.now()
        });
        let result = shared
            .sys
            .epoll_wait(shared.fds.epoll, &mut local.events, timeout);
        let waited = started.map(|at| {
            standby.leave_poll();
            shared.sys.now().saturating_sub(at)
        });
        let n = match result {
            Ok(n) => n,
            Err(errno) if errno == Errno::EINTR => 0,
            Err(errno) => {
                // Only a bug (a bad epoll descriptor) gets here; do not spin.
                log::error!("epoll_wait: {errno}");
                std::thread::sleep(DRAIN_POLL);
                0
            }
        };
        local.busy = standby.is_busy(waited, n);
        if local.busy && standby.wake_one(&shared.futex()) {
            local.tally.standby_wakes += 1;
        }
        for i in 0..n {
            let event = local.events[i];
            self.dispatch_event(local, event);
        }
        self.run_tasks(local);
        self.run_timers(local);
        shared.counters.merge(&mut local.tally);
        if shared.is_draining() {
            self.drain_step(local);
        }
    }

    /// Stands by (see `core::standby`) if this worker is idle and another
    /// polls; returns whether it slept.
    fn stand_by(&self, local: &mut Local) -> bool {
        let shared = &*self.shared;
        if !shared.standby.enabled() || local.busy || !local.tasks.is_empty() {
            return false;
        }
        // No longer than the earliest timer: the poller may have computed
        // its timeout before that timer was set. And no longer than
        // `RECHECK`: the poller may be out on a long turn.
        let now = shared.sys.now();
        let timeout = shared.timers.next().map_or(standby::RECHECK, |at| {
            at.saturating_sub(now).min(standby::RECHECK)
        });
        if timeout.is_zero() {
            return false; // a timer is due: run it rather than sleep for nothing
        }
        let deadline = now.saturating_add(timeout);
        let stood = shared.standby.stand_by(&shared.futex(), Some(timeout), || {
            let sleep = !shared.has_tasks()
                && !shared.is_draining()
                && !shared.is_stopped()
                && self.index < shared.active_workers();
            if sleep {
                // Counted now, not on waking: a worker may sleep for the
                // rest of a light load.
                shared.counters.add(|t| t.standbys += 1);
            }
            sleep
        });
        match stood {
            Stood::No => false,
            // Quiet only if the time ran out too: a wake-up whose bump of
            // the word came before this sleep read it (meant for a worker
            // standing by then) still wakes this one, with the word as it
            // read it, and it must poll as woken, not sleep on.
            Stood::Quiet if shared.sys.now() >= deadline => true,
            Stood::Woken | Stood::Quiet => {
                local.busy = true;
                true
            }
        }
    }

    fn dispatch_event(&self, local: &mut Local, event: Event) {
        let token = event.token();
        if token < CONTROL_TOKEN {
            let id = ConnId::from_u64(token);
            let readiness = event.readiness();
            // One event is stale once, though both sides may find it so.
            let stale_before = local.tally.stale_events;
            // Writing first frees kernel buffer space for this turn's replies.
            if readiness.contains(Readiness::OUT) {
                self.on_writable(local, id);
            }
            // An outbound connect completes with write-readiness alone, and
            // the read side must hear of it (to run `on_open`).
            let connected = readiness.contains(Readiness::OUT)
                && self.shared.slot(id).is_some_and(SlotCore::is_connecting);
            if readiness.is_read_side() || connected {
                self.on_readable(local, id, readiness.reads_to_end());
            }
            local.tally.stale_events = local.tally.stale_events.min(stale_before + 1);
        } else if token & LINGER_TOKEN == LINGER_TOKEN {
            self.on_linger(local, token & !LINGER_TOKEN);
        } else if token == WAKER_TOKEN {
            if let Err(errno) = self.shared.sys.eventfd_drain(self.shared.fds.waker) {
                log::error!("draining the waker eventfd: {errno}");
            }
            // One edge wakes one worker: while workers that should park have
            // not, pass the wake-up on so each of them sees the request.
            if self.shared.park_pending() {
                self.shared.wake();
            }
        } else {
            self.on_acceptable(local);
        }
    }

    fn on_writable(&self, local: &mut Local, id: ConnId) {
        let shared = &*self.shared;
        let Some(slot) = shared.slot(id) else {
            local.tally.stale_events += 1;
            return;
        };
        let mut sink = shared.sink(id, slot);
        match slot.writable(id.generation(), shared.limits, &mut sink) {
            None => local.tally.stale_events += 1,
            Some(report) => {
                local.tally.bytes_out += report.written as u64;
                local.tally.epollout_arms += u64::from(report.arms);
                shared.schedule_send_timer(id, &report);
                if report.resume || report.close_requested {
                    local.tasks.push_back(Task::Read(id));
                }
                if let Some(reclaimer) = report.reclaim {
                    shared.reclaim(id.slot(), slot, reclaimer, false);
                }
            }
        }
    }

    fn run_tasks(&self, local: &mut Local) {
        std::mem::swap(&mut local.tasks, &mut local.running);
        self.shared.take_tasks(&mut local.running);
        while let Some(task) = local.running.pop_front() {
            match task {
                Task::Read(id) => self.on_readable(local, id, false),
                Task::Accept => self.on_acceptable(local),
                Task::Drain => self.begin_drain(local),
            }
        }
    }

    /// Parks this worker until it may run again (or the server stops). Its
    /// own queued tasks go to the shared queue first, so nothing waits on a
    /// parked worker; and another worker is woken for anything queued there,
    /// including tasks this worker's turns deferred without a wake (a
    /// reclaim's accept retry), which it would have run itself had it not
    /// parked.
    fn park(&self, local: &mut Local) {
        let shared = &*self.shared;
        for task in local.tasks.drain(..) {
            shared.defer(task, false);
        }
        if shared.has_tasks() {
            shared.wake();
        }
        shared.counters.merge(&mut local.tally);
        // This worker leaves `epoll_wait` without coming back to poll or
        // stand by: a worker that stood by on seeing it poll must not sleep
        // on (see `core::standby`, "a worker that leaves").
        shared.standby.wake_all(&shared.futex());
        shared.park_until_active(self.index);
    }

    fn run_timers(&self, local: &mut Local) {
        let shared = &*self.shared;
        if shared.timers.next().is_none_or(|at| at > shared.sys.now()) {
            return;
        }
        let mut due = std::mem::take(&mut local.due);
        shared.timers.take_due(shared.sys.now(), &mut due);
        for timer in due.drain(..) {
            match timer {
                Timer::AcceptRetry(listener) => {
                    if let Some(listener) = shared.fds.listeners.get(listener) {
                        listener.backoff.fired();
                    }
                    self.on_acceptable(local);
                }
                Timer::Idle(id) => self.idle_timer(local, id),
                Timer::Frame(id) => self.frame_timer(local, id),
                Timer::Send(id, mark) => self.send_timer(local, id, mark),
                Timer::Linger => {
                    let (cut, next) = (shared.lingering).expire_due(
                        &shared.sys,
                        shared.sys.now(),
                        &mut local.scratch,
                    );
                    local.tally.lingers_cut += cut as u64;
                    if let Some(at) = next {
                        shared.schedule_timer(at, Timer::Linger);
                    }
                }
            }
        }
        local.due = due;
    }

    /// An idle timer fired: close the connection if nothing moved for the
    /// whole timeout, else look again when it could be due.
    fn idle_timer(&self, local: &mut Local, id: ConnId) {
        let shared = &*self.shared;
        let (Some(slot), Some(idle)) = (shared.slot(id), shared.idle_timeout) else {
            return;
        };
        if slot.state().open_generation() != Some(id.generation()) {
            return; // closed: the timer is cancelled
        }
        // A turn under way may have read bytes and not yet marked them (the
        // mark is left at its end, before the read side is released), and
        // a write under way may have written some and not yet marked them
        // (the mark follows the syscall, before the write side is
        // released): the mark is read only with both sides free, and the
        // close is asked for only if they still are, in the request's own
        // atomic step (a turn begun between the look and a plain request
        // read fresh bytes, then closed as idle). (A close requested here
        // used to follow bytes that had just arrived; the simulation's
        // idle check, which the kernel's record of reads feeds, found it.
        // Its twin for writes: the test
        // `a_connection_written_just_before_its_idle_deadline_is_not_closed_as_idle`.)
        if !slot.state().is_side_held() {
            let due = Duration::from_millis(slot.last_active()).saturating_add(idle);
            if shared.sys.now() < due {
                shared.schedule_timer(due, Timer::Idle(id));
                return;
            }
            if slot.request_idle_close(id.generation()) {
                log::info!("{id}: no bytes either way for {idle:?}: closing");
                local.tasks.push_back(Task::Read(id));
                return;
            }
        }
        // A side is held, or was taken since the look (or the close is
        // already asked for, or a close after flush has written everything:
        // then this timer finds it closed and stops): not idle now. Look
        // again a timeout from now.
        if slot.state().open_generation() == Some(id.generation()) {
            shared.schedule_timer(shared.sys.now().saturating_add(idle), Timer::Idle(id));
        }
    }

    /// A send timer fired: close the connection if its output waited for
    /// the whole timeout with the kernel taking none of it (no byte settled
    /// since `mark`); look again in a timeout if the kernel took some; stop
    /// if nothing waits.
    fn send_timer(&self, local: &mut Local, id: ConnId, mark: u64) {
        let shared = &*self.shared;
        let (Some(slot), Some(timeout)) = (shared.slot(id), shared.send_timeout) else {
            return;
        };
        if slot.state().open_generation() != Some(id.generation()) {
            return; // closed: the timer is cancelled (a reset cleared its flag)
        }
        // Disarm, then look (see `SlotCore::arm_send_timer`); the bytes
        // waiting and those taken in one snapshot, under the queue's lock.
        slot.disarm_send_timer(id.generation());
        let (waiting, taken) = {
            let queue = slot.queue();
            (queue.bytes(), queue.taken())
        };
        if waiting == 0 {
            return; // nothing waits: the next wait arms a new timer
        }
        if taken != mark {
            if slot.arm_send_timer(id.generation()) {
                let at = shared.sys.now().saturating_add(timeout);
                shared.schedule_timer(at, Timer::Send(id, taken));
            }
        } else if slot.request_close(id.generation(), CloseReason::SendTimeout) {
            // The queue cannot empty without bytes taken: the output
            // waited the whole timeout.
            log::info!("{id}: output waited {timeout:?} with the peer reading none of it: closing");
            local.tasks.push_back(Task::Read(id));
        }
    }

    /// A frame timer fired: close the connection if it has held an
    /// incomplete frame, completing none, for the whole timeout.
    fn frame_timer(&self, local: &mut Local, id: ConnId) {
        let shared = &*self.shared;
        let (Some(slot), Some(timeout)) = (shared.slot(id), shared.frame_timeout) else {
            return;
        };
        if slot.state().open_generation() != Some(id.generation()) {
            return;
        }
        // Disarm, then look (see `SlotCore::set_frame_since`).
        slot.disarm_frame_timer(id.generation());
        let Some(since) = slot.frame_since() else {
            return; // no incomplete frame any more
        };
        let due = Duration::from_millis(since).saturating_add(timeout);
        {
            let queue = slot.queue();
            if queue.holds_reader() {
                // The server stopped reading (flow control, or a close once
                // flushed): the stall is ours, not the peer's. Stop the
                // clock; the reader's first turn after it resumes starts it
                // again (a close once flushed never reads again). Under the
                // queue's lock, which a resume takes: a resume cannot come
                // between the look and the stop, so that turn always finds
                // the clock stopped. And only the clock we looked at: a
                // reader that restarted it since (the turn that paused,
                // ending) armed a timer for it (this one was disarmed).
                slot.stop_frame_clock(since);
                return;
            }
        }
        // Looked at again before closing: a frame completed by the reader
        // since the first look restarted the clock (and armed a timer for
        // it), and the time read first is no longer the peer's to answer
        // for. (A review found the close could follow that completion.)
        if shared.sys.now() >= due && slot.frame_since() == Some(since) {
            // Not while a read turn is under way, in the request's own
            // step: it may be completing the frame (its end restarts the
            // clock), and a close asked for meanwhile would end that turn
            // abortively, its replies dropped. Refused, for whatever
            // reason, the timer looks again shortly while the connection is
            // open: a turn that ended since, completing nothing, arms no
            // timer of its own (the clock runs on), and without this look
            // the frame would never be timed out. (Refused because a close
            // is already asked for, the look finds the connection closed.)
            if slot.request_frame_close(id.generation()) {
                log::info!("{id}: a frame left incomplete for {timeout:?}: closing");
                local.tasks.push_back(Task::Read(id));
            } else if slot.state().open_generation() == Some(id.generation())
                && slot.arm_frame_timer(id.generation())
            {
                let again = shared.sys.now().saturating_add(FRAME_RELOOK);
                shared.schedule_timer(again, Timer::Frame(id));
            }
        } else if slot.arm_frame_timer(id.generation()) {
            shared.schedule_timer(due, Timer::Frame(id));
        }
    }

    /// An event for the lingering socket `key`.
    fn on_linger(&self, local: &mut Local, key: u64) {
        let shared = &*self.shared;
        match (shared.lingering).on_event(&shared.sys, key, &mut local.scratch) {
            Ended::Budget | Ended::Timeout => local.tally.lingers_cut += 1,
            Ended::Unknown => local.tally.stale_events += 1,
            Ended::Lingering | Ended::Peer | Ended::Acknowledged => {}
        }
    }

    /// Graceful shutdown, first step: stop accepting, and give every open
    /// connection a last read turn (which ends in a close once its replies
    /// are flushed).
    fn begin_drain(&self, local: &mut Local) {
        self.on_acceptable(local);
        // Pairs with `start_connect`'s fence: a dial that opens after the
        // list below sees the phase, and takes its last turn itself.
        fence(Ordering::SeqCst);
        let open = self.shared.open_connections();
        log::info!("shutting down: draining {} connection(s)", open.len());
        local.tasks.extend(open.into_iter().map(Task::Read));
    }

    /// Graceful shutdown, every batch: stop when the last connection is
    /// gone; past the deadline, close what is left.
    fn drain_step(&self, local: &mut Local) {
        let shared = &*self.shared;
        // The pool closes in one step with its last look: a connect from
        // another thread either took a slot before it (then the drain waits
        // for that connection) or gets none.
        // Closed connections whose sockets linger are waited for too, until
        // the deadline: their last replies may still be in the send buffers.
        // Those whose replies the peer has acknowledged are let go.
        let (_, cut) = shared.lingering.release_acknowledged(
            &shared.sys,
            shared.sys.now(),
            DRAIN_POLL,
            &mut local.scratch,
        );
        local.tally.lingers_cut += cut as u64;
        if local.tasks.is_empty()
            && !shared.has_tasks()
            && shared.pool.close_if_idle()
            && shared.lingering.len() == 0
        {
            shared.mark_stopped();
            return;
        }
        let (passed, first) = shared.deadline_passed();
        if passed && !shared.past_give_up() {
            // Every step, not once: a connection can open after a sweep
            // (a dial from another thread that took its slot meanwhile),
            // and only a forced close ends one that waits for nothing.
            let open = shared.open_connections();
            if first {
                log::warn!(
                    "shutdown deadline passed: closing {} connection(s) with unflushed output and {} socket(s) lingering for their peers' FIN",
                    open.len(),
                    shared.lingering.len()
                );
            }
            for id in open {
                if let Some(slot) = shared.slot(id) {
                    if slot.request_close(id.generation(), crate::core::CloseReason::Shutdown) {
                        local.tasks.push_back(Task::Read(id));
                    }
                }
            }
            local.tally.lingers_cut += shared.lingering.close_all(&shared.sys, false) as u64;
        } else if shared.past_give_up() {
            // Forced closes could not finish (a slot whose side is held: by
            // a send from another thread that has not returned, which the
            // teardown then waits for, or never released, which only a bug
            // can cause): stop anyway, so a shutdown always ends.
            log::error!(
                "shutdown: {} slot(s) could not be reclaimed {GIVE_UP:?} after the deadline; stopping anyway",
                shared.pool.in_use()
            );
            shared.pool.close();
            shared.mark_stopped();
        }
    }
}
