//! Readiness when Redis hangs: a paused or stuck server keeps its
//! connections open, so "connected" stays true while nothing answers. A
//! PING every [`PERIOD`], failing past [`TIMEOUT`], tells the two apart:
//! the node is not ready from the first PING left unanswered until one is
//! answered again, so `/readyz` turns 503 within 2 s of Redis hanging, as
//! the API does (SPEC sections 4 and 6).
//!
//! A slow link is not a hung Redis. The PINGs go on a connection of their
//! own (`Redis::probe`), so they never wait behind the node's commands and
//! PUBLISHes. And on a link saturated by pub/sub traffic (a node falling
//! behind on a slow link), a PING's answer waits in the same queue as the
//! pushes, and a lost segment costs a retransmission of a second or more:
//! there, a PING late past [`TIMEOUT`] keeps the node ready as long as the
//! subscriber keeps reading from Redis (within [`HEARD`]), up to
//! [`SLOW_LIMIT`]. A hung Redis sends nothing, so its subscriber falls
//! silent too and the 2 s bound holds; only a node whose subscriber is
//! still draining data that reached it before the hang waits longer, at
//! most [`SLOW_LIMIT`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;

use super::Shared;

/// Time between two PINGs.
pub const PERIOD: Duration = Duration::from_millis(500);

/// A PING not answered within this is a hung Redis. PERIOD + TIMEOUT is
/// the longest a hang goes unnoticed: 1.5 s, within the 2 s bound.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// Redis is sending to the subscriber when it read something within this.
/// A PING sent after a hang times out at least `TIMEOUT` after it, and is
/// looked at again every [`RECHECK`]: the subscriber has then been silent
/// for longer than this (its own PINGs go unanswered too), so the node is
/// unready at most `PERIOD + TIMEOUT` after the hang as before, and nothing
/// read before it counts. As long as `TIMEOUT`: on a lossy link the
/// subscriber's reads pause too while a segment is sent again.
pub const HEARD: Duration = Duration::from_secs(1);

/// The longest a late PING is waited for while the subscriber still hears
/// from Redis.
pub const SLOW_LIMIT: Duration = Duration::from_secs(5);

/// How often the subscriber is looked at while a late PING is waited for.
const RECHECK: Duration = Duration::from_millis(100);

/// The probe task.
pub async fn run(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = s.stop.cancelled() => return,
        }
        // Not connected is not ready already; a PING would only queue.
        if !s.redis.client.is_connected() {
            continue;
        }
        let answered = ping(&s).await;
        let was = s.responsive.swap(answered, Ordering::AcqRel);
        if was && !answered {
            tracing::warn!(timeout = ?TIMEOUT, "redis does not answer: not ready");
        } else if !was && answered {
            tracing::info!("redis answers again");
        }
    }
}

/// One PING on the probe's connection: whether it was answered within
/// [`TIMEOUT`], or later while the subscriber kept hearing from Redis.
async fn ping(s: &Shared) -> bool {
    let ping = s.redis.probe.ping::<String>(None);
    tokio::pin!(ping);
    let started = tokio::time::Instant::now();
    if let Ok(answer) = tokio::time::timeout(TIMEOUT, &mut ping).await {
        return answer.is_ok();
    }
    loop {
        if !s.redis.subscriber.heard_within(HEARD) || started.elapsed() >= SLOW_LIMIT {
            return false;
        }
        if let Ok(answer) = tokio::time::timeout(RECHECK, &mut ping).await {
            if answer.is_ok() {
                s.metrics.redis_probe_late.inc();
                tracing::debug!(after = ?started.elapsed(), "late PING answered while pub/sub traffic flows: a slow link, still ready");
            }
            return answer.is_ok();
        }
    }
}
