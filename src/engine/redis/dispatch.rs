//! The receive path, two threads with a queue between them:
//!
//! - the relay takes each message off fred's bounded broadcast buffer the
//!   moment it arrives and appends it to the inbox (a lock, a push). Being
//!   a thread of its own, it is woken by the OS at once rather than queued
//!   behind fred's reader on a tokio worker, and it does so little that it
//!   keeps up with any Redis connection: fred's buffer does not overflow.
//! - the dispatcher takes the inbox in batches and acts on each message
//!   without waiting on anything (no I/O, no `.await`): pushes go straight
//!   into the recipients' queues, commands change the hub and mark the
//!   mirror, replies wake their callers.
//!
//! The inbox grows with a burst and gives its memory back after; it is
//! bounded by bytes. Past the bound (a node far behind for long), a message
//! is dropped, counted in `gatecast_pubsub_dropped_total` and logged with
//! what it was for; so is anything fred itself dropped. Never silent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::types::Message as RedisMessage;
use parking_lot::{Condvar, Mutex};
use tokio::sync::broadcast::{self, error::RecvError};

use super::envelope::{peek_origin, EnvelopeRef, Op};
use super::keys::Channel;
use super::membership::Change;
use super::Shared;
use crate::frame::close_code;
use crate::ids::{ClientId, NodeId};
use crate::push::{encode_frame, Target};
use crate::task::spawn_critical_thread;

/// Most bytes (payloads plus a fixed overhead each) the inbox holds.
const INBOX_BYTES: usize = 64 << 20;

/// What a queued message costs beyond its payload, roughly.
const MESSAGE_OVERHEAD: usize = 160;

/// How long the dispatcher waits for more messages before it hands back
/// what the last burst freed (see `crate::allocator`).
const COLLECT_AFTER: std::time::Duration = crate::allocator::COLLECT_EVERY;

/// Messages handed from the relay to the dispatcher.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    ready: Condvar,
}

#[derive(Default)]
struct InboxState {
    messages: VecDeque<RedisMessage>,
    bytes: usize,
    closed: bool,
}

fn cost(message: &RedisMessage) -> usize {
    MESSAGE_OVERHEAD + message.value.as_bytes().map_or(0, <[u8]>::len)
}

/// Starts the relay and the dispatcher threads; they stop when the
/// subscriber connection quits.
pub fn start(s: &Arc<Shared>, messages: broadcast::Receiver<RedisMessage>) -> std::io::Result<()> {
    let inbox = Arc::new(Inbox::default());
    let (relay_inbox, relay_shared) = (inbox.clone(), s.clone());
    spawn_critical_thread("gatecast-relay", &s.fatal, &s.stop, move || {
        relay(&relay_shared, messages, &relay_inbox)
    })?;
    let shared = s.clone();
    spawn_critical_thread("gatecast-dispatch", &s.fatal, &s.stop, move || {
        dispatch_all(&shared, &inbox)
    })
}

fn relay(s: &Shared, mut messages: broadcast::Receiver<RedisMessage>, inbox: &Inbox) {
    let mut lost = LossLog::default();
    loop {
        match messages.blocking_recv() {
            Ok(message) => {
                let mut state = inbox.state.lock();
                let cost = cost(&message);
                if state.bytes + cost > INBOX_BYTES {
                    drop(state);
                    s.metrics.pubsub_dropped.inc();
                    lost.dropped(1, Some(&message));
                    continue;
                }
                state.bytes += cost;
                state.messages.push_back(message);
                let was_empty = state.messages.len() == 1;
                drop(state);
                if was_empty {
                    inbox.ready.notify_one();
                }
            }
            Err(RecvError::Lagged(n)) => {
                s.metrics.pubsub_dropped.inc_by(n);
                lost.dropped(n, None);
            }
            Err(RecvError::Closed) => {
                inbox.state.lock().closed = true;
                inbox.ready.notify_one();
                return;
            }
        }
    }
}

fn dispatch_all(s: &Shared, inbox: &Inbox) {
    let mut batch = VecDeque::new();
    let mut idle_since_collect = true;
    loop {
        {
            let mut state = inbox.state.lock();
            while state.messages.is_empty() && !state.closed {
                // Idle after a burst: hand back what it freed (frames this
                // thread encoded, dropped by the connections), then sleep.
                if idle_since_collect {
                    inbox.ready.wait(&mut state);
                } else if inbox.ready.wait_for(&mut state, COLLECT_AFTER).timed_out() {
                    crate::allocator::collect();
                    idle_since_collect = true;
                }
            }
            idle_since_collect = false;
            if state.messages.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut state.messages);
            state.bytes = 0;
        }
        for message in batch.drain(..) {
            s.on_message(&message);
        }
        if batch.capacity() > 1024 {
            // Give back what a burst grew.
            batch = VecDeque::new();
        }
    }
}

/// Logs lost messages with their count and what they were for, at most
/// once a second.
#[derive(Default)]
struct LossLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl LossLog {
    fn dropped(&mut self, n: u64, message: Option<&RedisMessage>) {
        self.unlogged += n;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        // What the last one lost was for: its channel, and the client a
        // command was about.
        let channel = message.map(|m| m.channel.to_string());
        let client_id = message
            .and_then(|m| m.value.as_bytes())
            .and_then(|b| EnvelopeRef::decode(b).ok())
            .and_then(|e| e.client_id.map(str::to_owned));
        tracing::warn!(
            dropped = self.unlogged,
            channel,
            client_id,
            "pub/sub messages dropped: this node falls behind Redis (see gatecast_pubsub_dropped_total)"
        );
        self.last = Some(Instant::now());
        self.unlogged = 0;
    }
}

