//! `POST /api/evacuate`: the node turns unready, refuses new handshakes
//! (503 with `Retry-After`) and closes its clients at a bounded rate, each
//! told when to come back (`{"reason":"evacuate","retry_ms":N}`, 1001), so
//! the load balancer moves them to the other nodes; the process keeps
//! running (the step before node maintenance). `GET` shows the progress,
//! `DELETE` cancels: the node takes clients again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::reconnect::{pick_retry_ms, Operational};
use crate::gateway::Gateway;
use crate::ids::ClientId;

/// How often the evacuation closes its next slice.
const TICK: Duration = Duration::from_millis(100);

/// The evacuation of this node, if one was asked for.
#[derive(Debug, Default)]
pub struct Evacuation {
    state: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    progress: Progress,
    stop: CancellationToken,
}

/// What `GET /api/evacuate` shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Progress {
    /// Unix time (ms) the evacuation started.
    pub started_at: u64,
    /// Clients closed per second.
    pub rate: u32,
    /// Clients the node held when it started.
    pub total: u64,
    /// Clients closed so far.
    pub closed: u64,
    /// Clients still on the node (filled in when shown).
    pub remaining: u64,
    /// Every client is gone.
    pub done: bool,
}

impl Evacuation {
    /// Whether the node is evacuating (or evacuated): not ready, no new
    /// clients.
    pub fn is_active(&self) -> bool {
        self.state.lock().is_some()
    }

    /// The progress, with `remaining` clients on the node; `None` when no
    /// evacuation runs.
    pub fn progress(&self, remaining: u64) -> Option<Progress> {
        let state = self.state.lock();
        let mut progress = state.as_ref()?.progress.clone();
        progress.remaining = remaining;
        Some(progress)
    }

    /// Starts evacuating at `rate` clients a second; an evacuation already
    /// running keeps going at the new rate. Returns whether it started now.
    pub fn start(self: &Arc<Self>, gw: &Arc<Gateway>, rate: u32) -> bool {
        let mut state = self.state.lock();
        if let Some(running) = state.as_mut() {
            running.progress.rate = rate;
            return false;
        }
        let stop = CancellationToken::new();
        *state = Some(Running {
            progress: Progress {
                started_at: unix_ms(),
                rate,
                total: gw.hub.client_count() as u64,
                closed: 0,
                remaining: 0,
                done: false,
            },
            stop: stop.clone(),
        });
        drop(state);
        gw.metrics.autoscale.evacuating.set(1);
        tracing::info!(rate, "evacuating: closing every client at a bounded rate");
        tokio::spawn(run(self.clone(), gw.clone(), stop));
        true
    }

    /// Cancels the evacuation: the node takes clients again. Returns the
    /// progress it had made.
    pub fn cancel(&self, gw: &Gateway) -> Option<Progress> {
        let running = self.state.lock().take()?;
        running.stop.cancel();
        gw.metrics.autoscale.evacuating.set(0);
        tracing::info!(
            closed = running.progress.closed,
            "evacuation cancelled: taking clients again"
        );
        Some(running.progress)
    }

    /// Stops the closing task without making the node ready again (the
    /// drain takes over).
    pub fn stop(&self) {
        if let Some(running) = self.state.lock().as_ref() {
            running.stop.cancel();
        }
    }

    /// The current rate, or `None` once cancelled.
    fn rate(&self) -> Option<u32> {
        self.state.lock().as_ref().map(|r| r.progress.rate)
    }

    fn add_closed(&self, n: u64, done: bool) {
        if let Some(running) = self.state.lock().as_mut() {
            running.progress.closed += n;
            running.progress.done |= done;
        }
    }
}

/// Closes the node's clients, `rate` a second in slices every [`TICK`],
/// until none is left or the evacuation is cancelled.
async fn run(evacuation: Arc<Evacuation>, gw: Arc<Gateway>, stop: CancellationToken) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Vec<ClientId> = Vec::new();
    // Closes owed so far: the rate times the time elapsed, less those done.
    let mut owed = 0.0f64;
    let mut last = started;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(rate) = evacuation.rate() else {
            return;
        };
        let now = Instant::now();
        owed += f64::from(rate) * now.duration_since(last).as_secs_f64();
        last = now;
        if pending.is_empty() {
            // Handshakes in flight when it started may still land: look
            // again once the list is used up.
            pending = gw.hub.client_ids();
            if pending.is_empty() {
                evacuation.add_closed(0, true);
                tracing::info!(
                    elapsed = ?started.elapsed(),
                    "evacuated: no client left on this node"
                );
                return;
            }
            // In random order: no kind of client always goes first.
            rand::seq::SliceRandom::shuffle(pending.as_mut_slice(), &mut rand::rng());
        }
        let mut closed = 0u64;
        while owed >= 1.0 {
            let Some(id) = pending.pop() else { break };
            let retry_ms = pick_retry_ms(gw.config.reconnect_window);
            let kind = Operational::Evacuate;
            if gw
                .hub
                .close_if_open(id, kind.code(), &kind.reason(retry_ms))
            {
                closed += 1;
                owed -= 1.0;
            }
        }
        // Nothing owed piles up while there was nobody to close.
        owed = owed.min(f64::from(rate).max(1.0));
        gw.metrics
            .autoscale
            .closed(Operational::Evacuate.name(), closed);
        evacuation.add_closed(closed, false);
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
