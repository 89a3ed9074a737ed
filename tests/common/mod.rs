//! Helpers shared by the real-socket tests: start a server on an ephemeral
//! loopback port, and a blocking client that speaks the length-prefixed
//! protocol with timeouts (so a broken server fails a test, never hangs it).
// Tests assert by unwrapping: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use eserver::framing::{Codec, Decoded, LengthPrefixed};
use eserver::{Config, ConnId, Ctx, Handler, Running, Server, ServerHandle, Stats};

/// How long any single blocking read may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts `handler` on 127.0.0.1:0 with `threads` workers, after `configure`.
pub fn start<H: Handler>(
    handler: H,
    threads: usize,
    configure: impl FnOnce(Config) -> Config,
) -> Running {
    let config = configure(
        Config::default()
            .listen("127.0.0.1:0".parse::<SocketAddr>().unwrap())
            .threads(threads),
    );
    Server::bind(config, handler)
        .expect("bind")
        .start()
        .expect("start")
}

/// `Command::output`, bounded: a child still running after `limit` is
/// killed (through its handle) and the test fails, rather than hangs.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Echo that holds its worker for the given time on the message "hold"
/// (a slow handler, to make events pile up behind it).
pub struct HoldsOnHold(pub Duration);

impl Handler for HoldsOnHold {
    type Conn = ();
    fn on_open(&self, _ctx: &mut Ctx<'_>) {}
    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        if msg == b"hold" {
            std::thread::sleep(self.0);
        }
        ctx.reply(msg).unwrap();
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (bounded) until `done` holds for the server's stats; fails the
/// test if it never does. Counters a worker keeps are merged only at the
/// end of its event batch: a client can see a reply before the server's
/// stats count the request, so a test waits for a count, never reads it once.
pub fn wait_for_stats(handle: &ServerHandle, what: &str, done: impl Fn(&Stats) -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = handle.stats();
        if done(&stats) {
            return;
        }
        assert!(
            Instant::now() < until,
            "gave up waiting for {what}: {stats}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Echo, but each connection first receives a frame "slot generation", so a
/// test knows which slot its connection got.
#[derive(Debug, Default)]
pub struct Tagged;

impl Handler for Tagged {
    type Conn = ();

    fn on_open(&self, ctx: &mut Ctx<'_>) {
        let id = ctx.id();
        ctx.reply(format!("{} {}", id.slot(), id.generation()).as_bytes())
            .unwrap();
    }

    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        ctx.reply(msg).unwrap();
    }
}

/// A blocking client for length-prefixed little-endian frames.
pub struct Client {
    pub stream: TcpStream,
    codec: LengthPrefixed,
    buf: Vec<u8>,
}

pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    LengthPrefixed::default()
        .encode(&[payload], &mut out)
        .unwrap();
    out
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        Self::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Self {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Self {
            stream,
            codec: LengthPrefixed::default(),
            buf: Vec::new(),
        }
    }

    /// Connects to a `Tagged` server and reads the greeting.
    pub fn connect_tagged(addr: SocketAddr) -> (Self, ConnId) {
        let mut client = Self::connect(addr);
        let greeting = client.recv();
        let text = String::from_utf8(greeting).unwrap();
        let mut parts = text.split(' ').map(|p| p.parse::<u32>().unwrap());
        let id = ConnId::new(parts.next().unwrap(), parts.next().unwrap());
        (client, id)
    }

    pub fn send(&mut self, payload: &[u8]) {
        self.stream.write_all(&frame(payload)).expect("send");
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// The next frame; panics on timeout or end of stream.
    pub fn recv(&mut self) -> Vec<u8> {
        match self.recv_within(IO_TIMEOUT) {
            Ok(Some(payload)) => payload,
            Ok(None) => panic!("connection closed while waiting for a frame"),
            Err(e) => panic!("no frame within {IO_TIMEOUT:?}: {e}"),
        }
    }

    /// The next frame, `None` at end of stream, `Err` if nothing whole
    /// arrived within `timeout`.
    pub fn recv_within(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Decoded::Frame { payload, consumed } = self.codec.decode(&self.buf).unwrap() {
                let out = self.buf[payload].to_vec();
                self.buf.drain(..consumed);
                return Ok(Some(out));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(ErrorKind::TimedOut, "timed out"));
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    return Err(e);
                }
            }
        }
    }

