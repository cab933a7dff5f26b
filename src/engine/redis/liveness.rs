//! Liveness: this node's heartbeat, and the purge of nodes that died
//! without leaving.
//!
//! Every half heartbeat a node refreshes its `:alive` key (TTL two
//! heartbeats) and checks every other node in the node set: a node whose
//! key expired is dead, and its partition is deleted by one atomic script
//! (several survivors may race; one deletes, the others find nothing). A
//! dead node is gone from every query within 2.5 heartbeats. Less often,
//! partitions that belong to no node in the set (left by a crash at the
//! wrong moment) are swept the same way.

use std::collections::HashSet;
use std::sync::Arc;

use fred::prelude::*;
use futures_util::TryStreamExt;

use super::Shared;
use crate::gatewayworker::secret::GatewayKey;
use crate::ids::NodeId;

/// Purge rounds between two sweeps for orphaned partitions (a SCAN).
const SWEEP_EVERY: u32 = 20;

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The key was there: nothing was lost.
    Kept,
    /// The key was gone (Redis restarted or this node was purged): the
    /// partition must be written again.
    Fresh,
    /// Another live process holds this node id.
    Conflict,
}

/// Signs the liveness record `info` of `node` (which holds its `instance`
/// and `inner` address) with `key`, as `sig`: HMAC-SHA256 over the node id,
/// the instance and the inner address. Only a holder of
/// `--gateway-secret-key` can write a record the Register lists, so a
/// client of Redis cannot add a fake gateway that PHP would then send its
/// secret key and its calls to. Nothing without a key.
pub(super) fn sign(info: &mut serde_json::Value, key: &GatewayKey, node: NodeId) {
    let Some(fields) = info.as_object_mut() else {
        return;
    };
    let instance = fields
        .get("instance")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let inner = node.addr().to_string();
    let name = node.to_string();
    if let Some(sig) = key.sign(&[name.as_bytes(), instance.as_bytes(), inner.as_bytes()]) {
        fields.insert("sig".into(), sig.into());
    }
}

/// Whether `record` (a liveness key's value) is `node`'s, signed with
/// `key`; always true without a key (nothing to check against).
pub(super) fn verified(record: &str, key: &GatewayKey, node: NodeId) -> bool {
    if key.is_empty() {
        return true;
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(record) else {
        return false;
    };
    let text = |k: &str| fields.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let inner = node.addr().to_string();
    let name = node.to_string();
    text("inner") == inner
        && key.verify(
            &[
                name.as_bytes(),
                text("instance").as_bytes(),
                inner.as_bytes(),
            ],
            text("sig"),
        )
}

/// Refreshes this node's liveness key and its entry in the node set.
///
/// A gone key is created again only when `registering` (the mirror's
/// resync, which then writes the whole partition): a plain heartbeat
/// leaves it gone and answers [`Beat::Fresh`], and so does every one after
/// it until the node registered. So the node cannot miss that it was
/// purged, even when the answer of the heartbeat that first found the key
/// gone was lost (a link that dropped packets for a while delivers the
/// commands queued on it late, after their callers gave up).
pub async fn beat(s: &Shared, registering: bool) -> Result<Beat, fred::error::Error> {
    let ttl = (s.settings.heartbeat * 2).as_millis().to_string();
    let started = std::time::Instant::now();
    let mode = if registering { "1" } else { "0" };
    let found: i64 = s
        .scripts
        .heartbeat
        .run(
            &s.redis.client,
            s.keys.partition(s.node),
            vec![
                s.settings.info.to_string(),
                ttl,
                s.instance.clone(),
                mode.into(),
            ],
        )
        .await?;
    s.metrics.redis_rtt.observe(started.elapsed().as_secs_f64());
    if found < 0 {
        return Ok(Beat::Conflict);
    }
    if found == 0 && !registering {
        // Not back in the node set before the partition is.
        return Ok(Beat::Fresh);
    }
    s.redis
        .client
        .sadd::<i64, _, _>(s.keys.nodes(), s.node_name.clone())
        .await?;
    Ok(if found == 1 { Beat::Kept } else { Beat::Fresh })
}

/// Whether a heartbeat is due, `last` being the previous one. A little
/// early rather than late: a tick every half heartbeat finds slightly less
/// than half a heartbeat elapsed since the beat the previous tick sent, and
/// a strict comparison skipped every other tick.
pub fn due(s: &Shared, last: std::time::Instant) -> bool {
    let every = s.settings.heartbeat / 2;
    last.elapsed() + every / 5 >= every
}

/// A failure that recurs (every heartbeat while Redis refuses) logged at
/// warn at most once per [`Throttle::EVERY`], with how many were not.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<std::time::Instant>,
    skipped: u64,
}

