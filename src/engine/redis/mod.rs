//! The Redis engine: any number of stateless nodes pointed at one Redis
//! behave as one gateway. docs/redis.md describes it for operators.
//!
//! - State: each node mirrors its own connections (uid, groups, session)
//!   into its partition of keys ([`keys`]). One task, the [`mirror`], is
//!   the only writer of the partition: changes mark connections and
//!   channels dirty, and the mirror writes them in batches, from the hub's
//!   current state, with pipelined scripts ([`partition`]) after
//!   following the channels they need ([`subscriptions`]).
//! - Delivery: pub/sub. A push to a group goes to the group's channel,
//!   which only nodes holding a member subscribe to; likewise for uids; a
//!   push to a client goes to its node's channel; send_to_all to one channel
//!   every node subscribes to. The [`subscriber`] reads Redis on
//!   connections of its own into a bounded [`inbox`], and stops reading
//!   while it is full (back-pressure, never a drop). One thread, the
//!   [`dispatch`]er, takes every message and delivers it without waiting on
//!   anything, this node's own channel first; a reader handles a message of
//!   a uid, node or reply channel itself when nothing is queued before it.
//! - Ownership: a membership change for a client on another node is a
//!   command to that node ([`rpc`]), answered once mirrored
//!   ([`membership`]).
//! - Liveness: nodes heartbeat a key with a TTL; one survivor at a time
//!   deletes the partition of a node whose key expired ([`liveness`]).
//!   Each node follows the live nodes through a counter that changes with
//!   the node set ([`registry`]). After any
//!   reconnection a node registers again ([`registration`]). A PING
//!   tells a hung Redis from a slow one for readiness ([`probe`]).
//! - Queries about other nodes' connections read their partitions
//!   ([`queries`]).

mod behind;
mod client;
mod dispatch;
mod gaps;
mod history;
mod inbox;
mod liveness;
mod load;
mod lost;
mod membership;
mod mirror;
mod partition;
mod presence;
mod probe;
mod queries;
mod registration;
mod registry;
mod resume;
mod rpc;
mod scripts;
mod stats;
mod subscriber;
mod subscriptions;
mod tail;

pub use gatecast_emitter::{envelope, keys};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use self::client::{unavailable, Redis};
use self::envelope::{Envelope, Op};
use self::keys::Keys;
use self::mirror::Mirror;
use self::rpc::Rpc;
use self::scripts::Scripts;
use super::{Engine, EngineError, EngineResult};
use crate::frame::close_code;
use crate::hub::{Hub, Membership};
use crate::ids::{ClientId, NodeId};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::push::{Message, Push, Target};
use crate::session::Session;
use crate::task::{spawn_critical, Fatal};

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `--redis-url`.
    pub url: String,
    /// `--redis-password`: replaces the URL's password.
    pub password: Option<String>,
    /// `--redis-prefix`.
    pub prefix: String,
    /// `--node-heartbeat`.
    pub heartbeat: Duration,
    /// `--redis-lost-grace`: how long clients stay while Redis is lost.
    pub lost_grace: Duration,
    /// `--reconnect-window`: `retry_ms` of the `redis_lost` closes.
    pub reconnect_window: Duration,
    /// What this node publishes about itself in its liveness key.
    pub info: serde_json::Value,
    /// `--max-message-bytes`: larger pushes from Redis are refused too.
    pub max_message_bytes: usize,
    /// `--max-list-items`: longer lists in envelopes from Redis are refused.
    pub max_list_items: usize,
    /// `--gateway-secret-key`: signs this node's liveness record, and only
    /// nodes whose record it verifies are listed to the Register (none set:
    /// records are neither signed nor checked).
    pub liveness_key: crate::gatewayworker::secret::GatewayKey,
    /// `--resume-window`: how long a resume record outlives its connection.
    pub resume_window: Duration,
    /// `--history-*`: which pushes are kept, how many, how long.
    pub history: crate::recovery::history::HistorySettings,
    /// `--presence-events` and `--presence-grace`.
    pub presence: crate::presence::PresenceSettings,
    /// Where presence transitions and the close events of purged
    /// connections go (`--events` on); none: not collected.
    pub notices: Option<crate::presence::Notices>,
}

