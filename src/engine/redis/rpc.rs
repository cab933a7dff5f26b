//! Commands to the node that owns a connection, and their replies.
//!
//! A membership change for another node's connection is published on that
//! node's channel with a request number and this node's id; the owner
//! applies it, mirrors it, then publishes a reply on this node's reply
//! channel (`<prefix>:node:<id>:reply`), which this node reads on a
//! connection of its own and handles before any push: a reply never waits
//! behind a flood of pushes to this node. Owners batch replies to one node
//! (`reqs`). A command says it wants that (`reply_channel`); an owner older
//! than the reply channel ignores the flag and replies on the node channel,
//! which this node still reads (a rolling upgrade works both ways).
//! `ungroup` goes on the group's channel and is answered by every node
//! that holds a member.
//!
//! Request numbers are random, not sequential: a reply is matched by its
//! number alone, so a guessable one would let anyone who can publish on
//! this node's channel answer for the owner (see docs/security.md; whoever
//! can publish on the prefix is trusted anyway, this only stops the
//! cheapest forgery).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::client::unavailable;
use super::envelope::{Envelope, Op};
use super::Shared;
use crate::engine::{EngineError, EngineResult};
use crate::ids::NodeId;

/// Longest a node waits for other nodes to apply a command.
const RPC_TIMEOUT: Duration = Duration::from_millis(1200);

/// Commands sent, waiting for replies.
#[derive(Default)]
pub struct Rpc {
    pending: Mutex<HashMap<u64, mpsc::Sender<Option<String>>>>,
}

impl Rpc {
    /// Hands a reply to the command waiting for it (if it still waits).
    pub fn resolve(&self, req: u64, error: Option<&str>) {
        if let Some(waiter) = self.pending.lock().get(&req) {
            let _ = waiter.try_send(error.map(str::to_owned));
        }
    }

    fn open(&self, replies: usize) -> (Pending<'_>, mpsc::Receiver<Option<String>>) {
        let (tx, rx) = mpsc::channel(replies.max(1));
        let mut pending = self.pending.lock();
        // Unique among the commands waiting (a clash is a one in 2^64
        // event per pair, but costs nothing to rule out).
        let req = loop {
            let req = rand::random::<u64>();
            if let std::collections::hash_map::Entry::Vacant(slot) = pending.entry(req) {
                slot.insert(tx);
                break req;
            }
        };
        drop(pending);
        (Pending { rpc: self, req }, rx)
    }
}

/// Forgets a command's waiter when the call ends or is dropped (the API
/// deadline included).
struct Pending<'a> {
    rpc: &'a Rpc,
    req: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.rpc.pending.lock().remove(&self.req);
    }
}

/// A reply to command `req`, as every version reads it (on a node
/// channel).
pub fn reply(req: u64, error: Option<String>) -> Bytes {
    let mut e = Envelope::new(Op::Reply);
    e.req = Some(req);
    e.error = error;
    e.encode()
}

/// One reply to several commands (on a reply channel).
pub fn replies(reqs: &[u64], error: Option<String>) -> Bytes {
    let mut e = Envelope::new(Op::Reply);
    e.reqs = reqs.to_vec();
    e.error = error;
    e.encode()
}

impl Shared {
    /// Runs a command on `node` and waits for its reply. A node that is
    /// gone took its connections with it: the command is then a no-op.
    pub(super) async fn rpc(&self, node: NodeId, mut e: Envelope) -> EngineResult<()> {
        let (pending, mut rx) = self.rpc.open(1);
        e.req = Some(pending.req);
        e.reply_to = Some(self.node_name.clone());
        e.reply_channel = true;
        let receivers = self
            .publish_one(self.keys.node_channel(node), e.encode())
            .await?;
        let reply = if receivers > 0 {
            tokio::time::timeout(RPC_TIMEOUT, rx.recv())
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        match reply {
            Some(None) => Ok(()),
            Some(Some(error)) => Err(EngineError::Unavailable(error)),
            None if self.node_alive(node).await? => {
                // Alive but not listening or not answering (its subscriber
                // may be reconnecting): the change may not be applied.
                Err(EngineError::Unavailable(format!(
                    "node {node} did not answer"
                )))
            }
            None => Ok(()),
        }
    }

    /// Publishes a command on `channel` and waits for a reply from every
    /// node that received it.
    pub(super) async fn rpc_all(&self, channel: String, mut e: Envelope) -> EngineResult<()> {
        // Each node has one subscriber connection: receivers are nodes.
        let (pending, mut rx) = self.rpc.open(1024);
        e.req = Some(pending.req);
        e.reply_to = Some(self.node_name.clone());
        e.reply_channel = true;
        let receivers = self.publish_one(channel, e.encode()).await?;
        let mut answered = 0;
        let deadline = tokio::time::Instant::now() + RPC_TIMEOUT;
        while answered < receivers {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(None)) => answered += 1,
                Ok(Some(Some(error))) => return Err(EngineError::Unavailable(error)),
                Ok(None) | Err(_) => {
                    return Err(EngineError::Unavailable(format!(
                        "{} of {receivers} nodes did not answer",
                        receivers - answered
                    )))
                }
            }
        }
        Ok(())
    }

    async fn node_alive(&self, node: NodeId) -> EngineResult<bool> {
        let key = self
            .keys
            .partition_key(node, super::keys::suffix::ALIVE, "");
        let n: i64 = self.redis.client.exists(key).await.map_err(unavailable)?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_unique_and_not_sequential() {
        let rpc = Rpc::default();
        let open: Vec<_> = (0..64).map(|_| rpc.open(1)).collect();
        let mut reqs: Vec<u64> = open.iter().map(|(p, _)| p.req).collect();
        let sequential = reqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
        assert!(!sequential, "{reqs:?}");
        reqs.sort_unstable();
        reqs.dedup();
        assert_eq!(reqs.len(), 64);
        assert_eq!(rpc.pending.lock().len(), 64);
        drop(open);
        assert!(rpc.pending.lock().is_empty());
    }
}
