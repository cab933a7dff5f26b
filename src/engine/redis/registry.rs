//! This node's view of the other live nodes, for the Register's address
//! list and `gatecast_nodes_alive`, kept at a cost per node that does not
//! grow with the cluster.
//!
//! Reading the node set and every node's liveness record costs commands in
//! proportion to the nodes; done by every node every second (as the
//! Register did) that is nodes² per second. Instead every change to the
//! node set bumps a counter, `<prefix>:nodes:v` (INCR, [`bump`]): a node
//! registering, leaving, being purged, or finding itself missing from the
//! set. A node reads the counter (one GET) at most every [`CHECK_EVERY`],
//! and reads the whole registry again only when the counter moved, or every
//! [`FULL_READ_EVERY`] whatever it says (nodes of a version that does not
//! bump it, a lost INCR). A full read is two commands on one Redis (the set,
//! then every liveness record in one MGET); on Redis Cluster, whose keys
//! of different partitions are in different slots, one GET per node.

use std::time::{Duration, Instant};

use fred::prelude::*;
use futures_util::future::try_join_all;
use parking_lot::Mutex;

use super::keys::suffix;
use super::Shared;
use crate::ids::NodeId;

/// Shortest time between two reads of the counter.
const CHECK_EVERY: Duration = Duration::from_millis(900);

/// Longest time between two full reads.
pub const FULL_READ_EVERY: Duration = Duration::from_secs(30);

use super::queries::MAX_NODES;

/// What one full read found.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    /// Every member of the node set (this node included).
    pub members: Vec<NodeId>,
    /// The other members whose liveness key exists, each with whether its
    /// record verifies with `--gateway-secret-key`.
    pub alive: Vec<(NodeId, bool)>,
}

impl Registry {
    /// Every member but this node, which is not alive.
    pub fn dead(&self, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .copied()
            .filter(move |n| *n != me && !self.alive.iter().any(|(a, _)| a == n))
    }
}

/// The view and when it was last checked.
#[derive(Default)]
pub struct View {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The counter at the last full read (`None`: never set in Redis).
    version: Option<String>,
    /// When the counter was last read.
    checked: Option<Instant>,
    /// When the registry was last read whole.
    read: Option<Instant>,
    registry: Registry,
}

impl View {
    /// Takes `registry`, read whole at `version`.
    fn store(&self, version: Option<String>, registry: Registry) {
        let mut state = self.state.lock();
        let now = Instant::now();
        state.version = version;
        state.checked = Some(now);
        state.read = Some(now);
        state.registry = registry;
    }

    /// Forgets the last full read: the next refresh reads whole.
    pub fn invalidate(&self) {
        self.state.lock().read = None;
    }
}

/// Tells every node that the node set changed.
pub async fn bump(s: &Shared) -> Result<(), fred::error::Error> {
    s.redis
        .client
        .incr::<i64, _>(s.keys.nodes_version())
        .await
        .map(|_| ())
}

/// The view, brought up to date if the counter moved or it is old; updates
/// `gatecast_nodes_alive`.
pub async fn refresh(s: &Shared) -> Result<Registry, fred::error::Error> {
    let (last, fresh) = {
        let state = s.registry.state.lock();
        let now = Instant::now();
        let checked = state.checked.is_some_and(|t| now - t < CHECK_EVERY);
        let recent = state.read.is_some_and(|t| now - t < FULL_READ_EVERY);
        if checked && recent {
            return Ok(state.registry.clone());
        }
        (state.version.clone(), recent)
    };
    let version: Option<String> = s.redis.client.get(s.keys.nodes_version()).await?;
    if fresh && version == last {
        let mut state = s.registry.state.lock();
        state.checked = Some(Instant::now());
        return Ok(state.registry.clone());
    }
    read_whole(s, version).await
}

/// Reads the node set and every liveness record (the counter first, so a
/// change during the read moves it past `version` and is read again).
pub async fn read_whole(
    s: &Shared,
    version: Option<String>,
) -> Result<Registry, fred::error::Error> {
    let names: Vec<String> = s.redis.client.smembers(s.keys.nodes()).await?;
    let mut members: Vec<NodeId> = names.iter().filter_map(|n| n.parse().ok()).collect();
    if members.len() > MAX_NODES {
        members.sort_unstable();
        members.truncate(MAX_NODES);
        tracing::warn!(
            members = names.len(),
            limit = MAX_NODES,
            "the node set is larger than any real cluster: only the first nodes are read"
        );
    }
    let others: Vec<NodeId> = members.iter().copied().filter(|n| *n != s.node).collect();
    let keys: Vec<String> = others
        .iter()
        .map(|n| s.keys.partition_key(*n, suffix::ALIVE, ""))
        .collect();
    let c = &s.redis.client;
    let records: Vec<Option<String>> = if keys.is_empty() {
        Vec::new()
    } else if s.redis.sharded {
        try_join_all(keys.into_iter().map(|k| c.get::<Option<String>, _>(k))).await?
    } else {
        c.mget(keys).await?
    };
    let key = &s.settings.liveness_key;
    let alive = others
        .into_iter()
        .zip(records)
        .filter_map(|(n, record)| {
            let record = record?;
            Some((n, super::liveness::verified(&record, key, n)))
        })
        .collect();
    let registry = Registry { members, alive };
    s.metrics.nodes_alive.set(registry.alive.len() as i64 + 1);
    s.registry.store(version, registry.clone());
    Ok(registry)
}

/// The counter as it is now, for a full read that follows.
pub async fn version(s: &Shared) -> Result<Option<String>, fred::error::Error> {
    s.redis.client.get(s.keys.nodes_version()).await
}
