//! The ceiling: one single-threaded, level-triggered epoll echo loop per
//! thread, each with its own SO_REUSEPORT listener; raw syscalls, no
//! abstractions, no cross-thread anything. It echoes complete frames
//! straight from the read buffer.
#![allow(unsafe_code)]

use std::net::SocketAddr;

struct Conn {
    buf: Vec<u8>,
    filled: usize,
    /// Echo bytes the kernel did not take yet.
    pending: Vec<u8>,
}

fn check(ret: i32, what: &str) -> i32 {
    if ret < 0 {
        eprintln!("{what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    ret
}

fn listener(addr: SocketAddr) -> i32 {
    let SocketAddr::V4(v4) = addr else {
        eprintln!("IPv4 only");
        std::process::exit(2)
    };
    // SAFETY (whole function): plain socket syscalls on values we own.
    unsafe {
        let fd = check(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0),
            "socket",
        );
        let on: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&on as *const i32).cast(), 4);
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        check(
            libc::bind(
                fd,
                (&sin as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            ),
            "bind",
        );
        check(libc::listen(fd, 4096), "listen");
        fd
    }
}

fn ctl(ep: i32, op: i32, fd: i32, events: u32) {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: `ev` outlives the call.
    unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
}

fn close(conns: &mut [Option<Conn>], fd: i32) {
    conns[fd as usize] = None;
    // SAFETY: we own `fd`.
    unsafe { libc::close(fd) };
}

fn run(addr: SocketAddr) {
    let lfd = listener(addr);
    // SAFETY: epoll_create1 has no preconditions.
    let ep = check(unsafe { libc::epoll_create1(0) }, "epoll_create1");
    ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: `events` is valid for 256 entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, -1) };
        for ev in &events[..n.max(0) as usize] {
            let fd = ev.u64 as i32;
            let bits = ev.events;
            if fd == lfd {
                loop {
                    // SAFETY: no address wanted.
                    let c = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK,
                        )
                    };
                    if c < 0 {
                        break;
                    }
                    let on: libc::c_int = 1;
                    // SAFETY: `on` outlives the call.
                    unsafe {
                        libc::setsockopt(
                            c,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            (&on as *const i32).cast(),
                            4,
                        )
                    };
                    if conns.len() <= c as usize {
                        conns.resize_with(c as usize + 1, || None);
                    }
                    conns[c as usize] = Some(Conn {
                        buf: vec![0; 16 << 10],
                        filled: 0,
                        pending: Vec::new(),
                    });
                    ctl(
                        ep,
                        libc::EPOLL_CTL_ADD,
                        c,
                        (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    );
                }
                continue;
            }
            let Some(conn) = conns.get_mut(fd as usize).and_then(Option::as_mut) else {
                continue;
            };
            if bits & libc::EPOLLOUT as u32 != 0 && !conn.pending.is_empty() {
                // SAFETY: `pending` is valid for its length.
                let w = unsafe {
                    libc::send(
                        fd,
                        conn.pending.as_ptr().cast(),
                        conn.pending.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if w < 0
                    && !matches!(
                        std::io::Error::last_os_error().kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    )
                {
                    // A reset peer: level-triggered, it would be reported
                    // (and this send fail) forever.
                    close(&mut conns, fd);
                    continue;
                }
                if w > 0 {
                    conn.pending.drain(..w as usize);
                }
                if conn.pending.is_empty() {
                    ctl(
                        ep,
                        libc::EPOLL_CTL_MOD,
                        fd,
                        (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    );
                }
                continue;
            }
            if conn.filled == conn.buf.len() {
                let len = conn.buf.len() * 2;
                conn.buf.resize(len, 0);
            }
            let room = conn.buf.len() - conn.filled;
            // SAFETY: the spare part of `buf` is valid for `room` bytes.
            let r = unsafe { libc::recv(fd, conn.buf[conn.filled..].as_mut_ptr().cast(), room, 0) };
            if r == 0
                || (r < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
            {
                close(&mut conns, fd);
                continue;
            }
            if r < 0 {
                continue;
            }
            conn.filled += r as usize;
            let (done, need) = eserver_peers::complete_frames(&conn.buf[..conn.filled]);
            if done > 0 {
                if conn.pending.is_empty() {
                    // SAFETY: `buf[..done]` is valid.
                    let w = unsafe {
                        libc::send(fd, conn.buf.as_ptr().cast(), done, libc::MSG_NOSIGNAL)
                    };
                    let w = w.max(0) as usize;
                    if w < done {
                        conn.pending.extend_from_slice(&conn.buf[w..done]);
                        ctl(
                            ep,
                            libc::EPOLL_CTL_MOD,
                            fd,
                            (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLOUT) as u32,
                        );
                    }
                } else {
                    conn.pending.extend_from_slice(&conn.buf[..done]);
                }
                conn.buf.copy_within(done..conn.filled, 0);
                conn.filled -= done;
            }
            if let Some(need) = need
                && need > conn.buf.len()
            {
                conn.buf.resize(need, 0);
            }
        }
    }
}

fn main() {
    let (addr, threads) = eserver_peers::args();
    let workers: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || run(addr)))
        .collect();
    for w in workers {
        let _ = w.join();
    }
}
