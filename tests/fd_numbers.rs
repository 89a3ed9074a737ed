//! Invariant C on the real kernel, by descriptor number: slots are reused
//! oldest-freed first with a new generation, and a closed slot's number stays
//! open (the placeholder is `dup2`'d over it), so the kernel can never hand it
//! to anything else. Alone in its test binary: it reads `/proc/self/fd`, and
//! another server in the same process would blur the picture.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Client, Tagged, start, wait_until};
use eserver::ConnId;

/// Descriptor numbers of this process, by what they point to.
fn open_fds() -> HashMap<i32, String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// The numbers that share one socket with at least `n - 1` others: the
/// placeholder's, `dup2`'d over every idle slot's number.
fn placeholder_numbers(n: usize) -> HashSet<i32> {
    let fds = open_fds();
    let mut by_target: HashMap<&String, Vec<i32>> = HashMap::new();
    for (fd, target) in &fds {
        if target.starts_with("socket:") {
            by_target.entry(target).or_default().push(*fd);
        }
    }
    by_target
        .into_values()
        .find(|fds| fds.len() >= n)
        .map(|fds| fds.into_iter().collect())
        .unwrap_or_default()
}

#[test]
fn slots_are_reused_fifo_with_a_new_generation_and_numbers_stay_reserved() {
    // One worker keeps accept order equal to connect order.
    let server = start(Tagged, 1, |c| c.max_conns(16));
    let addr = server.local_addr().unwrap();
    let handle = server.handle().clone();

    let clients: Vec<(Client, ConnId)> = (0..5).map(|_| Client::connect_tagged(addr)).collect();
    let ids: Vec<ConnId> = clients.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        ids.iter()
            .map(|id| (id.slot(), id.generation()))
            .collect::<Vec<_>>(),
        [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)],
        "fresh slots, generation 0"
    );

    // Close slots 2, 0, 4, in that order.
    for slot in [2usize, 0, 4] {
        let (client, id) = &clients[slot];
        client.stream.shutdown(std::net::Shutdown::Both).unwrap();
        let id = *id;
        assert!(
            wait_until(Duration::from_secs(5), || !handle.is_open(id)),
            "{id} did not close"
        );
    }

    // The three idle slots' numbers are still open, all on the placeholder
    // (waited for: `is_open` turns false before the number is covered).
    let mut covered = HashSet::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            covered = placeholder_numbers(4);
            covered.len() == 4
        }),
        "the placeholder and the three idle slots' numbers, all on one socket: {covered:?}"
    );
    // (No new descriptor can take one of them while they are open, which
    // the wait above checked: a check of that here could not fail.)

    // New connections take the freed slots oldest first, one generation on.
    let reused: Vec<(Client, ConnId)> = (0..3).map(|_| Client::connect_tagged(addr)).collect();
    assert_eq!(
        reused
            .iter()
            .map(|(_, id)| (id.slot(), id.generation()))
            .collect::<Vec<_>>(),
        [(2, 1), (0, 1), (4, 1)],
        "FIFO reuse with the generation bumped"
    );
    assert!(
        placeholder_numbers(2).is_empty(),
        "the numbers now carry the new connections"
    );
    // And the pool only grows when nothing is free.
    let (_, fresh) = Client::connect_tagged(addr);
    assert_eq!((fresh.slot(), fresh.generation()), (5, 0));

    // Every new connection works.
    for (mut client, id) in reused {
        client.send(format!("hello {id}").as_bytes());
        assert_eq!(client.recv(), format!("hello {id}").as_bytes());
    }
}
