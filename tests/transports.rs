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
