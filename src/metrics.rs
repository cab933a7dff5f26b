//! Every metric gatecast exports, registered in one place.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::push::Delivered;

/// Label: the kind of target of a push (`client`, `uid`, `group`, `all`...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Target kind.
    pub kind: &'static str,
}

/// Label: why something was refused or closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A short snake_case reason (`malformed`, `secret_key`...).
    pub reason: &'static str,
}

/// Label: how an attempt ended (`resumed`, `unknown`, `used`...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// A short snake_case result.
    pub result: &'static str,
}

/// Labels of an API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// API method (`unknown` for names that are not methods).
    pub method: &'static str,
    /// HTTP status answered.
    pub status: u16,
}

/// Label: how a push reached the node that wrote its frame (`local`:
/// accepted here; `redis`: accepted elsewhere, timed by the envelope's
/// `ts`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// `local` or `redis`.
    pub path: &'static str,
}

/// The push-to-frame histograms, by path (see [`crate::push_latency`]).
pub type PushToFrame = Family<PathLabel, Histogram, fn() -> Histogram>;

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections on this node.
    pub connections: Gauge,
    /// WebSocket connections accepted since start.
    pub connections_opened: Counter,
    /// WebSocket connections refused by a limit, by reason.
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// Public connections dropped before their upgrade, by reason
    /// (`header_timeout`, `head_too_large`, `deadline`).
    pub handshakes_failed: Family<ReasonLabel, Counter>,
    /// Connections closed with 1008 for sending too fast while events are
    /// on, by the budget they overspent (`messages`, `bytes`).
    pub client_rate_closed: Family<ReasonLabel, Counter>,
    /// Messages received from clients.
    pub messages_in: Counter,
    /// Messages queued to local clients, by target kind.
    pub messages_out: Family<KindLabel, Counter>,
    /// Pushes accepted (API or Redis), by target kind.
    pub pushes: Family<KindLabel, Counter>,
    /// Messages not delivered because the recipient's queue overflowed.
    pub messages_overflowed: Counter,
    /// Connections closed with 1013 because they read too slowly.
    pub slow_clients_closed: Counter,
    /// API requests by method and status.
    pub api_requests: Family<ApiLabels, Counter>,
    /// Redis round-trip time of commands, in seconds.
    pub redis_rtt: Histogram,
    /// Reconnections to Redis.
    pub redis_reconnects: Counter,
    /// Mirror batches Redis refused or did not answer (the node is not
    /// ready until one is written again).
    pub redis_write_failures: Counter,
    /// Pub/sub messages received from Redis.
    pub pubsub_received: Counter,
    /// Of those, handled by the subscriber's reader itself, without the
    /// dispatcher thread (issue 33: uid, node and reply channels while
    /// the inbox is idle).
    pub pubsub_direct: Counter,
    /// Pub/sub messages that could not be decoded and were skipped.
    pub pubsub_malformed: Counter,
    /// Gaps in a stream's offsets this node read back from history
    /// (recovery, issue 27).
    pub history_gap_repairs: Counter,
    /// Gaps history could not be read back for: the stream's opted-in
    /// clients were closed to resume from their positions.
    pub history_gap_unrepaired: Counter,
    /// Streams whose history went back (Redis lost its last pushes and
    /// gave their offsets out again): a new epoch, opted-in clients closed
    /// to resume.
    pub history_went_back: Counter,
    /// Pub/sub messages dropped because this node fell behind Redis.
    pub pubsub_dropped: Counter,
    /// Subscriber connections lost and made again, by why.
    pub redis_subscriber_reconnects: Family<ReasonLabel, Counter>,
    /// Channels subscribed again after Redis Cluster moved their slot.
    pub redis_resubscribed: Counter,
    /// Channels Redis refused to subscribe (`-NOPERM`: an ACL without them).
    pub redis_subscribe_refused: Counter,
    /// Channels this node is subscribed to in Redis.
    pub redis_subscriptions: Gauge,
    /// Inner-port (GatewayWorker protocol) connections closed on an error:
    /// a malformed packet, a wrong secret key, an unknown command.
    pub inner_errors: Counter,
    /// Inner connections refused before reading anything, by reason
    /// (`too_many`, `address_full`, `unauthenticated_full`).
    pub inner_refused: Family<ReasonLabel, Counter>,
    /// Inner pushes whose body is not UTF-8, sent as binary frames.
    pub inner_binary_pushes: Counter,
    /// Inner pushes not sent: larger than `--max-message-bytes`.
    pub inner_pushes_refused: Counter,
    /// Gateway nodes seen alive (this one included).
    pub nodes_alive: Gauge,
    /// Events handed to the stream or webhook.
    pub events_sent: Counter,
    /// Events lost: queue full, Redis down or webhook failing.
    pub events_dropped: Counter,
    /// Failed `accept` calls on any listener (mostly: out of descriptors).
    pub accept_errors: Counter,
    /// The soft file-descriptor limit in force after start: the ceiling on
    /// connections, worth an alert when it is low.
    pub open_files_limit: Gauge,
    /// Open connections to the Register listener (`--register-listen`).
    pub register_connections: Gauge,
    /// Register connections closed or refused by the node, by reason.
    pub register_errors: Family<ReasonLabel, Counter>,
    /// BusinessWorkers connected to this node's inner port.
    pub workers: Gauge,
    /// Events queued for BusinessWorkers.
    pub worker_events_sent: Counter,
    /// Events BusinessWorkers did not get, by reason (`no_worker`,
    /// `worker_full`, `worker_closed`).
    pub worker_events_dropped: Family<ReasonLabel, Counter>,
    /// BusinessWorker connections the node closed, by reason (`slow`,
    /// `stalled`, `write_error`, `replaced`).
    pub worker_disconnects: Family<ReasonLabel, Counter>,
    /// Sessions refused, wherever they came from, by reason (`too_large`,
    /// `too_deep`).
    pub sessions_refused: Family<ReasonLabel, Counter>,
    /// 1 while every client address this node has seen is private or
    /// loopback and no `--trusted-proxies` is set: the per-address limits
    /// then see the proxy, not the clients.
    pub untrusted_private_peers: Gauge,
    /// Bytes of unfinished client messages buffered, all connections.
    pub partial_bytes: Gauge,
    /// Connections closed with 1013 to keep `--max-partial-bytes`.
    pub partial_closed: Counter,
    /// Events larger than `--events-max-bytes`, dropped.
    pub events_too_large: Counter,
    /// Resume attempts by result (`resumed`, `unknown`, `used`, `forged`,
    /// `sub_mismatch`, `unavailable`).
    pub resumes: Family<ResultLabel, Counter>,
    /// WebSocket connections ended since start (for disconnects per
    /// second).
    pub connections_closed: Counter,
    /// Open file descriptors, counted at each scrape (Linux; 0 elsewhere).
    pub open_files: Gauge,
    /// Resident memory of the process in bytes, read at each scrape
    /// (Linux; 0 elsewhere).
    pub resident_memory: Gauge,
    /// The memory limit of the process's cgroup in bytes, read at each
    /// scrape (cgroup v2 `memory.max`; 0 when unlimited or unknown).
    pub memory_limit: Gauge,
    /// 1 while `/readyz` answers 200, set at each scrape.
    pub ready: Gauge,
    /// Push-to-frame latency by path (`local`, `redis`): from the push's
    /// accept to its frame written to a recipient's socket (sampled).
    pub push_to_frame: PushToFrame,
    /// Admission control, evacuation and rebalancing.
    pub autoscale: crate::autoscale::metrics::AutoscaleMetrics,
    // A node cut off from Redis (issue 32).
    /// Connections closed with `redis_lost` (Redis unreachable past the
    /// liveness TTL for opted-in ones, past `--redis-lost-grace` for all).
    pub redis_lost_closes: Counter,
    /// 1 while Redis has been unreachable for longer than
    /// `--redis-lost-grace` (clients refused and closed).
    pub redis_lost: Gauge,
    // Behind on Redis pub/sub (issue 32).
    /// 1 while pushes reach this node late (`engine::redis::behind`).
    pub redis_subscriber_behind: Gauge,
    /// Age of the oldest push dispatched in the last half second.
    pub redis_subscriber_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    // The readiness probe on a slow link (issue 32).
    /// PINGs answered past the probe's timeout while the subscriber kept
    /// reading from Redis (a slow link, not a hang): the node stayed ready.
    pub redis_probe_late: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gatecast");
        let m = Metrics {
            connections: Gauge::default(),
            connections_opened: Counter::default(),
            connections_refused: Family::default(),
            handshakes_failed: Family::default(),
            client_rate_closed: Family::default(),
            messages_in: Counter::default(),
            messages_out: Family::default(),
            pushes: Family::default(),
            messages_overflowed: Counter::default(),
            slow_clients_closed: Counter::default(),
            api_requests: Family::default(),
            redis_rtt: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            redis_reconnects: Counter::default(),
            redis_write_failures: Counter::default(),
            pubsub_received: Counter::default(),
            pubsub_direct: Counter::default(),
            pubsub_malformed: Counter::default(),
            history_gap_repairs: Counter::default(),
            history_gap_unrepaired: Counter::default(),
            history_went_back: Counter::default(),
            pubsub_dropped: Counter::default(),
            redis_subscriber_reconnects: Family::default(),
            redis_resubscribed: Counter::default(),
            redis_subscribe_refused: Counter::default(),
            redis_subscriptions: Gauge::default(),
            inner_errors: Counter::default(),
            inner_refused: Family::default(),
            inner_binary_pushes: Counter::default(),
            inner_pushes_refused: Counter::default(),
            nodes_alive: Gauge::default(),
            events_sent: Counter::default(),
            events_dropped: Counter::default(),
            accept_errors: Counter::default(),
            open_files_limit: Gauge::default(),
            register_connections: Gauge::default(),
            register_errors: Family::default(),
            workers: Gauge::default(),
            worker_events_sent: Counter::default(),
            worker_events_dropped: Family::default(),
            worker_disconnects: Family::default(),
            sessions_refused: Family::default(),
            untrusted_private_peers: Gauge::default(),
            partial_bytes: Gauge::default(),
            partial_closed: Counter::default(),
            events_too_large: Counter::default(),
            resumes: Family::default(),
            connections_closed: Counter::default(),
            open_files: Gauge::default(),
            resident_memory: Gauge::default(),
            memory_limit: Gauge::default(),
            ready: Gauge::default(),
            push_to_frame: Family::new_with_constructor(crate::push_latency::histogram),
            autoscale: Default::default(),
            redis_lost_closes: Counter::default(),
            redis_lost: Gauge::default(),
            redis_subscriber_behind: Gauge::default(),
            redis_subscriber_lag: Gauge::default(),
            redis_probe_late: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        r.register(
            "connections_opened",
            "WebSocket connections accepted",
            m.connections_opened.clone(),
        );
        r.register(
            "connections_refused",
            "WebSocket connections refused by a limit, by reason",
            m.connections_refused.clone(),
        );
        r.register(
            "handshakes_failed",
            "Public connections dropped before their upgrade, by reason",
            m.handshakes_failed.clone(),
        );
        r.register(
            "client_rate_closed",
            "Connections closed with 1008 for sending faster than their budget, by budget",
            m.client_rate_closed.clone(),
        );
        r.register(
            "messages_in",
            "Messages received from clients",
            m.messages_in.clone(),
        );
        r.register(
            "messages_out",
            "Messages queued to local clients by target kind",
            m.messages_out.clone(),
        );
        r.register("pushes", "Pushes accepted by target kind", m.pushes.clone());
        r.register(
            "messages_overflowed",
            "Messages lost to a full client queue",
            m.messages_overflowed.clone(),
        );
        r.register(
            "slow_clients_closed",
            "Connections closed with 1013 for reading too slowly",
            m.slow_clients_closed.clone(),
        );
        r.register(
            "api_requests",
            "HTTP API requests by method and status",
            m.api_requests.clone(),
        );
        r.register(
            "redis_rtt_seconds",
            "Redis command round-trip time",
            m.redis_rtt.clone(),
        );
        r.register(
            "redis_reconnects",
            "Reconnections to Redis",
            m.redis_reconnects.clone(),
        );
        r.register(
            "redis_write_failures",
            "Writes of this node's state to Redis that failed (retried with backoff; not ready meanwhile)",
            m.redis_write_failures.clone(),
        );
        r.register(
            "pubsub_received",
            "Pub/sub messages received from Redis",
            m.pubsub_received.clone(),
        );
        r.register(
            "pubsub_direct",
            "Pub/sub messages handled by the subscriber's reader without the dispatcher thread (uid, node and reply channels while nothing is queued)",
            m.pubsub_direct.clone(),
        );
        r.register(
            "pubsub_malformed",
            "Pub/sub messages that failed to decode and were skipped",
            m.pubsub_malformed.clone(),
        );
        r.register(
            "history_gap_repairs",
            "Gaps in a stream's offsets read back from history by this node",
            m.history_gap_repairs.clone(),
        );
        r.register(
            "history_gap_unrepaired",
            "Gaps not read back from history; the stream's opted-in clients were closed to resume",
            m.history_gap_unrepaired.clone(),
        );
        r.register(
            "history_went_back",
            "Streams whose history Redis lost the last pushes of (a failover, an older copy): given a new epoch",
            m.history_went_back.clone(),
        );
        r.register(
            "pubsub_dropped",
            "Pub/sub messages dropped because this node fell behind",
            m.pubsub_dropped.clone(),
        );
        r.register(
            "redis_subscriber_reconnects",
            "Subscriber connections to Redis lost and made again, by reason (closed_behind: closed while this node was behind, most likely client-output-buffer-limit pubsub)",
            m.redis_subscriber_reconnects.clone(),
        );
        r.register(
            "redis_resubscribed",
            "Channels subscribed again after Redis Cluster moved their slot",
            m.redis_resubscribed.clone(),
        );
        r.register(
            "redis_subscribe_refused",
            "Channels Redis refused to subscribe (NOPERM: the ACL user lacks the channel pattern); the change stays on this node only",
            m.redis_subscribe_refused.clone(),
        );
        r.register(
            "redis_subscriptions",
            "Channels this node is subscribed to in Redis",
            m.redis_subscriptions.clone(),
        );
        r.register(
            "inner_errors",
            "GatewayWorker-protocol connections closed on an error",
            m.inner_errors.clone(),
        );
        r.register(
            "inner_refused",
            "GatewayWorker-protocol connections refused at accept, by reason",
            m.inner_refused.clone(),
        );
        r.register(
            "inner_binary_pushes",
            "GatewayWorker pushes whose body is not UTF-8, sent as binary frames",
            m.inner_binary_pushes.clone(),
        );
        r.register(
            "inner_pushes_refused",
            "GatewayWorker pushes not sent: larger than --max-message-bytes",
            m.inner_pushes_refused.clone(),
        );
        r.register(
            "nodes_alive",
            "Gateway nodes seen alive",
            m.nodes_alive.clone(),
        );
        r.register(
            "events_sent",
            "Events handed to the stream or webhook",
            m.events_sent.clone(),
        );
        r.register(
            "events_dropped",
            "Events lost (queue full, Redis down, webhook failing)",
            m.events_dropped.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accepts on any listener (mostly: out of file descriptors)",
            m.accept_errors.clone(),
        );
        r.register(
            "open_files_limit",
            "Soft file descriptor limit of the process after start",
            m.open_files_limit.clone(),
        );
        r.register(
            "register_connections",
            "Open connections to the Register listener",
            m.register_connections.clone(),
        );
        r.register(
            "register_errors",
            "Register connections closed or refused by the node, by reason",
            m.register_errors.clone(),
        );
        r.register(
            "workers",
            "BusinessWorkers connected to this node",
            m.workers.clone(),
        );
        r.register(
            "worker_events_sent",
            "Events queued for BusinessWorkers",
            m.worker_events_sent.clone(),
        );
        r.register(
            "worker_events_dropped",
            "Events BusinessWorkers did not get, by reason",
            m.worker_events_dropped.clone(),
        );
        r.register(
            "worker_disconnects",
            "BusinessWorker connections closed by the node, by reason",
            m.worker_disconnects.clone(),
        );
        r.register(
            "sessions_refused",
            "Sessions refused for their size or depth, by reason",
            m.sessions_refused.clone(),
        );
        r.register(
            "untrusted_private_peers",
            "1 while every client seen is private and no proxy is trusted",
            m.untrusted_private_peers.clone(),
        );
        r.register(
            "partial_bytes",
            "Bytes of unfinished client messages buffered",
            m.partial_bytes.clone(),
        );
        r.register(
            "partial_closed",
            "Connections closed with 1013 to keep --max-partial-bytes",
            m.partial_closed.clone(),
        );
        r.register(
            "events_too_large",
            "Events larger than --events-max-bytes, dropped",
            m.events_too_large.clone(),
        );
        r.register(
            "resumes",
            "Resume attempts by result (resumed, unknown, used, forged, sub_mismatch, unavailable)",
            m.resumes.clone(),
        );
        // Both paths from the start: dashboards and alerts find the series
        // before the first push.
        for path in ["local", "redis"] {
            let _ = m.push_to_frame.get_or_create(&PathLabel { path });
        }
        r.register(
            "push_to_frame_seconds",
            "Push accepted (API, inner port, or the envelope's ts) to its frame written to a recipient's socket, by path (local, redis: includes the clocks' skew); sampled",
            m.push_to_frame.clone(),
        );
        r.register(
            "connections_closed",
            "WebSocket connections ended",
            m.connections_closed.clone(),
        );
        r.register(
            "open_files",
            "File descriptors the process holds (compare with gatecast_open_files_limit)",
            m.open_files.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "Resident memory of the process",
            m.resident_memory.clone(),
        );
        r.register(
            "memory_limit_bytes",
            "Memory limit of the process's cgroup (0: none or unknown)",
            m.memory_limit.clone(),
        );
        r.register(
            "ready",
            "1 while the node is ready (/readyz answers 200)",
            m.ready.clone(),
        );
        m.autoscale.register(r);
        r.register(
            "redis_lost_closes",
            "Connections closed with redis_lost: Redis unreachable past the liveness TTL (opted-in) or --redis-lost-grace (all)",
            m.redis_lost_closes.clone(),
        );
        r.register(
            "redis_lost",
            "1 while Redis is unreachable for longer than --redis-lost-grace (clients refused and closed)",
            m.redis_lost.clone(),
        );
        r.register(
            "redis_subscriber_behind",
            "1 while pushes reach this node from Redis pub/sub more than 1 s after their accept, or its inbox is full (slow link, or the node cannot keep up)",
            m.redis_subscriber_behind.clone(),
        );
        r.register_with_unit(
            "redis_subscriber_lag",
            "Age of the oldest push dispatched from Redis pub/sub in the last half second (from its envelope's accept time)",
            prometheus_client::registry::Unit::Seconds,
            m.redis_subscriber_lag.clone(),
        );
        r.register(
            "redis_probe_late",
            "Readiness PINGs answered past their 1 s timeout while pub/sub traffic from Redis kept flowing (a slow link, not a hung Redis): the node stayed ready",
            m.redis_probe_late.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts what one push did on this node.
    pub fn delivered(&self, kind: &'static str, d: Delivered) {
        if d.queued > 0 {
            self.messages_out
                .get_or_create(&KindLabel { kind })
                .inc_by(d.queued as u64);
        }
        if d.overflowed > 0 {
            self.messages_overflowed.inc_by(d.overflowed as u64);
            self.slow_clients_closed.inc_by(d.overflowed as u64);
        }
    }

    /// The probes feeding [`Metrics::push_to_frame`], for the hub.
    pub fn push_latency(&self) -> crate::push_latency::PushLatency {
        let path = |path| {
            self.push_to_frame
                .get_or_create(&PathLabel { path })
                .clone()
        };
        crate::push_latency::PushLatency::new(path("local"), path("redis"))
    }

    /// Reads what the kernel knows of the process (Linux): descriptors
    /// and resident memory. At scrape time only, so it costs nothing
    /// between scrapes.
    fn sample_process(&self) {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor is one of them.
            let n = dir.count().saturating_sub(1);
            self.open_files.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        // `VmRSS:   1234 kB` (in kB whatever the page size).
        let resident_kb = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<i64>().ok()
            });
        if let Some(kb) = resident_kb {
            self.resident_memory.set(kb.saturating_mul(1024));
        }
        // cgroup v2 (what Kubernetes and Docker use today): "max" or bytes.
        let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok());
        self.memory_limit.set(limit.unwrap_or(0));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.sample_process();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
