//! The periodic sweep over every local connection: pings, and closes for
//! silence, unfinished messages and expired tokens.

use bytes::Bytes;

use super::Hub;
use crate::frame::close_code;

impl Hub {
    /// Sends `ping` to every connection and closes those silent for longer
    /// than `timeout_ms` (code 1000), those that left a frame or message
    /// unfinished for longer than `message_timeout_ms` (code 1008), and
    /// those whose token expired (4001, after what is queued).
    pub fn sweep(&self, ping: Option<&Bytes>, timeout_ms: u64, message_timeout_ms: u64) {
        let now = self.now_ms();
        for shard in self.shards.iter() {
            for local in shard.read().conns.values() {
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
                } else if let Some(ping) = ping {
                    let _ = local.outbox.push(ping.clone(), &self.limits);
                }
            }
        }
    }
}
