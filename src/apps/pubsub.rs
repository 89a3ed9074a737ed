//! Pub/sub: topic fan-out, the cross-connection workload.
//!
//! Each frame's payload is one command; every command gets one reply:
//!
//! | command | effect | reply |
//! |---|---|---|
//! | `SUB <topic>` | subscribe this connection to `<topic>` | `OK SUB <topic>` |
//! | `UNSUB <topic>` | unsubscribe | `OK UNSUB <topic>` |
//! | `PUB <topic> <payload>` | send `MSG <topic> <payload>` to every subscriber (the space before the payload is required; the payload may be empty) | `OK PUB <n>`, `n` the subscribers it was queued for |
//!
//! Anything else gets `ERR <reason>` and the connection stays open. Topics
//! are 1 to 256 bytes without spaces; a connection holds at most 1024
//! subscriptions, and the server at most [`MAX_TOTAL_SUBSCRIPTIONS`] (or
//! what [`PubSub::with_max_subscriptions`] says): a topic is stored twice,
//! so without a server-wide bound every connection the pool allows could
//! hold half a megabyte (about 768 KiB of heap, measured, with distinct
//! longest topics). The server-wide bound is first come, first served: one
//! peer with 256 connections can hold all of it, and every other `SUB` is
//! refused until it lets go (the pool bounds its connections; nothing
//! divides the bound between peers). Payloads are binary-safe with
//! length-prefixed framing.
//!
//! # Guarantees
//!
//! - A publication is framed once and queued, whole, at most once per
//!   subscriber; each subscriber gets one publisher's messages in the order
//!   that publisher sent them (one reader per connection, FIFO queues).
//! - A subscriber gets its `OK SUB` before any message the subscription
//!   lets in, and every publication a publisher starts after that `OK` was
//!   written: the reply is put in the connection's out-queue
//!   ([`Ctx::queue`]) before the subscription becomes visible, and written
//!   ([`Ctx::flush`]) after.
//! - A connection subscribed to a topic it publishes to gets its own
//!   message in order with its replies: after the replies to the commands
//!   before the `PUB`, before `OK PUB`. It goes as a reply, so neither the
//!   server-wide output budget nor the slow-receiver policy applies to it.
//! - A subscriber never gets a message for a topic it never subscribed to.
//!   Publications racing an `UNSUB` may still arrive around the `OK`, at
//!   most one from each publisher that copied the subscriber list before
//!   the `UNSUB` took effect.
//! - Subscribers are held by connection id: a subscriber that disconnects is
//!   removed in `on_close`, and a message in flight for it is refused by the
//!   generation check, never delivered to the slot's next occupant.
//! - No lock is held while sending (sends are syscalls), and a publication
//!   holds the registry's lock only to clone a pointer to its topic's
//!   subscriber set, however wide the topic (a `SUB` or `UNSUB` while a
//!   publication still sends to the old set copies it). A subscriber whose output is full is handled by the
//!   server's slow-receiver policy (closed, by default). While the
//!   server-wide output budget (`max_out_total`) is full, a publication is
//!   not queued for subscribers it would push past it: they miss it and
//!   stay subscribed (no policy applies to a budget others filled), and
//!   the publisher's `OK PUB n` counts only the subscribers it reached.
//!   A publication
//!   larger than a subscriber's whole output limit (`max_out`) is not a
//!   slow subscriber: it is refused to its publisher with `ERR`, and no
//!   subscriber is touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::core::ConnId;
use crate::handler::{CloseInfo, Ctx, Handler};

/// The longest topic.
pub const MAX_TOPIC: usize = 256;

/// The most subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// The longest reply to a well-formed command (`OK SUB` or `OK UNSUB` and a
/// longest topic; an `ERR` is shorter). A framing whose `max_frame` is
/// below it cannot carry every reply: the binary refuses such a setting
/// for `--app pubsub`, and a reply the framing refuses closes its
/// connection (after the replies before it), logged, rather than leave the
/// client waiting for an answer that never comes.
pub const LONGEST_REPLY: usize = "OK UNSUB ".len() + MAX_TOPIC;

