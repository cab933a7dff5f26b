//! Resume tokens and records (docs/recovery.md section 2.1).
//!
//! A connection that opts in gets a token: the node it is on, a random
//! record id and a random secret. Its record (uid, groups, session, and a
//! SHA-256 digest of the secret) is written whenever its membership
//! changes, never only at disconnect, so a node that dies loses nothing;
//! it has no expiry while the connection lives and expires
//! `--resume-window` after it is gone. Reconnecting anywhere with the token
//! consumes the record once, atomically, and restores its membership under
//! the new client_id before the connection is registered.
//!
//! The node is in the token so that any node finds the record's Redis key
//! (it lives in that node's partition, one Cluster slot, written by the
//! same scripts as the partition). The client_id is not in it: nothing in
//! a token can be derived from the client_id, nor the other way round.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::engine::EngineError;
use crate::gateway::Gateway;
use crate::hub::Membership;
use crate::ids::{ClientId, NodeId};
use crate::metrics::ResultLabel;

use super::RecoveryQuery;

/// Bytes of the node id in a token (IPv4 address and inner port).
const NODE_BYTES: usize = 6;
/// Bytes of the random record id.
const RECORD_BYTES: usize = 12;
/// Bytes of the random secret.
const SECRET_BYTES: usize = 18;
const TOKEN_BYTES: usize = NODE_BYTES + RECORD_BYTES + SECRET_BYTES;

/// Longest token accepted, in characters (48 in practice).
pub const MAX_TOKEN_CHARS: usize = 64;

/// Default `--resume-window`.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(120);

/// Records of closed connections the in-process engine keeps at most;
/// past it the oldest go first.
pub const MEMORY_MAX_CLOSED: usize = 1 << 17;

/// A resume token, as handed to a client in its welcome.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    node: NodeId,
    record: [u8; RECORD_BYTES],
    secret: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, in logs or panics.
        f.debug_struct("Token")
            .field("node", &self.node)
            .field("record", &self.record_id())
            .finish_non_exhaustive()
    }
}

impl Token {
    /// A fresh token for a connection of `node`.
    pub fn new(node: NodeId) -> Token {
        Token {
            node,
            record: rand::random(),
            secret: rand::random(),
        }
    }

    /// Parses a token sent by a client; `None` when it is not one.
    pub fn parse(text: &str) -> Option<Token> {
        if text.len() > MAX_TOKEN_CHARS {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        if bytes.len() != TOKEN_BYTES {
            return None;
        }
        let (node, rest) = bytes.split_at(NODE_BYTES);
        let (record, secret) = rest.split_at(RECORD_BYTES);
        let ip = std::net::Ipv4Addr::new(node[0], node[1], node[2], node[3]);
        let port = u16::from_be_bytes([node[4], node[5]]);
        Some(Token {
            node: NodeId::new(ip, port),
            record: record.try_into().ok()?,
            secret: secret.try_into().ok()?,
        })
    }

    /// The token as the client gets it: URL-safe base64, no padding.
    pub fn encode(&self) -> String {
        let addr = self.node.addr();
        let mut bytes = Vec::with_capacity(TOKEN_BYTES);
        bytes.extend_from_slice(&addr.ip().octets());
        bytes.extend_from_slice(&addr.port().to_be_bytes());
        bytes.extend_from_slice(&self.record);
        bytes.extend_from_slice(&self.secret);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The node whose partition holds the record.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The record's id, as in its key.
    pub fn record_id(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.record)
    }

    /// What the node keeps of the token: the record id and the digest of
    /// the secret (never the secret).
    pub fn key(&self) -> ResumeKey {
        ResumeKey {
            record: self.record_id(),
            digest: hex(&Sha256::digest(self.secret)),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What names and checks one connection's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeKey {
    /// The record id (URL-safe base64).
    pub record: String,
    /// Hex SHA-256 of the token's secret.
    pub digest: String,
}

/// What a resume restores.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The connection the token was handed to.
    pub old_client_id: ClientId,
    /// Its uid, groups and session at its last change.
    pub membership: Membership,
}

/// Why a resume was refused. The client is told only `resumed:false`;
/// the reason goes to the log (debug) and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such record: never handed out, or expired.
    Unknown,
    /// The record was already consumed.
    Used,
    /// Not a token, or the secret does not match the record's.
    Forged,
    /// Client auth is on and the record's uid is not the JWT's `sub`.
    SubMismatch,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown",
            Refusal::Used => "used",
            Refusal::Forged => "forged",
            Refusal::SubMismatch => "sub_mismatch",
        }
    }
}

