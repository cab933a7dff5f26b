//! Whether this node is behind on its Redis pub/sub input (issue 32: a
//! node on a slow link "falls behind, says so in metrics and logs").
//!
//! Behind means pushes reach this node's dispatcher late: the age of each
//! push (from the accept time its envelope carries, set by the node or
//! publisher that accepted it) is over [`LATE`], or the subscriber had to
//! wait on the full inbox. Either way the backlog sits in Redis's output
//! buffer for this node, the network or the inbox; it loses nothing until
//! Redis's `client-output-buffer-limit pubsub` closes the subscriber
//! (docs/redis.md, section 9). The task logs once when the node falls
//! behind and once when it caught up, and keeps two gauges:
//! `gatecast_redis_subscriber_behind` (0 or 1) and
//! `gatecast_redis_subscriber_lag_seconds` (the oldest push dispatched in
//! the last period).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;

/// A push dispatched this long after it was accepted counts as late.
/// Above a loaded node's queueing (tens of ms), below what a user notices.
pub const LATE: Duration = Duration::from_secs(1);

/// Caught up after this long without a late push: on a slow link whole
/// messages arrive in bursts, with quiet half seconds between them.
const CAUGHT_UP: Duration = Duration::from_secs(2);

/// The oldest push dispatched since the last look, in milliseconds.
#[derive(Default)]
pub struct Lag(AtomicU64);

impl Lag {
    /// Notes a push accepted at `accepted_unix_us`, dispatched now.
    pub fn observe(&self, accepted_unix_us: u64) {
        let age_ms = crate::push_latency::unix_us().saturating_sub(accepted_unix_us) / 1000;
        self.0.fetch_max(age_ms, Ordering::Relaxed);
    }

    fn take(&self) -> Duration {
        Duration::from_millis(self.0.swap(0, Ordering::Relaxed))
    }
}

/// The task: looks every probe period.
pub async fn run(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(super::probe::PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waits = s.inbox.waits();
    let mut since: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    let mut last_late = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = s.stop.cancelled() => return,
        }
        let lag = s.lag.take();
        let now_waits = s.inbox.waits();
        let waited = now_waits != waits;
        waits = now_waits;
        s.metrics.redis_subscriber_lag.set(lag.as_secs_f64());
        let late = lag >= LATE || waited;
        if late {
            last_late = Instant::now();
        }
        match since {
            None if late => {
                since = Some(Instant::now());
                worst = lag;
                s.metrics.redis_subscriber_behind.set(1);
                tracing::warn!(
                    lag = ?lag,
                    inbox_full = waited,
                    inbox_bytes = s.inbox.queued_bytes(),
                    "behind on redis pub/sub: pushes reach this node late (slow link, or the node cannot keep up); nothing is lost unless redis closes the subscriber at its output buffer limit"
                );
            }
            Some(_) if late || last_late.elapsed() < CAUGHT_UP => {
                worst = worst.max(lag);
            }
            Some(at) => {
                since = None;
                s.metrics.redis_subscriber_behind.set(0);
                tracing::info!(
                    lasted = ?at.elapsed(),
                    worst_lag = ?worst,
                    "caught up on redis pub/sub"
                );
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_the_oldest_push_since_the_last_look() {
        let lag = Lag::default();
        let now = crate::push_latency::unix_us();
        lag.observe(now - 3_000_000);
        lag.observe(now - 1_000_000);
        // A clock ahead of this node's counts as no lag, not a huge one.
        lag.observe(now + 5_000_000);
        let seen = lag.take();
        assert!(
            seen >= Duration::from_secs(3) && seen < Duration::from_secs(4),
            "{seen:?}"
        );
        assert_eq!(lag.take(), Duration::ZERO);
    }
}
