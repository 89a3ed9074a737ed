//! Loom models of the concurrency core, on the production source.
//!
//! This test crate compiles `src/core/*.rs` (every file but `slab.rs`, which
//! is std-only storage) a second time, with `#[path]`, against the loom-backed
//! `sync` module below: the same code the server runs, with loom's atomics,
//! mutexes and `UnsafeCell` (which reports any two accesses to a side's data
//! that the ownership word does not order). The core's own unit tests come
//! along and run as single-threaded loom models too.
//!
//! The models, each exhaustive up to a preemption bound (2 here, so plain
//! `cargo test` stays fast; `ci/loom.sh` runs them at 3):
//!
//! - `read_ownership`: events on three threads; one reader at a time, and the
//!   last read sees every arrival (no lost edge).
//! - `write_ownership_and_epollout`: two senders (one through a handle, one
//!   the connection's reader replying send-first) and an EPOLLOUT event, over
//!   a socket that takes 4 bytes then blocks; one writer at a time, messages
//!   whole and in per-sender order, none lost, EPOLLOUT armed exactly while
//!   output is pending.
//! - `a_dial_keeps_epollout_until_its_connect_is_seen`: an outbound
//!   connection, a handle sending to it and a worker taking the connect's
//!   completion edge (which exists only while EPOLLOUT is armed); the edge
//!   is never lost, EPOLLOUT is armed exactly while output is pending, and
//!   sends that returned before `on_open` ran precede its reply.
//! - `a_paused_reader_is_always_resumed`: the reader's reply pushes its
//!   output over `max_out` (it pauses) while a sender adds to the queue and
//!   an EPOLLOUT edge drains it; a paused reader is always resumed, once.
//! - `close_after_flush_waits_for_a_send_first_remainder`: a close after
//!   flush from a handle while the reader's reply is half written, or not
//!   yet written; the connection closes only once the whole reply is on the
//!   wire, and then it does.
//! - `close_after_flush_with_output_queued_never_tears_a_reply`: the same
//!   with the handle's own message queued first, so that a writer settles
//!   the last queued byte while the reader still holds its reply; both
//!   messages arrive, whole (the linger completes only once a read turn
//!   has counted it).
//! - `close_after_flush_waits_for_the_turn_under_way_despite_an_epollout_pass`:
//!   the handle's message in flight, an EPOLLOUT pass writing its rest while
//!   the reader still holds its reply; both arrive, whole.
//! - `waiting_output_always_has_a_send_timer`: a send timer fires while an
//!   EPOLLOUT pass drains the output and a new send blocks behind it; output
//!   left waiting always has a timer scheduled, and the timer never closes
//!   the connection once the drain is done.
//! - `close_races_reader_writer_and_sender`: a close, a reader, and a sender
//!   that becomes the writer; the slot is reclaimed exactly once, after both
//!   sides are released; `on_close` runs once; the send reaches that
//!   connection or nobody.
//! - `pool_generations_and_stale_handles`: concurrent close/checkin, checkout
//!   and a stale sender; the stale send never reaches the new occupant, FIFO
//!   holds, no slot is handed out twice.
//! - `releasing_a_free_number_races_a_checkout`: the acceptor, out of
//!   descriptors, releases the oldest free slot's pinned number while a
//!   connect checks that slot out; the connect never `dup2`s onto a number
//!   the acceptor closes.
//! - `standby_liveness_and_stop_*`: two workers running the standby protocol
//!   over a model epoll and futex while events arrive, under two busy
//!   policies; no event waits while every worker sleeps, and a stop wakes
//!   every sleeper (a violation is a loom deadlock).
//! - `concurrent_senders_never_pass_the_output_budget`: two senders to two
//!   connections near the server-wide output budget; at most one is
//!   accepted, and the budget is never passed.
//! - `standby_liveness_when_a_worker_parks`: the same workers while one is
//!   told to park (`set_active_workers`) between two events; the other never
//!   sleeps with nobody polling, and the one told parks instead of standing
//!   by (a violation is a deadlock, or a worker passing the waker's kick on
//!   forever, which loom reports as a model that never ends).
// Models assert by unwrapping: a failure is the model failing.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, missing_docs)]

/// The loom side of `src/sync.rs`, with the same names.
mod sync {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::atomic::{
        AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
    };
    pub(crate) use loom::sync::{Mutex, MutexGuard};

    pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The core's unit tests run as (single-threaded) loom models here.
    pub(crate) fn model(body: impl Fn() + Sync + Send + 'static) {
        loom::model(body);
    }
}

/// The production core, file by file.
#[path = "../src/core"]
mod core {
    #[path = "backoff.rs"]
    pub mod backoff;
    #[path = "cell.rs"]
    pub mod cell;
    #[path = "futex.rs"]
    pub mod futex;
    #[path = "id.rs"]
    pub mod id;
    #[path = "outq.rs"]
    pub mod outq;
    #[path = "parking.rs"]
    pub mod parking;
    #[path = "pool.rs"]
    pub mod pool;
    #[path = "reason.rs"]
    pub mod reason;
    #[path = "slot.rs"]
    pub mod slot;
    #[path = "standby.rs"]
    pub mod standby;
    #[path = "state.rs"]
    pub mod state;
    #[path = "writer.rs"]
    pub mod writer;

    pub use id::ConnId;
    pub use reason::CloseReason;
}

use std::io::IoSlice;

use loom::sync::{Arc, Mutex};
use loom::thread;

use crate::core::cell::{OwnerCell, ReadSide};
use crate::core::futex::Futex;
use crate::core::outq::{Chunk, Refusal};
use crate::core::parking::Parking;
use crate::core::pool::{Checkout, Pool};
use crate::core::slot::{Limits, SlotCore, WriteReport};
use crate::core::standby::{Standby, Stood};
use crate::core::state::{Begin, EndRead, ReadOwner, Release};
use crate::core::writer::{Sink, SinkError};
use crate::core::{CloseReason, ConnId};
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Runs `body` under loom with the preemption bound from
/// `ESERVER_LOOM_PREEMPTIONS` (default 2).
fn check(body: impl Fn() + Sync + Send + 'static) {
    let bound = std::env::var("ESERVER_LOOM_PREEMPTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(bound);
    builder.check(body);
}

// ---------------------------------------------------------------- the kernel

/// A simulated kernel for one slot's descriptor number: which connection's
/// socket is installed on it (or the placeholder), and what each socket got.
#[derive(Debug, Default)]
struct Kernel {
    /// The generation whose socket the number refers to; `None`: placeholder.
    installed: Option<u32>,
    /// Bytes each connection's peer received, by generation.
    wires: Vec<(u32, Vec<u8>)>,
    /// Bytes the socket buffer still takes before a write would block.
    room: usize,
    /// Write-readiness interest, by generation.
    armed: Vec<(u32, bool)>,
}

impl Kernel {
    fn wire(&self, generation: u32) -> &[u8] {
        self.wires
            .iter()
            .find(|(g, _)| *g == generation)
            .map_or(&[], |(_, w)| w)
    }

    fn is_armed(&self, generation: u32) -> bool {
        self.armed.iter().any(|(g, a)| *g == generation && *a)
    }

    /// A write to whatever socket is installed on the number now.
    fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
        let Some(generation) = self.installed else {
            return Err(SinkError::Failed(32)); // EPIPE: the placeholder
        };
        if self.room == 0 {
            return Err(SinkError::WouldBlock);
        }
        let mut taken = Vec::new();
        for buf in bufs {
            let n = buf.len().min(self.room - taken.len());
            taken.extend_from_slice(&buf[..n]);
        }
        self.room -= taken.len();
        let n = taken.len();
        match self.wires.iter_mut().find(|(g, _)| *g == generation) {
            Some((_, wire)) => wire.extend(taken),
            None => self.wires.push((generation, taken)),
        }
        Ok(n)
    }

    /// Arms or disarms write interest of the installed socket.
    fn set_armed(&mut self, armed: bool) -> Result<(), SinkError> {
        let Some(generation) = self.installed else {
            return Err(SinkError::Failed(2)); // ENOENT: not registered any more
        };
        self.armed.retain(|(g, _)| *g != generation);
        self.armed.push((generation, armed));
        Ok(())
    }
}

