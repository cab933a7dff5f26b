//! The periodic sweep over every local connection: pings, and closes for
//! silence, unfinished messages and expired tokens.

use bytes::Bytes;

use super::Hub;
use crate::frame::close_code;

/// The pings of one sweep: the connections whose number is `phase` modulo
/// `phases`. A sweeper that moves `phase` on by one each round pings every
/// connection once per `phases` rounds, a share at a time: pinging a node's
/// 100,000 connections at once would hold pushes behind a burst of writes.
#[derive(Clone, Copy, Debug)]
pub struct Pings<'a> {
    /// The encoded ping frame.
    pub frame: &'a Bytes,
    /// Which share this round pings (`0..phases`).
    pub phase: u32,
    /// Into how many shares the connections are split (at least 1).
    pub phases: u32,
}

impl Pings<'_> {
    fn due(&self, number: u32) -> bool {
        number % self.phases.max(1) == self.phase
    }
}

impl Hub {
    /// Sends a ping to the connections `ping` names and closes those silent
    /// for longer than `timeout_ms` (code 1000), those that left a frame or
    /// message unfinished for longer than `message_timeout_ms` (code 1008),
    /// and those whose token expired (4001, after what is queued).
    pub fn sweep(&self, ping: Option<Pings<'_>>, timeout_ms: u64, message_timeout_ms: u64) {
        let now = self.now_ms();
        for shard in self.shards.iter() {
            for (id, local) in &shard.read().conns {
                let outbox = &local.outbox;
                let slow = outbox
                    .incomplete_since()
                    .is_some_and(|t| now.saturating_sub(t) > message_timeout_ms);
                if slow {
                    outbox.close(close_code::POLICY, "message too slow", true);
                } else if now.saturating_sub(outbox.last_seen()) > timeout_ms {
                    outbox.close(close_code::NORMAL, "ping timeout", true);
                } else if outbox.expired(now) {
                    outbox.close(close_code::TOKEN_EXPIRED, "token expired", false);
                } else if let Some(ping) = ping.filter(|p| p.due(id.number())) {
                    let _ = outbox.push(ping.frame.clone(), &self.limits);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Limits, Membership};
    use crate::ids::{IdMinter, NodeId};
    use crate::outbox::Outbox;
    use std::collections::VecDeque;
    use std::sync::Arc;

    #[test]
    fn a_round_of_sweeps_pings_every_connection_once_a_share_at_a_time() {
        let hub = Hub::new(Limits {
            frames: 16,
            bytes: 1 << 20,
        });
        let minter = IdMinter::new(NodeId::new(std::net::Ipv4Addr::LOCALHOST, 1));
        let outboxes: Vec<Arc<Outbox>> = (0..100)
            .map(|_| {
                let outbox = Arc::new(Outbox::default());
                hub.insert(minter.mint(), outbox.clone(), Membership::default());
                outbox
            })
            .collect();
        let queued = |outbox: &Outbox| {
            let mut batch = VecDeque::new();
            outbox.take(&mut batch);
            batch.len()
        };
        let frame = Bytes::from_static(b"\x89\x00");
        let phases = 10;
        let mut pinged = vec![0; outboxes.len()];
        for phase in 0..phases {
            let ping = Pings {
                frame: &frame,
                phase,
                phases,
            };
            hub.sweep(Some(ping), u64::MAX, u64::MAX);
            let this_round: usize = outboxes
                .iter()
                .zip(&mut pinged)
                .map(|(outbox, n)| {
                    let got = queued(outbox);
                    *n += got;
                    got
                })
                .sum();
            assert_eq!(this_round, 10, "round {phase} pinged a tenth");
        }
        assert!(pinged.iter().all(|&n| n == 1), "{pinged:?}");
    }
}
