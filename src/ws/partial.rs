//! The node-wide budget of unfinished client messages (`--max-partial-bytes`).
//!
//! Each connection may hold one unfinished message of up to
//! `--max-message-bytes` (a frame whose end has not arrived, or the
//! fragments of a message so far); 100,000 connections doing it at once
//! would hold 6.4 GiB at the default size. Every connection reports what
//! its reader holds after each read ([`PartialBudget::charge`]); past the
//! budget a task closes the connections whose message has been unfinished
//! longest (code 1013, try again later) until what they hold brings the
//! node back under it. Honest clients finish a message within a few
//! round trips, so the oldest unfinished ones are the likeliest stallers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;

/// Bytes of unfinished messages held by this node's connections.
#[derive(Debug)]
pub struct PartialBudget {
    used: AtomicUsize,
    /// 0: no limit.
    max: usize,
    over: Notify,
}

impl PartialBudget {
    /// A budget of `max` bytes (0: no limit, nothing is ever closed).
    pub fn new(max: usize) -> Self {
        PartialBudget {
            used: AtomicUsize::new(0),
            max,
            over: Notify::new(),
        }
    }

    /// A connection held `before` bytes and holds `now`: counts the
    /// difference, and wakes the evictor once past the budget.
    pub fn charge(&self, before: usize, now: usize) {
        if now == before {
            return;
        }
        let used = if now > before {
            self.used.fetch_add(now - before, Ordering::Relaxed) + (now - before)
        } else {
            self.used.fetch_sub(before - now, Ordering::Relaxed) - (before - now)
        };
        if self.max > 0 && used > self.max {
            self.over.notify_one();
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Closes the oldest unfinished messages' connections whenever the node
/// holds more than its budget; ends with `stop`.
pub async fn evictor(
    hub: Arc<Hub>,
    budget: Arc<PartialBudget>,
    metrics: Arc<Metrics>,
    reconnect_window: std::time::Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = budget.over.notified() => {}
            () = stop.cancelled() => return,
        }
        let used = budget.used();
        metrics
            .partial_bytes
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        if budget.max == 0 || used <= budget.max {
            continue;
        }
        // Connections already closing give their bytes back soon: only
        // the rest is freed by closing more.
        let mut candidates = hub.incomplete();
        let closing: usize = candidates
            .iter()
            .filter(|c| c.outbox.is_closing())
            .map(|c| c.bytes)
            .sum();
        let mut excess = (used - budget.max).saturating_sub(closing);
        candidates.retain(|c| !c.outbox.is_closing());
        candidates.sort_unstable_by_key(|c| c.since);
        let mut closed = 0u64;
        for candidate in candidates {
            if excess == 0 {
                break;
            }
            // An overload close: the client is told when to come back.
            let overload = crate::autoscale::reconnect::Operational::Overload;
            let retry_ms = crate::autoscale::reconnect::pick_retry_ms(reconnect_window);
            candidate
                .outbox
                .close(overload.code(), &overload.reason(retry_ms), true);
            excess = excess.saturating_sub(candidate.bytes);
            closed += 1;
        }
        if closed > 0 {
            metrics.partial_closed.inc_by(closed);
            metrics.autoscale.closed("overload", closed);
            tracing::warn!(
                closed,
                used,
                max = budget.max,
                "unfinished client messages past --max-partial-bytes: closed the oldest"
            );
        }
    }
}
