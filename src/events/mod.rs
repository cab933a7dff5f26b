//! Events back to backends (`--events`): connect, message and close, the
//! counterpart of GatewayWorker's BusinessWorker onConnect / onMessage /
//! onClose, without a worker process in the gateway.
//!
//! With Redis, events are appended to a Stream that backends read with a
//! consumer group (at-least-once from the stream on). Without Redis, each
//! event is POSTed as JSON to `--events-webhook`. Either way the connection
//! never waits: events go through a queue bounded both by count and by bytes
//! (`--events-queue-bytes`: 64 KiB messages would otherwise make the 10,000
//! events ~640 MiB), and when the sink falls that far behind, new events are
//! dropped and counted.
//!
//! No client can take the queue for itself: one connection's events may
//! hold at most an eighth of `--events-queue-bytes` (close events, one per
//! connection, always fit), so a chatty client loses its own events first.
//! An event larger than `--events-max-bytes` is dropped and counted
//! (`gatecast_events_too_large_total`). The stream is trimmed by entries
//! (`--events-max-len`) and, approximately, by bytes: the length it is
//! trimmed to shrinks so that entries of the average size seen hold at most
//! `--events-stream-bytes`, so the events cannot fill the Redis that holds
//! the cluster's membership (or give events a Redis of their own with
//! `--events-redis-url`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use fred::clients::Client;
use fred::types::Value as RedisValue;
use serde_json::{json, Map, Value};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::ids::{ClientId, NodeId};
use crate::metrics::Metrics;
use crate::session::Session;

mod request;
mod sinks;

pub use request::{forwarded_headers, forwarded_query, without_resume_token};
pub use sinks::install_crypto_provider;
use sinks::{post_all, webhook_client, write_stream};

/// Most events waiting for the sink (their bytes are bounded too, by
/// `--events-queue-bytes`).
const QUEUE: usize = 10_000;

/// Events written to the stream in one pipeline.
const BATCH: usize = 256;

/// Headers of the upgrade request passed on in connect events unless
/// `--events-headers` says otherwise. Not `Cookie`: a backend that trusts
/// cookies from connect events is open to cross-site WebSocket hijacking
/// whenever origins are not restricted; it must ask for them.
pub const DEFAULT_FORWARDED_HEADERS: &str =
    "origin,user-agent,x-forwarded-for,x-real-ip,accept-language,host";

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    /// A client connected.
    Connect {
        /// The peer's address.
        remote_addr: String,
        /// The raw query string of `/ws`.
        query: String,
        /// Headers that matter to backends (origin, user agent, proxies,
        /// cookies).
        headers: Map<String, Value>,
    },
    /// A client sent a message.
    Message {
        /// Exactly what it sent.
        data: Bytes,
        /// Sent as a binary frame.
        binary: bool,
    },
    /// A connection closed.
    Close,
    /// A connection resumed another one (docs/recovery.md): it has the
    /// uid, groups and session of `old_client_id` now.
    Resumed {
        /// The connection it took over.
        old_client_id: ClientId,
    },
    /// A presence transition (`--presence-events`): not about one
    /// connection; `client_id` is the deciding node's id with number 0.
    Presence {
        /// What changed.
        change: PresenceChange,
        /// The uid or group.
        name: String,
        /// Orders the transitions of one name.
        seq: u64,
    },
}

/// A presence transition, cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// A uid's first connection anywhere.
    Online,
    /// A uid's last connection anywhere is gone (after the grace).
    Offline,
    /// A group's first member anywhere.
    Occupied,
    /// A group's last member anywhere is gone (after the grace).
    Vacated,
}

impl PresenceChange {
    /// The event type.
    pub fn kind(self) -> &'static str {
        match self {
            PresenceChange::Online => "online",
            PresenceChange::Offline => "offline",
            PresenceChange::Occupied => "occupied",
            PresenceChange::Vacated => "vacated",
        }
    }

    /// The field that names what changed: `uid` or `group`.
    pub fn field(self) -> &'static str {
        match self {
            PresenceChange::Online | PresenceChange::Offline => "uid",
            PresenceChange::Occupied | PresenceChange::Vacated => "group",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The connection.
    pub client_id: ClientId,
    /// Its uid at the time.
    pub uid: Option<String>,
    /// Its session at the time.
    pub session: Session,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// What happened.
    pub detail: Detail,
}

impl Event {
    /// An event stamped now.
    pub fn new(client_id: ClientId, uid: Option<String>, session: Session, detail: Detail) -> Self {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Event {
            client_id,
            uid,
            session,
            time_ms,
            detail,
        }
    }