/// The outcome of consuming a token.
pub type Taken = Result<Restored, Refusal>;

/// With client auth on, the uid the record must have: the JWT's `sub`
/// (`""` for a token without one, which only resumes a connection without
/// a uid). `None` when client auth is off.
pub type UidCheck<'a> = Option<&'a str>;

/// Whether a record's uid passes `check`.
pub fn uid_allowed(check: UidCheck<'_>, uid: Option<&str>) -> bool {
    check.is_none_or(|sub| sub == uid.unwrap_or(""))
}

/// The welcome of a connection that opted in: always this shape
/// (`--welcome-frame` does not apply). `resumed` is there when the request
/// carried a token.
pub fn welcome(id: ClientId, token: &str, resumed: Option<bool>) -> String {
    let mut body = serde_json::json!({
        "type": "welcome",
        "client_id": id.to_string(),
        "resume": token,
    });
    if let Some(resumed) = resumed {
        body["resumed"] = resumed.into();
    }
    body.to_string()
}

/// The close reason of an operational close: when to come back, as
/// compact JSON (at most 123 bytes).
pub fn retry_reason(reason: &str, retry_ms: u64) -> String {
    serde_json::json!({ "reason": reason, "retry_ms": retry_ms }).to_string()
}

/// A delay picked at random in `[from, from + spread)`, in ms.
pub fn jitter_ms(from: Duration, spread: Duration) -> u64 {
    let spread = spread.as_millis().max(1) as u64;
    from.as_millis() as u64 + rand::random::<u64>() % spread
}

/// What a connection that opted in starts with, in its `Setup`.
#[derive(Debug)]
pub struct ResumeSetup {
    /// The recovery parameters it was opened with.
    pub query: RecoveryQuery,
    /// Its own token, for its welcome and its record.
    pub token: Token,
    /// Whether the token it came with resumed a connection (`None`: it came
    /// with none).
    pub resumed: Option<bool>,
    /// The connection it resumed.
    pub old_client_id: Option<ClientId>,
}

/// Consumes the token `text` a client came back with, for a connection
/// whose client token (with client auth on) has `sub`. Counts the result
/// in `gatecast_resumes_total`, and logs why a resume was refused at
/// debug only: the client hears `resumed:false`, whatever the reason.
pub async fn attempt(gw: &Gateway, text: &str, check: UidCheck<'_>) -> Result<Taken, EngineError> {
    let count = |result: &'static str| {
        gw.metrics
            .resumes
            .get_or_create(&ResultLabel { result })
            .inc();
    };
    let Some(token) = Token::parse(text) else {
        count(Refusal::Forged.label());
        tracing::debug!(reason = "malformed", "resume refused");
        return Ok(Err(Refusal::Forged));
    };
    let taken = match gw.engine.take_resume(&token, check).await {
        Ok(taken) => taken,
        Err(e) => {
            count("unavailable");
            return Err(e);
        }
    };
    match &taken {
        Ok(restored) => {
            count("resumed");
            tracing::debug!(old_client_id = %restored.old_client_id, "resumed");
        }
        Err(refusal) => {
            count(refusal.label());
            tracing::debug!(reason = refusal.label(), ?token, "resume refused");
        }
    }
    Ok(taken)
}

/// Shards of [`Resumable`]: connects and closes of different connections
/// rarely wait on each other.
const SHARDS: usize = 16;

/// This node's connections that opted in, with their keys: only those,
/// so a connection that did not opt in costs nothing here.
#[derive(Debug)]
pub struct Resumable {
    shards: Box<[Mutex<HashMap<ClientId, ResumeKey>>]>,
}

