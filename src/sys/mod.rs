//! The syscall seam: every call the server makes into the kernel.
//!
//! The server is generic over [`Sys`] (static dispatch, so the production
//! build calls `libc` directly). Implementations:
//!
//! - [`LinuxSys`]: the real calls, through `libc` and `socket2`. The only
//!   module (with `core::cell`) where `unsafe` is allowed.
//! - [`sim::SimSys`]: a deterministic in-memory kernel with Linux's epoll,
//!   descriptor and socket semantics, whose threads run one at a time in an
//!   order drawn from a seed.
//! - [`fault::FaultSys`]: wraps either and injects faults from a seed.
//!
//! The trait's surface is shaped for a simulated kernel and a fault injector:
//! errors are bare errno values ([`Errno`]), there are no raw pointers, events
//! are plain values, time is a call ([`Sys::now`]), and every descriptor is a
//! number whose meaning the implementation owns.
//!
//! # Contract (what the server relies on)
//!
//! - Registration is always **edge-triggered** (`EPOLLET`), and a connection's
//!   read interest always includes `EPOLLRDHUP`.
//! - `epoll_modify` re-checks readiness: a descriptor that is ready for the
//!   new interest at the time of the call is reported again.
//! - Every send uses `MSG_NOSIGNAL`: a broken pipe is `EPIPE`, never `SIGPIPE`.
//! - A read that returns fewer bytes than asked drained the socket at that
//!   instant, unless the event that led to it reported a hang-up or urgent
//!   data ([`Readiness::reads_to_end`]); bytes arriving later raise a new
//!   edge. (Linux TCP and Unix stream sockets behave so, except that a read
//!   stops early at urgent data's mark, which EPOLLPRI announces, and a Unix
//!   socket's read stops after a message that passed descriptors
//!   (SCM_RIGHTS), which nothing announces: a local peer that passes
//!   descriptors can strand its own later bytes until it sends more. A
//!   fault injector that shortens reads must report the rest as a new edge,
//!   as a later arrival would.)
//! - [`Sys::accept`] returns descriptors that are non-blocking and
//!   close-on-exec; [`Sys::dup2`] keeps close-on-exec on the target.
//! - [`Sys::placeholder`] returns a descriptor on which reads return 0 and
//!   writes fail with `EPIPE`, without blocking.

pub mod fault;
mod linux;
pub mod rng;
pub mod sim;

use std::fmt;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

pub use linux::{LinuxSys, signals};

/// A descriptor number.
pub type Fd = i32;

/// A raw `errno` value from a failed call.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Resource temporarily unavailable (the same value as EWOULDBLOCK on Linux).
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// Interrupted system call.
    pub const EINTR: Errno = Errno(libc::EINTR);
    /// Too many open files (the process limit).
    pub const EMFILE: Errno = Errno(libc::EMFILE);
    /// Too many open files in the system.
    pub const ENFILE: Errno = Errno(libc::ENFILE);
    /// Connection aborted before accept.
    pub const ECONNABORTED: Errno = Errno(libc::ECONNABORTED);
    /// Connection reset by peer.
    pub const ECONNRESET: Errno = Errno(libc::ECONNRESET);
    /// Broken pipe.
    pub const EPIPE: Errno = Errno(libc::EPIPE);
    /// Bad file descriptor.
    pub const EBADF: Errno = Errno(libc::EBADF);
    /// Device or resource busy (dup2 racing an open on the same number).
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    /// No such file or entry (epoll_ctl on an unregistered descriptor).
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// File exists.
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// Address already in use.
    pub const EADDRINUSE: Errno = Errno(libc::EADDRINUSE);
    /// Operation not supported (TCP options on a Unix socket).
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// No buffer space available.
    pub const ENOBUFS: Errno = Errno(libc::ENOBUFS);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// Connection timed out.
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    /// Connection refused.
    pub const ECONNREFUSED: Errno = Errno(libc::ECONNREFUSED);
    /// Transport endpoint is not connected.
    pub const ENOTCONN: Errno = Errno(libc::ENOTCONN);
    /// Operation canceled (an outbound connection closed before it connected).
    pub const ECANCELED: Errno = Errno(libc::ECANCELED);
    /// File name too long (a Unix socket path past `sun_path`).
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);

    /// Whether the call would have blocked.
    pub fn is_would_block(self) -> bool {
        self.0 == libc::EAGAIN || self.0 == libc::EWOULDBLOCK
    }

    /// The symbolic name, for logs and counters ("EMFILE").
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EAGAIN => "EAGAIN",
            libc::EINTR => "EINTR",
            libc::EMFILE => "EMFILE",
            libc::ENFILE => "ENFILE",
            libc::ECONNABORTED => "ECONNABORTED",
            libc::ECONNRESET => "ECONNRESET",
            libc::EPIPE => "EPIPE",
            libc::EBADF => "EBADF",
            libc::EBUSY => "EBUSY",
            libc::ENOENT => "ENOENT",
            libc::EINVAL => "EINVAL",
            libc::EEXIST => "EEXIST",
            libc::EADDRINUSE => "EADDRINUSE",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ENOBUFS => "ENOBUFS",
            libc::ENOMEM => "ENOMEM",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ENOTCONN => "ENOTCONN",
            libc::EPERM => "EPERM",
            libc::EPROTO => "EPROTO",
            libc::EHOSTUNREACH => "EHOSTUNREACH",
            libc::ENETUNREACH => "ENETUNREACH",
            libc::ECANCELED => "ECANCELED",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
            _ => "errno",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            std::io::Error::from_raw_os_error(self.0),
            self.name()
        )
    }
}

