//! Readiness when Redis hangs: a paused or stuck server keeps its
//! connections open, so "connected" stays true while nothing answers. A
//! PING every [`PERIOD`], failing past [`TIMEOUT`], tells the two apart:
//! the node is not ready from the first PING left unanswered until one is
//! answered again, so `/readyz` turns 503 within 2 s of Redis hanging, as
//! the API does (SPEC sections 4 and 6).

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
        let ping = s.redis.client.ping::<String>(None);
        let answered = matches!(tokio::time::timeout(TIMEOUT, ping).await, Ok(Ok(_)));
        let was = s.responsive.swap(answered, Ordering::AcqRel);
        if was && !answered {
            tracing::warn!(timeout = ?TIMEOUT, "redis does not answer: not ready");
        } else if !was && answered {
            tracing::info!("redis answers again");
        }
    }
}