    /// About how much memory the event holds: what counts against
    /// `--events-queue-bytes`. The payload and the session dominate; the
    /// rest is a fixed overhead.
    fn approx_size(&self) -> usize {
        let detail = match &self.detail {
            Detail::Connect {
                remote_addr,
                query,
                headers,
            } => remote_addr.len() + query.len() + json_object_size(headers),
            Detail::Message { data, .. } => data.len(),
            Detail::Close => 0,
            Detail::Resumed { .. } => 20,
            Detail::Presence { name, .. } => name.len() + 20,
        };
        std::mem::size_of::<Event>()
            + self.uid.as_ref().map_or(0, String::len)
            + json_object_size(&self.session)
            + detail
    }

    fn kind(&self) -> &'static str {
        match self.detail {
            Detail::Connect { .. } => "connect",
            Detail::Message { .. } => "message",
            Detail::Close => "close",
            Detail::Resumed { .. } => "resumed",
            Detail::Presence { change, .. } => change.kind(),
        }
    }

    /// The stream entry: flat fields, strings except `data` (raw bytes).
    fn stream_fields(&self, node: NodeId) -> Vec<(&'static str, RedisValue)> {
        let text = |s: String| RedisValue::from(s);
        if let Detail::Presence { change, name, seq } = &self.detail {
            // The fields every entry has are here too (`client_id` empty,
            // `session` `{}`), so consumers written for the other events
            // read these without special cases.
            let uid = if change.field() == "uid" {
                name.clone()
            } else {
                String::new()
            };
            let mut fields = vec![
                ("type", text(self.kind().into())),
                ("client_id", text(String::new())),
                ("node", text(node.to_string())),
                ("uid", text(uid)),
                ("session", text("{}".into())),
                ("time_ms", text(self.time_ms.to_string())),
                ("seq", text(seq.to_string())),
            ];
            if change.field() == "group" {
                fields.push(("group", text(name.clone())));
            }
            return fields;
        }
        // The connection's node: a dead node's, for the close events of
        // its connections that another node purged.
        let node = self.client_id.node();
        let mut fields = vec![
            ("type", text(self.kind().into())),
            ("client_id", text(self.client_id.to_string())),
            ("node", text(node.to_string())),
            ("uid", text(self.uid.clone().unwrap_or_default())),
            (
                "session",
                text(Value::Object(self.session.clone()).to_string()),
            ),
            ("time_ms", text(self.time_ms.to_string())),
        ];
        match &self.detail {
            Detail::Connect {
                remote_addr,
                query,
                headers,
            } => {
                fields.push(("remote_addr", text(remote_addr.clone())));
                fields.push(("query", text(query.clone())));
                fields.push(("headers", text(Value::Object(headers.clone()).to_string())));
            }
            Detail::Message { data, binary } => {
                fields.push(("data", RedisValue::Bytes(data.clone())));
                fields.push(("binary", text(if *binary { "1" } else { "0" }.into())));
            }
            Detail::Close => {}
            Detail::Resumed { old_client_id } => {
                fields.push(("old_client_id", text(old_client_id.to_string())));
                fields.push(("new_client_id", text(self.client_id.to_string())));
            }
            Detail::Presence { .. } => {}
        }
        fields
    }

    /// The webhook body.
    fn json(&self, node: NodeId) -> Value {
        if let Detail::Presence { change, name, seq } = &self.detail {
            let mut body = json!({
                "type": self.kind(),
                "client_id": null,
                "node": node.to_string(),
                "uid": null,
                "session": {},
                "time_ms": self.time_ms,
                "seq": seq,
            });
            body[change.field()] = json!(name);
            return body;
        }
        let node = self.client_id.node();
        let mut body = json!({
            "type": self.kind(),
            "client_id": self.client_id.to_string(),
            "node": node.to_string(),
            "uid": self.uid,
            "session": self.session,
            "time_ms": self.time_ms,
        });
        match &self.detail {
            Detail::Connect {
                remote_addr,
                query,
                headers,
            } => {
                body["remote_addr"] = json!(remote_addr);
                body["query"] = json!(query);
                body["headers"] = Value::Object(headers.clone());
            }
            Detail::Message { data, binary } => match (binary, std::str::from_utf8(data)) {
                (false, Ok(text)) => body["data"] = json!(text),
                _ => {
                    body["data_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(data))
                }
            },
            Detail::Close => {}
            Detail::Resumed { old_client_id } => {
                body["old_client_id"] = json!(old_client_id.to_string());
                body["new_client_id"] = json!(self.client_id.to_string());
            }
            Detail::Presence { .. } => {}
        }
        body
    }
}