/// A writer's view of the kernel: writes go to whatever socket is installed
/// on the number now (exactly the hazard invariant C is about).
struct KernelSink {
    kernel: Arc<Mutex<Kernel>>,
}

impl Sink for KernelSink {
    fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
        self.kernel.lock().unwrap().write(bufs)
    }

    fn set_write_interest(&mut self, armed: bool) -> Result<(), SinkError> {
        self.kernel.lock().unwrap().set_armed(armed)
    }
}

fn sink(kernel: &Arc<Mutex<Kernel>>) -> KernelSink {
    KernelSink {
        kernel: Arc::clone(kernel),
    }
}

const LIMITS: Limits = Limits {
    max_out: 1 << 20,
    low_water: 1 << 19,
    watch_sends: false,
};

/// A slot opened for a new connection over a socket that takes `room`
/// bytes before a write would block: the slot, the kernel, the generation.
fn opened_with_room(room: usize) -> (Arc<SlotCore>, Arc<Mutex<Kernel>>, u32) {
    let slot = Arc::new(SlotCore::new());
    let kernel = Arc::new(Mutex::new(Kernel {
        room,
        ..Kernel::default()
    }));
    let generation = open(&slot, &kernel);
    (slot, kernel, generation)
}

/// A slot opened for a new connection, with its socket installed.
fn open(slot: &SlotCore, kernel: &Mutex<Kernel>) -> u32 {
    let budget = std::sync::Arc::new(crate::core::outq::Budget::new(usize::MAX));
    let (generation, owner) = slot.open(budget).expect("a free slot opens");
    kernel.lock().unwrap().installed = Some(generation);
    assert!(matches!(slot.state().end_read(owner), EndRead::Released));
    generation
}

// ---------------------------------------------------------------- L

/// An audit finding: a send from elsewhere checked the server-wide output
/// budget, then added to it, each under its own queue's lock, so senders to
/// two connections could both pass the check and together overshoot the
/// budget (which the docs say refuses such sends). Two queues share a
/// budget of 10 bytes with 8 queued; two senders push 2 bytes each, one to
/// each queue: exactly one is accepted, and the budget is never passed.
#[test]
fn concurrent_senders_never_pass_the_output_budget() {
    check(|| {
        use crate::core::outq::{Budget, OutQueue};
        let budget = std::sync::Arc::new(Budget::new(10));
        let queues: Vec<Arc<Mutex<OutQueue>>> = (0..2)
            .map(|_| {
                let mut queue = OutQueue::new();
                queue.open(0, std::sync::Arc::clone(&budget));
                Arc::new(Mutex::new(queue))
            })
            .collect();
        queues[0]
            .lock()
            .unwrap()
            .push_reply(Chunk::Owned(vec![0; 8]));
        let senders: Vec<_> = queues
            .iter()
            .map(|queue| {
                let queue = queue.clone();
                thread::spawn(move || {
                    queue
                        .lock()
                        .unwrap()
                        .push(0, Chunk::Owned(vec![1; 2]), 1 << 20)
                        .is_ok()
                })
            })
            .collect();
        let accepted = senders
            .into_iter()
            .map(|s| s.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert!(budget.queued() <= 10, "{} bytes queued", budget.queued());
        assert_eq!(accepted, 1);
    });
}

// ---------------------------------------------------------------- R

#[test]
fn read_ownership() {
    check(|| {
        let slot = Arc::new(SlotCore::new());
        let kernel = Arc::new(Mutex::new(Kernel::default()));
        let generation = open(&slot, &kernel);
        // The reader's buffer: loom reports two unordered accesses.
        let buffer: Arc<OwnerCell<Vec<u64>, ReadSide>> = Arc::new(OwnerCell::new(Vec::new()));
        // Bytes that arrived in the socket. Relaxed on purpose: what a
        // reader knows of arrivals must come through the ownership word (the
        // event that leaves a pending mark knew of its arrival; the reader
        // that consumes the mark must read after it).
        let arrived = Arc::new(AtomicU64::new(0));

        let event = |slot: Arc<SlotCore>,
                     buffer: Arc<OwnerCell<Vec<u64>, ReadSide>>,
                     arrived: Arc<AtomicU64>| {
            move || {
                // Data arrives, and its edge is delivered to this thread.
                arrived.fetch_add(1, Ordering::Relaxed);
                let Begin::Acquired(mut owner, _) = slot.state().begin_read(generation, false)
                else {
                    return;
                };
                loop {
                    // A read: sees everything that arrived before it started.
                    buffer.with(&owner, |reads| reads.push(arrived.load(Ordering::Relaxed)));
                    match slot.state().end_read(owner) {
                        EndRead::Released => return,
                        EndRead::Again(next, _) => owner = next,
                        EndRead::Close(_) => unreachable!("nobody requested a close"),
                    }
                }
            }
        };
        let threads: Vec<_> = (0..3)
            .map(|_| thread::spawn(event(slot.clone(), buffer.clone(), arrived.clone())))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Quiescent: take the side once more to look at the reads.
        let Begin::Acquired(owner, _) = slot.state().begin_read(generation, false) else {
            panic!("read side still held after every event was handled");
        };
        let last = buffer.with(&owner, |reads| reads.iter().copied().max());
        assert_eq!(
            last,
            Some(3),
            "an edge was lost: the last read missed an arrival"
        );
        assert!(matches!(slot.state().end_read(owner), EndRead::Released));
    });
}

// ---------------------------------------------------------------- W and S

fn settle(report: WriteReport<'_>) {
    assert!(report.reclaim.is_none(), "nothing closes in this model");
}

#[test]
fn write_ownership_and_epollout() {
    check(|| {
        let (slot, kernel, generation) = opened_with_room(4);

        let sender = |messages: &'static [&'static [u8]]| {
            let slot = slot.clone();
            let kernel = kernel.clone();
            thread::spawn(move || {
                for m in messages {
                    let report = slot
                        .send(
                            generation,
                            Chunk::Owned(m.to_vec()),
                            LIMITS,
                            &mut sink(&kernel),
                        )
                        .expect("open connection, under the limit");
                    settle(report);
                }
            })
        };
        let a = sender(&[b"a1.", b"a2."]);
        // The connection's own reader, replying at the end of its turn
        // (the send-first path: `try_begin_write`, then a direct write).
        let b = {
            let slot = slot.clone();
            let kernel = kernel.clone();
            thread::spawn(move || {
                let Begin::Acquired(owner, _) = slot.state().begin_read(generation, false) else {
                    panic!("the only reader");
                };
                let mut replies = b"b1.".to_vec();
                let (report, paused) =
                    slot.reply(&owner, generation, &mut replies, LIMITS, &mut sink(&kernel));
                settle(report);
                assert!(!paused && replies.is_empty());
                assert!(matches!(slot.state().end_read(owner), EndRead::Released));
            })
        };
        let epollout = {
            let slot = slot.clone();
            let kernel = kernel.clone();
            // An EPOLLOUT event (possibly spurious: epoll allows it).
            thread::spawn(move || {
                if let Some(report) = slot.writable(generation, LIMITS, &mut sink(&kernel)) {
                    settle(report);
                }
            })
        };
        a.join().unwrap();
        b.join().unwrap();
        epollout.join().unwrap();

        // S, at quiescence: EPOLLOUT is armed exactly while output is pending
        // (armed with nothing pending wastes wakeups; pending and not armed
        // would never be written).
        let pending = slot.queue().bytes();
        assert_eq!(
            kernel.lock().unwrap().is_armed(generation),
            pending > 0,
            "EPOLLOUT armed state does not match {pending} pending bytes"
        );
        // The peer reads: room, and the EPOLLOUT edge that comes with it.
        if kernel.lock().unwrap().is_armed(generation) {
            kernel.lock().unwrap().room = usize::MAX / 2;
            let report = slot
                .writable(generation, LIMITS, &mut sink(&kernel))
                .expect("live");
            settle(report);
        }
        assert_eq!(
            slot.queue().bytes(),
            0,
            "output left after the peer made room"
        );
        assert!(
            !kernel.lock().unwrap().is_armed(generation),
            "EPOLLOUT still armed with nothing pending"
        );
        // W: whole messages, each sender's in order, none lost.
        let k = kernel.lock().unwrap();
        let wire = std::str::from_utf8(k.wire(generation)).unwrap();
        let messages: Vec<&str> = wire.split_terminator('.').collect();
        let mut sorted = messages.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            ["a1", "a2", "b1"],
            "lost or torn messages: {wire:?}"
        );
        let a1 = messages.iter().position(|m| *m == "a1");
        let a2 = messages.iter().position(|m| *m == "a2");
        assert!(a1 < a2, "a sender's messages out of order: {wire:?}");
    });
}

