//! The client side of recovery (docs/recovery.md), written from the doc and
//! not taken from the crate: frames of opted-in connections, positions and
//! their `pos` query, and a client that keeps its token and positions
//! across reconnects the way gatecast.js does.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{Client, Node, WAIT};

/// Stream → (epoch, offset) of the last push received on it.
pub type Positions = BTreeMap<String, (String, u64)>;

/// `pos=`: URL-safe base64 without padding of the JSON object
/// `{"<stream>":["<epoch>",offset],...}`.
pub fn encode(p: &Positions) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(p).unwrap())
}

/// A push as an opted-in client saw it: its header and exactly the bytes
/// pushed.
#[derive(Debug, Clone, PartialEq)]
pub struct Framed {
    /// `{"s","e","o"}`, or `{}` for a push not kept in history.
    pub header: Value,
    /// The payload, exact.
    pub payload: Vec<u8>,
    /// Sent as a binary frame.
    pub binary: bool,
}

impl Framed {
    /// The stream (`u:alice`), or "" when not kept.
    pub fn stream(&self) -> &str {
        self.header["s"].as_str().unwrap_or("")
    }
    /// The stream's epoch, or "".
    pub fn epoch(&self) -> String {
        self.header["e"].as_str().unwrap_or("").to_owned()
    }
    /// The offset in the stream, or 0.
    pub fn offset(&self) -> u64 {
        self.header["o"].as_u64().unwrap_or(0)
    }
    /// The payload as text.
    pub fn text(&self) -> String {
        String::from_utf8(self.payload.clone()).unwrap()
    }
}

/// Splits a push frame at its first `\n`: header, then payload.
pub fn split(bytes: &[u8], binary: bool) -> Framed {
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or_else(|| panic!("a push frame has a header line: {bytes:?}"));
    Framed {
        header: serde_json::from_slice(&bytes[..nl]).expect("the header is JSON"),
        payload: bytes[nl + 1..].to_vec(),
        binary,
    }
}

/// What an opted-in connection gives next.
#[derive(Debug)]
pub enum Got {
    /// A push, framed.
    Push(Framed),
    /// A control frame (`welcome`, `pong`, `recovered`, `position`).
    Control(Value),
    /// A close frame: code (1005 when none) and reason.
    Closed(u16, String),
    /// The connection ended without a close frame (a killed node).
    Gone(String),
}

impl Got {
    /// The delay a close's reason asks for (`{"reason":..,"retry_ms":N}`).
    pub fn retry_ms(&self) -> Option<u64> {
        match self {
            Got::Closed(_, reason) => {
                serde_json::from_str::<Value>(reason).ok()?["retry_ms"].as_u64()
            }
            _ => None,
        }
    }
}

/// Reads what an opted-in connection gives next, skipping pings and pongs
/// (bounded by `limit`).
pub async fn next_within(c: &mut Client, limit: Duration) -> Got {
    loop {
        let item = tokio::time::timeout(limit, c.ws.next())
            .await
            .unwrap_or_else(|_| panic!("client {} got nothing within {limit:?}", c.id));
        return match item {
            Some(Ok(Message::Text(t))) if !t.contains('\n') => {
                Got::Control(serde_json::from_str(&t).expect("a control frame is JSON"))
            }
            Some(Ok(Message::Text(t))) => Got::Push(split(t.as_bytes(), false)),
            Some(Ok(Message::Binary(b))) => Got::Push(split(&b, true)),
            Some(Ok(Message::Close(frame))) => match frame {
                Some(f) => Got::Closed(u16::from(f.code), f.reason.to_string()),
                None => Got::Closed(1005, String::new()),
            },
            Some(Ok(_)) => continue,
            Some(Err(e)) => Got::Gone(e.to_string()),
            None => Got::Gone("ended".into()),
        };
    }
}

/// A client that opted in to recovery: its connection, its last token and
/// its last position per stream.
pub struct Recovering {
    /// The current connection.
    pub client: Client,
    /// The last resume token.
    pub token: String,
    /// The last position per stream.
    pub pos: Positions,
}

