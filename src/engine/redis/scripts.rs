//! The Lua scripts that keep a node's partition consistent. Each touches
//! only the keys of one partition (one hash tag), so it runs atomically on
//! one slot, on a single Redis as on Redis Cluster. They derive the keys
//! from the partition with the suffixes of [`super::keys::suffix`].
//! Presence is the exception: on a single Redis its counters (outside the
//! partitions) are written by the partition scripts themselves; on Redis
//! Cluster they are written only by `presence_hold.lua`, whose keys share
//! one hash tag of their own (`scripts/presence.lua` says more).

use fred::clients::Client;
use fred::error::Error;
use fred::types::scripts::Script;
use fred::types::{FromValue, MultipleKeys, MultipleValues};

use super::client::{migrating, MIGRATION_RETRY, MIGRATION_WAIT};

/// One script, run by its hash.
#[derive(Debug)]
pub struct Lua {
    script: Script,
}

impl Lua {
    fn new(source: &str) -> Lua {
        Lua {
            script: Script::from_lua(source),
        }
    }

    /// Loads the script on every server.
    pub async fn load(&self, client: &Client) -> Result<(), Error> {
        self.script.load(client).await
    }

    /// Runs the script (EVALSHA). If Redis does not know it (`NOSCRIPT`:
    /// `SCRIPT FLUSH`, or a restart or failover the node did not notice as
    /// one), loads it and runs it again, so a flushed script cache costs
    /// one round trip instead of every write and heartbeat failing until
    /// the next reconnection.
    pub async fn run<R, K, V>(&self, client: &Client, keys: K, args: V) -> Result<R, Error>
    where
        R: FromValue,
        K: Into<MultipleKeys> + Send,
        V: TryInto<MultipleValues> + Send,
        V::Error: Into<Error> + Send,
    {
        let keys: MultipleKeys = keys.into();
        let args: MultipleValues = args.try_into().map_err(Into::into)?;
        // A slot being migrated (a reshard): the script did not run; sent
        // again until the keys are on one master, within MIGRATION_WAIT.
        let started = std::time::Instant::now();
        loop {
            match self.once(client, keys.clone(), args.clone()).await {
                Err(e) if migrating(&e) && started.elapsed() < MIGRATION_WAIT => {
                    tracing::debug!(error = %e, "slot being migrated: running the script again");
                    tokio::time::sleep(MIGRATION_RETRY).await;
                }
                result => return result,
            }
        }
    }

    /// One run (and one more after loading it, on `NOSCRIPT`).
    async fn once<R: FromValue>(
        &self,
        client: &Client,
        keys: MultipleKeys,
        args: MultipleValues,
    ) -> Result<R, Error> {
        match self
            .script
            .evalsha(client, keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                tracing::warn!(
                    "redis had lost a script of gatecast (SCRIPT FLUSH?): loading it again"
                );
                self.load(client).await?;
                self.script.evalsha(client, keys, args).await
            }
            result => result,
        }
    }
}

/// Every script, loaded once per (re)connection.
#[derive(Debug)]
pub struct Scripts {
    /// Rewrites connections from the node's memory (or removes them).
    pub put_clients: Lua,
    /// Deletes a partition (a dead node's, or one's own when leaving).
    pub clear: Lua,
    /// Refreshes a node's liveness key; tells whether it had expired or
    /// belongs to another instance.
    pub heartbeat: Lua,
    /// Members of a set with one hash field each.
    pub members_with: Lua,
    /// Consumes a resume record.
    pub take_resume: Lua,
    /// Announces the offline / vacated transitions whose grace is over.
    pub presence_due: Lua,
    /// Presence on Redis Cluster: the names each instance holds.
    pub presence_hold: Lua,
}

// The presence counters' functions come first in the scripts that write
// partitions (they do nothing with presence events off).
const PUT_CLIENTS: &str = concat!(
    include_str!("scripts/presence.lua"),
    include_str!("scripts/put_clients.lua")
);
const CLEAR: &str = concat!(
    include_str!("scripts/presence.lua"),
    include_str!("scripts/clear.lua")
);
const PRESENCE_DUE: &str = concat!(
    include_str!("scripts/presence.lua"),
    include_str!("scripts/presence_due.lua")
);
const PRESENCE_HOLD: &str = concat!(
    include_str!("scripts/presence.lua"),
    include_str!("scripts/presence_hold.lua")
);
const HEARTBEAT: &str = include_str!("scripts/heartbeat.lua");
const MEMBERS_WITH: &str = include_str!("scripts/members_with.lua");
const TAKE_RESUME: &str = include_str!("scripts/take_resume.lua");

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            put_clients: Lua::new(PUT_CLIENTS),
            clear: Lua::new(CLEAR),
            heartbeat: Lua::new(HEARTBEAT),
            members_with: Lua::new(MEMBERS_WITH),
            take_resume: Lua::new(TAKE_RESUME),
            presence_due: Lua::new(PRESENCE_DUE),
            presence_hold: Lua::new(PRESENCE_HOLD),
        }
    }
}

impl Scripts {
    /// All scripts, for loading.
    pub fn all(&self) -> [&Lua; 7] {
        [
            &self.presence_due,
            &self.presence_hold,
            &self.put_clients,
            &self.clear,
            &self.heartbeat,
            &self.members_with,
            &self.take_resume,
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
        for source in [
            PUT_CLIENTS,
            CLEAR,
            HEARTBEAT,
            MEMBERS_WITH,
            TAKE_RESUME,
            PRESENCE_DUE,
            PRESENCE_HOLD,
        ] {
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
