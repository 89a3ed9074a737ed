//! [`LinuxSys`]: the real kernel, through `libc` and `socket2`.
//!
//! Every call goes through [`cvt`], which turns libc's `-1`-and-`errno`
//! convention into a [`SysResult`]; each `unsafe` block states why the call is
//! sound. Nothing here retries or interprets errors: that is the event loop's
//! job, so that a fault injector wrapped around this type sees every call.
//! The one exception is a Unix listener's start, a sequence of calls made
//! under a lock (see `StartupLock`), which waits a bounded time for it.
#![allow(unsafe_code)]

pub mod signals;

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, SockAddrStorage, Socket, Type};

use super::{
    Errno, Event, Fd, FileId, Interest, ListenAddr, ListenOptions, Shutdown, Sys, SysResult,
};

/// The last `errno` of this thread.
fn errno() -> Errno {
    Errno(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// libc's `-1` + `errno` convention to a result.
fn cvt<T: PartialOrd + Default>(ret: T) -> SysResult<T> {
    if ret < T::default() {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// The errno of a failed call; an error made in user space (socket2's
/// checks of an address, say) has none: EINVAL if it was about the
/// argument, EIO otherwise.
fn io_errno(error: std::io::Error) -> Errno {
    match error.raw_os_error() {
        Some(errno) => Errno(errno),
        None if error.kind() == std::io::ErrorKind::InvalidInput => Errno::EINVAL,
        None => Errno(libc::EIO),
    }
}

/// The longest path a Unix socket address holds (`sun_path`, less its NUL).
const MAX_UNIX_PATH: usize = 107;

/// A socket view of `fd` that never closes it: EBADF for a negative number
/// (which `from_raw_fd` must not be given).
fn borrowed_socket(fd: Fd) -> SysResult<std::mem::ManuallyDrop<Socket>> {
    if fd < 0 {
        return Err(Errno::EBADF);
    }
    // SAFETY: `fd` is not -1 (`OwnedFd`'s one forbidden value); the view is
    // used for calls on that number only, and `ManuallyDrop` guarantees we
    // never close a descriptor we do not own. An fd that is not open or not
    // a socket makes those calls fail (EBADF, ENOTSOCK).
    Ok(std::mem::ManuallyDrop::new(unsafe {
        Socket::from_raw_fd(fd)
    }))
}

/// The real kernel. Cheap to copy around; holds only the clock's origin.
#[derive(Debug, Clone, Copy)]
pub struct LinuxSys {
    origin: Instant,
}

impl LinuxSys {
    /// The real kernel.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    fn epoll_ctl(
        &self,
        epoll: Fd,
        op: i32,
        fd: Fd,
        interest: Option<Interest>,
        token: u64,
    ) -> SysResult<()> {
        let mut event = libc::epoll_event {
            events: interest.map_or(0, |i| i.readiness().bits() | libc::EPOLLET as u32),
            u64: token,
        };
        // SAFETY: `event` is a valid, initialised epoll_event that outlives
        // the call; the kernel only reads it (and ignores it for DEL).
        cvt(unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) }).map(drop)
    }

    fn listen_unix(&self, path: &Path, options: &ListenOptions) -> SysResult<Fd> {
        // Held until the socket listens: see `StartupLock`.
        // Say what is wrong with a path no socket address can hold, before
        // socket2 refuses it without an errno.
        if path.as_os_str().len() > MAX_UNIX_PATH {
            return Err(Errno::ENAMETOOLONG);
        }
        let _startup = StartupLock::take(path);
        remove_stale_socket(path)?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)
            .map_err(io_errno)?;
        let addr = SockAddr::unix(path).map_err(io_errno)?;
        socket.bind(&addr).map_err(io_errno)?;
        socket.listen(options.backlog).map_err(io_errno)?;
        Ok(socket.into_raw_fd())
    }

    fn listen_tcp(&self, addr: SocketAddr, options: &ListenOptions) -> SysResult<Fd> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(socket2::Protocol::TCP),
        )
        .map_err(io_errno)?;
        socket.set_reuse_address(true).map_err(io_errno)?;
        if options.reuse_port {
            socket.set_reuse_port(true).map_err(io_errno)?;
        }
        if addr.is_ipv6() {
            // An explicit [::] listener should not silently also take IPv4.
            socket.set_only_v6(true).map_err(io_errno)?;
        }
        socket.bind(&addr.into()).map_err(io_errno)?;
        socket.listen(options.backlog).map_err(io_errno)?;
        Ok(socket.into_raw_fd())
    }
}

