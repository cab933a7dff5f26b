//! One connection's bounded outgoing queue, shared between everyone who
//! pushes to the connection and the connection's single writer task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use std::sync::atomic::AtomicU8;
use std::task::{Context, Poll};

use crate::frame::{self, close_code};

/// [`Outbox::flags`]: the writer was woken since it last looked.
const WOKEN: u8 = 1;
/// [`Outbox::flags`]: the connection opted in to recovery, so it gets each
/// push as `<header>\n<payload>` (docs/recovery.md).
const FRAMED: u8 = 2;

/// Most frames a writer takes in one go, to write with one vectored write.
pub const BATCH: usize = 64;

/// How much one connection's queue may hold before the connection counts
/// as too slow: a count of frames and a count of bytes, so a few large
/// messages are bounded as tightly as many small ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most frames queued (`--client-queue`).
    pub frames: usize,
    /// Most bytes queued (`--client-queue-bytes`). One frame is always
    /// accepted into an empty queue, whatever its size.
    pub bytes: usize,
}

impl Limits {
    /// The same limits with room for one more frame of any size: the last
    /// message of `close_client` is sent even to a full queue.
    pub fn one_more(self) -> Self {
        Limits {
            frames: self.frames.saturating_add(1),
            bytes: usize::MAX,
        }
    }
}

/// The bounded queue of pre-encoded frames for one connection.
///
/// A `VecDeque` under a short lock rather than a channel: a channel allocates
/// its first block of slots up front, while an empty `VecDeque` owns no
/// memory, and idle connections are the common case.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// The writer's waker, and whether it was woken since it last looked
    /// ([`WOKEN`]): smaller than a `Notify`, and waited on without a waiter
    /// node. The same byte holds [`FRAMED`], so opting in to recovery costs
    /// a connection nothing.
    waker: AtomicWaker,
    flags: AtomicU8,
    /// Milliseconds (on the hub's clock) of the last frame from the client.
    last_seen: AtomicU64,
    /// Since when (hub clock, ms + 1; 0 = not) the client has left a frame
    /// or a message unfinished.
    incomplete_since: AtomicU64,
    /// Milliseconds (on the hub's clock) at which the client's token
    /// expires and the sweep closes the connection; 0: never.
    expires_at: AtomicU64,
    /// Bytes of the unfinished message the connection's reader holds, as
    /// last counted in the node's `--max-partial-bytes` budget.
    partial_bytes: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    bytes: usize,
    /// Boxed: a close is rare, and every idle connection's outbox would
    /// carry its 40 bytes.
    close: Option<Box<Close>>,
}

/// A close the connection must perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The close frame, already encoded.
    pub frame: Bytes,
    /// The code in that frame.
    pub code: u16,
    /// Drop frames still queued instead of sending them first.
    pub discard_queued: bool,
}

/// The queue was full: the connection is now being closed with 1013.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// What a writer took from the outbox.
#[derive(Debug, Default)]
pub struct Taken {
    /// Set once the queue holds nothing more to send before the close.
    pub close: Option<Box<Close>>,
}

impl Outbox {
    /// Queues a frame unless the queue would go past `limits`, in which
    /// case the connection is closed with 1013 and its queue dropped.
    pub fn push(&self, frame: Bytes, limits: &Limits) -> Result<(), Overflow> {
        self.push_if(frame, limits, || true).map(|_| ())
    }

    /// [`push`](Self::push), if `admits` says so when asked under the
    /// outbox's lock: a decision taken together with the push, never
    /// between two steps of a [`rewrite`](Self::rewrite) (a replay sets
    /// what a connection must not get twice inside its rewrite, so a live
    /// push is either held before it, and filtered by it, or checked
    /// after it). Returns whether the frame was queued (not when refused
    /// or when the connection is closing).
    pub fn push_if(
        &self,
        frame: Bytes,
        limits: &Limits,
        admits: impl FnOnce() -> bool,
    ) -> Result<bool, Overflow> {
        let (queued, wake) = self.push_held(frame, limits, admits)?;
        if wake {
            self.wake();
        }
        Ok(queued)
    }

