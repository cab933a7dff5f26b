//! Gap repair at the node: per stream kept in history, the last offset
//! this node delivered, the pushes held while a gap is read back from
//! history, and what is done when it cannot be (the opted-in clients are
//! closed to resume; docs/recovery.md section 3), or when the history went
//! back (a failover or a restart lost its last pushes: a new epoch). The
//! history itself, its Functions and the resume's reads are in `history`.

use std::collections::HashMap;
use std::sync::Arc;

use fred::types::Value;
use parking_lot::Mutex;

use super::envelope::EnvelopeRef;
use super::Shared;
use crate::engine::EngineResult;
use crate::frame::close_code;
use crate::recovery::history::{group_stream, uid_stream, ALL_STREAM};
use crate::recovery::resume::{jitter_ms, retry_reason};

/// Most pushes of one stream held while its gap is read; past it the node
/// gives up on that gap and delivers what it holds.
const MAX_HELD: usize = 10_000;

/// How long one try of a gap's read may take.
const REPAIR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Tries of a gap's read before the node gives the stream's opted-in
/// clients up to their own resume.
const REPAIR_TRIES: u32 = 3;

/// Pause after a refused read before the next try.
const REPAIR_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Shortest `retry_ms` in a `history_gap` close.
const GAP_RETRY_FROM: std::time::Duration = std::time::Duration::from_millis(100);

/// Gap repair at the node: per stream, the last offset this node
/// delivered. A push whose offset jumps past the next one (its pub/sub
/// connection dropped messages, or was replaced) holds the stream's pushes
/// while the node reads the gap from history once, for all its clients, then
/// delivers the gap and the held pushes in order. A push at or below the last
/// offset is a duplicate and is dropped, unless Redis stamped it later than
/// the last one delivered: then the history went back (a failover to a
/// replica that had not the last pushes, a restart from an older snapshot)
/// and offsets are being given out again (see [`Gate::Rewound`]).
#[derive(Default)]
pub struct Gaps {
    streams: Mutex<HashMap<String, Track>>,
    /// The runtime repairs run on (the dispatcher is a plain thread).
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    repairs: std::sync::atomic::AtomicU64,
}

struct Track {
    epoch: String,
    last: u64,
    /// When Redis appended the last push delivered (its `t`, ms): a push
    /// at or below `last` stamped later is not a duplicate.
    last_t: u64,
    /// Held while a repair runs: its number and the pushes (channel, raw
    /// envelope) in arrival order.
    held: Option<(u64, Vec<(String, bytes::Bytes)>)>,
}

/// What to do with a push kept in history.
pub enum Gate {
    /// Deliver it now.
    Deliver,
    /// Already delivered.
    Duplicate,
    /// Held behind a repair.
    Held,
    /// Held; read the gap after `after` (repair number `repair`).
    Repair { after: Mark, repair: u64 },
    /// Held pushes to deliver now, then this one (too many held).
    Flush(Vec<(String, bytes::Bytes)>),
    /// Deliver it: its offset was given out before, in the same epoch, to
    /// an earlier push. The history went back; the caller starts a new
    /// epoch for the stream and closes its opted-in clients here to resume.
    Rewound { epoch: String },
}

/// A push is new at (`offset`, `t`) after the last one delivered at
/// (`last`, `last_t`): a later offset, or (the history went back) an
/// offset given out again, stamped later.
fn is_new(offset: u64, t: u64, last: u64, last_t: u64) -> bool {
    offset > last || t > last_t
}

/// Where a node was on a stream: the last offset it delivered and when
/// Redis appended that push (ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The offset.
    pub last: u64,
    /// Its time.
    pub last_t: u64,
}

/// What a gap's read found: the stream's epoch (none when it keeps
/// nothing), its latest offset, and the raw entries.
struct GapRead {
    epoch: Option<String>,
    top: u64,
    entries: Vec<bytes::Bytes>,
}

/// Most streams read back after the subscriber connection was replaced;
/// the others are repaired when their next push shows the gap.
const MAX_RECONNECT_REPAIRS: usize = 4096;

/// Reads at once of those.
const RECONNECT_REPAIRS_AT_ONCE: usize = 32;

/// How long the streams read back after a reconnection may be held in
/// all; past it a stream not read is given up to its clients' resume.
const RECONNECT_REPAIR_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// Most streams tracked; past it tracking starts over (no repair for a
/// moment, never a wrong one).
const MAX_TRACKED: usize = 200_000;

