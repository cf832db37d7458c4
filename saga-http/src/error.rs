//! Errors as HTTP responses: every error is a JSON object `{"error": "...", "code": "..."}`
//! (plus details for some codes), and engine errors map to statuses in one place.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use saga_core::{EngineError, StoreError};
use serde_json::{Map, Value, json};

/// An error response: a status, a machine-readable `code`, a human-readable `error` message
/// and optional details merged into the JSON body, e.g.
/// `{"error": "saga 6f1c… not found", "code": "saga_not_found", "id": "6f1c…"}`.
///
/// The status for every engine error:
///
/// | error | status |
/// |---|---|
/// | `UnknownSagaType` | 404 (with `known_types`) |
/// | `NotFound` | 404 |
/// | `IdempotencyConflict` | 409 (with `saga_id`) |
/// | `Busy`, `Quarantined`, `WrongStatus` | 409 |
/// | `PastPivot` | 409 `past_pivot` (with `pivot_step`, `pivot_position`) |
/// | `InvalidSignal` | 422 `invalid_signal` (with `id`, `signal`, `problem`); from the signal route a malformed name is 400 `invalid_signal_name`, a malformed key 400 `bad_idempotency_key` |
/// | `SignalConflict` | 409 `signal_conflict` (with `id`, `signal`, `idempotency_key`) |
/// | `WrongStatus` from the signal route | 409 `saga_finished` (with `id`, `signal`, `status`) |
/// | `WaitTimedOut` | 202 (with `id`, `status`) — not a failure: the saga is still running |
/// | `Interrupted` | 503 (with `id` and `cause`: `fenced`, `store_unavailable`, `store_rejected`, `lease_lapsed`, `shutting_down`, `other`) |
/// | `Encoding`, `Config` | 500 |
/// | `Store(..)` | see [`ApiError::from_store`] |
/// | anything newer | 500 with its message |
///
/// Client mistakes found before the engine is called: 400 (`bad_json`, `bad_saga_id`,
/// `bad_idempotency_key`, `missing_idempotency_key`, `bad_query`, `bad_format`, `invalid_version`,
/// `bad_path`), 413 (`body_too_large`),
/// 415 (`unsupported_media_type`), 404 (`unknown_saga_type`, `no_route`), 405
/// (`method_not_allowed`). Before the route: 401 (`unauthenticated` without a token or with a
/// malformed `Authorization` header, `bad_token` for a token nobody issued; with a
/// `WWW-Authenticate: Bearer` challenge), 403 (`forbidden`, with `principal` and
/// `required_scope`). Around it: 408 (`request_timeout`) and, on a connection beyond the
/// server's limit, 503 (`too_many_connections`).
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Map<String, Value>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    /// Adds a detail field to the JSON body.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// The HTTP status.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code, e.g. `idempotency_conflict`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The human-readable message.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = self.code, error = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, code = self.code, error = %self.message, "request rejected");
        }
        let mut body = Map::new();
        body.insert("error".to_owned(), Value::String(self.message));
        body.insert("code".to_owned(), Value::String(self.code.to_owned()));
        for (key, value) in self.details {
            body.entry(key).or_insert(value);
        }
        (self.status, Json(Value::Object(body))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        let message = err.to_string();
        match err {
            EngineError::UnknownSagaType { name, known } => {
                Self::new(StatusCode::NOT_FOUND, "unknown_saga_type", message)
                    .with("saga_type", name)
                    .with("known_types", known)
            }
            EngineError::InvalidInput {
                saga_type,
                path,
                message: problem,
            } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", message)
                .with("saga_type", saga_type)
                .with("path", path)
                .with("problem", problem),
            EngineError::NotFound(id) => {
                Self::new(StatusCode::NOT_FOUND, "saga_not_found", message)
                    .with("id", id.to_string())
            }
            EngineError::IdempotencyConflict { saga, key } => {
                Self::new(StatusCode::CONFLICT, "idempotency_conflict", message)
                    .with("saga_id", saga.to_string())
                    .with("idempotency_key", key)
            }
            EngineError::Busy { saga, owner, .. } => {
                Self::new(StatusCode::CONFLICT, "saga_busy", message)
                    .with("id", saga.to_string())
                    .with("owner", owner)
            }
            EngineError::Quarantined { saga, reason } => {
                Self::new(StatusCode::CONFLICT, "saga_quarantined", message)
                    .with("id", saga.to_string())
                    .with("reason", reason)
            }
            EngineError::WrongStatus { saga, status, .. } => {
                Self::new(StatusCode::CONFLICT, "wrong_status", message)
                    .with("id", saga.to_string())
                    .with("status", status.as_str())
            }
            EngineError::PastPivot {
                saga,
                step,
                position,
            } => Self::new(StatusCode::CONFLICT, "past_pivot", message)
                .with("id", saga.to_string())
                .with("pivot_step", step)
                .with("pivot_position", position),
            EngineError::WaitTimedOut { saga, status } => {
                Self::new(StatusCode::ACCEPTED, "still_running", message)
                    .with("id", saga.to_string())
                    .with("status", status.as_str())
                    .with("terminal", false)
            }
            EngineError::InvalidSignal {
                saga,
                name,
                problem,
                ..
            } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_signal", message)
                .with("id", saga.to_string())
                .with("signal", name)
                .with("problem", problem),
            EngineError::SignalConflict { saga, name, key } => {
                signal_conflict(message, saga, name, key)
            }
            EngineError::Interrupted { saga, cause } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "interrupted", message)
                    .with("id", saga.to_string())
                    .with("cause", interruption_name(&cause))
            }
            EngineError::Encoding { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "encoding", message)
            }
            EngineError::Config(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "engine_config", message)
            }
            EngineError::Store(store) => Self::from_store(store),
            other => {
                tracing::error!(error = %other, "engine error without an HTTP mapping");
                Self::internal(message)
            }
        }
    }
}

