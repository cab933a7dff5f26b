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

pub use request::{forwarded_headers, forwarded_query};
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
        }
    }

    /// The stream entry: flat fields, strings except `data` (raw bytes).
    fn stream_fields(&self, node: NodeId) -> Vec<(&'static str, RedisValue)> {
        let text = |s: String| RedisValue::from(s);
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
        }
        fields
    }

    /// The webhook body.
    fn json(&self, node: NodeId) -> Value {
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
}

enum Item {
    /// An event and the bytes it counts for in [`QueueBytes`].
    Event(Box<Event>, usize),
    /// Answered once every event queued before it was handed to the sink.
    Flush(oneshot::Sender<()>),
}

/// The bytes of the events queued and not yet handed to the sink, bounded.
#[derive(Debug)]
struct QueueBytes {
    used: AtomicUsize,
    limit: usize,
}

impl QueueBytes {
    /// Counts `n` more bytes unless that would pass the limit. An event
    /// always fits an empty queue, whatever its size, so a limit below
    /// the largest message does not silence every message.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let total = used.checked_add(n)?;
                (used == 0 || total <= self.limit).then_some(total)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
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
        queue_bytes: usize,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (events, rx) = Self::queue(queue_bytes);
        let drained = drain(sink, node, rx, events.bytes.clone(), metrics);
        (events, drained)
    }

    fn queue(queue_bytes: usize) -> (Self, mpsc::Receiver<Item>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let bytes = Arc::new(QueueBytes {
            used: AtomicUsize::new(0),
            limit: queue_bytes,
        });
        (Events { tx, bytes }, rx)
    }

    /// Queues an event; drops it (counted) when the sink is too far behind,
    /// by count or by bytes.
    pub fn emit(&self, event: Event, metrics: &Metrics) {
        let size = event.approx_size();
        if !self.bytes.take(size) {
            metrics.events_dropped.inc();
            return;
        }
        if self
            .tx
            .try_send(Item::Event(Box::new(event), size))
            .is_err()
        {
            self.bytes.release(size);
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

async fn drain(
    sink: Sink,
    node: NodeId,
    mut rx: mpsc::Receiver<Item>,
    bytes: Arc<QueueBytes>,
    metrics: Arc<Metrics>,
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
        let mut batch_bytes = 0;
        for item in items.drain(..) {
            match item {
                Item::Event(event, size) => {
                    batch.push(*event);
                    batch_bytes += size;
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
                } => write_stream(client, key, *max_len, node, &batch).await,
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
        bytes.release(batch_bytes);
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

    /// A message event carrying `len` bytes.
    fn message(len: usize) -> Event {
        let id = ClientId::new(NodeId::new(std::net::Ipv4Addr::LOCALHOST, 2900), 1);
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
        let Ok(Item::Event(_, taken)) = rx.try_recv() else {
            panic!("an event is queued")
        };
        events.bytes.release(taken);
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
        let (events, drained) = Events::new(sink, node, metrics.clone(), size);
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