impl Track {
    fn mark(&self) -> Mark {
        Mark {
            last: self.last,
            last_t: self.last_t,
        }
    }
}

impl Gaps {
    /// The runtime repairs (and other work of the dispatcher) run on.
    pub fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.get()
    }

    /// Remembers the runtime repairs are spawned on.
    pub fn set_runtime(&self, handle: tokio::runtime::Handle) {
        let _ = self.runtime.set(handle);
    }

    /// Holds every tracked stream not being repaired already (at most
    /// `most`) for a repair after its last offset: (stream, after, repair).
    fn hold_all(&self, most: usize) -> Vec<(String, Mark, u64)> {
        let mut streams = self.streams.lock();
        let mut out = Vec::new();
        for (stream, track) in streams.iter_mut() {
            if out.len() >= most {
                break;
            }
            if track.held.is_some() {
                continue;
            }
            let repair = self
                .repairs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            track.held = Some((repair, Vec::new()));
            out.push((stream.clone(), track.mark(), repair));
        }
        out
    }

    /// Forgets what this node delivered on `stream`: it starts following
    /// the stream now, and what was published before is not its clients'.
    pub fn forget(&self, stream: &str) {
        self.streams.lock().remove(stream);
    }

    /// Decides about a push at (`stream`, `epoch`, `offset`), appended by
    /// Redis at `t` (ms), arriving on `channel` as `raw`.
    pub fn gate(
        &self,
        stream: &str,
        (epoch, offset, t): (&str, u64, u64),
        channel: &str,
        raw: &[u8],
    ) -> Gate {
        let mut streams = self.streams.lock();
        if streams.len() >= MAX_TRACKED && !streams.contains_key(stream) {
            streams.retain(|_, t| t.held.is_some());
        }
        let track = match streams.get_mut(stream) {
            Some(t) if t.epoch == epoch => t,
            _ => {
                let old = streams.insert(
                    stream.to_owned(),
                    Track {
                        epoch: epoch.to_owned(),
                        last: offset,
                        last_t: t,
                        held: None,
                    },
                );
                // Pushes held behind a repair of the old epoch go out
                // first (its repair, finding nothing held, ends), never
                // dropped with the old track.
                return match old.and_then(|t| t.held) {
                    Some((_, held)) if !held.is_empty() => Gate::Flush(held),
                    _ => Gate::Deliver,
                };
            }
        };
        if let Some((_, held)) = &mut track.held {
            held.push((channel.to_owned(), bytes::Bytes::copy_from_slice(raw)));
            if held.len() > MAX_HELD {
                let held = track.held.take().map(|(_, h)| h).unwrap_or_default();
                track.last = offset;
                track.last_t = track.last_t.max(t);
                // The last one is this push: the caller delivers it.
                let mut held = held;
                held.pop();
                return Gate::Flush(held);
            }
            return Gate::Held;
        }
        if offset <= track.last {
            if !is_new(offset, t, track.last, track.last_t) {
                return Gate::Duplicate;
            }
            track.last = offset;
            track.last_t = t;
            return Gate::Rewound {
                epoch: track.epoch.clone(),
            };
        }
        if offset == track.last + 1 {
            track.last = offset;
            track.last_t = track.last_t.max(t);
            return Gate::Deliver;
        }
        let repair = self
            .repairs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let after = track.mark();
        track.held = Some((
            repair,
            vec![(channel.to_owned(), bytes::Bytes::copy_from_slice(raw))],
        ));
        Gate::Repair { after, repair }
    }
}

impl Shared {
    /// This node starts following `channel` for a member that just came:
    /// what the stream carried before is not its clients' to repair.
    pub(super) fn forget_gaps(&self, channel: &str) {
        let stream = match self.keys.parse_channel(channel) {
            Some(super::keys::Channel::Uid(u)) => uid_stream(u),
            Some(super::keys::Channel::Group(g)) => group_stream(g),
            _ => return,
        };
        self.gaps.forget(&stream);
    }

