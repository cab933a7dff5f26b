//! The client transport: the WebSocket handshake on `GET /ws` and one task
//! per connection.

pub mod auth;
pub mod connection;
pub mod limits;
pub mod partial;

use std::sync::Arc;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

use crate::autoscale::reconnect::pick_retry_ms;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::gatewayworker::handshake::Handshake;
use crate::hub::Membership;
use crate::recovery::resume::{self, ResumeSetup, Token};
use crate::recovery::RecoveryQuery;
use auth::Verified;

/// The parts of the upgrade request that connect events carry.
#[derive(Debug)]
pub struct RequestInfo {
    /// The raw query string.
    pub query: String,
    /// Headers that matter to backends.
    pub headers: serde_json::Map<String, serde_json::Value>,
}

/// Query parameters of `/ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// The client's JWT, when client auth is on.
    token: Option<String>,
    /// `recover=1`: opt in to recovery (docs/recovery.md).
    recover: Option<String>,
    /// The resume token of the connection to resume (opts in too).
    resume: Option<String>,
    /// Positions per stream to replay from, raw.
    pos: Option<String>,
}

impl WsQuery {
    /// The recovery parameters, when the client opted in; a `recover`
    /// value other than `1`/`true`/`0`/`false` is a 400.
    fn recovery(&mut self) -> Result<Option<RecoveryQuery>, ApiError> {
        let recover = match self.recover.as_deref() {
            None | Some("0" | "false") => false,
            Some("1" | "true") => true,
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "recover must be 1 or 0",
                ))
            }
        };
        let resume = self.resume.take().filter(|t| !t.is_empty());
        if !recover && resume.is_none() {
            if self.pos.is_some() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_pos",
                    "pos needs recover=1",
                ));
            }
            return Ok(None);
        }
        Ok(Some(RecoveryQuery {
            recover: true,
            resume,
            pos: self.pos.take(),
        }))
    }
}

