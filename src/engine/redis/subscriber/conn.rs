//! One subscriber connection to one Redis server, read by a task of its
//! own that hands every message to the inbox and waits while the inbox is
//! full (back-pressure through the socket to Redis), and written by
//! another that sends (un)subscribe commands and a PING every
//! [`PING_EVERY`].
//!
//! Commands are confirmed from Redis's replies, in order: a SUBSCRIBE of
//! n channels is done when Redis has confirmed all n, and an error reply
//! (`-NOPERM`, `-MOVED`...) fails it. A connection that reads nothing for
//! [`SILENT_FOR`] while a PING is unanswered, and is not itself waiting on
//! the inbox, is dead (a NAT or load balancer dropped it without a reset).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use redis_protocol::codec::Resp2;
use redis_protocol::resp2::types::BytesFrame as Frame;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::super::inbox::{Inbox, Lane};

/// Time between two PINGs on an idle connection.
pub const PING_EVERY: Duration = Duration::from_millis(500);

/// A connection that read nothing for this long while a PING waits for its
/// answer is dead. PING_EVERY + SILENT_FOR bounds how long a silent
/// connection goes unnoticed.
pub const SILENT_FOR: Duration = Duration::from_secs(2);

/// Longest a connection attempt (TCP, TLS, AUTH) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest one write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Commands waiting to be written on one connection.
const COMMANDS: usize = 1024;

/// Where to connect and how to log in.
#[derive(Clone)]
pub struct Login {
    /// ACL user name.
    pub username: Option<String>,
    /// Password (`--redis-password` or the URL's).
    pub password: Option<String>,
    /// TLS (`rediss*` URLs): fred's connector, with the system's roots.
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// CLIENT SETNAME, so an operator (or a test) can tell this
    /// connection apart in CLIENT LIST.
    pub name: String,
}

/// A Redis server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Name for the TLS handshake when not the host.
    pub tls_name: Option<String>,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What a subscribe or unsubscribe command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SUBSCRIBE.
    Subscribe,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// SSUBSCRIBE (Cluster).
    SSubscribe,
    /// SUNSUBSCRIBE (Cluster).
    SUnsubscribe,
    /// PING (answered `pong` while subscribed).
    Ping,
}

impl Kind {
    fn command(self) -> &'static str {
        match self {
            Kind::Subscribe => "SUBSCRIBE",
            Kind::Unsubscribe => "UNSUBSCRIBE",
            Kind::SSubscribe => "SSUBSCRIBE",
            Kind::SUnsubscribe => "SUNSUBSCRIBE",
            Kind::Ping => "PING",
        }
    }

    fn of_reply(word: &[u8]) -> Option<Kind> {
        Some(match word {
            b"subscribe" => Kind::Subscribe,
            b"unsubscribe" => Kind::Unsubscribe,
            b"ssubscribe" => Kind::SSubscribe,
            b"sunsubscribe" => Kind::SUnsubscribe,
            b"pong" => Kind::Ping,
            _ => return None,
        })
    }
}

/// Redis's answer to a command: `Err` holds its error reply, or says the
/// connection was lost before the answer.
pub type Reply = Result<(), String>;

/// A command for the connection.
struct Request {
    kind: Kind,
    channels: Vec<String>,
    done: oneshot::Sender<Reply>,
}

/// A command written and not yet fully confirmed.
struct Pending {
    kind: Kind,
    /// Channels not yet confirmed.
    channels: HashSet<Bytes>,
    done: Option<oneshot::Sender<Reply>>,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Redis closed it (a restart, a failover, CLIENT KILL, or this node
    /// fell behind past `client-output-buffer-limit pubsub`).
    Closed,
    /// A read or write failed (a reset).
    Error,
    /// Nothing read for [`SILENT_FOR`] while a PING waited.
    Unresponsive,
    /// Redis sent something that is not RESP2 pub/sub.
    Protocol,
}

impl Ended {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::Error => "error",
            Ended::Unresponsive => "unresponsive",
            Ended::Protocol => "protocol",
        }
    }
}

