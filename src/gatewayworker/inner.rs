//! GatewayWorker's gateway protocol on the inner port: what a GatewayClient
//! (or a BusinessWorker's `Gateway::` calls) sends to a gateway process, and
//! the BusinessWorkers' own connections ([`super::workers`]).
//!
//! A GatewayClient asks the Register for every gateway's address, sends a
//! call for one client to the address inside its client_id, and a call for
//! everyone (a broadcast, a group, a query) to every address; it credits
//! each answer to the address it asked, rebuilding client_ids from that
//! address and the connection numbers in the answer. So each node answers
//! and delivers for its own connections only, exactly as one GatewayWorker
//! gateway does, and membership and session changes go through the engine,
//! so the HTTP API, the Redis path and the PHP path see one state.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use serde_json::Value as Json;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::php::{self, Value};
use super::protocol::{self, cmd, flag, GatewayCodec, Packet, ProtocolError};
use crate::accept::Acceptor;
use crate::engine::EngineResult;
use crate::frame::close_code;
use crate::gateway::Gateway;
use crate::ids::ClientId;
use crate::push::{encode_frame, Target};
use crate::session::Session;

/// Largest packet accepted (GatewayWorker's default `maxPackageSize`).
const MAX_PACKET: usize = protocol::DEFAULT_MAX_PACKET;

/// Inner connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 10_000;

/// A connection silent for this long is closed (GatewayClient opens one per
/// call, or keeps one per PHP worker with persistent connections). Not a
/// BusinessWorker's: it may have nothing to say for hours; the pings this
/// node sends it find it dead instead.
const IDLE: Duration = Duration::from_secs(600);

/// Longest a reply may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Membership writes to Redis still in flight after their change was
/// applied in memory; past this, the next command waits for one.
const IN_FLIGHT: usize = 10_000;

/// What a connection's reader yields: a packet, a malformed stream, or its
/// end (`None`).
type Inbound = (u64, Option<Result<Packet, ProtocolError>>);

/// Serves the inner listener until `stop`.
///
/// One task reads every inner connection and handles their packets one at a
/// time, in the order they arrive, as GatewayWorker's event loop does: a
/// GatewayClient opens a connection per call, so `setSession` then
/// `updateSession` arrive on two connections, and must apply in that order.
/// Nothing here waits on Redis: changes apply to the hub at once and are
/// mirrored in the background (GatewayClient never waits for them either).
pub async fn serve(gw: Arc<Gateway>, mut listener: Acceptor, stop: CancellationToken) {
    let mut inbound: SelectAll<BoxStream<'static, Inbound>> = SelectAll::new();
    let mut peers: HashMap<u64, Peer> = HashMap::new();
    let handler = Handler {
        gw: &gw,
        in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
    };
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            // Packets already read before new connections: arrival order.
            biased;
            () = stop.cancelled() => return,
            Some((id, item)) = inbound.next() => {
                let Some(peer) = peers.get_mut(&id) else { continue };
                let outcome = match item {
                    Some(Ok(packet)) => handler.handle(peer, packet).await,
                    Some(Err(e)) => Err(e.to_string()),
                    None => {
                        if let Some(peer) = peers.remove(&id) {
                            peer.forget(&gw);
                        }
                        continue;
                    }
                };
                if let Err(reason) = outcome {
                    gw.metrics.inner_errors.inc();
                    tracing::warn!(peer = %peer.addr, %reason, "inner connection closed");
                    // The reader ends too, and the socket closes with both
                    // halves gone: nothing more is read from this peer.
                    peer.closed.cancel();
                    if let Some(peer) = peers.remove(&id) {
                        peer.forget(&gw);
                    }
                }
            }
            (socket, addr) = listener.accept() => {
                if peers.len() >= MAX_CONNECTIONS {
                    gw.metrics.inner_errors.inc();
                    tracing::warn!(peer = %addr, "inner connection refused: too many open");
                    continue;
                }
                next_id += 1;
                let (read, write) = socket.into_split();
                let closed = CancellationToken::new();
                let is_worker = Arc::new(AtomicBool::new(false));
                inbound.push(reader(next_id, read, closed.clone(), is_worker.clone()));
                let authorized = gw.config.gateway_secret_key.is_empty();
                let write = Some(write);
                let peer = Peer {
                    write,
                    authorized,
                    addr,
                    closed,
                    worker: None,
                    is_worker,
                };
                peers.insert(next_id, peer);
            }
        }
    }
}

