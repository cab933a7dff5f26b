//! Liveness: this node's heartbeat, and the purge of nodes that died
//! without leaving.
//!
//! Every half heartbeat a node refreshes its `:alive` key (TTL two
//! heartbeats). Every half heartbeat as well, one node (whichever takes the
//! purge lease first) reads the node set and every liveness record, and a
//! node whose key expired is dead: its partition is deleted by one atomic
//! script (a node of an older version purging too may race; one deletes,
//! the other finds nothing). A dead node is gone from every query within
//! 2.5 heartbeats. Less often (one node per period, by another lease),
//! partitions that belong to no node in the set (left by a crash at the
//! wrong moment) are swept the same way. One node doing the round keeps
//! the cluster's Redis work for liveness linear in the nodes; with every
//! node checking every other one it grew with their square.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use futures_util::TryStreamExt;

use super::{registry, Shared};
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
    let added = s
        .redis
        .client
        .sadd::<i64, _, _>(s.keys.nodes(), s.node_name.clone())
        .await?;
    // The others' views change: a new member, or a new record (another
    // instance of this node id). A plain beat of a member changes nothing.
    if registering || added > 0 {
        registry::bump(s).await?;
    }
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

/// The purge task: every half heartbeat, one node of the cluster (the one
/// that takes the purge lease) purges the dead nodes; every node brings its
/// view of the registry up to date.
pub async fn run(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.settings.heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = Throttle::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = s.stop.cancelled() => return,
        }
        if !s.redis.client.is_connected() {
            continue;
        }
        if let Err(e) = round(&s).await {
            if let Some(skipped) = failures.allow() {
                tracing::warn!(error = %e, skipped, "purging dead nodes failed");
            }
        }
    }
}

/// Takes the lease `key` for `ttl` if nobody holds it; returns whether this
/// node got it.
async fn lease(s: &Shared, key: String, ttl: Duration) -> Result<bool, fred::error::Error> {
    let ms = ttl.as_millis().max(1) as i64;
    let taken: Option<String> = s
        .redis
        .client
        .set(
            key,
            s.instance.clone(),
            Some(Expiration::PX(ms)),
            Some(SetOptions::NX),
            false,
        )
        .await?;
    Ok(taken.is_some())
}

/// One purge round. The lease lasts a little less than the round's
/// interval, so every node's next tick finds it free again and the first
/// one takes it: rounds stay at most half a heartbeat apart, however many
/// nodes there are. A node that takes the lease and dies before its round
/// delays the next one by less than half a heartbeat: a dead node is still
/// purged within 3 heartbeats (SPEC section 3).
async fn round(s: &Shared) -> Result<(), fred::error::Error> {
    let every = s.settings.heartbeat / 2;
    if !lease(s, s.keys.purge_lease(), every * 4 / 5).await? {
        registry::refresh(s).await?;
        return Ok(());
    }
    let version = registry::version(s).await?;
    let found = registry::read_whole(s, version).await?;
    let mut purged = false;
    for node in found.dead(s.node) {
        if purge(s, node).await? {
            s.redis
                .client
                .srem::<i64, _, _>(s.keys.nodes(), node.to_string())
                .await?;
            purged = true;
        }
    }
    if purged {
        registry::bump(s).await?;
        s.registry.invalidate();
    }
    // The sweep's lease spans SWEEP_EVERY rounds: one sweep per period in
    // the whole cluster.
    if lease(s, s.keys.sweep_lease(), every * SWEEP_EVERY).await? {
        let members: HashSet<NodeId> = found.members.iter().copied().collect();
        if let Err(e) = sweep_orphans(s, &members).await {
            tracing::debug!(error = %e, "sweep for orphaned partitions failed");
        }
    }
    Ok(())
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
