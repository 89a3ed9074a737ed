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
