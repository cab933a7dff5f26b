//! Autoscaling without storms or hot pods (SPEC section 9): node-wide
//! admission control of handshakes, server-chosen reconnect delays on
//! every operational close, evacuation of a node without stopping it, and
//! rebalancing of connections after a scale-out.

pub mod admission;
pub mod evacuate;
pub mod metrics;
pub mod rebalance;
pub mod reconnect;

use std::sync::Arc;

use crate::config::Config;

/// The node's autoscaling state, shared by the handshake, the API and the
/// background tasks.
#[derive(Debug)]
pub struct Autoscale {
    /// The node-wide handshake rate and its ramp.
    pub admission: admission::HandshakeRate,
    /// `POST /api/evacuate`.
    pub evacuation: Arc<evacuate::Evacuation>,
}

impl Autoscale {
    /// The state the options ask for.
    pub fn from_config(config: &Config) -> Self {
        Autoscale {
            admission: admission::HandshakeRate::new(config.handshake_rate, config.handshake_ramp),
            evacuation: Arc::new(evacuate::Evacuation::default()),
        }
    }
}
