//! # eserver
//!
//! A hardened, multi-threaded TCP server core on Linux epoll in
//! edge-triggered mode, where N worker threads all wait on **one** epoll
//! instance: the design of the original C
//! [EServer](https://github.com/puqing/eserver), with its lessons turned into
//! invariants that are enforced in one place each and checked by tests that
//! fail when they are broken.
//!
//! ```
//! use std::io::{Read, Write};
//! use eserver::{Config, Ctx, Handler, Server};
//!
//! /// Replies to every frame with its payload reversed.
//! struct Reverse;
//!
//! impl Handler for Reverse {
//!     type Conn = ();
//!     fn on_open(&self, _ctx: &mut Ctx<'_>) {}
//!     fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
//!         let reversed: Vec<u8> = msg.iter().rev().copied().collect();
//!         let _ = ctx.reply(&reversed);
//!     }
//! }
//!
//! // Port 0: the kernel picks a free port; `local_addr` tells which.
//! let config = Config::default().listen("127.0.0.1:0".parse::<std::net::SocketAddr>()?);
//! let running = Server::bind(config, Reverse)?.start()?;
//!
//! // A client speaking EServer's wire format: u32 little-endian length + payload.
//! let mut client = std::net::TcpStream::connect(running.local_addr().unwrap())?;
//! client.write_all(&[5, 0, 0, 0])?;
//! client.write_all(b"hello")?;
//! let mut reply = [0u8; 9];
//! client.read_exact(&mut reply)?;
//! assert_eq!(&reply, b"\x05\0\0\0olleh");
//!
//! // Stop accepting, flush every queued reply, close, join the workers.
//! let stats = running.stop(std::time::Duration::from_secs(5));
//! assert_eq!(stats.msgs_in, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## The invariants
//!
//! | | promise | enforced in | checked by |
//! |---|---|---|---|
//! | **R** | at most one thread reads a connection; no edge is lost | [`core::state`] (pending bit, CAS re-check) | `core::state` tests, loom models, `tests/echo.rs` |
//! | **W** | at most one thread writes a connection; messages never interleave | [`core::state`], [`core::writer`] | `core::writer` tests, `tests/handle.rs` (many senders) |
//! | **S** | send first; EPOLLOUT only after EAGAIN, off once drained | [`core::writer`] | `tests/backpressure.rs` (EPOLLOUT counter) |
//! | **C** | no byte ever reaches the wrong peer | [`core::outq`] (generation under the lock), `server::shared` (placeholder `dup2`) | `tests/pool.rs` (stale handle), `tests/fd_numbers.rs`, loom `pool_generations_and_stale_handles` |
//! | **L** | the descriptor limit is raised and the pool sized from it | `server::fdlimit` | `tests/binary.rs` (limit tests) |
//!
//! ## The layers
//!
//! - [`sys`]: the syscall seam. Every call into the kernel goes through the
//!   [`Sys`] trait; [`LinuxSys`] is the real kernel (the one place with
//!   `unsafe` besides [`core::cell`]).
//! - [`core`]: the I/O-free concurrency core: the ownership word, the
//!   out-queue, the write side, the slot pool. Model-checked with loom.
//! - [`server`]: the event loop: workers, accepting, read turns, closing,
//!   the [`ServerHandle`] for other threads, and outbound connections
//!   ([`ServerHandle::connect`]) served by the same workers and handler.
//! - [`framing`]: [`Codec`]s, pure over byte slices: length-prefixed
//!   (EServer's wire format), lines, raw.
//! - [`handler`]: the application's side, [`Handler`] and [`Ctx`].
//! - [`apps`]: the built-in applications of the `eserver` binary.
//! - [`scenario`]: the server on the simulated kernel, driven by scripted
//!   clients under faults and seeded schedules, checked against its promises
//!   (used by the property tests and the fuzz targets).
//!
//! Bad input never panics a worker or touches another connection's data:
//! an oversized frame closes that connection (without buffering it), a peer
//! that does not read is flow-controlled, a handler panic closes only its
//! connection. The memory bounds are shared, though: peers that together
//! hold `max_in_total` of partial frames (each for at most the frame
//! timeout, when one is set) make another peer's large partial frame close with
//! [`CloseReason::InputBudget`], and `max_out_total` refuses sends server
//! wide (see [`server::Config`]).

pub mod apps;
pub mod core;
pub mod framing;
pub mod handler;
pub mod scenario;
pub mod server;
mod sync;
pub mod sys;

pub use crate::core::{CloseReason, ConnId};
pub use framing::{Codec, Framing};
pub use handler::{CloseInfo, CloseMode, ConnectFailure, Ctx, Handler};
pub use server::{
    Config, ConnectError, Frame, IdleWait, Running, SendError, Server, ServerHandle, SlowReceiver,
    StartError, Stats, WriteInterest,
};
pub use sys::{LinuxSys, ListenAddr, Sys};
