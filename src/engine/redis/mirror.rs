//! The mirror: the only writer of this node's partition, and the only task
//! that subscribes and unsubscribes.
//!
//! Changes never wait in a queue of operations that could fill up. They
//! mark what is dirty (connections, and group or uid channels whose
//! subscription may have to change) in sets bounded by what the node
//! holds, and wake the mirror. The mirror takes everything marked so far
//! as one batch: it follows the channels the hub needs now, then rewrites
//! the dirty connections from the hub's current state with pipelined
//! scripts, then answers the commands and callers that waited for the
//! batch. A flood of 20,000 commands for 500 connections is a few batches
//! of at most 500 rewrites, whatever the flood's size. A failed batch is
//! marked dirty again and retried: the writes are idempotent.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use super::client::COMMAND_TIMEOUT;
use super::keys::Keys;
use super::liveness::{self, Beat};
use super::subscriber::Refused;
use super::subscriptions::Subscriptions;
use super::{partition, Shared};
use crate::hub::{Hub, Membership};
use crate::ids::{ClientId, NodeId};

/// Pause before a failed batch is tried again, doubled at each failure in
/// a row up to [`RETRY_MAX`]: a Redis that refuses writes (out of memory,
/// read-only replica) is not hammered every 250 ms for as long as it lasts.
const RETRY_AFTER: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Pause before a batch refused because its slot is being migrated (a
/// Cluster reshard) is written again; the node stays ready meanwhile.
const MIGRATION_RETRY: Duration = Duration::from_millis(20);

/// A slot left migrating for longer than this (a reshard stopped half
/// way) is a failure like any other: the node turns unready.
const MIGRATION_STUCK: Duration = Duration::from_secs(10);

/// While Redis is away, how often the mirror looks again for a connection
/// (a resync asked for at the reconnection is then written at once, not at
/// the next heartbeat tick).
const RECONNECT_POLL: Duration = Duration::from_millis(100);

/// Replies to other nodes' commands waiting for a batch. Each is a few
/// bytes and every batch sends them all; past this, something is badly
/// wrong and a reply is dropped (its caller times out with a 503).
const MAX_REPLIES: usize = 1 << 20;

/// Replies published at once (pipelined on one connection).
const REPLIES_IN_FLIGHT: usize = 256;

/// Most commands answered by one message on a reply channel (about 9
/// bytes each): 2^20 replies to one node are 256 messages, not 2^20.
const REPLIES_PER_MESSAGE: usize = 4096;

/// A channel whose subscription follows the hub's membership.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Follow {
    /// A group's channel: subscribed while the hub holds a member.
    Group(String),
    /// A uid's channel: subscribed while a local connection is bound to it.
    Uid(String),
}

impl Follow {
    /// The channel's name.
    pub fn channel(&self, keys: &Keys) -> String {
        match self {
            Follow::Group(g) => keys.group_channel(g),
            Follow::Uid(u) => keys.uid_channel(u),
        }
    }

    /// Whether the hub needs the channel now.
    pub fn wanted(&self, hub: &Hub) -> bool {
        match self {
            Follow::Group(g) => hub.has_group(g),
            Follow::Uid(u) => hub.has_uid(u),
        }
    }
}

/// The channels a connection with membership `m` needs.
pub fn follows_of(m: &Membership) -> Vec<Follow> {
    let uid = m.uid.iter().map(|u| Follow::Uid(u.clone()));
    uid.chain(m.groups.iter().map(|g| Follow::Group(g.clone())))
        .collect()
}

/// What a batch did, for whoever waits on it.
pub type Outcome = Result<(), String>;

/// What is waiting to be mirrored.
#[derive(Default)]
pub struct Mirror {
    pending: Mutex<Batch>,
    /// The channels of the batch being written: with those still pending,
    /// the ones whose subscription may not match the hub yet. Locked after
    /// `pending` when both are.
    writing: Mutex<HashSet<Follow>>,
    wake: Notify,
}

