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

    /// A fresh client_id that `in_use` does not claim. The counter wraps
    /// after 2^32 connections: an id still held by a live connection (a
    /// page open for days while others churn) is skipped, never handed to
    /// a second connection, which would receive the first one's pushes.
    /// Ends: fewer connections are live than there are numbers.
    pub fn mint_unused(&self, in_use: impl Fn(ClientId) -> bool) -> ClientId {
        loop {
            let id = self.mint();
            if !in_use(id) {
                return id;
            }
        }
    }

    /// A minter whose next connection number is `next` (tests of the
    /// wrap-around).
    #[cfg(test)]
    fn starting_at(node: NodeId, next: u32) -> Self {
        IdMinter {
            node,
            next: AtomicU32::new(next),
        }
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

    #[test]
    fn after_wrapping_around_a_live_id_is_skipped() {
        let node = NodeId::new(Ipv4Addr::LOCALHOST, 1);
        let minter = IdMinter::starting_at(node, u32::MAX);
        let live = ClientId::new(node, 0);
        let ids = [
            minter.mint_unused(|id| id == live),
            minter.mint_unused(|id| id == live),
        ];
        // u32::MAX, then 0 is live (skipped), then 1.
        assert_eq!(ids, [ClientId::new(node, u32::MAX), ClientId::new(node, 1)]);
    }
}
