//! The node's Redis connections and the few ways it uses them: commands
//! and publishing on fred's client, subscriptions on the subscriber's own
//! connections (`subscriber`); sharded pub/sub (SPUBLISH/SSUBSCRIBE) on
//! Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::prelude::*;
use fred::types::config::{Config as RedisConfig, Options, ReconnectPolicy};

use super::inbox::Inbox;
use super::subscriber::{Subscriber, Wanted};
use crate::metrics::Metrics;

/// Longest a Redis command may take before the call fails (the API answers
/// 503 within its 2 s deadline).
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);

/// Data written to a Redis connection and not acknowledged by the peer
/// for this long makes the kernel close the connection
/// (`TCP_USER_TIMEOUT`).
///
/// A server cut off by the network (packets dropped, nothing reset) never
/// acknowledges; once the socket's send buffer is full, fred's router
/// waits on the write for ever, and with it every command, the forced
/// reconnection `lost` asks for, and the cluster re-sync: a Cluster master
/// cut off kept the nodes unready for good (issue 32). With the timeout the
/// write fails, fred drops the connection and asks the Cluster (or the
/// Sentinels) again. Longer than a slow link's queueing (acknowledgements
/// still come on a slow link), shorter than `--redis-lost-grace`'s default.
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(3);

/// Commands waiting to be written, per client (all of its connections:
/// one, or one per shard on Cluster).
const COMMAND_BUFFER: usize = 1 << 16;

/// The node's Redis connections.
pub struct Redis {
    /// Commands, scripts and PUBLISH.
    pub client: Client,
    /// The readiness probe's PINGs, on a connection of their own (one per
    /// master on Cluster): a PING never waits behind the commands and
    /// PUBLISHes queued on `client` (`probe`).
    pub probe: Client,
    /// Subscriptions and the messages that arrive on them: connections of
    /// our own, read with back-pressure ([`Subscriber`]). It keeps no set
    /// of channels: after a reconnection the mirror's resync subscribes
    /// again from the hub (`subscriptions`).
    pub subscriber: Subscriber,
    /// Redis Cluster: sharded pub/sub.
    pub sharded: bool,
    /// Sentinel or Cluster: the server behind a connection may be replaced
    /// by a failover, and a connection that went silent is made again to
    /// find the new one (`lost`).
    pub fails_over: bool,
    /// PUBLISH (and the history Function that publishes) is never retried
    /// (see [`Redis::publish`]).
    pub once: Options,
}

