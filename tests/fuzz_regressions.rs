//! The fuzz targets' checks on the stable toolchain: every committed seed
//! (`fuzz/seeds/<target>/`) and every minimised crasher
//! (`fuzz/regressions/<target>/`) replayed through the same function the
//! fuzzer runs (`fuzz/src/targets.rs`, included here).
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            eprintln!("replaying {}", file.display());
            check(&bytes);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no seeds for {target}");
}

#[test]
fn frame_len() {
    replay("frame_len", targets::frame_len);
}

#[test]
fn frame_lines() {
    replay("frame_lines", targets::frame_lines);
}

#[test]
fn codec_roundtrip() {
    replay("codec_roundtrip", targets::codec_roundtrip);
}

#[test]
fn sim_server() {
    replay("sim_server", targets::sim_server);
}

#[test]
fn pubsub_command() {
    replay("pubsub_command", targets::pubsub_command);
}

/// The `sim_server` decoder reaches every kind of step, including the ones
/// drawn last (after everything else, so that older inputs keep their
/// meaning): a decoder that forgot one, or drew it where bytes never last,
/// would fuzz without it.
#[test]
fn sim_server_inputs_reach_every_kind_of_step() {
    use arbitrary::{Arbitrary, Unstructured};
    use eserver::scenario::{DialTarget, Op};
    use eserver::sys::rng::SplitMix64;

    let mut rng = SplitMix64::new(7);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        let len = 64 + rng.below(1024) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let Ok(targets::FuzzScenario(s)) =
            targets::FuzzScenario::arbitrary(&mut Unstructured::new(&bytes))
        else {
            continue;
        };
        for op in &s.ops {
            seen.insert(match op {
                Op::Dial {
                    target: DialTarget::Listening,
                } => "dial listening",
                Op::Dial {
                    target: DialTarget::Closed,
                } => "dial closed",
                Op::Dial {
                    target: DialTarget::Unreachable,
                } => "dial unreachable",
                Op::Answer { refuse: true } => "refuse",
                Op::Answer { refuse: false } => "accept",
                Op::ParkAll { .. } => "park all",
                Op::SetActiveWorkers { .. } => "set active",
                _ => "other",
            });
        }
        if s.faults.preempt > 0.0 {
            seen.insert("preempt");
        }
        if s.faults.futex_early > 0.0 {
            seen.insert("futex early");
        }
        // The settings drawn last (a review found them unchecked here).
        if s.write_interest == eserver::WriteInterest::Registered {
            seen.insert("epollout registered");
        }
        if s.dials_speak_first {
            seen.insert("dials speak first");
        }
        if matches!(s.idle_wait, eserver::IdleWait::Standby { .. }) {
            seen.insert("standby");
        }
        if s.linger_ms > 0 {
            seen.insert("linger");
        }
        if s.finer_schedule {
            seen.insert("finer schedule");
        }
    }
    let all = [
        "dial listening",
        "dial closed",
        "dial unreachable",
        "refuse",
        "accept",
        "park all",
        "set active",
        "other",
        "preempt",
        "futex early",
        "epollout registered",
        "dials speak first",
        "standby",
        "linger",
        "finer schedule",
    ];
    let missing: Vec<_> = all.iter().filter(|k| !seen.contains(*k)).collect();
    assert!(missing.is_empty(), "never decoded: {missing:?}");
}
