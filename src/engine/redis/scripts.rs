//! The Lua scripts that keep a node's partition consistent. Each touches
//! only the keys of one partition (one hash tag), so it runs atomically on
//! one slot, on a single Redis as on Redis Cluster.

use fred::types::scripts::Script;

/// Every script, loaded once per (re)connection.
#[derive(Debug)]
pub struct Scripts {
    /// Registers a connection with its uid, groups and session.
    pub add_client: Script,
    /// Forgets a connection.
    pub remove_client: Script,
    /// One membership change of a registered connection.
    pub membership: Script,
    /// Removes every member of a group from a partition.
    pub ungroup: Script,
    /// Deletes a partition (a dead node's, or one's own before re-registering).
    pub clear: Script,
    /// Refreshes a node's liveness key; tells whether it had expired.
    pub heartbeat: Script,
    /// Members of a set with one hash field each.
    pub members_with: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            add_client: Script::from_lua(include_str!("scripts/add_client.lua")),
            remove_client: Script::from_lua(include_str!("scripts/remove_client.lua")),
            membership: Script::from_lua(include_str!("scripts/membership.lua")),
            ungroup: Script::from_lua(include_str!("scripts/ungroup.lua")),
            clear: Script::from_lua(include_str!("scripts/clear.lua")),
            heartbeat: Script::from_lua(include_str!("scripts/heartbeat.lua")),
            members_with: Script::from_lua(include_str!("scripts/members_with.lua")),
        }
    }
}

impl Scripts {
    /// All scripts, for loading.
    pub fn all(&self) -> [&Script; 7] {
        [
            &self.add_client,
            &self.remove_client,
            &self.membership,
            &self.ungroup,
            &self.clear,
            &self.heartbeat,
            &self.members_with,
        ]
    }
}
