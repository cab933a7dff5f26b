//! The replay a resuming connection gets (docs/recovery.md section 2.2):
//! after the connection is registered with its membership, its live pushes
//! wait in its outbox (the writer has not started) while each stream's
//! history after the client's position is read; then the outbox is
//! rewritten in one locked step: welcome, replay, held pushes not already
//! replayed, `recovered`. A filter in the hub ([`Replays`]) drops live
//! pushes already replayed that arrive later (pub/sub lags behind the
//! read).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;

use super::framing::{self, Position, PositionRef};
use super::history::{
    group_stream, read_with_retry, uid_stream, HistoryRead, ALL_STREAM, TOP_ONLY,
};
use super::positions::Positions;
use crate::engine::{Engine, EngineResult};
use crate::ids::ClientId;
use crate::outbox::Outbox;

/// Most replays a node runs at once; more wait (bounded) for a turn.
pub const MAX_CONCURRENT_REPLAYS: usize = 256;

/// How long a replay waits for a turn before it answers "not recovered".
const REPLAY_TURN_WAIT: Duration = Duration::from_secs(10);

/// How long live pushes already replayed are filtered out after a replay:
/// pub/sub delivers what was published before the read well within it.
const FILTER_FOR: Duration = Duration::from_secs(30);

/// Replays running on this node, and what each must not get twice.
#[derive(Debug)]
pub struct Replays {
    /// Filters in the map: the fan-out looks only while some are.
    active: AtomicUsize,
    filters: RwLock<HashMap<ClientId, Vec<Position>>>,
    turns: tokio::sync::Semaphore,
}

impl Default for Replays {
    fn default() -> Self {
        Replays {
            active: AtomicUsize::new(0),
            filters: RwLock::new(HashMap::new()),
            turns: tokio::sync::Semaphore::new(MAX_CONCURRENT_REPLAYS),
        }
    }
}

impl Replays {
    /// Whether `id` may get the push at `position`: false for one its
    /// replay already gave (same stream and epoch, offset not above).
    pub fn admits(&self, id: &ClientId, position: PositionRef<'_>) -> bool {
        if self.active.load(Ordering::Acquire) == 0 {
            return true;
        }
        let filters = self.filters.read();
        let Some(filter) = filters.get(id) else {
            return true;
        };
        !filter.iter().any(|p| {
            p.stream == position.stream && p.epoch == position.epoch && position.offset <= p.offset
        })
    }

