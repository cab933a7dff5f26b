//! The events queue: the handle connections enqueue on without waiting,
//! its bounds (by count, by bytes, per connection), and the task that
//! drains it into the sink, trimming the stream by bytes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::sinks::{post_all, webhook_client, write_stream};
use super::{Detail, Event, Sink};
use crate::ids::{ClientId, NodeId};
use crate::metrics::Metrics;

/// Most events waiting for the sink (their bytes are bounded too, by
/// `--events-queue-bytes`).
const QUEUE: usize = 10_000;

/// Events written to the stream in one pipeline.
const BATCH: usize = 256;

/// The handle connections use: enqueue and never wait.
#[derive(Debug, Clone)]
pub struct Events {
    tx: mpsc::Sender<Item>,
    bytes: Arc<QueueBytes>,
    /// `--events-max-bytes`.
    max_event_bytes: usize,
}

/// The bounds of the events queue and stream, from the options.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// `--events-queue-bytes`.
    pub queue_bytes: usize,
    /// `--events-max-bytes`.
    pub max_event_bytes: usize,
    /// `--events-stream-bytes`.
    pub stream_bytes: usize,
}

/// Shards of the per-connection byte counts (a short lock each).
const SHARDS: usize = 16;

enum Item {
    /// An event and the bytes it counts for in [`QueueBytes`].
    Event(Box<Event>, usize),
    /// Answered once every event queued before it was handed to the sink.
    Flush(oneshot::Sender<()>),
}

/// The bytes of the events queued and not yet handed to the sink, bounded
/// in all and per connection.
#[derive(Debug)]
struct QueueBytes {
    used: AtomicUsize,
    limit: usize,
    /// Bytes queued per connection (only connections with some queued).
    per_client: Box<[parking_lot::Mutex<HashMap<ClientId, usize>>]>,
    /// What one connection may have queued: an eighth of the queue.
    client_limit: usize,
}

impl QueueBytes {
    fn new(limit: usize) -> Self {
        QueueBytes {
            used: AtomicUsize::new(0),
            limit,
            per_client: (0..SHARDS).map(|_| Default::default()).collect(),
            client_limit: (limit / 8).max(1),
        }
    }

    /// Counts `n` more bytes for `client` unless that would pass the limit
    /// or the client's share (a close event, `fair: false`, has no share to
    /// keep). An event always fits an empty queue, whatever its size, so a
    /// limit below the largest message does not silence every message.
    fn take(&self, client: ClientId, n: usize, fair: bool) -> bool {
        let mut shard = self.per_client[client.number() as usize % SHARDS].lock();
        let held = shard.get(&client).copied().unwrap_or(0);
        if fair && held > 0 && held + n > self.client_limit {
            return false;
        }
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let total = used.checked_add(n)?;
                (used == 0 || total <= self.limit).then_some(total)
            })
            .is_ok();
        if taken {
            shard.insert(client, held + n);
        }
        taken
    }

    fn release(&self, client: ClientId, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        let mut shard = self.per_client[client.number() as usize % SHARDS].lock();
        if let Some(held) = shard.get_mut(&client) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                shard.remove(&client);
            }
        }
    }
}

impl Events {
    /// The handle, and the task that drains events into `sink` (for the
    /// caller to spawn, as a critical task). At most `queue_bytes` of
    /// events wait for the sink at once.
    pub fn new(
        sink: Sink,
        node: NodeId,
        metrics: Arc<Metrics>,
        bounds: Bounds,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (mut events, rx) = Self::queue(bounds.queue_bytes);
        events.max_event_bytes = bounds.max_event_bytes;
        let trim = Trim::new(bounds.stream_bytes);
        let drained = drain(sink, node, rx, events.bytes.clone(), metrics, trim);
        (events, drained)
    }

    fn queue(queue_bytes: usize) -> (Self, mpsc::Receiver<Item>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let bytes = Arc::new(QueueBytes::new(queue_bytes));
        let events = Events {
            tx,
            bytes,
            max_event_bytes: usize::MAX,
        };
        (events, rx)
    }

    /// The event's size, or `None` (counted as too large and dropped)
    /// past `--events-max-bytes`.
    fn size_within_bound(&self, event: &Event, metrics: &Metrics) -> Option<usize> {
        let size = event.approx_size();
        if size > self.max_event_bytes {
            metrics.events_too_large.inc();
            metrics.events_dropped.inc();
            return None;
        }
        Some(size)
    }

