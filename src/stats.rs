//! Node stats records for the dashboard (docs/dashboard.md): every
//! `--node-heartbeat` each node writes a small record of what it is doing
//! (connections, pushes and deliveries per second, Redis round trip,
//! memory, readiness, version, uptime) through its engine, so any node can
//! show every node. A task of its own writes it, apart from the heartbeat:
//! a slow stats write never delays liveness.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::metrics::{KindLabel, Metrics};

/// A record counts for this many intervals after it was written: a node
/// that stopped writing (dead, or stuck) drops out of the dashboard after
/// that, even before the registry purges it.
pub const VALID_INTERVALS: u32 = 3;

/// One node's stats, as written to the engine and shown by the dashboard.
/// Unknown fields are ignored and every field has a default, so nodes of
/// other versions can read each other's records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStats {
    /// The node id (12 hex digits, the start of its client_ids).
    pub node: String,
    /// Its inner address (advertised IPv4 and inner port).
    pub inner: String,
    /// Its public listener, as bound.
    pub public: String,
    /// Its internal (API) listener, as bound.
    pub api: String,
    /// gatecast's version.
    pub version: String,
    /// `redis` or `memory`.
    pub engine: String,
    /// Seconds since the process started.
    pub uptime_secs: u64,
    /// Whether it reports ready (`/readyz` 200).
    pub ready: bool,
    /// Whether it is draining (shutting down) or evacuating.
    pub draining: bool,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Pushes accepted by its API per second, over the last interval.
    pub pushes_per_sec: f64,
    /// Messages queued to its clients per second, over the last interval.
    pub deliveries_per_sec: f64,
    /// Round trip of its previous stats write to Redis, in milliseconds
    /// (`None` with the in-process engine, or before the first write).
    pub redis_rtt_ms: Option<f64>,
    /// Resident memory of the process, in bytes (`None` where
    /// `/proc/self/status` is not readable).
    pub memory_rss_bytes: Option<u64>,
    /// When the record was written (Unix ms).
    pub at_ms: u64,
    /// After when it no longer counts (Unix ms).
    pub until_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The process's resident memory (`VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Every target kind pushes and deliveries are counted by.
const KINDS: [&str; 5] = ["client", "clients", "uid", "group", "all"];

/// The sum of a counter family over [`KINDS`], without creating series.
fn total(
    family: &prometheus_client::metrics::family::Family<
        KindLabel,
        prometheus_client::metrics::counter::Counter,
    >,
) -> u64 {
    KINDS
        .iter()
        .filter_map(|kind| family.get(&KindLabel { kind }).map(|c| c.get()))
        .sum()
}

/// Counters at the previous record, to turn them into rates.
struct Previous {
    at: Instant,
    pushes: u64,
    deliveries: u64,
}

impl Previous {
    fn now(metrics: &Metrics) -> Self {
        Previous {
            at: Instant::now(),
            pushes: total(&metrics.pushes),
            deliveries: total(&metrics.messages_out),
        }
    }
}

/// What the node's addresses are, for its record.
#[derive(Debug, Clone)]
pub struct Addresses {
    /// The inner address (advertised).
    pub inner: String,
    /// The public listener, as bound.
    pub public: String,
    /// The API listener, as bound.
    pub api: String,
}

/// This node's record now; rates are over the time since `previous`.
fn collect(
    gw: &Gateway,
    addresses: &Addresses,
    started: Instant,
    previous: &mut Previous,
    redis_rtt_ms: Option<f64>,
) -> NodeStats {
    let now = Previous::now(&gw.metrics);
    let secs = now.at.duration_since(previous.at).as_secs_f64();
    let rate = |after: u64, before: u64| {
        if secs > 0.0 {
            after.saturating_sub(before) as f64 / secs
        } else {
            0.0
        }
    };
    let pushes_per_sec = rate(now.pushes, previous.pushes);
    let deliveries_per_sec = rate(now.deliveries, previous.deliveries);
    *previous = now;
    let at_ms = unix_ms();
    let valid_for = gw.config.node_heartbeat * VALID_INTERVALS;
    NodeStats {
        node: gw.minter.node().to_string(),
        inner: addresses.inner.clone(),
        public: addresses.public.clone(),
        api: addresses.api.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        engine: if gw.config.redis_url.is_some() {
            "redis"
        } else {
            "memory"
        }
        .to_owned(),
        uptime_secs: started.elapsed().as_secs(),
        ready: gw.is_ready(),
        draining: gw.is_draining() || gw.autoscale.evacuation.is_active(),
        connections: gw.hub.client_count() as u64,
        pushes_per_sec,
        deliveries_per_sec,
        redis_rtt_ms,
        memory_rss_bytes: rss_bytes(),
        at_ms,
        until_ms: at_ms + valid_for.as_millis() as u64,
    }
}

/// Writes this node's record every `--node-heartbeat` until `stop`. A
/// failed write (Redis down) is logged at debug and tried again next time;
/// nothing is written once the node drains (its record was removed).
pub async fn run(gw: Arc<Gateway>, addresses: Addresses, stop: CancellationToken) {
    let started = Instant::now();
    let interval = gw.config.node_heartbeat;
    let mut previous = Previous::now(&gw.metrics);
    let mut redis_rtt_ms = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        if gw.is_draining() {
            continue;
        }
        let record = collect(&gw, &addresses, started, &mut previous, redis_rtt_ms);
        let began = Instant::now();
        // Bounded like any Redis call, and never longer than an interval.
        let write = gw
            .engine
            .publish_stats_take_request(&record, interval * VALID_INTERVALS);
        match tokio::time::timeout(interval.max(Duration::from_secs(1)), write).await {
            Ok(Ok(request)) => {
                redis_rtt_ms =
                    (record.engine == "redis").then(|| began.elapsed().as_secs_f64() * 1000.0);
                if let Some(rate) = request {
                    // Asked from another node's dashboard: as if
                    // `POST /api/evacuate` had been called here.
                    let rate = rate.unwrap_or(gw.config.evacuate_rate);
                    tracing::info!(rate, "evacuating: asked from another node's dashboard");
                    gw.autoscale.evacuation.start(&gw, rate);
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "stats record not written"),
            Err(_) => tracing::debug!("stats record not written in time"),
        }
    }
}

/// Whether `record` still counts at `now_ms`.
pub fn is_fresh(record: &NodeStats, now_ms: u64) -> bool {
    record.until_ms >= now_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_on_linux() {
        let rss = rss_bytes().expect("/proc/self/status has VmRSS");
        assert!(
            rss > 1024 * 1024,
            "a test process holds more than 1 MiB: {rss}"
        );
    }

    #[test]
    fn records_of_other_versions_are_read() {
        let old: NodeStats =
            serde_json::from_str(r#"{"node":"7f0000010b54","connections":3,"extra":1}"#).unwrap();
        assert_eq!(old.node, "7f0000010b54");
        assert_eq!(old.connections, 3);
        assert!(!is_fresh(&old, 1), "no validity: never fresh");
    }
}
