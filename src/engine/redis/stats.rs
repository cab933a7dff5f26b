//! Each node's dashboard stats record in one hash, `<prefix>:stats`, a
//! field per node id holding the record as JSON (`crate::stats`).
//! Writing is one HSET; reading is one HGETALL and the node set (SMEMBERS),
//! sent together. A record that is stale, unreadable or of a node no
//! longer in the node set is skipped, and deleted by whoever reads it; a
//! node deletes its own when it leaves.

use std::collections::{HashMap, HashSet};

use fred::prelude::*;

use super::Shared;
use crate::stats::{is_fresh, unix_ms, NodeStats};

/// Writes this node's record (its `until_ms` says how long it counts).
pub async fn publish(s: &Shared, stats: &NodeStats) -> Result<(), fred::error::Error> {
    let record = NodeStats {
        node: s.node_name.clone(),
        ..stats.clone()
    };
    let value = serde_json::to_string(&record).unwrap_or_default();
    s.redis
        .client
        .hset::<i64, _, _>(s.keys.stats(), (s.node_name.clone(), value))
        .await?;
    Ok(())
}

/// Writes this node's record and reads the evacuation request left for
/// it, in one round trip; a request found is deleted (taken once: two
/// takers would only start the same evacuation twice, which is harmless).
pub async fn publish_take(
    s: &Shared,
    stats: &NodeStats,
) -> Result<Option<Option<u32>>, fred::error::Error> {
    let record = NodeStats {
        node: s.node_name.clone(),
        ..stats.clone()
    };
    let value = serde_json::to_string(&record).unwrap_or_default();
    let pipeline = s.redis.client.pipeline();
    let _: () = pipeline
        .hset(s.keys.stats(), (s.node_name.clone(), value))
        .await?;
    let _: () = pipeline
        .hget(s.keys.evacuate_requests(), s.node_name.clone())
        .await?;
    let (_, request): (i64, Option<String>) = pipeline.all().await?;
    let Some(request) = request else {
        return Ok(None);
    };
    s.redis
        .client
        .hdel::<i64, _, _>(s.keys.evacuate_requests(), s.node_name.clone())
        .await?;
    Ok(Some(request.trim().parse().ok()))
}

/// Leaves an evacuation request for `node` (the dashboard on another
/// node): taken by `node` with its next record, or gone after a minute.
pub async fn request_evacuation(
    s: &Shared,
    node: crate::ids::NodeId,
    rate: Option<u32>,
) -> Result<(), fred::error::Error> {
    let value = rate.map(|r| r.to_string()).unwrap_or_default();
    let key = s.keys.evacuate_requests();
    s.redis
        .client
        .hset::<i64, _, _>(key.clone(), (node.to_string(), value))
        .await?;
    // A request for a node that never takes it (it died) must not wait
    // for its next life.
    s.redis.client.expire::<i64, _>(key, 60, None).await?;
    Ok(())
}

/// The fresh records of registered nodes, sorted by node id.
pub async fn read(s: &Shared) -> Result<Vec<NodeStats>, fred::error::Error> {
    let c = &s.redis.client;
    let (fields, nodes): (HashMap<String, String>, Vec<String>) = tokio::try_join!(
        c.hgetall::<HashMap<String, String>, _>(s.keys.stats()),
        c.smembers::<Vec<String>, _>(s.keys.nodes()),
    )?;
    let registered: HashSet<String> = nodes.into_iter().collect();
    let now = unix_ms();
    let mut out = Vec::with_capacity(fields.len());
    let mut stale = Vec::new();
    for (node, value) in fields {
        match serde_json::from_str::<NodeStats>(&value) {
            Ok(record)
                if record.node == node && is_fresh(&record, now) && registered.contains(&node) =>
            {
                out.push(record)
            }
            // A node may write its first record before it registers: not
            // shown yet, but not deleted either.
            Ok(record) if record.node == node && is_fresh(&record, now) => {}
            _ => stale.push(node),
        }
    }
    if !stale.is_empty() {
        // Another reader may race to it: deleting twice is harmless.
        let _ = c.hdel::<i64, _, _>(s.keys.stats(), stale).await;
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

/// Removes this node's record (shutdown): it is gone from the dashboard
/// at once.
pub async fn forget(s: &Shared) {
    let _ = s
        .redis
        .client
        .hdel::<i64, _, _>(s.keys.stats(), s.node_name.clone())
        .await;
}
