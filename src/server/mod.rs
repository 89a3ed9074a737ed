//! The event loop: N workers on one edge-triggered epoll instance.
//!
//! ```text
//!                 ┌──────────────── one epoll instance (EPOLLET) ───────────────┐
//!                 │  listeners   waker eventfd   connections (token = slot,gen) │
//!                 └───────▲─────────────▲──────────────────▲────────────────────┘
//!       epoll_wait        │             │                  │
//!   ┌──────────┐  ┌──────────┐  ┌──────────┐               │ send / close by id
//!   │ worker 0 │  │ worker 1 │  │ worker N │     ServerHandle (any thread)
//!   └────┬─────┘  └────┬─────┘  └────┬─────┘               │
//!        └─────────────┴──── ownership word per slot ◄─────┘
//!                   READING? WRITING? pending? closed?  (core::state)
//! ```
//!
//! - **R**: an event wins the read side or leaves a pending mark; the reader
//!   re-checks the mark before letting go ([`conn`]).
//! - **W**: messages are queued whole; the write side's owner writes them in
//!   order with vectored writes ([`crate::core::writer`]).
//! - **S**: replies go to the kernel first; EPOLLOUT is armed only after
//!   EAGAIN and disarmed once drained.
//! - **C**: a slot's descriptor number is pinned; closing covers it with a
//!   placeholder and bumps the generation ([`accept`], [`shared`]).
//! - **L**: the descriptor limit is raised and the pool sized from it before
//!   anything is served ([`fdlimit`]).
//!
//! - **Lingering close**: a close after flush whose peer has not closed
//!   frees its slot at once, and its socket, on a second number, is read and
//!   dropped until the peer's FIN or a deadline, so late bytes from the peer
//!   cannot make the kernel reset it and drop the last replies ([`linger`]).
//! - **Standby**: while one worker carries the load, the others sleep on a
//!   futex instead of in `epoll_wait`, and join when events wait
//!   ([`crate::core::standby`]).
//!
//! Threads never block except in `epoll_wait`, standby and parking (both on
//! a futex through `Sys`); handlers never see a
//! descriptor; nothing a peer sends can panic a worker or touch another
//! connection.

mod accept;
pub mod config;
pub(crate) mod conn;
mod fdlimit;
mod handle;
pub(crate) mod linger;
mod readbuf;
mod shared;
pub mod stats;
mod timers;
mod worker;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use config::{Config, IdleWait, SlowReceiver, WriteInterest};
pub use handle::{ConnectError, Frame, SendError, ServerHandle};
pub use stats::Stats;

use crate::core::slab::Slab;
use crate::core::slot::Limits;
use crate::handler::Handler;
use crate::sys::{Errno, Interest, LinuxSys, ListenAddr, Sys};
use conn::ReaderCell;
use fdlimit::FdPlan;
use handle::Control;
use shared::{Descriptors, LISTENER_TOKEN, Listener, Shared, WAKER_TOKEN};
use worker::Env;

/// Why a server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The configuration is inconsistent.
    Config(String),
    /// The file descriptor limit is too low for what was asked (invariant L).
    FdLimit {
        /// Connections asked for.
        asked: usize,
        /// The soft RLIMIT_NOFILE in force.
        soft: u64,
        /// The hard RLIMIT_NOFILE.
        hard: u64,
        /// Descriptors kept out of the pool: the server's own, headroom,
        /// and those open already.
        reserved: u64,
        /// Of `reserved`: descriptors the program had open already, beyond
        /// stdio.
        open: u64,
    },
    /// A listening socket could not be set up.
    Listen {
        /// Where.
        addr: ListenAddr,
        /// Why.
        errno: Errno,
    },
    /// A syscall needed at start failed.
    Sys {
        /// Which call.
        call: &'static str,
        /// Why.
        errno: Errno,
    },
    /// A worker thread could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(why) => write!(f, "invalid configuration: {why}"),
            StartError::FdLimit {
                asked,
                soft,
                hard,
                reserved,
                open,
            } => {
                write!(
                    f,
                    "{asked} connections need {} file descriptors",
                    (*asked as u64).saturating_add(*reserved)
                )?;
                if *open > 0 {
                    write!(f, " ({open} open already)")?;
                }
                write!(
                    f,
                    ", but RLIMIT_NOFILE allows {soft} (hard limit {hard}); raise the limit \
                     (ulimit -n, LimitNOFILE=) or ask for fewer connections"
                )
            }
            StartError::Listen { addr, errno } => {
                write!(f, "cannot listen on {addr}: {errno}")?;
                match (addr, *errno) {
                    (_, Errno::EADDRINUSE) => write!(f, "; another process is listening there"),
                    (ListenAddr::Unix(path), Errno::EEXIST) => write!(
                        f,
                        "; {} exists and is not a stale socket of ours, so it is left alone",
                        path.display()
                    ),
                    _ => Ok(()),
                }
            }
            StartError::Sys { call, errno } => write!(f, "{call}: {errno}"),
            StartError::Spawn(e) => write!(f, "cannot start a worker thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A bound server, not yet serving: listeners are open, so clients can
/// connect (they wait in the backlog) and [`Server::local_addrs`] is known.
///
/// Dropped without [`Server::start`], it closes what `bind` opened (and the
/// sockets of dials made meanwhile, whose handler is never called): its
/// [`ServerHandle`]s then refuse sends and dials, as after a stop.
pub struct Server<H: Handler, S: Sys = LinuxSys> {
    shared: Arc<Shared<S>>,
    readers: Arc<Slab<ReaderCell<H::Conn>>>,
    handler: Arc<H>,
    threads: usize,
    plan: FdPlan,
    /// `start` ran: the `Running` it returned owns the teardown.
    started: bool,
}

impl<H: Handler, S: Sys> Drop for Server<H, S> {
    fn drop(&mut self) {
        if !self.started {
            // A handle may outlive the server: without this, its listeners
            // stayed open (clients piling up in a backlog nobody accepts
            // from) and its dials were accepted for no worker to serve.
            self.shared.close_descriptors();
        }
    }
}

impl<H: Handler, S: Sys> fmt::Debug for Server<H, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.local_addrs())
            .field("threads", &self.threads)
            .field("max_conns", &self.plan.capacity)
            .finish()
    }
}

