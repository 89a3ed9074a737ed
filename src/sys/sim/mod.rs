//! [`SimSys`]: a deterministic in-memory kernel, and the clients that talk to
//! the server through it.
//!
//! The server runs unchanged on it (it is just another [`Sys`]): its workers
//! are real threads, but [`sched`] lets one run at a time and switches at
//! every syscall in an order drawn from a seed, so a failing run replays
//! exactly from its seed. [`kernel`] holds the descriptors, sockets and epoll
//! with Linux's semantics (see its docs); `tests/conformance.rs` checks every
//! behaviour the server relies on against the real kernel and this one.
//!
//! A test drives the simulated clients from its own thread (the *driver*),
//! which takes part in the schedule like a worker: every client operation is
//! a scheduling point too.
//!
//! ```
//! use eserver::sys::sim::{SimConfig, SimSys};
//! use eserver::sys::{Interest, Sys};
//!
//! let sim = SimSys::new(SimConfig::default());
//! sim.attach();
//! let listener = sim.listen(&"127.0.0.1:0".parse().unwrap(), &Default::default()).unwrap();
//! let addr = sim.local_addr(listener).unwrap();
//! let epoll = sim.epoll_create().unwrap();
//! sim.epoll_add(epoll, listener, Interest::Read, 7).unwrap();
//! let client = sim.connect(&addr).unwrap();
//! let mut events = [Default::default(); 4];
//! assert_eq!(sim.epoll_wait(epoll, &mut events, None).unwrap(), 1);
//! assert_eq!(events[0].token(), 7);
//! let (fd, _) = sim.accept(listener).unwrap();
//! sim.client_send(client, b"hi").unwrap();
//! let mut buf = [0u8; 8];
//! assert_eq!(sim.recv(fd, &mut buf).unwrap(), 2);
//! ```

mod kernel;
pub mod sched;

use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kernel::{Busy, Kernel};
pub use kernel::{Record, ResetLoss};
pub use sched::{Sched, Wake};

use crate::sys::{
    Errno, Event, Fd, FileId, Interest, ListenAddr, ListenOptions, Readiness, Shutdown, Sys,
    SysResult,
};

/// How to build a simulated kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// Seeds the scheduler (which thread runs at each syscall).
    pub seed: u64,
    /// Bytes each direction of a connection buffers (small values force
    /// short writes and EAGAIN).
    pub buffer: usize,
    /// The largest listen backlog.
    pub backlog: usize,
    /// RLIMIT_NOFILE (soft): numbers at or above it fail with EMFILE.
    pub fd_limit: usize,
    /// RLIMIT_NOFILE (hard).
    pub hard_limit: usize,
    /// A read or write also takes a scheduling point before it looks its
    /// descriptor up, as a real thread can be descheduled between the
    /// checks that chose the number and the kernel's `fdget`: another
    /// thread may cover or replace the number meanwhile (invariant C).
    /// Off by default: the extra points change the schedule a seed makes,
    /// and the committed regression seeds were found without them.
    pub point_before_io: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            buffer: 4096,
            backlog: 128,
            fd_limit: 1024,
            hard_limit: 1024,
            point_before_io: false,
        }
    }
}

/// A simulated client's connection (the other end of a server socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SimClient(u64);

#[derive(Debug)]
struct Inner {
    kernel: Mutex<Kernel>,
    sched: Sched,
    point_before_io: bool,
}

/// The simulated kernel. Cheap to clone (all clones are the same kernel).
#[derive(Debug, Clone)]
pub struct SimSys {
    inner: Arc<Inner>,
}