/// The most subscriptions the server holds by default, over all
/// connections. A subscription costs about 768 bytes of heap when every
/// topic is distinct and of the longest length (measured: tests/alloc.rs,
/// the topic twice, the trees' nodes, the topic's subscriber set), so the
/// default bounds subscriptions to about 192 MiB.
pub const MAX_TOTAL_SUBSCRIPTIONS: usize = 1 << 18;

/// The pub/sub application. See the [module docs](self).
#[derive(Debug)]
pub struct PubSub {
    registry: Mutex<Registry>,
    max_total: usize,
    /// `SUB`s refused for `max_total`: logged on the 1st, 2nd, 4th, 8th...,
    /// since one peer can send them as fast as it sends frames.
    refused: AtomicU64,
    /// Replies the framing refused (see [`LONGEST_REPLY`]), logged the same
    /// way.
    unframed: AtomicU64,
}

/// Subscribers by topic, and how many subscriptions that is.
#[derive(Debug, Default)]
struct Registry {
    /// Shared with publishers: a publication clones the pointer under the
    /// lock (not the set), and a change while one still sends to the old
    /// set copies it (`Arc::make_mut`).
    topics: BTreeMap<Vec<u8>, Arc<BTreeSet<ConnId>>>,
    /// The sum of the sets' sizes, plus the subscriptions counted but not
    /// visible yet (a `SUB` between its count and the queueing of its
    /// `OK`, which makes it visible under the same lock).
    subscriptions: usize,
}

impl Registry {
    /// Removes `id` from `topic`'s subscribers, if it was one.
    fn remove(&mut self, topic: &[u8], id: ConnId) {
        if let Some(set) = self.topics.get_mut(topic) {
            if set.contains(&id) && Arc::make_mut(set).remove(&id) {
                self.subscriptions -= 1;
            }
            if set.is_empty() {
                self.topics.remove(topic);
            }
        }
        // O(1): every topic kept has a subscriber (summing the sets would
        // cost O(topics) per removal, under the lock).
        debug_assert!(self.subscriptions >= self.topics.len());
    }
}

impl Default for PubSub {
    fn default() -> Self {
        Self::with_max_subscriptions(MAX_TOTAL_SUBSCRIPTIONS)
    }
}

/// One connection's subscriptions (owned by its read side).
#[derive(Debug, Default)]
pub struct Subscriber {
    topics: BTreeSet<Vec<u8>>,
}

