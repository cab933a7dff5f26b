//! The API's error contract: one status and one JSON body per kind of error.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::engine::EngineError;

/// An error answered as `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable, machine-readable code.
    pub code: &'static str,
    /// Human-readable detail.
    pub message: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the parameters are wrong.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_params", message)
    }

    /// 401: missing or wrong credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404: no such method.
    pub fn unknown_method(method: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_method",
            format!("unknown method {method:?}"),
        )
    }

    /// 413: a pushed message is larger than `--max-message-bytes`.
    pub fn message_too_large(len: usize, max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            format!("message of {len} bytes is above --max-message-bytes ({max})"),
        )
    }

    /// 400: a session over `--max-session-bytes` or nested too deep.
    pub fn session_refused(e: crate::session::SessionError) -> Self {
        let code = match e {
            crate::session::SessionError::TooLarge { .. } => "session_too_large",
            crate::session::SessionError::TooDeep => "session_too_deep",
        };
        Self::new(StatusCode::BAD_REQUEST, code, e.to_string())
    }

    /// 503: the engine cannot serve now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The `{"error":{...}}` object.
    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unavailable(m) => ApiError::unavailable(m),
            EngineError::Session(e) => ApiError::session_refused(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