#[derive(Default)]
struct Batch {
    clients: HashSet<ClientId>,
    follows: HashSet<Follow>,
    /// Commands from other nodes to answer once the batch is written.
    replies: Vec<Reply>,
    /// Callers waiting for the batch, with the [`tag`]s of the channels
    /// their change needs.
    waiters: Vec<(oneshot::Sender<Outcome>, Vec<u64>)>,
    /// Write everything again (after a reconnection).
    resync: bool,
    /// Delete the partition and stop.
    leave: Option<oneshot::Sender<Outcome>>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.clients.is_empty()
            && self.follows.is_empty()
            && self.replies.is_empty()
            && self.waiters.is_empty()
            && !self.resync
            && self.leave.is_none()
    }

    /// Answers the callers: `outcome`, or the refusal of a channel their
    /// change needs.
    fn finish(&mut self, outcome: &Outcome, refused: &Refusals) {
        for (waiter, tags) in self.waiters.drain(..) {
            let _ = waiter.send(refused.outcome(outcome, &tags));
        }
    }
}

/// A command of another node to answer after the batch.
struct Reply {
    node: NodeId,
    req: u64,
    /// The node reads its reply channel (else one reply per command on its
    /// node channel).
    batched: bool,
    /// The [`tag`] of the channel the command needed, or 0.
    tag: u64,
}

/// A short fingerprint of a channel: what a waiting reply remembers of the
/// channel it needs (8 bytes, however long the name; a clash only gives
/// a caller another channel's refusal).
pub fn tag(follow: &Follow) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    follow.hash(&mut h);
    h.finish() | 1
}

/// The channels Redis refused in a batch, by [`tag`], with why.
#[derive(Default)]
pub struct Refusals(std::collections::HashMap<u64, String>);

impl Refusals {
    fn outcome(&self, outcome: &Outcome, tags: &[u64]) -> Outcome {
        match tags.iter().find_map(|t| self.0.get(t)) {
            Some(why) if outcome.is_ok() => Err(why.clone()),
            _ => outcome.clone(),
        }
    }
}

impl Mirror {
    /// Marks connections and channels to mirror in the next batch.
    pub fn mark(
        &self,
        clients: impl IntoIterator<Item = ClientId>,
        follows: impl IntoIterator<Item = Follow>,
    ) {
        let mut pending = self.pending.lock();
        pending.clients.extend(clients);
        pending.follows.extend(follows);
        drop(pending);
        self.wake.notify_one();
    }

    /// Answers a command of `node` after the next batch, on its reply
    /// channel when `batched` (the command asked for it); with an error if
    /// Redis refuses `follow`, the channel the command needs.
    pub fn reply(&self, node: NodeId, req: u64, batched: bool, follow: Option<&Follow>) {
        let mut pending = self.pending.lock();
        if pending.replies.len() >= MAX_REPLIES {
            tracing::warn!(%node, req, "too many replies waiting: one dropped");
            return;
        }
        pending.replies.push(Reply {
            node,
            req,
            batched,
            tag: follow.map_or(0, tag),
        });
        drop(pending);
        self.wake.notify_one();
    }

    /// Marks `follows` (the first is the channel the command needs) and,
    /// in the same batch, answers a command of another node (`reply`: its
    /// node, request number and whether it reads its reply channel).
    pub fn mark_then_reply(
        &self,
        clients: impl IntoIterator<Item = ClientId>,
        follows: Vec<Follow>,
        reply: Option<(NodeId, u64, bool)>,
    ) {
        let mut pending = self.pending.lock();
        if let Some((node, req, batched)) = reply {
            if pending.replies.len() >= MAX_REPLIES {
                tracing::warn!(%node, req, "too many replies waiting: one dropped");
            } else {
                pending.replies.push(Reply {
                    node,
                    req,
                    batched,
                    tag: follows.first().map_or(0, tag),
                });
            }
        }
        pending.clients.extend(clients);
        pending.follows.extend(follows);
        drop(pending);
        self.wake.notify_one();
    }