/// What a connection tells its owner.
pub enum Event {
    /// The connection ended on its own.
    Lost {
        /// The generation of connections it belonged to.
        generation: u64,
        /// Its server.
        endpoint: Endpoint,
        /// Why.
        why: Ended,
        /// Whether it was waiting on the inbox shortly before (a close by
        /// Redis is then most likely its output-buffer limit).
        behind: bool,
    },
    /// Redis unsubscribed a channel on its own (a Cluster slot moved).
    Unsubscribed(String),
}

/// State the reader and writer share.
struct Shared {
    pending: Mutex<VecDeque<Pending>>,
    /// Milliseconds since `epoch` of the last frame read.
    last_read: AtomicU64,
    /// The reader waits on the inbox.
    behind: AtomicBool,
    /// Milliseconds since `epoch` when the reader last waited on the inbox.
    last_behind: AtomicU64,
    epoch: Instant,
    ended: Mutex<Option<Ended>>,
    /// Ended by its owner: nothing to report.
    quiet: AtomicBool,
    closed: CancellationToken,
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn end(&self, why: Ended) {
        self.ended.lock().get_or_insert(why);
        self.closed.cancel();
    }
}

/// An open connection.
pub struct Conn {
    commands: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    /// The server.
    pub endpoint: Endpoint,
}

impl Conn {
    /// Time since the last frame read from Redis on this connection.
    pub fn silent_for(&self) -> Duration {
        let since = self.shared.last_read.load(Ordering::Acquire);
        Duration::from_millis(self.shared.now().saturating_sub(since))
    }

    /// Connects, logs in (and on Sentinel checks the server is a primary)
    /// and starts the connection's reader and writer.
    pub async fn open(
        endpoint: Endpoint,
        login: &Login,
        lane: Lane,
        inbox: Arc<Inbox>,
        generation: u64,
        events: mpsc::UnboundedSender<Event>,
        want_primary: bool,
    ) -> Result<Conn, String> {
        let framed =
            tokio::time::timeout(CONNECT_TIMEOUT, handshake(&endpoint, login, want_primary))
                .await
                .map_err(|_| format!("{endpoint}: no answer within {CONNECT_TIMEOUT:?}"))??;
        let (sink, stream) = framed.split();
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            last_read: AtomicU64::new(0),
            behind: AtomicBool::new(false),
            last_behind: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            ended: Mutex::default(),
            quiet: AtomicBool::new(false),
            closed: CancellationToken::new(),
        });
        let (commands, rx) = mpsc::channel(COMMANDS);
        tokio::spawn(write(shared.clone(), sink, rx));
        let reader = read(shared.clone(), stream, lane, inbox, events.clone());
        let watched = (shared.clone(), endpoint.clone());
        tokio::spawn(async move {
            reader.await;
            let (shared, endpoint) = watched;
            // Whoever ended it, every command still waiting fails.
            for pending in shared.pending.lock().drain(..) {
                if let Some(done) = pending.done {
                    let _ = done.send(Err("the subscriber connection was lost".into()));
                }
            }
            if shared.quiet.load(Ordering::Acquire) {
                return;
            }
            let why = shared.ended.lock().unwrap_or(Ended::Closed);
            let last_behind = shared.last_behind.load(Ordering::Acquire);
            let behind = last_behind != u64::MAX && shared.now().saturating_sub(last_behind) < 5000;
            let _ = events.send(Event::Lost {
                generation,
                endpoint,
                why,
                behind,
            });
        });
        Ok(Conn {
            commands,
            shared,
            endpoint,
        })
    }

    /// The connection still works.
    pub fn is_open(&self) -> bool {
        !self.shared.closed.is_cancelled()
    }

    /// Closes the connection without reporting it lost.
    pub fn close(&self) {
        self.shared.quiet.store(true, Ordering::Release);
        self.shared.closed.cancel();
    }

    /// Sends a command and waits until Redis confirmed every channel (or
    /// refused the command).
    pub async fn request(&self, kind: Kind, channels: Vec<String>) -> Reply {
        let (done, rx) = oneshot::channel();
        let request = Request {
            kind,
            channels,
            done,
        };
        if self.commands.send(request).await.is_err() {
            return Err("the subscriber connection was lost".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the subscriber connection was lost".into()))
    }
}

type Io = Box<dyn Stream>;
type Sink = futures_util::stream::SplitSink<Framed<Io, Resp2>, Frame>;
type Source = futures_util::stream::SplitStream<Framed<Io, Resp2>>;

/// A byte stream: TCP or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

fn command(words: &[&str]) -> Frame {
    Frame::Array(
        words
            .iter()
            .map(|w| Frame::BulkString(Bytes::copy_from_slice(w.as_bytes())))
            .collect(),
    )
}

async fn handshake(
    endpoint: &Endpoint,
    login: &Login,
    want_primary: bool,
) -> Result<Framed<Io, Resp2>, String> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let io: Io = match &login.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name = endpoint.tls_name.as_deref().unwrap_or(&endpoint.host);
            let name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| format!("{endpoint}: TLS server name: {e}"))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{endpoint}: TLS: {e}"))?;
            Box::new(stream)
        }
    };
    let mut framed = Framed::new(io, Resp2::default());
    let mut asked = Vec::new();
    if let Some(password) = &login.password {
        let mut words = vec!["AUTH"];
        if let Some(user) = &login.username {
            words.push(user);
        }
        words.push(password);
        asked.push("AUTH");
        feed(&mut framed, command(&words)).await?;
    }
    asked.push("SETNAME");
    feed(
        &mut framed,
        command(&["CLIENT", "SETNAME", login.name.as_str()]),
    )
    .await?;
    if want_primary {
        asked.push("ROLE");
        feed(&mut framed, command(&["ROLE"])).await?;
    }
    SinkExt::<Frame>::flush(&mut framed)
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    for what in asked {
        let reply = match framed.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(format!("{endpoint}: {e}")),
            None => return Err(format!("{endpoint}: closed during the handshake")),
        };
        match (what, reply) {
            ("AUTH", Frame::Error(e)) => return Err(format!("{endpoint}: AUTH: {e}")),
            // Naming is a courtesy; an ACL may forbid it.
            ("SETNAME", _) => {}
            ("ROLE", Frame::Array(items)) => {
                let role = items.first().and_then(bytes_of);
                if role.as_deref() != Some(&b"master"[..]) {
                    return Err(format!("{endpoint}: not the primary (any more)"));
                }
            }
            ("ROLE", other) => return Err(format!("{endpoint}: ROLE: {other:?}")),
            _ => {}
        }
    }
    Ok(framed)
}