impl std::error::Error for Errno {}

/// A syscall result.
pub type SysResult<T> = Result<T, Errno>;

/// Which file a path names (its device and inode, from `lstat`): a Unix
/// listener's socket file is removed only while its path still names the
/// file bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// Readiness bits reported with an event.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness(u32);

impl Readiness {
    /// Readable (EPOLLIN).
    pub const IN: Readiness = Readiness(libc::EPOLLIN as u32);
    /// Writable (EPOLLOUT).
    pub const OUT: Readiness = Readiness(libc::EPOLLOUT as u32);
    /// The peer shut down its writing side (EPOLLRDHUP).
    pub const RDHUP: Readiness = Readiness(libc::EPOLLRDHUP as u32);
    /// Hang-up (EPOLLHUP).
    pub const HUP: Readiness = Readiness(libc::EPOLLHUP as u32);
    /// Error condition (EPOLLERR).
    pub const ERR: Readiness = Readiness(libc::EPOLLERR as u32);
    /// Urgent data (EPOLLPRI): TCP's `MSG_OOB`, or a Unix socket's.
    pub const PRI: Readiness = Readiness(libc::EPOLLPRI as u32);

    /// No readiness.
    pub const fn empty() -> Self {
        Readiness(0)
    }

    /// The raw epoll bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// From raw epoll bits.
    pub const fn from_bits(bits: u32) -> Self {
        Readiness(bits)
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Readiness) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is set.
    pub const fn intersects(self, other: Readiness) -> bool {
        self.0 & other.0 != 0
    }

    /// Read-side news: data, urgent data, end of stream, hang-up or error.
    pub const fn is_read_side(self) -> bool {
        self.intersects(Readiness(
            Self::IN.0 | Self::PRI.0 | Self::RDHUP.0 | Self::HUP.0 | Self::ERR.0,
        ))
    }

    /// A short read will not mean the socket is drained: the peer hung up
    /// (no edge comes for what is already buffered), or sent urgent data,
    /// at whose mark Linux ends a read early with bytes still queued behind
    /// it. The reader reads on to EAGAIN or end of stream.
    pub const fn reads_to_end(self) -> bool {
        self.is_hang_up() || self.intersects(Self::PRI)
    }

    /// The peer will send no more (or the connection is broken).
    pub const fn is_hang_up(self) -> bool {
        self.intersects(Readiness(Self::RDHUP.0 | Self::HUP.0 | Self::ERR.0))
    }
}

impl std::ops::BitOr for Readiness {
    type Output = Readiness;

    fn bitor(self, rhs: Readiness) -> Readiness {
        Readiness(self.0 | rhs.0)
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::IN, "IN"),
            (Self::OUT, "OUT"),
            (Self::RDHUP, "RDHUP"),
            (Self::HUP, "HUP"),
            (Self::ERR, "ERR"),
            (Self::PRI, "PRI"),
        ];
        let mut first = true;
        for (bit, name) in names {
            if self.contains(bit) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

/// What a registration asks to hear about (always edge-triggered).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Interest {
    /// Readable (and, for connections, peer hang-up and urgent data):
    /// EPOLLIN | EPOLLRDHUP | EPOLLPRI.
    Read,
    /// Readable and writable: EPOLLIN | EPOLLRDHUP | EPOLLPRI | EPOLLOUT.
    ReadWrite,
}

impl Interest {
    /// The epoll bits, without EPOLLET.
    pub const fn readiness(self) -> Readiness {
        match self {
            Interest::Read => Readiness(Readiness::IN.0 | Readiness::RDHUP.0 | Readiness::PRI.0),
            Interest::ReadWrite => Readiness(
                Readiness::IN.0 | Readiness::RDHUP.0 | Readiness::PRI.0 | Readiness::OUT.0,
            ),
        }
    }
}

