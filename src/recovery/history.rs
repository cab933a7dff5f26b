//! The bounded history of pushes per stream, and the replay a resuming
//! connection gets (docs/recovery.md section 2.2).
//!
//! - Which pushes are kept: [`HistorySettings::keeps`] (`--history-streams`
//!   prefixes, overridden per push by the API's `history` field).
//! - Where: the engine (in process for the memory engine, [`MemoryHistory`];
//!   a LIST and a meta HASH per stream in Redis, appended and published by
//!   one Redis Function call).
//! - Replay ([`replay`]): after the connection is registered with its
//!   membership, its live pushes wait in its outbox (the writer has not
//!   started) while each stream's history after the client's position is
//!   read; then the outbox is rewritten in one locked step: welcome,
//!   replay, held pushes not already replayed, `recovered`. A filter in the
//!   hub ([`Replays`]) drops live pushes already replayed that arrive later
//!   (pub/sub lags behind the read).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::framing::{self, Position, PositionRef};
use super::positions::Positions;
use crate::engine::{Engine, EngineResult};
use crate::ids::ClientId;
use crate::outbox::Outbox;
use crate::push::{Message, Push, Target};

/// `--history-size`, `--history-ttl`, `--history-streams`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySettings {
    /// Entries kept per stream.
    pub size: usize,
    /// How long entries are kept.
    pub ttl: Duration,
    /// Stream name prefixes kept by default.
    pub prefixes: Vec<String>,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            size: 100,
            ttl: Duration::from_secs(300),
            prefixes: Vec::new(),
        }
    }
}

impl HistorySettings {
    /// Settings from the options; empty prefixes are ignored.
    pub fn new(size: usize, ttl: Duration, prefixes: &[String]) -> Self {
        HistorySettings {
            size,
            ttl,
            prefixes: prefixes
                .iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }

    /// Whether a push to `stream` is kept: as the push asked, else by prefix.
    pub fn keeps(&self, stream: &str, asked: Option<bool>) -> bool {
        asked.unwrap_or_else(|| prefix_keeps(&self.prefixes, stream))
    }

    /// Whether any stream `push` goes to keeps it (never a push to
    /// client_ids).
    pub fn keeps_any(&self, push: &Push) -> bool {
        let keeps = |s: &str| self.keeps(s, push.history);
        match &push.target {
            Target::Uids(uids) => uids.iter().any(|u| keeps(&uid_stream(u))),
            Target::Groups(groups) => groups.iter().any(|g| keeps(&group_stream(g))),
            Target::All => keeps(ALL_STREAM),
            Target::Client(_) | Target::Clients(_) => false,
        }
    }
}

/// Whether `--history-streams` (`prefixes`, empty ones ignored) names
/// `stream`.
pub fn prefix_keeps(prefixes: &[String], stream: &str) -> bool {
    prefixes
        .iter()
        .map(|p| p.trim())
        .any(|p| !p.is_empty() && stream.starts_with(p))
}

/// How long the nodes remember an inner push they kept, to keep it once.
pub const INNER_DEDUP_WINDOW: Duration = Duration::from_secs(10);

/// Inner-port pushes seen lately, by content. A GatewayClient sends each
/// push to every node itself; for a push kept in history each node asks
/// Redis to keep it under the same id (its content's digest and how many
/// times this node saw that content within [`INNER_DEDUP_WINDOW`]), and
/// only the first to ask appends and publishes it. Two identical pushes
/// sent on purpose get two ids on every node, so both are kept.
#[derive(Debug, Default)]
pub struct InnerPushes {
    seen: Mutex<HashMap<[u8; 16], (u32, Instant)>>,
}

impl InnerPushes {
    /// The id of an inner push of `parts`, the same on every node.
    pub fn id(&self, parts: &[&[u8]]) -> String {
        use sha2::Digest;
        let mut sha = sha2::Sha256::new();
        for part in parts {
            sha.update((part.len() as u64).to_be_bytes());
            sha.update(part);
        }
        let digest = sha.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        let now = Instant::now();
        let mut seen = self.seen.lock();
        if seen.len() > 4096 {
            seen.retain(|_, (_, at)| now.duration_since(*at) < INNER_DEDUP_WINDOW);
        }
        let entry = seen.entry(key).or_insert((0, now));
        if now.duration_since(entry.1) >= INNER_DEDUP_WINDOW {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}.{}", entry.0)
    }
}

/// The stream of a uid.
pub fn uid_stream(uid: &str) -> String {
    format!("u:{uid}")
}

/// The stream of a group.
pub fn group_stream(group: &str) -> String {
    format!("g:{group}")
}

/// The stream of send_to_all.
pub const ALL_STREAM: &str = "all";

/// One kept push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its offset.
    pub offset: u64,
    /// The push, exactly as pushed.
    pub message: Message,
}

