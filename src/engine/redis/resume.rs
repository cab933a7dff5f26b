//! Resume records in Redis (docs/recovery.md section 2.1, docs/redis.md).
//!
//! A record lives in the partition of the node its connection was on
//! (`<prefix>:{<node>}:r:<record id>`), so the partition's own scripts
//! write it with the connection (`put_clients`), expire it when the
//! connection is gone and when the node leaves or is purged (`clear`),
//! all on one Cluster slot and with no round trip of its own. Consuming
//! one is the `take_resume` script: one round trip, atomic, single use.
//!
//! A node cut off from Redis closes its opted-in connections so they
//! resume on a node that works: see `lost`.

use std::time::Duration;

use super::client::unavailable;
use super::Shared;
use crate::engine::{EngineError, EngineResult};
use crate::hub::Membership;
use crate::recovery::resume::{Refusal, Restored, Taken, Token, UidCheck};
use crate::session::Session;

/// Resumes asking Redis at once, per node. When a node dies its clients
/// come back all at once: past this they wait here, in order, instead of
/// queueing thousands of scripts on the node's Redis connection, where each
/// would wait behind the others past the command timeout (and a consume
/// that ran but whose answer came too late would spend the token for
/// nothing).
pub const IN_FLIGHT: usize = 64;

/// Longest a resume waits for its turn before the client is told to come
/// back later (503, the token kept).
const QUEUE_WAIT: Duration = Duration::from_secs(5);

impl Shared {
    /// Consumes the record `token` names (see `take_resume.lua`).
    pub(super) async fn take_resume(
        &self,
        token: &Token,
        check: UidCheck<'_>,
    ) -> EngineResult<Taken> {
        self.check()?;
        let _turn = tokio::time::timeout(QUEUE_WAIT, self.resumes.acquire())
            .await
            .map_err(|_| EngineError::Unavailable("too many resumes at once".into()))?
            .map_err(|_| EngineError::Unavailable("the node is stopping".into()))?;
        let key = token.key();
        let (must, uid) = match check {
            Some(sub) => ("1", sub),
            None => ("0", ""),
        };
        let args = vec![
            key.record,
            key.digest,
            self.resume_window_ms(),
            must.to_owned(),
            uid.to_owned(),
            // This attempt: asked again with it, the script answers again.
            format!("{:016x}", rand::random::<u64>()),
        ];
        let partition = self.keys.partition(token.node());
        let run = || {
            self.scripts.take_resume.run::<Vec<String>, _, _>(
                &self.redis.client,
                partition.clone(),
                args.clone(),
            )
        };
        // Once more after a failure: the first may have run and only its
        // answer been lost (a timeout), and the record is then spent.
        let reply = match run().await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(error = %e, "resume lookup failed: asking once more");
                run().await.map_err(unavailable)?
            }
        };
        Ok(match reply.first().map(String::as_str) {
            Some("ok") => restored(&reply).ok_or_else(|| {
                tracing::warn!("a resume record in redis is malformed: not restored");
                Refusal::Unknown
            }),
            Some("used") => Err(Refusal::Used),
            Some("forged") => Err(Refusal::Forged),
            Some("sub_mismatch") => Err(Refusal::SubMismatch),
            _ => Err(Refusal::Unknown),
        })
    }
}

/// The membership in a consumed record: `ok`, client_id, uid, groups JSON,
/// session JSON.
fn restored(reply: &[String]) -> Option<Restored> {
    let [_, id, uid, groups, session] = reply else {
        return None;
    };
    let groups: Vec<String> = serde_json::from_str(groups).ok()?;
    let session: Session = serde_json::from_str(session).ok()?;
    Some(Restored {
        old_client_id: id.parse().ok()?,
        membership: Membership {
            uid: (!uid.is_empty()).then(|| uid.clone()),
            groups,
            session,
        },
    })
}
