//! The Redis engine: any number of stateless nodes pointed at one Redis
//! behave as one gateway.
//!
//! - State: each node mirrors its own connections (uid, groups, session)
//!   into its partition of keys (see [`keys`]), with atomic scripts. Queries
//!   about other nodes' connections read their partitions; queries about
//!   this node's are answered from the hub without a round trip.
//! - Delivery: pub/sub. A push to a group goes to the group's channel, which
//!   only nodes holding a member subscribe to; likewise for uids; a push to
//!   a client goes to its node's channel (the client_id names the node);
//!   send_to_all to one channel every node subscribes to. Each push crosses
//!   Redis once per node that needs it, and its envelope is encoded once.
//! - Ownership: a node is the only writer of its partition. A membership
//!   change for a client on another node is sent to that node as a command
//!   and answered once applied, so when the API call returns, the owner has
//!   subscribed to the channels the change needs: a push sent next reaches
//!   the client.
//! - Liveness: nodes heartbeat a key with a TTL; survivors delete the
//!   partition of a node whose key expired. After any reconnection (Redis
//!   restarted, failover) a node re-registers its partition from its hub.

mod scripts;

pub use gatecast_emitter::{envelope, keys};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::prelude::*;
use fred::types::config::{Config as RedisConfig, ReconnectPolicy};
use futures_util::future::try_join_all;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::envelope::{Envelope, Op};
use self::keys::{Channel, Keys};
use self::scripts::Scripts;
use super::{Engine, EngineError, EngineResult};
use crate::frame::close_code;
use crate::hub::{Hub, Membership};
use crate::ids::{ClientId, NodeId};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::push::{Message, Push, Target};
use crate::session::Session;

/// Longest a Redis command may take before the call fails (the API answers
/// 503 within its 2 s deadline).
const COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);

/// Longest a node waits for another node to apply a command.
const RPC_TIMEOUT: Duration = Duration::from_millis(1200);

/// Commands from other nodes waiting to be applied, in order.
const COMMAND_QUEUE: usize = 4096;

/// Pub/sub messages buffered between the Redis connection and this node's
/// dispatcher before the oldest are dropped. fred sizes every event channel
/// of a client with it (preallocated), so it is set on the subscriber only:
/// 65536 cost ~100 MB of RSS, 4096 a few MB. The dispatcher does no I/O, so
/// it drains far faster than one Redis connection delivers.
const PUBSUB_BUFFER: usize = 4096;

/// Connections registered per round of a re-registration.
const REGISTER_CHUNK: usize = 256;

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `--redis-url`.
    pub url: String,
    /// `--redis-prefix`.
    pub prefix: String,
    /// `--node-heartbeat`.
    pub heartbeat: Duration,
    /// What this node publishes about itself in its liveness key.
    pub info: serde_json::Value,
    /// `--max-message-bytes`: larger pushes from Redis are refused too.
    pub max_message_bytes: usize,
}

/// The Redis engine. Cheap to clone.
#[derive(Clone)]
pub struct RedisEngine {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeId,
    node_name: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    keys: Keys,
    partition: String,
    client: Client,
    subscriber: SubscriberClient,
    /// Redis Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE).
    sharded: bool,
    scripts: Scripts,
    settings: RedisSettings,
    /// Commands sent to other nodes, waiting for their reply.
    pending: Mutex<HashMap<u64, oneshot::Sender<Option<String>>>>,
    next_req: AtomicU64,
    /// Channels subscribed beyond the node's own and `all`; changes are
    /// serialized so a subscribe and an unsubscribe never cross.
    subscribed: tokio::sync::Mutex<HashSet<String>>,
    /// The partition was written since the last (re)connection.
    registered: AtomicBool,
    /// Shutting down: the partition is being removed as a whole.
    leaving: AtomicBool,
    /// Held while the partition is being (re)written.
    registering: tokio::sync::Mutex<()>,
    commands: mpsc::Sender<Applied>,
    stop: CancellationToken,
}

/// A change already made in the hub, to mirror into Redis.
#[derive(Debug)]
enum Change {
    BindUid {
        id: ClientId,
        uid: String,
        previous: Option<String>,
    },
    UnbindUid {
        id: ClientId,
        uid: String,
    },
    JoinGroup {
        id: ClientId,
        group: String,
    },
    LeaveGroup {
        id: ClientId,
        group: String,
    },
    SetSession {
        id: ClientId,
        session: Session,
    },
    Ungroup {
        group: String,
    },
}

/// A command from another node (or a backend), applied to the hub, waiting
/// to be mirrored into Redis and answered.
struct Applied {
    change: Option<Change>,
    reply: Option<(NodeId, u64)>,
}

/// A channel whose subscription follows the hub's membership.
enum Follow<'a> {
    Group(&'a str),
    Uid(&'a str),
}

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("redis: {e}"))
}