/// Connects to `url` and reads the welcome; an error instead of a panic
/// when the handshake fails (a node draining or gone), bounded by [`WAIT`].
pub async fn try_connect_welcome(url: &str) -> Result<(Client, Value), String> {
    let connected = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await;
    let (ws, _) = match connected {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("handshake timed out".into()),
    };
    let mut client = Client {
        ws,
        id: String::new(),
    };
    match next_within(&mut client, WAIT).await {
        Got::Control(v) if v["type"] == "welcome" => {
            client.id = v["client_id"].as_str().unwrap_or_default().to_owned();
            Ok((client, v))
        }
        other => Err(format!("no welcome: {other:?}")),
    }
}

impl Recovering {
    /// Connects to `node` opted in (`/ws?recover=1`).
    pub async fn connect(node: &Node) -> Recovering {
        let (client, welcome) = try_connect_welcome(&node.ws_url("?recover=1"))
            .await
            .expect("an opted-in connection");
        Recovering {
            client,
            token: token_of(&welcome),
            pos: Positions::new(),
        }
    }

    /// The query a reconnect sends: `?recover=1&resume=<token>&pos=<pos>`.
    pub fn resume_query(&self) -> String {
        let mut query = format!("?recover=1&resume={}", self.token);
        if !self.pos.is_empty() {
            query.push_str(&format!("&pos={}", encode(&self.pos)));
        }
        query
    }

    /// Reconnects to the node at `base` (`ws://host:port/ws`) with the token
    /// and positions; returns the welcome (whose token is kept).
    pub async fn try_resume(&mut self, base: &str) -> Result<Value, String> {
        let (client, welcome) =
            try_connect_welcome(&format!("{base}{}", self.resume_query())).await?;
        self.client = client;
        self.token = token_of(&welcome);
        Ok(welcome)
    }

    /// Reconnects to `node`; the welcome must say `resumed: true`.
    pub async fn resume(&mut self, node: &Node) {
        let welcome = self
            .try_resume(&node.ws_url(""))
            .await
            .expect("the resume's handshake");
        assert_eq!(welcome["resumed"], true, "{welcome}");
    }

    /// Sends a normal close on the current connection (the client goes
    /// away, keeping its token and positions).
    pub async fn leave(&mut self) {
        use futures_util::SinkExt;
        let _ = self.client.ws.close(None).await;
        let _ = self.client.ws.flush().await;
    }

    /// The next thing, within [`WAIT`]; a push's position is kept.
    pub async fn next(&mut self) -> Got {
        self.next_within(WAIT).await
    }

    /// The next thing, within `limit`; a push's position, or a
    /// `position` frame's, is kept.
    pub async fn next_within(&mut self, limit: Duration) -> Got {
        let got = next_within(&mut self.client, limit).await;
        match &got {
            Got::Push(p) if !p.stream().is_empty() => {
                self.keep(p.stream(), p.epoch(), p.offset());
            }
            Got::Control(v) if v["type"] == "position" => {
                let (s, e, o) = (v["s"].as_str(), v["e"].as_str(), v["o"].as_u64());
                let (s, e, o) = (s.unwrap(), e.unwrap(), o.unwrap());
                self.keep(s, e.to_owned(), o);
            }
            _ => {}
        }
        got
    }

    /// Keeps a position, never moving back within an epoch (a `position`
    /// frame may come after a live push it was read before).
    fn keep(&mut self, stream: &str, epoch: String, offset: u64) {
        let back = self
            .pos
            .get(stream)
            .is_some_and(|(e, o)| *e == epoch && *o > offset);
        if !back {
            self.pos.insert(stream.to_owned(), (epoch, offset));
        }
    }

    /// The next thing, which must be a push.
    pub async fn push(&mut self) -> Framed {
        match self.next().await {
            Got::Push(p) => p,
            other => panic!("client {}: expected a push, got {other:?}", self.client.id),
        }
    }
}

/// The resume token of a welcome.
pub fn token_of(welcome: &Value) -> String {
    welcome["resume"]
        .as_str()
        .unwrap_or_else(|| panic!("no resume token in the welcome {welcome}"))
        .to_owned()
}