impl Default for LinuxSys {
    fn default() -> Self {
        Self::new()
    }
}

/// Serialises the start of Unix listeners in one directory: a lock
/// (`flock`) on the directory, held from the stale check to `listen`.
///
/// A socket that is bound but does not listen yet refuses connections,
/// just as a dead server's socket does. Without the lock, a server whose
/// stale check fell between another's `bind` and `listen` removed the
/// other's file and bound its own, and both started: one of them on a
/// socket no client could reach. Under the lock, a refused connection
/// means no server of ours is part way through starting on that path.
///
/// The lock is advisory: it orders eserver processes, not programs that
/// ignore it. Where it cannot be had, the listener starts without it, as
/// it did before the lock existed: the directory cannot be opened (no
/// read permission) or locked (a file system without `flock`), or the
/// lock is held past [`StartupLock::PATIENCE`]. Any process that can read
/// the directory can lock it, so a lock held that long is not taken for
/// a reason to refuse the start; it is logged.
struct StartupLock {
    /// Closing it releases the lock.
    _dir: Option<OwnedFd>,
}

impl StartupLock {
    /// How long to wait for another server to finish starting. Starting
    /// takes microseconds (nothing under the lock blocks); a lock held
    /// longer belongs to something else.
    const PATIENCE: Duration = Duration::from_secs(1);

    fn take(path: &Path) -> StartupLock {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let Ok(file) = std::fs::File::open(dir) else {
            return StartupLock { _dir: None };
        };
        let fd = OwnedFd::from(file);
        let deadline = Instant::now() + Self::PATIENCE;
        // Short at first: the holder is usually another server a few
        // microseconds from `listen`.
        let mut pause = Duration::from_micros(10);
        loop {
            // SAFETY: `fd` is an open descriptor owned here; flock takes no
            // pointers.
            match cvt(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
                Ok(_) => return StartupLock { _dir: Some(fd) },
                Err(errno) if errno.is_would_block() || errno == Errno::EINTR => {
                    if Instant::now() >= deadline {
                        log::warn!(
                            "{}: another process has held an flock on this directory for over {:?}; starting the Unix listener {} without it",
                            dir.display(),
                            Self::PATIENCE,
                            path.display()
                        );
                        return StartupLock { _dir: None };
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(1));
                }
                Err(_) => return StartupLock { _dir: None },
            }
        }
    }
}

/// Removes a socket file left behind by a dead server of ours; refuses to
/// touch anything else (a live socket, another user's socket, a regular file).
fn remove_stale_socket(path: &Path) -> SysResult<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_errno(e)),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if !meta.file_type().is_socket() || meta.uid() != uid {
        return Err(Errno::EEXIST);
    }
    // Non-blocking: a live server whose backlog is full would hold a
    // blocking connect (and the startup lock with it) indefinitely.
    let probe =
        Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None).map_err(io_errno)?;
    let addr = SockAddr::unix(path).map_err(io_errno)?;
    match probe.connect(&addr) {
        Ok(()) => Err(Errno::EADDRINUSE),
        // Listening, with a full backlog.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(Errno::EADDRINUSE),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path).map_err(io_errno)
        }
        Err(e) => Err(io_errno(e)),
    }
}

impl Sys for LinuxSys {
    fn epoll_create(&self) -> SysResult<Fd> {
        // SAFETY: no pointers; the flag is valid for epoll_create1.
        cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
    }

    fn epoll_add(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()> {
        self.epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, Some(interest), token)
    }

    fn epoll_modify(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()> {
        self.epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, Some(interest), token)
    }