/// The packets of one connection, then `None`; ends after [`IDLE`], or
/// when `closed` is cancelled.
fn reader(
    id: u64,
    read: OwnedReadHalf,
    closed: CancellationToken,
    is_worker: Arc<AtomicBool>,
) -> BoxStream<'static, Inbound> {
    let frames = FramedRead::new(read, GatewayCodec::new(MAX_PACKET));
    let packets = futures_util::stream::unfold(Some(frames), move |state| {
        let is_worker = is_worker.clone();
        async move {
            let mut frames = state?;
            let next = async {
                if is_worker.load(Ordering::Relaxed) {
                    Ok(frames.next().await)
                } else {
                    tokio::time::timeout(IDLE, frames.next()).await
                }
            };
            match next.await {
                Ok(Some(item)) => {
                    let failed = item.is_err();
                    Some((item, (!failed).then_some(frames)))
                }
                Ok(None) | Err(_) => None,
            }
        }
    });
    packets
        .take_until(closed.cancelled_owned())
        .map(move |item| (id, Some(item)))
        .chain(futures_util::stream::once(async move { (id, None) }))
        .boxed()
}

/// One inner connection's writing side and state.
struct Peer {
    /// Gone once the peer is a BusinessWorker: its queue writes instead.
    write: Option<OwnedWriteHalf>,
    authorized: bool,
    addr: SocketAddr,
    /// Ends the reader when the connection is closed on an error.
    closed: CancellationToken,
    /// Its id among the node's workers, once it sent `WORKER_CONNECT`.
    worker: Option<u64>,
    /// Shared with the reader: a worker's connection has no idle limit.
    is_worker: Arc<AtomicBool>,
}

impl Peer {
    /// The connection is gone: a worker stops getting events.
    fn forget(&self, gw: &Gateway) {
        if let Some(worker) = self.worker {
            gw.workers.remove(worker);
        }
    }
}

/// Handles packets for every connection.
struct Handler<'a> {
    gw: &'a Gateway,
    in_flight: Arc<Semaphore>,
}

