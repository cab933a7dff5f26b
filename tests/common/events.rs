//! The events stream (`gatecast:events`) that nodes write with `--events`,
//! read back by the suites: a Redis client of the test's own, the entries
//! of some types, a field of an entry, and a wait until each node's events
//! reach the stream.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use fred::types::Value as RedisValue;

use super::{within, Client, Node};

/// One stream entry: its id and its fields.
pub type Entry = (String, HashMap<String, RedisValue>);

/// Field `name` of `entry` as a string ("" when it has none).
pub fn field(entry: &Entry, name: &str) -> String {
    entry
        .1
        .get(name)
        .and_then(|v| v.as_string())
        .unwrap_or_default()
}

/// A client of the Redis (or Redis Cluster) at `url`.
pub async fn redis_client_url(url: &str) -> fred::clients::Client {
    let redis = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    redis
}

/// The stream's entries of the given types, in stream order.
pub async fn events(redis: &fred::clients::Client, kinds: &[&str]) -> Vec<Entry> {
    let entries: Vec<Entry> = redis
        .xrange("gatecast:events", "-", "+", None)
        .await
        .unwrap();
    entries
        .into_iter()
        .filter(|e| kinds.contains(&field(e, "type").as_str()))
        .collect()
}

/// Waits until each node's events reach the stream (a node is ready before
/// its events connection is up; its writer waits for it, bounded). The
/// nodes are probed at once, each on its own.
pub async fn events_flowing(nodes: &[Node], redis: &fred::clients::Client) {
    super::ready(nodes).await;
    let flowing = nodes.iter().map(|node| {
        within("events flowing", Duration::from_secs(20), || async {
            let probe = Client::connect(&node.ws_url("")).await;
            let id = probe.id.clone();
            probe.close().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            events(redis, &["connect"])
                .await
                .iter()
                .any(|e| field(e, "client_id") == id)
        })
    });
    futures_util::future::join_all(flowing).await;
}
