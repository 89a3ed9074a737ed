//! A simulated client: the frames it sends, what it received, and what it
//! is owed.

use crate::core::ConnId;
use crate::framing::{Codec, Decoded, LengthPrefixed};
use crate::sys::rng::SplitMix64;
use crate::sys::sim::{SimClient, SimSys};
use crate::sys::{Errno, SysResult};

use super::probe::{GREETING, parse_greeting};

/// The prefix of a message sent through a `ServerHandle`; then
/// "slot:generation:n:" and padding.
pub const HANDLE_MSG: &[u8] = b"h:";

/// A message sent through the handle to a client's connection.
#[derive(Debug, Clone)]
pub struct HandleMsg {
    /// Its bytes.
    pub payload: Vec<u8>,
    /// The send returned `Ok`.
    pub accepted: bool,
    /// It must arrive if accepted (false for sends through a handle the
    /// driver believed stale: they may still reach that same connection).
    pub required: bool,
}

/// One client's script and record.
#[derive(Debug)]
pub struct Client {
    /// Its index in the scenario.
    pub index: usize,
    /// Its socket in the simulated kernel.
    pub sim: SimClient,
    /// The byte stream it sends: whole frames, back to back.
    pub script: Vec<u8>,
    /// Where each frame of `script` ends.
    pub frame_ends: Vec<usize>,
    /// Bytes of `script` written so far.
    pub written: usize,
    /// A bad header was written after `written` bytes of script.
    pub garbage: bool,
    /// Everything received.
    pub received: Vec<u8>,
    /// The connection's id, once the greeting arrived.
    pub conn: Option<ConnId>,
    /// Shut down writing (FIN).
    pub shut: bool,
    /// Closed or reset by the client.
    pub closed: bool,
    /// End of stream seen.
    pub eof: bool,
    /// A reset seen (ECONNRESET or EPIPE).
    pub reset: bool,
    /// The driver asked the server to close it.
    pub server_close: bool,
    /// Messages sent to its connection through the handle, in order.
    pub handle_msgs: Vec<HandleMsg>,
    /// For the remote end of a server's outbound connection: the id
    /// `ServerHandle::connect` returned (its greeting must name it).
    pub dialed: Option<ConnId>,
    /// A remote end that does not wait for the greeting (see
    /// `Scenario::dials_speak_first`).
    pub speaks_first: bool,
    /// It stopped reading for good (`Op::StopReading`).
    pub deaf: bool,
}

impl Client {
    /// A client whose frames follow from `seed`.
    pub fn new(index: usize, sim: SimClient, seed: u64, frames: usize, max_payload: usize) -> Self {
        let mut rng = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let codec = LengthPrefixed::default();
        let mut script = Vec::new();
        let mut frame_ends = Vec::new();
        for seq in 0..frames {
            let mut payload = format!("c{index}:{seq}:").into_bytes();
            let extra = rng.below(max_payload as u64 + 1) as usize;
            payload.extend((0..extra).map(|_| rng.next_u64() as u8));
            // The default codec takes any of these sizes.
            let _ = codec.encode(&[&payload], &mut script);
            frame_ends.push(script.len());
        }
        Self {
            index,
            sim,
            script,
            frame_ends,
            written: 0,
            garbage: false,
            received: Vec::new(),
            conn: None,
            shut: false,
            closed: false,
            eof: false,
            reset: false,
            server_close: false,
            handle_msgs: Vec::new(),
            dialed: None,
            speaks_first: false,
            deaf: false,
        }
    }

    /// Whether it can still write.
    pub fn can_write(&self) -> bool {
        !self.closed && !self.shut && !self.garbage && !self.reset
    }

    /// A remote end waits for the server to speak first (the greeting), as
    /// the far side of an outbound connection usually does: so only the
    /// connect's completion, never the remote's bytes, can get it served.
    /// One that speaks first may send before the greeting, so its bytes can
    /// come with the completion's event.
    fn waits_for_greeting(&self) -> bool {
        self.dialed.is_some() && self.conn.is_none() && !self.speaks_first
    }

    /// The connection's id as the driver knows it: from the greeting, or
    /// from `connect` for the remote end of a dial.
    pub fn id(&self) -> Option<ConnId> {
        self.conn.or(self.dialed)
    }

    /// Writes up to `len` more bytes of its script; true if any went out.
    pub fn write(&mut self, sim: &SimSys, len: usize) -> bool {
        if !self.can_write() || self.written == self.script.len() || self.waits_for_greeting() {
            return false;
        }
        let end = (self.written + len.max(1)).min(self.script.len());
        match sim.client_send(self.sim, &self.script[self.written..end]) {
            Ok(n) => {
                self.written += n;
                n > 0
            }
            Err(e) => {
                self.note(e);
                false
            }
        }
    }

