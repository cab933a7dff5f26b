//! The API methods, one to one with GatewayWorker's `Gateway::` class: parse
//! the parameters, call the engine, shape the result.

use base64::Engine as _;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::ids::ClientId;
use crate::name::{Name, OneOrMany};
use crate::push::{Message, Push, Target};
use crate::session::Session;

/// Every method name, as used in the metrics' `method` label.
pub const METHODS: &[&str] = &[
    "send_to_all",
    "send_to_client",
    "send_to_uid",
    "send_to_group",
    "close_client",
    "is_online",
    "bind_uid",
    "unbind_uid",
    "is_uid_online",
    "get_client_id_by_uid",
    "get_uid_by_client_id",
    "join_group",
    "leave_group",
    "ungroup",
    "get_client_count_by_group",
    "get_client_id_list_by_group",
    "get_client_sessions_by_group",
    "get_uid_list_by_group",
    "get_uid_count_by_group",
    "get_all_client_count",
    "get_all_client_id_list",
    "get_all_client_sessions",
    "get_all_uid_list",
    "get_all_uid_count",
    "get_all_group_id_list",
    "set_session",
    "update_session",
    "get_session",
    "batch",
];

/// The `&'static` name of `method`, or `"unknown"`.
pub fn label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// The message of a push: `data` (text; a JSON value that is not a string is
/// sent as its compact JSON text) or `data_base64` (binary).
#[derive(Debug, Deserialize)]
struct Data {
    data: Option<Value>,
    data_base64: Option<String>,
}

impl Data {
    fn message(self, max: usize) -> Result<Option<Message>, ApiError> {
        let message = match (self.data, self.data_base64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_params(
                    "give data or data_base64, not both",
                ))
            }
            (None, None) => return Ok(None),
            (Some(Value::String(s)), None) => Message::text(s),
            (Some(other), None) => Message::text(other.to_string()),
            (None, Some(b64)) => Message::binary(decode_base64(&b64)?),
        };
        if message.data.len() > max {
            return Err(ApiError::message_too_large(message.data.len(), max));
        }
        Ok(Some(message))
    }

    fn required(self, max: usize) -> Result<Message, ApiError> {
        self.message(max)?
            .ok_or_else(|| ApiError::invalid_params("missing data or data_base64"))
    }
}

fn decode_base64(s: &str) -> Result<Bytes, ApiError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .map(Bytes::from)
        .map_err(|e| ApiError::invalid_params(format!("data_base64 is not base64: {e}")))
}

