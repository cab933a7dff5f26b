//! A node cut off from Redis while its clients still reach it
//! (`--redis-lost-grace`, docs/redis.md section 10, issue 32).
//!
//! The other nodes purge it after its liveness TTL (2.5 heartbeats), and
//! from then on pushes to its clients through other nodes vanish: they
//! look for its connections in Redis and find none. So the node does not
//! keep clients it cannot serve:
//!
//! - after 2.5 heartbeats (or the grace, if shorter) it closes the
//!   connections that opted in to recovery: they resume elsewhere and lose
//!   nothing;
//! - after `--redis-lost-grace` it turns "lost": it refuses new
//!   handshakes (503) and closes every connection, each with 1001
//!   `{"reason":"redis_lost","retry_ms":N}`, N picked within
//!   `--reconnect-window`, so they come back spread out, through the load
//!   balancer, to nodes that can serve them. (It is already unready: the
//!   probe or the failed writes took readiness away within seconds.)
//!
//! `--redis-lost-grace 0` turns the second step off: a node then keeps the
//! clients that did not opt in for the whole outage (when Redis itself is
//! down for every node, no other node could serve them either).
//!
//! When Redis answers again the node registers anew (the mirror's resync:
//! its whole partition from the hub, fenced by its instance id, with the
//! entries of the connections it closed removed), and is ready once that
//! is written.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;

use super::Shared;
use crate::frame::close_code;
use crate::recovery::resume::{jitter_ms, retry_reason};

/// Shortest `retry_ms` in a `redis_lost` close: a client never comes back
/// at once.
const RETRY_FROM: Duration = Duration::from_millis(250);

/// A connection to a Sentinel-found primary or a Cluster master that
/// answers nothing for this long is made again (two command timeouts).
const SILENT: Duration = Duration::from_secs(3);

/// Whether this node can use Redis now. Writes refused (out of memory,
/// read-only) fail the heartbeat too: the node is purged all the same.
fn reachable(s: &Shared) -> bool {
    s.redis.client.is_connected()
        && s.responsive.load(Ordering::Acquire)
        && s.writable.load(Ordering::Acquire)
}

/// Makes the command connection again when it is up but silent (or its
/// writes fail) for [`SILENT`], at most once per [`SILENT`], on Sentinel and Cluster only.
///
/// A primary cut off by the network (packets dropped, nothing reset) keeps
/// the connection open for ever: fred's own unresponsive check counts from
/// the last write, and the probe writes a PING every half second, so it
/// never fires. (`TCP_USER_TIMEOUT`, `client::UNACKED_TIMEOUT`, closes it
/// after 3 s of unacknowledged data, which the probe's PINGs always are;
/// this is the same step, taken by the node itself, for a link where the
/// kernel's timeout does not apply.) Made again, the connection asks the Sentinels for the
/// primary (or the Cluster for its slot map), and the subscriber follows
/// the command connection. A single server is left alone: the same
/// address again gains nothing, and the connection resumes when the link
/// does.
fn reconnect_if_silent(s: &Shared, away: Duration, forced: &mut Option<Instant>) {
    // Writes refused count too: a Sentinel primary demoted to a replica
    // answers READONLY, a Cluster master cut off leaves its slots' writes
    // unanswered while the probe's PING (to another master) is answered.
    let silent = s.redis.client.is_connected()
        && !(s.responsive.load(Ordering::Acquire) && s.writable.load(Ordering::Acquire));
    if !s.redis.fails_over || !silent || away < SILENT {
        return;
    }
    if forced.is_some_and(|at| at.elapsed() < SILENT) {
        return;
    }
    *forced = Some(Instant::now());
    tracing::warn!(
        silent = ?away,
        "redis connection silent: connecting again, asking the sentinels or the cluster where the primary is now"
    );
    // The probe's connection too: it went to the same server.
    for client in [s.redis.client.clone(), s.redis.probe.clone()] {
        // The reconnection goes on in fred after the wait; the wait is
        // bounded only so this task never waits on it.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SILENT, client.force_reconnection()).await;
        });
    }
}

/// The task: watches reachability every probe period and closes what the
/// module doc says, when it says.
pub async fn run(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(super::probe::PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // 0: off, every client that did not opt in stays (as before the grace).
    let grace = Some(s.settings.lost_grace).filter(|g| !g.is_zero());
    // Opted-in clients go as soon as the others may have purged this node.
    let purged = s.settings.heartbeat * 5 / 2;
    let early = grace.map_or(purged, |g| purged.min(g));
    let mut cut_since: Option<Instant> = None;
    let mut closed = 0usize;
    let mut forced: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = s.stop.cancelled() => return,
        }
        if reachable(&s) {
            if cut_since.take().is_some() && s.lost.swap(false, Ordering::AcqRel) {
                s.metrics.redis_lost.set(0);
                // Register anew, as after a reconnection: resync first,
                // so a batch finishing right now does not report ready.
                s.mirror.resync();
                s.registered.store(false, Ordering::Release);
                tracing::info!(
                    closed,
                    "redis reachable again: registering again, taking clients once registered"
                );
            } else if closed > 0 {
                tracing::info!(closed, "redis reachable again");
            }
            closed = 0;
            continue;
        }
        let away = cut_since.get_or_insert_with(Instant::now).elapsed();
        reconnect_if_silent(&s, away, &mut forced);
        if away < early {
            continue;
        }
        let all = grace.is_some_and(|g| away >= g);
        if all && !s.lost.swap(true, Ordering::AcqRel) {
            s.metrics.redis_lost.set(1);
            tracing::warn!(
                connections = s.hub.client_count(),
                ?grace,
                "redis unreachable for longer than --redis-lost-grace: refusing new clients and closing every client, to reconnect to a node that can serve them"
            );
        }
        let ids = if all {
            s.hub.client_ids()
        } else {
            s.resumable.ids()
        };
        let mut now_closed = 0;
        for id in ids {
            let retry_ms = jitter_ms(RETRY_FROM, s.settings.reconnect_window);
            let reason = retry_reason("redis_lost", retry_ms);
            if s.hub.close_if_open(id, close_code::GOING_AWAY, &reason) {
                now_closed += 1;
            }
        }
        if now_closed > 0 {
            s.metrics.redis_lost_closes.inc_by(now_closed as u64);
            if !all && closed == 0 {
                tracing::warn!(
                    connections = now_closed,
                    after = ?early,
                    "redis unreachable for longer than the liveness TTL: closing the connections that opted in to recovery, to resume on another node"
                );
            }
        }
        closed += now_closed;
    }
}
