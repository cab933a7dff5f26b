//! Node-wide admission control: a token bucket on new WebSocket handshakes,
//! all clients together, checked before the token and any Redis write.
//! Per-address limits do not hold a herd back behind a load balancer (every
//! client has another address); this does.
//!
//! After the node first turns ready, the rate rises linearly from a tenth
//! to the whole over `--handshake-ramp`, so a fresh pod is not flattened by
//! the whole herd the moment the load balancer adds it.
//!
//! A refused client is told when to come back (`retry_ms`, `Retry-After`),
//! each its own turn after those already told, one every `1 / rate`: a herd
//! that honours the delays comes back at about the rate the node admits,
//! not all at once again one second later.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;

/// What the rate is at, from the first instant (`--handshake-ramp`).
const RAMP_START: f64 = 0.1;

/// Seconds of the current rate the bucket holds: a second's worth passes
/// at once, a herd larger than that does not.
const BURST_SECONDS: f64 = 1.0;

/// The latest a refused client is told to come back: past it, turns are
/// no longer handed out one by one (a flood that ignores them would push
/// them ever later) and the delay is picked in the upper half of it.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// The handshake rate (`--handshake-rate`, `--handshake-ramp`).
#[derive(Debug)]
pub struct HandshakeRate {
    /// Handshakes per second once ramped up; 0: no limit.
    per_second: f64,
    ramp: Duration,
    /// When the node first turned ready: the ramp's start.
    ready_since: OnceLock<Instant>,
    state: Mutex<Bucket>,
}

#[derive(Debug, Default)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
    /// The last turn handed to a refused client.
    last_turn: Option<Instant>,
}

impl HandshakeRate {
    /// `per_second` handshakes (0: no limit) after a ramp of `ramp`.
    pub fn new(per_second: u32, ramp: Duration) -> Self {
        HandshakeRate {
            per_second: f64::from(per_second),
            ramp,
            ready_since: OnceLock::new(),
            state: Mutex::default(),
        }
    }

    /// Notes that the node is ready (the first call starts the ramp).
    pub fn mark_ready(&self, now: Instant) {
        let _ = self.ready_since.set(now);
    }

    /// Whether the ramp started.
    pub fn is_ready(&self) -> bool {
        self.ready_since.get().is_some()
    }

    /// Handshakes per second admitted at `now` (ramp included); `None`
    /// without a limit.
    pub fn current(&self, now: Instant) -> Option<f64> {
        if self.per_second <= 0.0 {
            return None;
        }
        let fraction = match self.ready_since.get() {
            // Before ready (or with no ramp asked for, the whole rate).
            _ if self.ramp.is_zero() => 1.0,
            None => RAMP_START,
            Some(since) => {
                let elapsed = now.saturating_duration_since(*since).as_secs_f64();
                let progress = (elapsed / self.ramp.as_secs_f64()).min(1.0);
                RAMP_START + (1.0 - RAMP_START) * progress
            }
        };
        Some(self.per_second * fraction)
    }

    /// Admits a handshake at `now`, or says in how many milliseconds to
    /// come back.
    pub fn admit(&self, now: Instant) -> Result<(), u64> {
        let Some(rate) = self.current(now) else {
            return Ok(());
        };
        let capacity = (rate * BURST_SECONDS).max(1.0);
        let mut bucket = self.state.lock();
        let tokens = match bucket.at {
            None => capacity,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                (bucket.tokens + elapsed * rate).min(capacity)
            }
        };
        bucket.at = Some(now);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            return Ok(());
        }
        bucket.tokens = tokens;
        let gap = Duration::from_secs_f64(1.0 / rate);
        let after = bucket.last_turn.filter(|t| *t > now).unwrap_or(now);
        let turn = after + gap;
        let mut rng = rand::rng();
        let wait = turn - now;
        if wait > MAX_RETRY {
            let max = MAX_RETRY.as_millis() as u64;
            return Err(rng.random_range(max / 2..=max));
        }
        bucket.last_turn = Some(turn);
        drop(bucket);
        // A little jitter on top, so clients given neighbouring turns do
        // not land in the same millisecond.
        let jitter = rng.random_range(0..=gap.as_millis() as u64);
        Err(wait.as_millis() as u64 + jitter)
    }
}

/// `Retry-After` (whole seconds, at least 1) for a delay in milliseconds.
pub fn retry_after_seconds(retry_ms: u64) -> u64 {
    retry_ms.div_ceil(1000).max(1)
}

/// Starts the ramp when the node first turns ready, and keeps the
/// `gatecast_handshake_rate` gauge up to date while it rises; then waits
/// for `stop`.
pub async fn follow_readiness(
    gw: std::sync::Arc<crate::gateway::Gateway>,
    stop: tokio_util::sync::CancellationToken,
) {
    let rate = &gw.autoscale.admission;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = Instant::now();
        if !rate.is_ready() && gw.is_ready() {
            rate.mark_ready(now);
        }
        let current = rate.current(now);
        gw.metrics
            .autoscale
            .handshake_rate
            .set(current.map_or(0, |r| r.round() as i64));
        let ramped = rate
            .ready_since
            .get()
            .is_some_and(|since| now.saturating_duration_since(*since) >= rate.ramp);
        if current.is_none() || ramped {
            break;
        }
    }
    stop.cancelled().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_past_the_rate_is_refused_with_turns_spread_at_the_rate() {
        let rate = HandshakeRate::new(100, Duration::ZERO);
        let t0 = Instant::now();
        // The bucket holds a second's worth: 100.
        let admitted = (0..150).filter(|_| rate.admit(t0).is_ok()).count();
        assert_eq!(admitted, 100);
        // Those refused meanwhile got turns 10 ms apart (plus jitter), so
        // they come back at the rate, not all at once.
        let waits: Vec<u64> = (0..100).map(|_| rate.admit(t0).unwrap_err()).collect();
        assert!(waits.windows(2).all(|w| w[1] + 10 >= w[0]), "{waits:?}");
        assert!(waits[99] >= 1000 - 20, "{waits:?}");
        // Time refills the bucket.
        assert!(rate.admit(t0 + Duration::from_millis(20)).is_ok());
    }

    #[test]
    fn a_flood_is_told_at_most_max_retry() {
        let rate = HandshakeRate::new(10, Duration::ZERO);
        let t0 = Instant::now();
        let max = MAX_RETRY.as_millis() as u64;
        for _ in 0..2000 {
            if let Err(wait) = rate.admit(t0) {
                assert!(wait <= max + 100, "{wait}");
            }
        }
    }

    #[test]
    fn the_ramp_rises_from_a_tenth_after_ready() {
        let rate = HandshakeRate::new(1000, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(rate.current(t0), Some(100.0));
        rate.mark_ready(t0);
        let at = |s: u64| rate.current(t0 + Duration::from_secs(s)).unwrap();
        assert!((at(0) - 100.0).abs() < 1e-6);
        assert!((at(5) - 550.0).abs() < 1e-6);
        assert!((at(10) - 1000.0).abs() < 1e-6);
        assert!((at(60) - 1000.0).abs() < 1e-6);
        // Marked once: a later readiness does not start it again.
        rate.mark_ready(t0 + Duration::from_secs(60));
        assert!((at(60) - 1000.0).abs() < 1e-6);
        assert_eq!(HandshakeRate::new(0, Duration::ZERO).current(t0), None);
        assert_eq!(retry_after_seconds(1), 1);
        assert_eq!(retry_after_seconds(1001), 2);
    }
}