async fn feed(framed: &mut Framed<Io, Resp2>, frame: Frame) -> Result<(), String> {
    framed.feed(frame).await.map_err(|e| e.to_string())
}

fn bytes_of(frame: &Frame) -> Option<Bytes> {
    match frame {
        Frame::BulkString(b) | Frame::SimpleString(b) => Some(b.clone()),
        _ => None,
    }
}

/// The writer: commands in order, and the PINGs.
async fn write(shared: Arc<Shared>, mut sink: Sink, mut requests: mpsc::Receiver<Request>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Milliseconds (since epoch) the unanswered PING was sent at.
    let mut ping_since: Option<u64> = None;
    loop {
        let (kind, channels, done) = tokio::select! {
            () = shared.closed.cancelled() => break,
            request = requests.recv() => match request {
                Some(r) => (r.kind, r.channels, Some(r.done)),
                None => break,
            },
            _ = tick.tick() => {
                let now = shared.now();
                let ping_out = shared
                    .pending
                    .lock()
                    .iter()
                    .any(|p| p.kind == Kind::Ping);
                if !ping_out {
                    ping_since = None;
                }
                if let Some(since) = ping_since {
                    let silent = now.saturating_sub(shared.last_read.load(Ordering::Acquire));
                    let waited = now.saturating_sub(since);
                    let limit = SILENT_FOR.as_millis() as u64;
                    if waited > limit && silent > limit && !shared.behind.load(Ordering::Acquire) {
                        shared.end(Ended::Unresponsive);
                        break;
                    }
                    continue;
                }
                ping_since = Some(now);
                (Kind::Ping, Vec::new(), None)
            }
        };
        let mut words = vec![kind.command()];
        words.extend(channels.iter().map(String::as_str));
        let frame = command(&words);
        shared.pending.lock().push_back(Pending {
            kind,
            channels: channels.into_iter().map(Bytes::from).collect(),
            done,
        });
        match tokio::time::timeout(WRITE_TIMEOUT, sink.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                shared.end(Ended::Error);
                break;
            }
            Err(_) => {
                shared.end(Ended::Unresponsive);
                break;
            }
        }
    }
    shared.closed.cancel();
    let _ = sink.close().await;
}

