//! Queries across the gateway: this node's connections are answered from
//! the hub, other nodes' from their partitions, read concurrently.

use std::collections::HashMap;

use fred::prelude::*;
use futures_util::future::try_join_all;
use futures_util::StreamExt;

use super::client::unavailable;
use super::keys::suffix;
use super::mirror::Follow;
use super::Shared;
use crate::engine::{EngineError, EngineResult};
use crate::ids::{ClientId, NodeId};
use crate::session::Session;

/// Most other nodes a query reads (the node set's real size is the
/// replica count).
pub const MAX_NODES: usize = 1_000;

/// Members of one node's uid set a step of `get_all_uid_count` reads
/// (`SSCAN ... COUNT`): a few milliseconds of Redis at most.
const UID_COUNT_STEP: usize = 10_000;

impl Shared {
    /// Before the hub answers about `follow`'s group or uid: waits until
    /// its subscription matches the hub (the batch carrying a change that
    /// needs it is written), so a query never shows a member that a push
    /// sent next would miss (docs/publishing.md polls queries for that).
    async fn settled(&self, follow: Follow) -> EngineResult<()> {
        if !self.mirror.unsettled(&follow) {
            return Ok(());
        }
        self.mirror
            .flush([], [follow])
            .await
            .map_err(EngineError::Unavailable)
    }

    /// [`Shared::settled`] for every group and uid of this node.
    async fn all_settled(&self) -> EngineResult<()> {
        if !self.mirror.any_unsettled() {
            return Ok(());
        }
        self.mirror
            .flush([], [])
            .await
            .map_err(EngineError::Unavailable)
    }

    /// A field of another node's client, read from that node's partition.
    async fn remote_field(&self, id: ClientId, hash: &str) -> EngineResult<Option<String>> {
        self.check()?;
        let key = self.keys.partition_key(id.node(), hash, "");
        let c = &self.redis.client;
        super::client::again(|| c.hget(key.clone(), id.to_string()))
            .await
            .map_err(unavailable)
    }

    /// The other registered nodes.
    async fn other_nodes(&self) -> EngineResult<Vec<NodeId>> {
        self.check()?;
        let names: Vec<String> = self
            .redis
            .client
            .smembers(self.keys.nodes())
            .await
            .map_err(unavailable)?;
        let mut nodes: Vec<NodeId> = names
            .iter()
            .filter_map(|n| n.parse().ok())
            .filter(|n| *n != self.node)
            .collect();
        // A node set grown by whoever can write to Redis must not make every
        // query fan out without bound.
        if nodes.len() > MAX_NODES {
            nodes.sort_unstable();
            nodes.truncate(MAX_NODES);
            tracing::warn!(
                members = names.len(),
                limit = MAX_NODES,
                "the node set is larger than any real cluster: queries read the first nodes only"
            );
        }
        Ok(nodes)
    }