/// One readiness event: the registration's token and what is ready.
///
/// The same layout as the kernel's `struct epoll_event`, so [`LinuxSys`]
/// fills a caller's array in place.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Event(libc::epoll_event);

impl Event {
    /// An event for `token` with `readiness`.
    pub const fn new(token: u64, readiness: Readiness) -> Self {
        Event(libc::epoll_event {
            events: readiness.0,
            u64: token,
        })
    }

    /// The token given at registration.
    pub fn token(&self) -> u64 {
        // A by-value read of the (packed on x86-64) field; never a reference.
        self.0.u64
    }

    /// What is ready.
    pub fn readiness(&self) -> Readiness {
        Readiness(self.0.events)
    }
}

impl Default for Event {
    fn default() -> Self {
        Event::new(0, Readiness::empty())
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Event({:#x}, {:?})", self.token(), self.readiness())
    }
}

/// Where a server listens.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ListenAddr {
    /// A TCP address (IPv4 or IPv6).
    Tcp(SocketAddr),
    /// A Unix domain stream socket at this path. A stale socket file of
    /// ours there (its server gone) is replaced; anything else is left
    /// alone. Servers starting in one directory take turns, holding an
    /// `flock` on it from that check to `listen`, so that one server's
    /// check does not take another's bound, not yet listening, socket for
    /// a dead one. Where the lock cannot be had (an unreadable directory,
    /// a file system without `flock`, or another process holding it for
    /// over a second), the listener starts without it.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    /// `HOST:PORT` (`127.0.0.1:7878`, `[::1]:7878`) or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, as in unix:/tmp/eserver.sock".to_string());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|e| {
            format!(
                "{s:?} is neither IP:PORT (an address, such as 127.0.0.1:7878 or [::1]:7878; \
                 host names are not looked up) nor unix:PATH ({e})"
            )
        })
    }
}

/// How to set up a listening socket.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ListenOptions {
    /// The accept backlog.
    pub backlog: i32,
    /// Set SO_REUSEPORT, so several processes can share the port.
    pub reuse_port: bool,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            backlog: 1024,
            reuse_port: false,
        }
    }
}

/// Which direction(s) to shut down.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shutdown {
    /// No more reads.
    Read,
    /// No more writes (sends FIN after queued data).
    Write,
    /// Both.
    Both,
}

