//! Rebalancing: after a scale-out the old nodes hold the connections and
//! the new ones idle, since long-lived WebSockets never come back through
//! the load balancer on their own. Every `--rebalance-interval` each node
//! publishes its connection count (one Redis command, O(1)), reads the
//! others' (one command) and, when it holds more than its share
//! ([`decide`]), closes some of its clients, picked at random, each told
//! to come back after a delay (`{"reason":"rebalance","retry_ms":N}`,
//! 1001): the load balancer spreads their reconnects over the cluster.
//!
//! This task is the only writer of the node's load field: when the node
//! stops it stops publishing and deletes the field itself, before the
//! engine leaves the cluster, so that no write of it lands after the
//! delete (a late write would count until it expires, and on a cluster
//! with `--rebalance off` nobody would ever prune it).

pub mod decide;

use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use self::decide::{decide, NodeLoad, Phase, Tuning, PATIENCE};
use super::reconnect::{pick_retry_ms, Operational};
use crate::config::Rebalance;
use crate::gateway::Gateway;

/// Closes of one round go out in slices this far apart.
const SLICE: Duration = Duration::from_millis(100);

/// Rounds between two prunes of dead nodes' fields with `--rebalance
/// off` (with it on, every round's read prunes them).
const PRUNE_ROUNDS: u64 = 12;

/// Publishes this node's load every round and, with `--rebalance on`,
/// sheds its excess. Once `leave` is cancelled (the node drains), it
/// deletes the node's field, drops `left` (the drain waits for that before
/// the engine leaves the cluster) and waits for `stop`.
pub async fn run(
    gw: Arc<Gateway>,
    leave: CancellationToken,
    left: tokio::sync::oneshot::Sender<()>,
    stop: CancellationToken,
) {
    rounds(&gw, &leave).await;
    gw.engine.forget_load().await;
    drop(left);
    stop.cancelled().await;
}

/// The rounds, until `leave` is cancelled.
async fn rounds(gw: &Arc<Gateway>, leave: &CancellationToken) {
    let interval = gw.config.rebalance_interval;
    let me = gw.minter.node().to_string();
    let tuning = Tuning {
        tolerance: gw.config.rebalance_tolerance,
        rate: gw.config.rebalance_rate,
        patience: PATIENCE,
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut phase = Phase::Idle;
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = leave.cancelled() => return,
        }
        round += 1;
        let load = NodeLoad {
            node: me.clone(),
            connections: gw.hub.client_count() as u64,
            ready: gw.is_ready(),
        };
        if let Err(e) = gw.engine.publish_load(&load, interval * 3).await {
            tracing::debug!(error = %e, "could not publish this node's load");
            continue;
        }
        if gw.config.rebalance == Rebalance::Off {
            // Nobody reads the hash every round: the fields of nodes that
            // died (killed, so they could not delete theirs) are pruned
            // once in a while by the read.
            if round % PRUNE_ROUNDS == 0 {
                let _ = gw.engine.cluster_load().await;
            }
            continue;
        }
        let mut nodes = match gw.engine.cluster_load().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the cluster's load");
                continue;
            }
        };
        // This node's own count as it is now, not as published.
        nodes.retain(|n| n.node != me);
        nodes.push(load.clone());
        let decision = decide(&me, &nodes, phase, &tuning);
        phase = decision.phase;
        let metrics = &gw.metrics.autoscale;
        metrics.rebalance_rounds.inc();
        metrics.rebalance_mean.set(decision.mean.round() as i64);
        metrics
            .rebalance_shedding
            .set(i64::try_from(decision.per_second).unwrap_or(i64::MAX));
        if decision.per_second == 0 {
            continue;
        }
        let budget = (decision.per_second as f64 * interval.as_secs_f64()).ceil() as u64;
        let to_close = budget.min(decision.excess) as usize;
        tracing::info!(
            connections = load.connections,
            mean = decision.mean.round(),
            nodes = nodes.iter().filter(|n| n.ready).count(),
            excess = decision.excess,
            per_second = decision.per_second,
            closing = to_close,
            "rebalancing: above the cluster's mean, moving connections to other nodes"
        );
        let closed = shed(gw, to_close, decision.per_second, leave).await;
        metrics.closed(Operational::Rebalance.name(), closed);
    }
}

/// Closes `n` random clients at `per_second`, in slices; returns how many
/// were closed. Stops early when the node stops being ready (a drain or an
/// evacuation takes over).
async fn shed(gw: &Gateway, n: usize, per_second: u64, stop: &CancellationToken) -> u64 {
    let mut ids = gw.hub.client_ids();
    let (picked, _) = ids.partial_shuffle(&mut rand::rng(), n);
    let picked = picked.to_vec();
    drop(ids);
    let per_slice = ((per_second as f64 * SLICE.as_secs_f64()).ceil() as usize).max(1);
    let mut ticker = tokio::time::interval(SLICE);
    let mut closed = 0;
    for slice in picked.chunks(per_slice) {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        if !gw.is_ready() {
            break;
        }
        let kind = Operational::Rebalance;
        for id in slice {
            let reason = kind.reason(pick_retry_ms(gw.config.reconnect_window));
            if gw.hub.close_if_open(*id, kind.code(), &reason) {
                closed += 1;
            }
        }
    }
    closed
}
