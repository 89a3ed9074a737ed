//! The same echo over a Unix domain socket and over IPv6 loopback, and the
//! Unix listener's care with files that are already at its path.
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use common::{Client, frame};
use eserver::apps::Echo;
use eserver::sys::fault::{FaultConfig, FaultSys};
use eserver::{Config, ListenAddr, Server, StartError};

fn unix_echo(path: &Path) {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    for len in [0usize, 1, 1000, 65536] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        stream.write_all(&frame(&payload)).unwrap();
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).unwrap();
        assert_eq!(u32::from_le_bytes(header) as usize, len);
        let mut got = vec![0u8; len];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(got, payload);
    }
}

#[test]
fn echo_over_a_unix_socket_and_the_file_is_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eserver.sock");
    let config = Config::default()
        .listen(ListenAddr::Unix(path.clone()))
        .threads(2);
    let server = Server::bind(config, Echo).unwrap().start().unwrap();
    unix_echo(&path);
    server.stop(std::time::Duration::from_secs(2));
    assert!(
        !path.exists(),
        "the socket file is removed when the server stops"
    );
}

/// An audit finding: at shutdown the socket file was removed after the
/// listener had closed, whatever the path named by then. A new server
/// started meanwhile (which finds the path's socket dead, removes it and
/// binds its own) lost its file to the old server's cleanup. The file is
/// now removed only while the path still names the one bound, and before
/// the listener closes (a new server then finds it live, not stale).
#[test]
fn a_socket_file_taken_over_by_another_server_is_left_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eserver.sock");
    let config = Config::default()
        .listen(ListenAddr::Unix(path.clone()))
        .threads(1);
    let server = Server::bind(config, Echo).unwrap().start().unwrap();
    unix_echo(&path);
    // Another server takes the path over (bound elsewhere and renamed onto
    // it: the same result as removing the file and binding, in one step).
    let elsewhere = dir.path().join("new.sock");
    let newcomer = UnixListener::bind(&elsewhere).unwrap();
    std::fs::rename(&elsewhere, &path).unwrap();
    server.stop(std::time::Duration::from_secs(2));
    assert!(path.exists(), "the new server's socket file was removed");
    let _client = UnixStream::connect(&path).unwrap();
    newcomer.set_nonblocking(true).unwrap();
    assert!(
        newcomer.accept().is_ok(),
        "the path still leads to the new server"
    );
}

#[test]
fn a_stale_socket_file_of_ours_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    // A listener that died without cleaning up leaves its file behind.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let config = Config::default()
        .listen(ListenAddr::Unix(path.clone()))
        .threads(1);
    let server = Server::bind(config, Echo).unwrap().start().unwrap();
    unix_echo(&path);
    drop(server);
}

#[test]
fn anything_else_at_the_path_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file.
    let file = dir.path().join("data.txt");
    std::fs::write(&file, b"precious").unwrap();
    let err = Server::bind(
        Config::default()
            .listen(ListenAddr::Unix(file.clone()))
            .threads(1),
        Echo,
    )
    .unwrap_err();
    assert!(matches!(err, StartError::Listen { .. }), "{err}");
    assert!(err.to_string().contains("left alone"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    // A live socket.
    let live = dir.path().join("live.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    let err = Server::bind(
        Config::default()
            .listen(ListenAddr::Unix(live.clone()))
            .threads(1),
        Echo,
    )
    .unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    assert!(
        UnixStream::connect(&live).is_ok(),
        "the live socket still works"
    );
}

/// An audit's finding: a path too long for a Unix socket address was
/// reported as "Input/output error (EIO)", the code for a failure nobody
/// could name.
#[test]
fn a_unix_path_too_long_for_a_socket_is_named_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x".repeat(120));
    let err = Server::bind(
        Config::default().listen(ListenAddr::Unix(path)).threads(1),
        Echo,
    )
    .unwrap_err();
    assert!(err.to_string().contains("ENAMETOOLONG"), "{err}");
}