    /// [`push_if`](Self::push_if) without waking the writer: returns
    /// whether the frame was queued and whether the writer needs a wake-up
    /// (the queue was empty), which the caller then makes with
    /// [`wake_writer`](Self::wake_writer), now or a moment later
    /// (`--write-delay`). An overflow still wakes it at once, to close.
    pub fn push_held(
        &self,
        frame: Bytes,
        limits: &Limits,
        admits: impl FnOnce() -> bool,
    ) -> Result<(bool, bool), Overflow> {
        let mut state = self.state.lock();
        if !admits() {
            return Ok((false, false));
        }
        if state.close.is_some() {
            // Closing: what is pushed now would never be read.
            return Ok((false, false));
        }
        let too_many = state.frames.len() >= limits.frames;
        let too_big =
            !state.frames.is_empty() && state.bytes.saturating_add(frame.len()) > limits.bytes;
        if too_many || too_big {
            state.frames = VecDeque::new();
            state.bytes = 0;
            state.close = Some(Box::new(Close {
                frame: frame::encode_close(close_code::TRY_AGAIN_LATER, "client too slow"),
                code: close_code::TRY_AGAIN_LATER,
                discard_queued: true,
            }));
            drop(state);
            self.wake();
            return Err(Overflow);
        }
        let was_empty = state.frames.is_empty();
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        // The writer drains until empty before it waits again, so only the
        // empty -> non-empty transition needs a wake-up.
        Ok((true, was_empty))
    }

    /// Wakes the writer for frames [`push_held`](Self::push_held) queued.
    pub fn wake_writer(&self) {
        self.wake();
    }

    /// Asks the writer to close the connection, after the frames already
    /// queued unless `discard_queued`. The first close asked for wins, except
    /// that a discarding close (ping timeout, overflow, protocol error)
    /// replaces a graceful one: a client that stopped reading would never
    /// take the frames queued before a graceful close.
    pub fn close(&self, code: u16, reason: &str, discard_queued: bool) {
        let mut state = self.state.lock();
        match &state.close {
            Some(existing) if existing.discard_queued || !discard_queued => return,
            _ => {}
        }
        if discard_queued {
            state.frames = VecDeque::new();
            state.bytes = 0;
        }
        state.close = Some(Box::new(Close {
            frame: frame::encode_close(code, reason),
            code,
            discard_queued,
        }));
        drop(state);
        self.wake();
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.state.lock().close.is_some()
    }

    /// A close that must happen now, without sending what is queued (a
    /// graceful close waits for the queue to drain instead).
    pub fn discarding_close(&self) -> Option<Box<Close>> {
        self.state.lock().close.clone().filter(|c| c.discard_queued)
    }

    /// Moves up to [`BATCH`] queued frames into `batch`; reports the close
    /// once nothing more is to be sent before it.
    pub fn take(&self, batch: &mut VecDeque<Bytes>) -> Taken {
        let mut state = self.state.lock();
        let before = batch.len();
        if before == 0 && state.frames.len() <= BATCH {
            // The whole queue, allocation and all: the outbox is left with
            // the writer's empty one, so an idle connection's queue owns no
            // memory (the writer frees its batch once written).
            std::mem::swap(batch, &mut state.frames);
            if state.frames.capacity() > 0 {
                state.frames = VecDeque::new();
            }
        } else {
            let n = state.frames.len().min(BATCH);
            batch.extend(state.frames.drain(..n));
            if state.frames.is_empty() {
                // Give back what a burst grew, so an idle connection stays
                // small.
                state.frames = VecDeque::new();
            }
        }
        let taken: usize = batch.iter().skip(before).map(Bytes::len).sum();
        state.bytes -= taken;
        let close = if state.frames.is_empty() {
            state.close.clone()
        } else {
            None
        };
        Taken { close }
    }

    fn wake(&self) {
        self.flags.fetch_or(WOKEN, Ordering::Release);
        self.waker.wake();
    }

    /// Whether the writer was woken since it last looked (tests).
    #[cfg(test)]
    pub(crate) fn was_woken(&self) -> bool {
        self.flags.load(Ordering::Acquire) & WOKEN != 0
    }