    fn set(&self, id: ClientId, filter: Vec<Position>) {
        let mut filters = self.filters.write();
        if filters.insert(id, filter).is_none() {
            self.active.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Forgets the filter of `id` (its replay ended long enough ago, or it
    /// left).
    pub fn clear(&self, id: ClientId) {
        if self.active.load(Ordering::Acquire) == 0 {
            return;
        }
        if self.filters.write().remove(&id).is_some() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The streams a connection with this uid and these groups is in.
fn member_streams(uid: Option<&str>, groups: &[String]) -> Vec<String> {
    let mut out = vec![ALL_STREAM.to_owned()];
    out.extend(uid.map(uid_stream));
    out.extend(groups.iter().map(|g| group_stream(g)));
    out
}

/// What a replay needs from the node.
pub struct ReplayContext<'a> {
    /// The engine that reads history.
    pub engine: &'a dyn Engine,
    /// The node's replays.
    pub replays: &'a Arc<Replays>,
    /// Most frames the replay may queue in all (`--client-queue`): a
    /// stream whose replay would not fit is not recovered.
    pub budget: usize,
    /// Most bytes the replay may queue in all (`--client-queue-bytes`).
    pub budget_bytes: usize,
}

/// Replays to the registered connection `id` what it missed after
/// `positions`, then its held live pushes, then (when `report`: it came
/// back, with a resume token or positions) `recovered`. Its uid and groups
/// are the membership it has now (from its token, or restored by a
/// resume). Every stream it is a member of that keeps history and that it
/// holds no good position in gets a `position` frame, so that it can name
/// the stream the next time; when it came back, such a stream is listed as
/// not recovered: it may have missed pushes there, and is told so.
pub async fn replay(
    cx: ReplayContext<'_>,
    id: ClientId,
    uid: Option<&str>,
    groups: &[String],
    outbox: &Outbox,
    positions: Positions,
    report: bool,
) {
    let members = member_streams(uid, groups);
    let unnamed: Vec<&String> = members
        .iter()
        .filter(|s| !positions.contains_key(*s))
        .collect();
    let wanted: Vec<(String, String, u64)> =
        positions.into_iter().map(|(s, (e, o))| (s, e, o)).collect();
    let filtered = !wanted.is_empty();
    if filtered {
        // Live pushes at or below the client's position are duplicates
        // from the start.
        cx.replays.set(
            id,
            wanted
                .iter()
                .filter(|(s, _, _)| members.contains(s))
                .map(|(s, e, o)| Position {
                    stream: s.clone(),
                    epoch: e.clone(),
                    offset: *o,
                })
                .collect(),
        );
    }
    let turn = tokio::time::timeout(REPLAY_TURN_WAIT, cx.replays.turns.acquire()).await;
    type Read = Option<EngineResult<HistoryRead>>;
    let (reads, tops): (Vec<Read>, Vec<Read>) = match &turn {
        Ok(Ok(_)) => {
            let members = &members;
            let reads = wanted.iter().map(|(s, _, o)| async move {
                if !members.contains(s) {
                    return None;
                }
                Some(read_with_retry(cx.engine, s, *o).await)
            });
            let tops = unnamed
                .iter()
                .map(|s| async move { Some(read_with_retry(cx.engine, s, TOP_ONLY).await) });
            futures_util::future::join(
                futures_util::future::join_all(reads),
                futures_util::future::join_all(tops),
            )
            .await
        }
        _ => {
            tracing::warn!(client_id = %id, "no replay turn in time: not recovered");
            (
                wanted.iter().map(|_| None).collect(),
                unnamed.iter().map(|_| None).collect(),
            )
        }
    };
    drop(turn);
    let mut budget = cx.budget;
    let mut budget_bytes = cx.budget_bytes;
    let mut replayed: Vec<Bytes> = Vec::new();
    let mut done: Vec<Position> = Vec::new();
    let mut outcome: Vec<(String, bool)> = Vec::new();
    // Where the connection stands in the streams it could not recover or
    // never named: sent after the replay, before the held pushes.
    let mut stands: Vec<Bytes> = Vec::new();
    let stand = |stream: &str, read: &HistoryRead| {
        read.epoch.as_deref().map(|epoch| {
            framing::position(PositionRef {
                stream,
                epoch,
                offset: read.top,
            })
        })
    };
    for ((stream, epoch, offset), read) in wanted.iter().zip(reads) {
        let read = match read {
            Some(Ok(read)) => read,
            Some(Err(e)) => {
                tracing::debug!(client_id = %id, %stream, error = %e, "history not read");
                outcome.push((stream.clone(), false));
                continue;
            }
            None => {
                outcome.push((stream.clone(), false));
                continue;
            }
        };
        let replay = read.replay_after(epoch, *offset).filter(|entries| {
            let bytes: usize = entries.iter().map(|e| e.message.data.len() + 64).sum();
            entries.len() <= budget && bytes <= budget_bytes
        });
        match replay {
            Some(entries) => {
                budget -= entries.len();
                budget_bytes -= entries
                    .iter()
                    .map(|e| e.message.data.len() + 64)
                    .sum::<usize>();
                for e in entries {
                    let position = PositionRef {
                        stream,
                        epoch,
                        offset: e.offset,
                    };
                    replayed.push(framing::encode(
                        e.message.binary,
                        Some(position),
                        &e.message.data,
                    ));
                }
                done.push(Position {
                    stream: stream.clone(),
                    epoch: epoch.clone(),
                    offset: read.top,
                });
                outcome.push((stream.clone(), true));
            }
            None => {
                stands.extend(stand(stream, &read));
                outcome.push((stream.clone(), false));
            }
        }
    }
    for (stream, top) in unnamed.into_iter().zip(tops) {
        match top {
            Some(Ok(read)) => {
                let Some(frame) = stand(stream, &read) else {
                    // No history: nothing kept can have been missed.
                    continue;
                };
                stands.push(frame);
                outcome.push((stream.clone(), false));
            }
            Some(Err(e)) => {
                tracing::debug!(client_id = %id, %stream, error = %e, "history top not read");
                outcome.push((stream.clone(), false));
            }
            None => outcome.push((stream.clone(), false)),
        }
    }
    if !filtered && stands.is_empty() && !report {
        // A new connection in no stream that keeps history.
        return;
    }
    let recovered = report.then(|| framing::recovered(&outcome));
    outbox.rewrite(|queue| {
        // From now on live pushes up to each replayed top are dropped on
        // their way in; those already held are dropped below. Under the
        // outbox's lock, where the fan-out checks it (Outbox::push_if): a
        // push checked against the old filter cannot land after this.
        if filtered {
            cx.replays.set(id, done.clone());
        }
        let held = std::mem::take(queue);
        // Control frames queued before the first held push (the welcome)
        // stay first.
        let first_push = held
            .iter()
            .position(|f| framing::is_push_frame(f))
            .unwrap_or(held.len());
        let mut held = held.into_iter();
        queue.extend(held.by_ref().take(first_push));
        queue.extend(replayed);
        queue.extend(stands);
        queue.extend(held.filter(|frame| {
            match framing::position_of_frame(frame) {
                Some(p) => !done
                    .iter()
                    .any(|d| d.stream == p.stream && d.epoch == p.epoch && p.offset <= d.offset),
                None => true,
            }
        }));
        queue.extend(recovered);
    });
    if !filtered {
        return;
    }
    let replays = cx.replays.clone();
    tokio::spawn(async move {
        tokio::time::sleep(FILTER_FOR).await;
        replays.clear(id);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_filter_drops_only_what_was_replayed_and_is_cleared() {
        use crate::ids::{IdMinter, NodeId};
        let minter = IdMinter::new(NodeId::new(std::net::Ipv4Addr::LOCALHOST, 1));
        let (id, other) = (minter.mint(), minter.mint());
        let replays = Replays::default();
        let at = |s: &'static str, e: &'static str, o| PositionRef {
            stream: s,
            epoch: e,
            offset: o,
        };
        assert!(replays.admits(&id, at("u:a", "e", 1)));
        replays.set(
            id,
            vec![Position {
                stream: "u:a".into(),
                epoch: "e".into(),
                offset: 5,
            }],
        );
        assert!(!replays.admits(&id, at("u:a", "e", 5)));
        assert!(replays.admits(&id, at("u:a", "e", 6)));
        assert!(replays.admits(&id, at("u:a", "f", 2)));
        assert!(replays.admits(&id, at("g:a", "e", 2)));
        assert!(replays.admits(&other, at("u:a", "e", 2)));
        replays.clear(id);
        assert!(replays.admits(&id, at("u:a", "e", 2)));
        assert_eq!(replays.active.load(Ordering::Acquire), 0);
    }
}