impl Throttle {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Whether to log this one; if so, how many were skipped since the
    /// last one logged.
    pub fn allow(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.skipped += 1;
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.skipped))
    }
}

/// The purge task.
pub async fn run(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.settings.heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round = 0u32;
    let mut failures = Throttle::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = s.stop.cancelled() => return,
        }
        if !s.redis.client.is_connected() {
            continue;
        }
        match purge_dead(&s).await {
            Ok(nodes) => {
                round += 1;
                if round % SWEEP_EVERY == 0 {
                    if let Err(e) = sweep_orphans(&s, &nodes).await {
                        tracing::debug!(error = %e, "sweep for orphaned partitions failed");
                    }
                }
            }
            Err(e) => {
                if let Some(skipped) = failures.allow() {
                    tracing::warn!(error = %e, skipped, "purging dead nodes failed");
                }
            }
        }
    }
}

/// Purges the nodes of the node set whose liveness expired; returns the
/// node set as it was.
async fn purge_dead(s: &Shared) -> Result<HashSet<NodeId>, fred::error::Error> {
    let names: Vec<String> = s.redis.client.smembers(s.keys.nodes()).await?;
    let mut nodes = HashSet::new();
    let mut alive = 1;
    for name in names {
        let Ok(node) = name.parse::<NodeId>() else {
            continue;
        };
        nodes.insert(node);
        if node == s.node {
            continue;
        }
        if purge(s, node).await? {
            s.redis
                .client
                .srem::<i64, _, _>(s.keys.nodes(), name)
                .await?;
        } else {
            alive += 1;
        }
    }
    s.metrics.nodes_alive.set(alive);
    Ok(nodes)
}

/// Deletes `node`'s partition if its liveness key expired. Returns whether
/// the node is dead.
async fn purge(s: &Shared, node: NodeId) -> Result<bool, fred::error::Error> {
    let mut args = vec!["dead".to_owned(), String::new(), s.resume_window_ms()];
    args.extend(s.presence_args());
    // The dead node's close events come from here (the first purger).
    args.push(
        if s.settings.notices.is_some() {
            "1"
        } else {
            "0"
        }
        .to_owned(),
    );
    let answer: Value = s
        .scripts
        .clear
        .run(&s.redis.client, s.keys.partition(node), args)
        .await?;
    let (removed, notices) = super::presence::cleared(answer);
    s.notify_wait(notices).await;
    if removed > 0 {
        tracing::info!(node = %node, addr = %node.addr(), connections = removed, "purged a dead node");
    }
    Ok(removed >= 0)
}

/// Finds partitions of nodes missing from the node set and purges those
/// whose liveness expired. A partition is found by its `:clients` hash, or
/// by its `:rs` hash alone: a node purged by a node of a version without
/// resume records keeps its records (without expiry) and `:rs`, which the
/// purge here then expires.
async fn sweep_orphans(s: &Shared, nodes: &HashSet<NodeId>) -> Result<(), fred::error::Error> {
    // `:clients` or `:rs` in one SCAN: `[cr][ls]*` matches those two
    // suffixes and no other (`:cg`, `:r:<id>`, `:uid`... do not match).
    let pattern = format!("{}:{{*}}:[cr][ls]*", s.keys.prefix());
    let mut keys = if s.redis.sharded {
        Box::pin(
            s.redis
                .client
                .scan_cluster_buffered(pattern, Some(1000), None),
        ) as std::pin::Pin<Box<dyn futures_util::Stream<Item = _> + Send>>
    } else {
        Box::pin(s.redis.client.scan_buffered(pattern, Some(1000), None))
    };
    let mut found = HashSet::new();
    while let Some(key) = keys.try_next().await? {
        let node = key.as_str().and_then(|k| s.keys.partition_node(k));
        if let Some(node) = node.filter(|n| *n != s.node && !nodes.contains(n)) {
            found.insert(node);
        }
    }
    for node in found {
        purge(s, node).await?;
    }
    Ok(())
}
