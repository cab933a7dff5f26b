//! The dashboard's live tail: what is pushed to one uid or one group, as
//! it goes, from any node (docs/dashboard.md).
//!
//! Bounded and sampled: each watcher has a queue of [`QUEUE`] entries and
//! takes at most [`RATE`] a second; what does not fit is counted, not kept,
//! and the next entry says how many were skipped. Each entry carries at
//! most [`PREVIEW_BYTES`] of the payload. Watching costs nothing on the
//! push path while nobody watches: the in-process engine checks one atomic
//! counter ([`Taps`]); the Redis engine subscribes a connection of its own
//! to the stream's channel only while someone watches.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::push::{Push, Target};

/// Entries a watcher's queue holds.
pub const QUEUE: usize = 256;

/// Entries a watcher receives per second at most.
pub const RATE: u32 = 50;

/// Payload bytes an entry shows at most.
pub const PREVIEW_BYTES: usize = 512;

/// Watchers one node serves at once.
pub const MAX_WATCHERS: usize = 16;

/// What is watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailTarget {
    /// Pushes to a uid.
    Uid(String),
    /// Pushes to a group.
    Group(String),
}

impl TailTarget {
    /// `uid:<uid>` or `group:<group>`.
    pub fn label(&self) -> String {
        match self {
            TailTarget::Uid(u) => format!("uid:{u}"),
            TailTarget::Group(g) => format!("group:{g}"),
        }
    }

    /// Whether `target` pushes to what is watched.
    pub fn matches(&self, target: &Target) -> bool {
        match (self, target) {
            (TailTarget::Uid(u), Target::Uids(uids)) => uids.contains(u),
            (TailTarget::Group(g), Target::Groups(groups)) => groups.contains(g),
            _ => false,
        }
    }
}

/// One push seen by the tail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TailEntry {
    /// When this node saw it (Unix ms).
    pub at_ms: u64,
    /// What was watched (`uid:<uid>`, `group:<group>`).
    pub target: String,
    /// A binary push (`data_base64`) rather than text.
    pub binary: bool,
    /// The payload's size in bytes.
    pub bytes: usize,
    /// The start of the payload: text as is (cut on a character
    /// boundary), binary as hex.
    pub preview: String,
    /// The preview is not the whole payload.
    pub truncated: bool,
    /// Connections the push left out (`exclude`).
    pub excluded: usize,
    /// The node that accepted the push, when the envelope says
    /// (`origin`); `None` for history-kept pushes and backends publishing
    /// straight to Redis.
    pub origin: Option<String>,
    /// Pushes not shown before this one (queue full, or over the rate).
    pub skipped: u64,
}

impl TailEntry {
    /// An entry for a push of `data` to `target`.
    pub fn new(
        target: &TailTarget,
        binary: bool,
        data: &[u8],
        excluded: usize,
        origin: Option<String>,
    ) -> Self {
        let (preview, truncated) = preview(binary, data);
        TailEntry {
            at_ms: crate::stats::unix_ms(),
            target: target.label(),
            binary,
            bytes: data.len(),
            preview,
            truncated,
            excluded,
            origin,
            skipped: 0,
        }
    }
}

fn preview(binary: bool, data: &[u8]) -> (String, bool) {
    if binary {
        let shown = &data[..data.len().min(PREVIEW_BYTES / 2)];
        let hex: Vec<String> = shown.iter().map(|b| format!("{b:02x}")).collect();
        (hex.join(" "), shown.len() < data.len())
    } else {
        let mut end = data.len().min(PREVIEW_BYTES);
        while end > 0 && end < data.len() && (data[end] & 0xC0) == 0x80 {
            end -= 1;
        }
        (
            String::from_utf8_lossy(&data[..end]).into_owned(),
            end < data.len(),
        )
    }
}

/// The sending side of one watcher: bounded, sampled.
#[derive(Debug)]
pub struct TailSender {
    tx: mpsc::Sender<TailEntry>,
    /// Pushes not shown since the last entry sent.
    skipped: AtomicU64,
    /// The current second's window and how many it took.
    window: parking_lot::Mutex<(Instant, u32)>,
}

