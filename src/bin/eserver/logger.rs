//! The stderr logger: `[uptime LEVEL] message`, one line per record.
//!
//! Lines reach stderr from a thread of their own, through a bounded queue.
//! A stderr that stalls (a pipe nobody reads, a terminal on hold) must not
//! stall the server: a log call never blocks. A line that finds the queue
//! full is dropped and counted, and the count is logged ahead of the next
//! line that fits. At exit, [`Log::flush`] waits a bounded time for the
//! lines still queued.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines queued for stderr at most.
const QUEUE: usize = 1024;

/// How long a flush waits for stderr to take the lines queued.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

struct Stderr {
    start: Instant,
    level: LevelFilter,
    queue: SyncSender<String>,
    /// Lines dropped since the last report of them.
    dropped: AtomicU64,
    /// Lines queued, and lines the writer has written: equal once flushed.
    queued: AtomicU64,
    written: Arc<AtomicU64>,
}

impl Stderr {
    fn line(&self, level: Level, message: &dyn std::fmt::Display) -> String {
        let t = self.start.elapsed();
        let level = match level {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        format!(
            "[{:>4}.{:03} {level}] {message}\n",
            t.as_secs(),
            t.subsec_millis()
        )
    }

    /// Queues `line` without blocking; whether it fit. It does not fit when
    /// stderr is not keeping up (the queue is full), or when the writer is
    /// gone (it never returns while the process runs).
    fn try_queue(&self, line: String) -> bool {
        let fit = self.queue.try_send(line).is_ok();
        if fit {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        fit
    }
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Taken whole (a swap: two threads never report the same lines),
        // and given back if the report does not fit; a report that does
        // not fit is not itself a dropped line.
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let report = format!("{dropped} log line(s) dropped: stderr did not keep up");
            if !self.try_queue(self.line(Level::Warn, &report)) {
                self.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
        }
        // One write per line (by the writer), so lines never mix.
        if !self.try_queue(self.line(record.level(), record.args())) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {
        let until = Instant::now() + FLUSH_WAIT;
        while self.written.load(Ordering::Acquire) < self.queued.load(Ordering::Relaxed)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn write_lines(lines: Receiver<String>, written: &AtomicU64) {
    for line in lines {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        written.fetch_add(1, Ordering::Release);
    }
}

/// Installs the logger (once per process).
pub fn init(level: LevelFilter) {
    let (queue, lines) = sync_channel(QUEUE);
    let written = Arc::new(AtomicU64::new(0));
    let writer_written = Arc::clone(&written);
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(lines, &writer_written));
    if let Err(e) = writer {
        // No thread: no logging, rather than logging that could block.
        eprintln!("eserver: cannot start the log writer ({e}); logging is off");
        return;
    }
    // Leaked on purpose: the logger lives as long as the process.
    let logger: &'static Stderr = Box::leak(Box::new(Stderr {
        start: Instant::now(),
        level,
        queue,
        dropped: AtomicU64::new(0),
        queued: AtomicU64::new(0),
        written,
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