/// `GET /ws`: checks origin and token, answers 101 and hands the socket to a
/// connection task.
pub async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(mut query): Query<WsQuery>,
    headers: HeaderMap,
    mut request: Request,
) -> Response {
    if gw.is_draining() {
        return ApiError::unavailable("the node is shutting down").into_response();
    }
    if gw.autoscale.evacuation.is_active() {
        let retry_ms = pick_retry_ms(gw.config.reconnect_window);
        return overloaded(&gw, Overloaded::Evacuating, retry_ms);
    }
    if gw.engine.refuses_clients() {
        let retry_ms = pick_retry_ms(gw.config.reconnect_window);
        return overloaded(&gw, Overloaded::RedisLost, retry_ms);
    }
    if let Some(value) = gw
        .limits
        .peers
        .observe(peer.ip(), std::time::Instant::now())
    {
        gw.metrics.untrusted_private_peers.set(value);
    }
    let ip = limits::client_ip(peer.ip(), &headers, &gw.config.trusted_proxies);
    let mut admitted = match gw.limits.admit(ip) {
        Ok(admitted) => admitted,
        Err(refused) => return refuse(&gw, refused),
    };
    let key = match handshake_key(&headers) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    if !origin_allowed(&gw.config.allowed_origins, &headers) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "origin not allowed",
        )
        .into_response();
    }
    // Node-wide, before anything costly (the token, Redis writes): a herd
    // arrives from as many addresses as it has clients.
    if let Err(retry_ms) = gw.autoscale.admission.admit(std::time::Instant::now()) {
        return overloaded(&gw, Overloaded::Rate, retry_ms);
    }
    // Every recovery parameter is checked here (a 400 before anything is
    // done), so a bad one never costs the client its resume token, which
    // `resume_setup` below consumes.
    let recovery = match query.recovery() {
        Ok(recovery) => recovery,
        Err(e) => return e.into_response(),
    };
    let positions = match recovery.as_ref().and_then(|r| r.pos.as_deref()) {
        None => None,
        Some(pos) => match crate::recovery::positions::parse(pos) {
            Ok(positions) => Some(positions),
            Err(e) => {
                return ApiError::new(StatusCode::BAD_REQUEST, "invalid_pos", e.to_string())
                    .into_response()
            }
        },
    };
    let recover = recovery.is_some();
    let mut verified = match &gw.client_auth {
        None => Verified {
            membership: Membership::default(),
            close_at_unix_ms: None,
        },
        Some(auth) => match query.token.as_deref().map(|t| auth.verify(t)) {
            Some(Ok(verified)) => verified,
            Some(Err(reason)) => {
                // Which check failed stays in the log: telling the client
                // would help someone probing for a way in.
                tracing::debug!(%reason, "client token refused");
                return ApiError::unauthorized("invalid token").into_response();
            }
            None => return ApiError::unauthorized("missing ?token=").into_response(),
        },
    };
    if let Err(e) = crate::session::check(&verified.membership.session, gw.config.max_session_bytes)
    {
        gw.metrics
            .sessions_refused
            .get_or_create(&crate::metrics::ReasonLabel { reason: e.label() })
            .inc();
        return ApiError::session_refused(e).into_response();
    }
    if let Some(sub) = &verified.membership.uid {
        if let Err(refused) = admitted.count_sub(sub) {
            return refuse(&gw, refused);
        }
    }
    let recovery = match recovery {
        None => None,
        Some(query) => match resume_setup(&gw, query, &mut verified).await {
            Ok(setup) => Some(setup),
            Err(response) => return *response,
        },
    };
    // What connect events tell backends, captured only when they are on.
    let request_info = gw.events.is_some().then(|| RequestInfo {
        query: crate::events::forwarded_query(request.uri().query().unwrap_or_default()),
        headers: crate::events::forwarded_headers(&gw.config.events_headers, &headers),
    });
    let client = SocketAddr::new(ip, peer.port());
    // What BusinessWorkers' onWebSocketConnect gets, kept only when one is
    // connected (taken whole: it is the application's own code).
    let handshake = gw.workers.any().then(|| {
        warn_open_origins(&gw);
        Handshake {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: headers.clone(),
            client,
            server_port: gw.config.listen.port(),
            strip_token: gw.client_auth.is_some() && !gw.config.worker_keep_token,
        }
    });
    let setup = Box::new(connection::Setup {
        membership: verified.membership,
        close_at_unix_ms: verified.close_at_unix_ms,
        request: request_info,
        client,
        handshake,
        recovery,
        recover,
        positions,
    });
    let on_upgrade = hyper::upgrade::on(&mut request);
    let task_gw = gw.clone();
    let task = async move {
        let Some(start) = upgraded(on_upgrade.await, task_gw, setup) else {
            return;
        };
        connection::serve(start).await;
        // Holds the connection's place in the limits for its whole life
        // (named here, not rebound: a binding would be a second copy in
        // the task's state).
        drop(admitted);
    };
    gw.connections.spawn(task);
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(key.as_bytes()))
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The recovery state of a connection that opted in: its own token, and
/// when it came with one, the membership it resumes (in place of what its
/// client token grants). Redis unreachable answers 503 with when to come
/// back: the token was not consumed, and may be tried again.
async fn resume_setup(
    gw: &Gateway,
    query: RecoveryQuery,
    verified: &mut Verified,
) -> Result<Box<ResumeSetup>, Box<Response>> {
    let (mut resumed, mut old_client_id) = (None, None);
    if let Some(text) = &query.resume {
        let sub = verified.membership.uid.as_deref().unwrap_or("");
        let check = gw.client_auth.is_some().then_some(sub);
        match resume::attempt(gw, text, check).await {
            Ok(Ok(restored)) => {
                verified.membership = restored.membership;
                old_client_id = Some(restored.old_client_id);
                resumed = Some(true);
            }
            Ok(Err(_)) => resumed = Some(false),
            Err(e) => {
                tracing::debug!(error = %e, "resume not possible now");
                let retry_ms = resume::jitter_ms(
                    std::time::Duration::from_secs(1),
                    std::time::Duration::from_secs(3),
                );
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({
                        "error": {"code": "unavailable", "message": "cannot resume now: try again"},
                        "retry_ms": retry_ms,
                    })),
                )
                    .into_response();
                let seconds = retry_ms.div_ceil(1000).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return Err(Box::new(response));
            }
        }
    }
    Ok(Box::new(ResumeSetup {
        query,
        token: Token::new(gw.minter.node()),
        resumed,
        old_client_id,
    }))
}