impl Handler<'_> {
    /// One packet: handled, and its reply (if any) written back.
    async fn handle(&self, peer: &mut Peer, p: Packet) -> Result<(), String> {
        let Some(reply) = self.answer(peer, p).await? else {
            return Ok(());
        };
        match (&mut peer.write, peer.worker) {
            (Some(write), _) => tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&reply))
                .await
                .map_err(|_| "reply not taken in time".to_owned())?
                .map_err(|e| e.to_string()),
            // A worker asking on its own connection: the answer queues
            // behind its events.
            (None, Some(worker)) => {
                if self.gw.workers.send_raw(worker, reply) {
                    Ok(())
                } else {
                    Err("worker cannot take the reply".into())
                }
            }
            (None, None) => Err("connection already closed".into()),
        }
    }

    /// Applies an engine change now (its first step changes the hub) and
    /// lets the rest (the write to Redis) finish in the background, bounded
    /// by [`IN_FLIGHT`].
    async fn apply<F>(&self, what: &'static str, change: F)
    where
        F: Future<Output = EngineResult<()>> + Send + 'static,
    {
        let mut change = Box::pin(change);
        match futures_util::poll!(change.as_mut()) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => tracing::warn!(what, error = %e, "inner command failed"),
            Poll::Pending => {
                let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(async move {
                    if let Err(e) = change.await {
                        tracing::warn!(what, error = %e, "inner command not mirrored");
                    }
                    drop(permit);
                });
            }
        }
    }

    /// One packet; the reply to send back, if the command has one.
    async fn answer(&self, peer: &mut Peer, p: Packet) -> Result<Option<Bytes>, String> {
        if !peer.authorized {
            return match p.cmd {
                cmd::GATEWAY_CLIENT_CONNECT => self.authorize(peer, &p).map(|()| None),
                cmd::WORKER_CONNECT => self.worker_connect(peer, &p).map(|()| None),
                other => Err(format!("command {other} before authentication")),
            };
        }
        let gw = self.gw;
        let id = ClientId::new(gw.minter.node(), p.connection_id);
        let engine = gw.engine.clone();
        let ext = || String::from_utf8_lossy(&p.ext_data).into_owned();
        let reply = match p.cmd {
            cmd::GATEWAY_CLIENT_CONNECT => {
                self.authorize(peer, &p)?;
                None
            }
            cmd::WORKER_CONNECT => {
                self.worker_connect(peer, &p)?;
                None
            }
            cmd::PING => None,
            cmd::SEND_TO_ONE => {
                self.deliver(&Target::Client(id), &[], &p);
                None
            }
            cmd::SEND_TO_ALL => {
                let ext = json_ext(&p);
                match ext.get("connections") {
                    // The values of `connections`: only those.
                    Some(only) => {
                        let ids = self.ids(values(only));
                        self.deliver(&Target::Clients(ids), &[], &p);
                    }
                    // The keys of `exclude`: all but those.
                    None => {
                        let exclude = self.ids(keys(ext.get("exclude")));
                        self.deliver(&Target::All, &exclude, &p);
                    }
                }
                None
            }
            cmd::SEND_TO_UID => {
                let uids = strings(&json_ext(&p));
                self.deliver(&Target::Uids(uids), &[], &p);
                None
            }
            cmd::SEND_TO_GROUP => {
                let ext = json_ext(&p);
                let groups = strings(ext.get("group").unwrap_or(&Json::Null));
                let exclude = self.ids(keys(ext.get("exclude")));
                self.deliver(&Target::Groups(groups), &exclude, &p);
                None
            }
            cmd::KICK => {
                // `closeClient($id)` without a message sends a serialized
                // null (flag 0x01 clear).
                let message = p.body_is_scalar() && !p.body.is_empty();
                let last = message.then(|| self.frame(&p));
                gw.hub
                    .close_client(id, last, close_code::NORMAL, "closed by server");
                None
            }
            cmd::DESTROY => {
                gw.hub.destroy_client(id, close_code::NORMAL, "destroyed");
                None
            }
            cmd::BIND_UID => {
                if let Some(uid) = name(ext()) {
                    self.apply("bind_uid", async move { engine.bind_uid(id, uid).await })
                        .await;
                }
                None
            }
            cmd::UNBIND_UID => {
                // GatewayWorker unbinds whatever uid the client has.
                if let Some(uid) = gw.hub.uid_of(id).flatten() {
                    self.apply(
                        "unbind_uid",
                        async move { engine.unbind_uid(id, uid).await },
                    )
                    .await;
                }
                None
            }
            cmd::JOIN_GROUP => {
                if let Some(group) = name(ext()) {
                    self.apply(
                        "join_group",
                        async move { engine.join_group(id, group).await },
                    )
                    .await;
                }
                None
            }
            cmd::LEAVE_GROUP => {
                if let Some(group) = name(ext()) {
                    self.apply(
                        "leave_group",
                        async move { engine.leave_group(id, group).await },
                    )
                    .await;
                }
                None
            }
            cmd::UNGROUP => {
                if let Some(group) = name(ext()) {
                    self.apply("ungroup", async move { engine.ungroup_local(group).await })
                        .await;
                }
                None
            }
            cmd::SET_SESSION | cmd::UPDATE_SESSION => {
                let given = php::session_from_php(&p.ext_data).map_err(|e| e.to_string())?;
                if let Some(current) = gw.hub.session_of(id) {
                    // updateSession merges as PHP's array_replace_recursive,
                    // which differs from the API's merge for lists.
                    let session = if p.cmd == cmd::UPDATE_SESSION {
                        php::replace_session(&current, &given)
                    } else {
                        given
                    };
                    self.apply("set_session", async move {
                        engine.set_session(id, session, false).await
                    })
                    .await;
                }
                None
            }
            cmd::GET_SESSION_BY_CLIENT_ID => {
                // The serialized session itself, not wrapped again.
                let session = match gw.hub.session_of(id) {
                    Some(s) => php::session_to_php(&s),
                    None => php::serialize(&Value::Null),
                };
                Some(protocol::encode_reply(&session))
            }
            cmd::IS_ONLINE => Some(reply(&Value::Int(i64::from(gw.hub.contains(id))))),
            cmd::GET_ALL_CLIENT_SESSIONS => Some(reply(&sessions(gw.hub.sessions()))),
            cmd::GET_CLIENT_SESSIONS_BY_GROUP => {
                Some(reply(&sessions(gw.hub.group_sessions(&ext()))))
            }
            cmd::GET_CLIENT_COUNT_BY_GROUP => {
                let group = ext();
                let n = if group.is_empty() {
                    gw.hub.client_count()
                } else {
                    gw.hub.group_client_count(&group)
                };
                Some(reply(&Value::Int(n as i64)))
            }
            cmd::BATCH_GET_CLIENT_COUNT_BY_GROUP => {
                let counts = strings(&json_ext(&p)).into_iter().map(|g| {
                    let n = gw.hub.group_client_count(&g) as i64;
                    (php::Key::from(g.as_str()), Value::Int(n))
                });
                Some(reply(&Value::Array(counts.collect())))
            }
            cmd::GET_CLIENT_ID_BY_UID => {
                let ids = gw.hub.client_ids_by_uid(&ext());
                Some(reply(&list(
                    ids.iter().map(|id| Value::Int(id.number().into())),
                )))
            }
            cmd::BATCH_GET_CLIENT_ID_BY_UID => {
                let uids = strings(&json_ext(&p)).into_iter().map(|u| {
                    let ids = gw.hub.client_ids_by_uid(&u);
                    let ids = list(ids.iter().map(|id| Value::Int(id.number().into())));
                    (php::Key::from(u.as_str()), ids)
                });
                Some(reply(&Value::Array(uids.collect())))
            }
            cmd::GET_GROUP_ID_LIST => {
                Some(reply(&list(gw.hub.groups().into_iter().map(Value::string))))
            }
            cmd::SELECT => Some(reply(&self.select(&json_ext(&p)))),
            other => return Err(format!("unknown command {other}")),
        };
        Ok(reply)
    }

    fn authorize(&self, peer: &mut Peer, p: &Packet) -> Result<(), String> {
        let body: Json = serde_json::from_slice(&p.body).unwrap_or(Json::Null);
        let given = body["secret_key"].as_str().unwrap_or_default();
        let key = &self.gw.config.gateway_secret_key;
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            key.as_bytes(),
        )) {
            peer.authorized = true;
            Ok(())
        } else {
            Err("wrong secret key".into())
        }
    }

    /// `WORKER_CONNECT` (body `{"worker_key":"name:n","secret_key":"…"}`):
    /// the peer is a BusinessWorker; from now on it gets this node's events
    /// and its writing side belongs to its queue.
    fn worker_connect(&self, peer: &mut Peer, p: &Packet) -> Result<(), String> {
        if peer.worker.is_some() {
            return Err("WORKER_CONNECT twice on one connection".into());
        }
        self.authorize(peer, p)?;
        let body: Json = serde_json::from_slice(&p.body).unwrap_or(Json::Null);
        let worker_key = match &body["worker_key"] {
            Json::String(k) => k.clone(),
            Json::Null => String::new(),
            other => other.to_string(),
        };
        let write = peer.write.take().ok_or("connection already closed")?;
        // GatewayWorker's key: a worker process is unique per host and name.
        let key = format!("{}:{worker_key}", peer.addr.ip());
        peer.worker = Some(self.gw.workers.add(key, write, peer.closed.clone()));
        peer.is_worker.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// This node's client_ids for connection numbers.
    fn ids(&self, numbers: impl Iterator<Item = u32>) -> Vec<ClientId> {
        let node = self.gw.minter.node();
        numbers.map(|n| ClientId::new(node, n)).collect()
    }

    /// The frame a push's body becomes: as given when `raw` (the caller
    /// framed it), else a text frame of exactly the bytes, UTF-8 or not, as
    /// Workerman sends it.
    fn frame(&self, p: &Packet) -> Bytes {
        if p.flag & flag::NOT_CALL_ENCODE != 0 {
            p.body.clone()
        } else {
            encode_frame(false, &p.body)
        }
    }

    /// Local delivery only: the GatewayClient sends to every node itself.
    fn deliver(&self, target: &Target, exclude: &[ClientId], p: &Packet) {
        let encode = || self.frame(p);
        let delivered = self.gw.hub.deliver_with(target, exclude, &encode);
        self.gw.metrics.delivered(target.kind(), delivered);
    }

    /// `select`: the listed fields of the connections `where` names (all
    /// when it names none), keyed by connection number.
    fn select(&self, ext: &Json) -> Value {
        let hub = &self.gw.hub;
        let fields = strings(&ext["fields"]);
        let mut chosen: BTreeMap<u32, ClientId> = BTreeMap::new();
        match ext.get("where").and_then(Json::as_object) {
            Some(conditions) if !conditions.is_empty() => {
                for (key, items) in conditions {
                    match key.as_str() {
                        "groups" => {
                            for g in strings(items) {
                                chosen.extend(
                                    hub.group_client_ids(&g).iter().map(|i| (i.number(), *i)),
                                );
                            }
                        }
                        "uid" => {
                            for u in strings(items) {
                                chosen.extend(
                                    hub.client_ids_by_uid(&u).iter().map(|i| (i.number(), *i)),
                                );
                            }
                        }
                        "connection_id" => {
                            for id in self.ids(values(items)) {
                                if hub.contains(id) {
                                    chosen.insert(id.number(), id);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => chosen.extend(hub.client_ids().iter().map(|i| (i.number(), *i))),
        }
        let rows = chosen.into_iter().filter_map(|(n, id)| {
            let m = hub.membership(id)?;
            let row = fields.iter().map(|f| {
                let value = match f.as_str() {
                    "uid" => m.uid.clone().map(Value::string).unwrap_or(Value::Null),
                    "groups" if m.groups.is_empty() => Value::Null,
                    "groups" => Value::Array(
                        m.groups
                            .iter()
                            .map(|g| (php::Key::from(g.as_str()), Value::string(g.clone())))
                            .collect(),
                    ),
                    "session" => Value::String(php::session_to_php(&m.session)),
                    _ => Value::Null,
                };
                (php::Key::from(f.as_str()), value)
            });
            Some((php::Key::Int(n.into()), Value::Array(row.collect())))
        });
        Value::Array(rows.collect())
    }
}

/// A reply: the 4-byte length and PHP `serialize()`.
fn reply(value: &Value) -> Bytes {
    protocol::encode_reply(&php::serialize(value))
}

/// A PHP list.
fn list(items: impl Iterator<Item = Value>) -> Value {
    Value::Array(
        items
            .enumerate()
            .map(|(i, v)| (php::Key::Int(i as i64), v))
            .collect(),
    )
}

/// `[connection number => serialized session]`, as a gateway answers.
fn sessions(sessions: Vec<(ClientId, Session)>) -> Value {
    let rows = sessions.into_iter().map(|(id, s)| {
        let serialized = php::session_to_php(&s);
        (php::Key::Int(id.number().into()), Value::String(serialized))
    });
    Value::Array(rows.collect())
}

/// The JSON in `ext_data` (null when absent or not JSON).
fn json_ext(p: &Packet) -> Json {
    serde_json::from_slice(&p.ext_data).unwrap_or(Json::Null)
}

/// Strings of a JSON list or map (its values); numbers as their decimal.
fn strings(v: &Json) -> Vec<String> {
    let items: Box<dyn Iterator<Item = &Json>> = match v {
        Json::Array(a) => Box::new(a.iter()),
        Json::Object(o) => Box::new(o.values()),
        other => Box::new(std::iter::once(other)),
    };
    items
        .filter_map(|v| match v {
            Json::String(s) => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Connection numbers from the values of a JSON list or map.
fn values(v: &Json) -> impl Iterator<Item = u32> + '_ {
    strings(v).into_iter().filter_map(|s| s.parse().ok())
}

/// Connection numbers from the keys of a JSON map.
fn keys(v: Option<&Json>) -> impl Iterator<Item = u32> + '_ {
    v.and_then(Json::as_object)
        .into_iter()
        .flat_map(|o| o.keys())
        .filter_map(|k| k.parse().ok())
}

/// A uid or group as GatewayWorker takes it: PHP's `empty()` refuses "" and
/// "0"; gatecast's limit of 256 bytes applies.
fn name(s: String) -> Option<String> {
    if s.is_empty() || s == "0" {
        return None;
    }
    crate::name::Name::new(s).ok().map(|n| n.0)
}