impl<H: Handler> Server<H, LinuxSys> {
    /// Binds a server on the real kernel.
    pub fn bind(config: Config, handler: H) -> Result<Self, StartError> {
        Self::with_sys(LinuxSys::new(), config, handler)
    }
}

impl<H: Handler, S: Sys> Server<H, S> {
    /// Binds a server on `sys` (a simulated or fault-injecting kernel, in tests).
    pub fn with_sys(sys: S, config: Config, handler: H) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        let plan = fdlimit::plan(&sys, &config)?;
        let fds = open_descriptors(&sys, &config)?;
        let threads = config.worker_count();
        let shared = Arc::new(Shared::new(
            sys,
            fds,
            plan.capacity,
            Limits::new(config.max_out),
            config.max_out_total,
            config.max_in_total,
            config.framing,
            config.read_budget,
            config.frame_budget,
            config.events_per_wait,
            config.slow_receiver,
            config.write_interest,
            config.idle_wait,
            (
                config.idle_timeout,
                config.frame_timeout,
                config.send_timeout,
            ),
            (config.linger, plan.linger as usize),
            threads,
        ));
        let listening: Vec<String> = shared
            .fds
            .listeners
            .iter()
            .map(|l| l.addr.to_string())
            .collect();
        let raised = plan
            .raised_from
            .map_or(String::new(), |from| format!(", raised from {from}"));
        log::info!(
            "listening on {}: {threads} worker(s), up to {} connections and {} lingering closes (RLIMIT_NOFILE {}{raised}, hard {})",
            listening.join(", "),
            plan.capacity,
            plan.linger,
            plan.soft,
            plan.hard,
        );
        // A linger asked for (the default) but left no descriptor: said
        // once, loudly, rather than only as a 0 above. Closes after flush
        // then close at once, and a peer still sending may get a reset that
        // costs it its last replies.
        if config.linger.is_some_and(|t| !t.is_zero()) && plan.linger == 0 {
            log::warn!(
                "lingering closes are off: the {} connections take every descriptor the \
                 limit leaves (RLIMIT_NOFILE {}); lower max_conns or raise the limit to keep them",
                plan.capacity,
                plan.soft,
            );
        }
        Ok(Self {
            readers: Arc::new(Slab::new(plan.capacity as usize)),
            shared,
            handler: Arc::new(handler),
            threads,
            plan,
            started: false,
        })
    }

    /// The addresses listened on (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.shared.local_addrs()
    }

    /// The first TCP address listened on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        first_tcp(&self.local_addrs())
    }

    /// The most simultaneous connections (the pool's size).
    pub fn max_conns(&self) -> usize {
        self.plan.capacity as usize
    }

    /// A handle to the server (usable before and after it starts).
    pub fn handle(&self) -> ServerHandle {
        ServerHandle::new(self.shared.clone() as Arc<dyn Control>)
    }

    /// Starts the worker threads.
    pub fn start(mut self) -> Result<Running, StartError> {
        self.started = true;
        let handle = self.handle();
        self.shared.set_worker_count(self.threads);
        let mut workers = Vec::with_capacity(self.threads);
        for i in 0..self.threads {
            let env = Env {
                shared: Arc::clone(&self.shared),
                readers: Arc::clone(&self.readers),
                handler: Arc::clone(&self.handler),
                handle: handle.clone(),
                index: i,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("eserver-{i}"))
                .spawn(move || worker::serve(env));
            match spawned {
                Ok(thread) => workers.push(thread),
                Err(e) => {
                    let mut partial = Running { handle, workers };
                    partial.stop_now();
                    return Err(StartError::Spawn(e));
                }
            }
        }
        Ok(Running { handle, workers })
    }

    /// Starts the workers and waits until the server is shut down (through a
    /// [`ServerHandle`]); returns the final counters.
    pub fn run(self) -> Result<Stats, StartError> {
        Ok(self.start()?.join())
    }
}

