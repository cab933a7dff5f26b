//! Server-chosen reconnect delays. Every close the server starts for an
//! operational reason says when to come back, as compact JSON in the close
//! frame's reason: `{"reason":"drain","retry_ms":1834}`, with code 1001
//! (going away) for drain, evacuation and rebalancing and 1013 (try again
//! later) for overload. The delay is picked per client at random within a
//! window, so the clients a node lets go come back spread over it instead
//! of in one herd. docs/api.md documents it for client authors.

use std::time::Duration;

use rand::Rng;

use crate::frame::close_code;

/// Why the server closes a connection it would rather keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operational {
    /// SIGTERM/SIGINT: the node is going away.
    Drain,
    /// `POST /api/evacuate`: the node empties itself without stopping.
    Evacuate,
    /// The node holds more than its share of the cluster's connections.
    Rebalance,
    /// The node cannot serve this connection now.
    Overload,
}

impl Operational {
    /// The word in the close reason.
    pub fn name(self) -> &'static str {
        match self {
            Operational::Drain => "drain",
            Operational::Evacuate => "evacuate",
            Operational::Rebalance => "rebalance",
            Operational::Overload => "overload",
        }
    }

    /// The close code: 1013 for overload, 1001 for the rest.
    pub fn code(self) -> u16 {
        match self {
            Operational::Overload => close_code::TRY_AGAIN_LATER,
            _ => close_code::GOING_AWAY,
        }
    }

    /// The close reason telling the client to wait `retry_ms`.
    pub fn reason(self, retry_ms: u64) -> String {
        // Always far below the 123 bytes a close reason may hold.
        format!(r#"{{"reason":"{}","retry_ms":{retry_ms}}}"#, self.name())
    }
}

/// A delay picked uniformly within `window` (milliseconds): each client
/// its own, so a herd comes back spread over the window.
pub fn pick_retry_ms(window: Duration) -> u64 {
    let max = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    if max == 0 {
        return 0;
    }
    rand::rng().random_range(0..=max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_compact_json_that_fits_a_close_frame() {
        for kind in [
            Operational::Drain,
            Operational::Evacuate,
            Operational::Rebalance,
            Operational::Overload,
        ] {
            let reason = kind.reason(u64::MAX);
            assert!(reason.len() <= 123, "{reason}");
            let v: serde_json::Value = serde_json::from_str(&reason).unwrap();
            assert_eq!(v["reason"], kind.name());
            assert_eq!(v["retry_ms"], u64::MAX);
        }
        assert_eq!(Operational::Overload.code(), 1013);
        assert_eq!(Operational::Rebalance.code(), 1001);
    }

    #[test]
    fn delays_stay_within_the_window_and_spread_over_it() {
        let window = Duration::from_millis(1000);
        let picks: Vec<u64> = (0..2000).map(|_| pick_retry_ms(window)).collect();
        assert!(picks.iter().all(|&p| p <= 1000));
        // Both halves of the window get some (not one herd).
        assert!(picks.iter().any(|&p| p < 500) && picks.iter().any(|&p| p > 500));
        assert_eq!(pick_retry_ms(Duration::ZERO), 0);
    }
}
