//! No allocation per message on the echo hot path: after a warm-up, ten
//! thousand pipelined round trips through an in-process server cost (almost)
//! no heap allocations, counted by a global allocator. The client uses
//! preallocated buffers, so what is counted is the server's.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The only way to count allocations is a global allocator, which is an
// `unsafe impl`; it adds a counter and delegates everything to `System`.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};

use common::start;
use eserver::apps::Echo;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `rounds` batches of `depth` 64-byte frames, each batch echoed back.
fn round_trips(stream: &mut TcpStream, wire: &[u8], reply: &mut [u8], rounds: usize) {
    for _ in 0..rounds {
        stream.write_all(wire).unwrap();
        stream.read_exact(reply).unwrap();
        assert_eq!(reply, wire, "echo not byte-exact");
    }
}

#[test]
fn echo_allocates_nothing_per_message() {
    let server = start(Echo, 2, |c| c);
    let mut stream = TcpStream::connect(server.local_addr().unwrap()).unwrap();
    stream.set_nodelay(true).unwrap();
    let depth = 8;
    let mut wire = Vec::new();
    for i in 0..depth {
        wire.extend_from_slice(&64u32.to_le_bytes());
        wire.extend(std::iter::repeat_n(b'a' + i as u8, 64));
    }
    let mut reply = vec![0u8; wire.len()];
    round_trips(&mut stream, &wire, &mut reply, 500);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let rounds = 1250;
    round_trips(&mut stream, &wire, &mut reply, rounds);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let messages = (rounds * depth) as u64;
    eprintln!("{allocations} allocations for {messages} echoed messages");
    // A handful for anything incidental (a stats merge, a timer), never one
    // per message.
    assert!(
        allocations < messages / 100,
        "{allocations} allocations for {messages} messages"
    );
}
