//! Push-to-frame latency (`gatecast_push_to_frame_seconds`): from when a
//! node accepted a push to when a recipient's frame was written to its
//! socket, labelled `path="local"` (accepted by this node: API call or
//! GatewayWorker inner port) or `path="redis"` (accepted by another node or
//! a publisher, which put its clock in the envelope's `ts`).
//!
//! Cheap by construction. The accept time is taken once per push, where the
//! push enters, and travels with the push's *shared* frame, not with each
//! recipient: when the hub encodes a frame it may register it in one of
//! [`SLOTS`] probe slots (its address, and a reference to its bytes so that
//! the address cannot be reused while the slot holds it). Each connection's
//! writer, once a frame is written, looks the address up, but only while a
//! slot is in use: one relaxed atomic load otherwise. A push is sampled when
//! a slot is free (a slot frees once every recipient wrote the frame), so
//! under a heavy load only some pushes are measured, each at every
//! recipient, slow ones included.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus_client::metrics::histogram::Histogram;

/// Pushes measured at once, at most.
pub const SLOTS: usize = 16;

/// A slot whose recipients did not all write its frame (a connection
/// closed with its queue) is freed this long after it was taken: writes
/// later than this are not measured (the histogram's last bucket is 10 s).
const MAX_AGE: Duration = Duration::from_secs(30);

/// Upper bounds of the histogram's buckets, in seconds: 0.1 ms to 10 s.
pub const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A new histogram with [`BUCKETS`].
pub fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The top bit of a slot's stamp: the push came through Redis (the stamp
/// is Unix µs of another clock), else it is this process's monotonic ns.
const REMOTE: u64 = 1 << 63;

/// When and where a push was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// By this node.
    Here {
        /// Nanoseconds on this process's monotonic clock ([`mono_ns`]).
        mono_ns: u64,
        /// Unix time in µs, for the envelope when it goes on to Redis.
        unix_us: u64,
    },
    /// By another node or a publisher: its clock, Unix µs (the envelope's
    /// `ts`). The latency then includes the clocks' difference.
    Remote {
        /// Unix time in µs on the accepting host's clock.
        unix_us: u64,
    },
}

impl Accepted {
    /// Accepted here, now.
    pub fn now() -> Self {
        Accepted::Here {
            mono_ns: mono_ns(),
            unix_us: unix_us(),
        }
    }

    /// The accept time as Unix µs, for the envelope's `ts`.
    pub fn unix_us(&self) -> u64 {
        match *self {
            Accepted::Here { unix_us, .. } | Accepted::Remote { unix_us } => unix_us,
        }
    }

    fn stamp(&self) -> u64 {
        match *self {
            Accepted::Here { mono_ns, .. } => mono_ns & !REMOTE,
            Accepted::Remote { unix_us } => (unix_us & !REMOTE) | REMOTE,
        }
    }
}

/// Nanoseconds since this process first asked.
pub fn mono_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Unix time now, in µs.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

thread_local! {
    static CURRENT: Cell<Option<Accepted>> = const { Cell::new(None) };
}

tokio::task_local! {
    static TASK: Accepted;
}

/// Runs `f` with `accepted` as the accept time of the pushes it delivers
/// (synchronous code: the dispatcher thread, the inner-port sequencer).
pub fn with<R>(accepted: Option<Accepted>, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.replace(accepted);
    // Put back even if `f` panics.
    struct Restore(Option<Accepted>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.set(self.0);
        }
    }
    let _restore = Restore(before);
    f()
}

/// Runs `fut` with `accepted` as the accept time of the pushes it delivers
/// (an API call, across its `.await`s).
pub async fn scope<F: Future>(accepted: Accepted, fut: F) -> F::Output {
    TASK.scope(accepted, fut).await
}

/// The accept time of the push being delivered, if its entry point set one.
pub fn current() -> Option<Accepted> {
    CURRENT.get().or_else(|| TASK.try_with(|a| *a).ok())
}

/// One probe slot, read by every writer without a lock.
#[derive(Debug, Default)]
struct Slot {
    /// The frame's address; 0 while free.
    ptr: AtomicUsize,
    /// [`Accepted::stamp`].
    stamp: AtomicU64,
    /// Recipients queued minus recipients written.
    remaining: AtomicI64,
}

/// What keeps a slot's address valid: the frame itself.
#[derive(Debug)]
struct Held {
    _frame: Bytes,
    since: Instant,
}

/// A registered frame; see [`PushLatency::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe(usize);

/// The probe slots and the histograms they feed.
#[derive(Debug)]
pub struct PushLatency {
    /// Slots in use: writers look only while this is above 0.
    active: AtomicUsize,
    slots: [Slot; SLOTS],
    held: Mutex<[Option<Held>; SLOTS]>,
    local: Histogram,
    redis: Histogram,
}

impl Default for PushLatency {
    fn default() -> Self {
        PushLatency::new(histogram(), histogram())
    }
}

impl PushLatency {
    /// Probes feeding `local` (pushes accepted here) and `redis` (pushes
    /// whose envelope carried an accept time).
    pub fn new(local: Histogram, redis: Histogram) -> Self {
        PushLatency {
            active: AtomicUsize::new(0),
            slots: Default::default(),
            held: Mutex::new(Default::default()),
            local,
            redis,
        }
    }