    fn epoll_delete(&self, epoll: Fd, fd: Fd) -> SysResult<()> {
        self.epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, None, 0)
    }

    fn epoll_wait(
        &self,
        epoll: Fd,
        events: &mut [Event],
        timeout: Option<Duration>,
    ) -> SysResult<usize> {
        let timeout_ms = match timeout {
            None => -1,
            // Round up, so a 0.5 ms deadline does not become a busy poll.
            Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
        };
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: `Event` is `repr(transparent)` over `libc::epoll_event`, so
        // the pointer is to `events.len()` valid, writable epoll_events; the
        // kernel writes at most `max` of them.
        let n =
            cvt(unsafe { libc::epoll_wait(epoll, events.as_mut_ptr().cast(), max, timeout_ms) })?;
        Ok(n as usize)
    }

    fn listen(&self, addr: &ListenAddr, options: &ListenOptions) -> SysResult<Fd> {
        match addr {
            ListenAddr::Tcp(addr) => self.listen_tcp(*addr, options),
            ListenAddr::Unix(path) => self.listen_unix(path, options),
        }
    }

    fn local_addr(&self, fd: Fd) -> SysResult<ListenAddr> {
        let socket = borrowed_socket(fd)?;
        let addr = socket.local_addr().map_err(io_errno)?;
        if let Some(inet) = addr.as_socket() {
            return Ok(ListenAddr::Tcp(inet));
        }
        match addr.as_pathname() {
            Some(path) => Ok(ListenAddr::Unix(path.to_path_buf())),
            None => Err(Errno::EINVAL),
        }
    }

    fn accept(&self, listener: Fd) -> SysResult<(Fd, Option<SocketAddr>)> {
        let mut storage = SockAddrStorage::zeroed();
        let mut len = storage.size_of();
        // SAFETY: `storage` is a zeroed sockaddr_storage that outlives the
        // call and `len` is its size; the kernel writes at most `len` bytes
        // into it and the actual length into `len`.
        let fd = cvt(unsafe {
            libc::accept4(
                listener,
                storage.view_as::<libc::sockaddr>(),
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: the kernel initialised `len` bytes of `storage` as a
        // socket address of the listener's family.
        let addr = unsafe { SockAddr::new(storage, len) };
        Ok((fd, addr.as_socket()))
    }

    fn connect(&self, addr: SocketAddr) -> SysResult<Fd> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(socket2::Protocol::TCP),
        )
        .map_err(io_errno)?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(io_errno(e)),
        }
        Ok(socket.into_raw_fd())
    }

    fn connect_status(&self, fd: Fd) -> SysResult<bool> {
        let socket = borrowed_socket(fd)?;
        if let Some(error) = socket.take_error().map_err(io_errno)? {
            return Err(io_errno(error));
        }
        match socket.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
            Err(e) => Err(io_errno(e)),
        }
    }

    fn unacked(&self, fd: Fd) -> SysResult<usize> {
        let mut bytes: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer,
        // which is valid for the call.
        cvt(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut bytes as *mut libc::c_int) })?;
        Ok(usize::try_from(bytes).unwrap_or(0))
    }

    fn recv(&self, fd: Fd, buf: &mut [u8]) -> SysResult<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the
        // duration of the call.
        let n = cvt(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })?;
        Ok(n as usize)
    }

    fn send(&self, fd: Fd, buf: &[u8]) -> SysResult<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the
        // duration of the call.
        let n = cvt(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) })?;
        Ok(n as usize)
    }

    fn send_vectored(&self, fd: Fd, bufs: &[IoSlice<'_>]) -> SysResult<usize> {
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        // `IoSlice` is documented to be ABI-compatible with `iovec` on Unix.
        msg.msg_iov = bufs.as_ptr().cast_mut().cast();
        msg.msg_iovlen = bufs.len();
        // SAFETY: `msg` points at `bufs.len()` iovecs that borrow live
        // buffers for the duration of the call; the kernel only reads them.
        let n = cvt(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) })?;
        Ok(n as usize)
    }

    fn shutdown(&self, fd: Fd, how: Shutdown) -> SysResult<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: no pointers.
        cvt(unsafe { libc::shutdown(fd, how) }).map(drop)
    }

    fn set_nodelay(&self, fd: Fd) -> SysResult<()> {
        let on: libc::c_int = 1;
        // SAFETY: `on` is a valid c_int for the duration of the call and the
        // length passed is its size.
        cvt(unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    fn dup2(&self, from: Fd, to: Fd) -> SysResult<()> {
        if from == to {
            // dup3 rejects equal numbers; dup2's answer is "nothing to do"
            // for an open one, EBADF otherwise.
            // SAFETY: no pointers; F_GETFD only reads the descriptor flags.
            return cvt(unsafe { libc::fcntl(from, libc::F_GETFD) }).map(drop);
        }
        // SAFETY: no pointers; dup3 atomically replaces `to`.
        cvt(unsafe { libc::dup3(from, to, libc::O_CLOEXEC) }).map(drop)
    }

    fn dup(&self, fd: Fd) -> SysResult<Fd> {
        // SAFETY: no pointers; F_DUPFD_CLOEXEC takes an integer argument.
        cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
    }

    fn close(&self, fd: Fd) -> SysResult<()> {
        // SAFETY: no pointers. On Linux the number is released even when
        // close reports EINTR, so callers must never retry.
        cvt(unsafe { libc::close(fd) }).map(drop)
    }

    fn placeholder(&self) -> SysResult<Fd> {
        let mut fds = [-1; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // With the peer gone, reads see end of stream and writes get EPIPE.
        // SAFETY: `fds[1]` was just created and is owned here only.
        drop(unsafe { OwnedFd::from_raw_fd(fds[1]) });
        Ok(fds[0])
    }

    fn socket_file(&self, path: &Path) -> SysResult<FileId> {
        let meta = std::fs::symlink_metadata(path).map_err(io_errno)?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    fn unlink_socket(&self, path: &Path, bound: FileId) -> SysResult<bool> {
        // A new server can take the path over only once the listener is
        // closed (it refuses a live socket); the caller removes the file
        // first, so the check and the removal cannot be split by one.
        match self.socket_file(path) {
            Ok(now) if now == bound => std::fs::remove_file(path).map(|()| true).map_err(io_errno),
            Ok(_) => Ok(false),
            Err(errno) if errno == Errno::ENOENT => Ok(false),
            Err(errno) => Err(errno),
        }
    }

    fn eventfd(&self) -> SysResult<Fd> {
        // SAFETY: no pointers.
        cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
    }

    fn eventfd_wake(&self, fd: Fd) -> SysResult<()> {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which outlives the call.
        cvt(unsafe { libc::write(fd, (&one as *const u64).cast(), 8) }).map(drop)
    }

    fn eventfd_drain(&self, fd: Fd) -> SysResult<()> {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into `count`, which outlives the call.
        match cvt(unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) }) {
            Ok(_) => Ok(()),
            Err(e) if e.is_would_block() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn futex_wait(
        &self,
        word: &AtomicU32,
        expected: u32,
        timeout: Option<Duration>,
    ) -> SysResult<()> {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(t.subsec_nanos()),
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |ts| ts as *const libc::timespec);
        // SAFETY: `word` is a live, aligned 32-bit atomic for the whole call
        // (the kernel only reads it); `ts_ptr` is null or points to `ts`,
        // which outlives the call (FUTEX_WAIT reads a relative timeout). The
        // other arguments are unused by FUTEX_WAIT.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                expected,
                ts_ptr,
                std::ptr::null::<u32>(),
                0u32,
            )
        };
        match cvt(r) {
            Ok(_) => Ok(()),
            // The word changed before the sleep, the timeout passed, or a
            // signal arrived: all are returns the caller re-checks.
            Err(e) if e == Errno::EAGAIN || e == Errno::ETIMEDOUT || e == Errno::EINTR => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn futex_wake(&self, word: &AtomicU32, n: u32) -> SysResult<usize> {
        let n = i32::try_from(n).unwrap_or(i32::MAX);
        // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE does not
        // dereference the unused arguments.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                n,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0u32,
            )
        };
        // Non-negative after `cvt`, and at most `n`.
        cvt(r).map(|woken| usize::try_from(woken).unwrap_or(0))
    }

    fn open_descriptors(&self) -> SysResult<u64> {
        // The directory's own descriptor is among the entries it lists.
        let entries = std::fs::read_dir("/proc/self/fd").map_err(io_errno)?;
        Ok((entries.count() as u64).saturating_sub(1))
    }

    fn nofile_limit(&self) -> SysResult<(u64, u64)> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit the kernel writes.
        cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
        Ok((limit.rlim_cur, limit.rlim_max))
    }

    fn set_nofile_soft_limit(&self, soft: u64) -> SysResult<()> {
        let (_, hard) = self.nofile_limit()?;
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `limit` is a valid rlimit the kernel reads.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }).map(drop)
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}