impl RedisEngine {
    /// Connects to Redis and starts the node's background tasks. Does not
    /// wait for Redis to be reachable: the node starts not ready and becomes
    /// ready once connected and registered.
    pub async fn start(
        settings: RedisSettings,
        node: NodeId,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let config = RedisConfig::from_url(&settings.url)
            .map_err(|e| format!("invalid --redis-url: {e}"))?;
        let sharded = config.server.is_clustered();
        let mut builder = fred::types::Builder::from_config(config);
        builder
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(1);
                c.internal_command_timeout = Duration::from_secs(1);
                c.max_command_attempts = 2;
            })
            // Retry forever: a node outlives any Redis outage.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 1000, 2));
        let client = builder.build().map_err(|e| e.to_string())?;
        let subscriber = builder
            .with_performance_config(|p| p.broadcast_channel_capacity = PUBSUB_BUFFER)
            .build_subscriber_client()
            .map_err(|e| e.to_string())?;

        let keys = Keys::new(&settings.prefix);
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let inner = Arc::new(Inner {
            node,
            node_name: node.to_string(),
            partition: keys.partition(node),
            keys,
            hub,
            metrics,
            client,
            subscriber,
            sharded,
            scripts: Scripts::default(),
            settings,
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            subscribed: tokio::sync::Mutex::new(HashSet::new()),
            registered: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            registering: tokio::sync::Mutex::new(()),
            commands,
            stop: CancellationToken::new(),
        });

        // Listen before connecting, so the first connection's events are
        // seen too.
        tokio::spawn(inner.clone().receive_loop());
        tokio::spawn(inner.clone().command_loop(command_rx));
        tokio::spawn(inner.clone().reconnect_loop());
        inner.client.connect();
        inner.subscriber.connect();
        inner.subscriber.manage_subscriptions();
        tokio::spawn(inner.clone().liveness_loop());
        Ok(RedisEngine { inner })
    }
}

impl Inner {
    fn check(&self) -> EngineResult<()> {
        if self.client.is_connected() {
            Ok(())
        } else {
            Err(EngineError::Unavailable("redis is not connected".into()))
        }
    }

    /// A write to this node's partition failed: Redis and the hub may now
    /// disagree. The liveness loop writes the partition again (and the node
    /// reports not ready until it has).
    fn mark_dirty(&self) {
        if self.client.is_connected() && self.registered.swap(false, Ordering::AcqRel) {
            tracing::warn!("a write to redis failed: registering this node's connections again");
        }
    }

    fn is_local(&self, id: ClientId) -> bool {
        id.node() == self.node
    }

    // ----- registration, heartbeat, purge -------------------------------

    /// On every (re)connection, including the first: subscribe and write
    /// the whole partition again from the hub.
    async fn reconnect_loop(self: Arc<Self>) {
        use tokio::sync::broadcast::error::RecvError;
        let mut reconnects = self.client.reconnect_rx();
        let mut errors = self.client.error_rx();
        let mut first = true;
        loop {
            tokio::select! {
                event = reconnects.recv() => {
                    if matches!(event, Err(RecvError::Closed)) {
                        return;
                    }
                }
                error = errors.recv() => {
                    // A lost connection: not ready until the partition is
                    // written again after the reconnect (Redis may have
                    // restarted empty or failed over meanwhile).
                    if matches!(error, Err(RecvError::Closed)) {
                        return;
                    }
                    self.registered.store(false, Ordering::Release);
                    continue;
                }
                () = self.stop.cancelled() => return,
            }
            // On Cluster every shard connection reports its own reconnect:
            // let them arrive, then register once.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while reconnects.try_recv().is_ok() {}
            if !first {
                self.metrics.redis_reconnects.inc();
            }
            first = false;
            self.registered.store(false, Ordering::Release);
            self.register_until_done().await;
        }
    }

