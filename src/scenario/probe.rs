//! The handler the scenarios run: echo, a greeting that names the
//! connection, and a record of every open, close and failed connect.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use crate::core::{CloseReason, ConnId};
use crate::handler::{CloseInfo, ConnectFailure, Ctx, Handler};
use crate::sys::Errno;
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
}

impl Probe {
    /// A probe timing its records on `sim`'s scheduler.
    pub fn new(sim: SimSys) -> Self {
        Self {
            log: Arc::default(),
            sim,
        }
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
        let step = self.step();
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .opened
            .insert(id, step);
        // A greeting that fits any codec the scenarios use.
        let _ = ctx.reply(&greeting(id));
        id
    }

    fn on_message(&self, conn: &mut ConnId, ctx: &mut Ctx<'_>, msg: &[u8]) {
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
    }

    fn on_close(&self, conn: ConnId, info: CloseInfo<'_>) {
        let step = self.step();
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
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