    /// Runs `query` on one key of every other node's partition,
    /// concurrently.
    async fn per_node<T, F, Fut>(&self, suffix: &str, name: &str, query: F) -> EngineResult<Vec<T>>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        let nodes = self.other_nodes().await?;
        let keys = nodes
            .into_iter()
            .map(|n| self.keys.partition_key(n, suffix, name));
        let query = &query;
        try_join_all(keys.map(|k| super::client::again(move || query(k.clone()))))
            .await
            .map_err(unavailable)
    }

    /// The members of a set of every other node's partition, each with one
    /// field of a hash of the same partition, in one round trip per node.
    async fn members_with(
        &self,
        set: String,
        hash: &'static str,
    ) -> EngineResult<Vec<(String, Option<String>)>> {
        let nodes = self.other_nodes().await?;
        let lists = try_join_all(nodes.into_iter().map(|n| {
            self.scripts.members_with.run::<Vec<Option<String>>, _, _>(
                &self.redis.client,
                self.keys.partition(n),
                vec![set.clone(), hash.to_owned()],
            )
        }))
        .await
        .map_err(unavailable)?;
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

    pub(super) async fn is_online(&self, id: ClientId) -> EngineResult<bool> {
        if self.is_local(id) {
            return Ok(self.hub.contains(id));
        }
        Ok(self.remote_field(id, suffix::CLIENTS).await?.is_some())
    }

    pub(super) async fn uid_of(&self, id: ClientId) -> EngineResult<Option<String>> {
        if self.is_local(id) {
            let uid = self.hub.uid_of(id).flatten();
            let Some(bound) = uid else {
                return Ok(None);
            };
            self.settled(Follow::Uid(bound)).await?;
            return Ok(self.hub.uid_of(id).flatten());
        }
        self.remote_field(id, suffix::UID).await
    }

    /// The groups of `id`: from the hub when local, else from the
    /// owner's partition (`:cg`, one HGET).
    pub(super) async fn groups_of(&self, id: ClientId) -> EngineResult<Vec<String>> {
        if self.is_local(id) {
            return Ok(self
                .hub
                .membership(id)
                .map(|m| m.groups)
                .unwrap_or_default());
        }
        let json = self.remote_field(id, suffix::CLIENT_GROUPS).await?;
        Ok(json
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default())
    }

    pub(super) async fn session_of(&self, id: ClientId) -> EngineResult<Option<Session>> {
        if self.is_local(id) {
            return Ok(self.hub.session_of(id));
        }
        let json = self.remote_field(id, suffix::CLIENTS).await?;
        Ok(json.map(|j| parse_session(Some(j))))
    }

    pub(super) async fn client_ids_by_uid(&self, uid: &str) -> EngineResult<Vec<ClientId>> {
        self.settled(Follow::Uid(uid.to_owned())).await?;
        let mut ids = self.hub.client_ids_by_uid(uid);
        let c = &self.redis.client;
        let remote: Vec<Vec<String>> = self
            .per_node(suffix::UID_MEMBERS, uid, |k| c.smembers(k))
            .await?;
        ids.extend(remote.iter().flat_map(|l| parse_ids(l)));
        Ok(ids)
    }

    /// Whether `uid` is bound anywhere: a uid bound here is answered from
    /// the hub without asking Redis (issue 33: every node's member set was
    /// read even then); otherwise the other nodes' sets are counted (SCARD,
    /// not their members).
    pub(super) async fn is_uid_online(&self, uid: &str) -> EngineResult<bool> {
        if self.hub.has_uid(uid) {
            // As every uid query: once its subscription matches the hub, so
            // a push sent next through another node reaches it (free when
            // settled, the common case).
            self.settled(Follow::Uid(uid.to_owned())).await?;
            return Ok(true);
        }
        let c = &self.redis.client;
        let counts: Vec<u64> = self
            .per_node(suffix::UID_MEMBERS, uid, |k| c.scard(k))
            .await?;
        Ok(counts.iter().any(|n| *n > 0))
    }

    pub(super) async fn group_client_ids(&self, group: &str) -> EngineResult<Vec<ClientId>> {
        self.settled(Follow::Group(group.to_owned())).await?;
        let mut ids = self.hub.group_client_ids(group);
        let c = &self.redis.client;
        let remote: Vec<Vec<String>> = self
            .per_node(suffix::GROUP_MEMBERS, group, |k| c.smembers(k))
            .await?;
        ids.extend(remote.iter().flat_map(|l| parse_ids(l)));
        Ok(ids)
    }

    pub(super) async fn group_client_count(&self, group: &str) -> EngineResult<u64> {
        self.settled(Follow::Group(group.to_owned())).await?;
        let c = &self.redis.client;
        let counts: Vec<u64> = self
            .per_node(suffix::GROUP_MEMBERS, group, |k| c.scard(k))
            .await?;
        Ok(self.hub.group_client_count(group) as u64 + counts.iter().sum::<u64>())
    }

    pub(super) async fn group_sessions(
        &self,
        group: &str,
    ) -> EngineResult<Vec<(ClientId, Session)>> {
        self.settled(Follow::Group(group.to_owned())).await?;
        let mut sessions = self.hub.group_sessions(group);
        let set = format!("{}{group}", suffix::GROUP_MEMBERS);
        for (id, json) in self.members_with(set, suffix::CLIENTS).await? {
            if let Ok(id) = id.parse() {
                sessions.push((id, parse_session(json)));
            }
        }
        Ok(sessions)
    }

    pub(super) async fn group_uids(&self, group: &str) -> EngineResult<Vec<String>> {
        self.settled(Follow::Group(group.to_owned())).await?;
        let mut uids = self.hub.group_uids(group);
        let set = format!("{}{group}", suffix::GROUP_MEMBERS);
        let remote = self.members_with(set, suffix::UID).await?;
        uids.extend(remote.into_iter().filter_map(|(_, uid)| uid));
        Ok(distinct(uids))
    }

    pub(super) async fn client_count(&self) -> EngineResult<u64> {
        let c = &self.redis.client;
        let counts: Vec<u64> = self.per_node(suffix::CLIENTS, "", |k| c.hlen(k)).await?;
        Ok(self.hub.client_count() as u64 + counts.iter().sum::<u64>())
    }

    pub(super) async fn client_ids(&self) -> EngineResult<Vec<ClientId>> {
        let mut ids = self.hub.client_ids();
        let c = &self.redis.client;
        let remote: Vec<Vec<String>> = self.per_node(suffix::CLIENTS, "", |k| c.hkeys(k)).await?;
        ids.extend(remote.iter().flat_map(|l| parse_ids(l)));
        Ok(ids)
    }

    pub(super) async fn sessions(&self) -> EngineResult<Vec<(ClientId, Session)>> {
        let mut sessions = self.hub.sessions();
        let c = &self.redis.client;
        let remote: Vec<HashMap<String, String>> =
            self.per_node(suffix::CLIENTS, "", |k| c.hgetall(k)).await?;
        for (id, json) in remote.into_iter().flatten() {
            if let Ok(id) = id.parse() {
                sessions.push((id, parse_session(Some(json))));
            }
        }
        Ok(sessions)
    }

    pub(super) async fn uids(&self) -> EngineResult<Vec<String>> {
        self.all_settled().await?;
        let mut uids = self.hub.uids();
        let c = &self.redis.client;
        let remote: Vec<Vec<String>> = self.per_node(suffix::UIDS, "", |k| c.smembers(k)).await?;
        uids.extend(remote.into_iter().flatten());
        Ok(distinct(uids))
    }

    /// Distinct uids across nodes. A uid bound on several nodes is in each
    /// of their `:uids` sets, so the count needs the union. Alone, the node
    /// counts from the hub. Otherwise it reads every node's set (its own
    /// included, once settled) with `SSCAN` in steps of
    /// [`UID_COUNT_STEP`], concurrently per node, and counts the distinct
    /// uids in a set of their 64-bit hashes (keyed per call, so nobody
    /// can pick uids that collide): no command holds Redis for time
    /// proportional to every uid (a `SUNION` of every set did), on every
    /// topology. Exact when no uid is bound or unbound meanwhile (SSCAN may
    /// then miss one that changed; the set absorbs repeats).
    pub(super) async fn uid_count(&self) -> EngineResult<u64> {
        self.all_settled().await?;
        let nodes = self.other_nodes().await?;
        if nodes.is_empty() {
            return Ok(self.hub.uid_count() as u64);
        }
        let keys = nodes
            .into_iter()
            .chain([self.node])
            .map(|n| self.keys.partition_key(n, suffix::UIDS, ""));
        use std::hash::BuildHasher;
        let hasher = std::hash::RandomState::new();
        let mut seen = std::collections::HashSet::new();
        let mut scans =
            futures_util::stream::iter(keys.map(|k| self.scan_set(k))).buffer_unordered(16);
        while let Some(members) = scans.next().await {
            seen.extend(members?.iter().map(|m| hasher.hash_one(m)));
        }
        Ok(seen.len() as u64)
    }

    /// Every member of `key`, read in bounded steps.
    async fn scan_set(&self, key: String) -> EngineResult<Vec<bytes::Bytes>> {
        use fred::types::{ClusterHash, CustomCommand, Value};
        let sscan = CustomCommand::new_static("SSCAN", ClusterHash::FirstKey, false);
        let mut members = Vec::new();
        let mut cursor = Value::from("0");
        loop {
            let args = vec![
                Value::from(key.as_str()),
                cursor,
                Value::from("COUNT"),
                Value::from(UID_COUNT_STEP as i64),
            ];
            let reply: Vec<Value> = self
                .redis
                .client
                .custom(sscan.clone(), args)
                .await
                .map_err(unavailable)?;
            let mut reply = reply.into_iter();
            let (Some(next), Some(Value::Array(page))) = (reply.next(), reply.next()) else {
                return Err(EngineError::Unavailable(
                    "redis answered SSCAN with something else".into(),
                ));
            };
            members.extend(page.into_iter().filter_map(|m| m.into_bytes()));
            if next.as_str().as_deref() == Some("0") {
                return Ok(members);
            }
            cursor = next;
        }
    }

    /// This node and every other registered node whose liveness key is
    /// alive (a dead node stays in the node set until purged) and, with a
    /// gateway key, signed by a node that has it. From the node's view of
    /// the registry: usually one GET, whatever the number of nodes.
    pub(super) async fn node_addresses(&self) -> EngineResult<Vec<std::net::SocketAddrV4>> {
        self.check()?;
        let registry = super::registry::refresh(self).await.map_err(unavailable)?;
        let live = registry.alive.iter().filter(|(_, verified)| *verified);
        let mut addrs: Vec<_> = live.map(|(n, _)| n.addr()).collect();
        addrs.push(self.node.addr());
        addrs.sort();
        Ok(addrs)
    }

    pub(super) async fn groups(&self) -> EngineResult<Vec<String>> {
        self.all_settled().await?;
        let mut groups = self.hub.groups();
        let c = &self.redis.client;
        let remote: Vec<Vec<String>> = self.per_node(suffix::GROUPS, "", |k| c.smembers(k)).await?;
        groups.extend(remote.into_iter().flatten());
        Ok(distinct(groups))
    }
}

fn parse_ids(ids: &[String]) -> Vec<ClientId> {
    ids.iter().filter_map(|s| s.parse().ok()).collect()
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
