//! Identifiers. [`ClientId`] and [`NodeId`] are defined in the
//! `gatecast-emitter` crate (backends parse them too); minting lives here.

use std::sync::atomic::{AtomicU32, Ordering};

pub use gatecast_emitter::ids::{ClientId, InvalidId, NodeId};

/// Mints client_ids for this node.
///
/// The counter starts at a random value on each process start, so a restarted
/// node does not hand out the ids of its previous life.
pub struct IdMinter {
    node: NodeId,
    next: AtomicU32,
}

impl IdMinter {
    /// A minter for `node` starting at a random connection number.
    pub fn new(node: NodeId) -> Self {
        IdMinter {
            node,
            next: AtomicU32::new(rand::random()),
        }
    }

    /// The node this minter mints for.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// A fresh client_id.
    pub fn mint(&self) -> ClientId {
        ClientId::new(self.node, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn minter_hands_out_distinct_ids_on_its_node() {
        let node = NodeId::new(Ipv4Addr::LOCALHOST, 1);
        let minter = IdMinter::new(node);
        let (a, b) = (minter.mint(), minter.mint());
        assert_ne!(a, b);
        assert_eq!(a.node(), node);
    }
}