/// An audit's finding: a start that failed after binding a Unix listener
/// (a later listener's port was taken) left the socket file behind, where
/// clients met ECONNREFUSED until the next start took it for stale.
#[test]
fn a_failed_start_removes_the_socket_file_it_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eserver.sock");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = Config::default().threads(1);
    config.listen = vec![
        ListenAddr::Unix(path.clone()),
        ListenAddr::Tcp(taken.local_addr().unwrap()),
    ];
    let err = Server::bind(config, Echo).unwrap_err();
    assert!(err.to_string().contains("EADDRINUSE"), "{err}");
    assert!(!path.exists(), "the socket file was left behind");
}

#[test]
fn echo_over_ipv6_loopback_where_available() {
    let any_v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 0));
    if TcpListener::bind(any_v6).is_err() {
        eprintln!("no IPv6 loopback on this machine: the IPv6 echo check has nothing to run on");
        return;
    }
    let config = Config::default().listen(any_v6).threads(2);
    let server = Server::bind(config, Echo).unwrap().start().unwrap();
    let addr = server.local_addr().unwrap();
    assert!(addr.is_ipv6());
    let mut client = Client::from_stream(TcpStream::connect(addr).unwrap());
    for i in 0..100u32 {
        client.send(&i.to_be_bytes());
        assert_eq!(client.recv(), i.to_be_bytes());
    }
}

/// A server of ours part way through starting, as the race below needs
/// one: it holds its directory's startup lock, and its socket is bound but
/// does not listen yet (so it refuses connections, as a dead one would).
struct Starting {
    socket: socket2::Socket,
    lock: std::fs::File,
}

impl Starting {
    // `File::lock` would need Rust 1.89; the crate supports 1.85.
    #[allow(unsafe_code)]
    fn at(path: &Path) -> Starting {
        use std::os::fd::AsRawFd;
        let lock = std::fs::File::open(path.parent().unwrap()).unwrap();
        // SAFETY: an open descriptor, no pointers.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(locked, 0);
        let socket =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&socket2::SockAddr::unix(path).unwrap())
            .unwrap();
        Starting { socket, lock }
    }

    /// Listens, and lets the next server in the directory start.
    fn listen(self) -> socket2::Socket {
        self.socket.listen(16).unwrap();
        drop(self.lock);
        self.socket
    }
}

/// The race below, made certain: a server starts while another is between
/// its `bind` and its `listen`. It must wait its turn, then find the path
/// in use, and leave the other's file. Without the startup lock it took
/// the other's socket for a dead one, removed its file and started.
#[test]
fn a_server_part_way_through_starting_is_not_taken_for_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eserver.sock");
    let other = Starting::at(&path);
    let config = Config::default()
        .listen(ListenAddr::Unix(path.clone()))
        .threads(1);
    // Told when the racer's `listen` call begins (its lock, stale check,
    // bind and listen are that one call).
    let (at_listen, reached) = std::sync::mpsc::channel();
    let at_listen = std::sync::Mutex::new(at_listen);
    let hook = move |call: &'static str| {
        if call == "listen" {
            let _ = at_listen.lock().unwrap().send(());
        }
    };
    let sys = FaultSys::new(eserver::LinuxSys::new(), FaultConfig::none(1))
        .with_entry_hook(std::sync::Arc::new(hook));
    let racer = std::thread::spawn(move || Server::with_sys(sys, config, Echo).map(drop));
    reached
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    // Long enough for the racer to reach the lock (well within its
    // patience of 1 s, after which it would start without the lock).
    std::thread::sleep(std::time::Duration::from_millis(100));
    let other = other.listen();
    match racer.join().unwrap() {
        Err(StartError::Listen { errno, .. }) => assert_eq!(errno, eserver::sys::Errno::EADDRINUSE),
        Err(e) => panic!("{e}"),
        Ok(()) => panic!("both servers started"),
    }
    let _client = UnixStream::connect(&path).unwrap();
    other.set_nonblocking(true).unwrap();
    assert!(other.accept().is_ok(), "the path leads to the other server");
}

