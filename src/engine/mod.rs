//! The engine: where membership lives and how a push reaches the node that
//! holds each recipient.
//!
//! Two engines implement [`Engine`] and pass the same behaviour tests: the
//! in-process [`memory::MemoryEngine`] (one node) and the Redis engine (a
//! cluster of stateless replicas). Both keep this node's own connections in
//! the [`Hub`](crate::hub::Hub), which is the source of truth for them.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;

use crate::autoscale::rebalance::decide::NodeLoad;
use crate::hub::Membership;
use crate::ids::ClientId;
use crate::outbox::Outbox;
use crate::push::{Message, Push};
use crate::recovery::history::HistoryRead;
use crate::recovery::resume::{ResumeKey, Taken, Token, UidCheck};
use crate::session::Session;

/// Why an engine could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backing store (Redis) is not reachable or did not answer in time.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// A session change was refused for its size or depth.
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
}

/// Result of engine operations.
pub type EngineResult<T> = Result<T, EngineError>;

/// Membership, sessions, queries and delivery across the whole gateway.
///
/// Operations on a client_id that is not online succeed as no-ops and
/// queries answer empty, as GatewayWorker does.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Whether the engine can serve requests (Redis connected and
    /// subscribed).
    fn is_ready(&self) -> bool;

    /// Whether new WebSocket clients are refused: the Redis engine past
    /// `--redis-lost-grace` without Redis (it is closing its clients so
    /// they move to nodes that can serve them).
    fn refuses_clients(&self) -> bool {
        false
    }

    /// Registers a connection of this node with its initial membership.
    async fn connect(
        &self,
        id: ClientId,
        outbox: Arc<Outbox>,
        membership: Membership,
    ) -> EngineResult<()>;

    /// Forgets a connection of this node: it leaves its uid and groups and
    /// its session is deleted. Calling it twice is harmless.
    async fn disconnect(&self, id: ClientId);

    /// Delivers a push to every targeted connection, wherever it is held.
    async fn publish(&self, push: Push) -> EngineResult<()>;

    /// Closes a connection (code 1000), after sending `last` if given.
    async fn close_client(&self, id: ClientId, last: Option<Message>) -> EngineResult<()>;

    /// Binds `uid` to `id`, replacing the uid it had.
    async fn bind_uid(&self, id: ClientId, uid: String) -> EngineResult<()>;
    /// Unbinds `uid` from `id` if it is the uid `id` has.
    async fn unbind_uid(&self, id: ClientId, uid: String) -> EngineResult<()>;
    /// Adds `id` to `group`.
    async fn join_group(&self, id: ClientId, group: String) -> EngineResult<()>;
    /// Removes `id` from `group`.
    async fn leave_group(&self, id: ClientId, group: String) -> EngineResult<()>;
    /// Removes every member from `group`.
    async fn ungroup(&self, group: String) -> EngineResult<()>;
    /// Removes this node's members from `group` (GatewayWorker's UNGROUP,
    /// which a GatewayClient sends to every node itself).
    async fn ungroup_local(&self, group: String) -> EngineResult<()>;
    /// Replaces the session of `id` (or merges into it with `merge`).
    async fn set_session(&self, id: ClientId, session: Session, merge: bool) -> EngineResult<()>;

    /// Whether `id` is connected to any node.
    async fn is_online(&self, id: ClientId) -> EngineResult<bool>;
    /// The uid bound to `id`.
    async fn uid_of(&self, id: ClientId) -> EngineResult<Option<String>>;
    /// The session of `id`; `None` when it is not online.
    async fn session_of(&self, id: ClientId) -> EngineResult<Option<Session>>;
    /// The connections bound to `uid`.
    async fn client_ids_by_uid(&self, uid: String) -> EngineResult<Vec<ClientId>>;
    /// Whether any connection, on any node, is bound to `uid`.
    async fn is_uid_online(&self, uid: String) -> EngineResult<bool> {
        Ok(!self.client_ids_by_uid(uid).await?.is_empty())
    }
    /// The members of `group`.
    async fn group_client_ids(&self, group: String) -> EngineResult<Vec<ClientId>>;
    /// How many members `group` has.
    async fn group_client_count(&self, group: String) -> EngineResult<u64>;
    /// The members of `group` with their sessions.
    async fn group_sessions(&self, group: String) -> EngineResult<Vec<(ClientId, Session)>>;
    /// The distinct uids bound to members of `group`.
    async fn group_uids(&self, group: String) -> EngineResult<Vec<String>>;
    /// How many connections the gateway holds.
    async fn client_count(&self) -> EngineResult<u64>;
    /// Every connection.
    async fn client_ids(&self) -> EngineResult<Vec<ClientId>>;
    /// Every connection with its session.
    async fn sessions(&self) -> EngineResult<Vec<(ClientId, Session)>>;
    /// Every uid bound to a connection.
    async fn uids(&self) -> EngineResult<Vec<String>>;
    /// How many distinct uids are bound.
    async fn uid_count(&self) -> EngineResult<u64>;
    /// Every group with at least one member.
    async fn groups(&self) -> EngineResult<Vec<String>>;

    /// The inner addresses (advertised IPv4 and inner port) of every live
    /// node of the gateway, this one included: what GatewayWorker's
    /// Register lists.
    async fn node_addresses(&self) -> EngineResult<Vec<std::net::SocketAddrV4>>;

    // Resume records (docs/recovery.md section 2.1), only for connections
    // that opted in to recovery. Every membership change rewrites the
    // record with the connection's partition (no round trip of its own);
    // it has no expiry while the connection lives and expires
    // `--resume-window` after it closed, was drained, or its node was
    // purged as dead.

    /// Makes `id` resumable with `key`. Called before [`Engine::connect`],
    /// so the record is written with the connection's first membership.
    fn track_resume(&self, id: ClientId, key: ResumeKey);

    /// Consumes the record `token` names, once and atomically: a second
    /// use, a wrong secret, an expired record or (with client auth) a uid
    /// other than `check` is refused, and nothing is consumed by a refusal.
    async fn take_resume(&self, token: &Token, check: UidCheck<'_>) -> EngineResult<Taken>;
    // --- History (issue 27, docs/recovery.md section 2.2) ---
    // Pushes are appended by `publish` (as `Push::history` and
    // `--history-streams` say), atomically with their delivery.

    /// What `stream` (`u:<uid>`, `g:<group>`, `all`) keeps after `offset`:
    /// its epoch, top offset and entries (those past `--history-ttl` left
    /// out).
    async fn history_since(&self, stream: &str, offset: u64) -> EngineResult<HistoryRead>;

    /// A push every node receives at once (GatewayWorker's inner port: the
    /// GatewayClient sends it to each node itself) to streams that keep
    /// history: kept and published once, by the first node that brings it
    /// under `dedup` (the same id on every node), and delivered to every
    /// node's clients from there.
    async fn publish_once(&self, push: Push, dedup: String) -> EngineResult<()>;

    // Load, for rebalancing (issue 29). A single node has nobody to
    // balance with: the defaults do nothing.
    /// Publishes this node's load for the others' rebalancing decisions,
    /// valid for `valid_for` (then it no longer counts): O(1) in storage
    /// per call.
    async fn publish_load(
        &self,
        _load: &NodeLoad,
        _valid_for: std::time::Duration,
    ) -> EngineResult<()> {
        Ok(())
    }
    /// The load every live node published lately, this one included.
    async fn cluster_load(&self) -> EngineResult<Vec<NodeLoad>> {
        Ok(Vec::new())
    }
    /// Deletes this node's load (it stops publishing it: it drains).
    async fn forget_load(&self) {}

    // --- Dashboard (issue 30, docs/dashboard.md) ---

    /// Writes this node's stats record, valid for `valid_for`: one small
    /// write, replacing the previous record.
    async fn publish_stats(
        &self,
        stats: &crate::stats::NodeStats,
        valid_for: std::time::Duration,
    ) -> EngineResult<()>;
    /// The fresh stats records of every node in the node registry, this
    /// one included.
    async fn cluster_stats(&self) -> EngineResult<Vec<crate::stats::NodeStats>>;
    /// The groups `id` is in (empty when it is not online).
    async fn groups_of(&self, id: ClientId) -> EngineResult<Vec<String>>;
    /// Starts a live tail of the pushes to `target` from any node;
    /// returns once it is in place (a push sent next is seen). Bounded and
    /// sampled (`crate::tail`); it stops when the [`Tail`] is dropped.
    ///
    /// [`Tail`]: crate::tail::Tail
    async fn tail(&self, target: crate::tail::TailTarget) -> EngineResult<crate::tail::Tail>;
    /// Asks `node` to evacuate itself (`POST /api/evacuate` on that node)
    /// at `rate` clients a second (its `--evacuate-rate` when `None`): the
    /// node takes the request with its next stats record. A single node
    /// has nobody else to ask.
    async fn request_evacuation(
        &self,
        _node: crate::ids::NodeId,
        _rate: Option<u32>,
    ) -> EngineResult<()> {
        Ok(())
    }
    /// Writes this node's stats record ([`Engine::publish_stats`]) and
    /// takes the evacuation request left for this node, if any (its rate,
    /// `Some(None)` for the default). One round trip.
    async fn publish_stats_take_request(
        &self,
        stats: &crate::stats::NodeStats,
        valid_for: std::time::Duration,
    ) -> EngineResult<Option<Option<u32>>> {
        self.publish_stats(stats, valid_for).await.map(|()| None)
    }

    /// Leaves the cluster: removes this node's entries from storage at once.
    /// Called once at shutdown, right after every connection was asked to
    /// close; later disconnects only update the hub.
    async fn shutdown(&self);
}