/// The Redis engine. Cheap to clone.
#[derive(Clone)]
pub struct RedisEngine {
    shared: Arc<Shared>,
}

/// What every part of the engine shares.
struct Shared {
    node: NodeId,
    node_name: String,
    /// This process, as opposed to another one with the same node id.
    instance: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    keys: Keys,
    redis: Redis,
    /// Messages from the subscriber, waiting for the dispatcher.
    inbox: Arc<inbox::Inbox>,
    scripts: Scripts,
    settings: RedisSettings,
    /// Connections and channels waiting to be mirrored.
    mirror: Mirror,
    /// Commands sent to other nodes, waiting for their reply.
    rpc: Rpc,
    /// This node's view of the live nodes ([`registry`]).
    registry: registry::View,
    /// This node's connections that opted in to recovery, with the keys
    /// of their resume records.
    resumable: crate::recovery::resume::Resumable,
    /// Turns of resumes asking Redis ([`resume::IN_FLIGHT`]).
    resumes: tokio::sync::Semaphore,
    /// History reads in flight, shared by concurrent resumes.
    reads: history::Reads,
    /// Offsets delivered per stream, for gap repair.
    gaps: gaps::Gaps,
    /// The partition and subscriptions were written since the last
    /// (re)connection: the node is ready.
    registered: AtomicBool,
    /// Redis answered the last PING in time ([`probe`]): false while it
    /// hangs with its connections open.
    responsive: AtomicBool,
    /// The mirror's last batch was written: false while Redis refuses its
    /// writes (out of memory, read-only) or times them out.
    writable: AtomicBool,
    /// Presence on Redis Cluster: what this instance reported.
    holds: presence::Holds,
    /// Redis unreachable for longer than `--redis-lost-grace` ([`lost`]):
    /// new clients are refused and every client is closed.
    lost: AtomicBool,
    /// The oldest push dispatched lately ([`behind`]).
    lag: behind::Lag,
    /// Stops the background tasks.
    stop: CancellationToken,
    /// Trips when the node must stop (another live instance has its id).
    fatal: Fatal,
}

impl RedisEngine {
    /// Connects to Redis and starts the node's background tasks. Does not
    /// wait for Redis to be reachable: the node starts not ready and becomes
    /// ready once connected and registered.
    pub async fn start(
        mut settings: RedisSettings,
        node: NodeId,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        fatal: Fatal,
    ) -> Result<Self, String> {
        let keys = Keys::new(&settings.prefix);
        let inbox = Arc::new(inbox::Inbox::default());
        let wanted = {
            let (hub, keys) = (hub.clone(), keys.clone());
            Box::new(move |channel: &str| match keys.parse_channel(channel) {
                Some(keys::Channel::All) => true,
                Some(keys::Channel::Node(n) | keys::Channel::Reply(n)) => n == node,
                Some(keys::Channel::Group(g)) => hub.has_group(g),
                Some(keys::Channel::Uid(u)) => hub.has_uid(u),
                None => false,
            })
        };
        let redis = Redis::build(
            &settings.url,
            settings.password.as_deref(),
            keys.node_channel(node),
            keys.reply_channel(node),
            inbox.clone(),
            metrics.clone(),
            wanted,
        )?;
        let instance = uuid::Uuid::new_v4().to_string();
        if let Some(info) = settings.info.as_object_mut() {
            info.insert("instance".into(), instance.clone().into());
        }
        liveness::sign(&mut settings.info, &settings.liveness_key, node);
        let shared = Arc::new(Shared {
            node,
            node_name: node.to_string(),
            instance,
            keys,
            hub,
            metrics,
            redis,
            inbox: inbox.clone(),
            scripts: Scripts::default(),
            settings,
            mirror: Mirror::default(),
            rpc: Rpc::default(),
            registry: registry::View::default(),
            resumable: Default::default(),
            resumes: tokio::sync::Semaphore::new(resume::IN_FLIGHT),
            reads: history::Reads::default(),
            gaps: gaps::Gaps::default(),
            registered: AtomicBool::new(false),
            responsive: AtomicBool::new(true),
            writable: AtomicBool::new(true),
            holds: presence::Holds::default(),
            lost: AtomicBool::new(false),
            lag: behind::Lag::default(),
            stop: CancellationToken::new(),
            fatal,
        });

        shared.gaps.set_runtime(tokio::runtime::Handle::current());
        dispatch::start(&shared, inbox.clone())
            .map_err(|e| format!("cannot start the dispatcher threads: {e}"))?;
        dispatch::set_direct(&shared, &inbox);
        let (fatal, stop) = (&shared.fatal, &shared.stop);
        spawn_critical(
            "registration",
            fatal,
            stop,
            registration::run(shared.clone()),
        );
        spawn_critical("mirror", fatal, stop, mirror::run(shared.clone()));
        spawn_critical("liveness", fatal, stop, liveness::run(shared.clone()));
        spawn_critical("probe", fatal, stop, probe::run(shared.clone()));
        if presence::polls(&shared) {
            spawn_critical("presence", fatal, stop, presence::run(shared.clone()));
        }
        spawn_critical("redis lost", fatal, stop, lost::run(shared.clone()));
        spawn_critical("redis behind", fatal, stop, behind::run(shared.clone()));
        shared.redis.client.connect();
        shared.redis.probe.connect();
        // After the registration task listens, so the first connection's
        // events are seen too.
        shared.redis.subscriber.connect(shared.stop.clone());
        Ok(RedisEngine { shared })
    }
}