    /// Finishes the frame in progress, then writes a length header far over
    /// any limit.
    pub fn write_garbage(&mut self, sim: &SimSys) {
        if !self.can_write() || self.waits_for_greeting() {
            return;
        }
        let boundary = self
            .frame_ends
            .iter()
            .copied()
            .find(|&e| e >= self.written)
            .unwrap_or(self.written);
        while self.written < boundary {
            match sim.client_send(self.sim, &self.script[self.written..boundary]) {
                Ok(n) => self.written += n,
                Err(e) if e.is_would_block() => return,
                Err(e) => return self.note(e),
            }
        }
        if let Err(e) = sim.client_send(self.sim, &[0xff; 4]) {
            self.note(e);
        }
        self.garbage = true;
    }

    /// Reads up to `max` bytes; true if anything (or the end) arrived.
    pub fn read(&mut self, sim: &SimSys, max: usize) -> bool {
        if self.closed || self.eof || self.deaf {
            return false;
        }
        match sim.client_recv(self.sim, max.max(1)) {
            Ok(data) if data.is_empty() => {
                self.eof = true;
                true
            }
            Ok(data) => {
                self.received.extend(data);
                self.learn_conn();
                true
            }
            Err(e) => {
                self.note(e);
                !e.is_would_block()
            }
        }
    }

    /// Reads everything available now; true if anything arrived.
    pub fn read_all(&mut self, sim: &SimSys) -> bool {
        let mut any = false;
        while self.read(sim, 1 << 16) {
            any = true;
        }
        any
    }

    fn note(&mut self, e: Errno) {
        if e == Errno::ECONNRESET || e == Errno::EPIPE {
            self.reset = true;
        }
    }

    /// Takes the id from the greeting: the first frame, or for the remote
    /// end of a dial the first after the handle messages sent before the
    /// connect completed (`ServerHandle::connect` writes those first).
    fn learn_conn(&mut self) {
        let codec = LengthPrefixed::default();
        let mut at = 0;
        while self.conn.is_none() {
            let Ok(Decoded::Frame { payload, consumed }) = codec.decode(&self.received[at..])
            else {
                return;
            };
            let frame = &self.received[at + payload.start..at + payload.end];
            if self.dialed.is_some() && frame.starts_with(HANDLE_MSG) {
                at += consumed;
                continue;
            }
            self.conn = parse_greeting(frame);
            return;
        }
    }

    /// Closes it (FIN, or RST if replies were left unread) or resets it.
    pub fn close(&mut self, sim: &SimSys, reset: bool) -> SysResult<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        if reset {
            sim.client_reset(self.sim)
        } else {
            sim.client_close(self.sim)
        }
    }

    /// The complete frames written, as payloads.
    pub fn sent_frames(&self) -> Vec<&[u8]> {
        let mut start = 0;
        let mut out = Vec::new();
        for &end in &self.frame_ends {
            if end > self.written {
                break;
            }
            out.push(&self.script[start + 4..end]);
            start = end;
        }
        out
    }

    /// Checks what it received; `exact`: nothing may be missing.
    pub fn verify(&self, exact: bool, problems: &mut Vec<String>) {
        let who = format!("client {} ({:?})", self.index, self.conn);
        let codec = LengthPrefixed::default();
        let mut frames = Vec::new();
        let mut at = 0;
        loop {
            match codec.decode(&self.received[at..]) {
                Ok(Decoded::Frame { payload, consumed }) => {
                    frames.push(&self.received[at + payload.start..at + payload.end]);
                    at += consumed;
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => {
                    problems.push(format!(
                        "{who}: its stream does not parse as frames ({e}): interleaved or corrupt"
                    ));
                    return;
                }
            }
        }
        // A torn last frame is truncation, not interleaving: fine when the
        // connection was cut short (a reset, an abortive close), never when
        // everything was owed.
        if at < self.received.len() && exact {
            problems.push(format!(
                "{who}: {} bytes of a torn frame at the end",
                self.received.len() - at
            ));
        }
        let mut frames = frames.into_iter().peekable();
        let mut handled = Vec::new();
        if self.dialed.is_some() {
            while let Some(early) = frames.next_if(|f| f.starts_with(HANDLE_MSG)) {
                handled.push(early);
            }
        }
        match frames.next() {
            None if exact => problems.push(format!("{who}: no greeting")),
            None => return,
            Some(g) if g.starts_with(GREETING) && parse_greeting(g).is_some() => {}
            Some(g) => {
                problems.push(format!(
                    "{who}: first frame is not a greeting: {:?}",
                    String::from_utf8_lossy(g)
                ));
                return;
            }
        }
        let sent = self.sent_frames();
        let mut echoes = 0;
        for frame in frames {
            if frame.starts_with(HANDLE_MSG) {
                handled.push(frame);
                continue;
            }
            match sent.get(echoes) {
                Some(want) if *want == frame => echoes += 1,
                Some(want) => {
                    problems.push(format!(
                        "{who}: reply {echoes} is {:?}, expected the echo {:?}",
                        preview(frame),
                        preview(want)
                    ));
                    return;
                }
                None => {
                    problems.push(format!(
                        "{who}: a reply to a frame it never sent: {:?}",
                        preview(frame)
                    ));
                    return;
                }
            }
        }
        if exact && echoes != sent.len() {
            problems.push(format!(
                "{who}: {echoes} replies for {} complete frames sent",
                sent.len()
            ));
        }
        // Handle messages: only its own, in order, whole.
        let mut matched = vec![false; self.handle_msgs.len()];
        let mut next = 0;
        for got in handled {
            match self.conn {
                Some(conn) if !addressed_to(got, conn) => {
                    problems.push(format!(
                        "{who}: received a message for another connection: {:?}",
                        preview(got)
                    ));
                }
                _ => {}
            }
            match self.handle_msgs[next..]
                .iter()
                .position(|m| m.payload == got)
            {
                Some(skip) => {
                    // Queues are FIFO and hold messages whole: one that was
                    // accepted, and had to arrive, cannot be passed by a
                    // later one, whether or not the connection closed since.
                    let passed = self.handle_msgs[next..next + skip]
                        .iter()
                        .filter(|m| m.accepted && m.required)
                        .count();
                    if passed > 0 {
                        problems.push(format!(
                            "{who}: {passed} accepted handle messages lost before one sent after them: {:?}",
                            preview(got)
                        ));
                    }
                    matched[next + skip] = true;
                    next += skip + 1;
                }
                None => problems.push(format!(
                    "{who}: handle message out of order or unknown: {:?}",
                    preview(got)
                )),
            }
        }
        if exact {
            let missing = self
                .handle_msgs
                .iter()
                .zip(&matched)
                .filter(|(m, arrived)| m.accepted && m.required && !**arrived)
                .count();
            if missing > 0 {
                problems.push(format!(
                    "{who}: {missing} accepted handle messages never arrived"
                ));
            }
        }
    }
}

