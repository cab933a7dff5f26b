//! The dispatcher: one thread that takes the [`Inbox`] in batches (this
//! node's channel first) and acts on each message without waiting on
//! anything (no I/O, no `.await`): pushes go straight into the recipients'
//! queues, commands change the hub and mark the mirror, replies wake their
//! callers.
//!
//! Nothing is dropped here: the inbox is bounded and, when full, the
//! subscriber stops reading Redis (`subscriber`). A message that cannot be
//! understood is skipped, counted in `gatecast_pubsub_malformed_total` and
//! logged.

use std::sync::Arc;

use super::envelope::{peek_origin, EnvelopeRef, Op};
use super::gaps::Gate;
use super::inbox::{Batch, Direct, Inbox};
use super::keys::Channel;
use super::membership::Change;
use super::Shared;
use crate::frame::close_code;
use crate::hub::Frames;
use crate::ids::{ClientId, NodeId};
use crate::push::{encode_frame, LastFrame, Target};
use crate::push_latency::{self, Accepted};
use crate::recovery::framing::{self, PositionRef};
use crate::task::spawn_critical_thread;

/// How long the dispatcher waits for more messages before it hands back
/// what the last burst freed (see `crate::allocator`).
const COLLECT_AFTER: std::time::Duration = crate::allocator::COLLECT_EVERY;

/// Starts the dispatcher thread; it stops when the inbox is closed.
pub fn start(s: &Arc<Shared>, inbox: Arc<Inbox>) -> std::io::Result<()> {
    let shared = s.clone();
    spawn_critical_thread("gatecast-dispatch", &s.fatal, &s.stop, move || {
        dispatch_all(&shared, &inbox)
    })
}

/// Lets the subscriber's readers handle the messages of uid, node and
/// reply channels themselves while the inbox is idle: a push to a uid or
/// a client from another node, and a reply to this node's command, then
/// go from the reader's task straight to the connection's (on the same
/// worker thread) instead of through this thread. Group and `all`
/// channels, which may reach every connection, stay on this thread.
pub fn set_direct(s: &Arc<Shared>, inbox: &Inbox) {
    inbox.set_direct(Box::new(Inline {
        keys: s.keys.clone(),
        shared: Arc::downgrade(s),
    }));
}

/// [`set_direct`]'s handler; `Weak`: the inbox is the shared state's.
struct Inline {
    keys: super::keys::Keys,
    shared: std::sync::Weak<Shared>,
}

impl Direct for Inline {
    fn cheap(&self, channel: &[u8]) -> bool {
        let channel = std::str::from_utf8(channel).ok();
        matches!(
            channel.and_then(|c| self.keys.parse_channel(c)),
            Some(Channel::Uid(_) | Channel::Node(_) | Channel::Reply(_))
        )
    }

    fn handle(&self, channel: &[u8], payload: &[u8]) {
        if let Some(s) = self.shared.upgrade() {
            s.metrics.pubsub_direct.inc();
            s.on_message(channel, payload);
        }
    }
}

fn dispatch_all(s: &Arc<Shared>, inbox: &Inbox) {
    let mut batch = Batch::default();
    // Idle after a burst: hand back what it freed (frames this thread
    // encoded, dropped by the connections), then sleep.
    while inbox.take(&mut batch, COLLECT_AFTER, crate::allocator::collect) {
        for message in &batch.messages {
            s.on_message(&message.channel, &message.payload);
        }
        inbox.release(&mut batch);
    }
}

