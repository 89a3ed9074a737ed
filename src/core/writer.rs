//! The write side: send first, arm EPOLLOUT only on EAGAIN, disarm when drained.
//!
//! The thread that holds a connection's write side moves the queued messages
//! into its in-flight list and writes them with one vectored write per round.
//! A partial write leaves the rest of the front message at the head of the
//! list, so it is continued before any other message: bytes of two messages
//! never interleave (invariant W).
//!
//! The I/O is a [`Sink`]: the server plugs in the `Sys` calls, the loom models
//! plug in a scripted recorder. This module never blocks and never holds the
//! out-queue's mutex across a write.
//!
//! # Invariants
//!
//! - **W.** Only the write-side owner touches [`WriterSide`] (enforced by
//!   [`super::cell::OwnerCell`]), and messages leave the in-flight list only
//!   from the front, whole or as a head offset into the front message.
//! - **A failure is final.** Once a write fails, every later flush drops
//!   instead of writing: bytes after a lost message would reach the peer
//!   with a hole before them (the close that follows a failure is performed
//!   by a read-side turn, and other writes could come first).
//! - **S (send first).** The write-readiness interest is armed only after a
//!   write returned would-block, and disarmed as soon as the queue is found
//!   empty with it armed: it is armed exactly while output is pending, between
//!   flushes.

use std::collections::VecDeque;
use std::io::IoSlice;

#[cfg(test)]
use super::outq::COALESCE_MAX;
#[cfg(test)]
use super::outq::KEPT_ENTRIES;
use super::outq::{Chunk, OutQueue, Settled, release_spare};
use crate::sync::{Mutex, lock};

/// The most buffers one vectored write carries (well under Linux's IOV_MAX,
/// and 1 KiB of `IoSlice`s on the stack).
pub const MAX_IOV: usize = 64;

/// Why a [`Sink`] call did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkError {
    /// The kernel buffer is full (EAGAIN/EWOULDBLOCK): wait for writability.
    WouldBlock,
    /// A signal interrupted the call (EINTR): try again.
    Interrupted,
    /// The connection is broken (EPIPE, ECONNRESET, ...); the errno.
    Failed(i32),
}

/// Where the write side's bytes go.
pub trait Sink {
    /// Writes as much of `bufs`, in order, as the kernel takes now.
    fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError>;

    /// Arms (`true`) or disarms (`false`) the write-readiness event.
    fn set_write_interest(&mut self, armed: bool) -> Result<(), SinkError>;

    /// Whether a drained writer may disarm write-readiness now. `false`
    /// while the registration needs it for something else: an outbound
    /// connect in progress, whose completion is the next EPOLLOUT edge
    /// (disarming would drop that edge from the ready list).
    fn may_disarm(&self) -> bool {
        true
    }
}

/// Data owned by the write side of a connection.
#[derive(Debug, Default)]
pub struct WriterSide {
    inflight: VecDeque<Chunk>,
    /// Bytes of `inflight[0]` already written.
    head: usize,
    /// Whether write-readiness interest is armed.
    armed: bool,
    /// A write failed (errno): the stream is broken for good. Nothing is
    /// written after a failure, even if the kernel would take it, or the peer
    /// would see a hole in the stream.
    failed: Option<i32>,
}

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was written.
    Drained,
    /// The kernel buffer is full; write-readiness is armed.
    Blocked,
    /// The connection is broken (errno); in-flight bytes were dropped.
    Failed(i32),
}

/// What one flush did, for the caller's bookkeeping and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flush {
    /// How it ended.
    pub flushed: Flushed,
    /// Bytes written.
    pub written: usize,
    /// Whether this flush armed write-readiness (an EAGAIN was met).
    pub armed: bool,
    /// What settling with the out-queue found.
    pub settled: Settled,
}

