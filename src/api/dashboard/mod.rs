//! The built-in dashboard on the internal listener (docs/dashboard.md).
//!
//! `GET /dashboard` serves a page (plain HTML, JS and CSS compiled into the
//! binary; no build step, nothing from elsewhere) that holds no secret: it
//! asks for the API key, keeps it in the tab's `sessionStorage` and sends
//! it as `Authorization: Bearer` to the data endpoints below, which are
//! behind the API key like every `/api/` call and answer in the API's
//! shapes. Actions (test push, close, evacuate) call the existing API
//! methods from the page.
//!
//! - `GET /api/dashboard/overview`: every node's stats record, totals.
//! - `GET /api/dashboard/client?client_id=`, `.../uid?uid=`,
//!   `.../group?group=`: lookups, through the engine's queries.
//! - `GET /api/dashboard/tail?uid=` or `?group=`: a live tail, as
//!   `text/event-stream` read with `fetch` (so the key travels in a
//!   header, never in a URL), bounded and sampled (`crate::tail`).
//! - `POST /api/dashboard/evacuate` `{"node", "rate"?}`: evacuates any
//!   live node: this one at once (as `POST /api/evacuate`), another
//!   through a request it takes with its next stats record.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

use super::{authorize, with_deadline};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::ids::ClientId;
use crate::metrics::ApiLabels;
use crate::name::Name;
use crate::tail::{TailTarget, MAX_WATCHERS};

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");

/// Items a lookup lists at most (counts stay exact).
pub const MAX_LISTED: usize = 500;

/// Connections of a uid a lookup details (groups and session each) at most.
pub const MAX_DETAILED: usize = 50;

/// Longest a tail runs; the page starts another.
pub const MAX_TAIL: Duration = Duration::from_secs(600);

/// Between two keep-alive comments on an idle tail.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Tails open on this process (one node per process; nodes embedded
/// together share the bound).
static WATCHERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_WATCHERS);

/// The dashboard's routes, for the internal listener.
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/dashboard", get(|| async { asset(PAGE, "text/html") }))
        .route(
            "/dashboard/dashboard.js",
            get(|| async { asset(SCRIPT, "text/javascript") }),
        )
        .route(
            "/dashboard/dashboard.css",
            get(|| async { asset(STYLE, "text/css") }),
        )
        .route("/api/dashboard/overview", get(overview))
        .route("/api/dashboard/client", get(client))
        .route("/api/dashboard/uid", get(uid))
        .route("/api/dashboard/group", get(group))
        .route("/api/dashboard/tail", get(tail))
        .route("/api/dashboard/evacuate", axum::routing::post(evacuate))
}

/// A static file of the page, never cached (it changes with the binary)
/// and allowed to load nothing but this origin's files.
fn asset(body: &'static str, kind: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
                    .to_owned(),
            ),
            (header::X_FRAME_OPTIONS, "DENY".to_owned()),
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
        body,
    )
        .into_response()
}

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

/// Runs a data endpoint: the API key first, then `f` within the API's
/// deadline; counted as the API method `dashboard`.
async fn answer<F, Fut>(gw: &Arc<Gateway>, headers: &HeaderMap, f: F) -> Response
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Value, ApiError>>,
{
    let result = match authorize(gw, headers) {
        Ok(()) => with_deadline(f()).await,
        Err(e) => Err(e),
    };
    let mut response = match result {
        Ok(value) => Json(json!({ "result": value })).into_response(),
        Err(e) => e.into_response(),
    };
    // Sessions and ids: never kept by a browser or a proxy.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    count(gw, response.status());
    response
}

fn count(gw: &Gateway, status: StatusCode) {
    gw.metrics
        .api_requests
        .get_or_create(&ApiLabels {
            method: "dashboard",
            status: status.as_u16(),
        })
        .inc();
}

fn param(params: &Params, name: &str) -> Result<String, ApiError> {
    let Ok(Query(params)) = params else {
        return Err(ApiError::invalid_params("unreadable query string"));
    };
    params
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::invalid_params(format!("missing ?{name}=")))
}

fn name(params: &Params, which: &str) -> Result<String, ApiError> {
    let value = param(params, which)?;
    Name::new(value)
        .map(|n| n.0)
        .map_err(|e| ApiError::invalid_params(format!("{which} {e}")))
}

fn client_id(params: &Params) -> Result<ClientId, ApiError> {
    param(params, "client_id")?
        .parse()
        .map_err(|_| ApiError::invalid_params("client_id must be 20 hex digits"))
}