/// What a stream's history holds after a position: its epoch (`None` when
/// the stream has none: never kept, or lost), top offset, and the entries
/// after the position still kept (oldest first; those past the TTL left
/// out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryRead {
    /// The stream's epoch.
    pub epoch: Option<String>,
    /// The last offset given out.
    pub top: u64,
    /// Entries with offsets above the position, in order.
    pub entries: Vec<Entry>,
}

impl HistoryRead {
    /// The replay for a client at (`epoch`, `offset`): every entry up to the
    /// top, or `None` when that cannot be given whole (another epoch,
    /// trimmed or expired past the position, a position past the top).
    pub fn replay_after(&self, epoch: &str, offset: u64) -> Option<&[Entry]> {
        if self.epoch.as_deref() != Some(epoch) || offset > self.top {
            return None;
        }
        let wanted = (self.top - offset) as usize;
        if wanted == 0 {
            return Some(&[]);
        }
        let entries: &[Entry] = &self.entries;
        let first = entries.iter().position(|e| e.offset > offset)?;
        let after = &entries[first..];
        let contiguous = after.len() == wanted
            && after
                .iter()
                .enumerate()
                .all(|(i, e)| e.offset == offset + 1 + i as u64);
        contiguous.then_some(after)
    }
}

/// A stream's history in process (the memory engine).
#[derive(Debug)]
struct Log {
    epoch: String,
    top: u64,
    entries: VecDeque<(u64, Message, Instant)>,
    last: Instant,
}

/// Every stream's history, in process.
#[derive(Debug)]
pub struct MemoryHistory {
    settings: HistorySettings,
    streams: Mutex<HashMap<String, Log>>,
}

