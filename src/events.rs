//! Events back to backends (`--events`): connect, message and close, the
//! counterpart of GatewayWorker's BusinessWorker onConnect / onMessage /
//! onClose, without a worker process in the gateway.
//!
//! With Redis, events are appended to a Stream that backends read with a
//! consumer group (at-least-once from the stream on). Without Redis, each
//! event is POSTed as JSON to `--events-webhook`. Either way the connection
//! never waits: events go through a bounded queue, and when the sink falls
//! that far behind, new events are dropped and counted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, StreamsInterface};
use fred::types::Value as RedisValue;
use serde_json::{json, Map, Value};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::ids::{ClientId, NodeId};
use crate::metrics::Metrics;
use crate::session::Session;

/// Events waiting for the sink.
const QUEUE: usize = 10_000;

/// Events written to the stream in one pipeline.
const BATCH: usize = 256;

/// Headers of the upgrade request passed on in connect events.
const FORWARDED_HEADERS: &[&str] = &[
    "origin",
    "user-agent",
    "x-forwarded-for",
    "x-real-ip",
    "accept-language",
    "cookie",
    "host",
];

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

/// The query string of `/ws` as connect events carry it: without `token`,
/// so client credentials do not end up in the stream.
pub fn forwarded_query(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("token"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The headers of an upgrade request that connect events carry.
pub fn forwarded_headers(headers: &axum::http::HeaderMap) -> Map<String, Value> {
    FORWARDED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some((name.to_string(), Value::String(value.to_owned())))
        })
        .collect()
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
}

enum Item {
    Event(Box<Event>),
    /// Answered once every event queued before it was handed to the sink.
    Flush(oneshot::Sender<()>),
}

impl Events {
    /// Starts the task that drains events into `sink`.
    pub fn start(sink: Sink, node: NodeId, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drain(sink, node, rx, metrics));
        Events { tx }
    }

    /// Queues an event; drops it (counted) when the sink is too far behind.
    pub fn emit(&self, event: Event, metrics: &Metrics) {
        if self.tx.try_send(Item::Event(Box::new(event))).is_err() {
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

async fn drain(sink: Sink, node: NodeId, mut rx: mpsc::Receiver<Item>, metrics: Arc<Metrics>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok();
    let mut items = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut items, BATCH).await > 0 {
        let mut flushes = Vec::new();
        let mut batch = Vec::with_capacity(items.len());
        for item in items.drain(..) {
            match item {
                Item::Event(event) => batch.push(*event),
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
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn write_stream(
    client: &Client,
    key: &str,
    max_len: i64,
    node: NodeId,
    batch: &[Event],
) -> usize {
    if !client.is_connected() {
        tracing::debug!(events = batch.len(), "redis down: events dropped");
        return 0;
    }
    let pipeline = client.pipeline();
    for event in batch {
        let _: Result<(), _> = pipeline
            .xadd(
                key,
                false,
                ("MAXLEN", "~", max_len),
                "*",
                event.stream_fields(node),
            )
            .await;
    }
    let results: Vec<Result<RedisValue, fred::error::Error>> = pipeline.try_all().await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    if ok < batch.len() {
        tracing::warn!(
            failed = batch.len() - ok,
            "events not written to the stream"
        );
    }
    ok
}

async fn post_all(http: &reqwest::Client, url: &str, node: NodeId, batch: &[Event]) -> usize {
    let mut sent = 0;
    for event in batch {
        let body = event.json(node);
        // A few tries with a short backoff: a webhook restart should not
        // lose events, a dead one must not hold the queue for long.
        for attempt in 0..3u32 {
            match http.post(url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    sent += 1;
                    break;
                }
                Ok(r) => tracing::warn!(status = %r.status(), "event webhook refused an event"),
                Err(e) => tracing::warn!(error = %e, "event webhook unreachable"),
            }
            if attempt < 2 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_events_never_carry_the_token() {
        assert_eq!(forwarded_query("room=7&token=abc.def&x=1"), "room=7&x=1");
        assert_eq!(forwarded_query("token=abc"), "");
        assert_eq!(forwarded_query("tokens=1"), "tokens=1");
    }
}