async fn overview(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    answer(&gw, &headers, || async {
        let engine = &gw.engine;
        let (stats, live) = tokio::try_join!(engine.cluster_stats(), engine.node_addresses())?;
        let shown: Vec<&str> = stats.iter().map(|s| s.inner.as_str()).collect();
        let without_stats: Vec<String> = live
            .iter()
            .map(ToString::to_string)
            .filter(|a| !shown.contains(&a.as_str()))
            .collect();
        let sum = |f: fn(&crate::stats::NodeStats) -> f64| stats.iter().map(f).sum::<f64>();
        Ok(json!({
            "this_node": gw.minter.node().to_string(),
            "engine": if gw.config.redis_url.is_some() { "redis" } else { "memory" },
            "at_ms": crate::stats::unix_ms(),
            "nodes": stats,
            "without_stats": without_stats,
            "totals": {
                "nodes": stats.len() + without_stats.len(),
                "ready": stats.iter().filter(|s| s.ready).count(),
                "connections": stats.iter().map(|s| s.connections).sum::<u64>(),
                "pushes_per_sec": sum(|s| s.pushes_per_sec),
                "deliveries_per_sec": sum(|s| s.deliveries_per_sec),
                "memory_rss_bytes": stats.iter().filter_map(|s| s.memory_rss_bytes).sum::<u64>(),
            },
        }))
    })
    .await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EvacuateParams {
    node: String,
    rate: Option<u32>,
}

async fn evacuate(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(&gw, &headers, || async {
        let p: EvacuateParams =
            serde_json::from_slice(&body).map_err(|e| ApiError::invalid_params(e.to_string()))?;
        let node: crate::ids::NodeId = p
            .node
            .parse()
            .map_err(|_| ApiError::invalid_params("node must be a node id (12 hex digits)"))?;
        let max = super::evacuate::MAX_RATE;
        if p.rate.is_some_and(|r| r == 0 || r > max) {
            return Err(ApiError::invalid_params(format!(
                "rate must be between 1 and {max} clients a second"
            )));
        }
        if node == gw.minter.node() {
            let rate = p.rate.unwrap_or(gw.config.evacuate_rate);
            gw.autoscale.evacuation.start(&gw, rate);
            return Ok(json!({"node": node.to_string(), "started": true}));
        }
        let live = gw.engine.cluster_stats().await?;
        let name = node.to_string();
        if !live.iter().any(|s| s.node == name) {
            return Err(ApiError::invalid_params(format!(
                "no live node {node} (not registered, or no fresh stats record)"
            )));
        }
        gw.engine.request_evacuation(node, p.rate).await?;
        Ok(json!({
            "node": name,
            "started": false,
            "requested": true,
            "within_ms": gw.config.node_heartbeat.as_millis() as u64,
        }))
    })
    .await
}

/// One connection: where it is, its uid, groups and session.
async fn client_info(gw: &Gateway, id: ClientId) -> Result<Value, ApiError> {
    let engine = &gw.engine;
    let (online, uid, groups, session) = tokio::try_join!(
        engine.is_online(id),
        engine.uid_of(id),
        engine.groups_of(id),
        engine.session_of(id),
    )?;
    Ok(json!({
        "client_id": id.to_string(),
        "node": id.node().to_string(),
        "inner": id.node().addr().to_string(),
        "online": online,
        "uid": uid,
        "groups": groups,
        "session": session,
    }))
}

async fn client(State(gw): State<Arc<Gateway>>, headers: HeaderMap, params: Params) -> Response {
    answer(&gw, &headers, || async {
        let id = client_id(&params)?;
        client_info(&gw, id).await
    })
    .await
}

async fn uid(State(gw): State<Arc<Gateway>>, headers: HeaderMap, params: Params) -> Response {
    answer(&gw, &headers, || async {
        let uid = name(&params, "uid")?;
        let mut ids = gw.engine.client_ids_by_uid(uid.clone()).await?;
        ids.sort();
        let details = futures_util::future::try_join_all(
            ids.iter()
                .take(MAX_DETAILED)
                .map(|id| client_info(&gw, *id)),
        )
        .await?;
        Ok(json!({
            "uid": uid,
            "count": ids.len(),
            "per_node": per_node(&ids),
            "clients": details,
            "truncated": ids.len() > MAX_DETAILED,
        }))
    })
    .await
}

async fn group(State(gw): State<Arc<Gateway>>, headers: HeaderMap, params: Params) -> Response {
    answer(&gw, &headers, || async {
        let group = name(&params, "group")?;
        let (mut ids, mut uids) = tokio::try_join!(
            gw.engine.group_client_ids(group.clone()),
            gw.engine.group_uids(group.clone()),
        )?;
        ids.sort();
        uids.sort();
        let listed: Vec<String> = ids.iter().take(MAX_LISTED).map(|i| i.to_string()).collect();
        Ok(json!({
            "group": group,
            "count": ids.len(),
            "per_node": per_node(&ids),
            "client_ids": listed,
            "uid_count": uids.len(),
            "uids": uids.iter().take(MAX_LISTED).collect::<Vec<_>>(),
            "truncated": ids.len() > MAX_LISTED || uids.len() > MAX_LISTED,
        }))
    })
    .await
}

/// How many of `ids` each node holds, by node id, with its inner address.
fn per_node(ids: &[ClientId]) -> Value {
    let mut counts: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for id in ids {
        let node = id.node();
        counts
            .entry(node.to_string())
            .or_insert_with(|| (node.addr().to_string(), 0))
            .1 += 1;
    }
    Value::Array(
        counts
            .into_iter()
            .map(|(node, (inner, count))| json!({"node": node, "inner": inner, "count": count}))
            .collect(),
    )
}

/// One server-sent event.
fn event(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

async fn tail(State(gw): State<Arc<Gateway>>, headers: HeaderMap, params: Params) -> Response {
    let started = async {
        authorize(&gw, &headers)?;
        let target = match (param(&params, "uid"), param(&params, "group")) {
            (Ok(_), Ok(_)) => return Err(ApiError::invalid_params("give uid or group, not both")),
            (Ok(_), Err(_)) => TailTarget::Uid(name(&params, "uid")?),
            (Err(_), Ok(_)) => TailTarget::Group(name(&params, "group")?),
            (Err(_), Err(_)) => return Err(ApiError::invalid_params("missing ?uid= or ?group=")),
        };
        let permit = WATCHERS.try_acquire().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_tails",
                format!("this node serves at most {MAX_WATCHERS} tails at once"),
            )
        })?;
        let tail = with_deadline(async { Ok(gw.engine.tail(target.clone()).await?) }).await?;
        Ok((target, tail, permit))
    };
    let (target, tail, permit) = match started.await {
        Ok(started) => started,
        Err(e) => {
            count(&gw, e.status);
            return e.into_response();
        }
    };
    count(&gw, StatusCode::OK);
    let first = event(
        "ready",
        &json!({"target": target.label(), "node": gw.minter.node().to_string(),
                "rate": crate::tail::RATE, "queue": crate::tail::QUEUE}),
    );
    struct Stream {
        gw: Arc<Gateway>,
        tail: crate::tail::Tail,
        _permit: tokio::sync::SemaphorePermit<'static>,
        deadline: tokio::time::Instant,
        idle: Duration,
        done: bool,
    }
    let state = Stream {
        gw,
        tail,
        _permit: permit,
        deadline: tokio::time::Instant::now() + MAX_TAIL,
        idle: Duration::ZERO,
        done: false,
    };
    let tick = Duration::from_secs(1);
    let rest = futures_util::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        let end = |mut s: Stream, reason: &str| {
            s.done = true;
            let bytes = event("end", &json!({ "reason": reason }));
            Some((Ok::<_, std::io::Error>(bytes), s))
        };
        loop {
            if s.gw.is_draining() {
                return end(s, "the node is shutting down");
            }
            if tokio::time::Instant::now() >= s.deadline {
                return end(s, "the tail ran its longest: start it again");
            }
            match tokio::time::timeout(tick, s.tail.entries.recv()).await {
                Ok(Some(entry)) => {
                    s.idle = Duration::ZERO;
                    let data = serde_json::to_value(&entry).unwrap_or(Value::Null);
                    return Some((Ok(event("push", &data)), s));
                }
                Ok(None) => return end(s, "the tail's source ended (Redis connection lost?)"),
                Err(_) => {
                    s.idle += tick;
                    if s.idle >= KEEP_ALIVE {
                        s.idle = Duration::ZERO;
                        return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), s));
                    }
                }
            }
        }
    });
    let body = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }),
        rest,
    );
    let mut response = Body::from_stream(body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", PAGE),
            ("dashboard.js", SCRIPT),
            ("dashboard.css", STYLE),
        ] {
            for outside in [
                "http://",
                "https://",
                "src=\"//",
                "href=\"//",
                "@import",
                "url(",
            ] {
                assert!(!text.contains(outside), "{name} refers to {outside}");
            }
        }
        assert!(
            !PAGE.contains("<script>"),
            "no inline script: the CSP forbids it"
        );
        assert!(
            !PAGE.contains("style=\""),
            "no inline style: the CSP forbids it"
        );
    }

    #[test]
    fn every_element_the_script_uses_is_on_the_page() {
        let mut rest = SCRIPT;
        let mut seen = 0;
        while let Some(at) = rest.find("$('") {
            rest = &rest[at + 3..];
            let id = &rest[..rest.find('\'').unwrap()];
            assert!(PAGE.contains(&format!("id=\"{id}\"")), "#{id} is missing");
            seen += 1;
        }
        assert!(seen > 20, "{seen} ids checked");
    }
}
