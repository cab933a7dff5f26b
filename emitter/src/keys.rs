//! Every Redis key and channel name gatecast uses, in one place.
//!
//! State is partitioned by node: each node writes only the keys of its own
//! connections, all under the hash tag `{<node id>}`, so that every
//! membership change is one atomic script on one slot, even on Redis
//! Cluster, and a dead node's state is removed by one script. Channels are
//! global: one per node, per group, per uid, and one for everyone.

use crate::ids::NodeId;

/// The keys of one partition: the partition name followed by one of these.
/// The Lua scripts derive the same keys from the partition they are given
/// (`KEYS[1] .. ':clients'`); a test checks they use no other suffix.
pub mod suffix {
    /// String with TTL: the node's liveness and info (JSON).
    pub const ALIVE: &str = ":alive";
    /// Hash client_id -> session (JSON text).
    pub const CLIENTS: &str = ":clients";
    /// Hash client_id -> uid.
    pub const UID: &str = ":uid";
    /// Hash client_id -> its groups (JSON array), so a rewrite knows what
    /// to remove.
    pub const CLIENT_GROUPS: &str = ":cg";
    /// Set of the uids bound on the node.
    pub const UIDS: &str = ":uids";
    /// Set of the groups with members on the node.
    pub const GROUPS: &str = ":groups";
    /// Followed by a uid: set of the client_ids bound to it.
    pub const UID_MEMBERS: &str = ":u:";
    /// Followed by a group: set of its client_ids.
    pub const GROUP_MEMBERS: &str = ":g:";
    /// Hash client_id -> resume record id, for connections that opted in
    /// to recovery (`''` once its record was consumed).
    pub const RESUME_IDS: &str = ":rs";
    /// Followed by a record id: hash of one resume record (`d` digest of
    /// the token's secret, `c` client_id, `u` uid, `g` groups as a JSON
    /// array, `s` session JSON; `used` once consumed). No TTL while the
    /// connection lives; `--resume-window` after it is gone.
    pub const RESUME_RECORD: &str = ":r:";
    /// Every suffix, for checks.
    pub const ALL: [&str; 10] = [
        ALIVE,
        CLIENTS,
        UID,
        CLIENT_GROUPS,
        UIDS,
        GROUPS,
        UID_MEMBERS,
        GROUP_MEMBERS,
        RESUME_IDS,
        RESUME_RECORD,
    ];
}