/// Flow control (`OutQueue::pause_if_over`, `OutQueue::settle`): a reader
/// that stops reading because its output is over `max_out` is always
/// resumed. The reader's turn replies and decides to pause while the
/// writer, on an EPOLLOUT edge, drains the queue; a sender from elsewhere
/// adds to it meanwhile. No edge comes for bytes that arrived while the
/// reader was paused, so a pause that no writer ever sees (decided after
/// the drain that should have resumed it) leaves the connection stuck.
/// Both decisions are made under the queue's lock: at quiescence, a
/// paused reader has been resumed, or output is still pending with
/// EPOLLOUT armed, and the writable edge that comes when the peer reads
/// resumes it.
#[test]
fn a_paused_reader_is_always_resumed() {
    const SMALL: Limits = Limits {
        max_out: 4,
        low_water: 2,
        watch_sends: false,
    };
    // Executions in which the reader paused (a plain atomic, outside the
    // model): with none, `resumes == paused` is 0 == 0 and the model
    // checks nothing.
    let pauses = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&pauses);
    check(move || {
        let (slot, kernel, generation) = opened_with_room(2);
        let resumed = Arc::new(AtomicU64::new(0));
        let reader = {
            let slot = slot.clone();
            let kernel = kernel.clone();
            thread::spawn(move || {
                let Begin::Acquired(owner, _) = slot.state().begin_read(generation, false) else {
                    panic!("the only reader");
                };
                let mut replies = b"r1.r2.".to_vec();
                let (report, paused) =
                    slot.reply(&owner, generation, &mut replies, SMALL, &mut sink(&kernel));
                assert!(!report.resume, "a reply resumed its own reader");
                settle(report);
                assert!(matches!(slot.state().end_read(owner), EndRead::Released));
                paused
            })
        };
        let sender = {
            let slot = slot.clone();
            let kernel = kernel.clone();
            let resumed = resumed.clone();
            thread::spawn(move || {
                // Refused when full: only its effect on the queue matters.
                if let Ok(report) = slot.send(
                    generation,
                    Chunk::Owned(b"s.".to_vec()),
                    SMALL,
                    &mut sink(&kernel),
                ) {
                    resumed.fetch_add(u64::from(report.resume), Ordering::Relaxed);
                    settle(report);
                }
            })
        };
        let epollout = {
            let slot = slot.clone();
            let kernel = kernel.clone();
            let resumed = resumed.clone();
            thread::spawn(move || {
                // The peer reads some: room, and the edge that comes with it.
                kernel.lock().unwrap().room += 3;
                if let Some(report) = slot.writable(generation, SMALL, &mut sink(&kernel)) {
                    resumed.fetch_add(u64::from(report.resume), Ordering::Relaxed);
                    settle(report);
                }
            })
        };
        let paused = reader.join().unwrap();
        sender.join().unwrap();
        epollout.join().unwrap();
        // Quiescent: the edges the peer's reads bring, while output waits.
        while kernel.lock().unwrap().is_armed(generation) {
            kernel.lock().unwrap().room += 64;
            let report = slot
                .writable(generation, SMALL, &mut sink(&kernel))
                .expect("live");
            resumed.fetch_add(u64::from(report.resume), Ordering::Relaxed);
            settle(report);
        }
        let resumes = resumed.load(Ordering::Relaxed);
        assert_eq!(slot.queue().bytes(), 0, "output left behind");
        assert!(
            !slot.queue().holds_reader(),
            "the reader is still held (paused: {paused}, resumes: {resumes})"
        );
        // A resume is a read turn scheduled: one per pause, none without.
        assert_eq!(
            resumes,
            u64::from(paused),
            "paused: {paused}, resumes: {resumes}"
        );
        if paused {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    assert!(
        pauses.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no execution paused the reader"
    );
}

/// The send timer's protocol (`SlotCore::arm_send_timer`): output waiting
/// on a full kernel buffer always has a timer scheduled, and a timer never
/// closes a connection whose output the kernel took some of since it was
/// armed. The timer that fires can find the queue drained just as a new
/// send blocks behind it and arms (its own arm then fails: the flag is
/// up); disarming before looking is what makes one of the two schedule the
/// next timer, and the mark travelling with the timer (not kept in the
/// slot, where that new arm would overwrite it) is what keeps the drain's
/// progress in view.
#[test]
fn waiting_output_always_has_a_send_timer() {
    check(|| {
        let limits = Limits {
            watch_sends: true,
            ..LIMITS
        };
        let (slot, kernel, generation) = opened_with_room(0);
        // Timers scheduled and not yet fired.
        let timers = Arc::new(AtomicU32::new(0));
        let report = slot
            .send(
                generation,
                Chunk::Owned(b"a.".to_vec()),
                limits,
                &mut sink(&kernel),
            )
            .expect("open connection, under the limit");
        let mark = report.send_timer.expect("output waits: a timer is armed");
        timers.fetch_add(1, Ordering::SeqCst);
        // Set once the EPOLLOUT pass below has written and settled `a.`.
        let drained = Arc::new(AtomicBool::new(false));

        // The peer reads; the EPOLLOUT pass drains `a.`, and then another
        // message meets the full buffer again.
        let writer = {
            let (slot, kernel, timers, drained) = (
                slot.clone(),
                kernel.clone(),
                timers.clone(),
                drained.clone(),
            );
            thread::spawn(move || {
                kernel.lock().unwrap().room = 2;
                if let Some(report) = slot.writable(generation, limits, &mut sink(&kernel)) {
                    assert!(report.send_timer.is_none(), "nothing waits after this pass");
                }
                drained.store(true, Ordering::SeqCst);
                let report = slot
                    .send(
                        generation,
                        Chunk::Owned(b"b.".to_vec()),
                        limits,
                        &mut sink(&kernel),
                    )
                    .expect("open connection, under the limit");
                if report.send_timer.is_some() {
                    timers.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // The first timer fires meanwhile (as `Env::send_timer` does).
        let fired = {
            let (slot, timers, drained) = (slot.clone(), timers.clone(), drained.clone());
            thread::spawn(move || {
                let drained_before = drained.load(Ordering::SeqCst);
                slot.disarm_send_timer(generation);
                let (waiting, taken) = {
                    let queue = slot.queue();
                    (queue.bytes() > 0, queue.taken())
                };
                let progressed = taken != mark;
                if waiting && progressed && slot.arm_send_timer(generation) {
                    timers.fetch_add(1, Ordering::SeqCst);
                }
                timers.fetch_sub(1, Ordering::SeqCst);
                // Closed for a send timeout: nothing taken since the mark.
                let closed = waiting && !progressed;
                assert!(
                    !(closed && drained_before),
                    "closed for a send timeout after the kernel took `a.`"
                );
                closed
            })
        };
        writer.join().unwrap();
        let closed = fired.join().unwrap();
        if !closed {
            assert_eq!(slot.queue().bytes(), 2, "`b.` waits");
            assert!(
                timers.load(Ordering::SeqCst) >= 1,
                "output waits with no send timer scheduled"
            );
        }
    });
}

/// The connection's reader, in one turn replying `reply` send-first; true
/// if its `end_read` closed the connection (`at_close` checked the wire).
fn replying_reader(
    slot: &Arc<SlotCore>,
    kernel: &Arc<Mutex<Kernel>>,
    generation: u32,
    reply: &'static [u8],
    at_close: impl Fn(&Mutex<Kernel>) + Send + 'static,
) -> thread::JoinHandle<bool> {
    let (slot, kernel) = (slot.clone(), kernel.clone());
    thread::spawn(move || {
        let Begin::Acquired(owner, _) = slot.state().begin_read(generation, false) else {
            panic!("the only reader");
        };
        let mut replies = reply.to_vec();
        let (report, _) = slot.reply(&owner, generation, &mut replies, LIMITS, &mut sink(&kernel));
        assert!(report.reclaim.is_none());
        match slot.state().end_read(owner) {
            EndRead::Close(_) => {
                at_close(&kernel);
                true
            }
            _ => false,
        }
    })
}

/// A handle's thread: sends `sent` (if any), then closes after flush;
/// returns whether nothing was left to write then.
fn closing_handle(
    slot: &Arc<SlotCore>,
    kernel: &Arc<Mutex<Kernel>>,
    generation: u32,
    sent: Option<&'static [u8]>,
) -> thread::JoinHandle<bool> {
    let (slot, kernel) = (slot.clone(), kernel.clone());
    thread::spawn(move || {
        if let Some(sent) = sent {
            let report = slot
                .send(
                    generation,
                    Chunk::Owned(sent.to_vec()),
                    LIMITS,
                    &mut sink(&kernel),
                )
                .expect("open, under the limit");
            assert!(report.reclaim.is_none());
        }
        slot.close_after_flush(generation, CloseReason::Requested)
            .expect("open")
    })
}

/// Read turns, and the EPOLLOUT edge of a peer that reads, until a turn
/// closes the connection (`at_close` checks the wire then): as the server
/// does, a turn closes if a close was requested or a linger is drained.
fn until_closed(
    slot: &SlotCore,
    kernel: &Arc<Mutex<Kernel>>,
    generation: u32,
    at_close: impl Fn(&Mutex<Kernel>),
) {
    for _ in 0..3 {
        let Begin::Acquired(owner, flags) = slot.state().begin_read(generation, false) else {
            panic!("nobody else reads");
        };
        if flags.close_requested() || slot.queue().reader_turn().1 {
            at_close(kernel);
            return;
        }
        assert!(matches!(slot.state().end_read(owner), EndRead::Released));
        if kernel.lock().unwrap().is_armed(generation) {
            kernel.lock().unwrap().room = usize::MAX / 2;
            let report = slot
                .writable(generation, LIMITS, &mut sink(kernel))
                .expect("live");
            assert!(report.reclaim.is_none());
        }
    }
    panic!("the close never came");
}

/// A close-after-flush from another thread (a handle) while the reader's
/// reply goes out send-first, half of it taken by the kernel: the close must
/// not be decided while part of the reply is still to be written (the closer
/// would drop the rest and the peer would get a torn frame), nor drop the
/// reply of a turn already under way (a handler closing its own connection
/// through the handle after replying), and it must come once the rest is
/// written. Closes are decided where the server decides them: by the
/// reader's `end_read` (a close requested by the writer), at the start of a
/// read turn (the one the handle schedules when nothing is left to write),
/// and by the writer that settles the last byte.
#[test]
fn close_after_flush_waits_for_a_send_first_remainder() {
    reply_racing_a_close_after_flush(None, |wire| {
        assert_eq!(wire, b"reply-1.", "closed with the reply unwritten or torn");
    });
}

/// The same, with output already queued by the handle before its close
/// after flush: the writer that settles that output must not complete the
/// linger while the reader's turn still holds its reply (a review finding:
/// it did, and the reply was dropped). Both messages arrive, whole.
#[test]
fn close_after_flush_with_output_queued_never_tears_a_reply() {
    reply_racing_a_close_after_flush(Some(b"h."), |wire| {
        let wire = std::str::from_utf8(wire).unwrap();
        let mut messages: Vec<&str> = wire.split_terminator('.').collect();
        messages.sort_unstable();
        assert!(
            wire.ends_with('.') && messages == ["h", "reply-1"],
            "closed with {wire:?}"
        );
    });
}

/// A review finding: the handle's message is still in flight when it
/// closes after flush, and an EPOLLOUT pass (the peer read) writes the rest
/// while the reader's turn still holds its reply. That pass completed the
/// linger, and the reply was dropped: the linger may complete only once a
/// read turn has counted it. Both messages arrive, whole.
#[test]
fn close_after_flush_waits_for_the_turn_under_way_despite_an_epollout_pass() {
    check(|| {
        let (slot, kernel, generation) = opened_with_room(1);
        let check_wire = move |kernel: &Mutex<Kernel>| {
            let k = kernel.lock().unwrap();
            let wire = std::str::from_utf8(k.wire(generation)).unwrap();
            let mut messages: Vec<&str> = wire.split_terminator('.').collect();
            messages.sort_unstable();
            assert!(
                wire.ends_with('.') && messages == ["h", "reply-1"],
                "closed with {wire:?}"
            );
        };
        let handle = closing_handle(&slot, &kernel, generation, Some(b"h."));
        let epollout = {
            let (slot, kernel) = (slot.clone(), kernel.clone());
            thread::spawn(move || {
                kernel.lock().unwrap().room = usize::MAX / 2;
                let report = slot
                    .writable(generation, LIMITS, &mut sink(&kernel))
                    .expect("live");
                assert!(report.reclaim.is_none());
            })
        };
        let closed = replying_reader(&slot, &kernel, generation, b"reply-1.", check_wire)
            .join()
            .unwrap();
        handle.join().unwrap();
        epollout.join().unwrap();
        if !closed {
            until_closed(&slot, &kernel, generation, check_wire);
        }
    });
}

/// The reader replies `reply-1.` send-first over a socket that takes 4
/// bytes, while a handle (after sending `sent`, if any) closes after flush;
/// `at_close` checks the wire wherever the connection closes.
fn reply_racing_a_close_after_flush(sent: Option<&'static [u8]>, at_close: fn(&[u8])) {
    check(move || {
        let (slot, kernel, generation) = opened_with_room(4);
        let check_wire =
            move |kernel: &Mutex<Kernel>| at_close(kernel.lock().unwrap().wire(generation));
        let reader = replying_reader(&slot, &kernel, generation, b"reply-1.", check_wire);
        let handle = closing_handle(&slot, &kernel, generation, sent);
        let closed = reader.join().unwrap();
        handle.join().unwrap();
        if !closed {
            until_closed(&slot, &kernel, generation, check_wire);
        }
    });
}

// ---------------------------------------------------------------- S: dials

/// A kernel for one outbound connection (`ServerHandle::connect`), with the
/// part of epoll the connect depends on: its completion is an EPOLLOUT
/// edge, which exists only while write interest is armed, and which a
/// disarm (`EPOLL_CTL_MOD` without EPOLLOUT) drops from the ready list.
#[derive(Debug, Default)]
struct DialKernel {
    /// The wire and the socket buffer, as in the other models.
    kernel: Kernel,
    /// The handshake is done: writes take bytes, and arming reports ready.
    connected: bool,
    /// An EPOLLOUT edge waits in the ready list.
    edge: bool,
}

/// The server's sink for a dial (`server/shared.rs` `SysSink`): no disarm
/// while the slot is connecting (`may_disarm`).
struct DialSink {
    kernel: Arc<Mutex<DialKernel>>,
    slot: Arc<SlotCore>,
}

impl Sink for DialSink {
    fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
        let mut k = self.kernel.lock().unwrap();
        if !k.connected {
            return Err(SinkError::WouldBlock); // SYN_SENT: EAGAIN
        }
        k.kernel.write(bufs)
    }

    fn set_write_interest(&mut self, armed: bool) -> Result<(), SinkError> {
        let mut k = self.kernel.lock().unwrap();
        k.kernel.set_armed(armed)?;
        // MOD re-checks readiness: arming a writable socket queues an edge;
        // disarming drops a queued one.
        k.edge = armed && k.connected && k.kernel.room > 0;
        Ok(())
    }

    fn may_disarm(&self) -> bool {
        !self.slot.is_connecting()
    }
}

/// What the worker's `on_open` saw: whether each of the sender's two
/// sends had returned before it replied.
#[derive(Debug, Default)]
struct Opened {
    ran: AtomicU32,
    sends_before: AtomicU32,
}

/// One EPOLLOUT event for the dial, handled as `server/worker.rs`
/// dispatches it: the write side flushes, and while the slot is
/// connecting the read side runs the connect turn (`server/conn.rs`):
/// `connect_done`, a writer pass, then `on_open`'s reply.
/// Where the modelled dial goes.
const DIALLED: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7);

fn dial_event(
    slot: &Arc<SlotCore>,
    kernel: &Arc<Mutex<DialKernel>>,
    generation: u32,
    sent: &AtomicU32,
    opened: &Opened,
    on_open_reply: &[u8],
) {
    let mut sink = DialSink {
        kernel: Arc::clone(kernel),
        slot: Arc::clone(slot),
    };
    if let Some(report) = slot.writable(generation, LIMITS, &mut sink) {
        settle(report);
    }
    if !slot.is_connecting() {
        return;
    }
    let Begin::Acquired(mut owner, _) = slot.state().begin_read(generation, false) else {
        return; // the holder sees the pending mark and runs the turn
    };
    loop {
        if slot.is_connecting() {
            slot.connect_done(&owner);
            if let Some(report) = slot.writable(generation, LIMITS, &mut sink) {
                settle(report);
            }
            // on_open, told the address the dialler wrote on its thread;
            // its reply at the end of the turn.
            assert_eq!(slot.take_unopened(&owner), Some(DIALLED));
            opened
                .sends_before
                .store(sent.load(Ordering::SeqCst), Ordering::SeqCst);
            opened.ran.fetch_add(1, Ordering::SeqCst);
            let mut replies = on_open_reply.to_vec();
            let (report, paused) = slot.reply(&owner, generation, &mut replies, LIMITS, &mut sink);
            settle(report);
            assert!(!paused && replies.is_empty());
        }
        match slot.state().end_read(owner) {
            EndRead::Released => return,
            EndRead::Again(next, _) => owner = next,
            EndRead::Close(_) => unreachable!("nobody requested a close"),
        }
    }
}

#[test]
fn a_dial_keeps_epollout_until_its_connect_is_seen() {
    dial_model(b"o1.");
}

/// The same with an `on_open` that sends nothing (an audit's point): the
/// reply's trip through the out-queue is a second happens-before edge
/// from the connect turn to the sender's writer, which could hide a
/// weakened ordering on the write side's pending mark, which carries the
/// connect's completion (`connect_done`) to it. (Neither model fails with
/// that mark's orderings weakened, at bound 2 or 3: the turn still takes
/// the out-queue's lock to decide whether to pause.)
#[test]
fn a_dial_keeps_epollout_until_its_connect_is_seen_when_on_open_sends_nothing() {
    dial_model(b"");
}

/// A dial, a sender's two messages from another thread while the connect
/// completes, and `on_open` replying `on_open_reply` (`o1.` or nothing).
fn dial_model(on_open_reply: &'static [u8]) {
    check(move || {
        let slot = Arc::new(SlotCore::new());
        let kernel = Arc::new(Mutex::new(DialKernel::default()));
        let budget = std::sync::Arc::new(crate::core::outq::Budget::new(usize::MAX));
        let (generation, owner) = slot
            .open_outbound(budget, DIALLED)
            .expect("a free slot opens");
        {
            // Registered with EPOLLOUT for the connect's completion.
            let mut k = kernel.lock().unwrap();
            k.kernel.installed = Some(generation);
            k.kernel.armed.push((generation, true));
        }
        assert!(matches!(slot.state().end_read(owner), EndRead::Released));
        // How many of the sender's sends have returned.
        let sent = Arc::new(AtomicU32::new(0));
        let opened = Arc::new(Opened::default());

        // A handle sends twice, from another thread, while the connect
        // completes or after.
        let sender = {
            let (slot, kernel, sent) = (slot.clone(), kernel.clone(), sent.clone());
            thread::spawn(move || {
                for m in [&b"h1."[..], b"h2."] {
                    let mut sink = DialSink {
                        kernel: Arc::clone(&kernel),
                        slot: Arc::clone(&slot),
                    };
                    let report = slot
                        .send(generation, Chunk::Owned(m.to_vec()), LIMITS, &mut sink)
                        .expect("open connection, under the limit");
                    settle(report);
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // The kernel completes the handshake (an edge only if armed); a
        // worker takes whatever edge is queued when it polls.
        let worker = {
            let (slot, kernel, sent, opened) =
                (slot.clone(), kernel.clone(), sent.clone(), opened.clone());
            thread::spawn(move || {
                {
                    let mut k = kernel.lock().unwrap();
                    k.connected = true;
                    k.kernel.room = 4;
                    k.edge = k.kernel.is_armed(generation);
                }
                if std::mem::take(&mut kernel.lock().unwrap().edge) {
                    dial_event(&slot, &kernel, generation, &sent, &opened, on_open_reply);
                }
            })
        };
        sender.join().unwrap();
        worker.join().unwrap();
        // Edges queued after the worker polled: a later poll takes them.
        while std::mem::take(&mut kernel.lock().unwrap().edge) {
            dial_event(&slot, &kernel, generation, &sent, &opened, on_open_reply);
        }

        assert_eq!(
            opened.ran.load(Ordering::SeqCst),
            1,
            "the connect's completion edge was lost (or on_open ran twice)"
        );
        // S, at quiescence.
        let pending = slot.queue().bytes();
        assert_eq!(
            kernel.lock().unwrap().kernel.is_armed(generation),
            pending > 0,
            "EPOLLOUT armed state does not match {pending} pending bytes"
        );
        // The peer reads everything.
        if kernel.lock().unwrap().kernel.is_armed(generation) {
            kernel.lock().unwrap().kernel.room = usize::MAX / 2;
            dial_event(&slot, &kernel, generation, &sent, &opened, on_open_reply);
        }
        let k = kernel.lock().unwrap();
        assert!(
            slot.queue().bytes() == 0 && !k.kernel.is_armed(generation),
            "output left, or EPOLLOUT armed with nothing pending"
        );
        // W, and the documented order: sends that returned before on_open
        // ran come before its reply.
        let wire = std::str::from_utf8(k.kernel.wire(generation)).unwrap();
        let messages: Vec<&str> = wire.split_terminator('.').collect();
        let mut sorted = messages.clone();
        sorted.sort_unstable();
        let expected: &[&str] = if on_open_reply.is_empty() {
            &["h1", "h2"]
        } else {
            &["h1", "h2", "o1"]
        };
        assert_eq!(sorted, expected, "lost or torn messages: {wire:?}");
        let at = |m: &str| messages.iter().position(|x| *x == m);
        assert!(
            at("h1") < at("h2"),
            "a sender's messages out of order: {wire:?}"
        );
        let before = opened.sends_before.load(Ordering::SeqCst);
        for (n, m) in [(1, "h1"), (2, "h2")] {
            assert!(
                before < n || on_open_reply.is_empty() || at(m) < at("o1"),
                "{m} returned before on_open ran but went after its reply: {wire:?}"
            );
        }
    });
}

// ---------------------------------------------------------------- C: close

/// What the model's server records about connections' ends; with a pool,
/// reclaiming checks the slot in (as `server/shared.rs` does) and records
/// the order, under this one lock.
#[derive(Default)]
struct Ends {
    on_close: usize,
    reclaims: usize,
    pool: Option<Arc<Pool>>,
    checkins: Vec<u32>,
}

/// The read-side close, as `server/conn.rs` performs it: close the queue and
/// mark the word, cover the number with the placeholder, run `on_close`,
/// release the read side (and reclaim if the writer is gone).
fn close<'s>(
    index: u32,
    slot: &'s SlotCore,
    kernel: &Mutex<Kernel>,
    reader_data: &OwnerCell<Vec<u8>, ReadSide>,
    owner: ReadOwner<'s>,
    ends: &Mutex<Ends>,
) {
    slot.begin_close(&owner);
    kernel.lock().unwrap().installed = None;
    reader_data.with(&owner, |data| data.clear());
    ends.lock().unwrap().on_close += 1;
    if let Release::Reclaim(reclaimer) = slot.finish_close(owner) {
        reclaim(index, slot, reader_data, reclaimer, ends);
    }
}

fn reclaim(
    index: u32,
    slot: &SlotCore,
    reader_data: &OwnerCell<Vec<u8>, ReadSide>,
    reclaimer: crate::core::state::Reclaimer<'_>,
    ends: &Mutex<Ends>,
) {
    // Both sides' data, with nobody else touching either (loom checks).
    slot.reset(&reclaimer);
    reader_data.with(&reclaimer, |data| data.push(b'R'));
    assert_eq!(slot.state().open_generation(), None, "reclaimed while open");
    let mut ends = ends.lock().unwrap();
    ends.reclaims += 1;
    if let Some(pool) = ends.pool.clone() {
        pool.checkin(index);
        ends.checkins.push(index);
    }
}

/// Acts on a sender's report: it may have released the last side.
fn settle_send(
    index: u32,
    slot: &SlotCore,
    reader_data: &OwnerCell<Vec<u8>, ReadSide>,
    mut report: WriteReport<'_>,
    ends: &Mutex<Ends>,
) {
    if let Some(reclaimer) = report.reclaim.take() {
        reclaim(index, slot, reader_data, reclaimer, ends);
    }
}

/// Holds the read side (for an event or a close request) until released,
/// closing if asked to.
fn read_side(
    index: u32,
    slot: &SlotCore,
    kernel: &Mutex<Kernel>,
    reader_data: &OwnerCell<Vec<u8>, ReadSide>,
    generation: u32,
    ends: &Mutex<Ends>,
) {
    let Begin::Acquired(mut owner, mut flags) = slot.state().begin_read(generation, false) else {
        return;
    };
    loop {
        if flags.close_requested() {
            close(index, slot, kernel, reader_data, owner, ends);
            return;
        }
        reader_data.with(&owner, |data| data.push(b'r'));
        match slot.state().end_read(owner) {
            EndRead::Released => return,
            EndRead::Again(next, next_flags) => {
                owner = next;
                flags = next_flags;
            }
            EndRead::Close(next) => {
                close(index, slot, kernel, reader_data, next, ends);
                return;
            }
        }
    }
}

#[test]
fn close_races_reader_writer_and_sender() {
    check(|| {
        let slot = Arc::new(SlotCore::new());
        let kernel = Arc::new(Mutex::new(Kernel {
            room: 2,
            ..Kernel::default()
        }));
        let reader_data = Arc::new(OwnerCell::<Vec<u8>, ReadSide>::new(Vec::new()));
        let ends = Arc::new(Mutex::new(Ends::default()));
        let generation = open(&slot, &kernel);

        let closer = {
            let (slot, kernel, reader_data, ends) = (
                slot.clone(),
                kernel.clone(),
                reader_data.clone(),
                ends.clone(),
            );
            thread::spawn(move || {
                // A close request from another thread, then its wake-up.
                if slot.request_close(generation, CloseReason::Requested) {
                    read_side(0, &slot, &kernel, &reader_data, generation, &ends);
                }
            })
        };
        let reader = {
            let (slot, kernel, reader_data, ends) = (
                slot.clone(),
                kernel.clone(),
                reader_data.clone(),
                ends.clone(),
            );
            thread::spawn(move || read_side(0, &slot, &kernel, &reader_data, generation, &ends))
        };
        let sender = {
            let (slot, kernel, reader_data, ends) = (
                slot.clone(),
                kernel.clone(),
                reader_data.clone(),
                ends.clone(),
            );
            thread::spawn(move || {
                // The sender becomes the writer when the side is free.
                match slot.send(
                    generation,
                    Chunk::Owned(b"msg".to_vec()),
                    LIMITS,
                    &mut sink(&kernel),
                ) {
                    Ok(report) => {
                        settle_send(0, &slot, &reader_data, report, &ends);
                        true
                    }
                    Err(Refusal::Closed) => false,
                    Err(other) => panic!("unexpected refusal {other:?}"),
                }
            })
        };
        closer.join().unwrap();
        reader.join().unwrap();
        let accepted = sender.join().unwrap();

        let ends = ends.lock().unwrap();
        assert_eq!(ends.on_close, 1, "on_close must run exactly once");
        assert_eq!(ends.reclaims, 1, "the slot must be reclaimed exactly once");
        assert_eq!(slot.state().open_generation(), None);
        // The send went to this connection's socket or nowhere: a refused
        // send left no byte anywhere.
        let k = kernel.lock().unwrap();
        for (g, wire) in &k.wires {
            assert_eq!(*g, generation, "bytes reached another connection");
            assert!(accepted || wire.is_empty(), "a refused send was written");
            assert!(b"msg".starts_with(wire), "torn or foreign bytes: {wire:?}");
        }
    });
}

// ---------------------------------------------------------------- C: pool

#[test]
fn pool_generations_and_stale_handles() {
    check(|| {
        let pool = Arc::new(Pool::new(2));
        let slots: Arc<[SlotCore; 2]> = Arc::new([SlotCore::new(), SlotCore::new()]);
        // One kernel per descriptor number (one per slot).
        let kernels: Arc<[Arc<Mutex<Kernel>>; 2]> = Arc::new([
            Arc::new(Mutex::new(Kernel {
                room: usize::MAX / 2,
                ..Kernel::default()
            })),
            Arc::new(Mutex::new(Kernel {
                room: usize::MAX / 2,
                ..Kernel::default()
            })),
        ]);
        let readers: Arc<[OwnerCell<Vec<u8>, ReadSide>; 2]> =
            Arc::new([OwnerCell::new(Vec::new()), OwnerCell::new(Vec::new())]);
        let ends = Arc::new(Mutex::new(Ends {
            pool: Some(pool.clone()),
            ..Ends::default()
        }));
        let mut ids = Vec::new();
        for expected in 0..2u32 {
            assert_eq!(pool.checkout(), Some(Checkout::Fresh(expected)));
            let generation = open(&slots[expected as usize], &kernels[expected as usize]);
            ids.push(ConnId::new(expected, generation));
        }

        let closers: Vec<_> = ids
            .iter()
            .map(|id| {
                let (slots, kernels, readers, ends, id) = (
                    slots.clone(),
                    kernels.clone(),
                    readers.clone(),
                    ends.clone(),
                    *id,
                );
                thread::spawn(move || {
                    let i = id.slot() as usize;
                    assert!(slots[i].request_close(id.generation(), CloseReason::Requested));
                    let Begin::Acquired(owner, _) =
                        slots[i].state().begin_read(id.generation(), false)
                    else {
                        panic!("nobody else reads");
                    };
                    close(id.slot(), &slots[i], &kernels[i], &readers[i], owner, &ends);
                })
            })
            .collect();
        // A new client takes whatever slot is free, if any, and is sent to.
        let newcomer = {
            let (pool, slots, kernels) = (pool.clone(), slots.clone(), kernels.clone());
            thread::spawn(move || {
                let checkout = pool.checkout()?;
                let i = checkout.index() as usize;
                let generation = open(&slots[i], &kernels[i]);
                let report = slots[i]
                    .send(
                        generation,
                        Chunk::Owned(b"new".to_vec()),
                        LIMITS,
                        &mut sink(&kernels[i]),
                    )
                    .expect("fresh connection");
                settle(report);
                Some(ConnId::new(checkout.index(), generation))
            })
        };
        // A thread still holding the first connection's handle sends to it.
        let stale = {
            let (slots, kernels, readers, ends, id) = (
                slots.clone(),
                kernels.clone(),
                readers.clone(),
                ends.clone(),
                ids[0],
            );
            thread::spawn(move || {
                if let Ok(report) = slots[0].send(
                    id.generation(),
                    Chunk::Owned(b"old".to_vec()),
                    LIMITS,
                    &mut sink(&kernels[0]),
                ) {
                    settle_send(0, &slots[0], &readers[0], report, &ends);
                }
            })
        };
        for c in closers {
            c.join().unwrap();
        }
        let newcomer = newcomer.join().unwrap();
        stale.join().unwrap();

        // No slot was handed out twice: each open() above found its slot
        // free (it asserts), and the rest come out in checkin order.
        let order = ends.lock().unwrap().checkins.clone();
        let mut handed: Vec<u32> = newcomer.iter().map(|id| id.slot()).collect();
        while let Some(c) = pool.checkout() {
            handed.push(c.index());
        }
        assert_eq!(handed, order, "slots not reused oldest-freed first");
        // C: the stale handle's bytes never reached the new occupant.
        if let Some(new) = newcomer {
            assert_eq!(
                new.generation(),
                ids[new.slot() as usize].generation() + 1,
                "generation not bumped"
            );
            let k = kernels[new.slot() as usize].lock().unwrap();
            assert_eq!(
                k.wire(new.generation()),
                b"new",
                "another connection's bytes reached the newcomer"
            );
        }
        assert_eq!(ends.lock().unwrap().on_close, 2);
        assert_eq!(ends.lock().unwrap().reclaims, 2);
    });
}

/// Under EMFILE the acceptor gives the kernel back the pinned number of the
/// oldest free slot, while an outbound connect may be checking out that very
/// slot. The connect must either get the slot with its number still pinned
/// (and the acceptor release nothing of it), or get it unpinned (and adopt
/// its own socket's number): never `dup2` onto a number the acceptor closes,
/// which `accept` may hand to another peer meanwhile (invariant C).
#[test]
fn releasing_a_free_number_races_a_checkout() {
    const PINNED: i32 = 10;
    check(|| {
        let pool = Arc::new(Pool::new(1));
        let slots: Arc<[SlotCore; 1]> = Arc::new([SlotCore::new()]);
        // The slot served a connection once: it is free and keeps its number.
        assert_eq!(pool.checkout(), Some(Checkout::Fresh(0)));
        slots[0].pin_fd(PINNED);
        pool.checkin(0);

        let acceptor = {
            let (pool, slots) = (pool.clone(), slots.clone());
            thread::spawn(move || pool.with_oldest_free(|i| slots[i as usize].unpin()))
        };
        // The connect: a reused slot with a number gets its socket dup2'd
        // onto that number; one without adopts the socket's own.
        let checkout = pool.checkout();
        let onto = checkout.map(|c| slots[c.index() as usize].fd());
        let released = acceptor.join().unwrap();
        assert_eq!(checkout, Some(Checkout::Reused(0)), "the slot was free");
        match (onto, released) {
            (Some(PINNED), None) | (Some(-1), Some(PINNED)) => {}
            other => panic!("connect dup2s onto / acceptor closes: {other:?}"),
        }
    });
}

// ---------------------------------------------------------------- standby

/// A futex on loom's mutex and condition variable: the compare and the
/// sleep are one step under the mutex that `wake` takes too, as in the
/// kernel's hash bucket. Every bump of the word comes before a `wake`, so
/// either the waker's lock comes first (and the compare sees the bump) or
/// the sleeper is counted when `wake` looks.
#[derive(Default)]
struct ModelFutex {
    queue: Mutex<FutexQueue>,
    cv: loom::sync::Condvar,
}

#[derive(Default)]
struct FutexQueue {
    sleeping: usize,
    /// Wake-ups granted and not yet taken by a sleeper.
    granted: usize,
}

impl Futex for ModelFutex {
    type Error = std::convert::Infallible;

    fn wait(
        &self,
        word: &AtomicU32,
        expected: u32,
        _timeout: Option<std::time::Duration>,
    ) -> Result<(), Self::Error> {
        let mut q = self.queue.lock().unwrap();
        if word.load(Ordering::SeqCst) != expected {
            return Ok(());
        }
        q.sleeping += 1;
        loop {
            q = self.cv.wait(q).unwrap();
            if q.granted > 0 {
                q.granted -= 1;
                q.sleeping -= 1;
                return Ok(());
            }
        }
    }

    fn wake(&self, _word: &AtomicU32, n: u32) -> Result<usize, Self::Error> {
        let mut q = self.queue.lock().unwrap();
        let woken = (q.sleeping - q.granted).min(n as usize);
        q.granted += woken;
        if woken > 0 {
            self.cv.notify_all();
        }
        Ok(woken)
    }
}

/// One shared epoll instance, reduced to what standby depends on: a wait
/// blocks until an event is ready (or the server stops) and takes every
/// ready event; it reports whether it had to block. A *kick* is the waker
/// eventfd's event: it wakes one poller and is not a connection's event.
#[derive(Default)]
struct ModelEpoll {
    ready: Mutex<Ready>,
    cv: loom::sync::Condvar,
}

#[derive(Default)]
struct Ready {
    events: usize,
    kicked: bool,
    stopped: bool,
}

/// What one wait took.
struct Took {
    events: usize,
    kick: bool,
    blocked: bool,
}

impl ModelEpoll {
    fn wait(&self) -> Took {
        let mut ready = self.ready.lock().unwrap();
        let mut blocked = false;
        while ready.events == 0 && !ready.kicked && !ready.stopped {
            blocked = true;
            ready = self.cv.wait(ready).unwrap();
        }
        Took {
            events: std::mem::take(&mut ready.events),
            kick: std::mem::take(&mut ready.kicked),
            blocked,
        }
    }

    fn post(&self) {
        self.ready.lock().unwrap().events += 1;
        self.cv.notify_one();
    }

    /// A write to the waker eventfd (edge-triggered: one wakes one poller).
    fn kick(&self) {
        self.ready.lock().unwrap().kicked = true;
        self.cv.notify_one();
    }

    fn stop(&self) {
        self.ready.lock().unwrap().stopped = true;
        self.cv.notify_all();
    }
}

/// Counted across all the executions loom explores (plain atomics, outside
/// the model): sleeps taken, sleepers woken by `wake_one`, and workers
/// parked, so a model that stopped exercising any of them fails instead of
/// passing vacuously.
#[derive(Default)]
struct Explored {
    sleeps: std::sync::atomic::AtomicUsize,
    wakes: std::sync::atomic::AtomicUsize,
    parks: std::sync::atomic::AtomicUsize,
}

impl Explored {
    fn count(counter: &std::sync::atomic::AtomicUsize) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What the workers of the model share.
struct ModelServer {
    standby: Standby,
    futex: ModelFutex,
    epoll: ModelEpoll,
    stopped: AtomicBool,
    /// Which workers run (the production `core::parking`), with a futex of
    /// its own (the model futex does not tell words apart).
    parking: Parking,
    park_futex: ModelFutex,
    /// Events taken by some worker, and a condition variable for the test.
    handled: Mutex<usize>,
    handled_cv: loom::sync::Condvar,
}

/// Workers in the models.
const MODEL_WORKERS: usize = 2;

impl ModelServer {
    fn new(busy_below: std::time::Duration) -> Self {
        Self {
            standby: Standby::new(Some(busy_below)),
            futex: ModelFutex::default(),
            epoll: ModelEpoll::default(),
            stopped: AtomicBool::new(false),
            parking: Parking::new(MODEL_WORKERS),
            park_futex: ModelFutex::default(),
            handled: Mutex::new(0),
            handled_cv: loom::sync::Condvar::new(),
        }
    }

    /// As `Shared::set_active`: the new count, the parked workers told,
    /// every standing worker woken, and a poller kicked so that a worker
    /// that should park looks.
    fn set_active(&self, n: usize) {
        self.parking.set_active(n, &self.park_futex).unwrap();
        self.standby.wake_all(&self.futex);
        self.epoll.kick();
    }

    /// As `Shared::wait_parked`: until `n` workers are parked.
    fn wait_parked(&self, n: usize) {
        self.parking
            .wait_parked(n, &self.park_futex, || self.is_stopped())
            .unwrap();
    }

    /// As `Shared::park_pending`.
    fn park_pending(&self) -> bool {
        !self.is_stopped() && self.parking.pending()
    }

    /// As `Shared::mark_stopped`: the flag, the parked workers, the standing
    /// workers, then the pollers.
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.parking.changed(&self.park_futex).unwrap();
        self.standby.wake_all(&self.futex);
        self.epoll.stop();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Posts an event and waits until a worker has taken it (the `total`th).
    fn post_and_wait(&self, total: usize) {
        self.epoll.post();
        let mut handled = self.handled.lock().unwrap();
        while *handled < total {
            handled = self.handled_cv.wait(handled).unwrap();
        }
    }
}

/// Worker `index`, as `server::worker` runs one: park while not active,
/// stand by if the last wait was not busy (and another worker polls), else
/// poll; stop when told.
fn model_worker(server: &ModelServer, index: usize, explored: &Explored) {
    let standby = &server.standby;
    let mut busy = true;
    while !server.is_stopped() {
        if index >= server.parking.active() {
            // As `Env::park`: this worker leaves `epoll_wait` for good, so
            // a worker that stood by on seeing it poll must look again.
            standby.wake_all(&server.futex);
            Explored::count(&explored.parks);
            server
                .parking
                .park(index, &server.park_futex, || server.is_stopped())
                .unwrap();
            continue;
        }
        if !busy {
            // As `Env::stand_by`: poll after a wake-up, look again after a
            // quiet end (a spurious return here; a timeout in the server).
            match standby.stand_by(&server.futex, None, || {
                !server.is_stopped() && index < server.parking.active()
            }) {
                Stood::No => {}
                Stood::Woken => {
                    Explored::count(&explored.sleeps);
                    busy = true;
                    continue;
                }
                Stood::Quiet => {
                    Explored::count(&explored.sleeps);
                    continue;
                }
            }
        }
        standby.enter_poll();
        let took = server.epoll.wait();
        standby.leave_poll();
        // A wait that blocked took "long" (1 ms), one that found events
        // ready took no time. The kick is an event too.
        let waited = if took.blocked { 1_000 } else { 0 };
        let n = took.events + usize::from(took.kick);
        busy = standby.is_busy(Some(std::time::Duration::from_micros(waited)), n);
        if busy && standby.wake_one(&server.futex) {
            Explored::count(&explored.wakes);
        }
        // As the waker's handler: pass the kick on while some worker that
        // should park has not. This worker may take its own kick back until
        // that one runs; the yield tells loom so (it is a spin, which a fair
        // scheduler ends).
        if took.kick && server.park_pending() {
            server.epoll.kick();
            thread::yield_now();
        }
        if took.events > 0 {
            *server.handled.lock().unwrap() += took.events;
            server.handled_cv.notify_all();
        }
    }
    // Pass the stop on, as a worker does on its way out.
    standby.wake_all(&server.futex);
}

/// Runs `script` (the test's side) against two model workers, then stops
/// the server and joins them. Returns what the explorations exercised.
fn standby_model(
    busy_below: std::time::Duration,
    script: fn(&ModelServer),
) -> std::sync::Arc<Explored> {
    let explored = std::sync::Arc::new(Explored::default());
    let counted = std::sync::Arc::clone(&explored);
    check(move || {
        let server = Arc::new(ModelServer::new(busy_below));
        let workers: Vec<_> = (0..MODEL_WORKERS)
            .map(|index| {
                let server = Arc::clone(&server);
                let explored = std::sync::Arc::clone(&explored);
                thread::spawn(move || model_worker(&server, index, &explored))
            })
            .collect();
        script(&server);
        server.stop();
        for worker in workers {
            worker.join().unwrap();
        }
    });
    counted
}

/// Three events (one more than the workers: each may have stood by since)
/// posted while the workers come and go. Loom reports a deadlock if every
/// worker sleeps on the futex while an event waits (no poller left: "no
/// event waits for a sleeper"), or if a worker sleeps through the stop
/// (`wake_all` and `may` both missed).
fn three_events(server: &ModelServer) {
    for total in 1..=3 {
        server.post_and_wait(total);
    }
}

/// Busy when the wait found events ready: sleepers are woken by pollers.
#[test]
fn standby_liveness_and_stop_when_waits_that_did_not_block_are_busy() {
    let explored = standby_model(std::time::Duration::from_micros(1), three_events);
    let (sleeps, wakes) = (
        Explored::get(&explored.sleeps),
        Explored::get(&explored.wakes),
    );
    assert!(
        sleeps > 0 && wakes > 0,
        "vacuous: {sleeps} sleeps, {wakes} wake-ups"
    );
}

/// Never busy: every worker that can stand by does.
#[test]
fn standby_liveness_and_stop_when_no_wait_is_busy() {
    let explored = standby_model(std::time::Duration::ZERO, three_events);
    assert!(
        Explored::get(&explored.sleeps) > 0,
        "vacuous: no worker ever slept"
    );
}

/// One worker parks (`set_active_workers(1)`) while events arrive (the
/// stop then wakes it). The worker that parks leaves `epoll_wait` without coming back to
/// its own standby check, so without its `wake_all` the other one can sleep
/// on having seen it poll, and the next event waits forever (loom reports
/// the deadlock). The worker told to park must park (rather than stand by)
/// while the other serves. Never busy, so that every worker that can stand
/// by does.
#[test]
fn standby_liveness_when_a_worker_parks() {
    let explored = standby_model(std::time::Duration::ZERO, |server| {
        // First an event, so that a worker may be idle (not busy) when
        // told; then the count lowered while that one may be about to
        // stand by; then an event only the worker left running can take.
        server.post_and_wait(1);
        server.set_active(1);
        server.post_and_wait(2);
        server.wait_parked(1);
    });
    let (sleeps, parks) = (
        Explored::get(&explored.sleeps),
        Explored::get(&explored.parks),
    );
    assert!(
        sleeps > 0 && parks > 0,
        "vacuous: {sleeps} sleeps, {parks} parks"
    );
}

// ---------------------------------------------------------------- accept backoff

/// A listener's retry timer fires (on any worker) while an accept turn
/// that was already running sees the listener fail again, for a reason of
/// its own. Whatever the interleaving, after the turn the timer asked for,
/// a listener left resting has a retry coming: it is never passed over for
/// good. (A first version cleared `resting`, then `pending`, from the
/// timer's thread; a failure between the two stores rested the listener
/// and found the retry still claimed, so none was scheduled.)
#[test]
fn a_listener_failing_as_its_retry_fires_is_never_left_resting() {
    use crate::core::backoff::AcceptBackoff;
    check(|| {
        let backoff = Arc::new(AcceptBackoff::new());
        // Out of descriptors: a retry scheduled, the listener not resting.
        assert!(backoff.failed(false).is_some());
        let timer = {
            let backoff = Arc::clone(&backoff);
            thread::spawn(move || backoff.fired())
        };
        // The running turn.
        backoff.take_due();
        let mut scheduled = false;
        if !backoff.is_resting() {
            scheduled = backoff.failed(true).is_some();
        }
        timer.join().unwrap();
        // The turn the timer asked for.
        backoff.take_due();
        assert!(
            !backoff.is_resting() || scheduled,
            "resting, with no retry coming"
        );
    });
}
