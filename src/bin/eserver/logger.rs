//! A minimal stderr logger: `[uptime LEVEL] message`, one line per record.

use std::io::Write;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    start: Instant,
    level: LevelFilter,
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        // One write per line, so lines from several threads never mix.
        let line = format!(
            "[{:>4}.{:03} {level}] {}\n",
            t.as_secs(),
            t.subsec_millis(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger (once per process).
pub fn init(level: LevelFilter) {
    // Leaked on purpose: the logger lives as long as the process.
    let logger: &'static Stderr = Box::leak(Box::new(Stderr {
        start: Instant::now(),
        level,
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