impl WriterSide {
    /// An idle writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing is in flight and writing may go straight to the
    /// kernel (no earlier write failed).
    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty() && self.failed.is_none()
    }

    /// Records that the registration already asks for write-readiness (an
    /// outbound connect in progress).
    pub fn assume_armed(&mut self) {
        self.armed = true;
    }

    /// Forgets everything, for the slot's next connection; returns the
    /// number of unwritten bytes dropped.
    pub fn reset(&mut self) -> usize {
        let unwritten = self.unwritten();
        *self = Self::default();
        unwritten
    }

    /// Drops what is in flight after a failure (keeping the failure).
    fn drop_inflight(&mut self) -> usize {
        let unwritten = self.unwritten();
        self.inflight.clear();
        self.head = 0;
        unwritten
    }

    fn unwritten(&self) -> usize {
        self.inflight.iter().map(|chunk| chunk.len()).sum::<usize>() - self.head
    }

    /// Marks the stream broken after a send-first write failed (`errno`):
    /// from now on every flush drops instead of writing (see the module
    /// docs: a failure is final). The caller also fails the out-queue.
    pub fn fail(&mut self, errno: i32) {
        self.failed.get_or_insert(errno);
    }

    /// Puts the unwritten tail of a send-first write in flight (the caller
    /// counts it in the out-queue) and arms write-readiness.
    pub fn hold_remainder(
        &mut self,
        chunk: Chunk,
        sink: &mut impl Sink,
    ) -> Result<bool, SinkError> {
        debug_assert!(self.inflight.is_empty(), "send-first with output in flight");
        self.inflight.push_back(chunk);
        self.head = 0;
        self.arm(sink)
    }

    fn arm(&mut self, sink: &mut impl Sink) -> Result<bool, SinkError> {
        if self.armed {
            return Ok(false);
        }
        sink.set_write_interest(true)?;
        self.armed = true;
        Ok(true)
    }

    /// Writes in-flight and queued messages until drained, blocked or failed.
    /// `low_water` is where a reader paused by flow control resumes.
    pub fn flush(
        &mut self,
        queue: &Mutex<OutQueue>,
        sink: &mut impl Sink,
        low_water: usize,
    ) -> Flush {
        let mut report = Flush {
            flushed: Flushed::Drained,
            written: 0,
            armed: false,
            settled: Settled::default(),
        };
        if let Some(errno) = self.failed {
            // A broken stream: drop, never write. What is in flight goes
            // first (a send-first remainder whose arming failed is there),
            // then what waited.
            let mut q = lock(queue);
            let mut dropped = self.drop_inflight();
            q.take_pending(&mut self.inflight);
            dropped += self.drop_inflight();
            report.settled = q.settle(0, dropped, low_water);
            report.flushed = Flushed::Failed(errno);
            return report;
        }
        // Bytes written but not yet settled with the queue.
        let mut unsettled = 0;
        loop {
            if self.inflight.is_empty() {
                let mut q = lock(queue);
                merge(&mut report.settled, q.settle(unsettled, 0, low_water));
                unsettled = 0;
                if q.is_idle() {
                    // Drained: neither list keeps a burst's room.
                    q.release_spare();
                    release_spare(&mut self.inflight);
                    break;
                }
                q.take_pending(&mut self.inflight);
                self.head = 0;
            }
            let result = {
                let mut slots = [IoSlice::new(&[]); MAX_IOV];
                sink.write(self.iovecs(&mut slots))
            };
            match result {
                Ok(0) => {
                    // A zero-byte write of a non-empty buffer: treat it as a
                    // full buffer, so a confused kernel costs a wait, not a spin.
                    report.flushed = Flushed::Blocked;
                }
                Ok(n) => {
                    self.advance(n);
                    unsettled += n;
                    report.written += n;
                    continue;
                }
                Err(SinkError::WouldBlock) => report.flushed = Flushed::Blocked,
                Err(SinkError::Interrupted) => continue,
                Err(SinkError::Failed(errno)) => report.flushed = Flushed::Failed(errno),
            }
            break;
        }
        if report.flushed == Flushed::Blocked {
            match self.arm(sink) {
                Ok(armed) => report.armed = armed,
                Err(SinkError::Failed(errno)) => report.flushed = Flushed::Failed(errno),
                // Arming cannot block; if it reports so anyway, fail safe.
                Err(_) => report.flushed = Flushed::Failed(0),
            }
        }
        let dropped = match report.flushed {
            Flushed::Failed(errno) => {
                self.failed = Some(errno);
                self.armed = false;
                self.drop_inflight()
            }
            _ => 0,
        };
        if unsettled > 0 || dropped > 0 || self.failed.is_some() {
            let mut q = lock(queue);
            if self.failed.is_some() {
                q.fail();
            }
            merge(&mut report.settled, q.settle(unsettled, dropped, low_water));
        }
        if report.flushed == Flushed::Drained && self.armed && sink.may_disarm() {
            // Disarming can only fail if the socket is gone; the close that
            // follows cleans up, so the error changes nothing here.
            let _ = sink.set_write_interest(false);
            self.armed = false;
        }
        report
    }

    /// Fills `slots` with the unwritten bytes, front first; returns the filled part.
    fn iovecs<'a>(&'a self, slots: &'a mut [IoSlice<'a>; MAX_IOV]) -> &'a [IoSlice<'a>] {
        let mut filled = 0;
        for (i, chunk) in self.inflight.iter().take(MAX_IOV).enumerate() {
            let bytes = if i == 0 {
                &chunk[self.head..]
            } else {
                &chunk[..]
            };
            slots[filled] = IoSlice::new(bytes);
            filled += 1;
        }
        &slots[..filled]
    }

    /// Drops `n` written bytes from the front of the in-flight list.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.inflight.front() else {
                debug_assert!(false, "kernel reported more bytes written than offered");
                return;
            };
            let rest = front.len() - self.head;
            if n < rest {
                self.head += n;
                return;
            }
            n -= rest;
            self.inflight.pop_front();
            self.head = 0;
        }
    }
}