impl Redis {
    /// Builds the command client and the subscriber from `--redis-url`
    /// (and `--redis-password`, which replaces the URL's); connects
    /// nothing yet. The subscriber hands messages to `inbox`.
    pub fn build(
        url: &str,
        password: Option<&str>,
        node_channel: String,
        reply_channel: String,
        inbox: Arc<Inbox>,
        metrics: Arc<Metrics>,
        wanted: Wanted,
    ) -> Result<Self, String> {
        let mut config =
            RedisConfig::from_url(url).map_err(|e| format!("invalid --redis-url: {e}"))?;
        if let Some(password) = password {
            config.password = Some(password.to_owned());
        }
        let sharded = config.server.is_clustered();
        let fails_over = sharded || config.server.is_sentinel();
        let mut builder = fred::types::Builder::from_config(config.clone());
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
                c.tcp.user_timeout = Some(UNACKED_TIMEOUT);
                // fred follows an ASK (a Cluster slot being migrated) by
                // writing ASKING and reading the next frame of the
                // connection as its answer, while other commands are in
                // flight on it: that frame is another command's reply, and
                // every reply after it goes to the wrong caller or none
                // (timeouts, then a reconnection; seen in a reshard under
                // load, issue 32). So fred follows no redirection: a MOVED
                // still updates its slot map, an ASK or MOVED fails the
                // command, which did not run, and the engine sends it
                // again (`migrating`).
                if sharded {
                    c.max_redirections = 0;
                }
            })
            // Retry forever: a node outlives any Redis outage.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 1000, 2));
        let client = builder.build().map_err(|e| e.to_string())?;
        // The same settings: it follows a Sentinel failover or the Cluster's
        // slot map on its own.
        let probe = builder.build().map_err(|e| e.to_string())?;
        let subscriber = Subscriber::new(
            &config,
            client.clone(),
            node_channel,
            reply_channel,
            inbox,
            metrics,
            wanted,
        )?;
        Ok(Redis {
            client,
            probe,
            subscriber,
            sharded,
            fails_over,
            once: Options {
                max_attempts: Some(1),
                // An ASK (a slot being migrated) answered to a command
                // with no attempt left made fred drop and make again every
                // connection of the client, failing every command in
                // flight (issue 32, a reshard under load). Without
                // redirections the command fails alone, and was not run:
                // `publish` sends it again. (The client follows none on
                // Cluster anyway, see `build`; this covers a bare PUBLISH
                // to a single server too, where it changes nothing.)
                max_redirections: Some(0),
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
        if !self.sharded {
            return client.publish(channel, bytes).await;
        }
        // A slot that moved answers MOVED, which fred counts as the one
        // attempt. Redis did not run the command then, so it is sent once
        // more if fred's slot map changed for it meanwhile (fred syncs it
        // on MOVED).
        let slot = fred::util::redis_keyslot(channel.as_bytes());
        let owner = || {
            self.client
                .cached_cluster_state()
                .and_then(|s| s.get_server(slot).cloned())
        };
        //
        // A slot being migrated answers ASK, which fails the command (no
        // redirection allowed, see `once`) without running it: sent again
        // until the slot's migration is over, within MIGRATION_WAIT.
        let started = std::time::Instant::now();
        let mut before = owner();
        loop {
            match client.spublish(channel.clone(), bytes.clone()).await {
                Err(e) if owner() != before => {
                    tracing::debug!(error = %e, slot, "slot moved: publishing again");
                    before = owner();
                }
                Err(e) if redirected(&e) && started.elapsed() < MIGRATION_WAIT => {
                    tracing::debug!(error = %e, slot, "slot being migrated: publishing again");
                    tokio::time::sleep(MIGRATION_RETRY).await;
                }
                result => return result,
            }
        }
    }
}

/// Whether `e` says a Redis Cluster slot is being migrated and the
/// command did not run: `TRYAGAIN` (a multi-key command whose keys are
/// split between the two masters for now), `ASK`, or fred giving up on an
/// `ASK` redirection (it has no attempt left for the `ASKING` it needs).
/// Such a command can be sent again safely a moment later.
pub fn migrating(e: &fred::error::Error) -> bool {
    let details = e.details();
    details.starts_with("TRYAGAIN")
        || details.starts_with("ASK ")
        || (*e.kind() == fred::error::ErrorKind::Routing && details == "Max attempts reached.")
        || redirected(e)
}

/// As [`migrating`], but only what Redis itself answers for a slot being
/// migrated (never fred's "Max attempts reached.", which a lost master
/// gives too): for the mirror, which keeps the node ready while it writes
/// again, and must not do so through an outage.
pub fn refused_mid_migration(e: &fred::error::Error) -> bool {
    let details = e.details();
    details.starts_with("TRYAGAIN") || details.starts_with("ASK ") || redirected(e)
}

/// Whether fred failed `e` on a redirection it was not allowed to follow
/// (`once`): Redis did not run the command.
fn redirected(e: &fred::error::Error) -> bool {
    *e.kind() == fred::error::ErrorKind::Routing && e.details() == "Too many redirections."
}

/// How long a command refused because its slot is being migrated (a
/// Cluster reshard) is sent again: within the API's 2 s deadline, with
/// the command timeout.
pub const MIGRATION_WAIT: Duration = Duration::from_millis(500);

/// Pause between two such sends.
pub const MIGRATION_RETRY: Duration = Duration::from_millis(20);

/// Runs `command` again while it is refused because its slot is being
/// migrated (see [`migrating`]), within [`MIGRATION_WAIT`]: for reads,
/// which fred no longer follows through an ASK.
pub async fn again<T, F, Fut>(mut command: F) -> Result<T, fred::error::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
{
    let started = std::time::Instant::now();
    loop {
        match command().await {
            Err(e) if migrating(&e) && started.elapsed() < MIGRATION_WAIT => {
                tokio::time::sleep(MIGRATION_RETRY).await;
            }
            result => return result,
        }
    }
}

/// A Redis error as the engine reports it.
pub fn unavailable(e: impl std::fmt::Display) -> super::EngineError {
    super::EngineError::Unavailable(format!("redis: {e}"))
}
