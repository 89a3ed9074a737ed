//! Out of descriptors: after EMFILE, edge-triggered epoll never announces
//! the connections already pending, which stalls naive servers forever. Here
//! the server must stay quiet (no busy loop) while saturated and serve every
//! waiting client once others leave.
//!
//! Limits are per process, so the server runs in a child: this same test
//! binary, re-run with `ESERVER_EMFILE_CHILD` set, which serves echo with a
//! large pool and then lowers its own soft RLIMIT_NOFILE to a few descriptors
//! above what it has open. The parent plays the clients and measures.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Client, cpu_time};
use eserver::apps::Echo;
use eserver::sys::{LinuxSys, Sys};
use eserver::{Config, Server};

const CHILD: &str = "ESERVER_EMFILE_CHILD";

/// Descriptors the child may open beyond those it has when it starts
/// serving: about a dozen connections fit.
const HEADROOM: u64 = 12;

/// The child: serve, run out of descriptors, serve until stdin closes.
fn child() {
    let config = Config::default()
        .listen("127.0.0.1:0".parse::<SocketAddr>().unwrap())
        .threads(2)
        .max_conns(500);
    let running = Server::bind(config, Echo).unwrap().start().unwrap();
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    LinuxSys::new()
        .set_nofile_soft_limit(open + HEADROOM)
        .unwrap();
    // A marker, found anywhere in a line (libtest prints its own text too).
    println!("\nESERVER_PORT={}", running.local_addr().unwrap().port());
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    let stats = running.stop(Duration::from_secs(2));
    println!("stats {stats}");
}

#[test]
fn after_emfile_the_server_stays_quiet_and_serves_the_waiting_as_others_leave() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let mut server = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "after_emfile_the_server_stays_quiet_and_serves_the_waiting_as_others_leave",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = server.id();
    let mut stdin = server.stdin.take();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    // Bounded: a child that hangs is killed (through its handle, never by a
    // number that could be reused), which ends its output and this test.
    let (exited, status) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(done)) = server.try_wait() {
                let _ = exited.send(done);
                return;
            }
            if std::time::Instant::now() >= deadline {
                let _ = server.kill();
                let _ = exited.send(server.wait().unwrap());
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let port: u16 = loop {
        let line = lines
            .next()
            .expect("the child exited before serving")
            .unwrap();
        if let Some(at) = line.find("ESERVER_PORT=") {
            break line[at + "ESERVER_PORT=".len()..].trim().parse().unwrap();
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    // Far more clients than descriptors: each sends one request.
    let mut clients: Vec<(u32, Client)> = (0..40u32)
        .map(|i| {
            let mut c = Client::connect(addr);
            c.send(&i.to_le_bytes());
            (i, c)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    for (i, mut c) in clients.drain(..) {
        match c.recv_within(Duration::from_millis(50)) {
            Ok(Some(reply)) => {
                assert_eq!(reply, i.to_le_bytes());
                served.push(c);
            }
            Ok(None) => panic!("client {i} was closed"),
            Err(_) => waiting.push((i, c)),
        }
    }
    eprintln!(
        "{} served, {} waiting behind EMFILE",
        served.len(),
        waiting.len()
    );
    assert!(!served.is_empty(), "nothing fit");
    assert!(
        waiting.len() >= 20,
        "the limit did not bite: {} waiting",
        waiting.len()
    );

    // Saturated: no busy loop.
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_time(pid) - before;
    eprintln!("3 s out of descriptors: server CPU {spent:?}");
    assert!(
        spent < Duration::from_millis(300),
        "{spent:?} of CPU while out of descriptors"
    );

    // As clients leave, the waiting ones are served, every one of them.
    while !waiting.is_empty() {
        drop(served.pop().expect("someone to leave"));
        let (i, mut c) = waiting.remove(0);
        match c.recv_within(Duration::from_secs(10)) {
            Ok(Some(reply)) => assert_eq!(reply, i.to_le_bytes(), "client {i}"),
            other => panic!("waiting client {i} was not served after a slot freed: {other:?}"),
        }
        served.push(c);
    }
    drop(served);
    drop(stdin.take());
    for line in lines.map_while(Result::ok) {
        eprintln!("child: {line}");
    }
    let status = status
        .recv_timeout(Duration::from_secs(130))
        .expect("the child's watcher ended without a status");
    assert!(status.success(), "the child: {status}");
}