/// The reader: messages to the inbox (waiting while it is full), replies to
/// the commands waiting for them.
async fn read(
    shared: Arc<Shared>,
    mut stream: Source,
    lane: Lane,
    inbox: Arc<Inbox>,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let frame = tokio::select! {
            () = shared.closed.cancelled() => return,
            frame = stream.next() => frame,
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "subscriber connection: read failed");
                let why = if matches!(
                    e.kind(),
                    redis_protocol::error::RedisProtocolErrorKind::IO(_)
                ) {
                    Ended::Error
                } else {
                    Ended::Protocol
                };
                return shared.end(why);
            }
            None => return shared.end(Ended::Closed),
        };
        shared.last_read.store(shared.now(), Ordering::Release);
        match frame {
            Frame::Array(mut items) if items.len() == 3 && is_message(&items[0]) => {
                let (Some(payload), Some(channel)) = (
                    items.pop().as_ref().and_then(bytes_of),
                    items.pop().as_ref().and_then(bytes_of),
                ) else {
                    return shared.end(Ended::Protocol);
                };
                let waited = tokio::select! {
                    () = shared.closed.cancelled() => return,
                    waited = inbox.push(lane, channel, payload, &shared.behind) => waited,
                };
                if waited {
                    // Reading resumes now: the silence it waited through
                    // was this node's, not Redis's.
                    shared.last_behind.store(shared.now(), Ordering::Release);
                    shared.last_read.store(shared.now(), Ordering::Release);
                }
            }
            Frame::Array(items) => {
                let word = items.first().and_then(bytes_of);
                let channel = items.get(1).and_then(bytes_of);
                match word.as_deref().and_then(Kind::of_reply) {
                    Some(kind) => confirm(&shared, kind, channel, &events),
                    None => return shared.end(Ended::Protocol),
                }
            }
            Frame::SimpleString(s) if s.eq_ignore_ascii_case(b"pong") => {
                confirm(&shared, Kind::Ping, None, &events)
            }
            Frame::Error(e) => {
                let head = shared.pending.lock().pop_front();
                match head.and_then(|p| p.done) {
                    Some(done) => {
                        let _ = done.send(Err(e.to_string()));
                    }
                    None => tracing::warn!(error = %e, "redis error on the subscriber connection"),
                }
            }
            _ => return shared.end(Ended::Protocol),
        }
    }
}

fn is_message(word: &Frame) -> bool {
    matches!(word, Frame::BulkString(w) if w.as_ref() == b"message" || w.as_ref() == b"smessage")
}

/// A confirmation: counts towards the oldest command, or is Redis
/// unsubscribing on its own (a Cluster slot moved away).
fn confirm(
    shared: &Shared,
    kind: Kind,
    channel: Option<Bytes>,
    events: &mpsc::UnboundedSender<Event>,
) {
    let mut pending = shared.pending.lock();
    let matched = match pending.front_mut() {
        Some(head) if head.kind == kind => match &channel {
            _ if kind == Kind::Ping => true,
            Some(c) => head.channels.remove(c),
            None => false,
        },
        _ => false,
    };
    if matched {
        if pending.front().is_some_and(|h| h.channels.is_empty()) {
            if let Some(done) = pending.pop_front().and_then(|p| p.done) {
                let _ = done.send(Ok(()));
            }
        }
        return;
    }
    drop(pending);
    match (kind, channel) {
        (Kind::SUnsubscribe | Kind::Unsubscribe, Some(channel)) => {
            let channel = String::from_utf8_lossy(&channel).into_owned();
            let _ = events.send(Event::Unsubscribed(channel));
        }
        (kind, channel) => {
            tracing::debug!(
                ?kind,
                ?channel,
                "unexpected confirmation on the subscriber connection"
            )
        }
    }
}
