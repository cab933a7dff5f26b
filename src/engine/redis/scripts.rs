//! The Lua scripts that keep a node's partition consistent. Each touches
//! only the keys of one partition (one hash tag), so it runs atomically on
//! one slot, on a single Redis as on Redis Cluster. They derive the keys
//! from the partition with the suffixes of [`super::keys::suffix`].

use fred::types::scripts::Script;

/// Every script, loaded once per (re)connection.
#[derive(Debug)]
pub struct Scripts {
    /// Rewrites connections from the node's memory (or removes them).
    pub put_clients: Script,
    /// Deletes a partition (a dead node's, or one's own when leaving).
    pub clear: Script,
    /// Refreshes a node's liveness key; tells whether it had expired or
    /// belongs to another instance.
    pub heartbeat: Script,
    /// Members of a set with one hash field each.
    pub members_with: Script,
    /// The size of a union of sets.
    pub count_union: Script,
}

const PUT_CLIENTS: &str = include_str!("scripts/put_clients.lua");
const CLEAR: &str = include_str!("scripts/clear.lua");
const HEARTBEAT: &str = include_str!("scripts/heartbeat.lua");
const MEMBERS_WITH: &str = include_str!("scripts/members_with.lua");
const COUNT_UNION: &str = include_str!("scripts/count_union.lua");

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            put_clients: Script::from_lua(PUT_CLIENTS),
            clear: Script::from_lua(CLEAR),
            heartbeat: Script::from_lua(HEARTBEAT),
            members_with: Script::from_lua(MEMBERS_WITH),
            count_union: Script::from_lua(COUNT_UNION),
        }
    }
}

impl Scripts {
    /// All scripts, for loading.
    pub fn all(&self) -> [&Script; 5] {
        [
            &self.put_clients,
            &self.clear,
            &self.heartbeat,
            &self.members_with,
            &self.count_union,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::suffix;
    use super::*;

    /// The scripts name keys as `p .. ':suffix'`: each suffix must be one
    /// the Rust side (and the emitter crate) knows.
    #[test]
    fn scripts_use_only_the_documented_key_suffixes() {
        for source in [PUT_CLIENTS, CLEAR, HEARTBEAT, MEMBERS_WITH, COUNT_UNION] {
            for (pos, _) in source.match_indices(" .. '") {
                let rest = &source[pos + 5..];
                let literal = &rest[..rest.find('\'').unwrap()];
                assert!(
                    suffix::ALL.contains(&literal),
                    "unknown key suffix {literal:?} in a script"
                );
            }
        }
    }
}
