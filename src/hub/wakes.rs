//! `--write-delay`: the wake-ups of connection writers a fan-out would
//! make are held for a moment and made together, so a connection that
//! gets several pushes meanwhile writes them with one system call instead
//! of one each (Centrifugo's `write_delay`). Off (0) by default: a push
//! then wakes its writers at once.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::outbox::Outbox;

/// Writers to wake at the next flush, and the flusher's timing.
#[derive(Debug)]
pub struct HeldWakes {
    delay: Duration,
    /// Outboxes that got their first frame since the last flush (each
    /// once: later frames find the queue non-empty and add nothing).
    pending: Mutex<Vec<Arc<Outbox>>>,
    /// Rung when `pending` stops being empty.
    filled: Notify,
}

impl HeldWakes {
    /// Wake-ups held for `delay` (tokio's timers tick in milliseconds, so
    /// less than 1ms waits 1ms).
    pub fn new(delay: Duration) -> Self {
        HeldWakes {
            delay,
            pending: Mutex::default(),
            filled: Notify::new(),
        }
    }

    /// The delay.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Holds the wake-ups of `outboxes` (emptied) until the next flush.
    pub fn hold(&self, outboxes: &mut Vec<Arc<Outbox>>) {
        if outboxes.is_empty() {
            return;
        }
        let mut pending = self.pending.lock();
        let first = pending.is_empty();
        pending.append(outboxes);
        drop(pending);
        if first {
            // Stored as a permit if the flusher is not waiting yet.
            self.filled.notify_one();
        }
    }

    /// Flushes for the node's life: once wake-ups are held, waits the
    /// delay, then wakes every writer held meanwhile. Idle, it waits
    /// without a timer.
    pub async fn run(self: Arc<Self>) {
        let mut taken = Vec::new();
        loop {
            self.filled.notified().await;
            tokio::time::sleep(self.delay).await;
            self.flush(&mut taken);
        }
    }

    /// Wakes every writer held now; `taken` is scratch space.
    fn flush(&self, taken: &mut Vec<Arc<Outbox>>) {
        std::mem::swap(taken, &mut *self.pending.lock());
        for outbox in taken.drain(..) {
            outbox.wake_writer();
        }
        if taken.capacity() > 4096 {
            // Give back what a burst grew.
            *taken = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Limits;
    use bytes::Bytes;

    #[test]
    fn a_held_push_wakes_its_writer_only_at_the_flush_and_once() {
        let held = HeldWakes::new(Duration::from_millis(1));
        let outbox = Arc::new(Outbox::default());
        let limits = Limits {
            frames: 10,
            bytes: usize::MAX,
        };
        let mut woken = Vec::new();
        for _ in 0..3 {
            let pushed = outbox.push_held(Bytes::from_static(b"x"), &limits, || true);
            if pushed == Ok((true, true)) {
                woken.push(outbox.clone());
            }
        }
        assert_eq!(woken.len(), 1, "only the first frame asks for a wake-up");
        held.hold(&mut woken);
        assert!(!outbox.was_woken(), "not woken before the flush");
        held.flush(&mut Vec::new());
        assert!(outbox.was_woken(), "woken by the flush");
        assert_eq!(outbox.len(), 3);
    }
}