/// The wait for another server's start is bounded, and a lock held past
/// it does not stop the start: any process that can read the directory
/// can lock it (a review finding on the first version, which refused to
/// start after the wait).
#[test]
fn a_startup_lock_held_too_long_does_not_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eserver.sock");
    let _held = Starting::at(&dir.path().join("other.sock"));
    let started = std::time::Instant::now();
    let server = Server::bind(
        Config::default()
            .listen(ListenAddr::Unix(path.clone()))
            .threads(1),
        Echo,
    )
    .unwrap()
    .start()
    .unwrap();
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "did not wait for the lock"
    );
    unix_echo(&path);
    drop(server);
}

/// The stale check's probe does not block: a live server whose backlog
/// is full (busy, not dead) used to hold it in `connect` indefinitely,
/// and now the startup lock with it. It is reported in use at once.
#[test]
fn a_live_server_with_a_full_backlog_is_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sock");
    let busy = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    busy.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
    busy.listen(0).unwrap();
    // Fill the backlog: connect until the kernel refuses to queue more.
    let mut queued = Vec::new();
    loop {
        let client =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        client.set_nonblocking(true).unwrap();
        match client.connect(&socket2::SockAddr::unix(&path).unwrap()) {
            Ok(()) => queued.push(client),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(queued.len() < 1000, "the backlog never filled");
    }
    let (done, outcome) = std::sync::mpsc::channel();
    let config = Config::default()
        .listen(ListenAddr::Unix(path.clone()))
        .threads(1);
    std::thread::spawn(move || {
        let _ = done.send(Server::bind(config, Echo).map(drop));
    });
    match outcome.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(Err(StartError::Listen { errno, .. })) => {
            assert_eq!(errno, eserver::sys::Errno::EADDRINUSE)
        }
        Ok(Err(e)) => panic!("{e}"),
        Ok(Ok(())) => panic!("started over a live server"),
        Err(_) => panic!("the stale check is stuck connecting to a busy server"),
    }
}

/// An audit finding: two servers starting at once on one path could both
/// start. Between one's `bind` and its `listen`, the other's stale check
/// connects, is refused (a bound socket that does not listen yet refuses
/// like a dead one), removes the file and binds its own. The first then
/// listens on a socket no client can reach. Of two servers racing for a
/// path, exactly one must start, and the path must lead to it.
///
/// Without the lock this failed once in 1,100 to 4,000 rounds here; the
/// default 2,000 rounds keep `cargo test` short, so the test above is the
/// one certain to catch it. Deep runs: `ESERVER_RACE_ROUNDS=200000`.
#[test]
fn of_two_servers_starting_at_once_on_one_path_one_starts_and_the_path_leads_to_it() {
    use eserver::Sys;
    use eserver::sys::ListenOptions;
    use std::sync::{Arc, Barrier};

    let dir = tempfile::tempdir().unwrap();
    let rounds: usize = std::env::var("ESERVER_RACE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let mut both = 0;
    for round in 0..rounds {
        let path = dir.path().join(format!("race{round}.sock"));
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let sys = eserver::LinuxSys::new();
                    barrier.wait();
                    sys.listen(&ListenAddr::Unix(path), &ListenOptions::default())
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        let started: Vec<i32> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        for result in &results {
            if let Err(errno) = result {
                assert_eq!(*errno, eserver::sys::Errno::EADDRINUSE, "round {round}");
            }
        }
        let sys = eserver::LinuxSys::new();
        if started.len() == 2 {
            both += 1;
        } else {
            assert_eq!(started.len(), 1, "round {round}: neither started");
            // The path leads to the one that started.
            let _client = UnixStream::connect(&path).unwrap();
            let accepted = sys.accept(started[0]);
            match accepted {
                Ok((fd, _)) => sys.close(fd).unwrap(),
                Err(errno) => panic!("round {round}: unreachable: {results:?} {errno}"),
            }
        }
        for fd in started {
            sys.close(fd).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
    }
    assert_eq!(both, 0, "both servers started in {both} of {rounds} rounds");
}