/// Every syscall the server makes. See the [module docs](self) for the
/// contract implementations keep.
pub trait Sys: Send + Sync + fmt::Debug + 'static {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    fn epoll_create(&self) -> SysResult<Fd>;
    /// `epoll_ctl(EPOLL_CTL_ADD)`, edge-triggered, with `token` as `data.u64`.
    fn epoll_add(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()>;
    /// `epoll_ctl(EPOLL_CTL_MOD)`, edge-triggered; re-checks readiness.
    fn epoll_modify(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()>;
    /// `epoll_ctl(EPOLL_CTL_DEL)`.
    fn epoll_delete(&self, epoll: Fd, fd: Fd) -> SysResult<()>;
    /// `epoll_wait`: fills `events`, returns how many; `None` waits forever.
    fn epoll_wait(
        &self,
        epoll: Fd,
        events: &mut [Event],
        timeout: Option<Duration>,
    ) -> SysResult<usize>;

    /// A non-blocking, close-on-exec listening socket bound to `addr`.
    fn listen(&self, addr: &ListenAddr, options: &ListenOptions) -> SysResult<Fd>;
    /// The address a listening socket is bound to (resolves port 0).
    fn local_addr(&self, fd: Fd) -> SysResult<ListenAddr>;
    /// `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`: a connection and its peer
    /// address (`None` for Unix sockets).
    fn accept(&self, listener: Fd) -> SysResult<(Fd, Option<SocketAddr>)>;
    /// An outbound TCP connection to `addr`: a non-blocking, close-on-exec
    /// socket whose `connect` is started (EINPROGRESS is success; the result
    /// comes later, see [`Sys::connect_status`]). Errors known at once (no
    /// descriptors, no route) are returned here.
    fn connect(&self, addr: SocketAddr) -> SysResult<Fd>;
    /// Where a non-blocking connect stands: `Ok(true)` connected,
    /// `Ok(false)` still in progress, `Err` the connect failed
    /// (`getsockopt(SO_ERROR)`, then `getpeername`).
    fn connect_status(&self, fd: Fd) -> SysResult<bool>;
    /// `recv`: bytes read (0 at end of stream).
    fn recv(&self, fd: Fd, buf: &mut [u8]) -> SysResult<usize>;
    /// `send(MSG_NOSIGNAL)`: bytes written.
    fn send(&self, fd: Fd, buf: &[u8]) -> SysResult<usize>;
    /// `sendmsg(MSG_NOSIGNAL)` of several buffers in order: bytes written.
    fn send_vectored(&self, fd: Fd, bufs: &[IoSlice<'_>]) -> SysResult<usize>;
    /// `shutdown`.
    fn shutdown(&self, fd: Fd, how: Shutdown) -> SysResult<()>;
    /// `ioctl(SIOCOUTQ)`: bytes written to `fd` that the peer has not
    /// acknowledged yet (TCP: what a reset would drop from the send buffer;
    /// a Linux peer keeps what it acknowledged), or not read yet (Unix
    /// sockets, where a close loses nothing queued).
    fn unacked(&self, fd: Fd) -> SysResult<usize>;
    /// `setsockopt(TCP_NODELAY, 1)`; `EOPNOTSUPP` on non-TCP sockets.
    fn set_nodelay(&self, fd: Fd) -> SysResult<()>;

    /// `dup2` (as `dup3(O_CLOEXEC)`): makes `to` refer to `from`'s open file,
    /// releasing what `to` referred to; `dup2(x, x)` does nothing.
    fn dup2(&self, from: Fd, to: Fd) -> SysResult<()>;
    /// `fcntl(F_DUPFD_CLOEXEC, 0)`: a new number, the lowest free, for
    /// `fd`'s open file.
    fn dup(&self, fd: Fd) -> SysResult<Fd>;
    /// `close`.
    fn close(&self, fd: Fd) -> SysResult<()>;
    /// A descriptor that reads as end of stream and fails writes with EPIPE.
    fn placeholder(&self) -> SysResult<Fd>;
    /// The file `path` names now (`lstat`): taken once a Unix listener is
    /// bound and listening, to know its socket file later.
    fn socket_file(&self, path: &std::path::Path) -> SysResult<FileId>;
    /// Removes the socket file a Unix listener was bound to, if `path`
    /// still names `bound`: `Ok(false)` when it names another file (a new
    /// server's, which took the path over) or none, which is left alone.
    fn unlink_socket(&self, path: &std::path::Path, bound: FileId) -> SysResult<bool>;

    /// A non-blocking `eventfd` to wake `epoll_wait`.
    fn eventfd(&self) -> SysResult<Fd>;
    /// Adds one to an eventfd (wakes one waiter).
    fn eventfd_wake(&self, fd: Fd) -> SysResult<()>;
    /// Resets an eventfd's count.
    fn eventfd_drain(&self, fd: Fd) -> SysResult<()>;

    /// `futex(FUTEX_WAIT_PRIVATE)`: sleeps while `word` holds `expected`,
    /// until [`Sys::futex_wake`] on the same word or `timeout` (`None`:
    /// none). Returns at once if the word differs. A wake-up that is not a
    /// `futex_wake` (a signal, a spurious return) is allowed: callers
    /// re-check their condition. Idle workers stand by here (see
    /// `core::standby`) and parked workers park here (`core::parking`):
    /// the server blocks nowhere else outside `epoll_wait`.
    fn futex_wait(
        &self,
        word: &AtomicU32,
        expected: u32,
        timeout: Option<Duration>,
    ) -> SysResult<()>;
    /// `futex(FUTEX_WAKE_PRIVATE)`: wakes up to `n` threads sleeping on
    /// `word`; returns how many it woke.
    fn futex_wake(&self, word: &AtomicU32, n: u32) -> SysResult<usize>;

    /// `getrlimit(RLIMIT_NOFILE)`: (soft, hard).
    fn nofile_limit(&self) -> SysResult<(u64, u64)>;
    /// How many descriptors the process has open now (stdio included).
    fn open_descriptors(&self) -> SysResult<u64>;
    /// `setrlimit(RLIMIT_NOFILE)` with a new soft limit (hard unchanged).
    fn set_nofile_soft_limit(&self, soft: u64) -> SysResult<()>;

    /// A monotonic clock (time since an arbitrary origin).
    fn now(&self) -> Duration;

    /// A seam for fault injectors: reports `fd` ready for `readiness` on
    /// every epoll it is registered with, as a new arrival would (waking a
    /// thread blocked in `epoll_wait`), if it is in fact ready. Returns
    /// whether this kernel can; the real one cannot (the default).
    fn inject_readiness(&self, _fd: Fd, _readiness: Readiness) -> bool {
        false
    }

    /// Called by wrappers (a fault injector) before they decide anything
    /// about a call. A simulated kernel makes the calling thread wait for its
    /// turn here, so decisions drawn from a seed happen in the schedule's
    /// order. The real kernel does nothing.
    fn before_call(&self) {}

    /// Called by wrappers (a fault injector) after `call` returned, to let
    /// other threads run before the caller goes on. A simulated kernel
    /// takes a scheduling point here; the real kernel does nothing (its
    /// scheduler preempts on its own).
    fn preempt(&self, _call: &'static str) {}
}