    /// Queues an event; drops it (counted) when it is larger than
    /// `--events-max-bytes`, or when the sink is too far behind, by count
    /// or by bytes, or when its connection holds its share of the queue.
    pub fn emit(&self, event: Event, metrics: &Metrics) {
        let Some(size) = self.size_within_bound(&event, metrics) else {
            return;
        };
        let client = event.client_id;
        // Close and presence events have no share to keep: presence ones
        // all count for one pseudo-connection (the node's number 0).
        let fair = !matches!(event.detail, Detail::Close | Detail::Presence { .. });
        if !self.bytes.take(client, size, fair) {
            metrics.events_dropped.inc();
            return;
        }
        if self
            .tx
            .try_send(Item::Event(Box::new(event), size))
            .is_err()
        {
            self.bytes.release(client, size);
            metrics.events_dropped.inc();
        }
    }

    /// Queues an event like [`Events::emit`], but waits (at most `limit`)
    /// for room in the queue instead of dropping at once: for bursts from
    /// background tasks (a dead node's close events, presence transitions),
    /// never for a connection.
    pub async fn emit_wait(&self, event: Event, metrics: &Metrics, limit: Duration) {
        let Some(size) = self.size_within_bound(&event, metrics) else {
            return;
        };
        let client = event.client_id;
        let deadline = tokio::time::Instant::now() + limit;
        // The byte bound: wait for the sink to take some.
        while !self.bytes.take(client, size, false) {
            if tokio::time::Instant::now() >= deadline {
                metrics.events_dropped.inc();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sent =
            tokio::time::timeout_at(deadline, self.tx.send(Item::Event(Box::new(event), size)))
                .await;
        if !matches!(sent, Ok(Ok(()))) {
            self.bytes.release(client, size);
            metrics.events_dropped.inc();
        }
    }

    /// Waits (at most `limit`) until the events queued so far were handed to
    /// the sink: at shutdown, so the last close events are not lost.
    pub async fn flush(&self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        let flushed = async {
            if self.tx.send(Item::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        };
        let _ = tokio::time::timeout(limit, flushed).await;
    }
}

/// The length the stream is trimmed to: `--events-max-len`, less when
/// the average event is large, so the stream holds about
/// `--events-stream-bytes` at most.
#[derive(Debug)]
struct Trim {
    stream_bytes: usize,
    /// Average size of the events written (exponentially weighted).
    average: f64,
}

impl Trim {
    fn new(stream_bytes: usize) -> Self {
        Trim {
            stream_bytes,
            average: 0.0,
        }
    }

    /// Notes a batch's sizes.
    fn saw(&mut self, sizes: impl Iterator<Item = usize>) {
        for size in sizes {
            let size = size as f64;
            self.average = if self.average == 0.0 {
                size
            } else {
                self.average * 0.99 + size * 0.01
            };
        }
    }

    /// MAXLEN for the next batch: at most `max_len`, at least 1.
    fn max_len(&self, max_len: i64) -> i64 {
        if self.stream_bytes == 0 || self.average <= 0.0 {
            return max_len;
        }
        let by_bytes = (self.stream_bytes as f64 / self.average) as i64;
        by_bytes.clamp(1, max_len)
    }
}

async fn drain(
    sink: Sink,
    node: NodeId,
    mut rx: mpsc::Receiver<Item>,
    bytes: Arc<QueueBytes>,
    metrics: Arc<Metrics>,
    mut trim: Trim,
) {
    let http = match webhook_client() {
        Ok(http) => Some(http),
        Err(e) => {
            tracing::error!(error = %e.without_url(), "no HTTP client for the event webhook");
            None
        }
    };
    let mut items = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut items, BATCH).await > 0 {
        let mut flushes = Vec::new();
        let mut batch = Vec::with_capacity(items.len());
        let mut taken = Vec::with_capacity(items.len());
        for item in items.drain(..) {
            match item {
                Item::Event(event, size) => {
                    taken.push((event.client_id, size));
                    batch.push(*event);
                }
                Item::Flush(done) => flushes.push(done),
            }
        }
        if !batch.is_empty() {
            let sent = match &sink {
                Sink::Stream {
                    client,
                    key,
                    max_len,
                } => {
                    trim.saw(taken.iter().map(|(_, size)| *size));
                    write_stream(client, key, trim.max_len(*max_len), node, &batch).await
                }
                Sink::Webhook { url } => match &http {
                    Some(http) => post_all(http, url, node, &batch).await,
                    None => 0,
                },
            };
            metrics.events_sent.inc_by(sent as u64);
            metrics.events_dropped.inc_by((batch.len() - sent) as u64);
        }
        // Given back once the batch is done with, not when it was taken:
        // until then its events are still in memory.
        drop(batch);
        for (client, size) in taken {
            bytes.release(client, size);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{message, message_from};
    use super::*;
    use crate::session::Session;

    #[test]
    fn events_past_the_byte_bound_are_dropped_and_counted() {
        let metrics = Metrics::new();
        let size = message(64 * 1024).approx_size();
        // Room for two 64 KiB messages, not three.
        let (events, mut rx) = Events::queue(2 * size + size / 2);
        for _ in 0..3 {
            events.emit(message(64 * 1024), &metrics);
        }
        assert_eq!(metrics.events_dropped.get(), 1);
        // Small events still fit in what is left.
        events.emit(message(10), &metrics);
        assert_eq!(metrics.events_dropped.get(), 1);
        // Once the sink has taken one, there is room again.
        let Ok(Item::Event(event, taken)) = rx.try_recv() else {
            panic!("an event is queued")
        };
        events.bytes.release(event.client_id, taken);
        events.emit(message(64 * 1024), &metrics);
        assert_eq!(metrics.events_dropped.get(), 1);
    }

    #[test]
    fn an_event_larger_than_the_bound_fits_an_empty_queue() {
        let metrics = Metrics::new();
        let (events, _rx) = Events::queue(1024);
        events.emit(message(64 * 1024), &metrics);
        assert_eq!(metrics.events_dropped.get(), 0);
        events.emit(message(10), &metrics);
        assert_eq!(metrics.events_dropped.get(), 1);
    }

    #[test]
    fn one_chatty_connection_cannot_fill_the_queue() {
        let metrics = Metrics::new();
        let size = message(1000).approx_size();
        let (events, _rx) = Events::queue(size * 80);
        // One connection gets about an eighth of the queue...
        for _ in 0..80 {
            events.emit(message_from(7, 1000), &metrics);
        }
        let dropped = metrics.events_dropped.get();
        assert!((65..=71).contains(&dropped), "{dropped}");
        // ...and every other connection still gets in, its close too.
        for n in 100..150 {
            events.emit(message_from(n, 1000), &metrics);
        }
        let close = Event::new(
            message_from(7, 0).client_id,
            None,
            Session::new(),
            Detail::Close,
        );
        events.emit(close, &metrics);
        assert_eq!(metrics.events_dropped.get(), dropped);
    }

    #[test]
    fn events_past_the_size_cap_are_dropped_and_the_stream_trims_by_bytes() {
        let metrics = Metrics::new();
        let (mut events, _rx) = Events::queue(1 << 20);
        events.max_event_bytes = 10_000;
        events.emit(message(20_000), &metrics);
        assert_eq!(metrics.events_too_large.get(), 1);
        assert_eq!(metrics.events_dropped.get(), 1);
        events.emit(message(100), &metrics);
        assert_eq!(metrics.events_dropped.get(), 1);
        // 1,000 bytes on average: a 1 MB bound keeps about 1,000 entries.
        let mut trim = Trim::new(1_000_000);
        assert_eq!(trim.max_len(100_000), 100_000);
        trim.saw(std::iter::repeat_n(1000, 50));
        assert_eq!(trim.max_len(100_000), 1000);
        assert_eq!(trim.max_len(10), 10);
    }

    /// The real drain gives the bytes back: with Redis unreachable, events
    /// are dropped by the sink, and the queue is empty again after a flush.
    #[tokio::test]
    async fn the_drain_gives_the_bytes_back() {
        let metrics = Arc::new(Metrics::new());
        let client = fred::types::Builder::default_centralized()
            .build()
            .expect("a client, never connected");
        let sink = Sink::Stream {
            client,
            key: "events".into(),
            max_len: 10,
        };
        let node = NodeId::new(std::net::Ipv4Addr::LOCALHOST, 2900);
        let size = message(64 * 1024).approx_size();
        let bounds = Bounds {
            queue_bytes: size,
            max_event_bytes: usize::MAX,
            stream_bytes: 0,
        };
        let (events, drained) = Events::new(sink, node, metrics.clone(), bounds);
        tokio::spawn(drained);
        for _ in 0..3 {
            events.emit(message(64 * 1024), &metrics);
            events.flush(Duration::from_secs(5)).await;
            assert_eq!(events.bytes.used.load(Ordering::Acquire), 0);
        }
        // Each was taken by the queue and then dropped by the sink.
        assert_eq!(metrics.events_dropped.get(), 3);
        assert_eq!(metrics.events_sent.get(), 0);
    }
}