/// Key and channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Names under `prefix` (default `gatecast`).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix of every name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The partition of `node`: `<prefix>:{<node>}`. Scripts take it as
    /// `KEYS[1]` and derive the partition's keys from it (same hash tag, so
    /// same slot):
    ///
    /// - `…:alive` string, TTL 2 heartbeats: the node's liveness and info;
    /// - `…:clients` hash client_id → session (JSON text);
    /// - `…:uid` hash client_id → uid;
    /// - `…:cg` hash client_id → its groups (JSON array);
    /// - `…:u:<uid>` set of client_ids bound to uid;
    /// - `…:uids` set of uids bound on the node;
    /// - `…:g:<group>` set of client_ids in group;
    /// - `…:groups` set of groups with members on the node.
    ///
    /// See [`suffix`].
    pub fn partition(&self, node: NodeId) -> String {
        format!("{}:{{{node}}}", self.prefix)
    }

    /// A key of `node`'s partition: `suffix` is one of [`suffix`]'s, followed
    /// by a uid or group for the member sets.
    pub fn partition_key(&self, node: NodeId, suffix: &str, name: &str) -> String {
        format!("{}:{{{node}}}{suffix}{name}", self.prefix)
    }

    /// The node a partition key belongs to (`<prefix>:{<node>}…`).
    pub fn partition_node(&self, key: &str) -> Option<NodeId> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(":{")?;
        let (node, _) = rest.split_once('}')?;
        node.parse().ok()
    }

    /// The set of registered node ids.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// Counter incremented at every change of the node set (a node
    /// registering, leaving, purged): nodes read the set again only when
    /// it moved.
    pub fn nodes_version(&self) -> String {
        format!("{}:nodes:v", self.prefix)
    }

    /// Lease of the node running the current purge round (its instance
    /// id, for less than half a heartbeat).
    pub fn purge_lease(&self) -> String {
        format!("{}:purge", self.prefix)
    }

    /// Lease of the node that last swept for orphaned partitions (its
    /// instance id, for ten heartbeats).
    pub fn sweep_lease(&self) -> String {
        format!("{}:sweep", self.prefix)
    }

    /// Hash of every node's load (connection count, readiness, when), one
    /// field per node id, for rebalancing.
    pub fn load(&self) -> String {
        format!("{}:load", self.prefix)
    }

    /// Hash of every node's stats record for the dashboard, one field per
    /// node id (docs/dashboard.md).
    pub fn stats(&self) -> String {
        format!("{}:stats", self.prefix)
    }

    /// Hash of evacuation requests from the dashboard, one field per node
    /// id asked to evacuate (value: the rate, or empty for the node's
    /// default); the node takes and deletes its field with its next stats
    /// record.
    pub fn evacuate_requests(&self) -> String {
        format!("{}:evacuate", self.prefix)
    }

    /// Channel of one node: pushes to its clients and commands for it.
    pub fn node_channel(&self, node: NodeId) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// Channel of one node's replies: answers to the commands it sent,
    /// read on a connection of their own so they never wait behind pushes
    /// on [`Keys::node_channel`] (nothing on it has an order with pushes).
    pub fn reply_channel(&self, node: NodeId) -> String {
        format!("{}:node:{node}:reply", self.prefix)
    }

    /// Channel of a group, subscribed by nodes that hold a member.
    pub fn group_channel(&self, group: &str) -> String {
        format!("{}:group:{group}", self.prefix)
    }

    /// Channel of a uid, subscribed by nodes that hold a connection bound
    /// to it.
    pub fn uid_channel(&self, uid: &str) -> String {
        format!("{}:uid:{uid}", self.prefix)
    }

    /// Channel every node subscribes to: send_to_all.
    pub fn all_channel(&self) -> String {
        format!("{}:all", self.prefix)
    }

    /// What a received channel name addresses.
    pub fn parse_channel<'a>(&self, channel: &'a str) -> Option<Channel<'a>> {
        let rest = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?;
        if rest == "all" {
            return Some(Channel::All);
        }
        if let Some(group) = rest.strip_prefix("group:") {
            return Some(Channel::Group(group));
        }
        if let Some(uid) = rest.strip_prefix("uid:") {
            return Some(Channel::Uid(uid));
        }
        let node = rest.strip_prefix("node:")?;
        if let Some(n) = node.strip_suffix(":reply") {
            return n.parse().ok().map(Channel::Reply);
        }
        node.parse().ok().map(Channel::Node)
    }
}

/// A channel gatecast listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel<'a> {
    /// Everyone.
    All,
    /// A node.
    Node(NodeId),
    /// A node's replies.
    Reply(NodeId),
    /// A group.
    Group(&'a str),
    /// A uid.
    Uid(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn channels_round_trip() {
        let keys = Keys::new("gc");
        let node = NodeId::new(Ipv4Addr::new(10, 1, 2, 3), 2900);
        assert_eq!(keys.partition(node), "gc:{0a0102030b54}");
        let key = keys.partition_key(node, suffix::GROUP_MEMBERS, "room");
        assert_eq!(key, "gc:{0a0102030b54}:g:room");
        assert_eq!(keys.partition_node(&key), Some(node));
        assert_eq!(keys.partition_node("gc:nodes"), None);
        assert_eq!(
            keys.parse_channel(&keys.node_channel(node)),
            Some(Channel::Node(node))
        );
        assert_eq!(
            keys.parse_channel("gc:group:a:b"),
            Some(Channel::Group("a:b"))
        );
        assert_eq!(keys.parse_channel("gc:uid:42"), Some(Channel::Uid("42")));
        assert_eq!(keys.parse_channel("gc:all"), Some(Channel::All));
        assert_eq!(keys.parse_channel("other:all"), None);
        assert_eq!(keys.parse_channel("gc:node:zz"), None);
        assert_eq!(keys.reply_channel(node), "gc:node:0a0102030b54:reply");
        assert_eq!(
            keys.parse_channel(&keys.reply_channel(node)),
            Some(Channel::Reply(node))
        );
        assert_eq!(keys.parse_channel("gc:node:zz:reply"), None);
    }
}
