//! The node's bounded inbox between the subscriber connections and the
//! dispatcher thread, in two lanes:
//!
//! - `Control`: messages the dispatcher always takes first: this node's
//!   reply channel (see [`Lane::Control`]).
//! - `Bulk`: every other channel (groups, uids, `all`, this node's own).
//!
//! Each lane is bounded by bytes. A full lane does not drop: the
//! connection that tries to add to it waits, so it stops reading its
//! socket, and the rest of a burst waits in the kernel's buffers and in
//! Redis's output buffer for this client (`client-output-buffer-limit
//! pubsub`). If that fills too, Redis closes the connection and the node
//! resyncs (see `subscriber`): loud, never silent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tokio::sync::Semaphore;

/// Most bytes the bulk lane holds (payloads plus a fixed overhead each).
const BULK_BYTES: usize = 64 << 20;

/// Most bytes the control lane holds.
const CONTROL_BYTES: usize = 16 << 20;

/// What a queued message costs beyond its payload and channel, roughly.
const MESSAGE_OVERHEAD: usize = 96;

/// Bulk messages the dispatcher takes at once before it looks at the
/// control lane again.
const BULK_BATCH: usize = 256;

/// Which lane a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Messages that go before the bulk: replies to this node's commands
    /// (its reply channel), which have no order with any push. This node's
    /// own channel also carries pushes and closes whose order with group
    /// and uid pushes users rely on, so it stays in the bulk lane
    /// (docs/redis.md, section 6).
    Control,
    /// Every other channel.
    Bulk,
}

/// A pub/sub message as Redis sent it.
pub struct Message {
    /// The channel's name.
    pub channel: Bytes,
    /// The envelope.
    pub payload: Bytes,
    /// What it holds of its lane's budget.
    cost: u32,
}

/// Handles a message on the subscriber connection's own task, when it is
/// cheap and nothing is queued before it (see [`Inbox::set_direct`]).
pub trait Direct: Send + Sync {
    /// Whether a message on `channel` reaches few connections (a uid's,
    /// this node's or its reply channel), so handling it on the reader's
    /// task holds that task for no longer than a read.
    fn cheap(&self, channel: &[u8]) -> bool;
    /// Handles it, as the dispatcher would.
    fn handle(&self, channel: &[u8], payload: &[u8]);
}

/// The two lanes and their budgets.
pub struct Inbox {
    state: Mutex<State>,
    ready: Condvar,
    control: Semaphore,
    bulk: Semaphore,
    /// Times a connection had to wait on a full lane (see `behind`).
    waits: AtomicU64,
    /// Cheap messages handled by their reader when the inbox is idle.
    direct: OnceLock<Box<dyn Direct>>,
}

#[derive(Default)]
struct State {
    control: VecDeque<Message>,
    bulk: VecDeque<Message>,
    closed: bool,
    /// Messages are being handled (a batch by the dispatcher, or one by
    /// its reader): nothing else may start, so order is kept.
    busy: bool,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            state: Mutex::default(),
            ready: Condvar::new(),
            control: Semaphore::new(CONTROL_BYTES),
            bulk: Semaphore::new(BULK_BYTES),
            waits: AtomicU64::new(0),
            direct: OnceLock::new(),
        }
    }
}

/// A batch taken by the dispatcher; its budget is given back by
/// [`Inbox::release`] once handled.
#[derive(Default)]
pub struct Batch {
    /// The messages, control lane first.
    pub messages: Vec<Message>,
    control_cost: usize,
    bulk_cost: usize,
}

impl Inbox {
    fn budget(&self, lane: Lane) -> (&Semaphore, usize) {
        match lane {
            Lane::Control => (&self.control, CONTROL_BYTES),
            Lane::Bulk => (&self.bulk, BULK_BYTES),
        }
    }

    /// Lets readers handle cheap messages themselves while nothing is
    /// queued or being handled: one thread hand-off less (reader task to
    /// dispatcher thread) on the path of a push to a uid or a client, and
    /// of a reply (issue 33, cross-node latency). Set once.
    pub fn set_direct(&self, direct: Box<dyn Direct>) {
        let _ = self.direct.set(direct);
    }

    /// Handles the message on the caller's task if it is cheap and the
    /// inbox is idle (empty, nothing being handled); false if it must be
    /// queued.
    fn try_direct(&self, channel: &[u8], payload: &[u8]) -> bool {
        let Some(direct) = self.direct.get() else {
            return false;
        };
        if !direct.cheap(channel) {
            return false;
        }
        {
            let mut state = self.state.lock();
            let idle = !state.busy && state.control.is_empty() && state.bulk.is_empty();
            if !idle || state.closed {
                return false;
            }
            state.busy = true;
        }
        direct.handle(channel, payload);
        let mut state = self.state.lock();
        state.busy = false;
        let queued = !state.control.is_empty() || !state.bulk.is_empty();
        drop(state);
        if queued {
            // Queued meanwhile, behind this one: the dispatcher's turn.
            self.ready.notify_one();
        }
        true
    }