impl SimSys {
    /// A fresh kernel: descriptors 0-2 taken, nothing else.
    pub fn new(config: SimConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                kernel: Mutex::new(Kernel::new(
                    config.buffer,
                    config.backlog,
                    config.fd_limit,
                    config.hard_limit.max(config.fd_limit),
                )),
                sched: Sched::new(config.seed),
                point_before_io: config.point_before_io,
            }),
        }
    }

    /// The kernel, its clock set to the scheduler's. (The clock is read
    /// first: the scheduler's lock is never taken under the kernel's.)
    fn kernel(&self) -> MutexGuard<'_, Kernel> {
        let now = self.inner.sched.now();
        let mut kernel = self
            .inner
            .kernel
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        kernel.now = now;
        kernel
    }

    /// The scheduler.
    pub fn sched(&self) -> &Sched {
        &self.inner.sched
    }

    /// Runs `op` on the kernel, then wakes whoever it made ready.
    fn with_kernel<T>(&self, op: impl FnOnce(&mut Kernel) -> T) -> T {
        let mut kernel = self.kernel();
        let result = op(&mut kernel);
        for thread in kernel.to_wake.drain(..) {
            self.inner.sched.wake(thread);
        }
        result
    }

    /// A scheduling point, then `op`.
    fn call<T>(&self, what: &str, fd: Fd, op: impl FnOnce(&mut Kernel) -> T) -> T {
        self.inner.sched.point(&format_args!("{what}({fd})"));
        self.with_kernel(op)
    }

    /// A read or write: marked busy across a scheduling point, so two threads
    /// inside the same half of one socket are caught (invariants R and W).
    fn busy<T>(
        &self,
        what: &str,
        fd: Fd,
        busy: Busy,
        op: impl FnOnce(&mut Kernel, kernel::DescId) -> SysResult<T>,
    ) -> SysResult<T> {
        let me = self.inner.sched.current_thread();
        if self.inner.point_before_io {
            self.inner.sched.point(&format_args!("before {what}({fd})"));
        }
        let desc = self.with_kernel(|k| k.enter(fd, busy, me))?;
        self.inner.sched.point(&format_args!("{what}({fd})"));
        self.with_kernel(|k| {
            let result = op(k, desc);
            k.leave(desc, busy);
            result
        })
    }

    // ------------------------------------------------------------ the driver

    /// Makes the calling thread (the test's driver) a scheduled participant.
    pub fn attach(&self) {
        self.inner.sched.attach();
    }

    /// The calling thread leaves the schedule (before joining threads).
    pub fn detach(&self) {
        self.inner.sched.detach();
    }

    /// Waits until the driver and `workers` more threads have registered.
    pub fn expect_workers(&self, workers: usize) {
        self.inner.sched.expect_threads(workers + 1);
    }

    /// Lets the other threads run until none can; `Err` with a trace if that
    /// takes more than `budget` scheduling points.
    pub fn wait_quiescent(&self, budget: u64) -> Result<(), String> {
        self.inner.sched.wait_quiescent(budget)
    }

    /// The driver sleeps for `d` of virtual time: the others run, and timers
    /// due before the end of the sleep fire.
    pub fn sleep(&self, d: Duration) {
        self.inner.sched.sleep(d);
    }

    /// Moves the virtual clock forward.
    pub fn advance(&self, by: Duration) {
        self.inner.sched.advance(by);
    }

    /// Connects a new client to `addr` (it waits in the backlog until
    /// accepted).
    pub fn connect(&self, addr: &ListenAddr) -> SysResult<SimClient> {
        self.call("connect", -1, |k| k.connect(addr)).map(SimClient)
    }

    /// Opens a listener at `addr` on a simulated remote host: the server's
    /// dials to it stay in progress until [`SimSys::accept_remote`] or
    /// [`SimSys::refuse_remote`] answers them.
    pub fn listen_remote(&self, addr: SocketAddr) {
        self.kernel().listen_remote(addr);
    }

    /// The remote at `addr` accepts the oldest dial the server still wants,
    /// completing its connect; the test plays the remote end as a client.
    /// `None` if no dial waits.
    pub fn accept_remote(&self, addr: SocketAddr) -> Option<SimClient> {
        self.call("accept_remote", -1, |k| k.answer(addr, true))
            .map(SimClient)
    }

    /// The remote at `addr` refuses the oldest dial the server still wants
    /// (an RST: the connect fails with ECONNREFUSED). Returns that
    /// connection, so its token can be asked for; `None` if no dial waits.
    pub fn refuse_remote(&self, addr: SocketAddr) -> Option<SimClient> {
        self.call("refuse_remote", -1, |k| k.answer(addr, false))
            .map(SimClient)
    }

    /// Sends from a client; fewer bytes than given when the buffer is nearly
    /// full, EAGAIN when it is full.
    pub fn client_send(&self, client: SimClient, data: &[u8]) -> SysResult<usize> {
        self.call("client_send", -1, |k| k.client_send(client.0, data))
    }

    /// Receives up to `max` bytes for a client; `Ok(empty)` at end of stream.
    pub fn client_recv(&self, client: SimClient, max: usize) -> SysResult<Vec<u8>> {
        self.call("client_recv", -1, |k| k.client_recv(client.0, max))
    }

    /// The client shuts down writing (FIN).
    pub fn client_shutdown(&self, client: SimClient) -> SysResult<()> {
        self.call("client_shutdown", -1, |k| k.client_shutdown(client.0))
    }

    /// The client closes (FIN, or RST if it left input unread).
    pub fn client_close(&self, client: SimClient) -> SysResult<()> {
        self.call("client_close", -1, |k| k.client_close(client.0, false))
    }

    /// The client resets the connection (RST).
    pub fn client_reset(&self, client: SimClient) -> SysResult<()> {
        self.call("client_reset", -1, |k| k.client_close(client.0, true))
    }

    // ------------------------------------------------------------ inspection

    /// Every open number: (number, kind, description id).
    pub fn fd_table(&self) -> Vec<(Fd, &'static str, u64)> {
        self.kernel().fd_table()
    }

    /// Registrations whose token has every bit of `bits` and whose socket
    /// has input waiting now: (number, token).
    pub fn readable_registrations(&self, bits: u64) -> Vec<(Fd, u64)> {
        self.kernel().registrations(bits, true)
    }

    /// Registrations whose token has every bit of `bits`: (number, token).
    pub fn registrations(&self, bits: u64) -> Vec<(Fd, u64)> {
        self.kernel().registrations(bits, false)
    }

    /// Open file descriptions (stdio included).
    pub fn live_descriptions(&self) -> usize {
        self.kernel().live_descriptions()
    }

    /// Accepts, registrations and closes, in order.
    pub fn history(&self) -> Vec<Record> {
        self.kernel().history.clone()
    }

    /// Registrations with write interest (EPOLLOUT) armed: (number, token).
    pub fn write_interest(&self) -> Vec<(Fd, u64)> {
        self.kernel().write_interest()
    }

    /// R/W violations seen (two threads in the same half of one socket).
    pub fn violations(&self) -> Vec<String> {
        self.kernel().violations.clone()
    }

    /// Connections open on the server's side, not paused by flow control
    /// (their writer does not wait for room), with input the server has not
    /// read: (client, bytes). Checked where every thread is idle, each is a
    /// lost edge (see the scenarios' `settle`).
    pub fn stranded_input(&self) -> Vec<(SimClient, usize)> {
        self.kernel()
            .stranded_input()
            .into_iter()
            .map(|(id, unread)| (SimClient(id), unread))
            .collect()
    }

    /// Bytes a client sent that the server has not read yet.
    pub fn unread_by_server(&self, client: SimClient) -> usize {
        self.kernel().unread_by_server(client.0)
    }

    /// The longest the server went without reading from or writing to a
    /// client's connection, since its last read of it before it shut the
    /// connection for writing, up to closing its end (`None`: not closed);
    /// an idle-timeout close needs a stretch as long as the timeout there,
    /// not anywhere in the connection's life.
    pub fn idle_before_close(&self, client: SimClient) -> Option<Duration> {
        self.kernel().idle_before_close(client.0)
    }

    /// Whether the server closed its end of a client's connection.
    pub fn server_closed(&self, client: SimClient) -> bool {
        self.kernel().server_closed_conn(client.0)
    }

    /// Whether a client still waits in the backlog.
    pub fn is_pending(&self, client: SimClient) -> bool {
        self.kernel().is_pending(client.0)
    }

    /// Marks the connection behind `fd` as hit by an injected fault (see
    /// [`crate::sys::fault::FaultSys::with_reset_observer`]).
    pub fn mark_faulted(&self, fd: Fd) {
        self.kernel().mark_faulted(fd);
    }

    /// The token the server registered a client's connection with (its
    /// `ConnId`, for a server built on this crate).
    pub fn client_token(&self, client: SimClient) -> Option<u64> {
        self.kernel().client_token(client.0)
    }

    /// What a reset from the server's end cost a client (bytes it had not
    /// read, discarded: see the kernel's module docs), and how the
    /// server's close went before it.
    pub fn reset_loss(&self, client: SimClient) -> ResetLoss {
        self.kernel().reset_loss(client.0)
    }

    /// Whether an injected fault hit a client's connection.
    pub fn was_faulted(&self, client: SimClient) -> bool {
        self.kernel().was_faulted(client.0)
    }

    /// Changes RLIMIT_NOFILE (soft) from outside, as another process's
    /// `prlimit` would.
    pub fn set_fd_limit(&self, limit: usize) {
        self.kernel().fd_limit = limit;
    }
}