    fn take_woken(&self) -> bool {
        self.flags.fetch_and(!WOKEN, Ordering::AcqRel) & WOKEN != 0
    }

    /// Marks the connection as opted in to recovery: pushes reach it framed.
    pub fn set_framed(&self) {
        self.flags.fetch_or(FRAMED, Ordering::Release);
    }

    /// Whether the connection opted in to recovery.
    pub fn is_framed(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FRAMED != 0
    }

    /// Rewrites the queue in one locked step (a replay puts its frames
    /// before the live pushes held meanwhile). Not bounded by the limits: the
    /// caller bounds what it adds. Nothing happens once a close was asked.
    pub fn rewrite(&self, f: impl FnOnce(&mut VecDeque<Bytes>)) {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return;
        }
        f(&mut state.frames);
        state.bytes = state.frames.iter().map(Bytes::len).sum();
        drop(state);
        self.wake();
    }

    /// Ready once something was pushed or a close was asked for since the
    /// last time it was ready.
    pub fn poll_wake(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.take_woken() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.take_woken() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until something was pushed or a close was asked for.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_wake(cx)).await
    }

    /// Records activity from the client at `now_ms` on the hub's clock.
    pub fn touch(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }

    /// Has the sweep close the connection at `at_ms` on the hub's clock
    /// (its token expires then).
    pub fn expire_at(&self, at_ms: u64) {
        self.expires_at.store(at_ms.max(1), Ordering::Relaxed);
    }

    /// Whether the connection's token has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        let at = self.expires_at.load(Ordering::Relaxed);
        at != 0 && now_ms >= at
    }

    /// When the client last sent anything, in ms on the hub's clock.
    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Records whether the client has a frame or message unfinished, from
    /// `now_ms`; the first moment counts.
    pub fn set_incomplete(&self, incomplete: bool, now_ms: u64) {
        if !incomplete {
            self.incomplete_since.store(0, Ordering::Relaxed);
        } else if self.incomplete_since.load(Ordering::Relaxed) == 0 {
            self.incomplete_since.store(now_ms + 1, Ordering::Relaxed);
        }
    }

    /// Records that the reader holds `bytes` of an unfinished message;
    /// returns what it held before.
    pub fn swap_partial_bytes(&self, bytes: usize) -> usize {
        self.partial_bytes.swap(bytes, Ordering::Relaxed)
    }

    /// Bytes of the unfinished message, as last recorded.
    pub fn partial_bytes(&self) -> usize {
        self.partial_bytes.load(Ordering::Relaxed)
    }

    /// Since when the client has left a frame or message unfinished.
    pub fn incomplete_since(&self) -> Option<u64> {
        match self.incomplete_since.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t - 1),
        }
    }

    /// Frames waiting to be written.
    pub fn len(&self) -> usize {
        self.state.lock().frames.len()
    }

    /// Whether no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize) -> Limits {
        Limits {
            frames: n,
            bytes: usize::MAX,
        }
    }

    #[test]
    fn the_recovery_flag_costs_no_byte_and_keeps_wakes_apart() {
        // 120 bytes, as before the flag existed: it shares the wake-up byte.
        assert_eq!(std::mem::size_of::<Outbox>(), 120);
        let outbox = Outbox::default();
        assert!(!outbox.is_framed());
        outbox.set_framed();
        assert!(outbox.is_framed());
        assert!(!outbox.take_woken());
        outbox.push(Bytes::from_static(b"x"), &frames(3)).unwrap();
        assert!(outbox.take_woken());
        assert!(!outbox.take_woken());
        assert!(outbox.is_framed());
    }

    /// A replay sets its filter inside its rewrite; a push whose filter
    /// check raced with it is decided after the rewrite, against the new
    /// filter, never let in by the old one after the rewrite (a push the
    /// replay gave, delivered twice).
    #[test]
    fn a_push_decided_during_a_rewrite_sees_what_the_rewrite_set() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let outbox = Arc::new(Outbox::default());
        let replayed = Arc::new(AtomicBool::new(false));
        let mut live = None;
        outbox.rewrite(|queue| {
            queue.push_back(Bytes::from_static(b"replayed"));
            let (outbox, seen) = (outbox.clone(), replayed.clone());
            live = Some(std::thread::spawn(move || {
                // The fan-out's check: not already replayed.
                let admits = || !seen.load(Ordering::SeqCst);
                outbox.push_if(Bytes::from_static(b"live"), &frames(10), admits)
            }));
            // Give the push time to wait for the lock (if it were checked
            // before it, it would be let in below).
            std::thread::sleep(std::time::Duration::from_millis(50));
            replayed.store(true, Ordering::SeqCst);
        });
        live.unwrap().join().unwrap().unwrap();
        let state = outbox.state.lock();
        assert_eq!(state.frames, [Bytes::from_static(b"replayed")]);
    }

    #[test]
    fn overflow_closes_with_1013_and_drops_the_queue() {
        let outbox = Outbox::default();
        for _ in 0..3 {
            outbox.push(Bytes::from_static(b"x"), &frames(3)).unwrap();
        }
        assert_eq!(
            outbox.push(Bytes::from_static(b"x"), &frames(3)),
            Err(Overflow)
        );
        let mut batch = VecDeque::new();
        let taken = outbox.take(&mut batch);
        assert!(batch.is_empty());
        let close = taken.close.unwrap();
        assert_eq!(close.code, 1013);
        assert!(close.discard_queued);
        // Later pushes are dropped silently, never queued.
        outbox.push(Bytes::from_static(b"x"), &frames(3)).unwrap();
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_discarding_close_replaces_a_graceful_one() {
        let outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"x"), &frames(10)).unwrap();
        outbox.close(1000, "bye", false);
        assert_eq!(outbox.discarding_close(), None);
        outbox.close(1000, "ping timeout", true);
        assert!(outbox.discarding_close().is_some());
        // And not the other way round.
        outbox.close(1001, "later", false);
        assert!(outbox.discarding_close().is_some());
    }

    #[test]
    fn graceful_close_comes_after_queued_frames() {
        let outbox = Outbox::default();
        for _ in 0..(BATCH + 1) {
            outbox
                .push(Bytes::from_static(b"x"), &frames(1000))
                .unwrap();
        }
        outbox.close(1001, "bye", false);
        let mut batch = VecDeque::new();
        assert!(outbox.take(&mut batch).close.is_none());
        assert_eq!(batch.len(), BATCH);
        batch.clear();
        let close = outbox.take(&mut batch).close.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(close.code, 1001);
    }

    #[test]
    fn bytes_bound_the_queue_as_well_as_frames() {
        let outbox = Outbox::default();
        let limits = Limits {
            frames: 100,
            bytes: 10,
        };
        // One frame larger than the bound is taken into an empty queue.
        outbox.push(Bytes::from(vec![0; 64]), &limits).unwrap();
        let mut batch = VecDeque::new();
        outbox.take(&mut batch);
        outbox.push(Bytes::from(vec![0; 6]), &limits).unwrap();
        outbox.push(Bytes::from(vec![0; 4]), &limits).unwrap();
        assert_eq!(outbox.push(Bytes::from(vec![0; 1]), &limits), Err(Overflow));
        assert_eq!(outbox.discarding_close().unwrap().code, 1013);
    }

    #[test]
    fn a_drained_queue_owns_no_memory() {
        let outbox = Outbox::default();
        for _ in 0..3 {
            outbox.push(Bytes::from_static(b"x"), &frames(10)).unwrap();
        }
        let mut batch = VecDeque::new();
        outbox.take(&mut batch);
        assert_eq!(batch.len(), 3);
        assert_eq!(outbox.state.lock().frames.capacity(), 0);
        // Past one batch: the rest stays queued, in order.
        for i in 0..(BATCH + 2) {
            outbox
                .push(Bytes::from(vec![i as u8]), &frames(1000))
                .unwrap();
        }
        batch.clear();
        outbox.take(&mut batch);
        assert_eq!(batch.len(), BATCH);
        assert_eq!(batch[0][0], 0);
        batch.clear();
        outbox.take(&mut batch);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0][0], BATCH as u8);
        assert_eq!(outbox.state.lock().frames.capacity(), 0);
    }
}
