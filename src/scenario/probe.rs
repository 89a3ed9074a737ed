//! The handler the scenarios run: echo, a greeting that names the
//! connection, and a record of every open, close and failed connect.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use crate::core::{CloseReason, ConnId};
use crate::handler::{CloseInfo, ConnectFailure, Ctx, Handler};
use crate::sys::Errno;
use crate::sys::Sys;
use crate::sys::sim::SimSys;

/// The greeting's prefix; the rest is "slot:generation".
pub const GREETING: &[u8] = b"g:";

/// What the probe saw, with the scheduler's step count as the clock.
#[derive(Debug, Default)]
pub struct ProbeLog {
    /// Connections opened, with the step.
    pub opened: BTreeMap<ConnId, u64>,
    /// Connections closed: reason and step of the first `on_close`.
    pub closed: BTreeMap<ConnId, (CloseReason, u64)>,
    /// `on_close` calls beyond the first, per connection (must stay empty).
    pub extra_closes: Vec<ConnId>,
    /// Messages received, per connection.
    pub messages: BTreeMap<ConnId, u64>,
    /// Outbound connections that failed: error, step and address of the
    /// first `on_connect_failed`.
    pub failed: BTreeMap<ConnId, (Errno, u64, SocketAddr)>,
    /// `on_connect_failed` calls beyond the first (must stay empty).
    pub extra_failures: Vec<ConnId>,
    /// Handler calls given another connection's state (must stay empty).
    /// Recorded, not asserted: the server catches a handler's panic, so an
    /// assertion here would only turn a mix-up into a quiet missing close.
    pub wrong_state: Vec<String>,
    /// Connections inside a handler call now (`on_open`, `on_message`,
    /// `on_close`): invariant R serializes a connection's calls.
    inside: BTreeSet<ConnId>,
    /// Handler calls that began while another call for the same connection
    /// was under way (must stay empty).
    pub overlapping: Vec<String>,
}

impl ProbeLog {
    /// Handler calls so far (`on_open`, `on_message`, `on_close`,
    /// `on_connect_failed`).
    pub fn calls(&self) -> u64 {
        let counted = self.opened.len()
            + self.closed.len()
            + self.extra_closes.len()
            + self.failed.len()
            + self.extra_failures.len();
        counted as u64 + self.messages.values().sum::<u64>()
    }
}

/// Echo with a greeting, recording opens and closes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Probe {
    log: Arc<Mutex<ProbeLog>>,
    sim: SimSys,
    /// Take a scheduling point inside each `on_message`.
    yields: bool,
}

impl Probe {
    /// A probe timing its records on `sim`'s scheduler; `yields`: other
    /// threads may run inside each `on_message` (a finer schedule).
    pub fn new(sim: SimSys, yields: bool) -> Self {
        Self {
            log: Arc::default(),
            sim,
            yields,
        }
    }

    /// Marks a handler call for `id` begun; records an overlap if one was
    /// under way.
    fn enter(&self, id: ConnId, call: &str) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if !log.inside.insert(id) {
            log.overlapping
                .push(format!("{call} for {id} began inside another call for it"));
        }
    }

    /// Marks a handler call for `id` ended.
    fn leave(&self, id: ConnId) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.inside.remove(&id);
    }

    /// Runs `f` on the log.
    pub fn with_log<R>(&self, f: impl FnOnce(&ProbeLog) -> R) -> R {
        f(&self.log.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn step(&self) -> u64 {
        self.sim.sched().steps()
    }
}

/// The greeting for connection `id`.
pub fn greeting(id: ConnId) -> Vec<u8> {
    let mut g = GREETING.to_vec();
    g.extend_from_slice(format!("{}:{}", id.slot(), id.generation()).as_bytes());
    g
}

/// Parses a greeting.
pub fn parse_greeting(payload: &[u8]) -> Option<ConnId> {
    let text = std::str::from_utf8(payload.strip_prefix(GREETING)?).ok()?;
    let (slot, generation) = text.split_once(':')?;
    Some(ConnId::new(slot.parse().ok()?, generation.parse().ok()?))
}

impl Handler for Probe {
    type Conn = ConnId;

    fn on_open(&self, ctx: &mut Ctx<'_>) -> ConnId {
        let id = ctx.id();
        self.enter(id, "on_open");
        let step = self.step();
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .opened
            .insert(id, step);
        // A greeting that fits any codec the scenarios use.
        let _ = ctx.reply(&greeting(id));
        self.leave(id);
        id
    }

    fn on_message(&self, conn: &mut ConnId, ctx: &mut Ctx<'_>, msg: &[u8]) {
        self.enter(ctx.id(), "on_message");
        if self.yields {
            self.sim.preempt("on_message");
        }
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        *log.messages.entry(*conn).or_default() += 1;
        if *conn != ctx.id() {
            log.wrong_state.push(format!(
                "on_message for {} was given {conn}'s state",
                ctx.id()
            ));
        }
        drop(log);
        if ctx.reply(msg).is_err() {
            ctx.close();
        }
        self.leave(ctx.id());
    }

    fn on_close(&self, conn: ConnId, info: CloseInfo<'_>) {
        self.enter(info.id, "on_close");
        let step = self.step();
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.inside.remove(&info.id);
        if conn != info.id {
            log.wrong_state
                .push(format!("on_close for {} was given {conn}'s state", info.id));
        }
        match log.closed.entry(info.id) {
            std::collections::btree_map::Entry::Occupied(_) => log.extra_closes.push(info.id),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((info.reason, step));
            }
        }
    }

    fn on_connect_failed(&self, failure: ConnectFailure<'_>) {
        let (id, error, addr) = (failure.id, failure.error, failure.addr);
        let step = self.step();
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        match log.failed.entry(id) {
            std::collections::btree_map::Entry::Occupied(_) => log.extra_failures.push(id),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((error, step, addr));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::sim::SimConfig;

    /// The overlap record the checker reports: a second call for one
    /// connection inside the first is recorded; calls in turn, or for two
    /// connections at once, are not.
    #[test]
    fn a_call_inside_another_for_the_same_connection_is_recorded() {
        let probe = Probe::new(SimSys::new(SimConfig::default()), false);
        let (a, b) = (ConnId::new(1, 1), ConnId::new(2, 1));
        probe.enter(a, "on_message");
        probe.enter(b, "on_message");
        probe.leave(b);
        probe.leave(a);
        probe.enter(a, "on_message");
        probe.leave(a);
        assert!(probe.with_log(|log| log.overlapping.is_empty()));
        probe.enter(a, "on_message");
        probe.enter(a, "on_close");
        let overlapping = probe.with_log(|log| log.overlapping.clone());
        assert_eq!(
            overlapping,
            ["on_close for conn#1.1 began inside another call for it"]
        );
    }
}
