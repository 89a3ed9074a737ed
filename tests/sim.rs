//! The production server on the simulated kernel: scenarios under seeded
//! schedules and injected faults, checked against every promise listed in
//! `eserver::scenario`. A failure prints the seed and the scenario, and the
//! same scenario replays exactly. Case count: `PROPTEST_CASES` (default 24
//! per property here; `ci/proptest-deep.sh` runs many more).
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use eserver::scenario::{DEFAULT_LINGER_MS, DialTarget, Op, SHUTDOWN_GRACE, Scenario, run};
use eserver::sys::fault::FaultConfig;
use eserver::{CloseReason, IdleWait, WriteInterest};
use proptest::prelude::*;

fn plain(seed: u64) -> Scenario {
    let mut s = Scenario::new(seed);
    s.ops = vec![
        Op::Connect,
        Op::Connect,
        Op::Write {
            client: 0,
            len: 100,
        },
        Op::Write { client: 1, len: 3 },
        Op::Read { client: 0, max: 50 },
        Op::Write {
            client: 1,
            len: 1000,
        },
        Op::Write {
            client: 0,
            len: 1000,
        },
        Op::Shutdown { client: 1 },
        Op::HandleSend { client: 0, len: 10 },
    ];
    s
}

#[test]
fn a_plain_scenario_passes() {
    let summary = run(&plain(1)).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(summary.stats.accepted, 2);
    assert!(summary.stats.msgs_in > 0);
}

#[test]
fn the_same_seed_replays_exactly() {
    let mut s = plain(99);
    s.workers = 3;
    s.faults = FaultConfig::benign(7);
    let a = run(&s).unwrap_or_else(|f| panic!("{f}"));
    let b = run(&s).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(
        a.steps, b.steps,
        "same seed, same number of scheduling points"
    );
    assert_eq!(
        a.fingerprint, b.fingerprint,
        "same seed, same history and schedule"
    );
    assert_eq!(a.stats, b.stats);
    assert_eq!(a.faults, b.faults);
    s.seed = 100;
    let c = run(&s).unwrap_or_else(|f| panic!("{f}"));
    assert_ne!(a.fingerprint, c.fingerprint, "another seed, another run");
}

/// Standby with a threshold no blocking wait meets: a worker that polled
/// once stands by whenever another polls, and mostly only stop, drain and
/// timers wake it (a zero-timeout wait that brings events still counts as
/// busy). One poller serves everything.
#[test]
fn standby_with_a_single_poller_serves_everything() {
    let mut stood = 0;
    for seed in 0..4 {
        let mut s = plain(seed);
        s.workers = 4;
        s.faults = FaultConfig::benign(seed);
        s.idle_wait = IdleWait::Standby {
            busy_below: Duration::ZERO,
        };
        stood += run(&s).unwrap_or_else(|f| panic!("{f}")).stats.standbys;
    }
    assert!(stood > 0, "no worker ever stood by");
}

/// Standby with a threshold every wait meets: each wait that brings events
/// wakes a standing worker, which joins the polling.
#[test]
fn standby_wakes_a_worker_when_events_wait() {
    let mut woken = 0;
    for seed in 0..4 {
        let mut s = plain(seed);
        s.workers = 4;
        s.faults = FaultConfig::benign(seed);
        s.idle_wait = IdleWait::Standby {
            busy_below: Duration::from_secs(1),
        };
        woken += run(&s)
            .unwrap_or_else(|f| panic!("{f}"))
            .stats
            .standby_wakes;
    }
    assert!(woken > 0, "no standing worker was ever woken");
}

/// A timer set by a worker that then stands by still fires: the poller may
/// have computed its timeout before the timer existed, so a standing worker
/// sleeps no longer than the earliest timer.
#[test]
fn standby_keeps_timers_running() {
    let mut stood_by = 0;
    for seed in 0..8 {
        let mut s = Scenario::new(seed);
        s.workers = 2;
        s.idle_timeout_ms = 5;
        s.idle_wait = IdleWait::Standby {
            busy_below: Duration::ZERO,
        };
        s.ops = vec![
            Op::Connect,
            Op::Read {
                client: 0,
                max: 100,
            },
            Op::Sleep { millis: 50 },
        ];
        let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(
            summary.stats.closed_for(CloseReason::IdleTimeout),
            1,
            "seed {seed}: the idle connection outlived its timeout"
        );
        stood_by += summary.stats.standbys;
    }
    // The premise: a worker did stand by (else the timers ran on pollers).
    assert!(stood_by > 0, "no worker ever stood by");
}

// ---------------------------------------------------------------- regressions
// Each shrunk failure, kept as a named test.