/// A command, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `SUB <topic>`
    Sub(&'a [u8]),
    /// `UNSUB <topic>`
    Unsub(&'a [u8]),
    /// `PUB <topic> <payload>`
    Pub(&'a [u8], &'a [u8]),
}

/// Parses one command; `Err` says what is wrong with it.
///
/// The grammar is strict so that every accepted command has exactly one
/// spelling: one space after the verb, none in or after a topic of `SUB` and
/// `UNSUB`, and `PUB` always has the space that starts its payload (which may
/// be empty).
pub fn parse(msg: &[u8]) -> Result<Command<'_>, &'static str> {
    let (verb, rest) = split_word(msg);
    // The verb first: a `LIST` is an unknown command, not a missing topic.
    if !matches!(verb, b"SUB" | b"UNSUB" | b"PUB") {
        return Err("unknown command (SUB, UNSUB or PUB)");
    }
    let (topic, payload) = split_word(rest.unwrap_or_default());
    if topic.is_empty() {
        return Err("missing topic");
    }
    if topic.len() > MAX_TOPIC {
        return Err("topic longer than 256 bytes");
    }
    match (verb, payload) {
        (b"SUB", None) => Ok(Command::Sub(topic)),
        (b"UNSUB", None) => Ok(Command::Unsub(topic)),
        (b"SUB" | b"UNSUB", Some(_)) => Err("a topic has no spaces"),
        (b"PUB", Some(payload)) => Ok(Command::Pub(topic, payload)),
        (b"PUB", None) => Err("PUB needs a space after the topic, then the payload"),
        _ => Err("unknown command (SUB, UNSUB or PUB)"),
    }
}

/// The bytes before the first space, and those after it (`None` when there
/// is no space at all).
fn split_word(bytes: &[u8]) -> (&[u8], Option<&[u8]>) {
    match bytes.iter().position(|&b| b == b' ') {
        Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
        None => (bytes, None),
    }
}

impl PubSub {
    /// A pub/sub server that holds at most `max` subscriptions over all its
    /// connections; a `SUB` past it gets `ERR`.
    pub fn with_max_subscriptions(max: usize) -> Self {
        Self {
            registry: Mutex::new(Registry::default()),
            max_total: max,
            refused: AtomicU64::new(0),
            unframed: AtomicU64::new(0),
        }
    }

    /// Replies with `parts` as one frame; if the framing refuses it, closes
    /// the connection once the replies before it are written (see
    /// [`LONGEST_REPLY`]) and returns false.
    fn answer(&self, ctx: &mut Ctx<'_>, parts: &[&[u8]]) -> bool {
        let Err(e) = ctx.reply_parts(parts) else {
            return true;
        };
        let unframed = self.unframed.fetch_add(1, Ordering::Relaxed) + 1;
        if unframed.is_power_of_two() {
            log::warn!(
                "{}: a pub/sub reply does not fit the framing ({e}); closing the connection \
                 (the framing's max_frame should be at least {LONGEST_REPLY} bytes; \
                 {unframed} such replies so far)",
                ctx.id()
            );
        }
        ctx.close_after_flush();
        false
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribers of `topic` now.
    pub fn subscribers(&self, topic: &[u8]) -> usize {
        self.registry().topics.get(topic).map_or(0, |set| set.len())
    }

    /// Subscriptions held now, over all connections.
    pub fn subscriptions(&self) -> usize {
        self.registry().subscriptions
    }

    fn publish(&self, ctx: &mut Ctx<'_>, topic: &[u8], payload: &[u8]) {
        // A pointer copy under the lock, whatever the topic's width.
        let subscribers: Arc<BTreeSet<ConnId>> = self
            .registry()
            .topics
            .get(topic)
            .map(Arc::clone)
            .unwrap_or_default();
        let frame = match ctx.server().frame(&[b"MSG ", topic, b" ", payload]) {
            Ok(frame) => frame,
            Err(e) => {
                self.answer(ctx, &[format!("ERR {e}").as_bytes()]);
                return;
            }
        };
        // Refused to every subscriber alike, this one included (its own
        // copy goes as a reply, which nothing would refuse).
        let limit = ctx.server().max_send();
        if frame.as_bytes().len() > limit {
            let len = frame.as_bytes().len();
            self.answer(
                ctx,
                &[format!(
                    "ERR a {len}-byte publication is over the output limit of {limit} bytes"
                )
                .as_bytes()],
            );
            return;
        }
        // A send each: what the publication costs its turn's frame budget.
        ctx.spend(subscribers.len());
        // The lock is released: sending may take a while and never happens
        // under it.
        let mut queued = 0;
        let mut to_self = false;
        for id in subscribers.iter() {
            if *id == ctx.id() {
                // Not sent through the handle: a send goes to the kernel at
                // once, ahead of this turn's replies so far (an `OK SUB`
                // in the same read); as a reply it follows them.
                to_self = true;
                continue;
            }
            // TooLarge cannot come (checked above, by the rule the queue
            // applies); Full is the slow-receiver policy's business, and
            // Closed a subscriber on its way out.
            if ctx.server().send_frame(*id, &frame).is_ok() {
                queued += 1;
            }
        }
        if to_self {
            ctx.reply_raw(frame.as_bytes());
            queued += 1;
        }
        self.answer(ctx, &[format!("OK PUB {queued}").as_bytes()]);
    }
}

impl Handler for PubSub {
    type Conn = Subscriber;

    fn on_open(&self, _ctx: &mut Ctx<'_>) -> Subscriber {
        Subscriber::default()
    }

    fn on_message(&self, conn: &mut Subscriber, ctx: &mut Ctx<'_>, msg: &[u8]) {
        match parse(msg) {
            Ok(Command::Sub(topic)) => {
                if !conn.topics.contains(topic) {
                    if conn.topics.len() >= MAX_SUBSCRIPTIONS {
                        // The peer's own limit, told in the reply: nothing
                        // to log (it costs nobody else anything).
                        let refusal = format!(
                            "ERR too many subscriptions on this connection (at most {MAX_SUBSCRIPTIONS})"
                        );
                        self.answer(ctx, &[refusal.as_bytes()]);
                        return;
                    }
                    let mut registry = self.registry();
                    if registry.subscriptions >= self.max_total {
                        drop(registry);
                        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                        if refused.is_power_of_two() {
                            log::warn!(
                                "{}: SUB refused: the server holds its most subscriptions, {} (refused {refused} times)",
                                ctx.id(),
                                self.max_total
                            );
                        }
                        self.answer(ctx, &[b"ERR too many subscriptions on the server"]);
                        return;
                    }
                    // Counted now, visible once the `OK` is in the
                    // connection's out-queue (`Ctx::queue`, no write): a
                    // publisher that sees the subscription sends behind
                    // it, never ahead of the reply that announces it.
                    // Visible before the `OK` can be written (both under
                    // the lock), so a publisher that starts once the
                    // subscriber has its `OK` sees it. No lock is held
                    // across the write (the flush).
                    registry.subscriptions += 1;
                    drop(registry);
                    if !self.answer(ctx, &[b"OK SUB ", topic]) {
                        self.registry().subscriptions -= 1;
                        return;
                    }
                    // Queued under the lock, not before it: another thread
                    // driving this connection's writer (a send to it, an
                    // EPOLLOUT) could otherwise write the `OK` while the
                    // subscription is still invisible.
                    let id = ctx.id();
                    let mut registry = self.registry();
                    ctx.queue();
                    let added = Arc::make_mut(registry.topics.entry(topic.to_vec()).or_default())
                        .insert(id);
                    debug_assert!(added, "{id}: subscribed twice to one topic");
                    drop(registry);
                    conn.topics.insert(topic.to_vec());
                    ctx.flush();
                    return;
                }
                self.answer(ctx, &[b"OK SUB ", topic]);
            }
            Ok(Command::Unsub(topic)) => {
                if conn.topics.remove(topic) {
                    self.registry().remove(topic, ctx.id());
                }
                self.answer(ctx, &[b"OK UNSUB ", topic]);
            }
            Ok(Command::Pub(topic, payload)) => self.publish(ctx, topic, payload),
            Err(reason) => {
                self.answer(ctx, &[b"ERR ", reason.as_bytes()]);
            }
        }
    }

    fn on_close(&self, conn: Subscriber, info: CloseInfo<'_>) {
        let mut registry = self.registry();
        for topic in conn.topics {
            registry.remove(&topic, info.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse(b"SUB news"), Ok(Command::Sub(b"news")));
        assert_eq!(parse(b"UNSUB news"), Ok(Command::Unsub(b"news")));
        assert_eq!(
            parse(b"PUB news hello world"),
            Ok(Command::Pub(b"news", b"hello world"))
        );
        assert_eq!(parse(b"PUB news "), Ok(Command::Pub(b"news", b"")));
        assert!(parse(b"PUB").is_err());
        assert!(parse(b"SUB a b").is_err());
        // One spelling per command (found by the `pubsub_command` fuzzer).
        assert!(parse(b"PUB news").is_err(), "no payload separator");
        assert!(parse(b"SUB news ").is_err(), "trailing space");
        let unknown = Err("unknown command (SUB, UNSUB or PUB)");
        assert_eq!(parse(b"LIST"), unknown);
        assert_eq!(parse(b""), unknown);
        assert_eq!(parse(b"FOO bar"), unknown);
        // The verb is looked at before the topic (an audit's finding: these
        // were "missing topic" and "topic longer than 256 bytes").
        assert_eq!(parse(&[b"FOO ".as_slice(), &[b'x'; 300]].concat()), unknown);
        assert_eq!(parse(b"SUB"), Err("missing topic"));
        assert_eq!(parse(b"PUB "), Err("missing topic"));
        assert_eq!(
            parse(&[b"SUB ".as_slice(), &[b'x'; 257]].concat()),
            Err("topic longer than 256 bytes")
        );
    }
}