    /// Marks and waits until the batch that carries the marks is written
    /// (bounded by the Redis command timeout).
    pub async fn flush(
        &self,
        clients: impl IntoIterator<Item = ClientId>,
        follows: impl IntoIterator<Item = Follow>,
    ) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let follows: Vec<Follow> = follows.into_iter().collect();
        let tags = follows.iter().map(tag).collect();
        {
            let mut pending = self.pending.lock();
            pending.clients.extend(clients);
            pending.follows.extend(follows);
            pending.waiters.push((tx, tags));
        }
        self.wake.notify_one();
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err("the node is leaving the cluster".into()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    /// Asks for the whole partition and every subscription to be written
    /// again.
    pub fn resync(&self) {
        self.pending.lock().resync = true;
        self.wake.notify_one();
    }

    /// Deletes the partition after the batch being written, then stops the
    /// mirror: nothing is written after the delete.
    pub async fn leave(&self) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().leave = Some(tx);
        self.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Err("the mirror had stopped".into()))
    }

    /// Whether `follow`'s subscription may not match the hub yet: a
    /// change that needs it is marked or being written.
    pub fn unsettled(&self, follow: &Follow) -> bool {
        let pending = self.pending.lock();
        pending.follows.contains(follow) || self.writing.lock().contains(follow)
    }

    /// Whether any subscription may not match the hub yet.
    pub fn any_unsettled(&self) -> bool {
        let pending = self.pending.lock();
        !pending.follows.is_empty() || !self.writing.lock().is_empty()
    }

    /// Takes everything marked as the next batch; its channels count as
    /// unsettled until [`Mirror::written`].
    fn take(&self) -> Batch {
        let mut pending = self.pending.lock();
        let batch = std::mem::take(&mut *pending);
        self.writing.lock().clone_from(&batch.follows);
        batch
    }

    /// The batch taken last is written, or put back.
    fn written(&self) {
        self.writing.lock().clear();
    }

    /// Puts back what a failed batch did not write (and the replies it
    /// could not send, and the callers still waiting if it was not
    /// answered).
    fn restore(&self, batch: Batch) {
        let mut pending = self.pending.lock();
        pending.clients.extend(batch.clients);
        pending.follows.extend(batch.follows);
        pending.waiters.extend(batch.waiters);
        pending.resync |= batch.resync;
        let room = MAX_REPLIES.saturating_sub(pending.replies.len());
        pending.replies.extend(batch.replies.into_iter().take(room));
    }
}

/// Why a batch failed.
pub enum Failure {
    /// Redis refused or did not answer.
    Redis(fred::error::Error),
    /// Another live process holds this node id.
    Conflict,
    /// This node's liveness key was gone: it was purged (cut off from Redis
    /// for longer than the TTL) or Redis lost its data. The whole partition
    /// must be written again.
    Purged,
}

impl From<fred::error::Error> for Failure {
    fn from(e: fred::error::Error) -> Self {
        Failure::Redis(e)
    }
}

/// What the mirror task keeps between batches.
struct Task {
    subs: Subscriptions,
    last_beat: Instant,
    conflict_since: Option<Instant>,
    ever_registered: bool,
    /// Another live process holds this node id: nothing is written any
    /// more, and the node is stopping.
    conflicted: bool,
    beat_failures: liveness::Throttle,
    refusals: liveness::Throttle,
}

