//! The dashboard's live tail on Redis (`crate::tail`): a connection of the
//! watcher's own, subscribed to the watched uid's or group's channel only
//! while the watcher lives. So it sees the pushes of every node (and of
//! backends publishing straight to Redis) exactly as the nodes holding the
//! recipients do, and costs the push path nothing. (GatewayWorker's
//! inner-port pushes not kept in history never cross Redis: not seen.) It never touches the
//! node's own subscriber, whose channels follow the hub.
//!
//! The tail ends (its entries stream closes) when the watcher goes, the
//! engine stops, or the connection is lost: the page starts it again.

use std::time::Duration;

use fred::prelude::*;
use fred::types::config::Config as RedisConfig;

use super::client::{unavailable, COMMAND_TIMEOUT};
use super::envelope::{EnvelopeRef, Op};
use super::Shared;
use crate::engine::EngineResult;
use crate::tail::{Tail, TailEntry, TailTarget};

/// How often the tail checks that its connection is still up.
const CHECK: Duration = Duration::from_secs(1);

/// Subscribes a new connection to `target`'s channel; returns once Redis
/// confirmed the subscription.
pub async fn start(s: &Shared, target: TailTarget) -> EngineResult<Tail> {
    s.check()?;
    let channel = match &target {
        TailTarget::Uid(uid) => s.keys.uid_channel(uid),
        TailTarget::Group(group) => s.keys.group_channel(group),
    };
    let mut config = RedisConfig::from_url(&s.settings.url).map_err(unavailable)?;
    if let Some(password) = &s.settings.password {
        config.password = Some(password.clone());
    }
    let client = fred::types::Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(1);
            c.internal_command_timeout = Duration::from_secs(1);
        })
        // No reconnection policy: a lost connection ends the tail (a
        // reconnected one would hold no subscription), and the page starts
        // another.
        .build()
        .map_err(unavailable)?;
    let mut messages = client.message_rx();
    let subscribed = async {
        // Ends when the connection does (no reconnection policy).
        let connection = client.init().await?;
        if s.redis.sharded {
            client.ssubscribe(channel.clone()).await?;
        } else {
            client.subscribe(channel.clone()).await?;
        }
        Ok(connection)
    };
    let mut connection = match tokio::time::timeout(COMMAND_TIMEOUT, subscribed)
        .await
        .unwrap_or_else(|_| {
            Err(fred::error::Error::new(
                fred::error::ErrorKind::Timeout,
                "the tail's subscription timed out",
            ))
        }) {
        Ok(connection) => connection,
        Err(e) => {
            // Not awaited here: a Redis that hangs must not hold the request.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(COMMAND_TIMEOUT, client.quit()).await;
            });
            return Err(unavailable(e));
        }
    };
    let (sender, entries) = Tail::channel();
    let stop = s.stop.clone();
    let watcher = sender;
    tokio::spawn(async move {
        let mut check = tokio::time::interval(CHECK);
        loop {
            tokio::select! {
                message = messages.recv() => {
                    let Ok(message) = message else {
                        // Lagged: the queue bounds are ours, go on.
                        if client.is_connected() { continue } else { break }
                    };
                    let Some(bytes) = message.value.as_bytes() else { continue };
                    let Ok(envelope) = EnvelopeRef::decode(bytes) else { continue };
                    if envelope.op != Op::Push {
                        continue;
                    }
                    let data = envelope.data.as_deref().unwrap_or_default();
                    watcher.offer(|| TailEntry::new(
                        &target,
                        envelope.binary,
                        data,
                        envelope.exclude.len(),
                        envelope.origin.map(str::to_owned),
                    ));
                }
                _ = &mut connection => break,
                _ = check.tick() => {
                    if !client.is_connected() {
                        break;
                    }
                }
                () = watcher.closed() => break,
                () = stop.cancelled() => break,
            }
        }
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, client.quit()).await;
    });
    // The task holds the only sender: the entries end when it does.
    Ok(Tail::new(entries, ()))
}