impl Shared {
    fn check(&self) -> EngineResult<()> {
        if self.redis.client.is_connected() {
            Ok(())
        } else {
            Err(EngineError::Unavailable("redis is not connected".into()))
        }
    }

    /// `--resume-window` in milliseconds, as the scripts take it.
    /// The presence arguments of the partition scripts: base, flags,
    /// grace in ms (`''` base: off).
    fn presence_args(&self) -> [String; 3] {
        let p = &self.settings.presence;
        if !p.any() || self.settings.notices.is_none() {
            return [String::new(), String::new(), "0".into()];
        }
        if self.redis.sharded {
            // One hash tag for every presence key, and the partition
            // scripts collect (see presence::Holds).
            return [
                format!("{}:{{pr}}", self.keys.prefix()),
                format!("c{}", p.flags()),
                p.grace.as_millis().to_string(),
            ];
        }
        [
            format!("{}:pr", self.keys.prefix()),
            p.flags(),
            p.grace.as_millis().to_string(),
        ]
    }

    /// Hands notices (presence transitions, purged connections' closes)
    /// on to the events; dropped (counted) when their queue is full.
    fn notify(&self, notices: Vec<crate::presence::Notice>) {
        let Some(to) = &self.settings.notices else {
            return;
        };
        for notice in notices {
            if !to.send(notice) {
                self.metrics.events_dropped.inc();
            }
        }
    }

    /// The same, waiting for room (bounded): for the purge and the due
    /// transitions, background tasks whose bursts may pass the queue. The
    /// mirror never waits (events must not hold up membership writes).
    async fn notify_wait(&self, notices: Vec<crate::presence::Notice>) {
        let Some(to) = &self.settings.notices else {
            return;
        };
        for notice in notices {
            if !to.send_wait(notice).await {
                self.metrics.events_dropped.inc();
            }
        }
    }

    fn resume_window_ms(&self) -> String {
        self.settings.resume_window.as_millis().max(1).to_string()
    }

    fn is_local(&self, id: ClientId) -> bool {
        id.node() == self.node
    }

    async fn publish_one(&self, channel: String, bytes: bytes::Bytes) -> EngineResult<i64> {
        self.redis
            .publish(channel, bytes)
            .await
            .map_err(unavailable)
    }