/// A greeting larger than the socket buffer was flushed before the
/// connection was registered with epoll: EAGAIN, then arming EPOLLOUT failed
/// with ENOENT and the connection was closed.
#[test]
fn regression_greeting_larger_than_the_buffer_before_registration() {
    let mut s = Scenario::new(0);
    s.workers = 1;
    s.buffer = 7;
    s.max_conns = 1;
    s.ops = vec![
        Op::Connect,
        Op::ServerClose {
            client: 0,
            after_flush: false,
        },
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// A pub/sub audit's finding: a bad header closed the connection at once,
/// dropping the replies still queued for the complete frames before it.
/// Now they are written first, and the client (owed them all: checked as
/// exactly as any, see the scenario's check 1) reads every one, then the
/// end. Frames of up to 73 bytes, 8 of them: their echoes pass the 256
/// bytes the kernel holds, so some wait in the server's queue when the
/// bad header is read. The real-socket twin is in tests/echo.rs.
#[test]
fn a_bad_header_closes_after_the_replies_the_client_has_not_read() {
    let mut garbage_written = 0;
    for seed in 0..8 {
        let mut s = Scenario::new(seed);
        s.workers = 1 + seed as usize % 2;
        s.ops = vec![
            Op::Connect,
            Op::Read {
                client: 0,
                max: 2000,
            },
            Op::Write {
                client: 0,
                len: 2000,
            },
            Op::Sleep { millis: 1 },
            Op::Write {
                client: 0,
                len: 2000,
            },
            Op::Sleep { millis: 1 },
            Op::Garbage { client: 0 },
            Op::Sleep { millis: 1 },
        ];
        let summary = run(&s).unwrap_or_else(|f| panic!("seed {seed}: {f}"));
        garbage_written += summary.stats.closed_for(CloseReason::BadFrame);
    }
    // The premise: the bad header was written and read (the close it
    // causes counted), in most of the seeds.
    assert!(
        garbage_written >= 4,
        "{garbage_written} bad-frame closes in 8 seeds"
    );
}

/// A send accepted after the connection began closing once flushed (here:
/// the client half-closed) was dropped, or torn, by the close.
#[test]
fn regression_send_after_lingering_close_is_refused_not_dropped() {
    let mut s = Scenario::new(4612222032789970286);
    s.workers = 4;
    s.buffer = 64;
    s.max_out = 200;
    s.max_conns = 2;
    s.read_budget = 1;
    s.events_per_wait = 1;
    s.frames = 1;
    s.max_payload = 200;
    s.faults = FaultConfig::benign(4612222032789970286);
    s.ops = vec![
        Op::Connect,
        Op::Write { client: 0, len: 40 },
        Op::Sleep { millis: 1 },
        Op::Write {
            client: 39,
            len: 64,
        },
        Op::Yield { steps: 6 },
        Op::Shutdown { client: 0 },
        Op::Yield { steps: 7 },
        Op::Read { client: 0, max: 1 },
        Op::Read { client: 0, max: 48 },
        Op::Connect,
        Op::HandleSend { client: 12, len: 0 },
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// The bug fixed in f631bdf, found by the simulation once dials' remote
/// ends could speak first and EPOLLOUT could stay registered (shrunk by
/// proptest with the fix reverted): the remote's frame arrived with the
/// connect's completion, the connect turn ran `on_open` and released the
/// read side without reading, and no other edge came (a lost edge).
#[test]
fn regression_a_dial_whose_peer_speaks_first_is_read_after_the_connect() {
    let mut s = Scenario::new(10319491598250683757);
    s.workers = 1;
    s.buffer = 64;
    s.max_out = 16;
    s.max_conns = 1;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 1;
    s.max_payload = 0;
    s.write_interest = WriteInterest::Registered;
    s.dials_speak_first = true;
    let w = |client, len| Op::Write { client, len };
    s.ops = vec![
        Op::Dial {
            target: DialTarget::Listening,
        },
        Op::Connect,
        Op::SetActiveWorkers { n: 2 },
        Op::Connect,
        Op::Answer { refuse: false },
        w(0, 1),
        w(0, 1),
        w(0, 1),
        w(0, 1),
        w(0, 1),
        Op::Connect,
        w(0, 1),
        w(0, 1),
        Op::Connect,
        w(17, 9),
        Op::Connect,
        Op::Connect,
        Op::Connect,
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// A checker mistake the deep run found once closes had to be explained
/// (shrunk by proptest): a stale send (`StaleSend`) to a client that had
/// closed its socket found the server's side still open and its output
/// full, and the server rightly closed it as a slow receiver; the driver
/// marked a handle refusal as a reason to close only for `HandleSend`.
#[test]
fn regression_a_stale_send_refused_as_full_explains_a_slow_receiver_close() {
    let mut s = Scenario::new(6572387430339283689);
    s.workers = 1;
    s.buffer = 64;
    s.max_out = 200;
    s.max_conns = 3;
    s.read_budget = 1;
    s.frame_budget = 2;
    s.events_per_wait = 2;
    s.frames = 1;
    s.max_payload = 200;
    s.faults = FaultConfig::none(6572387430339283689);
    s.faults.preempt = 0.2;
    let w = |client, len| Op::Write { client, len };
    s.ops = vec![
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::ParkAll { steps: 0 },
        Op::ServerClose {
            client: 0,
            after_flush: false,
        },
        w(3, 1),
        w(0, 1),
        w(0, 1),
        w(0, 1),
        Op::Reset { client: 28 },
        w(44, 1),
        w(0, 33),
        Op::Read {
            client: 150,
            max: 9,
        },
        w(0, 1),
        w(0, 1),
        w(0, 1),
        Op::Shutdown { client: 124 },
        Op::HandleSend {
            client: 108,
            len: 65,
        },
        Op::HandleSend { client: 0, len: 0 },
        w(0, 1),
        w(54, 49),
        w(0, 1),
        w(0, 1),
        w(0, 1),
        w(0, 1),
        Op::Close { client: 15 },
        Op::StaleSend { len: 6 },
        Op::Connect,
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// A half-closed client that never read its greeting was closed by the idle
/// timeout, but the close was recorded as an ordinary end of stream: the
/// lingering close's provisional reason won over the real one.
#[test]
fn regression_a_timeout_during_a_lingering_close_is_recorded_as_the_timeout() {
    let mut s = Scenario::new(0);
    s.workers = 1;
    s.buffer = 7;
    s.max_out = 16;
    s.max_conns = 1;
    s.read_budget = 1;
    s.events_per_wait = 1;
    s.frames = 0;
    s.max_payload = 0;
    s.idle_timeout_ms = 5;
    s.ops = vec![
        Op::Connect,
        Op::Shutdown { client: 0 },
        Op::Sleep { millis: 6 },
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// Standby found a gap in the fault injector: the readiness event owed after
/// an injected EAGAIN or short read was only handed to the next
/// `epoll_wait` call, which is the thread that met the fault when every
/// worker polls, but with standby that thread may sleep while the only
/// poller stays blocked. Injected events now reach the kernel's ready list
/// and wake a waiter, as an arrival does.
#[test]
fn regression_an_injected_event_wakes_a_blocked_poller() {
    let mut s = Scenario::new(0);
    s.workers = 2;
    s.buffer = 7;
    s.max_out = 16;
    s.max_conns = 1;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 2;
    s.max_payload = 3000;
    s.faults = FaultConfig::benign(0);
    s.idle_wait = IdleWait::Standby {
        busy_below: Duration::from_micros(25),
    };
    s.ops = vec![Op::Connect];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// With injected readiness queued in the kernel, an injected EAGAIN on a
/// write that the kernel itself never saw left no writer waiting for space:
/// once the socket filled, the client's reads woke nobody and the reply
/// stalled. An injected write EAGAIN now marks the writer as waiting for
/// space (SOCK_NOSPACE), as a real one does.
#[test]
fn regression_an_injected_write_eagain_waits_for_space() {
    let mut s = Scenario::new(3670847618649266924);
    s.workers = 4;
    s.buffer = 7;
    s.max_out = 16;
    s.max_conns = 3;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 2;
    s.frames = 9;
    s.max_payload = 3000;
    s.idle_timeout_ms = 5;
    s.faults = FaultConfig::benign(3670847618649266924);
    s.ops = vec![
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::Yield { steps: 5 },
        Op::Shutdown { client: 151 },
        Op::Yield { steps: 1 },
        Op::Yield { steps: 12 },
        Op::Connect,
        Op::Sleep { millis: 10 },
        Op::Connect,
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// The bug fixed in bcaa2dd, found again by the simulation once parking
/// ran on the simulated kernel (shrunk by proptest with the fix reverted): a
/// worker that parks for `set_active_workers(1)` without waking the
/// standing workers leaves one asleep that stood by on seeing it poll; with
/// the parked one gone nobody polls, and the client waits in the backlog.
#[test]
fn regression_a_parking_worker_wakes_the_standing_ones() {
    let mut s = Scenario::new(4727040381259218985);
    s.workers = 2;
    s.buffer = 7;
    s.max_out = 16;
    s.max_conns = 1;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 0;
    s.max_payload = 0;
    s.faults = FaultConfig::benign(4727040381259218985);
    s.idle_wait = IdleWait::Standby {
        busy_below: Duration::ZERO,
    };
    s.ops = vec![Op::SetActiveWorkers { n: 1 }, Op::Connect];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// `with_workers_parked` from the driver, amid traffic and with standby:
/// every worker parks, no handler runs while they are, and they serve
/// again afterwards; then serving paused (0 workers) and resumed.
#[test]
fn workers_park_and_resume_amid_traffic() {
    for seed in 0..24 {
        let mut s = Scenario::new(seed);
        s.workers = 1 + (seed as usize % 4);
        s.idle_wait = IdleWait::Standby {
            busy_below: Duration::from_micros(25),
        };
        s.ops = vec![
            Op::Connect,
            Op::Connect,
            Op::Write { client: 0, len: 40 },
            Op::ParkAll { steps: 12 },
            Op::Write { client: 1, len: 60 },
            Op::SetActiveWorkers { n: 0 },
            Op::Write { client: 0, len: 30 },
            Op::Sleep { millis: 5 },
            Op::SetActiveWorkers { n: 1 },
            Op::Read {
                client: 0,
                max: 100,
            },
            Op::ParkAll { steps: 3 },
        ];
        let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(summary.clients, 2);
    }
}

/// The schedule follows from the seed alone, not from the name of the
/// thread that drives the scenario (a test's name): a failure found by
/// proptest must replay in a named regression test. Runnable threads are
/// ordered by name for the seeded pick, and the driver used to be ordered
/// by its test's name among the workers' `eserver-N`.
#[test]
fn a_scenario_replays_whatever_the_driving_thread_is_called() {
    let mut s = plain(5);
    s.workers = 3;
    let replay = |name: &str| {
        let s = s.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&s).unwrap_or_else(|f| panic!("{f}")))
            .unwrap()
            .join()
            .unwrap()
    };
    // The fingerprint hashes the trace, which names the threads: compare
    // what does not.
    let (a, z) = (replay("a-driver"), replay("z-driver"));
    assert_eq!(
        (a.steps, a.stats),
        (z.steps, z.stats),
        "the driver's name changed the schedule"
    );
}

/// Found by proptest once scenarios could dial out (seed as found, in
/// `scenarios_without_faults`): the acceptor looked for a free slot, the
/// driver's dial took the last one, and the accepted client was closed
/// unserved ("accepted but never greeted"). The acceptor now reserves the
/// slot before `accept`.
#[test]
fn regression_a_dial_cannot_take_the_slot_an_accept_counted_on() {
    let mut s = Scenario::new(6979992405593325100);
    s.workers = 2;
    s.buffer = 256;
    s.max_out = 16;
    s.max_conns = 3;
    s.read_budget = 1;
    s.frame_budget = 3;
    s.events_per_wait = 2;
    s.frames = 4;
    s.max_payload = 200;
    s.idle_wait = IdleWait::Standby {
        busy_below: Duration::ZERO,
    };
    s.ops = vec![
        Op::Connect,
        Op::Write {
            client: 0,
            len: 165,
        },
        Op::Sleep { millis: 50 },
        Op::ServerClose {
            client: 0,
            after_flush: false,
        },
        Op::Garbage { client: 0 },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::ServerClose {
            client: 0,
            after_flush: false,
        },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Yield { steps: 10 },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Sleep { millis: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Write { client: 0, len: 1 },
        Op::ServerClose {
            client: 0,
            after_flush: false,
        },
        Op::Read { client: 0, max: 1 },
        Op::Write { client: 0, len: 1 },
        Op::Read { client: 0, max: 1 },
        Op::Connect,
        Op::Write { client: 43, len: 1 },
        Op::Write {
            client: 155,
            len: 130,
        },
        Op::Connect,
        Op::Write {
            client: 14,
            len: 194,
        },
        Op::Yield { steps: 12 },
        Op::Connect,
        Op::Dial {
            target: DialTarget::Listening,
        },
        Op::Read {
            client: 211,
            max: 1,
        },
        Op::Reset { client: 12 },
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// Found by `ci/proptest-deep.sh`, a checker's mistake rather than the
/// server's: the remote accepted the dial and reset it before the server saw
/// the connect complete, so SO_ERROR said ECONNRESET and the server
/// reported `on_connect_failed` with it, which check 11 did not allow.
#[test]
fn regression_a_dial_reset_before_it_completes_fails_with_econnreset() {
    let mut s = Scenario::new(0);
    s.workers = 1;
    s.buffer = 7;
    s.max_out = 16;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 0;
    s.max_payload = 0;
    s.faults = FaultConfig::benign(0);
    let w = Op::Write { client: 0, len: 1 };
    s.ops = vec![
        Op::Dial {
            target: DialTarget::Listening,
        },
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::Connect,
        w,
        Op::Connect,
        Op::Answer { refuse: false },
        w,
        w,
        w,
        w,
        w,
        w,
        w,
        Op::Connect,
        Op::Connect,
        Op::Reset { client: 21 },
    ];
    let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(summary.stats.connected, 0, "the reset came first");
}

/// Found by `ci/proptest-deep.sh 10000`: a dial that the handle closed
/// after flush while its connect was pending, with a send queued. The
/// connect turn marked the connect done, then its writer pass drained the
/// queue, which completed the lingering close; the close then found the
/// slot no longer connecting and the handler's state empty, so it ran
/// neither `on_connect_failed` nor `on_close`: the handler never heard of
/// the connection (check 11: "neither on_open nor on_connect_failed").
/// A write failure in the same pass ended the same way.
#[test]
fn regression_a_dial_closed_by_its_first_flush_is_reported_as_failed() {
    let mut s = Scenario::new(478377350897859921);
    s.workers = 1;
    s.buffer = 4096;
    s.max_out = 200;
    s.max_conns = 1;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 1;
    s.max_payload = 0;
    let (r, w) = (
        Op::Read { client: 0, max: 1 },
        Op::Write { client: 0, len: 1 },
    );
    let dial = Op::Dial {
        target: DialTarget::Listening,
    };
    s.ops = vec![
        dial,
        Op::Connect,
        r,
        r,
        r,
        Op::Write { client: 0, len: 9 },
        Op::Answer { refuse: false },
        dial,
        Op::SetActiveWorkers { n: 0 },
        r,
        r,
        w,
        w,
        w,
        Op::StaleSend { len: 0 },
        Op::HandleSend { client: 5, len: 0 },
        Op::SetActiveWorkers { n: 0 },
        Op::ServerClose {
            client: 155,
            after_flush: true,
        },
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::Connect,
    ];
    let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(summary.stats.connected, 1, "the connect completed first");
}

/// The same bug, found in the same run under hostile faults: the dial is
/// answered at once, and the handle's close after flush lands while the
/// connect is still pending.
#[test]
fn regression_a_dial_closed_by_its_first_flush_under_faults() {
    let mut s = Scenario::new(478435768195180126);
    s.workers = 1;
    s.buffer = 4096;
    s.max_out = 200;
    s.max_conns = 1;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 0;
    s.max_payload = 0;
    s.faults = FaultConfig::hostile(478435768195180126);
    let w = Op::Write { client: 0, len: 1 };
    s.ops = vec![
        Op::Connect,
        Op::Dial {
            target: DialTarget::Listening,
        },
        Op::Answer { refuse: false },
        w,
        w,
        w,
        w,
        Op::StaleSend { len: 0 },
        Op::HandleSend { client: 5, len: 0 },
        Op::ServerClose {
            client: 155,
            after_flush: true,
        },
        Op::Connect,
        Op::Reset { client: 65 },
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::Connect,
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// Found by `ci/proptest-deep.sh 10000` right after the fix above, a
/// checker's mistake: an injected reset hit the write of a message queued
/// to a dial before `on_open`, so the server closed it and reported
/// `on_connect_failed(EPIPE)`, as it should; check 11 allowed a write's
/// reset errno only when the remote had closed, not when a fault was
/// injected on the connection.
#[test]
fn regression_a_dial_whose_queued_send_meets_an_injected_reset() {
    let seed = 4486128566982745664;
    let mut s = Scenario::new(seed);
    s.workers = 2;
    s.buffer = 64;
    s.max_out = 200;
    s.max_conns = 4;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 3;
    s.max_payload = 200;
    s.faults = FaultConfig {
        futex_early: 0.3,
        ..FaultConfig::hostile(seed)
    };
    s.frame_timeout_ms = 5;
    s.idle_wait = IdleWait::Standby {
        busy_below: Duration::from_secs(1),
    };
    let (r, w) = (
        Op::Read { client: 0, max: 1 },
        Op::Write { client: 0, len: 1 },
    );
    let write = |client, len| Op::Write { client, len };
    s.ops = vec![
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::ServerClose {
            client: 0,
            after_flush: false,
        },
        r,
        Op::Yield { steps: 12 },
        Op::Yield { steps: 11 },
        write(91, 57),
        r,
        Op::Yield { steps: 14 },
        Op::Connect,
        Op::Shutdown { client: 34 },
        Op::Shutdown { client: 143 },
        write(60, 1),
        r,
        write(8, 1),
        write(253, 64),
        Op::Reset { client: 106 },
        Op::Yield { steps: 1 },
        write(200, 44),
        Op::Yield { steps: 9 },
        Op::SetActiveWorkers { n: 4 },
        write(144, 64),
        Op::Sleep { millis: 5 },
        Op::Dial {
            target: DialTarget::Listening,
        },
    ];
    s.ops.extend([w; 9]);
    s.ops.push(Op::Answer { refuse: false });
    s.ops.extend([w; 7]);
    s.ops.push(Op::HandleSend { client: 89, len: 0 });
    s.ops.extend([Op::Connect; 5]);
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// Found by `ci/proptest-deep.sh 10000`, a flaw of the simulated kernel:
/// a handle send to a dial filled its socket buffer exactly (no EAGAIN)
/// just as the remote accepted, so when a worker harvested the connect's
/// completion the socket was not writable and the event was dropped; when
/// the remote then read, nothing woke the server, and `on_open` never ran.
/// Linux's `tcp_poll` marks a socket it finds full as waiting for space, so
/// the read brings EPOLLOUT; the simulation's poll now does the same.
#[test]
fn regression_a_poll_that_finds_no_room_waits_for_space() {
    let mut s = Scenario::new(9188814526381799645);
    s.workers = 2;
    s.buffer = 64;
    s.max_out = 200;
    s.max_conns = 1;
    s.read_budget = 1;
    s.frame_budget = 1;
    s.events_per_wait = 1;
    s.frames = 0;
    s.max_payload = 0;
    let w = Op::Write { client: 0, len: 1 };
    s.ops = vec![
        Op::Dial {
            target: DialTarget::Listening,
        },
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::SetActiveWorkers { n: 0 },
    ];
    s.ops.extend(std::iter::repeat_n(w, 15));
    s.ops.extend([Op::Connect, Op::Answer { refuse: false }]);
    s.ops.extend(std::iter::repeat_n(w, 6));
    s.ops.push(Op::Connect);
    s.ops.extend(std::iter::repeat_n(w, 3));
    s.ops.push(Op::HandleSend {
        client: 184,
        len: 52,
    });
    let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(summary.stats.connected, 1);
}

/// Outbound connections on the simulated kernel, amid inbound traffic:
/// dials answered early, late, refused, to nobody and to nowhere, under
/// every fault level and both idle waits. Check 11 in `eserver::scenario`
/// holds each dial to its one outcome; the accepted ones' remote ends are
/// then checked like any client (greeting, echoes, handle sends).
#[test]
fn dials_amid_traffic_have_exactly_one_outcome_each() {
    let faults = [FaultConfig::none, FaultConfig::benign, FaultConfig::hostile];
    let (mut opened, mut failed) = (0, 0);
    for seed in 0..24u64 {
        let mut s = Scenario::new(seed);
        s.workers = 1 + (seed as usize % 4);
        s.max_conns = 8;
        s.faults = faults[seed as usize % 3](seed);
        // Half the seeds switch threads after calls return too: a worker
        // may then take the connect's first event while the driver still
        // holds the connection's read side.
        s.faults.preempt = [0.0, 0.5][(seed / 3) as usize % 2];
        if seed % 2 == 1 {
            s.idle_wait = IdleWait::Standby {
                busy_below: Duration::from_micros(25),
            };
        }
        s.ops = vec![
            Op::Connect,
            Op::Dial {
                target: DialTarget::Listening,
            },
            Op::Dial {
                target: DialTarget::Closed,
            },
            Op::Write { client: 0, len: 50 },
            Op::Answer { refuse: false },
            Op::Dial {
                target: DialTarget::Listening,
            },
            Op::Dial {
                target: DialTarget::Unreachable,
            },
            Op::Yield { steps: 5 },
            Op::Write { client: 1, len: 70 },
            Op::HandleSend { client: 1, len: 20 },
            Op::Answer { refuse: true },
            Op::Dial {
                target: DialTarget::Listening,
            },
            Op::Read { client: 1, max: 40 },
            Op::ServerClose {
                client: 1,
                after_flush: seed % 3 == 0,
            },
        ];
        let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
        opened += summary.stats.connected;
        failed += summary.stats.closed_for(CloseReason::ConnectFailed(0));
        assert_eq!(
            summary.stats.connects, 4,
            "seed {seed}: the unreachable one never started"
        );
    }
    // Each seed: two dials accepted, two refused (one by the remote, one by
    // nobody listening), one unreachable.
    assert_eq!((opened, failed), (48, 48));
}

/// Futex waits cut short (as a signal does) while workers stand by and
/// park: every waiter re-checks, so nothing changes but the schedule.
#[test]
fn futex_waits_cut_short_change_nothing() {
    let mut early = 0;
    for seed in 0..16 {
        let mut s = Scenario::new(seed);
        s.workers = 2 + (seed as usize % 3);
        s.faults = FaultConfig {
            futex_early: 0.5,
            ..FaultConfig::benign(seed)
        };
        s.idle_wait = IdleWait::Standby {
            busy_below: Duration::ZERO,
        };
        s.ops = vec![
            Op::Connect,
            Op::Connect,
            Op::Write { client: 0, len: 50 },
            Op::SetActiveWorkers { n: 1 },
            Op::Write { client: 1, len: 50 },
            Op::Sleep { millis: 3 },
            Op::ParkAll { steps: 8 },
            Op::SetActiveWorkers { n: 4 },
            Op::Read {
                client: 0,
                max: 100,
            },
        ];
        let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
        early += summary.faults.futex_early;
    }
    assert!(early > 0, "no futex wait was cut short");
}

fn op() -> impl Strategy<Value = Op> {
    let client = any::<u8>();
    prop_oneof![
        4 => Just(Op::Connect),
        20 => (client, 1u16..600).prop_map(|(client, len)| Op::Write { client, len }),
        12 => (client, 1u16..2000).prop_map(|(client, max)| Op::Read { client, max }),
        1 => client.prop_map(|client| Op::Garbage { client }),
        2 => client.prop_map(|client| Op::Shutdown { client }),
        1 => client.prop_map(|client| Op::Close { client }),
        1 => client.prop_map(|client| Op::Reset { client }),
        1 => (client, any::<bool>()).prop_map(|(client, after_flush)| Op::ServerClose { client, after_flush }),
        4 => (client, 0u16..400).prop_map(|(client, len)| Op::HandleSend { client, len }),
        1 => (0u16..100).prop_map(|len| Op::StaleSend { len }),
        4 => (1u8..20).prop_map(|steps| Op::Yield { steps }),
        1 => (1u16..300).prop_map(|millis| Op::Sleep { millis }),
    ]
}

/// Parking operations, inserted into the generated steps at drawn places.
fn parking_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5).prop_map(|n| Op::SetActiveWorkers { n }),
        (0u8..20).prop_map(|steps| Op::ParkAll { steps }),
    ]
}

/// Outbound connections, inserted into the generated steps at drawn places.
fn outbound_op() -> impl Strategy<Value = Op> {
    let dial = |target| Just(Op::Dial { target });
    prop_oneof![
        3 => dial(DialTarget::Listening),
        1 => dial(DialTarget::Closed),
        1 => dial(DialTarget::Unreachable),
        2 => Just(Op::Answer { refuse: false }),
        1 => Just(Op::Answer { refuse: true }),
    ]
}

fn scenario(faults: fn(u64) -> FaultConfig) -> impl Strategy<Value = Scenario> {
    // The frame budget, the idle wait, the parking steps, early futex
    // returns, outbound connections and preemption after calls are drawn
    // after everything else, so the committed regression seeds still
    // generate the scenarios they were found with. Standby thresholds: 0 never counts a wait as busy (a
    // standing-by worker is woken only by stop, drain or its timer), 25 µs
    // sorts waits by whether they blocked (a scheduling point costs 10 µs of
    // virtual time), 1 s counts every wait that brings events as busy.
    (
        base_scenario(faults),
        prop::sample::select(vec![1usize, 2, 3, 256]),
        prop::sample::select(vec![
            IdleWait::Poll,
            IdleWait::Standby {
                busy_below: Duration::ZERO,
            },
            IdleWait::Standby {
                busy_below: Duration::from_micros(25),
            },
            IdleWait::Standby {
                busy_below: Duration::from_secs(1),
            },
        ]),
        prop::collection::vec((any::<prop::sample::Index>(), parking_op()), 0..3),
        prop::sample::select(vec![0.0, 0.0, 0.3]),
        prop::collection::vec((any::<prop::sample::Index>(), outbound_op()), 0..5),
        prop::sample::select(vec![0.0, 0.0, 0.2]),
        prop::sample::select(vec![
            WriteInterest::AfterEagain,
            WriteInterest::AfterEagain,
            WriteInterest::Registered,
        ]),
        any::<bool>(),
    )
        .prop_map(
            |(
                mut s,
                frame_budget,
                idle_wait,
                parking,
                futex_early,
                outbound,
                preempt,
                write_interest,
                dials_speak_first,
            )| {
                s.frame_budget = frame_budget;
                s.write_interest = write_interest;
                s.dials_speak_first = dials_speak_first;
                s.idle_wait = idle_wait;
                // Futex waits cut short belong with the other faults.
                if s.faults != FaultConfig::none(s.seed) {
                    s.faults.futex_early = futex_early;
                }
                // Preemption is the schedule's, not a fault: any level.
                s.faults.preempt = preempt;
                for (at, op) in parking.into_iter().chain(outbound) {
                    let at = at.index(s.ops.len() + 1);
                    s.ops.insert(at, op);
                }
                s
            },
        )
}

fn base_scenario(faults: fn(u64) -> FaultConfig) -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        1usize..=4,
        prop::sample::select(vec![7usize, 64, 256, 4096]),
        prop::sample::select(vec![16usize, 200, 1024, 65536]),
        1usize..=6,
        prop::sample::select(vec![1usize, 16, 512, 65536]),
        prop::sample::select(vec![1usize, 2, 8, 64]),
        0usize..24,
        prop::sample::select(vec![0usize, 16, 200, 3000]),
        (1usize..=4, prop::collection::vec(op(), 0..48)),
        // Mostly no timeouts; sometimes short ones (virtual time), so that
        // idle and frame timers fire amid everything else.
        prop::sample::select(vec![0u32, 0, 0, 5, 50, 500]),
        prop::sample::select(vec![0u32, 0, 0, 5, 50, 500]),
    )
        .prop_map(
            move |(
                seed,
                workers,
                buffer,
                max_out,
                max_conns,
                read_budget,
                events_per_wait,
                frames,
                max_payload,
                (clients, ops),
                idle_timeout_ms,
                frame_timeout_ms,
            )| {
                // A few clients from the start, then the generated steps.
                let ops = std::iter::repeat_n(Op::Connect, clients)
                    .chain(ops)
                    .collect();
                Scenario {
                    seed,
                    workers,
                    buffer,
                    max_out,
                    max_conns,
                    read_budget,
                    frame_budget: 256,
                    events_per_wait,
                    frames,
                    max_payload,
                    faults: faults(seed),
                    ops,
                    finish: true,
                    idle_timeout_ms,
                    frame_timeout_ms,
                    idle_wait: IdleWait::Poll,
                    write_interest: WriteInterest::AfterEagain,
                    dials_speak_first: false,
                    linger_ms: DEFAULT_LINGER_MS,
                    finer_schedule: false,
                }
            },
        )
}

/// Steps that make closes after flush linger (a close right behind a
/// write, so replies are left unread and the socket has something a reset
/// would drop), and clients that go on sending, read, close or reset while
/// they do.
fn linger_op() -> impl Strategy<Value = Vec<Op>> {
    let client = any::<u8>();
    let one = |op| vec![op];
    prop_oneof![
        2 => Just(vec![Op::Connect]),
        10 => (client, 1u16..600).prop_map(move |(client, len)| one(Op::Write { client, len })),
        6 => (client, 1u16..2000).prop_map(move |(client, max)| one(Op::Read { client, max })),
        2 => client.prop_map(move |client| one(Op::ServerClose { client, after_flush: true })),
        4 => (client, 600u16..4000, 0u16..3).prop_map(|(client, len, millis)| vec![
            Op::Write { client, len },
            Op::Sleep { millis },
            Op::ServerClose { client, after_flush: true },
        ]),
        2 => client.prop_map(move |client| one(Op::Close { client })),
        1 => client.prop_map(move |client| one(Op::Shutdown { client })),
        1 => client.prop_map(move |client| one(Op::Reset { client })),
        4 => (1u8..20).prop_map(move |steps| one(Op::Yield { steps })),
        1 => (1u16..300).prop_map(move |millis| one(Op::Sleep { millis })),
    ]
}

/// Scenarios about lingering closes: the base scenario's settings, a few
/// clients, steps from [`linger_op`], linger times that run out within a
/// scenario or not, and preemption after calls.
fn linger_scenario(faults: fn(u64) -> FaultConfig) -> impl Strategy<Value = Scenario> {
    (
        base_scenario(faults),
        1usize..=4,
        prop::collection::vec(linger_op(), 0..32),
        // 0: no lingering close at all (a close after flush closes at
        // once), which the base scenario's default never draws.
        prop::sample::select(vec![0u32, 5, 50, DEFAULT_LINGER_MS]),
        prop::sample::select(vec![0.0, 0.3]),
    )
        .prop_map(|(mut s, clients, steps, linger_ms, preempt)| {
            let ops = steps.into_iter().flatten();
            // Frames to write, so that there are replies to leave unread.
            s.frames = s.frames.max(4);
            // Each client reads its greeting first: it learns its id (which
            // a close through the handle needs) and may write.
            let greet = (0..clients as u8).map(|client| Op::Read { client, max: 2000 });
            s.ops = std::iter::repeat_n(Op::Connect, clients)
                .chain([Op::Sleep { millis: 1 }])
                .chain(greet)
                .chain(ops)
                .collect();
            s.linger_ms = linger_ms;
            s.faults.preempt = preempt;
            s
        })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn scenarios_without_faults(s in scenario(FaultConfig::none)) {
        if let Err(failure) = run(&s) {
            prop_assert!(false, "{failure}\n{s:?}");
        }
    }

    #[test]
    fn scenarios_with_benign_faults(s in scenario(FaultConfig::benign)) {
        if let Err(failure) = run(&s) {
            prop_assert!(false, "{failure}\n{s:?}");
        }
    }

    #[test]
    fn scenarios_with_hostile_faults(s in scenario(FaultConfig::hostile)) {
        if let Err(failure) = run(&s) {
            prop_assert!(false, "{failure}\n{s:?}");
        }
    }

    #[test]
    fn lingering_closes_with_benign_faults(s in linger_scenario(FaultConfig::benign)) {
        if let Err(failure) = run(&s) {
            prop_assert!(false, "{failure}\n{s:?}");
        }
    }

    /// The finer schedule (a point before each read or write looks its
    /// descriptor up, and inside each `on_message`) in a property of its
    /// own: drawn in the others, it would change the interleaving every
    /// committed regression seed replays.
    #[test]
    fn scenarios_with_a_finer_schedule(s in finer(scenario(FaultConfig::benign))) {
        if let Err(failure) = run(&s) {
            prop_assert!(false, "{failure}\n{s:?}");
        }
    }

    /// Lingering closes on the finer schedule.
    #[test]
    fn lingering_closes_on_a_finer_schedule(s in finer(linger_scenario(FaultConfig::benign))) {
        if let Err(failure) = run(&s) {
            prop_assert!(false, "{failure}\n{s:?}");
        }
    }
}

/// `scenarios`, on the finer schedule.
fn finer(scenarios: impl Strategy<Value = Scenario>) -> impl Strategy<Value = Scenario> {
    scenarios.prop_map(|mut s| {
        s.finer_schedule = true;
        s
    })
}

/// A lingering scenario's start: one client reads its greeting (learning
/// its id, which a close through the handle needs), writes 600 bytes of
/// frames (`read_reply`: and reads the replies), and is closed after flush.
fn closed_after_a_reply(seed: u64, read_reply: bool) -> Scenario {
    let mut s = Scenario::new(seed);
    s.workers = 2;
    s.linger_ms = DEFAULT_LINGER_MS;
    s.frames = 4;
    let read = Op::Read {
        client: 0,
        max: 2000,
    };
    s.ops = vec![
        Op::Connect,
        Op::Sleep { millis: 5 },
        read,
        Op::Write {
            client: 0,
            len: 600,
        },
        Op::Sleep { millis: 5 },
    ];
    if read_reply {
        s.ops.push(read);
    }
    s.ops.push(Op::ServerClose {
        client: 0,
        after_flush: true,
    });
    s
}

/// [`closed_after_a_reply`], then another client connects, and the server
/// stops: the drain finds one socket lingering. With the reply unread, the
/// client stops reading (so the drain holds the linger to its deadline).
fn stopped_with_a_linger(seed: u64, reply_read: bool) -> Scenario {
    let mut s = closed_after_a_reply(seed, reply_read);
    if !reply_read {
        s.ops.insert(s.ops.len() - 1, Op::StopReading { client: 0 });
    }
    s.ops.extend([
        Op::Sleep { millis: 5 },
        Op::Connect,
        Op::Sleep { millis: 5 },
    ]);
    s
}

/// Runs `s` and checks its lingering counts after the stop: (lingers,
/// lingers cut short, sockets lingering still). Returns the stats.
fn lingered(s: &Scenario, want: (u64, u64, u64)) -> eserver::Stats {
    let stats = run(s).unwrap_or_else(|f| panic!("{f}")).stats;
    let got = (stats.lingers, stats.lingers_cut, stats.lingering);
    assert_eq!(got, want, "{stats}");
    stats
}

/// A close after flush whose client is still open, with a reply it has not
/// read, lingers (its socket on a second number, the slot reused at once)
/// until the client closes; bytes the client sends meanwhile are read and
/// dropped. The checker counts the lingering socket among the live
/// descriptions while it lingers.
#[test]
fn a_close_after_flush_lingers_until_the_client_closes() {
    let mut s = closed_after_a_reply(7, false);
    s.ops.extend([
        Op::Sleep { millis: 5 },
        Op::Write { client: 0, len: 8 },
        Op::Sleep { millis: 5 },
        Op::Connect,
        Op::Write { client: 1, len: 8 },
        Op::Close { client: 0 },
        Op::Sleep { millis: 5 },
    ]);
    lingered(&s, (1, 0, 0));
}

/// While the server runs, a close after flush lingers even when the client
/// has read every reply (a peer whose stack drops read-but-unconsumed data
/// on a reset could still lose them). The shutdown drain, which finds every
/// reply read (the scenario reads them all before it stops the server),
/// closes the other client without lingering and lets the lingering socket
/// go at its first look: it protects nothing a Linux peer keeps, and the
/// stop does not wait for the drain's deadline. (With
/// `release_acknowledged` removed from the drain step, the linger is cut at
/// the deadline instead: (1, 1, 0), and the stop takes the whole grace.)
#[test]
fn a_close_after_flush_lingers_while_running_and_the_drain_lets_it_go_once_all_is_read() {
    let summary = run(&stopped_with_a_linger(9, true)).unwrap_or_else(|f| panic!("{f}"));
    let stats = &summary.stats;
    let got = (stats.lingers, stats.lingers_cut, stats.lingering);
    assert_eq!(got, (1, 0, 0), "{stats}");
    assert_eq!(stats.closed_for(CloseReason::Requested), 1, "{stats}");
    assert_eq!(stats.closed_for(CloseReason::Shutdown), 1, "{stats}");
    assert!(
        summary.shutdown_took < SHUTDOWN_GRACE / 4,
        "the stop waited {:?} for a linger that protects nothing",
        summary.shutdown_took
    );
}

/// A linger whose reply the client has not read (it stopped reading) holds
/// the shutdown drain to its deadline, where it is cut (the other half of
/// the rule above).
#[test]
fn a_linger_with_a_reply_unread_holds_the_drain_to_its_deadline() {
    let summary = run(&stopped_with_a_linger(9, false)).unwrap_or_else(|f| panic!("{f}"));
    let stats = &summary.stats;
    let got = (stats.lingers, stats.lingers_cut, stats.lingering);
    assert_eq!(got, (1, 1, 0), "{stats}");
    assert!(
        summary.shutdown_took >= SHUTDOWN_GRACE,
        "the stop took {:?}, before the deadline",
        summary.shutdown_took
    );
}

/// A fault audit's finding: the drain's forced close of lingering sockets
/// counted `lingers_cut` in the worker's own tally, merged at its next
/// poll, but a worker that found the server stopped (another worker
/// stopped it while this one was still closing the sockets) left without
/// merging, and the final counts lost the cut. The same scenario over many
/// schedules (preemptions after calls, the finer schedule). The client
/// stops reading with its reply unread, so that the drain holds the linger
/// to its deadline.
#[test]
fn a_lingering_socket_cut_by_the_drain_is_counted_on_every_schedule() {
    for seed in 0..u64::from(cases()) * 4 {
        let mut s = stopped_with_a_linger(seed, false);
        s.finer_schedule = seed % 2 == 1;
        s.faults = FaultConfig {
            preempt: 0.5,
            ..FaultConfig::none(seed)
        };
        lingered(&s, (1, 1, 0));
    }
}

/// A client that never closes is let go when the linger time runs out
/// (virtual time: the scenario sleeps past it).
#[test]
fn a_lingering_close_ends_at_the_linger_time() {
    let mut s = closed_after_a_reply(8, false);
    s.finish = false;
    s.ops.push(Op::Sleep { millis: 6000 });
    lingered(&s, (1, 1, 0));
}

/// Found by `lingering_closes_with_benign_faults` with the owner's second
/// look removed (a mark left by an event while the owner read was dropped):
/// a lingering socket kept input that no one read, an edge lost. Kept as a
/// named case for that second look. A schedule found by the simulation
/// drifts when the server's syscalls change (this case was shrunk a third
/// time after the drain's rule changed them); the unit test
/// `an_event_while_the_owner_reads_makes_it_read_again` in
/// `src/server/linger.rs` guards the same look without a schedule.
#[test]
fn regression_an_event_while_the_linger_owner_reads_is_not_lost() {
    let mut s = Scenario::new(10131546266590866742);
    s.workers = 2;
    s.buffer = 64;
    s.max_out = 16;
    s.max_conns = 4;
    s.read_budget = 1;
    s.events_per_wait = 1;
    s.frames = 4;
    s.max_payload = 0;
    s.faults = FaultConfig {
        preempt: 0.3,
        ..FaultConfig::benign(10131546266590866742)
    };
    s.linger_ms = 5;
    let read = |client, max| Op::Read { client, max };
    s.ops = vec![
        Op::Connect,
        Op::Connect,
        Op::Connect,
        Op::Sleep { millis: 1 },
        read(0, 2000),
        read(1, 2000),
        read(2, 2000),
        read(0, 1),
        Op::Write { client: 79, len: 1 },
        Op::ServerClose {
            client: 189,
            after_flush: true,
        },
        read(0, 1),
        read(0, 1),
        read(0, 1),
        read(0, 1),
        Op::Reset { client: 82 },
        read(53, 1),
        Op::Yield { steps: 6 },
    ];
    run(&s).unwrap_or_else(|f| panic!("{f}"));
}

/// Check 8 (queued output within `max_out` plus one turn's replies) could
/// not fail: its bound was `max_out` plus 64 KiB, more than any scenario's
/// whole script, so a server that never paused its reader passed (found by
/// a sim-fidelity audit). Here one client writes its whole script and reads
/// nothing until the end: the server must stop reading it at `max_out`.
/// (With the pause removed from `OutQueue::pause_if_over`, this fails on
/// check 8.)
#[test]
fn a_client_that_writes_everything_before_reading_is_paused() {
    let mut s = Scenario::new(31);
    s.workers = 1;
    s.buffer = 256;
    s.max_out = 16;
    s.read_budget = 16;
    s.frames = 20;
    s.max_payload = 3000;
    s.ops = vec![Op::Connect, Op::Read { client: 0, max: 64 }];
    for _ in 0..40 {
        s.ops.push(Op::Write {
            client: 0,
            len: 4000,
        });
        s.ops.push(Op::Yield { steps: 20 });
    }
    let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
    assert!(summary.stats.reader_pauses > 0, "{}", summary.stats);
}

/// Any idle-timeout close passed the checker once a timeout was set, so a
/// server whose activity mark never moved (closing busy connections a
/// timeout after they opened) passed every scenario (found by a
/// sim-fidelity audit). The kernel now records the longest stretch the
/// server read nothing from each connection, and the close must follow one
/// as long as the timeout. Here the client writes every millisecond under a
/// 5 ms idle timeout: no close. (With `Shared::touch` made a no-op, this
/// fails on check 3.)
#[test]
fn a_busy_connection_is_never_closed_as_idle() {
    let mut s = Scenario::new(32);
    s.idle_timeout_ms = 5;
    s.frames = 24;
    s.max_payload = 16;
    s.finish = false;
    s.ops = vec![Op::Connect, Op::Read { client: 0, max: 64 }];
    for _ in 0..24 {
        s.ops.push(Op::Write { client: 0, len: 8 });
        s.ops.push(Op::Read { client: 0, max: 64 });
        s.ops.push(Op::Sleep { millis: 1 });
    }
    let summary = run(&s).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(
        summary.stats.closed_for(CloseReason::IdleTimeout),
        0,
        "{}",
        summary.stats
    );
}

/// A review finding: a client that stopped reading before its greeting
/// (so the scenario never learnt its id from it) had its connection's
/// EPOLLOUT, armed for the replies piling up in its socket, flagged by
/// check 8's quiescence look as armed with nothing to write. Its id comes
/// from the kernel now.
#[test]
fn a_client_that_stops_reading_before_its_greeting_raises_no_false_alarm() {
    let mut s = Scenario::new(12);
    s.workers = 2;
    s.buffer = 64;
    s.frames = 8;
    s.ops = vec![
        Op::Connect,
        Op::StopReading { client: 0 },
        Op::Write {
            client: 0,
            len: 2000,
        },
        Op::Sleep { millis: 5 },
    ];
    let stats = run(&s).unwrap_or_else(|f| panic!("{f}")).stats;
    assert!(stats.epollout_arms > 0, "the replies never waited: {stats}");
}