fn merge(into: &mut Settled, from: Settled) {
    into.resume |= from.resume;
    into.linger_done |= from.linger_done;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes at most `budget[i]` bytes on the i-th write
    /// (`None` = would block), and records everything.
    struct Script {
        budget: Vec<Option<usize>>,
        wire: Vec<u8>,
        interest: Vec<bool>,
    }

    impl Sink for Script {
        fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
            let Some(step) = (!self.budget.is_empty()).then(|| self.budget.remove(0)) else {
                return Err(SinkError::WouldBlock);
            };
            let Some(mut budget) = step else {
                return Err(SinkError::WouldBlock);
            };
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(budget);
                self.wire.extend_from_slice(&buf[..take]);
                budget -= take;
                n += take;
            }
            Ok(n)
        }

        fn set_write_interest(&mut self, armed: bool) -> Result<(), SinkError> {
            self.interest.push(armed);
            Ok(())
        }
    }

    fn queue_with(messages: &[&[u8]]) -> Mutex<OutQueue> {
        let mut q = OutQueue::new();
        q.open(
            0,
            std::sync::Arc::new(crate::core::outq::Budget::new(usize::MAX)),
        );
        for m in messages {
            q.push(0, Chunk::Owned(m.to_vec()), usize::MAX)
                .expect("open queue");
        }
        Mutex::new(q)
    }

    #[test]
    fn partial_writes_continue_the_same_message_first() {
        crate::sync::model(|| {
            let queue = queue_with(&[b"hello", b"world"]);
            let mut w = WriterSide::new();
            let mut sink = Script {
                budget: vec![Some(3), None],
                wire: vec![],
                interest: vec![],
            };
            let report = w.flush(&queue, &mut sink, 0);
            assert_eq!(report.flushed, Flushed::Blocked);
            assert!(report.armed);
            assert_eq!(sink.interest, vec![true]);
            lock(&queue)
                .push(0, Chunk::Owned(b"!".to_vec()), usize::MAX)
                .expect("open queue");
            sink.budget = vec![Some(1), Some(100), Some(100)];
            let report = w.flush(&queue, &mut sink, 0);
            assert_eq!(report.flushed, Flushed::Drained);
            assert_eq!(sink.wire, b"helloworld!");
            assert_eq!(sink.interest, vec![true, false], "disarmed once drained");
            assert_eq!(lock(&queue).bytes(), 0);
        });
    }

    /// An audit's finding: the waiting and in-flight lists kept the room of
    /// their largest burst for as long as the connection lived (they trade
    /// places, and nothing shrank them). A drained flush gives it back.
    #[test]
    fn a_drained_flush_gives_back_the_lists_room() {
        crate::sync::model(|| {
            let big = vec![7u8; COALESCE_MAX];
            let queue = queue_with(&[big.as_slice(); 40]);
            let mut w = WriterSide::new();
            let mut sink = Script {
                budget: vec![Some(usize::MAX); 10],
                wire: vec![],
                interest: vec![],
            };
            // A burst in flight, blocked; a second burst waits behind it;
            // then both drain, so that both lists have held a burst (the
            // waiting one gets the first burst's list at the swap).
            sink.budget = vec![Some(COALESCE_MAX)];
            assert_eq!(w.flush(&queue, &mut sink, 0).flushed, Flushed::Blocked);
            for _ in 0..40 {
                lock(&queue)
                    .push(0, Chunk::Owned(big.clone()), usize::MAX)
                    .expect("open queue");
            }
            sink.budget = vec![Some(usize::MAX); 10];
            assert_eq!(w.flush(&queue, &mut sink, 0).flushed, Flushed::Drained);
            assert_eq!(sink.wire.len(), 80 * COALESCE_MAX);
            assert!(w.inflight.capacity() <= KEPT_ENTRIES);
            assert!(lock(&queue).spare_room() <= KEPT_ENTRIES);
        });
    }

    #[test]
    fn failure_drops_in_flight_and_settles() {
        crate::sync::model(|| {
            struct Broken;
            impl Sink for Broken {
                fn write(&mut self, _: &[IoSlice<'_>]) -> Result<usize, SinkError> {
                    Err(SinkError::Failed(32))
                }
                fn set_write_interest(&mut self, _: bool) -> Result<(), SinkError> {
                    Ok(())
                }
            }
            let queue = queue_with(&[b"abc"]);
            let mut w = WriterSide::new();
            let report = w.flush(&queue, &mut Broken, 0);
            assert_eq!(report.flushed, Flushed::Failed(32));
            assert!(
                !w.is_idle(),
                "a failed stream never goes back to send-first"
            );
            assert_eq!(lock(&queue).bytes(), 0);
        });
    }

    /// Regression (found by the simulation under real parallelism): a write
    /// failed, the bytes in flight were dropped, and the next flush wrote
    /// later messages on the same stream: the peer saw a hole. A failed
    /// stream must stay failed, even if the kernel's error was transient.
    #[test]
    fn a_failed_stream_is_never_written_again() {
        crate::sync::model(|| {
            let queue = queue_with(&[b"first.", b"second."]);
            let mut w = WriterSide::new();
            // Takes 3 bytes, then fails once, then would take anything.
            let mut sink = Script {
                budget: vec![Some(3)],
                wire: vec![],
                interest: vec![],
            };
            struct FailOnce<'a>(&'a mut Script, bool);
            impl Sink for FailOnce<'_> {
                fn write(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, SinkError> {
                    if self.0.budget.is_empty() && !self.1 {
                        self.1 = true;
                        return Err(SinkError::Failed(105)); // ENOBUFS: transient
                    }
                    if self.0.budget.is_empty() {
                        self.0.budget.push(Some(usize::MAX / 2));
                    }
                    self.0.write(bufs)
                }
                fn set_write_interest(&mut self, armed: bool) -> Result<(), SinkError> {
                    self.0.set_write_interest(armed)
                }
            }
            let mut failing = FailOnce(&mut sink, false);
            let report = w.flush(&queue, &mut failing, 0);
            assert_eq!(report.flushed, Flushed::Failed(105));
            lock(&queue)
                .push(0, Chunk::Owned(b"third.".to_vec()), usize::MAX)
                .ok();
            let again = w.flush(&queue, &mut failing, 0);
            assert_eq!(again.flushed, Flushed::Failed(105), "the failure is sticky");
            assert_eq!(
                sink.wire, b"fir",
                "nothing after the failure reached the wire"
            );
            assert_eq!(lock(&queue).bytes(), 0, "what was dropped is settled");
        });
    }
}
