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

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use fred::clients::Client;
use fred::types::Value as RedisValue;
use serde_json::{json, Map, Value};

use crate::ids::{ClientId, NodeId};
use crate::session::Session;

mod presence;
mod queue;
mod request;
mod sinks;

pub use presence::PresenceChange;
pub use queue::{Bounds, Events};
pub use request::{forwarded_headers, forwarded_query, without_resume_token};
pub use sinks::install_crypto_provider;

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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::sinks::webhook_client;
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
    pub(super) fn message(len: usize) -> Event {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        message_from(NEXT.fetch_add(1, Ordering::Relaxed), len)
    }

    /// A message event carrying `len` bytes from connection number `n`.
    pub(super) fn message_from(n: u32, len: usize) -> Event {
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
}