impl Shared {
    fn on_message(self: &Arc<Self>, channel: &[u8], bytes: &[u8]) {
        self.metrics.pubsub_received.inc();
        let raw_channel = channel;
        let Some(channel) = std::str::from_utf8(channel)
            .ok()
            .and_then(|c| self.keys.parse_channel(c))
        else {
            return;
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
        if let (Op::Push, Some(stream), Some(epoch), Some(offset)) =
            (envelope.op, envelope.s, envelope.e, envelope.o)
        {
            // A push kept in history: delivered in offset order, gaps read
            // back (`gaps::Gaps`).
            let name = std::str::from_utf8(raw_channel).unwrap_or_default();
            let t = envelope.t.unwrap_or(0);
            match self.gaps.gate(stream, (epoch, offset, t), name, bytes) {
                Gate::Deliver => {}
                Gate::Rewound { epoch } => self.history_went_back(stream, epoch),
                Gate::Duplicate | Gate::Held => return,
                Gate::Repair { after, repair } => {
                    return self.spawn_repair(stream.to_owned(), after, repair)
                }
                Gate::Flush(held) => {
                    for (c, raw) in held {
                        let c = self.keys.parse_channel(&c);
                        if let (Some(c), Ok(e)) = (c, EnvelopeRef::decode(&raw)) {
                            let _ = self.deliver_now(c, &e);
                        }
                    }
                }
            }
        }
        if let Err(reason) = self.dispatch(channel, envelope) {
            self.malformed(channel, reason);
        }
    }

    fn malformed(&self, channel: Channel<'_>, reason: &str) {
        self.metrics.pubsub_malformed.inc();
        tracing::warn!(?channel, reason, "skipped a malformed message from redis");
    }

    fn dispatch(
        self: &Arc<Self>,
        channel: Channel<'_>,
        e: EnvelopeRef<'_>,
    ) -> Result<(), &'static str> {
        match (channel, e.op) {
            (_, Op::Push) => self.deliver_now(channel, &e),
            (Channel::Node(_) | Channel::Reply(_), Op::Reply) => {
                if e.req.is_none() && e.reqs.is_empty() {
                    return Err("reply without req");
                }
                for req in e.req.iter().chain(&e.reqs) {
                    self.rpc.resolve(*req, e.error);
                }
                Ok(())
            }
            (Channel::Reply(_), _) => Err("only replies go on a reply channel"),
            (Channel::Node(_), Op::Close) => {
                let id = parse_id(e.client_id).ok_or("close without client_id")?;
                let last = match e.data.as_deref() {
                    Some(data) => {
                        self.check_message(e.binary, data)?;
                        Some(LastFrame::of(e.binary, data))
                    }
                    None => None,
                };
                self.hub
                    .close_client(id, last, close_code::NORMAL, "closed by server");
                Ok(())
            }
            (Channel::Group(group), Op::Ungroup) => {
                self.ungroup_here(group);
                self.reply_later(&e, None);
                Ok(())
            }
            (Channel::Node(_), _) => {
                let id = parse_id(e.client_id).ok_or("command without client_id")?;
                let change = Change::from_envelope(&e)?;
                // The channel the change needs (a bind's or join's):
                // the reply says so if Redis refuses it.
                match self.apply(id, change) {
                    Ok(Some(follows)) => {
                        // Marked and queued for a reply under one lock: a
                        // batch taken in between would write the change and
                        // answer in the next one, without the refusal of the
                        // channel it needs.
                        let reply = self.reply_target(&e);
                        self.mirror.mark_then_reply([id], follows, reply);
                        return Ok(());
                    }
                    Ok(None) => {}
                    // Counted by `apply`; the sender (another node, whose
                    // caller got the same check first, or a backend
                    // publishing straight to Redis) hears nothing more.
                    Err(e) => {
                        tracing::warn!(client_id = %id, error = %e, "session command refused")
                    }
                }
                self.reply_later(&e, None);
                Ok(())
            }
            _ => Err("operation not valid on this channel"),
        }
    }

    /// A command with a request number is answered after the mirror wrote
    /// what it changed.
    fn reply_later(&self, e: &EnvelopeRef<'_>, needs: Option<&super::mirror::Follow>) {
        if let Some((node, req, batched)) = self.reply_target(e) {
            self.mirror.reply(node, req, batched, needs);
        }
    }

    /// Where and how a command asks to be answered: its node, request
    /// number, and whether that node reads its reply channel.
    fn reply_target(&self, e: &EnvelopeRef<'_>) -> Option<(NodeId, u64, bool)> {
        let node = e.reply_to.and_then(|n| n.parse::<NodeId>().ok())?;
        Some((node, e.req?, e.reply_channel))
    }

    /// Delivers a push to the local connections its channel names.
    pub(super) fn deliver_now(
        &self,
        channel: Channel<'_>,
        e: &EnvelopeRef<'_>,
    ) -> Result<(), &'static str> {
        let data = e.data.as_deref().ok_or("push without data")?;
        self.check_message(e.binary, data)?;
        // The payload is copied once per variant (plain, or framed for
        // connections that opted in to recovery), at the first recipient
        // on this node that needs it.
        let position = match (e.s, e.e, e.o) {
            (Some(stream), Some(epoch), Some(offset)) => Some(PositionRef {
                stream,
                epoch,
                offset,
            }),
            _ => None,
        };
        let binary = e.binary;
        let plain = || encode_frame(binary, data);
        let framed = || framing::encode(binary, position, data);
        let frames = Frames {
            plain: &plain,
            framed: &framed,
            position,
        };
        let exclude: Vec<ClientId> = e.exclude.iter().filter_map(|s| s.parse().ok()).collect();
        // Timed from the envelope's accept time when it has one (from
        // another node or a publisher); an envelope without is not timed.
        let accepted = e.ts.map(|unix_us| Accepted::Remote { unix_us });
        if let Some(unix_us) = e.ts {
            self.lag.observe(unix_us);
        }
        push_latency::with(accepted, || self.deliver_to(channel, e, &frames, &exclude))
    }

    /// [`Shared::deliver_now`] once the frames are ready.
    fn deliver_to(
        &self,
        channel: Channel<'_>,
        e: &EnvelopeRef<'_>,
        frames: &Frames<'_>,
        exclude: &[ClientId],
    ) -> Result<(), &'static str> {
        let hub = &self.hub;
        let (kind, delivered) = match channel {
            Channel::All => ("all", hub.deliver_with(&Target::All, exclude, frames)),
            Channel::Group(group) => (
                "group",
                hub.deliver_group_part(&e.groups, group, exclude, frames),
            ),
            Channel::Uid(uid) => {
                let target = Target::Uids(vec![uid.to_owned()]);
                ("uid", hub.deliver_with(&target, exclude, frames))
            }
            Channel::Reply(_) => return Err("only replies go on a reply channel"),
            Channel::Node(_) => {
                let ids = e.client_ids.iter().filter_map(|s| s.parse().ok()).collect();
                let target = Target::Clients(ids);
                ("client", hub.deliver_with(&target, exclude, frames))
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
}

fn parse_id(s: Option<&str>) -> Option<ClientId> {
    s.and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod proptests;