    /// Registers `frame`, just encoded for a push accepted at `accepted`,
    /// if a slot is free (and nobody else is registering: this never
    /// waits). Then [`PushLatency::expect`] must say how many recipients
    /// queued it.
    pub fn register(&self, frame: &Bytes, accepted: Accepted) -> Option<Probe> {
        if frame.is_empty() || self.active.load(Ordering::Relaxed) >= SLOTS {
            return None;
        }
        let mut held = self.held.try_lock()?;
        let mut free = None;
        for (i, h) in held.iter_mut().enumerate() {
            let slot = &self.slots[i];
            let done = match h {
                None => true,
                // Released by its last writer, or given up on.
                Some(x) => {
                    let released = slot.ptr.load(Ordering::Acquire) == 0;
                    if !released && x.since.elapsed() > MAX_AGE {
                        self.release(slot);
                        true
                    } else {
                        released
                    }
                }
            };
            if done {
                *h = None;
                if free.is_none() {
                    free = Some(i);
                }
            }
        }
        let i = free?;
        let slot = &self.slots[i];
        slot.remaining.store(0, Ordering::Relaxed);
        slot.stamp.store(accepted.stamp(), Ordering::Relaxed);
        held[i] = Some(Held {
            _frame: frame.clone(),
            since: Instant::now(),
        });
        self.active.fetch_add(1, Ordering::Relaxed);
        slot.ptr.store(frame.as_ptr() as usize, Ordering::Release);
        Some(Probe(i))
    }

    /// `queued` recipients took the probe's frame: the slot frees once each
    /// has written it.
    pub fn expect(&self, probe: Probe, queued: usize) {
        let slot = &self.slots[probe.0];
        let queued = i64::try_from(queued).unwrap_or(i64::MAX);
        if slot.remaining.fetch_add(queued, Ordering::AcqRel) + queued == 0 {
            self.release(slot);
        }
    }

    /// A writer wrote `frame` to its socket: measured if it is a probe's.
    #[inline]
    pub fn written(&self, frame: &Bytes) {
        if self.active.load(Ordering::Relaxed) != 0 {
            self.written_probed(frame);
        }
    }

    #[cold]
    fn written_probed(&self, frame: &Bytes) {
        let ptr = frame.as_ptr() as usize;
        let Some(slot) = self
            .slots
            .iter()
            .find(|s| s.ptr.load(Ordering::Acquire) == ptr)
        else {
            return;
        };
        let stamp = slot.stamp.load(Ordering::Relaxed);
        // The caller holds the frame, so its address is not reused; still
        // make sure the slot was not given up on and taken meanwhile.
        if slot.ptr.load(Ordering::Acquire) != ptr {
            return;
        }
        let seconds = if stamp & REMOTE != 0 {
            (unix_us().saturating_sub(stamp & !REMOTE)) as f64 / 1e6
        } else {
            mono_ns().saturating_sub(stamp) as f64 / 1e9
        };
        match stamp & REMOTE != 0 {
            true => self.redis.observe(seconds),
            false => self.local.observe(seconds),
        }
        if slot.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.release(slot);
        }
    }

    fn release(&self, slot: &Slot) {
        // The frame itself is dropped by the next registration.
        if slot.ptr.swap(0, Ordering::AcqRel) != 0 {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Slots in use (for tests).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(h: &Histogram) -> u64 {
        let mut out = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("h", "h", h.clone());
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out.lines()
            .find_map(|l| l.strip_prefix("h_count "))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn each_recipient_is_measured_once_then_the_slot_frees() {
        let (local, redis) = (histogram(), histogram());
        let p = PushLatency::new(local.clone(), redis.clone());
        let frame = Bytes::from(vec![1u8; 10]);
        let probe = p.register(&frame, Accepted::now()).unwrap();
        assert_eq!(p.active(), 1);
        // A write before the hub said how many took it still counts.
        p.written(&frame.clone());
        p.expect(probe, 3);
        // Another frame is not this push's.
        p.written(&Bytes::from(vec![1u8; 10]));
        p.written(&frame);
        assert_eq!(p.active(), 1);
        p.written(&frame);
        assert_eq!(p.active(), 0, "freed once the third recipient wrote it");
        assert_eq!(count(&local), 3);
        assert_eq!(count(&redis), 0);
        // Not measured any more.
        p.written(&frame);
        assert_eq!(count(&local), 3);
    }

    #[test]
    fn remote_stamps_feed_the_redis_histogram_and_skew_is_clamped() {
        let (local, redis) = (histogram(), histogram());
        let p = PushLatency::new(local.clone(), redis.clone());
        let frame = Bytes::from(vec![2u8; 4]);
        // A publisher whose clock is ahead: observed as 0, not negative.
        let ahead = Accepted::Remote {
            unix_us: unix_us() + 5_000_000,
        };
        let probe = p.register(&frame, ahead).unwrap();
        p.expect(probe, 1);
        p.written(&frame);
        assert_eq!((count(&local), count(&redis)), (0, 1));
        assert_eq!(p.active(), 0);
    }

    #[test]
    fn no_more_than_the_slots_are_taken_and_a_push_nobody_took_frees_at_once() {
        let p = PushLatency::default();
        let frames: Vec<Bytes> = (0..SLOTS + 2).map(|i| Bytes::from(vec![i as u8])).collect();
        let probes: Vec<Option<Probe>> = frames
            .iter()
            .map(|f| p.register(f, Accepted::now()))
            .collect();
        assert_eq!(probes.iter().filter(|p| p.is_some()).count(), SLOTS);
        assert_eq!(p.active(), SLOTS);
        for probe in probes.into_iter().flatten() {
            p.expect(probe, 0);
        }
        assert_eq!(p.active(), 0);
        assert!(p.register(&frames[SLOTS], Accepted::now()).is_some());
    }

    #[test]
    fn the_accept_time_is_seen_inside_its_scope_only() {
        assert_eq!(current(), None);
        let a = Accepted::Remote { unix_us: 42 };
        assert_eq!(with(Some(a), current), Some(a));
        assert_eq!(current(), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let seen = rt.block_on(scope(a, async {
            tokio::task::yield_now().await;
            current()
        }));
        assert_eq!(seen, Some(a));
    }
}