    async fn publish_many(&self, sends: Vec<(String, bytes::Bytes)>) -> EngineResult<()> {
        let sends = sends.into_iter().map(|(c, b)| self.redis.publish(c, b));
        futures_util::future::try_join_all(sends)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

/// The envelope's `ts`: when the push being published was accepted here
/// (its API call), else now.
fn accept_ts() -> u64 {
    crate::push_latency::current().map_or_else(crate::push_latency::unix_us, |a| a.unix_us())
}

fn ids_to_strings(ids: &[ClientId]) -> Vec<String> {
    ids.iter().map(ClientId::to_string).collect()
}

#[async_trait]
impl Engine for RedisEngine {
    fn is_ready(&self) -> bool {
        let s = &self.shared;
        s.redis.is_connected()
            && s.registered.load(Ordering::Acquire)
            && s.responsive.load(Ordering::Acquire)
            && s.writable.load(Ordering::Acquire)
            // A node refusing clients (`lost`) is not ready, even when its
            // connections came back and registered before `lost` noticed
            // (it then registers once more, and is ready after that).
            && !s.lost.load(Ordering::Acquire)
    }

    fn refuses_clients(&self) -> bool {
        self.shared.lost.load(Ordering::Acquire)
    }

    async fn connect(&self, id: ClientId, outbox: Arc<Outbox>, m: Membership) -> EngineResult<()> {
        let s = &self.shared;
        let follows = mirror::follows_of(&m);
        s.hub.insert(id, outbox, m);
        if !s.redis.client.is_connected() {
            // Redis is down: serve the client now; the node registers every
            // connection again when it reconnects.
            return Ok(());
        }
        // Registered before the welcome goes out, so a backend that hears
        // of the client_id finds it online on every node. Redis being slow
        // does not refuse clients: the write stays queued in the mirror.
        if let Err(e) = s.mirror.flush([id], follows).await {
            tracing::warn!(error = %e, "connection not registered in redis yet");
        }
        Ok(())
    }

    async fn disconnect(&self, id: ClientId) {
        let s = &self.shared;
        // Its record expires when the removal is written (the script finds
        // the record in the partition).
        s.resumable.remove(id);
        let Some(m) = s.hub.remove(id) else {
            return;
        };
        // In the background: the connection is already out of the hub (so
        // out of every push), and its close frame does not wait for Redis.
        s.mirror.mark([id], mirror::follows_of(&m));
    }

    async fn publish(&self, push: Push) -> EngineResult<()> {
        let s = &self.shared;
        if s.settings.history.keeps_any(&push) {
            return s.publish_kept(&push, None).await;
        }
        let mut e = Envelope::new(Op::Push);
        e.data = Some(push.message.data.clone());
        e.binary = push.message.binary;
        e.exclude = ids_to_strings(&push.exclude);
        e.ts = Some(accept_ts());
        let mut channels = Vec::new();
        match &push.target {
            Target::Client(id) if s.is_local(*id) => {
                let delivered = s.hub.deliver(&push);
                s.metrics.delivered(push.target.kind(), delivered);
                return Ok(());
            }
            Target::Client(id) => {
                s.check()?;
                e.client_ids = vec![id.to_string()];
                let channel = s.keys.node_channel(id.node());
                return s.publish_one(channel, e.encode()).await.map(|_| ());
            }
            Target::Clients(ids) => {
                let mut by_node: std::collections::HashMap<NodeId, Vec<String>> =
                    Default::default();
                let distinct: std::collections::HashSet<&ClientId> = ids.iter().collect();
                for id in distinct.into_iter().filter(|id| !s.is_local(**id)) {
                    by_node.entry(id.node()).or_default().push(id.to_string());
                }
                let mut sends = Vec::new();
                for (node, ids) in by_node {
                    e.client_ids = ids;
                    sends.push((s.keys.node_channel(node), e.encode()));
                }
                let delivered = s.hub.deliver(&push);
                s.metrics.delivered(push.target.kind(), delivered);
                if sends.is_empty() {
                    return Ok(());
                }
                s.check()?;
                return s.publish_many(sends).await;
            }
            Target::Uids(uids) => channels.extend(uids.iter().map(|u| s.keys.uid_channel(u))),
            Target::Groups(groups) if groups.len() > 1 => {
                let delivered = s.hub.deliver(&push);
                s.metrics.delivered(push.target.kind(), delivered);
                s.check()?;
                e.origin = Some(s.node_name.clone());
                // Each group's channel carries the groups up to its own: a
                // node delivers to a member from the first of its groups
                // only, and needs nothing past the channel's group.
                let sends = groups.iter().enumerate().map(|(i, g)| {
                    e.groups = groups[..=i].to_vec();
                    (s.keys.group_channel(g), e.encode())
                });
                return s.publish_many(sends.collect()).await;
            }
            Target::Groups(groups) => {
                channels.extend(groups.iter().map(|g| s.keys.group_channel(g)));
            }
            Target::All => channels.push(s.keys.all_channel()),
        }
        // This node delivers to its own connections at once and tells the
        // others; it skips its own message when Redis echoes it back. (Were
        // its clients served by the echo instead, a push followed by a local
        // leave_group or close_client could reach them after the change.)
        let delivered = s.hub.deliver(&push);
        s.metrics.delivered(push.target.kind(), delivered);
        // Without Redis the others cannot get it, and the caller learns it.
        s.check()?;
        e.origin = Some(s.node_name.clone());
        let bytes = e.encode();
        s.publish_many(channels.into_iter().map(|c| (c, bytes.clone())).collect())
            .await
    }

    async fn close_client(&self, id: ClientId, last: Option<Message>) -> EngineResult<()> {
        let s = &self.shared;
        if s.is_local(id) {
            let frame = last.map(|m| crate::push::LastFrame::of(m.binary, &m.data));
            s.hub
                .close_client(id, frame, close_code::NORMAL, "closed by server");
            return Ok(());
        }
        s.check()?;
        let mut e = Envelope::new(Op::Close);
        e.client_id = Some(id.to_string());
        if let Some(last) = last {
            e.binary = last.binary;
            e.data = Some(last.data);
        }
        s.publish_one(s.keys.node_channel(id.node()), e.encode())
            .await
            .map(|_| ())
    }

    async fn bind_uid(&self, id: ClientId, uid: String) -> EngineResult<()> {
        let change = membership::Change::BindUid(uid);
        self.shared.command(id, change).await
    }

    async fn unbind_uid(&self, id: ClientId, uid: String) -> EngineResult<()> {
        let change = membership::Change::UnbindUid(uid);
        self.shared.command(id, change).await
    }

    async fn join_group(&self, id: ClientId, group: String) -> EngineResult<()> {
        let change = membership::Change::JoinGroup(group);
        self.shared.command(id, change).await
    }

    async fn leave_group(&self, id: ClientId, group: String) -> EngineResult<()> {
        let change = membership::Change::LeaveGroup(group);
        self.shared.command(id, change).await
    }

    async fn ungroup(&self, group: String) -> EngineResult<()> {
        self.shared.ungroup(group).await
    }

    async fn ungroup_local(&self, group: String) -> EngineResult<()> {
        self.shared.ungroup_local(&group).await
    }

    async fn set_session(&self, id: ClientId, session: Session, merge: bool) -> EngineResult<()> {
        let change = membership::Change::Session { session, merge };
        self.shared.command(id, change).await
    }

    async fn is_online(&self, id: ClientId) -> EngineResult<bool> {
        self.shared.is_online(id).await
    }

    async fn uid_of(&self, id: ClientId) -> EngineResult<Option<String>> {
        self.shared.uid_of(id).await
    }

    async fn session_of(&self, id: ClientId) -> EngineResult<Option<Session>> {
        self.shared.session_of(id).await
    }

    async fn client_ids_by_uid(&self, uid: String) -> EngineResult<Vec<ClientId>> {
        self.shared.client_ids_by_uid(&uid).await
    }

    async fn is_uid_online(&self, uid: String) -> EngineResult<bool> {
        self.shared.is_uid_online(&uid).await
    }

    async fn group_client_ids(&self, group: String) -> EngineResult<Vec<ClientId>> {
        self.shared.group_client_ids(&group).await
    }

    async fn group_client_count(&self, group: String) -> EngineResult<u64> {
        self.shared.group_client_count(&group).await
    }

    async fn group_sessions(&self, group: String) -> EngineResult<Vec<(ClientId, Session)>> {
        self.shared.group_sessions(&group).await
    }

    async fn group_uids(&self, group: String) -> EngineResult<Vec<String>> {
        self.shared.group_uids(&group).await
    }

    async fn client_count(&self) -> EngineResult<u64> {
        self.shared.client_count().await
    }

    async fn client_ids(&self) -> EngineResult<Vec<ClientId>> {
        self.shared.client_ids().await
    }

    async fn sessions(&self) -> EngineResult<Vec<(ClientId, Session)>> {
        self.shared.sessions().await
    }

    async fn uids(&self) -> EngineResult<Vec<String>> {
        self.shared.uids().await
    }

    async fn uid_count(&self) -> EngineResult<u64> {
        self.shared.uid_count().await
    }

    async fn groups(&self) -> EngineResult<Vec<String>> {
        self.shared.groups().await
    }

    async fn node_addresses(&self) -> EngineResult<Vec<std::net::SocketAddrV4>> {
        self.shared.node_addresses().await
    }

    fn track_resume(&self, id: ClientId, key: crate::recovery::resume::ResumeKey) {
        self.shared.resumable.insert(id, key);
    }

    async fn take_resume(
        &self,
        token: &crate::recovery::resume::Token,
        check: crate::recovery::resume::UidCheck<'_>,
    ) -> EngineResult<crate::recovery::resume::Taken> {
        self.shared.take_resume(token, check).await
    }

    async fn history_since(
        &self,
        stream: &str,
        offset: u64,
    ) -> EngineResult<crate::recovery::history::HistoryRead> {
        self.shared.history_since(stream, offset).await
    }

    async fn publish_once(&self, push: Push, dedup: String) -> EngineResult<()> {
        self.shared.publish_kept(&push, Some(&dedup)).await
    }

    async fn publish_load(
        &self,
        load: &crate::autoscale::rebalance::decide::NodeLoad,
        valid_for: Duration,
    ) -> EngineResult<()> {
        load::publish(&self.shared, load, valid_for)
            .await
            .map_err(unavailable)
    }

    async fn cluster_load(
        &self,
    ) -> EngineResult<Vec<crate::autoscale::rebalance::decide::NodeLoad>> {
        load::read(&self.shared).await.map_err(unavailable)
    }

    async fn publish_stats(
        &self,
        record: &crate::stats::NodeStats,
        _valid_for: Duration,
    ) -> EngineResult<()> {
        self.shared.check()?;
        stats::publish(&self.shared, record)
            .await
            .map_err(unavailable)
    }

    async fn publish_stats_take_request(
        &self,
        record: &crate::stats::NodeStats,
        _valid_for: Duration,
    ) -> EngineResult<Option<Option<u32>>> {
        self.shared.check()?;
        stats::publish_take(&self.shared, record)
            .await
            .map_err(unavailable)
    }

    async fn request_evacuation(&self, node: NodeId, rate: Option<u32>) -> EngineResult<()> {
        self.shared.check()?;
        stats::request_evacuation(&self.shared, node, rate)
            .await
            .map_err(unavailable)
    }

    async fn cluster_stats(&self) -> EngineResult<Vec<crate::stats::NodeStats>> {
        self.shared.check()?;
        stats::read(&self.shared).await.map_err(unavailable)
    }

    async fn groups_of(&self, id: ClientId) -> EngineResult<Vec<String>> {
        self.shared.groups_of(id).await
    }

    async fn tail(&self, target: crate::tail::TailTarget) -> EngineResult<crate::tail::Tail> {
        tail::start(&self.shared, target).await
    }

    async fn forget_load(&self) {
        load::forget(&self.shared).await;
    }

    async fn shutdown(&self) {
        let s = &self.shared;
        s.registered.store(false, Ordering::Release);
        // The load task deleted it already (src/autoscale/rebalance);
        // again, in case it could not.
        load::forget(s).await;
        stats::forget(s).await;
        // The mirror finishes the batch it is writing, then deletes the
        // partition as its last write: nothing lands after the delete.
        match tokio::time::timeout(Duration::from_secs(3), s.mirror.leave()).await {
            Ok(Ok(())) => tracing::info!("left the cluster: entries removed from redis"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not remove this node's entries from redis")
            }
            Err(_) => tracing::warn!("redis did not answer while leaving the cluster"),
        }
        // Stopped first: the dispatcher ends when the inbox closes.
        s.stop.cancel();
        s.redis.subscriber.quit().await;
        s.inbox.close();
        let _ = s.redis.client.quit().await;
        let _ = tokio::time::timeout(client::COMMAND_TIMEOUT, s.redis.probe.quit()).await;
    }
}