    async fn register_until_done(&self) {
        // One registration at a time (a reconnect and a lost liveness key
        // can ask at once); the second one runs after, on fresh state.
        let _single = self.registering.lock().await;
        if self.registered.load(Ordering::Acquire) {
            // Done by whoever held the lock before.
            return;
        }
        while !self.stop.is_cancelled() && !self.leaving.load(Ordering::Acquire) {
            match self.register().await {
                Ok(n) => {
                    tracing::info!(connections = n, "registered in redis");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registration in redis failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Writes this node's partition from the hub. Returns how many
    /// connections were registered.
    async fn register(&self) -> Result<usize, fred::error::Error> {
        self.registered.store(false, Ordering::Release);
        for script in self.scripts.all() {
            script.load(&self.client).await?;
        }
        self.subscribe(self.keys.node_channel(self.node)).await?;
        self.subscribe(self.keys.all_channel()).await?;
        for group in self.hub.groups() {
            self.follow(Follow::Group(&group)).await?;
        }
        for uid in self.hub.uids() {
            self.follow(Follow::Uid(&uid)).await?;
        }
        // And drop what was left subscribed while Redis was away.
        let stale: Vec<String> = self.subscribed.lock().await.iter().cloned().collect();
        for channel in &stale {
            match self.keys.parse_channel(channel) {
                Some(Channel::Group(g)) => self.follow(Follow::Group(g)).await?,
                Some(Channel::Uid(u)) => self.follow(Follow::Uid(u)).await?,
                _ => {}
            }
        }
        // Alive first: a node that purges dead partitions must not take
        // this one for dead while it is being rewritten.
        self.beat().await?;
        self.scripts
            .clear
            .evalsha::<i64, _, _, _>(&self.client, self.partition.clone(), "all")
            .await?;
        let snapshot = self.hub.snapshot();
        let mut last_beat = std::time::Instant::now();
        for chunk in snapshot.chunks(REGISTER_CHUNK) {
            try_join_all(chunk.iter().map(|(id, m)| self.write_client(*id, m))).await?;
            // A big partition takes a while: stay alive meanwhile, or
            // another node purges it halfway.
            if last_beat.elapsed() > self.settings.heartbeat / 2 {
                self.beat().await?;
                last_beat = std::time::Instant::now();
            }
        }
        self.reconcile(snapshot).await?;
        self.registered.store(true, Ordering::Release);
        Ok(self.hub.client_count())
    }

    /// Connections may close or change while a snapshot is written: their
    /// own writes can land before the snapshot's and be overwritten. Compare
    /// with the hub now and fix what moved.
    async fn reconcile(
        &self,
        written: Vec<(ClientId, Membership)>,
    ) -> Result<(), fred::error::Error> {
        let now: HashMap<ClientId, Membership> = self.hub.snapshot().into_iter().collect();
        for (id, old) in &written {
            match now.get(id) {
                Some(current) if current == old => {}
                current => {
                    self.remove_client(*id, old).await?;
                    if let Some(current) = current {
                        self.write_client(*id, current).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn remove_client(&self, id: ClientId, m: &Membership) -> Result<(), fred::error::Error> {
        let mut args = vec![id.to_string(), m.uid.clone().unwrap_or_default()];
        args.extend(m.groups.iter().cloned());
        self.scripts
            .remove_client
            .evalsha::<i64, _, _, _>(&self.client, self.partition.clone(), args)
            .await?;
        Ok(())
    }

    async fn write_client(&self, id: ClientId, m: &Membership) -> Result<(), fred::error::Error> {
        let mut args = vec![
            id.to_string(),
            serde_json::to_string(&m.session).unwrap_or_else(|_| "{}".into()),
            m.uid.clone().unwrap_or_default(),
        ];
        args.extend(m.groups.iter().cloned());
        self.scripts
            .add_client
            .evalsha::<i64, _, _, _>(&self.client, self.partition.clone(), args)
            .await?;
        Ok(())
    }

    /// Refreshes the liveness key and the node's entry in the node set.
    /// Returns whether the liveness key had survived since the last beat.
    async fn beat(&self) -> Result<bool, fred::error::Error> {
        let ttl = (self.settings.heartbeat * 2).as_millis().to_string();
        let started = std::time::Instant::now();
        let existed: i64 = self
            .scripts
            .heartbeat
            .evalsha(
                &self.client,
                self.partition.clone(),
                vec![self.settings.info.to_string(), ttl],
            )
            .await?;
        self.metrics
            .redis_rtt
            .observe(started.elapsed().as_secs_f64());
        self.client
            .sadd::<i64, _, _>(self.keys.nodes(), self.node_name.clone())
            .await?;
        Ok(existed == 1)
    }

    /// Every half heartbeat: refresh liveness (re-register if Redis lost
    /// it) and purge nodes whose liveness expired. A node that dies is gone
    /// within 2.5 heartbeats: its key lives 2, and others look every half.
    async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => return,
            }
            if !self.client.is_connected() {
                continue;
            }
            if !self.registered.load(Ordering::Acquire) {
                // A registration that no reconnect event asked for (or that
                // one is already doing: then this waits and skips).
                self.register_until_done().await;
                continue;
            }
            match self.beat().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("liveness key was gone (Redis restarted or this node was purged): registering again");
                    self.registered.store(false, Ordering::Release);
                    self.register_until_done().await;
                }
                Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
            }
            if let Err(e) = self.purge_dead().await {
                tracing::debug!(error = %e, "purge failed");
            }
        }
    }

    async fn purge_dead(&self) -> Result<(), fred::error::Error> {
        let nodes: Vec<String> = self.client.smembers(self.keys.nodes()).await?;
        let mut alive = 1;
        for name in nodes {
            let Ok(node) = name.parse::<NodeId>() else {
                continue;
            };
            if node == self.node {
                continue;
            }
            let removed: i64 = self
                .scripts
                .clear
                .evalsha(&self.client, self.keys.partition(node), "dead")
                .await?;
            if removed < 0 {
                alive += 1;
                continue;
            }
            // Several nodes may get here for the same dead node; only the
            // first one's script found entries to delete.
            self.client
                .srem::<i64, _, _>(self.keys.nodes(), name)
                .await?;
            if removed > 0 {
                tracing::info!(node = %node, addr = %node.addr(), connections = removed, "purged a dead node");
            }
        }
        self.metrics.nodes_alive.set(alive);
        Ok(())
    }

    // ----- subscriptions --------------------------------------------------

    /// Subscribes to or unsubscribes from a group's or uid's channel so that
    /// it is subscribed exactly while the hub holds a member.
    async fn follow(&self, what: Follow<'_>) -> Result<(), fred::error::Error> {
        let channel = match what {
            Follow::Group(g) => self.keys.group_channel(g),
            Follow::Uid(u) => self.keys.uid_channel(u),
        };
        let mut subscribed = self.subscribed.lock().await;
        // Read the hub under the lock: whatever the order of concurrent
        // changes, the last one to get here leaves the subscription right.
        let wanted = match what {
            Follow::Group(g) => self.hub.has_group(g),
            Follow::Uid(u) => self.hub.has_uid(u),
        };
        match (wanted, subscribed.contains(&channel)) {
            (true, false) => {
                self.subscribe(channel.clone()).await?;
                subscribed.insert(channel);
            }
            (false, true) => {
                subscribed.remove(&channel);
                if self.sharded {
                    self.subscriber.sunsubscribe(channel).await?;
                } else {
                    self.subscriber.unsubscribe(channel).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    // ----- receiving --------------------------------------------------------

    async fn receive_loop(self: Arc<Self>) {
        use tokio::sync::broadcast::error::RecvError;
        let mut messages = self.subscriber.message_rx();
        loop {
            let message = tokio::select! {
                m = messages.recv() => m,
                () = self.stop.cancelled() => return,
            };
            match message {
                Ok(message) => self.on_message(&message.channel, &message.value),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        dropped = n,
                        "pub/sub messages dropped: this node falls behind"
                    );
                    self.metrics.pubsub_dropped.inc_by(n);
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn on_message(&self, channel: &str, value: &fred::types::Value) {
        self.metrics.pubsub_received.inc();
        let Some(channel) = self.keys.parse_channel(channel) else {
            return;
        };
        let envelope = match value.as_bytes().map(Envelope::decode) {
            Some(Ok(envelope)) => envelope,
            Some(Err(e)) => return self.malformed(channel, &e.to_string()),
            None => return self.malformed(channel, "not a byte string"),
        };
        if envelope.origin.as_deref() == Some(self.node_name.as_str()) {
            // Pushed (or ungrouped) through this node: already applied here.
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

    fn dispatch(&self, channel: Channel<'_>, e: Envelope) -> Result<(), &'static str> {
        match (channel, e.op) {
            (_, Op::Push) => {
                let data = e.data.ok_or("push without data")?;
                let message = self.checked_message(e.binary, data)?;
                let exclude = parse_ids(&e.exclude);
                let encode = || message.frame();
                let (kind, delivered) = match channel {
                    Channel::All => (
                        "all",
                        self.hub.deliver_with(&Target::All, &exclude, &encode),
                    ),
                    Channel::Group(group) => (
                        "group",
                        self.hub
                            .deliver_group_part(&e.groups, group, &exclude, &encode),
                    ),
                    Channel::Uid(uid) => (
                        "uid",
                        self.hub.deliver_with(
                            &Target::Uids(vec![uid.to_owned()]),
                            &exclude,
                            &encode,
                        ),
                    ),
                    Channel::Node(_) => {
                        let target = Target::Clients(parse_ids(&e.client_ids));
                        ("client", self.hub.deliver_with(&target, &exclude, &encode))
                    }
                };
                self.metrics.delivered(kind, delivered);
            }
            (Channel::Node(_), Op::Reply) => {
                let req = e.req.ok_or("reply without req")?;
                if let Some(waiter) = self.pending.lock().remove(&req) {
                    let _ = waiter.send(e.error);
                }
            }
            (Channel::Node(_), Op::Close) => {
                let id = parse_id(e.client_id.as_deref()).ok_or("close without client_id")?;
                let last = match e.data {
                    Some(data) => Some(self.checked_message(e.binary, data)?.frame()),
                    None => None,
                };
                self.hub
                    .close_client(id, last, close_code::NORMAL, "closed by server");
            }
            (Channel::Group(group), Op::Ungroup) => {
                self.hub.ungroup(group);
                self.queue(Applied {
                    change: Some(Change::Ungroup {
                        group: group.to_owned(),
                    }),
                    reply: None,
                });
            }
            (Channel::Node(_), op) => {
                let id = parse_id(e.client_id.as_deref()).ok_or("command without client_id")?;
                let change = self.change_hub(op, id, e.uid, e.group, e.session)?;
                let reply = match (e.req, e.reply_to.as_deref().map(str::parse::<NodeId>)) {
                    (Some(req), Some(Ok(node))) => Some((node, req)),
                    _ => None,
                };
                self.queue(Applied { change, reply });
            }
            _ => return Err("operation not valid on this channel"),
        }
        Ok(())
    }

    /// A message from Redis held to the API's rules: at most
    /// `--max-message-bytes`, and text must be UTF-8 (an invalid text frame
    /// would make the client drop its connection).
    fn checked_message(&self, binary: bool, data: Bytes) -> Result<Message, &'static str> {
        if data.len() > self.settings.max_message_bytes {
            return Err("message above --max-message-bytes");
        }
        if !binary && std::str::from_utf8(&data).is_err() {
            return Err("text message is not UTF-8");
        }
        Ok(Message { binary, data })
    }

    fn queue(&self, applied: Applied) {
        if self.commands.try_send(applied).is_err() {
            tracing::warn!("command queue full: a membership change was not mirrored to redis");
        }
    }

    /// Applies commands' Redis side in the order they arrived, then answers.
    async fn command_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Applied>) {
        while let Some(applied) = rx.recv().await {
            let result = match applied.change {
                Some(change) => self
                    .persist(change)
                    .await
                    .inspect_err(|_| self.mark_dirty()),
                None => Ok(()),
            };
            if let Some((node, req)) = applied.reply {
                let mut reply = Envelope::new(Op::Reply);
                reply.req = Some(req);
                reply.error = result.err().map(|e| e.to_string());
                let channel = self.keys.node_channel(node);
                if let Err(e) = self.publish(channel, reply.encode()).await {
                    tracing::debug!(error = %e, "could not answer a command");
                }
            }
        }
    }

    // ----- changes ----------------------------------------------------------

    /// Makes a membership change in the hub. `Ok(None)`: nothing to do (the
    /// client is not here, or an unbind of a uid it does not have).
    fn change_hub(
        &self,
        op: Op,
        id: ClientId,
        uid: Option<String>,
        group: Option<String>,
        session: Option<Session>,
    ) -> Result<Option<Change>, &'static str> {
        let hub = &self.hub;
        Ok(match op {
            Op::BindUid => {
                let uid = valid_name(uid).ok_or("bind_uid without a valid uid")?;
                // Mirrored even when the hub had it already: the scripts are
                // idempotent, and a retry after a failed write must repair it.
                hub.bind_uid(id, &uid).map(|previous| {
                    let previous = previous.filter(|p| *p != uid);
                    Change::BindUid { id, uid, previous }
                })
            }
            Op::UnbindUid => {
                let uid = valid_name(uid).ok_or("unbind_uid without a valid uid")?;
                hub.unbind_uid(id, &uid)
                    .then_some(Change::UnbindUid { id, uid })
            }
            Op::JoinGroup => {
                let group = valid_name(group).ok_or("join_group without a valid group")?;
                hub.join_group(id, &group)
                    .map(|_| Change::JoinGroup { id, group })
            }
            Op::LeaveGroup => {
                let group = valid_name(group).ok_or("leave_group without a valid group")?;
                hub.leave_group(id, &group);
                hub.contains(id).then_some(Change::LeaveGroup { id, group })
            }
            Op::SetSession | Op::UpdateSession => {
                let session = session.ok_or("session command without session")?;
                hub.set_session(id, session, op == Op::UpdateSession)
                    .map(|session| Change::SetSession { id, session })
            }
            _ => return Err("not a membership command"),
        })
    }

    /// Mirrors a hub change into Redis, after subscribing to what it needs.
    async fn persist(&self, change: Change) -> EngineResult<()> {
        let (op, id, value, previous) = match change {
            Change::BindUid { id, uid, previous } => {
                self.follow(Follow::Uid(&uid)).await.map_err(unavailable)?;
                if let Some(previous) = &previous {
                    self.follow(Follow::Uid(previous))
                        .await
                        .map_err(unavailable)?;
                }
                ("bind_uid", id, uid, previous.unwrap_or_default())
            }
            Change::UnbindUid { id, uid } => {
                self.follow(Follow::Uid(&uid)).await.map_err(unavailable)?;
                ("unbind_uid", id, uid, String::new())
            }
            Change::JoinGroup { id, group } => {
                self.follow(Follow::Group(&group))
                    .await
                    .map_err(unavailable)?;
                ("join_group", id, group, String::new())
            }
            Change::LeaveGroup { id, group } => {
                self.follow(Follow::Group(&group))
                    .await
                    .map_err(unavailable)?;
                ("leave_group", id, group, String::new())
            }
            Change::SetSession { id, session } => {
                let json = serde_json::to_string(&session).unwrap_or_else(|_| "{}".into());
                ("set_session", id, json, String::new())
            }
            Change::Ungroup { group } => {
                self.follow(Follow::Group(&group))
                    .await
                    .map_err(unavailable)?;
                self.scripts
                    .ungroup
                    .evalsha::<Vec<String>, _, _, _>(&self.client, self.partition.clone(), group)
                    .await
                    .map_err(unavailable)?;
                return Ok(());
            }
        };
        self.scripts
            .membership
            .evalsha::<i64, _, _, _>(
                &self.client,
                self.partition.clone(),
                vec![op.to_owned(), id.to_string(), value, previous],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Runs a membership command where the client lives: here, or on its
    /// node (and waits for that node's answer).
    async fn command(
        &self,
        op: Op,
        id: ClientId,
        uid: Option<String>,
        group: Option<String>,
        session: Option<Session>,
    ) -> EngineResult<()> {
        self.check()?;
        if self.is_local(id) {
            let change = self
                .change_hub(op, id, uid, group, session)
                .map_err(|e| EngineError::Unavailable(e.into()))?;
            return match change {
                Some(change) => self
                    .persist(change)
                    .await
                    .inspect_err(|_| self.mark_dirty()),
                None => Ok(()),
            };
        }
        let mut e = Envelope::new(op);
        e.client_id = Some(id.to_string());
        e.uid = uid;
        e.group = group;
        e.session = session;
        self.rpc(id.node(), e).await
    }

    async fn rpc(&self, node: NodeId, mut e: Envelope) -> EngineResult<()> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        e.req = Some(req);
        e.reply_to = Some(self.node_name.clone());
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(req, tx);
        // Removes the waiter however this ends, the API deadline included.
        let _pending = PendingGuard {
            pending: &self.pending,
            req,
        };
        let receivers = self.publish(self.keys.node_channel(node), e.encode()).await;
        let reply = match receivers {
            Ok(n) if n > 0 => tokio::time::timeout(RPC_TIMEOUT, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Ok(_) => None,
            Err(e) => return Err(unavailable(e)),
        };
        let answer = if let Some(reply) = reply {
            Ok(reply)
        } else if self.node_alive(node).await? {
            // Alive but not listening or not answering (its subscriber may
            // be reconnecting): the change may not be applied.
            Err(EngineError::Unavailable(format!(
                "node {node} did not answer"
            )))
        } else {
            // The node is gone, and its clients with it: a no-op.
            Ok(None)
        };
        match answer? {
            None => Ok(()),
            Some(error) => Err(EngineError::Unavailable(error)),
        }
    }

    /// Subscribes to a channel: sharded (SSUBSCRIBE) on Redis Cluster.
    async fn subscribe(&self, channel: String) -> Result<(), fred::error::Error> {
        if self.sharded {
            self.subscriber.ssubscribe(channel).await
        } else {
            self.subscriber.subscribe(channel).await
        }
    }

    /// Publishes to a channel: sharded (SPUBLISH) on Redis Cluster, so a
    /// message goes only to the shard that owns the channel instead of
    /// crossing the whole cluster bus. Returns the number of receivers.
    async fn publish(&self, channel: String, bytes: Bytes) -> Result<i64, fred::error::Error> {
        if self.sharded {
            self.client.spublish(channel, bytes).await
        } else {
            self.client.publish(channel, bytes).await
        }
    }

    async fn node_alive(&self, node: NodeId) -> EngineResult<bool> {
        let key = format!("{}:alive", self.keys.partition(node));
        let n: i64 = self.client.exists(key).await.map_err(unavailable)?;
        Ok(n == 1)
    }

    // ----- queries ----------------------------------------------------------

    /// A field of another node's client, read from that node's partition
    /// (`hash` is `:clients`, the session, or `:uid`).
    async fn remote_field(&self, id: ClientId, hash: &str) -> EngineResult<Option<String>> {
        self.check()?;
        let key = format!("{}{hash}", self.keys.partition(id.node()));
        self.client
            .hget(key, id.to_string())
            .await
            .map_err(unavailable)
    }

    /// The other registered nodes.
    async fn other_nodes(&self) -> EngineResult<Vec<NodeId>> {
        self.check()?;
        let names: Vec<String> = self
            .client
            .smembers(self.keys.nodes())
            .await
            .map_err(unavailable)?;
        Ok(names
            .iter()
            .filter_map(|n| n.parse().ok())
            .filter(|n| *n != self.node)
            .collect())
    }

    /// Runs `query` on every other node's partition, concurrently.
    async fn per_node<T, F, Fut>(&self, query: F) -> EngineResult<Vec<T>>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        let nodes = self.other_nodes().await?;
        try_join_all(nodes.into_iter().map(|n| query(self.keys.partition(n))))
            .await
            .map_err(unavailable)
    }

    async fn members_with(
        &self,
        set: String,
        hash: &'static str,
    ) -> EngineResult<Vec<(String, Option<String>)>> {
        let lists = self
            .per_node(|p| {
                self.scripts
                    .members_with
                    .evalsha::<Vec<Option<String>>, _, _, _>(
                        &self.client,
                        p,
                        vec![set.clone(), hash.to_owned()],
                    )
            })
            .await?;
        Ok(lists
            .into_iter()
            .flat_map(|flat| {
                let mut pairs = Vec::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(Some(member)), Some(value)) = (it.next(), it.next()) {
                    pairs.push((member, value));
                }
                pairs
            })
            .collect())
    }
}

/// A uid or group from Redis, held to the API's rules (non-empty, at most
/// 256 bytes).
fn valid_name(name: Option<String>) -> Option<String> {
    name.and_then(|n| crate::name::Name::new(n).ok())
        .map(|n| n.0)
}

/// Forgets an RPC's waiter when the call ends or is dropped.
struct PendingGuard<'a> {
    pending: &'a Mutex<HashMap<u64, oneshot::Sender<Option<String>>>>,
    req: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.req);
    }
}

fn parse_id(s: Option<&str>) -> Option<ClientId> {
    s.and_then(|s| s.parse().ok())
}

fn parse_ids(ids: &[String]) -> Vec<ClientId> {
    ids.iter().filter_map(|s| s.parse().ok()).collect()
}

fn ids_to_strings(ids: &[ClientId]) -> Vec<String> {
    ids.iter().map(ClientId::to_string).collect()
}

fn parse_session(json: Option<String>) -> Session {
    json.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn distinct(mut items: Vec<String>) -> Vec<String> {
    items.sort_unstable();
    items.dedup();
    items
}

#[async_trait]
impl Engine for RedisEngine {
    fn is_ready(&self) -> bool {
        let i = &self.inner;
        i.client.is_connected()
            && i.subscriber.is_connected()
            && i.registered.load(Ordering::Acquire)
    }

    async fn connect(&self, id: ClientId, outbox: Arc<Outbox>, m: Membership) -> EngineResult<()> {
        let i = &self.inner;
        i.hub.insert(id, outbox, m.clone());
        if !i.client.is_connected() {
            // Redis is down: serve the client now; the node registers every
            // connection again when it reconnects.
            return Ok(());
        }
        let registered = async {
            if let Some(uid) = &m.uid {
                i.follow(Follow::Uid(uid)).await?;
            }
            for group in &m.groups {
                i.follow(Follow::Group(group)).await?;
            }
            i.write_client(id, &m).await
        };
        // Redis being down does not refuse clients: the node registers them
        // all again when it reconnects.
        if let Err(e) = registered.await {
            tracing::warn!(error = %e, "connection not registered in redis yet");
            i.mark_dirty();
        }
        Ok(())
    }

    async fn disconnect(&self, id: ClientId) {
        let i = &self.inner;
        let Some(m) = i.hub.remove(id) else {
            return;
        };
        if i.leaving.load(Ordering::Acquire) || !i.client.is_connected() {
            // Leaving: the partition goes as a whole. Redis down: the
            // partition is rewritten (and channels reconciled) on reconnect.
            return;
        }
        // In the background: the connection is already out of the hub (so
        // out of every push), and its close frame should not wait for Redis.
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let i = &inner;
            let removed = async {
                i.remove_client(id, &m).await?;
                if let Some(uid) = &m.uid {
                    i.follow(Follow::Uid(uid)).await?;
                }
                for group in &m.groups {
                    i.follow(Follow::Group(group)).await?;
                }
                Ok::<_, fred::error::Error>(())
            };
            if let Err(e) = removed.await {
                tracing::warn!(error = %e, "connection not removed from redis yet");
                i.mark_dirty();
            }
        });
    }

    async fn publish(&self, push: Push) -> EngineResult<()> {
        let i = &self.inner;
        let mut e = Envelope::new(Op::Push);
        e.data = Some(push.message.data.clone());
        e.binary = push.message.binary;
        e.exclude = ids_to_strings(&push.exclude);
        let mut channels = Vec::new();
        match &push.target {
            Target::Client(id) if i.is_local(*id) => {
                let delivered = i.hub.deliver(&push);
                i.metrics.delivered(push.target.kind(), delivered);
                return Ok(());
            }
            Target::Client(id) => {
                i.check()?;
                e.client_ids = vec![id.to_string()];
                let channel = i.keys.node_channel(id.node());
                return publish_one(i, channel, e.encode()).await;
            }
            Target::Clients(ids) => {
                let mut by_node: HashMap<NodeId, Vec<String>> = HashMap::new();
                for id in ids.iter().filter(|id| !i.is_local(**id)) {
                    by_node.entry(id.node()).or_default().push(id.to_string());
                }
                let mut sends = Vec::new();
                for (node, ids) in by_node {
                    e.client_ids = ids;
                    sends.push((i.keys.node_channel(node), e.encode()));
                }
                let delivered = i.hub.deliver(&push);
                i.metrics.delivered(push.target.kind(), delivered);
                if sends.is_empty() {
                    return Ok(());
                }
                i.check()?;
                return publish_many(i, sends).await;
            }
            Target::Uids(uids) => channels.extend(uids.iter().map(|u| i.keys.uid_channel(u))),
            Target::Groups(groups) => {
                if groups.len() > 1 {
                    e.groups = groups.clone();
                }
                channels.extend(groups.iter().map(|g| i.keys.group_channel(g)));
            }
            Target::All => channels.push(i.keys.all_channel()),
        }
        // This node delivers to its own connections at once and tells the
        // others; it skips its own message when Redis echoes it back. (Were
        // its clients served by the echo instead, a push followed by a local
        // leave_group or close_client could reach them after the change.)
        let delivered = i.hub.deliver(&push);
        i.metrics.delivered(push.target.kind(), delivered);
        // Without Redis the others cannot get it, and the caller learns it.
        i.check()?;
        e.origin = Some(i.node_name.clone());
        let bytes = e.encode();
        publish_many(
            i,
            channels.into_iter().map(|c| (c, bytes.clone())).collect(),
        )
        .await
    }

    async fn close_client(&self, id: ClientId, last: Option<Message>) -> EngineResult<()> {
        let i = &self.inner;
        if i.is_local(id) {
            let frame = last.map(|m| m.frame());
            i.hub
                .close_client(id, frame, close_code::NORMAL, "closed by server");
            return Ok(());
        }
        i.check()?;
        let mut e = Envelope::new(Op::Close);
        e.client_id = Some(id.to_string());
        if let Some(last) = last {
            e.binary = last.binary;
            e.data = Some(last.data);
        }
        publish_one(i, i.keys.node_channel(id.node()), e.encode()).await
    }

    async fn bind_uid(&self, id: ClientId, uid: String) -> EngineResult<()> {
        self.inner
            .command(Op::BindUid, id, Some(uid), None, None)
            .await
    }

    async fn unbind_uid(&self, id: ClientId, uid: String) -> EngineResult<()> {
        self.inner
            .command(Op::UnbindUid, id, Some(uid), None, None)
            .await
    }

    async fn join_group(&self, id: ClientId, group: String) -> EngineResult<()> {
        self.inner
            .command(Op::JoinGroup, id, None, Some(group), None)
            .await
    }

    async fn leave_group(&self, id: ClientId, group: String) -> EngineResult<()> {
        self.inner
            .command(Op::LeaveGroup, id, None, Some(group), None)
            .await
    }

    async fn ungroup(&self, group: String) -> EngineResult<()> {
        let i = &self.inner;
        i.check()?;
        // Other nodes drop their members when the command arrives on the
        // group's channel (in order with pushes to the group); their
        // partitions are cleared here so queries agree at once.
        i.hub.ungroup(&group);
        let mut e = Envelope::new(Op::Ungroup);
        e.origin = Some(i.node_name.clone());
        publish_one(i, i.keys.group_channel(&group), e.encode()).await?;
        i.persist(Change::Ungroup {
            group: group.clone(),
        })
        .await?;
        i.per_node(|p| {
            i.scripts
                .ungroup
                .evalsha::<Vec<String>, _, _, _>(&i.client, p, group.clone())
        })
        .await?;
        Ok(())
    }

    async fn set_session(&self, id: ClientId, session: Session, merge: bool) -> EngineResult<()> {
        let op = if merge {
            Op::UpdateSession
        } else {
            Op::SetSession
        };
        self.inner.command(op, id, None, None, Some(session)).await
    }

    async fn is_online(&self, id: ClientId) -> EngineResult<bool> {
        let i = &self.inner;
        if i.is_local(id) {
            return Ok(i.hub.contains(id));
        }
        Ok(i.remote_field(id, ":clients").await?.is_some())
    }

    async fn uid_of(&self, id: ClientId) -> EngineResult<Option<String>> {
        let i = &self.inner;
        if i.is_local(id) {
            return Ok(i.hub.uid_of(id).flatten());
        }
        i.remote_field(id, ":uid").await
    }

    async fn session_of(&self, id: ClientId) -> EngineResult<Option<Session>> {
        let i = &self.inner;
        if i.is_local(id) {
            return Ok(i.hub.session_of(id));
        }
        let json = i.remote_field(id, ":clients").await?;
        Ok(json.map(|j| parse_session(Some(j))))
    }

    async fn client_ids_by_uid(&self, uid: String) -> EngineResult<Vec<ClientId>> {
        let i = &self.inner;
        let mut ids = i.hub.client_ids_by_uid(&uid);
        let key = format!(":u:{uid}");
        let remote: Vec<Vec<String>> = i.per_node(|p| i.client.smembers(p + &key)).await?;
        ids.extend(remote.iter().flat_map(|l| parse_ids(l)));
        Ok(ids)
    }

    async fn group_client_ids(&self, group: String) -> EngineResult<Vec<ClientId>> {
        let i = &self.inner;
        let mut ids = i.hub.group_client_ids(&group);
        let key = format!(":g:{group}");
        let remote: Vec<Vec<String>> = i.per_node(|p| i.client.smembers(p + &key)).await?;
        ids.extend(remote.iter().flat_map(|l| parse_ids(l)));
        Ok(ids)
    }

    async fn group_client_count(&self, group: String) -> EngineResult<u64> {
        let i = &self.inner;
        let key = format!(":g:{group}");
        let counts: Vec<u64> = i.per_node(|p| i.client.scard(p + &key)).await?;
        Ok(i.hub.group_client_count(&group) as u64 + counts.iter().sum::<u64>())
    }

    async fn group_sessions(&self, group: String) -> EngineResult<Vec<(ClientId, Session)>> {
        let i = &self.inner;
        let mut sessions = i.hub.group_sessions(&group);
        for (id, json) in i.members_with(format!(":g:{group}"), ":clients").await? {
            if let Ok(id) = id.parse() {
                sessions.push((id, parse_session(json)));
            }
        }
        Ok(sessions)
    }

    async fn group_uids(&self, group: String) -> EngineResult<Vec<String>> {
        let i = &self.inner;
        let mut uids = i.hub.group_uids(&group);
        let remote = i.members_with(format!(":g:{group}"), ":uid").await?;
        uids.extend(remote.into_iter().filter_map(|(_, uid)| uid));
        Ok(distinct(uids))
    }

    async fn client_count(&self) -> EngineResult<u64> {
        let i = &self.inner;
        let counts: Vec<u64> = i.per_node(|p| i.client.hlen(p + ":clients")).await?;
        Ok(i.hub.client_count() as u64 + counts.iter().sum::<u64>())
    }

    async fn client_ids(&self) -> EngineResult<Vec<ClientId>> {
        let i = &self.inner;
        let mut ids = i.hub.client_ids();
        let remote: Vec<Vec<String>> = i.per_node(|p| i.client.hkeys(p + ":clients")).await?;
        ids.extend(remote.iter().flat_map(|l| parse_ids(l)));
        Ok(ids)
    }

    async fn sessions(&self) -> EngineResult<Vec<(ClientId, Session)>> {
        let i = &self.inner;
        let mut sessions = i.hub.sessions();
        let remote: Vec<HashMap<String, String>> =
            i.per_node(|p| i.client.hgetall(p + ":clients")).await?;
        for (id, json) in remote.into_iter().flatten() {
            if let Ok(id) = id.parse() {
                sessions.push((id, parse_session(Some(json))));
            }
        }
        Ok(sessions)
    }

    async fn uids(&self) -> EngineResult<Vec<String>> {
        let i = &self.inner;
        let mut uids = i.hub.uids();
        let remote: Vec<Vec<String>> = i.per_node(|p| i.client.smembers(p + ":uids")).await?;
        uids.extend(remote.into_iter().flatten());
        Ok(distinct(uids))
    }

    async fn uid_count(&self) -> EngineResult<u64> {
        Ok(self.uids().await?.len() as u64)
    }

    async fn groups(&self) -> EngineResult<Vec<String>> {
        let i = &self.inner;
        let mut groups = i.hub.groups();
        let remote: Vec<Vec<String>> = i.per_node(|p| i.client.smembers(p + ":groups")).await?;
        groups.extend(remote.into_iter().flatten());
        Ok(distinct(groups))
    }

    async fn shutdown(&self) {
        let i = &self.inner;
        i.leaving.store(true, Ordering::Release);
        i.registered.store(false, Ordering::Release);
        let leave = async {
            i.scripts
                .clear
                .evalsha::<i64, _, _, _>(&i.client, i.partition.clone(), "all")
                .await?;
            i.client
                .del::<i64, _>(format!("{}:alive", i.partition))
                .await?;
            i.client
                .srem::<i64, _, _>(i.keys.nodes(), i.node_name.clone())
                .await?;
            Ok::<_, fred::error::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(3), leave).await {
            Ok(Ok(())) => tracing::info!("left the cluster: entries removed from redis"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not remove this node's entries from redis")
            }
            Err(_) => tracing::warn!("redis did not answer while leaving the cluster"),
        }
        i.stop.cancel();
        let _ = i.subscriber.quit().await;
        let _ = i.client.quit().await;
    }
}

async fn publish_one(i: &Inner, channel: String, bytes: Bytes) -> EngineResult<()> {
    i.publish(channel, bytes)
        .await
        .map(|_| ())
        .map_err(unavailable)
}

async fn publish_many(i: &Inner, sends: Vec<(String, Bytes)>) -> EngineResult<()> {
    try_join_all(
        sends
            .into_iter()
            .map(|(channel, bytes)| i.publish(channel, bytes)),
    )
    .await
    .map(|_| ())
    .map_err(unavailable)
}