impl Shared {
    fn on_message(&self, message: &RedisMessage) {
        self.metrics.pubsub_received.inc();
        let Some(channel) = self.keys.parse_channel(&message.channel) else {
            return;
        };
        let Some(bytes) = message.value.as_bytes() else {
            return self.malformed(channel, "not a byte string");
        };
        // Pushed through this node: already delivered here. Read from the
        // first key, without decoding the rest.
        if peek_origin(bytes) == Some(self.node_name.as_str()) {
            return;
        }
        let envelope = match EnvelopeRef::decode(bytes) {
            Ok(envelope) => envelope,
            Err(e) => return self.malformed(channel, &e.to_string()),
        };
        if envelope.origin == Some(self.node_name.as_str()) {
            return;
        }
        let longest = [&envelope.client_ids, &envelope.exclude, &envelope.groups]
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(0);
        if longest > self.settings.max_list_items {
            return self.malformed(channel, "a list longer than --max-list-items");
        }
        if let Err(reason) = self.dispatch(channel, envelope) {
            self.malformed(channel, reason);
        }
    }

    fn malformed(&self, channel: Channel<'_>, reason: &str) {
        self.metrics.pubsub_malformed.inc();
        tracing::warn!(?channel, reason, "skipped a malformed message from redis");
    }

    fn dispatch(&self, channel: Channel<'_>, e: EnvelopeRef<'_>) -> Result<(), &'static str> {
        match (channel, e.op) {
            (_, Op::Push) => self.deliver(channel, &e),
            (Channel::Node(_), Op::Reply) => {
                let req = e.req.ok_or("reply without req")?;
                self.rpc.resolve(req, e.error);
                Ok(())
            }
            (Channel::Node(_), Op::Close) => {
                let id = parse_id(e.client_id).ok_or("close without client_id")?;
                let last = match e.data.as_deref() {
                    Some(data) => Some(self.checked_frame(e.binary, data)?),
                    None => None,
                };
                self.hub
                    .close_client(id, last, close_code::NORMAL, "closed by server");
                Ok(())
            }
            (Channel::Group(group), Op::Ungroup) => {
                self.ungroup_here(group);
                self.reply_later(&e);
                Ok(())
            }
            (Channel::Node(_), _) => {
                let id = parse_id(e.client_id).ok_or("command without client_id")?;
                let change = Change::from_envelope(&e)?;
                match self.apply(id, change) {
                    Ok(Some(follows)) => self.mirror.mark([id], follows),
                    Ok(None) => {}
                    // Counted by `apply`; the sender (another node, whose
                    // caller got the same check first, or a backend
                    // publishing straight to Redis) hears nothing more.
                    Err(e) => {
                        tracing::warn!(client_id = %id, error = %e, "session command refused")
                    }
                }
                self.reply_later(&e);
                Ok(())
            }
            _ => Err("operation not valid on this channel"),
        }
    }

    /// A command with a request number is answered after the mirror wrote
    /// what it changed.
    fn reply_later(&self, e: &EnvelopeRef<'_>) {
        let to = e.reply_to.and_then(|n| n.parse::<NodeId>().ok());
        if let (Some(req), Some(node)) = (e.req, to) {
            self.mirror.reply(node, req);
        }
    }

    fn deliver(&self, channel: Channel<'_>, e: &EnvelopeRef<'_>) -> Result<(), &'static str> {
        let data = e.data.as_deref().ok_or("push without data")?;
        self.check_message(e.binary, data)?;
        // The payload is copied once, into the frame, at the first
        // recipient on this node.
        let encode = || encode_frame(e.binary, data);
        let exclude: Vec<ClientId> = e.exclude.iter().filter_map(|s| s.parse().ok()).collect();
        let hub = &self.hub;
        let (kind, delivered) = match channel {
            Channel::All => ("all", hub.deliver_with(&Target::All, &exclude, &encode)),
            Channel::Group(group) => (
                "group",
                hub.deliver_group_part(&e.groups, group, &exclude, &encode),
            ),
            Channel::Uid(uid) => {
                let target = Target::Uids(vec![uid.to_owned()]);
                ("uid", hub.deliver_with(&target, &exclude, &encode))
            }
            Channel::Node(_) => {
                let ids = e.client_ids.iter().filter_map(|s| s.parse().ok()).collect();
                let target = Target::Clients(ids);
                ("client", hub.deliver_with(&target, &exclude, &encode))
            }
        };
        self.metrics.delivered(kind, delivered);
        Ok(())
    }

    /// A message from Redis held to the API's rules: at most
    /// `--max-message-bytes`, and text must be UTF-8 (an invalid text frame
    /// would make the client drop its connection).
    fn check_message(&self, binary: bool, data: &[u8]) -> Result<(), &'static str> {
        if data.len() > self.settings.max_message_bytes {
            return Err("message above --max-message-bytes");
        }
        if !binary && std::str::from_utf8(data).is_err() {
            return Err("text message is not UTF-8");
        }
        Ok(())
    }

    fn checked_frame(&self, binary: bool, data: &[u8]) -> Result<bytes::Bytes, &'static str> {
        self.check_message(binary, data)?;
        Ok(encode_frame(binary, data))
    }
}

fn parse_id(s: Option<&str>) -> Option<ClientId> {
    s.and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod proptests;