impl ApiError {
    /// The status for every store error:
    ///
    /// | error | status |
    /// |---|---|
    /// | `NotFound` | 404 |
    /// | `IdempotencyConflict`, `NotWritable`, `Fenced`, `SignalConflict` | 409 |
    /// | `TooLarge` | 413 (the input is over the store's limit) |
    /// | `InboxFull` | 413 `signal_inbox_full` (with `id`, `limit`: the saga has taken all the signals it may) |
    /// | `Invalid` | 400 |
    /// | `Unavailable` | 503 |
    /// | `Corrupt` | 500 (`store_corrupt`) |
    /// | `Refused` (the server's store user lacks a permission) | 500 (`store_refused`) |
    /// | anything newer | 500 with its message |
    #[must_use]
    pub fn from_store(err: StoreError) -> Self {
        let message = err.to_string();
        match err {
            StoreError::NotFound(id) => Self::new(StatusCode::NOT_FOUND, "saga_not_found", message)
                .with("id", id.to_string()),
            StoreError::IdempotencyConflict { saga } => {
                Self::new(StatusCode::CONFLICT, "idempotency_conflict", message)
                    .with("saga_id", saga.to_string())
            }
            StoreError::NotWritable { saga, status } => {
                Self::new(StatusCode::CONFLICT, "wrong_status", message)
                    .with("id", saga.to_string())
                    .with("status", status.as_str())
            }
            StoreError::SignalConflict { saga, name, key } => {
                signal_conflict(message, saga, name, key)
            }
            StoreError::Fenced { saga, .. } => {
                Self::new(StatusCode::CONFLICT, "fenced", message).with("id", saga.to_string())
            }
            StoreError::TooLarge { size, limit, .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
                    .with("size", size)
                    .with("limit", limit)
            }
            StoreError::InboxFull { saga, limit } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "signal_inbox_full", message)
                    .with("id", saga.to_string())
                    .with("limit", limit)
            }
            StoreError::Invalid(_) => Self::bad_request("invalid_request", message),
            StoreError::Unavailable { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            ),
            StoreError::Corrupt { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt", message)
            }
            // The server's own store credentials lack a permission: the operator's to fix,
            // and retrying will not help.
            StoreError::Refused { .. } => {
                tracing::error!(error = %message, "the store refused an operation");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "store_refused", message)
            }
            other => {
                tracing::error!(error = %other, "store error without an HTTP mapping");
                Self::internal(message)
            }
        }
    }
}

/// A signal key sent before with another payload: the key names one signal, so the second
/// payload is refused rather than delivered or dropped.
fn signal_conflict(
    message: String,
    saga: saga_core::SagaId,
    name: String,
    key: String,
) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "signal_conflict", message)
        .with("id", saga.to_string())
        .with("signal", name)
        .with("idempotency_key", key)
}

/// A machine-readable name for why a run was interrupted (the `cause` of a 503
/// `interrupted`).
fn interruption_name(cause: &saga_core::Interruption) -> &'static str {
    use saga_core::Interruption;
    match cause {
        Interruption::Fenced { .. } => "fenced",
        Interruption::StoreUnavailable { .. } => "store_unavailable",
        Interruption::StoreRejected { .. } => "store_rejected",
        Interruption::LeaseLapsed => "lease_lapsed",
        Interruption::ShuttingDown => "shutting_down",
        _ => "other",
    }
}

/// The JSON body of a rejection that axum produced (bad path, query or body).
pub(crate) fn rejection(status: StatusCode, code: &'static str, text: String) -> ApiError {
    ApiError::new(status, code, text)
}

/// `{"error": ..}` without a status, for bodies that are not errors of this module.
pub(crate) fn error_body(message: impl Into<String>) -> Value {
    json!({ "error": message.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_store_operation_is_a_server_error_with_its_own_code() {
        let err = ApiError::from_store(StoreError::Refused {
            message: "NOPERM this user has no permissions to run the 'evalsha' command".into(),
            source: None,
        });
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.code(), "store_refused");
        assert!(err.message().contains("NOPERM"));
        let unavailable = ApiError::from_store(StoreError::Unavailable {
            message: "load: broken pipe".into(),
            source: None,
        });
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn an_interruption_names_its_cause() {
        let saga = saga_core::SagaId::random();
        let err = ApiError::from(EngineError::Interrupted {
            saga,
            cause: saga_core::Interruption::ShuttingDown,
        });
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.code(), "interrupted");
        assert_eq!(err.details["cause"], "shutting_down");
        assert_eq!(err.details["id"], saga.to_string());
    }
}