    /// Adds a message, waiting while its lane is full. `behind` is true
    /// while it waits (the connection's probe then knows a silence is this
    /// node's doing, not Redis's). Returns whether it had to wait. A cheap
    /// message is handled at once instead when the inbox is idle (see
    /// [`Inbox::set_direct`]).
    pub async fn push(
        &self,
        lane: Lane,
        channel: Bytes,
        payload: Bytes,
        behind: &AtomicBool,
    ) -> bool {
        if self.try_direct(&channel, &payload) {
            return false;
        }
        let (budget, most) = self.budget(lane);
        // A message larger than the whole lane still goes through, alone.
        let cost = (MESSAGE_OVERHEAD + channel.len() + payload.len()).min(most) as u32;
        let waited = match budget.try_acquire_many(cost) {
            Ok(permit) => {
                permit.forget();
                false
            }
            Err(_) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                behind.store(true, Ordering::Release);
                let acquired = budget.acquire_many(cost).await;
                behind.store(false, Ordering::Release);
                match acquired {
                    Ok(permit) => permit.forget(),
                    // Closed: the node is stopping.
                    Err(_) => return true,
                }
                true
            }
        };
        let message = Message {
            channel,
            payload,
            cost,
        };
        let mut state = self.state.lock();
        let was_empty = state.control.is_empty() && state.bulk.is_empty();
        match lane {
            Lane::Control => state.control.push_back(message),
            Lane::Bulk => state.bulk.push_back(message),
        }
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        waited
    }

    /// Times a connection had to wait on a full lane, since the start.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Bytes held by both lanes (queued or being handled).
    pub fn queued_bytes(&self) -> usize {
        (CONTROL_BYTES - self.control.available_permits().min(CONTROL_BYTES))
            + (BULK_BYTES - self.bulk.available_permits().min(BULK_BYTES))
    }

    /// Ends the dispatcher (the node is stopping).
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.control.close();
        self.bulk.close();
        self.ready.notify_one();
    }

    /// Waits for messages (calling `idle` once after `idle_after` without
    /// any) and takes a batch: the whole control lane, then up to
    /// [`BULK_BATCH`] bulk messages. Returns false once closed.
    pub fn take(&self, batch: &mut Batch, idle_after: Duration, mut idle: impl FnMut()) -> bool {
        let mut state = self.state.lock();
        let mut idled = false;
        // Also while a reader handles a message itself: what was queued
        // meanwhile comes after it.
        while (state.busy || (state.control.is_empty() && state.bulk.is_empty())) && !state.closed {
            if idled {
                self.ready.wait(&mut state);
            } else if self.ready.wait_for(&mut state, idle_after).timed_out() {
                idle();
                idled = true;
            }
        }
        if state.closed {
            return false;
        }
        state.busy = true;
        for message in state.control.drain(..) {
            batch.control_cost += message.cost as usize;
            batch.messages.push(message);
        }
        let n = state.bulk.len().min(BULK_BATCH);
        for message in state.bulk.drain(..n) {
            batch.bulk_cost += message.cost as usize;
            batch.messages.push(message);
        }
        if state.control.capacity() > 1024 && state.control.is_empty() {
            state.control = VecDeque::new();
        }
        if state.bulk.capacity() > 4096 && state.bulk.is_empty() {
            // Give back what a burst grew.
            state.bulk = VecDeque::new();
        }
        true
    }

    /// Gives back a handled batch's budget: the connections waiting on it
    /// read on.
    pub fn release(&self, batch: &mut Batch) {
        batch.messages.clear();
        self.state.lock().busy = false;
        self.control
            .add_permits(std::mem::take(&mut batch.control_cost));
        self.bulk.add_permits(std::mem::take(&mut batch.bulk_cost));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_full_lane_waits_instead_of_dropping_and_control_goes_first() {
        let inbox = Arc::new(Inbox::default());
        let behind = AtomicBool::new(false);
        let big = Bytes::from(vec![0u8; BULK_BYTES / 2]);
        inbox
            .push(Lane::Bulk, "b".into(), big.clone(), &behind)
            .await;
        // The second one fits only partly: it must wait, not drop.
        let pusher = {
            let inbox = inbox.clone();
            let big = big.clone();
            tokio::spawn(async move {
                let behind = AtomicBool::new(false);
                inbox.push(Lane::Bulk, "b".into(), big, &behind).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pusher.is_finished(), "a full lane made the reader wait");
        inbox
            .push(Lane::Control, "c".into(), "cmd".into(), &behind)
            .await;
        let mut batch = Batch::default();
        assert!(inbox.take(&mut batch, Duration::from_secs(1), || {}));
        let channels: Vec<&[u8]> = batch.messages.iter().map(|m| &m.channel[..]).collect();
        assert_eq!(channels, [&b"c"[..], &b"b"[..]], "control first");
        inbox.release(&mut batch);
        pusher.await.unwrap();
        assert!(inbox.take(&mut batch, Duration::from_secs(1), || {}));
        assert_eq!(batch.messages.len(), 1, "nothing was dropped");
        inbox.release(&mut batch);
        inbox.close();
        assert!(!inbox.take(&mut batch, Duration::from_secs(1), || {}));
    }
}
