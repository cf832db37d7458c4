//! `POST /sagas/{id}/signals/{name}`: sends a signal to a saga, for a workflow waiting in
//! [`wait_for_signal`](saga_core::SagaContext::wait_for_signal).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use saga_core::{EngineError, SagaId, SignalPart, SignalSent};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::handlers::{
    body_rejection, idempotency_key, parse_saga_id, path_rejection, require_json,
};
use crate::{AppState, IDEMPOTENCY_KEY};

pub(crate) async fn signal(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((raw_id, name)) = path.map_err(|err| path_rejection(&err))?;
    let id = parse_saga_id(&raw_id)?;
    // An empty header is a missing key here: a start may go without one, a signal may not.
    let blank = headers
        .get_all(IDEMPOTENCY_KEY)
        .iter()
        .all(|value| value.as_bytes().iter().all(u8::is_ascii_whitespace));
    let key = if blank {
        None
    } else {
        idempotency_key(&headers)?
    };
    let Some(key) = key else {
        return Err(ApiError::bad_request(
            "missing_idempotency_key",
            format!(
                "a signal needs an Idempotency-Key header: it identifies the signal, so that a retry after a lost answer is recognised as the same signal and delivered once; send the same key when you resend signal `{name}`, a new one for a new signal"
            ),
        )
        .with("signal", name));
    };
    require_json(&headers, true)?;
    let body = body.map_err(|err| body_rejection(&err))?;
    let payload = payload(&name, &body)?;
    match app.engine.signal(id, &name, &payload, &key).await {
        Ok(SignalSent::Delivered { sequence }) => Ok((
            StatusCode::ACCEPTED,
            Json(receipt(id, &name, &key, sequence, false)),
        )
            .into_response()),
        Ok(SignalSent::Duplicate { sequence }) => Ok((
            StatusCode::OK,
            Json(receipt(id, &name, &key, sequence, true)),
        )
            .into_response()),
        Ok(other) => Err(ApiError::internal(format!(
            "signal `{name}` to saga {id} returned an outcome this API does not know: {other:?}"
        ))),
        Err(err) => Err(refusal(err, &name, &key)),
    }
}

/// The reply body of a delivery (or of a duplicate, which changed nothing).
fn receipt(id: SagaId, name: &str, key: &str, sequence: u64, duplicate: bool) -> Value {
    json!({
        "id": id,
        "signal": name,
        "key": key,
        "sequence": sequence,
        "delivered": !duplicate,
        "duplicate": duplicate,
    })
}

/// The payload: any JSON value, but a body there must be (`null` for none), so that a
/// client that lost its body on the way is told rather than signalling `null`.
fn payload(name: &str, body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "bad_json",
            format!(
                "the body is empty; send the payload of signal `{name}` as JSON (`null` for a signal without payload)"
            ),
        ));
    }
    serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(
            "bad_json",
            format!("the payload of signal `{name}` is not valid JSON: {err}"),
        )
    })
}

/// The engine's refusals that mean something of their own for a signal; the rest map as
/// every engine error does.
fn refusal(err: EngineError, name: &str, key: &str) -> ApiError {
    match err {
        EngineError::InvalidSignal {
            part: SignalPart::Name,
            ..
        } => ApiError::bad_request("invalid_signal_name", err.to_string()).with("signal", name),
        EngineError::InvalidSignal {
            part: SignalPart::Key,
            ..
        } => ApiError::bad_request("bad_idempotency_key", err.to_string())
            .with("signal", name)
            .with("idempotency_key", key),
        EngineError::WrongStatus { saga, status, .. } => ApiError::new(
            StatusCode::CONFLICT,
            "saga_finished",
            format!(
                "saga {saga} has already finished ({status}); signal `{name}` was not delivered, as nothing would read it"
            ),
        )
        .with("id", saga.to_string())
        .with("signal", name)
        .with("status", status.as_str()),
        other => ApiError::from(other),
    }
}