/// A handle message for `conn`.
pub fn handle_message(conn: ConnId, n: usize, len: usize) -> Vec<u8> {
    let mut m = HANDLE_MSG.to_vec();
    m.extend_from_slice(format!("{}:{}:{n}:", conn.slot(), conn.generation()).as_bytes());
    m.resize(m.len() + len, b'.');
    m
}

fn addressed_to(msg: &[u8], conn: ConnId) -> bool {
    let mut prefix = HANDLE_MSG.to_vec();
    prefix.extend_from_slice(format!("{}:{}:", conn.slot(), conn.generation()).as_bytes());
    msg.starts_with(&prefix)
}

fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
    if bytes.len() > 40 {
        format!("{text}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::greeting;

    /// A client greeted as `id` that received `frames` (after the greeting)
    /// and had `sent` handle messages accepted for it.
    fn client_with(id: ConnId, sent: &[Vec<u8>], frames: &[&[u8]]) -> Client {
        let (sim, addr) = crate::scenario::tests::sim_with_listener();
        let mut c = Client::new(0, sim.connect(&addr).unwrap(), 1, 0, 0);
        c.conn = Some(id);
        let codec = LengthPrefixed::default();
        codec.encode(&[&greeting(id)], &mut c.received).unwrap();
        for f in frames {
            codec.encode(&[f], &mut c.received).unwrap();
        }
        c.handle_msgs = sent
            .iter()
            .map(|m| HandleMsg {
                payload: m.clone(),
                accepted: true,
                required: true,
            })
            .collect();
        c
    }

    /// A checker weakness a review found: a client closed early is checked
    /// for a prefix only, and a handle message lost from the middle of the
    /// stream (the one after it arrived) passed.
    #[test]
    fn an_accepted_handle_message_passed_by_a_later_one_is_a_problem_even_when_closed_early() {
        let id = ConnId::new(1, 0);
        let sent: Vec<Vec<u8>> = (0..3).map(|n| handle_message(id, n, 4)).collect();
        let mut gap = client_with(id, &sent, &[&sent[0], &sent[2]]);
        gap.closed = true;
        let mut problems = Vec::new();
        gap.verify(false, &mut problems);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("lost before one sent after them")),
            "{problems:?}"
        );
        // A prefix is what an early close may leave: fine.
        let mut prefix = client_with(id, &sent, &[&sent[0], &sent[1]]);
        prefix.closed = true;
        let mut problems = Vec::new();
        prefix.verify(false, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }
}
