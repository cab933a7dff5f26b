//! The answers to GatewayClient's queries, read from the hub by the
//! connection that asked (never by the sequencer: a large answer costs only
//! the connection that wants it).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::Value as Json;

use super::super::php::{self, Value};
use super::super::protocol::{self, cmd, Packet};
use super::{json_ext, strings, values};
use crate::gateway::Gateway;
use crate::ids::ClientId;
use crate::session::Session;

/// Largest answer, serialized: GatewayClient reads it whole into memory.
/// Past it the connection is closed rather than answered (a node holds at
/// most one answer per connection).
pub const MAX_REPLY: usize = 64 << 20;

/// The answer to query `p`, length-prefixed as GatewayClient reads it.
pub(crate) fn answer(gw: &Gateway, p: &Packet) -> Result<Bytes, String> {
    let hub = &gw.hub;
    let id = ClientId::new(gw.minter.node(), p.connection_id);
    let ext = || String::from_utf8_lossy(&p.ext_data).into_owned();
    let serialized = match p.cmd {
        // The serialized session itself, not wrapped again.
        cmd::GET_SESSION_BY_CLIENT_ID => match hub.session_of(id) {
            Some(s) => php::session_to_php(&s),
            None => php::serialize(&Value::Null),
        },
        cmd::IS_ONLINE => php::serialize(&Value::Int(i64::from(hub.contains(id)))),
        cmd::GET_ALL_CLIENT_SESSIONS => php::serialize(&sessions(hub.sessions())),
        cmd::GET_CLIENT_SESSIONS_BY_GROUP => php::serialize(&sessions(hub.group_sessions(&ext()))),
        cmd::GET_CLIENT_COUNT_BY_GROUP => {
            let group = ext();
            let n = if group.is_empty() {
                hub.client_count()
            } else {
                hub.group_client_count(&group)
            };
            php::serialize(&Value::Int(n as i64))
        }
        cmd::BATCH_GET_CLIENT_COUNT_BY_GROUP => {
            let counts = strings(&json_ext(p)).into_iter().map(|g| {
                let n = hub.group_client_count(&g) as i64;
                (php::Key::from(g.as_str()), Value::Int(n))
            });
            php::serialize(&Value::Array(counts.collect()))
        }
        cmd::GET_CLIENT_ID_BY_UID => {
            let ids = hub.client_ids_by_uid(&ext());
            php::serialize(&list(ids.iter().map(|id| Value::Int(id.number().into()))))
        }
        cmd::BATCH_GET_CLIENT_ID_BY_UID => {
            let uids = strings(&json_ext(p)).into_iter().map(|u| {
                let ids = hub.client_ids_by_uid(&u);
                let ids = list(ids.iter().map(|id| Value::Int(id.number().into())));
                (php::Key::from(u.as_str()), ids)
            });
            php::serialize(&Value::Array(uids.collect()))
        }
        cmd::GET_GROUP_ID_LIST => {
            php::serialize(&list(hub.groups().into_iter().map(Value::string)))
        }
        cmd::SELECT => php::serialize(&select(gw, &json_ext(p))),
        other => return Err(format!("command {other} is not a query")),
    };
    if serialized.len() > MAX_REPLY {
        return Err(format!(
            "the answer ({} bytes) is over the {MAX_REPLY}-byte limit",
            serialized.len()
        ));
    }
    protocol::try_encode_reply(&serialized).map_err(|e| e.to_string())
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

/// `select`: the listed fields of the connections `where` names (all when
/// it names none), keyed by connection number.
fn select(gw: &Gateway, ext: &Json) -> Value {
    let hub = &gw.hub;
    let node = gw.minter.node();
    let fields = strings(&ext["fields"]);
    let mut chosen: BTreeMap<u32, ClientId> = BTreeMap::new();
    match ext.get("where").and_then(Json::as_object) {
        Some(conditions) if !conditions.is_empty() => {
            for (key, items) in conditions {
                match key.as_str() {
                    "groups" => {
                        for g in strings(items) {
                            chosen
                                .extend(hub.group_client_ids(&g).iter().map(|i| (i.number(), *i)));
                        }
                    }
                    "uid" => {
                        for u in strings(items) {
                            chosen
                                .extend(hub.client_ids_by_uid(&u).iter().map(|i| (i.number(), *i)));
                        }
                    }
                    "connection_id" => {
                        for id in values(items).map(|n| ClientId::new(node, n)) {
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
