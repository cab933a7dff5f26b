//! GatewayWorker's gateway protocol on the inner port: what a GatewayClient
//! (or a BusinessWorker's `Gateway::` calls) sends to a gateway process.
//!
//! A GatewayClient asks the Register for every gateway's address, sends a
//! call for one client to the address inside its client_id, and a call for
//! everyone (a broadcast, a group, a query) to every address; it credits
//! each answer to the address it asked, rebuilding client_ids from that
//! address and the connection numbers in the answer. So each node answers
//! and delivers for its own connections only, exactly as one GatewayWorker
//! gateway does, and membership and session changes go through the engine,
//! so the HTTP API, the Redis path and the PHP path see one state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::php::{self, Value};
use super::protocol::{self, cmd, flag, Packet};
use crate::accept::Acceptor;
use crate::frame::close_code;
use crate::gateway::Gateway;
use crate::ids::ClientId;
use crate::push::{encode_frame, Target};
use crate::session::Session;

/// Largest packet accepted (GatewayWorker's default `maxPackageSize`).
const MAX_PACKET: usize = 10 << 20;

/// Inner connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 10_000;

/// A connection silent for this long is closed (GatewayClient opens one per
/// call, or keeps one per PHP worker with persistent connections).
const IDLE: Duration = Duration::from_secs(600);

/// Longest a reply may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the inner listener until `stop`.
pub async fn serve(gw: Arc<Gateway>, mut listener: Acceptor, stop: CancellationToken) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!(%peer, "inner connection refused: too many open");
            gw.metrics.inner_errors.inc();
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (gw, open, stop) = (gw.clone(), open.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                result = Connection::new(&gw).run(socket) => {
                    if let Err(reason) = result {
                        gw.metrics.inner_errors.inc();
                        tracing::warn!(%peer, %reason, "inner connection closed");
                    }
                }
                () = stop.cancelled() => {}
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One inner connection.
struct Connection<'a> {
    gw: &'a Gateway,
    authorized: bool,
}

impl<'a> Connection<'a> {
    fn new(gw: &'a Gateway) -> Self {
        Connection {
            gw,
            authorized: gw.config.gateway_secret_key.is_empty(),
        }
    }

    /// Reads packets and answers them, in order, until the peer closes.
    async fn run(mut self, mut socket: TcpStream) -> Result<(), String> {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            while let Some(packet) =
                protocol::decode(&mut buf, MAX_PACKET).map_err(|e| e.to_string())?
            {
                if let Some(reply) = self.handle(packet).await? {
                    tokio::time::timeout(WRITE_TIMEOUT, socket.write_all(&reply))
                        .await
                        .map_err(|_| "reply not taken in time".to_owned())?
                        .map_err(|e| e.to_string())?;
                }
            }
            let read = tokio::time::timeout(IDLE, socket.read_buf(&mut buf))
                .await
                .map_err(|_| "idle".to_owned())?
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Ok(());
            }
        }
    }

    /// One packet; the reply to send back, if the command has one.
    async fn handle(&mut self, p: Packet) -> Result<Option<Bytes>, String> {
        if !self.authorized {
            if p.cmd != cmd::GATEWAY_CLIENT_CONNECT {
                return Err(format!("command {} before authentication", p.cmd));
            }
            return self.authorize(&p).map(|()| None);
        }
        let gw = self.gw;
        let id = ClientId::new(gw.minter.node(), p.connection_id);
        let engine = &gw.engine;
        let ext = || String::from_utf8_lossy(&p.ext_data).into_owned();
        let fail = |e: crate::engine::EngineError| e.to_string();
        let reply = match p.cmd {
            cmd::GATEWAY_CLIENT_CONNECT => {
                self.authorize(&p)?;
                None
            }
            cmd::WORKER_CONNECT => return Err(
                "a BusinessWorker connected: gatecast does not run Events.php yet (use --events)"
                    .into(),
            ),
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
                    engine.bind_uid(id, uid).await.map_err(fail)?;
                }
                None
            }
            cmd::UNBIND_UID => {
                // GatewayWorker unbinds whatever uid the client has.
                if let Some(uid) = gw.hub.uid_of(id).flatten() {
                    engine.unbind_uid(id, uid).await.map_err(fail)?;
                }
                None
            }
            cmd::JOIN_GROUP => {
                if let Some(group) = name(ext()) {
                    engine.join_group(id, group).await.map_err(fail)?;
                }
                None
            }
            cmd::LEAVE_GROUP => {
                if let Some(group) = name(ext()) {
                    engine.leave_group(id, group).await.map_err(fail)?;
                }
                None
            }
            cmd::UNGROUP => {
                if let Some(group) = name(ext()) {
                    engine.ungroup_local(group).await.map_err(fail)?;
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
                    engine.set_session(id, session, false).await.map_err(fail)?;
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

    fn authorize(&mut self, p: &Packet) -> Result<(), String> {
        let body: Json = serde_json::from_slice(&p.body).unwrap_or(Json::Null);
        let given = body["secret_key"].as_str().unwrap_or_default();
        let key = &self.gw.config.gateway_secret_key;
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            key.as_bytes(),
        )) {
            self.authorized = true;
            Ok(())
        } else {
            Err("wrong secret key".into())
        }
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
