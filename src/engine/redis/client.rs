//! The two Redis connections of a node and the few ways it uses them:
//! commands and publishing on one, subscriptions on the other; sharded
//! pub/sub (SPUBLISH/SSUBSCRIBE) on Redis Cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::prelude::*;
use fred::types::config::{Config as RedisConfig, Options, ReconnectPolicy};
use futures_util::future::try_join_all;

/// Longest a Redis command may take before the call fails (the API answers
/// 503 within its 2 s deadline).
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);

/// Pub/sub messages buffered between the Redis connection and this node's
/// dispatcher before the oldest are dropped (and counted). fred sizes every
/// event channel of a client with it, preallocated, so it is set on the
/// subscriber only: 65536 cost ~100 MB of RSS, 4096 a few MB. The dispatcher is a thread
/// of its own that does no I/O, so it drains as fast as fred fills.
const PUBSUB_BUFFER: usize = 4096;

/// Commands waiting to be written, per client (all of its connections:
/// one, or one per shard on Cluster).
const COMMAND_BUFFER: usize = 1 << 16;

/// Channels per SUBSCRIBE command (centrifuge batches up to 512 as well).
const SUBSCRIBE_CHUNK: usize = 512;

/// The node's Redis connections.
pub struct Redis {
    /// Commands, scripts and PUBLISH.
    pub client: Client,
    /// SUBSCRIBE and the messages that arrive on it. A plain client, not
    /// fred's `SubscriberClient`: that one keeps its own set of every
    /// channel (~80 bytes per uid bound here, so per connection) to
    /// resubscribe after a reconnection, which the mirror's resync does
    /// already from the hub (`subscriptions`).
    pub subscriber: Client,
    /// Redis Cluster: sharded pub/sub.
    pub sharded: bool,
    /// PUBLISH is never retried (see [`Redis::publish`]).
    once: Options,
}

impl Redis {
    /// Builds both clients from `--redis-url` (and `--redis-password`, which
    /// replaces the URL's); connects nothing yet.
    pub fn build(url: &str, password: Option<&str>) -> Result<Self, String> {
        let mut config =
            RedisConfig::from_url(url).map_err(|e| format!("invalid --redis-url: {e}"))?;
        if let Some(password) = password {
            config.password = Some(password.to_owned());
        }
        let sharded = config.server.is_clustered();
        let mut builder = fred::types::Builder::from_config(config);
        builder
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(1);
                c.internal_command_timeout = Duration::from_secs(1);
                // Idempotent commands (scripts that set state, reads) may
                // be retried once after a lost connection; PUBLISH is not.
                c.max_command_attempts = 2;
                // fred's queue of commands not yet written is unbounded by
                // default; past this a command fails at once (a 503).
                c.max_command_buffer_len = COMMAND_BUFFER;
            })
            // Retry forever: a node outlives any Redis outage.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 1000, 2));
        let client = builder.build().map_err(|e| e.to_string())?;
        let subscriber = builder
            .with_performance_config(|p| p.broadcast_channel_capacity = PUBSUB_BUFFER)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Redis {
            client,
            subscriber,
            sharded,
            once: Options {
                max_attempts: Some(1),
                ..Default::default()
            },
        })
    }

    /// Both connections are up.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected() && self.subscriber.is_connected()
    }

    /// Publishes to a channel: sharded (SPUBLISH) on Redis Cluster, so a
    /// message goes only to the shard that owns the channel instead of
    /// crossing the whole cluster bus. Returns the number of receivers.
    ///
    /// Never retried: fred would resend a PUBLISH whose connection closed
    /// while it was in flight, and Redis may have run it already, so a
    /// retry could deliver a push twice. A push that may not have been
    /// sent is an error for the caller (503), not a double delivery.
    pub async fn publish(&self, channel: String, bytes: Bytes) -> Result<i64, fred::error::Error> {
        let client = self.client.with_options(&self.once);
        if self.sharded {
            client.spublish(channel, bytes).await
        } else {
            client.publish(channel, bytes).await
        }
    }

    /// Subscribes to many channels in few commands: up to 512 per
    /// SUBSCRIBE, and on Cluster one SSUBSCRIBE per slot (Redis refuses
    /// channels of several slots in one). The commands are pipelined.
    pub async fn subscribe(&self, channels: Vec<String>) -> Result<(), fred::error::Error> {
        let sub = &self.subscriber;
        if self.sharded {
            try_join_all(by_slot(channels).into_iter().map(|c| sub.ssubscribe(c))).await?;
        } else {
            try_join_all(chunks(channels).into_iter().map(|c| sub.subscribe(c))).await?;
        }
        Ok(())
    }

    /// Unsubscribes from many channels, batched as [`Redis::subscribe`].
    pub async fn unsubscribe(&self, channels: Vec<String>) -> Result<(), fred::error::Error> {
        let sub = &self.subscriber;
        if self.sharded {
            try_join_all(by_slot(channels).into_iter().map(|c| sub.sunsubscribe(c))).await?;
        } else {
            try_join_all(chunks(channels).into_iter().map(|c| sub.unsubscribe(c))).await?;
        }
        Ok(())
    }
}

fn chunks(channels: Vec<String>) -> Vec<Vec<String>> {
    channels
        .chunks(SUBSCRIBE_CHUNK)
        .map(<[String]>::to_vec)
        .collect()
}

fn by_slot(channels: Vec<String>) -> Vec<Vec<String>> {
    let mut slots: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for channel in channels {
        let slot = fred::util::redis_keyslot(channel.as_bytes());
        slots.entry(slot).or_default().push(channel);
    }
    slots.into_values().flat_map(chunks).collect()
}

/// A Redis error as the engine reports it.
pub fn unavailable(e: impl std::fmt::Display) -> super::EngineError {
    super::EngineError::Unavailable(format!("redis: {e}"))
}