impl Sys for SimSys {
    fn epoll_create(&self) -> SysResult<Fd> {
        self.call("epoll_create", -1, Kernel::epoll_create)
    }

    fn epoll_add(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()> {
        self.call("epoll_add", fd, |k| {
            k.epoll_ctl(epoll, fd, Some((interest, token)), true)
        })
    }

    fn epoll_modify(&self, epoll: Fd, fd: Fd, interest: Interest, token: u64) -> SysResult<()> {
        self.call("epoll_mod", fd, |k| {
            k.epoll_ctl(epoll, fd, Some((interest, token)), false)
        })
    }

    fn epoll_delete(&self, epoll: Fd, fd: Fd) -> SysResult<()> {
        self.call("epoll_del", fd, |k| k.epoll_ctl(epoll, fd, None, false))
    }

    fn epoll_wait(
        &self,
        epoll: Fd,
        events: &mut [Event],
        timeout: Option<Duration>,
    ) -> SysResult<usize> {
        let sched = &self.inner.sched;
        sched.point(&format_args!("epoll_wait({epoll}, {timeout:?})"));
        let deadline = timeout.map(|t| sched.now().saturating_add(t));
        loop {
            let me = sched.prepare_block();
            let n = self.with_kernel(|k| {
                let n = k.epoll_harvest(epoll, events)?;
                if n == 0 && timeout != Some(Duration::ZERO) {
                    k.add_waiter(epoll, me)?;
                }
                Ok(n)
            })?;
            if n > 0 || timeout == Some(Duration::ZERO) {
                return Ok(n);
            }
            let wake = sched.block(deadline);
            // Off the waiter list however the wait ended: a wake-up may come
            // from elsewhere (a futex), and a stale entry would later take
            // an edge's one wake-up for a thread no longer waiting here.
            self.with_kernel(|k| k.remove_waiter(epoll, me));
            if wake == Wake::TimedOut {
                return self.with_kernel(|k| k.epoll_harvest(epoll, events));
            }
        }
    }

    fn listen(&self, addr: &ListenAddr, options: &ListenOptions) -> SysResult<Fd> {
        self.call("listen", -1, |k| k.listen(addr, options.backlog))
    }

    fn local_addr(&self, fd: Fd) -> SysResult<ListenAddr> {
        self.kernel().local_addr(fd)
    }

    fn accept(&self, listener: Fd) -> SysResult<(Fd, Option<SocketAddr>)> {
        self.call("accept", listener, |k| k.accept(listener))
    }

    /// Loopback only: a remote listener ([`SimSys::listen_remote`]) keeps
    /// the dial in progress until the test answers it; any other loopback
    /// address refuses it (asynchronously, as Linux's loopback does).
    fn connect(&self, addr: SocketAddr) -> SysResult<Fd> {
        self.call("connect", -1, |k| k.dial(addr))
    }

    fn connect_status(&self, fd: Fd) -> SysResult<bool> {
        self.call("getsockopt", fd, |k| k.connect_status(fd))
    }

    fn recv(&self, fd: Fd, buf: &mut [u8]) -> SysResult<usize> {
        self.busy("recv", fd, Busy::Read, |k, desc| k.recv(desc, buf))
    }

    fn send(&self, fd: Fd, buf: &[u8]) -> SysResult<usize> {
        self.busy("send", fd, Busy::Write, |k, desc| {
            k.send(desc, &[IoSlice::new(buf)])
        })
    }

    fn send_vectored(&self, fd: Fd, bufs: &[IoSlice<'_>]) -> SysResult<usize> {
        self.busy("sendmsg", fd, Busy::Write, |k, desc| k.send(desc, bufs))
    }

    fn shutdown(&self, fd: Fd, how: Shutdown) -> SysResult<()> {
        self.call("shutdown", fd, |k| k.shutdown(fd, how))
    }

    fn unacked(&self, fd: Fd) -> SysResult<usize> {
        self.call("ioctl(SIOCOUTQ)", fd, |k| k.unacked(fd))
    }

    fn set_nodelay(&self, fd: Fd) -> SysResult<()> {
        self.call("setsockopt", fd, |k| {
            if k.is_stream(fd)? {
                Ok(())
            } else {
                Err(Errno::EOPNOTSUPP)
            }
        })
    }

    fn dup2(&self, from: Fd, to: Fd) -> SysResult<()> {
        self.call("dup2", to, |k| k.dup2(from, to))
    }

    fn dup(&self, fd: Fd) -> SysResult<Fd> {
        self.call("dup", fd, |k| k.dup(fd))
    }

    fn close(&self, fd: Fd) -> SysResult<()> {
        self.call("close", fd, |k| k.close(fd))
    }

    fn placeholder(&self) -> SysResult<Fd> {
        self.call("socketpair", -1, Kernel::placeholder)
    }

    /// The simulation keeps no files: every path names the same one.
    fn socket_file(&self, _path: &Path) -> SysResult<FileId> {
        Ok(FileId { dev: 0, ino: 0 })
    }

    fn unlink_socket(&self, _path: &Path, _bound: FileId) -> SysResult<bool> {
        Ok(true)
    }

    fn eventfd(&self) -> SysResult<Fd> {
        self.call("eventfd", -1, Kernel::eventfd)
    }

    fn eventfd_wake(&self, fd: Fd) -> SysResult<()> {
        self.call("eventfd_write", fd, |k| k.eventfd_add(fd))
    }

    fn eventfd_drain(&self, fd: Fd) -> SysResult<()> {
        self.call("eventfd_read", fd, |k| k.eventfd_reset(fd))
    }

    fn futex_wait(
        &self,
        word: &AtomicU32,
        expected: u32,
        timeout: Option<Duration>,
    ) -> SysResult<()> {
        let sched = &self.inner.sched;
        sched.point(&format_args!("futex_wait({expected}, {timeout:?})"));
        let deadline = timeout.map(|t| sched.now().saturating_add(t));
        let key = word.as_ptr() as usize;
        let me = sched.prepare_block();
        // Compare and sleep in one kernel step, as the real futex does: a
        // wake-up between the caller's check and the sleep is not lost.
        let asleep = self.with_kernel(|k| {
            if word.load(Ordering::SeqCst) != expected {
                return false;
            }
            k.futex_sleep(key, me);
            true
        });
        if asleep {
            sched.block(deadline);
            // Off the word's list however the sleep ended (see `epoll_wait`).
            self.with_kernel(|k| k.futex_unsleep(key, me));
        }
        Ok(())
    }

    fn futex_wake(&self, word: &AtomicU32, n: u32) -> SysResult<usize> {
        let key = word.as_ptr() as usize;
        Ok(self.call("futex_wake", -1, |k| k.futex_wake(key, n)))
    }

    fn nofile_limit(&self) -> SysResult<(u64, u64)> {
        let k = self.kernel();
        Ok((k.fd_limit as u64, k.hard_limit as u64))
    }

    fn open_descriptors(&self) -> SysResult<u64> {
        Ok(self.kernel().fd_table().len() as u64)
    }

    fn set_nofile_soft_limit(&self, soft: u64) -> SysResult<()> {
        let mut k = self.kernel();
        let soft = usize::try_from(soft).map_err(|_| Errno::EINVAL)?;
        if soft > k.hard_limit {
            return Err(Errno::EINVAL);
        }
        k.fd_limit = soft;
        Ok(())
    }

    fn now(&self) -> Duration {
        self.inner.sched.now()
    }

    fn inject_readiness(&self, fd: Fd, readiness: Readiness) -> bool {
        self.with_kernel(|k| k.inject_readiness(fd, readiness));
        true
    }

    fn before_call(&self) {
        self.inner.sched.enter();
    }

    fn preempt(&self, call: &'static str) {
        self.inner
            .sched
            .point(&format_args!("preempted after {call}"));
    }
}