    /// After the subscriber connection was replaced and every channel
    /// subscribed again: reads back, for each stream this node delivered
    /// (up to [`MAX_RECONNECT_REPAIRS`]), what was published after its
    /// last offset while the connection was away, and delivers it then,
    /// not at the stream's next push (which may never come). Pushes of
    /// those streams arriving meanwhile wait behind, as for any repair.
    pub(super) fn repair_followed(self: &Arc<Self>) {
        let Some(runtime) = self.gaps.runtime.get() else {
            return;
        };
        let holds = self.gaps.hold_all(MAX_RECONNECT_REPAIRS);
        if holds.is_empty() {
            return;
        }
        let s = self.clone();
        let until = tokio::time::Instant::now() + RECONNECT_REPAIR_WINDOW;
        runtime.spawn(async move {
            use futures_util::StreamExt;
            let each = |(stream, after, repair): (String, Mark, u64)| {
                let s = s.clone();
                async move {
                    match s.read_gap(&stream, after, until).await {
                        Some(read) => {
                            if !read.entries.is_empty() {
                                s.metrics.history_gap_repairs.inc();
                            }
                            s.finish_repair(&stream, repair, Some(read));
                        }
                        None => s.give_up_repair(&stream, repair),
                    }
                }
            };
            futures_util::stream::iter(holds)
                .for_each_concurrent(RECONNECT_REPAIRS_AT_ONCE, each)
                .await;
        });
    }

    /// Starts the repair of `stream`'s gap after `after`.
    pub(super) fn spawn_repair(self: &Arc<Self>, stream: String, after: Mark, repair: u64) {
        let Some(runtime) = self.gaps.runtime.get() else {
            return;
        };
        self.metrics.history_gap_repairs.inc();
        let s = self.clone();
        runtime.spawn(async move {
            let until = tokio::time::Instant::now() + REPAIR_TIMEOUT * REPAIR_TRIES;
            match s.read_gap(&stream, after, until).await {
                Some(read) => s.finish_repair(&stream, repair, Some(read)),
                None => s.give_up_repair(&stream, repair),
            }
        });
    }

    /// Reads `stream`'s gap after `after`: up to [`REPAIR_TRIES`] tries,
    /// each within [`REPAIR_TIMEOUT`], all before `until`. `None` when no
    /// try answered. The read starts at `after`'s own offset, to see that
    /// it is still the push the node delivered: when Redis holds a later
    /// push there, or its latest offset is below `after`, the history went
    /// back, and the whole history is read instead (what was appended since
    /// the node's last delivery is told by its time).
    async fn read_gap(
        &self,
        stream: &str,
        after: Mark,
        until: tokio::time::Instant,
    ) -> Option<GapRead> {
        let from = after.last.saturating_sub(1);
        let read = self.read_gap_after(stream, from, until).await?;
        let restamped = read.entries.first().is_some_and(|raw| {
            EnvelopeRef::decode(raw)
                .is_ok_and(|e| e.o == Some(after.last) && e.t.unwrap_or(0) > after.last_t)
        });
        if read.epoch.is_none() || (read.top >= after.last && !restamped) {
            return Some(read);
        }
        self.read_gap_after(stream, 0, until).await
    }

    async fn read_gap_after(
        &self,
        stream: &str,
        after: u64,
        until: tokio::time::Instant,
    ) -> Option<GapRead> {
        for attempt in 1..=REPAIR_TRIES {
            let now = tokio::time::Instant::now();
            if now >= until {
                break;
            }
            let read = tokio::time::timeout_at(until.min(now + REPAIR_TIMEOUT), async {
                self.read_raw(stream, after).await
            })
            .await;
            match read {
                Ok(Ok(read)) => return Some(read),
                Ok(Err(e)) => {
                    tracing::warn!(%stream, attempt, error = %e, "history gap not read");
                    // A refusal comes back at once: a pause before the next.
                    tokio::time::sleep_until(until.min(now + REPAIR_PAUSE)).await;
                }
                Err(_) => tracing::warn!(%stream, attempt, "history gap not read in time"),
            }
        }
        None
    }

    /// The gap of `stream` could not be read: its opted-in clients here
    /// are closed with `{"reason":"history_gap","retry_ms":N}`, so they
    /// resume from their own positions (the resume reads history again, and
    /// says `recovered: false` if it cannot), never a silent gap. The held
    /// pushes then go to the others, who get pushes at most once anyway.
    fn give_up_repair(self: &Arc<Self>, stream: &str, repair: u64) {
        let closed = self.close_opted_in(stream);
        self.metrics.history_gap_unrepaired.inc();
        tracing::warn!(
            %stream,
            closed,
            "history gap not read back: closing the stream's opted-in clients here to resume from their positions"
        );
        self.finish_repair_told(stream, repair, None, true);
    }

