//! The server-wide input budget (`Config::max_in_total`) on the real
//! kernel: peers holding large incomplete frames share one bound; the frame
//! that would pass it closes only its own connection; small frames and
//! other connections are untouched; and what a completed frame gives back
//! serves the next one.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Client, frame, start, wait_for_stats};
use eserver::CloseReason;
use eserver::apps::Echo;

const BUDGET: usize = 1 << 20;
const FRAME: usize = 700 << 10;
const SENT: usize = 600 << 10;

/// A payload whose bytes name it, so a reply from the wrong frame or a
/// corrupted one cannot pass.
fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn large_slow_frames_share_one_budget_and_only_the_frame_past_it_is_closed() {
    let server = start(Echo, 2, |mut c| {
        c.max_in_total = BUDGET;
        c
    });
    let addr = server.local_addr().unwrap();
    let handle = server.handle();

    // A holds most of a 700 KiB frame: at least 600 KiB less the uncharged
    // 16 KiB of the budget.
    let big = frame(&payload(1, FRAME));
    let mut a = Client::connect(addr);
    a.send_bytes(&big[..SENT]);
    wait_for_stats(handle, "A's incomplete frame held", |s| {
        s.input_held >= (SENT - (16 << 10)) as u64
    });

    // B's frame of the same size cannot fit beside it: B is closed, after
    // the reply to the whole frame it sent first.
    let mut b = Client::connect(addr);
    let mut bytes = frame(b"answered first");
    bytes.extend_from_slice(&frame(&payload(2, FRAME))[..SENT]);
    // The server may close B before reading all of it.
    let _ = b.stream.write_all(&bytes);
    assert_eq!(b.recv(), b"answered first");
    b.expect_closed();
    wait_for_stats(handle, "B closed for the input budget", |s| {
        s.closed_for(CloseReason::InputBudget) == 1
    });
    // No frame-budget leftovers here: the bound is exact.
    let held = handle.stats().input_held;
    assert!(held <= BUDGET as u64, "{held} bytes held past the budget");

    // Others are served meanwhile.
    let mut c = Client::connect(addr);
    for i in 0..50u8 {
        let small = payload(i, 64 + usize::from(i));
        c.send(&small);
        assert_eq!(c.recv(), small);
    }

    // A completes its frame and gets it back whole; its buffer goes back.
    a.send_bytes(&big[SENT..]);
    assert_eq!(a.recv(), payload(1, FRAME));
    wait_for_stats(handle, "A's buffer given back", |s| s.input_held == 0);

    // The budget A gave back serves a new connection's large frame.
    let mut d = Client::connect(addr);
    let next = frame(&payload(4, FRAME));
    d.send_bytes(&next[..SENT]);
    std::thread::sleep(Duration::from_millis(20));
    d.send_bytes(&next[SENT..]);
    assert_eq!(d.recv(), payload(4, FRAME));

    let stats = handle.stats();
    assert_eq!(
        stats.closed_for(CloseReason::InputBudget),
        1,
        "only B: {stats}"
    );
    assert_eq!(stats.closed_total(), 1, "{stats}");
}

/// With no input budget at all, frames that fit a connection's uncharged
/// 16 KiB are still served whole, however a read cuts them: a 16 KiB frame
/// cut at every point, with a pause between the two writes so the server
/// holds the first part. (A review found one cut in the last 4 KiB that
/// drew on the budget; this is that case on real sockets.)
#[test]
fn frames_within_the_uncharged_16_kib_need_no_budget() {
    let server = start(Echo, 2, |mut c| {
        c.max_in_total = 0;
        c
    });
    let addr = server.local_addr().unwrap();
    let mut client = Client::connect(addr);
    // 16 KiB in all, with the 4-byte header.
    let whole = payload(9, (16 << 10) - 4);
    let bytes = frame(&whole);
    let mut read = 0;
    for cut in (1..bytes.len()).step_by(1021).chain([bytes.len() - 1]) {
        client.send_bytes(&bytes[..cut]);
        // The premise: the server read the first part alone, and holds it.
        read += cut as u64;
        wait_for_stats(server.handle(), "the first part read", |s| {
            s.bytes_in == read
        });
        client.send_bytes(&bytes[cut..]);
        read += (bytes.len() - cut) as u64;
        assert_eq!(client.recv(), whole, "cut at {cut}");
    }
    let stats = server.handle().stats();
    assert_eq!(stats.closed_total(), 0, "{stats}");
}

/// A long line followed by the first byte of the next: once the long line
/// is answered, its buffer's charge comes back though the next line is
/// still incomplete (kept, the budget would lose a long line's worth for
/// every peer that does this once and stalls), and a second peer can use
/// all of it. Lines, because a line's length is not known ahead: the read
/// that ends one is offered room past it, so the next line's first bytes
/// land in the same buffer (a length-prefixed frame's last read is offered
/// exactly its rest).
#[test]
fn the_first_bytes_of_the_next_line_do_not_keep_the_last_ones_charge() {
    use std::io::{BufRead, BufReader};
    const LINE: usize = 700 << 10;
    const LARGER: usize = 900 << 10;
    let server = start(Echo, 2, |mut c| {
        c.max_in_total = BUDGET;
        c.framing(eserver::Framing::from_name("lines", 1 << 20).unwrap())
    });
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    // Letters only: no byte of a payload is a newline.
    let line = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| b'a' + (i as u8).wrapping_add(seed) % 26)
            .collect()
    };
    let read_line = |stream: &std::net::TcpStream| -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        BufReader::new(stream).read_until(b'\n', &mut got).unwrap();
        assert_eq!(got.pop(), Some(b'\n'), "no whole line");
        got
    };
    let mut a = std::net::TcpStream::connect(addr).unwrap();
    let mut bytes = line(3, LINE);
    bytes.extend_from_slice(b"\nx"); // and the next line's first byte
    a.write_all(&bytes).unwrap();
    assert_eq!(read_line(&a), line(3, LINE));
    wait_for_stats(handle, "A's charge given back", |s| s.input_held == 0);

    // B's 900 KiB line fits beside A's stalled byte only if A's buffer
    // (at least 700 KiB) was given back: 1 MiB in all.
    let mut b = std::net::TcpStream::connect(addr).unwrap();
    let mut bytes = line(4, LARGER);
    bytes.push(b'\n');
    b.write_all(&bytes).unwrap();
    assert_eq!(read_line(&b), line(4, LARGER));
    let stats = handle.stats();
    assert_eq!(stats.closed_total(), 0, "{stats}");
}