#[derive(Debug, Deserialize)]
struct SendToAll {
    #[serde(flatten)]
    data: Data,
    #[serde(default, deserialize_with = "null_as_empty")]
    exclude_client_ids: Vec<ClientId>,
    client_ids: Option<Vec<ClientId>>,
    /// Keep it in history (docs/recovery.md): overrides --history-streams.
    #[serde(default)]
    history: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct SendToClient {
    client_id: ClientId,
    #[serde(flatten)]
    data: Data,
}

#[derive(Debug, Deserialize)]
struct SendToUid {
    uid: Option<OneOrMany>,
    uids: Option<OneOrMany>,
    #[serde(flatten)]
    data: Data,
    /// Keep it in history (docs/recovery.md): overrides --history-streams.
    #[serde(default)]
    history: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct SendToGroup {
    group: Option<OneOrMany>,
    groups: Option<OneOrMany>,
    #[serde(default, deserialize_with = "null_as_empty")]
    exclude_client_ids: Vec<ClientId>,
    #[serde(flatten)]
    data: Data,
    /// Keep it in history (docs/recovery.md): overrides --history-streams.
    #[serde(default)]
    history: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct CloseClient {
    client_id: ClientId,
    #[serde(flatten)]
    data: Data,
}

#[derive(Debug, Deserialize)]
struct ClientParam {
    client_id: ClientId,
}

#[derive(Debug, Deserialize)]
struct UidParam {
    uid: Name,
}

#[derive(Debug, Deserialize)]
struct GroupParam {
    group: Name,
}

#[derive(Debug, Deserialize)]
struct ClientUid {
    client_id: ClientId,
    uid: Name,
}

#[derive(Debug, Deserialize)]
struct ClientGroup {
    client_id: ClientId,
    group: Name,
}

#[derive(Debug, Deserialize)]
struct ClientSession {
    client_id: ClientId,
    session: Session,
}

/// `null` reads as an empty list: PHP backends send `null` for "none".
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn parse<T: DeserializeOwned>(params: Value) -> Result<T, ApiError> {
    serde_json::from_value(params).map_err(|e| ApiError::invalid_params(e.to_string()))
}

/// Most groups one push names: each group's channel gets the groups listed
/// before it (a node delivers to a member from its first group only), so
/// the bytes published grow with the square of this.
pub const MAX_PUSH_GROUPS: usize = 100;

/// Refuses a list longer than `max`.
fn at_most<T>(list: &[T], max: usize, what: &str) -> Result<(), ApiError> {
    if list.len() > max {
        return Err(ApiError::invalid_params(format!(
            "{what} lists at most {max} items, got {}",
            list.len()
        )));
    }
    Ok(())
}

/// Names from a singular and a plural parameter, at least one required, at
/// most `max`.
fn names(
    one: Option<OneOrMany>,
    many: Option<OneOrMany>,
    what: &str,
    max: usize,
) -> Result<Vec<String>, ApiError> {
    let mut all: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for name in one
        .into_iter()
        .chain(many)
        .flat_map(OneOrMany::into_strings)
    {
        // Each channel once: a repeated name would publish twice.
        if seen.insert(name.clone()) {
            all.push(name);
        }
    }
    at_most(&all, max, what)?;
    if all.is_empty() {
        return Err(ApiError::invalid_params(format!(
            "missing {what} or {what}s"
        )));
    }
    Ok(all)
}

fn sessions_object(sessions: Vec<(ClientId, Session)>) -> Value {
    let map: Map<String, Value> = sessions
        .into_iter()
        .map(|(id, s)| (id.to_string(), Value::Object(s)))
        .collect();
    Value::Object(map)
}

/// Runs one method with its parameters (a JSON object).
pub async fn call(gw: &Gateway, method: &str, params: Value) -> Result<Value, ApiError> {
    let engine = &gw.engine;
    let max = gw.config.max_message_bytes;
    let items = gw.config.max_list_items;
    let params = match params {
        Value::Null => Value::Object(Map::new()),
        Value::Object(_) => params,
        _ => return Err(ApiError::invalid_params("params must be a JSON object")),
    };
    let null = Value::Null;
    Ok(match method {
        "send_to_all" => {
            let p: SendToAll = parse(params)?;
            at_most(&p.exclude_client_ids, items, "exclude_client_ids")?;
            at_most(
                p.client_ids.as_deref().unwrap_or_default(),
                items,
                "client_ids",
            )?;
            let target = match p.client_ids {
                Some(ids) => Target::Clients(ids),
                None => Target::All,
            };
            let message = p.data.required(max)?;
            publish(gw, target, p.exclude_client_ids, message, p.history).await?;
            null
        }
        "send_to_client" => {
            let p: SendToClient = parse(params)?;
            let message = p.data.required(max)?;
            let target = Target::Client(p.client_id);
            publish(gw, target, Vec::new(), message, Some(false)).await?;
            null
        }
        "send_to_uid" => {
            let p: SendToUid = parse(params)?;
            let uids = names(p.uid, p.uids, "uid", items)?;
            let message = p.data.required(max)?;
            publish(gw, Target::Uids(uids), Vec::new(), message, p.history).await?;
            null
        }
        "send_to_group" => {
            let p: SendToGroup = parse(params)?;
            let groups = names(p.group, p.groups, "group", items.min(MAX_PUSH_GROUPS))?;
            at_most(&p.exclude_client_ids, items, "exclude_client_ids")?;
            let message = p.data.required(max)?;
            let target = Target::Groups(groups);
            publish(gw, target, p.exclude_client_ids, message, p.history).await?;
            null
        }
        "close_client" => {
            let p: CloseClient = parse(params)?;
            engine
                .close_client(p.client_id, p.data.message(max)?)
                .await?;
            null
        }
        "is_online" => {
            let p: ClientParam = parse(params)?;
            json!(engine.is_online(p.client_id).await?)
        }
        "bind_uid" => {
            let p: ClientUid = parse(params)?;
            engine.bind_uid(p.client_id, p.uid.0).await?;
            null
        }
        "unbind_uid" => {
            let p: ClientUid = parse(params)?;
            engine.unbind_uid(p.client_id, p.uid.0).await?;
            null
        }
        "is_uid_online" => {
            let p: UidParam = parse(params)?;
            json!(engine.is_uid_online(p.uid.0).await?)
        }
        "get_client_id_by_uid" => {
            let p: UidParam = parse(params)?;
            json!(engine.client_ids_by_uid(p.uid.0).await?)
        }
        "get_uid_by_client_id" => {
            let p: ClientParam = parse(params)?;
            json!(engine.uid_of(p.client_id).await?)
        }
        "join_group" => {
            let p: ClientGroup = parse(params)?;
            engine.join_group(p.client_id, p.group.0).await?;
            null
        }
        "leave_group" => {
            let p: ClientGroup = parse(params)?;
            engine.leave_group(p.client_id, p.group.0).await?;
            null
        }
        "ungroup" => {
            let p: GroupParam = parse(params)?;
            engine.ungroup(p.group.0).await?;
            null
        }
        "get_client_count_by_group" => {
            let p: GroupParam = parse(params)?;
            json!(engine.group_client_count(p.group.0).await?)
        }
        "get_client_id_list_by_group" => {
            let p: GroupParam = parse(params)?;
            json!(engine.group_client_ids(p.group.0).await?)
        }
        "get_client_sessions_by_group" => {
            let p: GroupParam = parse(params)?;
            sessions_object(engine.group_sessions(p.group.0).await?)
        }
        "get_uid_list_by_group" => {
            let p: GroupParam = parse(params)?;
            json!(engine.group_uids(p.group.0).await?)
        }
        "get_uid_count_by_group" => {
            let p: GroupParam = parse(params)?;
            json!(engine.group_uids(p.group.0).await?.len())
        }
        "get_all_client_count" => json!(engine.client_count().await?),
        "get_all_client_id_list" => json!(engine.client_ids().await?),
        "get_all_client_sessions" => sessions_object(engine.sessions().await?),
        "get_all_uid_list" => json!(engine.uids().await?),
        "get_all_uid_count" => json!(engine.uid_count().await?),
        "get_all_group_id_list" => json!(engine.groups().await?),
        "set_session" | "update_session" => {
            let p: ClientSession = parse(params)?;
            let merge = method == "update_session";
            // Judged here first, so a session meant for another node's
            // connection gets its 400 too; a merge that grows past the
            // limit is refused where the connection lives.
            if let Err(e) = crate::session::check(&p.session, gw.config.max_session_bytes) {
                gw.metrics
                    .sessions_refused
                    .get_or_create(&crate::metrics::ReasonLabel { reason: e.label() })
                    .inc();
                return Err(ApiError::session_refused(e));
            }
            engine.set_session(p.client_id, p.session, merge).await?;
            null
        }
        "get_session" => {
            let p: ClientParam = parse(params)?;
            json!(engine.session_of(p.client_id).await?)
        }
        _ => return Err(ApiError::unknown_method(method)),
    })
}

async fn publish(
    gw: &Gateway,
    target: Target,
    exclude: Vec<ClientId>,
    message: Message,
    history: Option<bool>,
) -> Result<(), ApiError> {
    gw.metrics
        .pushes
        .get_or_create(&crate::metrics::KindLabel {
            kind: target.kind(),
        })
        .inc();
    let push = Push {
        target,
        exclude,
        message,
        history,
    };
    gw.engine.publish(push).await?;
    Ok(())
}
