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
