//! Registration after every (re)connection: Redis may have restarted empty,
//! failed over, or dropped only the subscriber connection (and with it
//! every subscription). Either way the node is not ready until the mirror
//! has written its partition and subscriptions again from the hub.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fred::prelude::*;
use tokio::sync::broadcast::error::RecvError;

use super::Shared;

/// Watches both connections and asks the mirror for a resync after each
/// reconnection.
pub async fn run(s: Arc<Shared>) {
    let mut client_up = s.redis.client.reconnect_rx();
    let mut subscriber_up = s.redis.subscriber.reconnect_rx();
    let mut client_down = s.redis.client.error_rx();
    let mut subscriber_down = s.redis.subscriber.error_rx();
    // A reconnection is an Up after a Down that followed a first Up: the
    // two connections (and every shard of a Cluster) come up one by one at
    // start, which is not a reconnection.
    let mut ever_up = false;
    let mut lost = false;
    loop {
        let event = tokio::select! {
            e = client_up.recv() => Event::Up(e.map(|_| ())),
            e = subscriber_up.recv() => Event::Up(e.map(|_| ())),
            e = client_down.recv() => Event::Down(e.map(|_| ())),
            e = subscriber_down.recv() => Event::Down(e.map(|_| ())),
            () = s.stop.cancelled() => return,
        };
        match event {
            Event::Up(Err(RecvError::Closed)) | Event::Down(Err(RecvError::Closed)) => return,
            Event::Down(_) => {
                // Not ready from the moment a connection is lost until the
                // resync after it came back is written.
                s.registered.store(false, Ordering::Release);
                lost = ever_up;
                continue;
            }
            Event::Up(_) => {}
        }
        // Both connections, and on Cluster every shard connection, report
        // their own reconnect: those already queued need one resync.
        while client_up.try_recv().is_ok() || subscriber_up.try_recv().is_ok() {}
        if lost {
            s.metrics.redis_reconnects.inc();
        }
        ever_up = true;
        lost = false;
        // The resync first, so a resync finishing right now does not
        // report the node ready.
        s.mirror.resync();
        s.registered.store(false, Ordering::Release);
    }
}

enum Event {
    Up(Result<(), RecvError>),
    Down(Result<(), RecvError>),
}