/// About the length of `object` as JSON text, without writing it.
fn json_object_size(object: &Map<String, Value>) -> usize {
    2 + object
        .iter()
        .map(|(key, value)| key.len() + 4 + json_size(value))
        .sum::<usize>()
}

fn json_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(|v| json_size(v) + 1).sum::<usize>(),
        Value::Object(object) => json_object_size(object),
    }
}

/// Where events go.
pub enum Sink {
    /// `XADD <prefix>:events MAXLEN ~ <max_len>`.
    Stream {
        /// A Redis client of its own, so events never queue behind pushes.
        client: Client,
        /// The stream key.
        key: String,
        /// Approximate cap on the stream's length.
        max_len: i64,
    },
    /// `POST <url>` with a JSON body per event.
    Webhook {
        /// The URL.
        url: String,
    },
}

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

    /// Queues an event; drops it (counted) when it is larger than
    /// `--events-max-bytes`, or when the sink is too far behind, by count
    /// or by bytes, or when its connection holds its share of the queue.
    pub fn emit(&self, event: Event, metrics: &Metrics) {
        let size = event.approx_size();
        if size > self.max_event_bytes {
            metrics.events_too_large.inc();
            metrics.events_dropped.inc();
            return;
        }
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
        let size = event.approx_size();
        if size > self.max_event_bytes {
            metrics.events_too_large.inc();
            metrics.events_dropped.inc();
            return;
        }
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
    use super::*;

    #[test]
    fn connect_events_never_carry_the_token() {
        assert_eq!(forwarded_query("room=7&token=abc.def&x=1"), "room=7&x=1");
        assert_eq!(forwarded_query("token=abc"), "");
        assert_eq!(forwarded_query("recover=1&resume=abc&x=1"), "recover=1&x=1");
        assert_eq!(
            without_resume_token("recover=1&resume=abc&token=t"),
            "recover=1&token=t"
        );
        assert_eq!(forwarded_query("tokens=1"), "tokens=1");
        // Encoded keys are keys too.
        assert_eq!(forwarded_query("%74oken=abc&x=1"), "x=1");
        assert_eq!(forwarded_query("x=1&TOK%45N=abc"), "x=1&TOK%45N=abc");
        assert_eq!(forwarded_query("to%6b%65n=abc"), "");
        assert_eq!(forwarded_query("token%=1&%zz=2&a%2"), "token%=1&%zz=2&a%2");
    }

    #[test]
    fn connect_events_carry_the_headers_asked_for() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("cookie", "session=1".parse().unwrap());
        headers.insert("origin", "https://app.example".parse().unwrap());
        let defaults: Vec<String> = DEFAULT_FORWARDED_HEADERS
            .split(',')
            .map(str::to_owned)
            .collect();
        let got = forwarded_headers(&defaults, &headers);
        assert_eq!(got.get("origin"), Some(&json!("https://app.example")));
        assert!(!got.contains_key("cookie"), "{got:?}");
        let got = forwarded_headers(&["Cookie".to_owned()], &headers);
        assert_eq!(Value::Object(got), json!({"cookie": "session=1"}));
    }

    /// A message event carrying `len` bytes, from a connection of its own.
    fn message(len: usize) -> Event {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        message_from(NEXT.fetch_add(1, Ordering::Relaxed), len)
    }

    /// A message event carrying `len` bytes from connection number `n`.
    fn message_from(n: u32, len: usize) -> Event {
        let id = ClientId::new(NodeId::new(std::net::Ipv4Addr::LOCALHOST, 2900), n);
        let session = json!({"room": "lobby"}).as_object().cloned().unwrap();
        let data = Bytes::from(vec![b'x'; len]);
        Event::new(
            id,
            Some("u1".into()),
            session,
            Detail::Message { data, binary: true },
        )
    }

    #[test]
    fn the_size_counts_payload_and_session() {
        let small = message(10);
        let large = message(64 * 1024);
        assert_eq!(large.approx_size() - small.approx_size(), 64 * 1024 - 10);
        let mut with_session = message(10);
        with_session
            .session
            .insert("profile".into(), json!("p".repeat(1000)));
        assert!(with_session.approx_size() >= small.approx_size() + 1000);
    }

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

    /// https webhooks are supported: a post to an https URL fails to
    /// connect (nothing listens), not for want of TLS.
    #[tokio::test]
    async fn the_webhook_client_speaks_https() {
        let http = webhook_client().unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}/hook?key=s3cret", closed.local_addr().unwrap());
        drop(closed);
        let error = http.post(&url).send().await.unwrap_err();
        assert!(error.is_connect(), "{error:?}");
        assert!(!error.without_url().to_string().contains("s3cret"));
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