    /// Asserts that nothing arrives within `wait` (the connection stays open).
    pub fn expect_silence(&mut self, wait: Duration) {
        match self.recv_within(wait) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Asserts the server closes the connection (end of stream or reset)
    /// without sending another frame.
    pub fn expect_closed(&mut self) {
        match self.recv_within(IO_TIMEOUT) {
            Ok(None) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
}

/// The `eserver` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_eserver");

/// A child `eserver` with its stderr lines on a channel.
pub struct Eserver {
    pub child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    /// While set, nobody reads the child's stderr (its pipe fills).
    stderr_paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Eserver {
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn eserver");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        let stderr_paused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let paused = std::sync::Arc::clone(&stderr_paused);
        std::thread::spawn(move || {
            let mut stderr = BufReader::new(stderr);
            loop {
                while paused.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut line = String::new();
                match stderr.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = line.trim_end_matches('\n').to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            stderr_paused,
        }
    }

    /// Every stderr line: those seen so far, then the rest until the child's
    /// stderr closes (or 10 s pass).
    pub fn all_lines(&mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return self.seen.clone(),
            }
        }
    }

    /// Stops reading the child's stderr (after the line being read, if
    /// any), as a supervisor that stalls would: its pipe fills.
    pub fn pause_stderr(&self) {
        self.stderr_paused
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reads the child's stderr again.
    pub fn resume_stderr(&self) {
        self.stderr_paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn serve(args: &[&str]) -> Self {
        Self::spawn(Command::new(BIN).args(args))
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The first address from the "listening on ..." line.
    pub fn address(&mut self) -> SocketAddr {
        let line = self.wait_for("listening on ");
        let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
        rest[..rest.find(": ").unwrap()]
            .split(", ")
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// One figure (`open`, `accepted`, ...) from a stats line printed after
    /// this call: lines already queued are set aside first, so a periodic
    /// line from before cannot answer for now.
    pub fn stats_figure(&mut self, name: &str) -> u64 {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.signal("-HUP");
        let line = self.wait_for("stats: ");
        let key = format!(" {name}=");
        let at = line.find(&key).unwrap() + key.len();
        line[at..].split(' ').next().unwrap().parse().unwrap()
    }

    /// Every log line, once the process has exited (its stderr closed).
    pub fn whole_log(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("eserver did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Eserver {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Eserver {
    pub fn address_from(&self, line: &str) -> SocketAddr {
        let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
        rest[..rest.find(": ").unwrap()].parse().unwrap()
    }
}

/// A process's resident set size, in KiB (from /proc).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A process's open descriptors.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A process's CPU time so far (user + system).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux's USER_HZ is 100 on every mainstream architecture.
    Duration::from_millis(ticks * 10)
}

/// A real kernel whose call hook, once the returned flag is set, holds the
/// next call whose name starts with `call` for `hold` (after the call has
/// done its work, as a thread descheduled there would) and clears the
/// flag: a test places a worker's stall exactly. `seed` only names the
/// (fault-free) configuration.
pub fn holds_once(
    call: &'static str,
    hold: Duration,
    seed: u64,
) -> (
    eserver::sys::fault::FaultSys<eserver::LinuxSys>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let armed = Arc::new(AtomicBool::new(false));
    let hook = {
        let armed = Arc::clone(&armed);
        move |name: &'static str| {
            if name.starts_with(call) && armed.swap(false, Ordering::SeqCst) {
                std::thread::sleep(hold);
            }
        }
    };
    let sys = eserver::sys::fault::FaultSys::new(
        eserver::LinuxSys::new(),
        eserver::sys::fault::FaultConfig::none(seed),
    )
    .with_call_hook(Arc::new(hook));
    (sys, armed)
}