impl Default for Resumable {
    fn default() -> Self {
        Resumable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Resumable {
    fn shard(&self, id: ClientId) -> &Mutex<HashMap<ClientId, ResumeKey>> {
        &self.shards[id.number() as usize % SHARDS]
    }

    /// Makes `id` resumable with `key`.
    pub fn insert(&self, id: ClientId, key: ResumeKey) {
        self.shard(id).lock().insert(id, key);
    }

    /// Forgets `id`; returns its key.
    pub fn remove(&self, id: ClientId) -> Option<ResumeKey> {
        self.shard(id).lock().remove(&id)
    }

    /// The key of `id`, if it opted in.
    pub fn get(&self, id: ClientId) -> Option<ResumeKey> {
        self.shard(id).lock().get(&id).cloned()
    }

    /// Every connection that opted in.
    pub fn ids(&self) -> Vec<ClientId> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.lock().keys().copied());
        }
        out
    }
}

/// The in-process engine's records: those of live connections are their
/// hub entries (looked up when consumed); those of closed connections are
/// kept here, bounded by [`MEMORY_MAX_CLOSED`], until the window passes.
#[derive(Debug)]
pub struct MemoryRecords {
    window: Duration,
    inner: Mutex<Records>,
}

#[derive(Debug, Default)]
struct Records {
    /// Record id → the live connection and its digest.
    live: HashMap<String, (ClientId, String)>,
    /// Record id → a closed (or consumed) connection's record.
    closed: HashMap<String, Closed>,
    /// Record ids of `closed` by deadline (the window is one for all, so
    /// insertion order is deadline order).
    order: VecDeque<(Instant, String)>,
}

#[derive(Debug)]
struct Closed {
    digest: String,
    old: ClientId,
    /// `None` once consumed (kept to tell a second use apart, for the
    /// metric).
    membership: Option<Membership>,
    deadline: Instant,
}

impl MemoryRecords {
    /// Records expiring `window` after their connection is gone.
    pub fn new(window: Duration) -> Self {
        MemoryRecords {
            window,
            inner: Mutex::default(),
        }
    }

    /// A live connection's record exists from now on.
    pub fn track(&self, id: ClientId, key: ResumeKey) {
        self.inner.lock().live.insert(key.record, (id, key.digest));
    }

    /// The connection is gone: its record expires after the window.
    pub fn closed(&self, key: ResumeKey, membership: Membership) {
        let mut inner = self.inner.lock();
        let Some((old, _)) = inner.live.remove(&key.record) else {
            // Consumed while it was live: the tombstone is there already.
            return;
        };
        inner.insert_closed(
            key.record,
            Closed {
                digest: key.digest,
                old,
                membership: Some(membership),
                deadline: Instant::now() + self.window,
            },
        );
    }

    /// Consumes the record of `token`; `live` answers the membership of a
    /// connection still open.
    pub fn take(
        &self,
        token: &Token,
        check: UidCheck<'_>,
        live: impl FnOnce(ClientId) -> Option<Membership>,
    ) -> Taken {
        let key = token.key();
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.expire(now);
        if let Some((old, digest)) = inner.live.get(&key.record) {
            if *digest != key.digest {
                return Err(Refusal::Forged);
            }
            let old = *old;
            let membership = live(old).unwrap_or_default();
            if !uid_allowed(check, membership.uid.as_deref()) {
                return Err(Refusal::SubMismatch);
            }
            inner.live.remove(&key.record);
            inner.consumed(key, old, now + self.window);
            return Ok(Restored {
                old_client_id: old,
                membership,
            });
        }
        let Some(closed) = inner.closed.get_mut(&key.record) else {
            return Err(Refusal::Unknown);
        };
        if closed.digest != key.digest {
            return Err(Refusal::Forged);
        }
        let Some(membership) = &closed.membership else {
            return Err(Refusal::Used);
        };
        if !uid_allowed(check, membership.uid.as_deref()) {
            return Err(Refusal::SubMismatch);
        }
        let membership = closed.membership.take().unwrap_or_default();
        Ok(Restored {
            old_client_id: closed.old,
            membership,
        })
    }
}

impl Records {
    fn insert_closed(&mut self, record: String, closed: Closed) {
        while self.closed.len() >= MEMORY_MAX_CLOSED {
            let Some((_, oldest)) = self.order.pop_front() else {
                break;
            };
            self.closed.remove(&oldest);
        }
        self.order.push_back((closed.deadline, record.clone()));
        self.closed.insert(record, closed);
    }