/// The mirror task: batches until the node leaves.
pub async fn run(s: Arc<Shared>) {
    let mut task = Task {
        subs: Subscriptions::default(),
        last_beat: Instant::now(),
        conflict_since: None,
        ever_registered: false,
        conflicted: false,
        beat_failures: liveness::Throttle::default(),
        refusals: liveness::Throttle::default(),
    };
    let mut tick = tokio::time::interval(s.settings.heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_after = RETRY_AFTER;
    // Since when writes fail only because a Cluster slot is being migrated.
    let mut migrating_since: Option<Instant> = None;
    // Something is waiting for Redis to be connected.
    let mut waiting = false;
    loop {
        tokio::select! {
            () = s.mirror.wake.notified() => {}
            _ = tick.tick() => {}
            () = tokio::time::sleep(RECONNECT_POLL), if waiting => {}
            () = s.stop.cancelled() => return,
        }
        waiting = false;
        loop {
            // Between batches too: a node busy with a stream of batches,
            // or retrying one that fails, must not be taken for dead.
            if liveness::due(&s, task.last_beat) {
                task.heartbeat(&s).await;
            }
            let mut batch = s.mirror.take();
            if let Some(done) = batch.leave.take() {
                // A node that never registered, or whose id another
                // process holds, has nothing of its own to delete.
                let outcome = if task.ever_registered && !task.conflicted {
                    partition::leave(&s).await.map_err(|e| e.to_string())
                } else {
                    Ok(())
                };
                batch.finish(&outcome, &Refusals::default());
                let _ = done.send(outcome);
                // Nothing more is written; the engine stops the tasks next.
                s.stop.cancelled().await;
                return;
            }
            if batch.is_empty() {
                break;
            }
            if task.conflicted {
                batch.finish(
                    &Err("another process holds this node id".into()),
                    &Refusals::default(),
                );
                break;
            }
            if !s.redis.is_connected() {
                // The reconnection asks for a resync that writes it all.
                batch.finish(&Err("redis is not connected".into()), &Refusals::default());
                s.mirror.restore(batch);
                waiting = true;
                break;
            }
            if !s.registered.load(Ordering::Acquire) {
                // Not registered (yet, or since a reconnection): whatever is
                // written goes through a resync, which checks the node id
                // first and writes everything anyway.
                batch.resync = true;
            }
            match write(&s, &mut task.subs, &mut batch, &mut task.last_beat).await {
                Ok(refused) => {
                    let refused = task.refused(&s, refused);
                    if batch.resync {
                        task.registered(&s);
                        // Every channel is subscribed again: what the
                        // subscriber missed meanwhile is read back now.
                        s.repair_followed();
                    }
                    retry_after = RETRY_AFTER;
                    migrating_since = None;
                    s.writable.store(true, Ordering::Release);
                    s.mirror.written();
                    answer(&s, &mut batch, Ok(()), &refused).await;
                }
                Err(Failure::Redis(e))
                    if super::client::refused_mid_migration(&e)
                        && migrating_since.get_or_insert_with(Instant::now).elapsed()
                            < MIGRATION_STUCK =>
                {
                    // A reshard moving this partition's slot: Redis is
                    // fine and nothing was written. Written again in a
                    // moment; its callers wait (within their deadline),
                    // and the node stays ready.
                    tracing::debug!(error = %e, "partition's slot being migrated: writing again");
                    s.mirror.restore(batch);
                    tokio::select! {
                        () = tokio::time::sleep(MIGRATION_RETRY) => {}
                        () = s.stop.cancelled() => return,
                    }
                }
                Err(failure) => {
                    let reason = match failure {
                        Failure::Purged => {
                            // Not an error of the batch: it is written again,
                            // whole, at once; its callers wait for that.
                            tracing::warn!(
                                "this node's liveness key was gone (purged by another node while cut off from redis, or redis lost its data): writing the whole partition again"
                            );
                            s.registered.store(false, Ordering::Release);
                            batch.resync = true;
                            s.mirror.restore(batch);
                            continue;
                        }
                        Failure::Conflict => match task.conflict(&s) {
                            Some(reason) => reason,
                            None => {
                                batch.finish(
                                    &Err("another process holds this node id".into()),
                                    &Refusals::default(),
                                );
                                break;
                            }
                        },
                        Failure::Redis(e) => e.to_string(),
                    };
                    // Not ready until a batch is written again: a node that
                    // cannot mirror its changes would take clients whose
                    // joins and binds no other node sees.
                    s.writable.store(false, Ordering::Release);
                    s.metrics.redis_write_failures.inc();
                    tracing::warn!(error = %reason, retry_in = ?retry_after, "writing to redis failed; not ready until it works again");
                    answer(&s, &mut batch, Err(reason), &Refusals::default()).await;
                    s.mirror.restore(batch);
                    tokio::select! {
                        () = tokio::time::sleep(retry_after) => {}
                        () = s.stop.cancelled() => return,
                    }
                    retry_after = (retry_after * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

impl Task {
    /// Channels Redis refused for this user's ACL: counted, logged (at
    /// most a line per 10 s), and answered to whoever waited for them. The
    /// batch itself is written and the node stays ready: one client's
    /// group must not keep the node unready until that client leaves.
    fn refused(&mut self, s: &Shared, refused: Refused) -> Refusals {
        let mut out = Refusals::default();
        if refused.is_empty() {
            return out;
        }
        s.metrics
            .redis_subscribe_refused
            .inc_by(refused.len() as u64);
        if let Some(skipped) = self.refusals.allow() {
            let (channel, e) = &refused[0];
            tracing::warn!(
                %channel,
                error = %e,
                channels = refused.len(),
                skipped,
                "redis refused to subscribe: give the gateway's ACL user the channel pattern &<prefix>:*; the change stays on this node, pushes through other nodes miss it"
            );
        }
        for (channel, e) in refused {
            let follow = match s.keys.parse_channel(&channel) {
                Some(super::keys::Channel::Group(g)) => Follow::Group(g.to_owned()),
                Some(super::keys::Channel::Uid(u)) => Follow::Uid(u.to_owned()),
                _ => continue,
            };
            let why = format!("redis refused the subscription to {channel} (check the ACL user's channel patterns): {e}");
            out.0.insert(tag(&follow), why);
        }
        out
    }

    /// Refreshes liveness when registered; asks for a registration when
    /// not (a reconnection whose event was missed).
    async fn heartbeat(&mut self, s: &Shared) {
        self.last_beat = Instant::now();
        if self.conflicted || !s.redis.client.is_connected() {
            return;
        }
        if !s.registered.load(Ordering::Acquire) {
            s.mirror.pending.lock().resync = true;
            return;
        }
        match liveness::beat(s, false).await {
            Ok(Beat::Kept) => {}
            Ok(Beat::Fresh) => {
                tracing::warn!("liveness key was gone (Redis restarted or this node was purged): registering again");
                s.mirror.resync();
                s.registered.store(false, Ordering::Release);
            }
            Ok(Beat::Conflict) => {
                self.conflicted = true;
                conflict(s);
            }
            Err(e) => {
                // Past 2 heartbeats of these the other nodes purge this one.
                if let Some(skipped) = self.beat_failures.allow() {
                    tracing::warn!(error = %e, skipped, "heartbeat failed");
                }
            }
        }
    }

    /// A resync was written: ready, unless another one was asked for
    /// meanwhile (a reconnection while this one ran).
    fn registered(&mut self, s: &Shared) {
        self.ever_registered = true;
        self.conflict_since = None;
        if !s.mirror.pending.lock().resync {
            s.registered.store(true, Ordering::Release);
            tracing::info!(connections = s.hub.client_count(), "registered in redis");
        }
    }

    /// Another instance's key is alive under this node id. Returns the
    /// reason to retry with, or `None` once the node must stop.
    fn conflict(&mut self, s: &Shared) -> Option<String> {
        let since = *self.conflict_since.get_or_insert_with(Instant::now);
        // A previous life of this node (killed, same address) leaves its
        // key for up to 2 heartbeats; a live one keeps it fresh.
        if self.ever_registered || since.elapsed() > s.settings.heartbeat * 5 / 2 {
            self.conflicted = true;
            conflict(s);
            return None;
        }
        Some("another instance holds this node id; waiting for its key to expire".into())
    }
}

fn conflict(s: &Shared) {
    s.registered.store(false, Ordering::Release);
    s.fatal.trip(format!(
        "another live gatecast process uses node id {} (advertised address {}): give every node its own --advertise-ip or --inner-listen port",
        s.node,
        s.node.addr()
    ));
}

/// Writes one batch: subscriptions first (so a push sent once the batch is
/// answered reaches the connection), then the partition.
async fn write(
    s: &Shared,
    subs: &mut Subscriptions,
    batch: &mut Batch,
    last_beat: &mut Instant,
) -> Result<Refused, Failure> {
    let refused = if batch.resync {
        // Redis may have lost what presence held (Redis Cluster).
        s.holds.resync();
        for script in s.scripts.all() {
            script.load(&s.redis.client).await?;
        }
        // History is optional: a Redis that refuses Functions (older than
        // 7.0, an ACL) still serves everything else.
        if let Err(e) = s.load_history().await {
            tracing::warn!(error = %e, "history Functions not loaded: pushes kept in history will fail");
        }
        // Alive first: a node that purges dead partitions must not take
        // this one for dead while it is being rewritten.
        if liveness::beat(s, true).await? == Beat::Conflict {
            return Err(Failure::Conflict);
        }
        *last_beat = Instant::now();
        let refused = subs.resync(s).await?;
        // Every connection the hub holds, and whatever the partition holds
        // that the hub does not (closed while Redis was away). Nothing is
        // cleared first: other nodes go on seeing this node's connections.
        batch.clients.extend(s.hub.client_ids());
        batch.clients.extend(partition::stale(s).await?);
        // What the resync followed covers the marked channels too.
        batch.follows.clear();
        refused
    } else {
        subs.follow(s, &batch.follows).await?
    };
    let clients: Vec<ClientId> = batch.clients.iter().copied().collect();
    partition::put(s, &clients, last_beat).await?;
    Ok(refused)
}

/// Answers the commands and callers that waited for a batch.
async fn answer(s: &Shared, batch: &mut Batch, outcome: Outcome, refused: &Refusals) {
    batch.finish(&outcome, refused);
    if batch.replies.is_empty() {
        return;
    }
    let messages = reply_messages(s, std::mem::take(&mut batch.replies), &outcome, refused);
    let replies = messages
        .into_iter()
        .map(|(channel, bytes)| s.redis.publish(channel, bytes));
    // A bounded number at a time: up to MAX_REPLIES published at once
    // would fill fred's command queue and fail unrelated commands (API
    // calls, heartbeats) for as long as they wait.
    let mut sent = futures_util::stream::iter(replies).buffer_unordered(REPLIES_IN_FLIGHT);
    while let Some(result) = sent.next().await {
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not answer a command");
        }
    }
}

/// The messages that answer `replies`: on a node's reply channel, up to
/// [`REPLIES_PER_MESSAGE`] commands per message; for a node that did not
/// ask for it (older than the reply channel, or a backend), one message
/// per command on its node channel, as it reads them.
fn reply_messages(
    s: &Shared,
    replies: Vec<Reply>,
    outcome: &Outcome,
    refused: &Refusals,
) -> Vec<(String, bytes::Bytes)> {
    let mut batched: std::collections::HashMap<(NodeId, Option<String>), Vec<u64>> =
        Default::default();
    let mut messages = Vec::new();
    for reply in replies {
        let error = refused.outcome(outcome, &[reply.tag]).err();
        if reply.batched {
            batched
                .entry((reply.node, error))
                .or_default()
                .push(reply.req);
        } else {
            let bytes = super::rpc::reply(reply.req, error);
            messages.push((s.keys.node_channel(reply.node), bytes));
        }
    }
    for ((node, error), reqs) in batched {
        for chunk in reqs.chunks(REPLIES_PER_MESSAGE) {
            let bytes = super::rpc::replies(chunk, error.clone());
            messages.push((s.keys.reply_channel(node), bytes));
        }
    }
    messages
}
