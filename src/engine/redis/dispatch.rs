//! The receive path: one thread reads every pub/sub message and acts on it
//! without waiting on anything (no I/O, no `.await`): pushes go straight
//! into the recipients' queues, commands change the hub and mark the
//! mirror, replies wake their callers.
//!
//! A thread of its own rather than a task: fred's reader task fills a
//! bounded broadcast buffer and, on tokio, the task it wakes may wait behind
//! it on the same worker while the buffer overflows. A thread is woken by
//! the OS at once and keeps up with one Redis connection. Should it fall
//! behind anyway, the messages lost are counted and logged, never silent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::types::Message as RedisMessage;
use tokio::sync::broadcast::{self, error::RecvError};

use super::envelope::{peek_origin, EnvelopeRef, Op};
use super::keys::Channel;
use super::membership::Change;
use super::Shared;
use crate::frame::{self, close_code, Opcode};
use crate::ids::{ClientId, NodeId};
use crate::push::Target;

/// Runs until the subscriber connection quits.
pub fn run(s: &Arc<Shared>, mut messages: broadcast::Receiver<RedisMessage>) {
    let mut lag = LagLog::default();
    loop {
        match messages.blocking_recv() {
            Ok(message) => s.on_message(&message),
            Err(RecvError::Lagged(n)) => {
                s.metrics.pubsub_dropped.inc_by(n);
                lag.dropped(n);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Logs lost messages with their count, at most once a second.
#[derive(Default)]
struct LagLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl LagLog {
    fn dropped(&mut self, n: u64) {
        self.unlogged += n;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(
                dropped = self.unlogged,
                "pub/sub messages dropped: this node falls behind Redis (see gatecast_pubsub_dropped_total)"
            );
            self.last = Some(Instant::now());
            self.unlogged = 0;
        }
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
                if let Some(follows) = self.apply(id, change) {
                    self.mirror.mark([id], follows);
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
        let opcode = if e.binary {
            Opcode::Binary
        } else {
            Opcode::Text
        };
        // The payload is copied once, into the frame, at the first
        // recipient on this node.
        let encode = || frame::encode(opcode, data);
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
        let opcode = if binary { Opcode::Binary } else { Opcode::Text };
        Ok(frame::encode(opcode, data))
    }
}

fn parse_id(s: Option<&str>) -> Option<ClientId> {
    s.and_then(|s| s.parse().ok())
}
