//! The autoscaling metrics, registered with the node's others (see
//! `crate::metrics`). Refused handshakes are counted with the other
//! refusals, in `gatecast_connections_refused_total{reason="handshake_rate"}`
//! and `{reason="evacuating"}`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::ReasonLabel;

/// Admission, evacuation and rebalancing metrics.
#[derive(Debug, Default)]
pub struct AutoscaleMetrics {
    /// Handshakes per second admitted now (`--handshake-rate` on its ramp).
    pub handshake_rate: Gauge,
    /// Connections the server closed for an operational reason, telling
    /// them when to come back, by reason (`drain`, `evacuate`, `rebalance`,
    /// `overload`).
    pub operational_closes: Family<ReasonLabel, Counter>,
    /// 1 while the node is evacuating.
    pub evacuating: Gauge,
    /// Rebalancing rounds run.
    pub rebalance_rounds: Counter,
    /// The mean connection count of the ready nodes, as last seen.
    pub rebalance_mean: Gauge,
    /// Connections this node sheds per second now (0 unless above the mean
    /// by more than the tolerance).
    pub rebalance_shedding: Gauge,
}

impl AutoscaleMetrics {
    /// Registers every metric in `r`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "handshake_rate",
            "WebSocket handshakes per second admitted now (--handshake-rate on its ramp)",
            self.handshake_rate.clone(),
        );
        r.register(
            "operational_closes",
            "Connections closed for an operational reason with a reconnect delay, by reason",
            self.operational_closes.clone(),
        );
        r.register(
            "evacuating",
            "1 while POST /api/evacuate empties the node",
            self.evacuating.clone(),
        );
        r.register(
            "rebalance_rounds",
            "Rebalancing rounds run",
            self.rebalance_rounds.clone(),
        );
        r.register(
            "rebalance_mean",
            "Mean connection count of the ready nodes, as last seen",
            self.rebalance_mean.clone(),
        );
        r.register(
            "rebalance_shedding",
            "Connections this node sheds per second now",
            self.rebalance_shedding.clone(),
        );
    }

    /// Counts `n` operational closes of kind `reason`.
    pub fn closed(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.operational_closes
                .get_or_create(&ReasonLabel { reason })
                .inc_by(n);
        }
    }
}