    /// A live record consumed: a tombstone until the window passes.
    fn consumed(&mut self, key: ResumeKey, old: ClientId, deadline: Instant) {
        let closed = Closed {
            digest: key.digest,
            old,
            membership: None,
            deadline,
        };
        self.insert_closed(key.record, closed);
    }

    fn expire(&mut self, now: Instant) {
        while let Some((deadline, _)) = self.order.front() {
            if *deadline > now {
                break;
            }
            if let Some((_, record)) = self.order.pop_front() {
                self.closed.remove(&record);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeId {
        NodeId::new(std::net::Ipv4Addr::new(10, 1, 2, 3), 4567)
    }

    #[test]
    fn a_token_round_trips_and_stays_short() {
        let token = Token::new(node());
        let text = token.encode();
        assert!(text.len() <= MAX_TOKEN_CHARS, "{}", text.len());
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let back = Token::parse(&text).unwrap();
        assert_eq!(back, token);
        assert_eq!(back.node(), node());
        assert_ne!(Token::new(node()).encode(), text);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let text = Token::new(node()).encode();
        assert!(Token::parse(&text[1..]).is_none());
        assert!(Token::parse("").is_none());
        assert!(Token::parse("!!!!").is_none());
        assert!(Token::parse(&"A".repeat(200)).is_none());
    }

    #[test]
    fn the_key_holds_a_digest_not_the_secret() {
        let token = Token::new(node());
        let key = token.key();
        assert_eq!(key.digest.len(), 64);
        assert!(!token.encode().contains(&key.digest));
        assert_eq!(token.key(), key);
    }

    fn membership(uid: &str) -> Membership {
        Membership {
            uid: Some(uid.into()),
            groups: vec!["g".into()],
            session: Default::default(),
        }
    }

    #[test]
    fn memory_records_are_single_use_and_checked() {
        let records = MemoryRecords::new(Duration::from_secs(60));
        let id = ClientId::new(node(), 7);
        let token = Token::new(node());
        records.track(id, token.key());
        records.closed(token.key(), membership("alice"));
        let mut forged = Token::parse(&token.encode()).unwrap();
        forged.secret[0] ^= 1;
        assert_eq!(records.take(&forged, None, |_| None), Err(Refusal::Forged));
        assert_eq!(
            records.take(&token, Some("bob"), |_| None),
            Err(Refusal::SubMismatch)
        );
        let restored = records.take(&token, Some("alice"), |_| None).unwrap();
        assert_eq!(restored.old_client_id, id);
        assert_eq!(restored.membership, membership("alice"));
        assert_eq!(records.take(&token, None, |_| None), Err(Refusal::Used));
        let other = Token::new(node());
        assert_eq!(records.take(&other, None, |_| None), Err(Refusal::Unknown));
    }

    #[test]
    fn memory_records_expire_after_the_window() {
        let records = MemoryRecords::new(Duration::from_millis(1));
        let id = ClientId::new(node(), 7);
        let token = Token::new(node());
        records.track(id, token.key());
        records.closed(token.key(), membership("alice"));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(records.take(&token, None, |_| None), Err(Refusal::Unknown));
    }

    #[test]
    fn a_live_record_resumes_from_the_hub_once() {
        let records = MemoryRecords::new(Duration::from_secs(60));
        let id = ClientId::new(node(), 9);
        let token = Token::new(node());
        records.track(id, token.key());
        let restored = records
            .take(&token, None, |old| (old == id).then(|| membership("a")))
            .unwrap();
        assert_eq!(restored.membership.uid.as_deref(), Some("a"));
        // Its close later does not bring the record back.
        records.closed(token.key(), membership("a"));
        assert_eq!(records.take(&token, None, |_| None), Err(Refusal::Used));
    }

    #[test]
    fn welcome_and_reasons_are_compact_json() {
        let id = ClientId::new(node(), 1);
        let w = welcome(id, "tok", Some(true));
        let v: serde_json::Value = serde_json::from_str(&w).unwrap();
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["resume"], "tok");
        assert_eq!(v["resumed"], true);
        assert!(!w.contains('\n'));
        assert!(!welcome(id, "tok", None).contains("resumed"));
        let r = retry_reason("redis_lost", 1234);
        assert_eq!(r, r#"{"reason":"redis_lost","retry_ms":1234}"#);
    }
}