    /// Closes this node's connections in `stream` that opted in to
    /// recovery with `{"reason":"history_gap","retry_ms":N}`; how many.
    fn close_opted_in(&self, stream: &str) -> usize {
        let ids = if stream == ALL_STREAM {
            self.hub.client_ids()
        } else if let Some(uid) = stream.strip_prefix("u:") {
            self.hub.client_ids_by_uid(uid)
        } else if let Some(group) = stream.strip_prefix("g:") {
            self.hub.group_client_ids(group)
        } else {
            Vec::new()
        };
        let mut closed = 0;
        for id in ids {
            if self.hub.framed_member(id, stream).is_none() {
                continue;
            }
            let retry_ms = jitter_ms(GAP_RETRY_FROM, self.settings.reconnect_window);
            let reason = retry_reason("history_gap", retry_ms);
            if self.hub.close_if_open(id, close_code::GOING_AWAY, &reason) {
                closed += 1;
            }
        }
        closed
    }

    /// Delivers the gap's entries then the held pushes, in offset order,
    /// under the tracker's lock (so the dispatcher holds newer pushes of the
    /// stream meanwhile).
    fn finish_repair(self: &Arc<Self>, stream: &str, repair: u64, read: Option<GapRead>) {
        self.finish_repair_told(stream, repair, read, false);
    }

    /// [`Shared::finish_repair`]; `told`: the stream's opted-in clients
    /// were closed already. When what was read and held still skips an
    /// offset (the gap is older than the history: trimmed or expired), the
    /// opted-in clients are closed to resume before anything past the hole
    /// reaches them: their resume says `recovered: false`, never a silent
    /// gap. When the history went back (the read's latest offset is below
    /// the last one delivered, or a push reuses an offset), what Redis
    /// appended since is delivered and the stream gets a new epoch
    /// ([`Shared::history_went_back`]).
    fn finish_repair_told(
        self: &Arc<Self>,
        stream: &str,
        repair: u64,
        read: Option<GapRead>,
        told: bool,
    ) {
        let mut streams = self.gaps.streams.lock();
        let Some(track) = streams.get_mut(stream) else {
            return;
        };
        let Some((number, held)) = track.held.take() else {
            return;
        };
        if number != repair {
            track.held = Some((number, held));
            return;
        }
        let channel = self.stream_channel(stream).unwrap_or_default();
        let epoch = track.epoch.clone();
        let mut went_back = read
            .as_ref()
            .is_some_and(|r| r.epoch.as_deref() == Some(epoch.as_str()) && r.top < track.last);
        // What goes out, in order: this epoch's entries not delivered yet,
        // each once.
        let (mut last, mut last_t) = (track.last, track.last_t);
        let mut hole = false;
        let mut out = Vec::new();
        let all = read
            .map(|r| r.entries)
            .unwrap_or_default()
            .into_iter()
            .map(|raw| (channel.clone(), raw))
            .chain(held);
        for (channel, raw) in all {
            let Ok(e) = EnvelopeRef::decode(&raw) else {
                continue;
            };
            let (Some(o), Some(ep)) = (e.o, e.e) else {
                continue;
            };
            let t = e.t.unwrap_or(0);
            if ep != epoch || !is_new(o, t, last, last_t) {
                continue;
            }
            went_back |= o <= last;
            hole |= o > last + 1 && !went_back;
            last = o;
            last_t = last_t.max(t);
            out.push((channel, raw));
        }
        if hole && !told {
            let closed = self.close_opted_in(stream);
            self.metrics.history_gap_unrepaired.inc();
            tracing::warn!(
                %stream,
                closed,
                "history gap older than the history: closing the stream's opted-in clients here to resume (not recovered)"
            );
        }
        for (channel, raw) in &out {
            let Ok(e) = EnvelopeRef::decode(raw) else {
                continue;
            };
            if let Some(c) = self.keys.parse_channel(channel) {
                if let Err(reason) = self.deliver_now(c, &e) {
                    tracing::debug!(reason, "a repaired push was skipped");
                }
            }
        }
        track.last = last;
        track.last_t = last_t;
        drop(streams);
        if went_back {
            self.history_went_back(stream, epoch);
        }
    }