impl TailSender {
    /// Offers an entry: sent unless the watcher is over its rate or its
    /// queue is full, in which case it is counted as skipped.
    pub fn offer(&self, make: impl FnOnce() -> TailEntry) {
        let allowed = {
            let mut window = self.window.lock();
            if window.0.elapsed().as_secs() >= 1 {
                *window = (Instant::now(), 0);
            }
            window.1 += 1;
            window.1 <= RATE
        };
        if !allowed {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut entry = make();
        entry.skipped = self.skipped.swap(0, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(entry) {
            let lost = match e {
                mpsc::error::TrySendError::Full(entry)
                | mpsc::error::TrySendError::Closed(entry) => entry.skipped,
            };
            self.skipped.fetch_add(lost + 1, Ordering::Relaxed);
        }
    }

    /// The watcher went away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the watcher goes away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A watcher's end: the entries, and whatever keeps the source alive
/// (dropped with it, which stops the source).
pub struct Tail {
    /// The entries, as they come.
    pub entries: mpsc::Receiver<TailEntry>,
    _source: Box<dyn Send + Sync>,
}

impl Tail {
    /// A new watcher: its sender, and a tail that holds `source` until it
    /// is dropped.
    pub fn channel() -> (Arc<TailSender>, mpsc::Receiver<TailEntry>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sender = Arc::new(TailSender {
            tx,
            skipped: AtomicU64::new(0),
            window: parking_lot::Mutex::new((Instant::now(), 0)),
        });
        (sender, rx)
    }

    /// A tail reading `entries` and keeping `source` alive.
    pub fn new(entries: mpsc::Receiver<TailEntry>, source: impl Send + Sync + 'static) -> Self {
        Tail {
            entries,
            _source: Box::new(source),
        }
    }
}

/// Local taps on the push path (the in-process engine): every push is
/// offered to the watchers whose target it names. One atomic load per
/// push while nobody watches.
#[derive(Debug, Default)]
pub struct Taps {
    count: AtomicUsize,
    watchers: parking_lot::Mutex<Vec<(u64, TailTarget, Arc<TailSender>)>>,
    next: AtomicU64,
}

/// Removes its watcher from [`Taps`] when dropped.
struct Untap {
    taps: Arc<Taps>,
    id: u64,
}

impl Drop for Untap {
    fn drop(&mut self) {
        let mut watchers = self.taps.watchers.lock();
        watchers.retain(|(id, _, _)| *id != self.id);
        self.taps.count.store(watchers.len(), Ordering::Release);
    }
}

impl Taps {
    /// Whether anyone watches (one atomic load).
    pub fn watched(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Starts watching `target`.
    pub fn watch(self: &Arc<Self>, target: TailTarget) -> Tail {
        let (sender, rx) = Tail::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut watchers = self.watchers.lock();
            watchers.push((id, target, sender));
            self.count.store(watchers.len(), Ordering::Release);
        }
        Tail::new(
            rx,
            Untap {
                taps: self.clone(),
                id,
            },
        )
    }

    /// Offers a push to the watchers whose target it names.
    pub fn offer(&self, push: &Push, origin: Option<&str>) {
        if !self.watched() {
            return;
        }
        let watchers: Vec<(TailTarget, Arc<TailSender>)> = self
            .watchers
            .lock()
            .iter()
            .filter(|(_, target, _)| target.matches(&push.target))
            .map(|(_, t, s)| (t.clone(), s.clone()))
            .collect();
        for (target, sender) in watchers {
            let m = &push.message;
            sender.offer(|| {
                TailEntry::new(
                    &target,
                    m.binary,
                    &m.data,
                    push.exclude.len(),
                    origin.map(str::to_owned),
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::Message;

    fn push(target: Target, data: &str) -> Push {
        Push {
            target,
            exclude: vec![],
            message: Message::text(data.to_owned()),
            history: None,
        }
    }

    #[tokio::test]
    async fn a_watcher_sees_its_target_only_and_is_forgotten_when_dropped() {
        let taps = Arc::new(Taps::default());
        assert!(!taps.watched());
        let mut tail = taps.watch(TailTarget::Uid("alice".into()));
        assert!(taps.watched());
        taps.offer(&push(Target::Uids(vec!["bob".into()]), "no"), None);
        taps.offer(&push(Target::Groups(vec!["alice".into()]), "no"), None);
        taps.offer(
            &push(Target::Uids(vec!["bob".into(), "alice".into()]), "yes"),
            None,
        );
        let entry = tail.entries.recv().await.unwrap();
        assert_eq!(entry.preview, "yes");
        assert_eq!(entry.target, "uid:alice");
        assert!(tail.entries.try_recv().is_err());
        drop(tail);
        assert!(!taps.watched(), "nobody watches: the push path is free");
    }

    #[tokio::test]
    async fn a_burst_is_sampled_and_the_skipped_are_counted() {
        let taps = Arc::new(Taps::default());
        let mut tail = taps.watch(TailTarget::Group("g".into()));
        let n = RATE as usize * 3;
        for i in 0..n {
            taps.offer(
                &push(Target::Groups(vec!["g".into()]), &i.to_string()),
                None,
            );
        }
        let mut got = 0;
        while tail.entries.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, RATE as usize, "at most RATE a second");
        // The next window's first entry tells how many were skipped.
        *taps.watchers.lock()[0].2.window.lock() =
            (Instant::now() - std::time::Duration::from_secs(2), 0);
        taps.offer(&push(Target::Groups(vec!["g".into()]), "last"), None);
        let last = tail.entries.recv().await.unwrap();
        assert_eq!(last.skipped, (n - RATE as usize) as u64);
    }

    #[test]
    fn previews_are_bounded_and_cut_on_characters() {
        let long = "é".repeat(PREVIEW_BYTES);
        let (text, cut) = preview(false, long.as_bytes());
        assert!(cut && text.len() <= PREVIEW_BYTES && !text.contains('\u{fffd}'));
        let (hex, cut) = preview(true, &[0, 1, 255]);
        assert_eq!((hex.as_str(), cut), ("00 01 ff", false));
    }
}