impl MemoryHistory {
    /// An empty history.
    pub fn new(settings: HistorySettings) -> Self {
        MemoryHistory {
            settings,
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &HistorySettings {
        &self.settings
    }

    /// Appends `message` to `stream` and, under the same lock, runs
    /// `deliver` with its position: live order is history order.
    pub fn append_then<R>(
        &self,
        stream: &str,
        message: &Message,
        deliver: impl FnOnce(PositionRef<'_>) -> R,
    ) -> R {
        let now = Instant::now();
        let ttl = self.settings.ttl;
        let mut streams = self.streams.lock();
        if streams.len() > 1024 && streams.len().is_power_of_two() {
            // Now and then, forget streams idle past the TTL: bounded work,
            // amortized over the appends.
            streams.retain(|_, log| now.duration_since(log.last) < ttl);
        }
        let log = streams.entry(stream.to_owned()).or_insert_with(|| Log {
            epoch: new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            last: now,
        });
        if now.duration_since(log.last) >= ttl {
            // Expired as a whole, as the Redis keys would be.
            log.epoch = new_epoch();
            log.top = 0;
            log.entries.clear();
        }
        log.top += 1;
        log.last = now;
        log.entries.push_back((log.top, message.clone(), now));
        while log.entries.len() > self.settings.size {
            log.entries.pop_front();
        }
        deliver(PositionRef {
            stream,
            epoch: &log.epoch,
            offset: log.top,
        })
    }

    /// The entries of `stream` after `offset`.
    pub fn read(&self, stream: &str, offset: u64) -> HistoryRead {
        let now = Instant::now();
        let ttl = self.settings.ttl;
        let streams = self.streams.lock();
        let Some(log) = streams.get(stream) else {
            return HistoryRead::default();
        };
        if now.duration_since(log.last) >= ttl {
            return HistoryRead::default();
        }
        HistoryRead {
            epoch: Some(log.epoch.clone()),
            top: log.top,
            entries: log
                .entries
                .iter()
                .filter(|(o, _, at)| *o > offset && now.duration_since(*at) < ttl)
                .map(|(o, m, _)| Entry {
                    offset: *o,
                    message: m.clone(),
                })
                .collect(),
        }
    }
}

/// A new random epoch: 16 hex digits.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

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

/// The offset that asks a history read for the stream's epoch and top
/// only: no entry is above it.
pub const TOP_ONLY: u64 = i64::MAX as u64;

/// How long one history read of a replay may take (the Redis engine's own
/// command timeout is shorter).
const READ_WAIT: Duration = Duration::from_secs(3);

/// Reads `stream` after `offset`, asked once more when the first read
/// failed or timed out (a read changes nothing, so asking again is safe): a
/// Redis that stalled for a moment does not cost the client its replay.
pub async fn read_with_retry(
    engine: &dyn Engine,
    stream: &str,
    offset: u64,
) -> EngineResult<HistoryRead> {
    let read = || async {
        match tokio::time::timeout(READ_WAIT, engine.history_since(stream, offset)).await {
            Ok(read) => read,
            Err(_) => Err(crate::engine::EngineError::Unavailable(
                "history read timed out".into(),
            )),
        }
    };
    match read().await {
        Ok(read) => Ok(read),
        Err(e) => {
            tracing::debug!(%stream, error = %e, "history read failed: asking once more");
            read().await
        }
    }
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

    fn read(epoch: &str, top: u64, offsets: &[u64]) -> HistoryRead {
        HistoryRead {
            epoch: Some(epoch.into()),
            top,
            entries: offsets
                .iter()
                .map(|o| Entry {
                    offset: *o,
                    message: Message::text(o.to_string()),
                })
                .collect(),
        }
    }

    #[test]
    fn a_replay_is_whole_or_nothing() {
        assert_eq!(
            read("e", 5, &[3, 4, 5]).replay_after("e", 2).unwrap().len(),
            3
        );
        assert_eq!(
            read("e", 5, &[3, 4, 5]).replay_after("e", 5).unwrap().len(),
            0
        );
        // Trimmed past the position.
        assert!(read("e", 5, &[4, 5]).replay_after("e", 2).is_none());
        // Another epoch.
        assert!(read("f", 5, &[3, 4, 5]).replay_after("e", 2).is_none());
        // A position the stream never reached.
        assert!(read("e", 5, &[3, 4, 5]).replay_after("e", 9).is_none());
        // Lost entirely.
        assert!(HistoryRead::default().replay_after("e", 0).is_none());
    }

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

    #[test]
    fn prefixes_choose_streams_and_a_push_overrides_them() {
        let s = HistorySettings::new(10, Duration::from_secs(1), &["u:".into(), "".into()]);
        assert!(s.keeps("u:a", None));
        assert!(!s.keeps("g:a", None));
        assert!(s.keeps("g:a", Some(true)));
        assert!(!s.keeps("u:a", Some(false)));
    }

    #[test]
    fn memory_history_is_bounded_and_ordered() {
        let h = MemoryHistory::new(HistorySettings::new(3, Duration::from_secs(60), &[]));
        let mut epoch = String::new();
        for i in 1..=5u64 {
            h.append_then("u:a", &Message::text(i.to_string()), |p| {
                assert_eq!(p.offset, i);
                epoch = p.epoch.to_owned();
            });
        }
        let r = h.read("u:a", 0);
        assert_eq!(r.top, 5);
        assert_eq!(
            r.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert!(r.replay_after(&epoch, 2).is_some());
        assert!(r.replay_after(&epoch, 1).is_none());
    }
}
