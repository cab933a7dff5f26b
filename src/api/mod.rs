//! The HTTP API on the internal listener: `POST /api/<method>` and
//! `POST /api/batch`, plus `/metrics` and the health endpoints.

pub mod dashboard;
pub mod evacuate;
pub mod methods;
#[cfg(test)]
mod proptests;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tracing::Instrument;

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::metrics::ApiLabels;

/// Every API call answers within this time: a slow or unreachable Redis
/// gives a 503, never a hanging request.
pub const API_DEADLINE: Duration = Duration::from_secs(2);

/// Most commands one batch may carry.
pub const MAX_BATCH: usize = 1000;

/// The internal listener's routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    let body_limit = gw.config.api_max_body_bytes;
    Router::new()
        .route("/api/{method}", post(api_call))
        .route(
            "/api/evacuate",
            get(evacuate::evacuate)
                .post(evacuate::evacuate)
                .delete(evacuate::evacuate),
        )
        .merge(dashboard::routes())
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(gw)
}

/// `/healthz`: the process runs.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `/readyz`: the engine is usable and the node is not draining.
pub async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.is_ready() {
        "ready\n".into_response()
    } else if gw.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if gw.autoscale.evacuation.is_active() {
        (StatusCode::SERVICE_UNAVAILABLE, "evacuating\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine not ready\n").into_response()
    }
}

/// `/metrics`: the Prometheus text format, or OpenMetrics when the
/// `Accept` header prefers it (see [`crate::exposition`]).
async fn metrics(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    gw.metrics.ready.set(i64::from(gw.is_ready()));
    let page = gw.metrics.render();
    let (content_type, body) = match crate::exposition::wants_openmetrics(&accept) {
        true => (crate::exposition::OPENMETRICS, page),
        false => (
            crate::exposition::TEXT_0_0_4,
            crate::exposition::to_text_0_0_4(&page),
        ),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::VARY, "Accept"),
        ],
        body,
    )
        .into_response()
}

/// Unknown paths answer with the API's JSON error.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path")
}

/// A known path with the wrong HTTP method answers with the JSON error.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "wrong HTTP method for this path (API methods are called with POST)",
    )
}

async fn api_call(
    State(gw): State<Arc<Gateway>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let label = methods::label(&method);
    let span = tracing::debug_span!("api", method = label);
    // The accept time of any push this call makes (push-to-frame latency).
    let accepted = crate::push_latency::Accepted::now();
    let call = handle(&gw, &method, &headers, body).instrument(span);
    let result = crate::push_latency::scope(accepted, call).await;
    let response = match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(code = e.code, message = %e.message, "API call failed");
            }
            e.into_response()
        }
    };
    gw.metrics
        .api_requests
        .get_or_create(&ApiLabels {
            method: label,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn handle(
    gw: &Gateway,
    method: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    authorize(gw, headers)?;
    // The method first: an unknown one is a 404 whatever the body.
    if methods::label(method) == "unknown" {
        return Err(ApiError::unknown_method(method));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "request body is above --api-max-body-bytes ({})",
                    gw.config.api_max_body_bytes
                ),
            )
        } else {
            ApiError::invalid_params(e.body_text())
        }
    })?;
    let params: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?
    };
    if method == "batch" {
        return batch(gw, params).await;
    }
    with_deadline(methods::call(gw, method, params))
        .await
        .map(|result| json!({ "result": result }))
}

async fn with_deadline<T>(
    call: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(API_DEADLINE, call)
        .await
        .unwrap_or_else(|_| Err(ApiError::unavailable("the engine did not answer in time")))
}

/// `--api-key`: a bearer token compared in constant time.
fn authorize(gw: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &gw.config.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key>"))?;
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong API key"))
    }
}

#[derive(Debug, Deserialize)]
struct Batch {
    commands: Vec<Command>,
}

#[derive(Debug, Deserialize)]
struct Command {
    method: String,
    #[serde(default)]
    params: Value,
}

/// Methods that change one connection's membership or session. A run of
/// them in a batch goes out at once: each is applied (or sent to its
/// connection's node) in order as it starts, and the batch waits for all
/// of them together, so 1,000 commands for another node's connections cost
/// about one round trip, not 1,000 in series.
const PIPELINED: &[&str] = &[
    "bind_uid",
    "unbind_uid",
    "join_group",
    "leave_group",
    "set_session",
    "update_session",
];

/// Runs commands in order; each gets its own result or error. The whole
/// batch shares one deadline.
async fn batch(gw: &Gateway, params: Value) -> Result<Value, ApiError> {
    let batch: Batch =
        serde_json::from_value(params).map_err(|e| ApiError::invalid_params(e.to_string()))?;
    if batch.commands.len() > MAX_BATCH {
        return Err(ApiError::invalid_params(format!(
            "a batch carries at most {MAX_BATCH} commands"
        )));
    }
    let deadline = tokio::time::Instant::now() + API_DEADLINE;
    let run = |command: Command| async move {
        if command.method == "batch" {
            return Err(ApiError::invalid_params("a batch cannot contain a batch"));
        }
        let call = methods::call(gw, &command.method, command.params);
        tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| Err(ApiError::unavailable("the engine did not answer in time")))
    };
    let mut replies = Vec::with_capacity(batch.commands.len());
    let mut commands = batch.commands.into_iter().peekable();
    while let Some(command) = commands.next() {
        if !PIPELINED.contains(&command.method.as_str()) {
            replies.push(run(command).await);
            continue;
        }
        let mut run_of = vec![command];
        while let Some(next) = commands.next_if(|c| PIPELINED.contains(&c.method.as_str())) {
            run_of.push(next);
        }
        // join_all polls its futures in order, so each change is applied
        // (or published) before the next one starts.
        replies.extend(futures_util::future::join_all(run_of.into_iter().map(run)).await);
    }
    let replies: Vec<Value> = replies
        .into_iter()
        .map(|reply| match reply {
            Ok(result) => json!({ "result": result }),
            Err(e) => e.body(),
        })
        .collect();
    Ok(json!({ "replies": replies }))
}