fn first_tcp(addrs: &[ListenAddr]) -> Option<SocketAddr> {
    addrs.iter().find_map(|a| match a {
        ListenAddr::Tcp(addr) => Some(*addr),
        ListenAddr::Unix(_) => None,
    })
}

/// Opens epoll, the waker, the placeholder and the listeners; on failure,
/// closes whatever it opened, and removes the socket files of the Unix
/// listeners it bound (left, they would refuse clients until the next
/// start took them for stale).
fn open_descriptors<S: Sys>(sys: &S, config: &Config) -> Result<Descriptors, StartError> {
    let mut opened = Vec::new();
    let mut bound = Vec::new();
    let result = (|| {
        let call = |call: &'static str| move |errno| StartError::Sys { call, errno };
        let epoll = sys.epoll_create().map_err(call("epoll_create1"))?;
        opened.push(epoll);
        let waker = sys.eventfd().map_err(call("eventfd"))?;
        opened.push(waker);
        sys.epoll_add(epoll, waker, Interest::Read, WAKER_TOKEN)
            .map_err(call("epoll_ctl(ADD, eventfd)"))?;
        let placeholder = sys
            .placeholder()
            .map_err(call("socketpair (placeholder)"))?;
        opened.push(placeholder);
        let mut listeners = Vec::new();
        for (i, addr) in config.listen.iter().enumerate() {
            let listen_error = |errno| StartError::Listen {
                addr: addr.clone(),
                errno,
            };
            let fd = sys
                .listen(addr, &config.listen_options)
                .map_err(listen_error)?;
            opened.push(fd);
            let local = sys.local_addr(fd).map_err(listen_error)?;
            let file = match &local {
                ListenAddr::Unix(path) => {
                    let file = sys.socket_file(path).map_err(listen_error)?;
                    bound.push((path.clone(), file));
                    Some(file)
                }
                ListenAddr::Tcp(_) => None,
            };
            sys.epoll_add(epoll, fd, Interest::Read, LISTENER_TOKEN + i as u64)
                .map_err(call("epoll_ctl(ADD, listener)"))?;
            listeners.push(Listener {
                fd,
                addr: local,
                file,
                backoff: crate::core::backoff::AcceptBackoff::new(),
            });
        }
        Ok(Descriptors {
            epoll,
            waker,
            placeholder,
            listeners,
        })
    })();
    if result.is_err() {
        for (path, file) in bound {
            if let Err(errno) = sys.unlink_socket(&path, file) {
                log::warn!("removing {} after a failed start: {errno}", path.display());
            }
        }
        for fd in opened {
            let _ = sys.close(fd);
        }
    }
    result
}

/// A running server. Dropping it shuts the server down at once (no grace)
/// and waits for the workers; use [`Running::stop`] for a graceful stop.
#[derive(Debug)]
pub struct Running {
    handle: ServerHandle,
    workers: Vec<JoinHandle<()>>,
}

impl Running {
    /// A handle to the server.
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// The addresses listened on.
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.handle.local_addrs()
    }

    /// The first TCP address listened on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        first_tcp(&self.local_addrs())
    }

    /// Whether every worker has exited: the server stopped, because it was
    /// asked to or because a worker panicked (a bug in eserver, counted in
    /// [`Stats::worker_panics`], which stops the server after a 1 s grace).
    pub fn is_finished(&self) -> bool {
        self.workers.iter().all(JoinHandle::is_finished)
    }

    /// Starts a graceful shutdown (see [`ServerHandle::shutdown`]).
    pub fn shutdown(&self, grace: Duration) {
        self.handle.shutdown(grace);
    }

    /// Waits for the workers to exit (after a shutdown), closes every
    /// descriptor, and returns the final counters.
    pub fn join(mut self) -> Stats {
        self.join_workers();
        self.handle.stats()
    }

    /// Shuts down gracefully with `grace` and waits.
    pub fn stop(self, grace: Duration) -> Stats {
        self.shutdown(grace);
        self.join()
    }

    fn stop_now(&mut self) {
        self.handle.shutdown(Duration::ZERO);
        self.join_workers();
    }

    fn join_workers(&mut self) {
        for worker in self.workers.drain(..) {
            let name = worker.thread().name().unwrap_or("eserver").to_string();
            if worker.join().is_err() {
                log::error!("worker {name} panicked (a bug in eserver, not in a handler)");
            }
        }
        self.handle.teardown();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.stop_now();
        }
    }
}

impl ServerHandle {
    fn teardown(&self) {
        self.control().teardown();
    }
}