    /// `stream`'s history went back in `epoch`: Redis lost its last pushes
    /// (a failover to a replica that had not got them, a restart from an
    /// older snapshot or AOF) and gives their offsets out again. The stream
    /// gets a new epoch (once, whichever node sees it first), so no position
    /// a client holds from the lost pushes is taken for a position in the
    /// new ones; then its opted-in clients here are closed with
    /// `history_gap` to resume, which says `recovered: false`.
    pub(super) fn history_went_back(self: &Arc<Self>, stream: &str, epoch: String) {
        let Some(runtime) = self.gaps.runtime.get() else {
            return;
        };
        self.metrics.history_went_back.inc();
        let (s, stream) = (self.clone(), stream.to_owned());
        runtime.spawn(async move {
            let until = tokio::time::Instant::now() + REPAIR_TIMEOUT * REPAIR_TRIES;
            let mut renewed = None;
            for attempt in 1..=REPAIR_TRIES {
                let now = tokio::time::Instant::now();
                if now >= until {
                    break;
                }
                let call = s.new_epoch(&stream, &epoch);
                match tokio::time::timeout_at(until.min(now + REPAIR_TIMEOUT), call).await {
                    Ok(Ok(by_this_node)) => {
                        renewed = Some(by_this_node);
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%stream, attempt, error = %e, "new epoch not written");
                        tokio::time::sleep_until(until.min(now + REPAIR_PAUSE)).await;
                    }
                    Err(_) => tracing::warn!(%stream, attempt, "new epoch not written in time"),
                }
            }
            let closed = s.close_opted_in(&stream);
            tracing::warn!(
                %stream,
                %epoch,
                ?renewed,
                closed,
                "history went back (redis lost its last pushes: a failover or a restart from an older copy): a new epoch, the stream's opted-in clients here closed to resume (not recovered)"
            );
        });
    }

    /// The entries of `stream` after `offset`, with its epoch and latest
    /// offset.
    async fn read_raw(&self, stream: &str, offset: u64) -> EngineResult<GapRead> {
        let reply = self.call_since(stream, offset).await?;
        let Value::Array(mut parts) = reply else {
            return Ok(GapRead {
                epoch: None,
                top: 0,
                entries: Vec::new(),
            });
        };
        let entries = match parts.pop() {
            Some(Value::Array(items)) => items
                .into_iter()
                .filter_map(|v| v.as_bytes().map(bytes::Bytes::copy_from_slice))
                .collect(),
            _ => Vec::new(),
        };
        let top = parts.pop().and_then(|v| v.as_u64()).unwrap_or(0);
        let epoch = parts.pop().and_then(|v| v.as_string());
        Ok(GapRead {
            epoch,
            top,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_delivers_in_order_holds_behind_a_gap_and_drops_duplicates() {
        let gaps = Gaps::default();
        // Redis stamps each push (ms); a duplicate carries its first stamp.
        let gate = |o: u64| gaps.gate("u:a", ("e1", o, 1000 + o), "gc:uid:a", b"x");
        assert!(matches!(gate(5), Gate::Deliver));
        assert!(matches!(gate(6), Gate::Deliver));
        assert!(matches!(gate(6), Gate::Duplicate));
        assert!(matches!(gate(5), Gate::Duplicate));
        assert!(matches!(
            gate(9),
            Gate::Repair {
                after: Mark {
                    last: 6,
                    last_t: 1006
                },
                ..
            }
        ));
        assert!(matches!(gate(10), Gate::Held));
        // Another epoch starts over, after the pushes held for the old one.
        match gaps.gate("u:a", ("e2", 1, 2000), "gc:uid:a", b"y") {
            Gate::Flush(held) => assert_eq!(held.len(), 2, "9 and 10"),
            _ => panic!("the held push is delivered first"),
        }
        assert!(matches!(
            gaps.gate("u:a", ("e3", 1, 3000), "gc:uid:a", b"x"),
            Gate::Deliver
        ));
        gaps.forget("u:a");
        assert!(matches!(gate(40), Gate::Deliver));
    }

    #[test]
    fn an_offset_given_out_again_later_is_the_history_going_back() {
        let gaps = Gaps::default();
        let gate = |o: u64, t: u64| gaps.gate("g:x", ("e1", o, t), "gc:group:x", b"x");
        assert!(matches!(gate(1, 100), Gate::Deliver));
        assert!(matches!(gate(2, 200), Gate::Deliver));
        assert!(matches!(gate(3, 300), Gate::Deliver));
        // Redis lost 2 and 3 (a failover): the next push is 2 again, later.
        match gate(2, 5000) {
            Gate::Rewound { epoch } => assert_eq!(epoch, "e1"),
            _ => panic!("a reused offset stamped later is not a duplicate"),
        }
        // It is followed from there; its own duplicate is one.
        assert!(matches!(gate(2, 5000), Gate::Duplicate));
        assert!(matches!(gate(1, 100), Gate::Duplicate));
        assert!(matches!(gate(3, 5100), Gate::Deliver));
    }
}
