//! `/api/evacuate` (see `crate::autoscale::evacuate`): `POST` starts (or
//! changes the rate of) the evacuation, `GET` shows its progress, `DELETE`
//! cancels it. Behind the API key like every `/api/` call; answers in the
//! API's shapes (`{"result": ...}`, `{"error": {...}}`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::authorize;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::metrics::ApiLabels;

/// Most clients closed per second an evacuation may be asked for.
pub const MAX_RATE: u32 = 100_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Clients closed per second (default `--evacuate-rate`).
    rate: Option<u32>,
}

/// Every method of `/api/evacuate`.
pub async fn evacuate(
    State(gw): State<Arc<Gateway>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = authorize(&gw, &headers).and_then(|()| handle(&gw, &method, &body));
    let response = match result {
        Ok(value) => Json(json!({ "result": value })).into_response(),
        Err(e) => e.into_response(),
    };
    gw.metrics
        .api_requests
        .get_or_create(&ApiLabels {
            method: "evacuate",
            status: response.status().as_u16(),
        })
        .inc();
    response
}

fn handle(gw: &Arc<Gateway>, method: &Method, body: &[u8]) -> Result<Value, ApiError> {
    let evacuation = &gw.autoscale.evacuation;
    let remaining = || gw.hub.client_count() as u64;
    let shown = |p: Option<crate::autoscale::evacuate::Progress>| {
        serde_json::to_value(p).unwrap_or(Value::Null)
    };
    match *method {
        Method::GET => Ok(shown(evacuation.progress(remaining()))),
        Method::DELETE => Ok(shown(evacuation.cancel(gw).map(|mut p| {
            p.remaining = remaining();
            p
        }))),
        Method::POST => {
            let params: Params = if body.iter().all(u8::is_ascii_whitespace) {
                Params::default()
            } else {
                serde_json::from_slice(body).map_err(|e| ApiError::invalid_params(e.to_string()))?
            };
            let rate = params.rate.unwrap_or(gw.config.evacuate_rate);
            if rate == 0 || rate > MAX_RATE {
                return Err(ApiError::invalid_params(format!(
                    "rate must be between 1 and {MAX_RATE} clients a second"
                )));
            }
            evacuation.start(gw, rate);
            Ok(shown(evacuation.progress(remaining())))
        }
        _ => Err(ApiError::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "/api/evacuate takes GET, POST and DELETE",
        )),
    }
}
