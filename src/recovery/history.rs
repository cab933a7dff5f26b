//! The bounded history of pushes per stream (docs/recovery.md section 2.2);
//! the replay a resuming connection gets is in [`super::replay`].
//!
//! - Which pushes are kept: [`HistorySettings::keeps`] (`--history-streams`
//!   prefixes, overridden per push by the API's `history` field).
//! - Where: the engine (in process for the memory engine, [`MemoryHistory`];
//!   a LIST and a meta HASH per stream in Redis, appended and published by
//!   one Redis Function call).
//! - Read-back: [`read_with_retry`], bounded and asked once more.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::framing::PositionRef;
use crate::engine::{Engine, EngineResult};
use crate::push::{Message, Push, Target};

// The replay moved to its own module; its items stay reachable here so the
// callers' paths (hub, ws) did not change with the move.
pub use super::replay::{replay, ReplayContext, Replays, MAX_CONCURRENT_REPLAYS};

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
