//! Each node's load in one hash, `<prefix>:load`, a field per node id
//! holding `{"c":<connections>,"r":<ready>,"u":<valid until, unix ms>}`.
//! Publishing is one HSET (O(1)); reading is one HGETALL; entries past
//! their validity (a node that died, or stopped publishing) are skipped
//! and deleted by whoever reads them.

use fred::prelude::*;

use super::Shared;
use crate::autoscale::rebalance::decide::NodeLoad;

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    #[serde(flatten)]
    load: NodeLoad,
    /// Unix ms after which the record no longer counts.
    #[serde(rename = "u")]
    until: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes this node's load, valid for `valid_for`.
pub async fn publish(
    s: &Shared,
    load: &NodeLoad,
    valid_for: std::time::Duration,
) -> Result<(), fred::error::Error> {
    let record = Record {
        load: NodeLoad {
            node: s.node_name.clone(),
            ..load.clone()
        },
        until: unix_ms() + valid_for.as_millis() as u64,
    };
    let value = serde_json::to_string(&record).unwrap_or_default();
    s.redis
        .client
        .hset::<i64, _, _>(s.keys.load(), (s.node_name.clone(), value))
        .await?;
    Ok(())
}

/// Every node's valid load; stale and unreadable fields are deleted.
pub async fn read(s: &Shared) -> Result<Vec<NodeLoad>, fred::error::Error> {
    let fields: std::collections::HashMap<String, String> =
        s.redis.client.hgetall(s.keys.load()).await?;
    let now = unix_ms();
    let mut out = Vec::with_capacity(fields.len());
    let mut stale = Vec::new();
    for (node, value) in fields {
        match serde_json::from_str::<Record>(&value) {
            Ok(record) if record.until >= now && record.load.node == node => out.push(record.load),
            _ => stale.push(node),
        }
    }
    if !stale.is_empty() {
        // Another reader may race to it: deleting twice is harmless.
        let _ = s.redis.client.hdel::<i64, _, _>(s.keys.load(), stale).await;
    }
    Ok(out)
}

/// Removes this node's field (shutdown): it no longer counts at once.
pub async fn forget(s: &Shared) {
    let _ = s
        .redis
        .client
        .hdel::<i64, _, _>(s.keys.load(), s.node_name.clone())
        .await;
}