/// Says once per process, at the first handshake a BusinessWorker gets,
/// that any site may open connections: a browser sends the user's cookies
/// whatever the page's origin, and workers get them in `$_COOKIE`.
fn warn_open_origins(gw: &Gateway) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if gw.config.allowed_origins.is_empty()
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            "BusinessWorkers get every client's cookies and --allowed-origins is empty: \
             any web site can open a connection carrying your users' cookies; set \
             --allowed-origins to your front end's origins"
        );
    }
}

/// The socket itself out of hyper's upgrade, so that reads and writes need
/// no buffer of their own while the connection is idle (see `connection`).
fn upgraded(
    upgraded: hyper::Result<hyper::upgrade::Upgraded>,
    gw: Arc<Gateway>,
    setup: Box<connection::Setup>,
) -> Option<Box<connection::Start>> {
    let upgraded = match upgraded {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Some(Box::new(connection::Start {
            gw,
            stream: parts.io.into_inner(),
            early: parts.read_buf,
            setup,
        })),
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            None
        }
    }
}

/// The answer to a connection over a limit, counted.
fn refuse(gw: &Gateway, refused: limits::Refused) -> Response {
    let (reason, error) = match refused {
        limits::Refused::Node => (
            "node_full",
            ApiError::unavailable("this node holds --max-connections connections"),
        ),
        limits::Refused::Address => (
            "address_full",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                "too many connections from this address",
            ),
        ),
        limits::Refused::Sub => (
            "sub_full",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                "too many connections for this user",
            ),
        ),
        limits::Refused::Rate => (
            "connect_rate",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connects",
                "too many new connections from this address: retry later",
            ),
        ),
    };
    gw.metrics
        .connections_refused
        .get_or_create(&crate::metrics::ReasonLabel { reason })
        .inc();
    let mut response = error.into_response();
    if refused == limits::Refused::Rate {
        // A bucket refills one connection in 1 / rate seconds.
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Why a handshake is refused for the node's sake rather than the
/// client's.
#[derive(Debug, Clone, Copy)]
enum Overloaded {
    /// Past `--handshake-rate` (on its ramp).
    Rate,
    /// `POST /api/evacuate`.
    Evacuating,
    /// Redis unreachable past `--redis-lost-grace`.
    RedisLost,
}

/// 503 with `Retry-After` and `{"error":"overloaded","retry_ms":N,...}`
/// (or `"evacuating"`), counted. The body's shape is the reconnect-delay
/// contract (docs/api.md), not the API's error object.
fn overloaded(gw: &Gateway, why: Overloaded, retry_ms: u64) -> Response {
    let (reason, error, message) = match why {
        Overloaded::Rate => (
            "handshake_rate",
            "overloaded",
            "this node admits --handshake-rate new connections a second: retry after retry_ms",
        ),
        Overloaded::Evacuating => (
            "evacuating",
            "evacuating",
            "this node is being evacuated: retry after retry_ms (another node will take it)",
        ),
        Overloaded::RedisLost => (
            "redis_lost",
            "redis_lost",
            "this node cannot reach Redis: retry after retry_ms (another node will take it)",
        ),
    };
    gw.metrics
        .connections_refused
        .get_or_create(&crate::metrics::ReasonLabel { reason })
        .inc();
    let body = serde_json::json!({ "error": error, "retry_ms": retry_ms, "message": message });
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    let seconds = crate::autoscale::admission::retry_after_seconds(retry_ms);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Checks the upgrade headers (RFC 6455 section 4.2.1); returns the key.
fn handshake_key(headers: &HeaderMap) -> Result<HeaderValue, Box<Response>> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    let bad = |message: &str| {
        Box::new(ApiError::new(StatusCode::BAD_REQUEST, "not_websocket", message).into_response())
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(bad("expected a WebSocket upgrade request"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut response = ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "only WebSocket version 13 is supported",
        )
        .into_response();
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(response));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))
}

/// `Sec-WebSocket-Accept` for a client's key.
fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// Browsers always send `Origin`; other clients may not, and are not
/// restricted by it.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn origins_are_checked_only_when_configured() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        assert!(origin_allowed(&[], &headers));
        assert!(origin_allowed(&["https://app.example/".into()], &headers));
        assert!(!origin_allowed(&["https://other.example".into()], &headers));
    }
}
