//! The route handlers.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use saga_core::store::CancelOutcome;
use saga_core::{SagaId, SagaOutcome, SagaState, StartOptions, StepRecord, Timestamp, timeline};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, error_body, rejection};

/// The header that carries a start's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The reason recorded for a cancel requested without one.
const DEFAULT_CANCEL_REASON: &str = "cancel requested through the HTTP API";

/// Query of `POST /sagas/{saga_type}`. Unknown parameters are refused: a misspelt
/// `version` would otherwise start the newest version without a word.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartQuery {
    /// Kept as text so that a bad value gets its own message, not serde's.
    version: Option<String>,
}

pub(crate) async fn start(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<StartQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(saga_type) = path.map_err(|err| path_rejection(&err))?;
    let known = app.engine.saga_types();
    if !known.contains(&saga_type.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_saga_type",
            format!("unknown saga type `{saga_type}`; registered types: {known:?}"),
        )
        .with("saga_type", saga_type)
        .with("known_types", known));
    }
    let Query(query) = query.map_err(|err| query_rejection(&err))?;
    let version = query
        .version
        .as_deref()
        .map(|raw| parse_version(&saga_type, raw))
        .transpose()?;
    require_json(&headers, true)?;
    let body = body.map_err(|err| body_rejection(&err))?;
    let input = parse_json(&body)?;
    let options = match (idempotency_key(&headers)?, caller) {
        // Keys are scoped to the principal that used them (one client can neither squat
        // nor probe another's); without authentication they are global.
        (Some(key), Some(Extension(Caller(principal)))) => {
            StartOptions::key(principal.scoped_key(&key))
        }
        (Some(key), None) => StartOptions::key(key),
        (None, _) => StartOptions::default(),
    };
    let options = match version {
        Some(version) => options.with_version(version),
        None => options,
    };
    let started = app
        .engine
        .start_json(&saga_type, input, options)
        .await
        .map_err(|err| unknown_version(&app, &saga_type, version, err))?;
    let id = started.id;
    let location = format!("/sagas/{id}");
    if started.created {
        let body = json!({ "id": id, "created": true, "status": "running" });
        return Ok((
            StatusCode::CREATED,
            [(header::LOCATION, location)],
            Json(body),
        )
            .into_response());
    }
    let outcome = app.engine.outcome(id).await?;
    let body = json!({ "id": id, "created": false, "status": outcome.status });
    Ok((StatusCode::OK, [(header::LOCATION, location)], Json(body)).into_response())
}

/// The `version` query parameter of a start: a positive integer.
fn parse_version(saga_type: &str, raw: &str) -> Result<u32, ApiError> {
    match raw.trim().parse::<u32>() {
        Ok(version) if version > 0 => Ok(version),
        _ => Err(ApiError::bad_request(
            "invalid_version",
            format!(
                "`version={raw}` is not a version of saga type `{saga_type}`: give a positive integer such as `?version=2`, or leave it out to start the newest"
            ),
        )
        .with("version", raw)),
    }
}

/// The engine's answer to a start of a version it does not register, with the version asked
/// for and the registered ones as fields of their own (the engine's message names both).
fn unknown_version(
    app: &AppState,
    saga_type: &str,
    version: Option<u32>,
    err: saga_core::EngineError,
) -> ApiError {
    let (saga_core::EngineError::UnknownSagaType { .. }, Some(asked)) = (&err, version) else {
        return err.into();
    };
    let versions: Vec<u32> = app
        .engine
        .saga_versions()
        .into_iter()
        .filter(|(name, _)| *name == saga_type)
        .map(|(_, v)| v)
        .collect();
    ApiError::from(err)
        .with("version", asked)
        .with("known_versions", versions)
}

pub(crate) async fn status(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = saga_id(path)?;
    let state = app.engine.state(id).await?;
    // The quarantine flag lives beside the state; a saga that vanished in between is gone.
    let quarantined = app
        .engine
        .store()
        .load(id)
        .await
        .map_err(ApiError::from_store)?
        .and_then(|stored| stored.quarantined);
    Ok(Json(state_json(&state, quarantined.as_deref())).into_response())
}

pub(crate) async fn history(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = saga_id(path)?;
    let Query(query) = query.map_err(|err| query_rejection(&err))?;
    let text = match query.format.as_deref() {
        None | Some("json") => false,
        Some("text") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad_format",
                format!("unknown history format `{other}`; use `json` or `text`"),
            ));
        }
    };
    let events = app.engine.history(id).await?;
    let rendered = timeline::render(&events);
    if text {
        return Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            rendered,
        )
            .into_response());
    }
    let mut list = Vec::with_capacity(events.len());
    for event in &events {
        let mut value = serde_json::to_value(event).map_err(|err| {
            ApiError::internal(format!(
                "cannot encode event #{} of saga {id}: {err}",
                event.seq
            ))
        })?;
        if let Value::Object(fields) = &mut value {
            fields.insert("seq".to_owned(), json!(event.seq));
            fields.insert("summary".to_owned(), json!(timeline::describe(&event.kind)));
        }
        list.push(value);
    }
    Ok(Json(json!({ "id": id, "events": list, "timeline": rendered })).into_response())
}

/// Query of `GET /sagas/{id}/history`.
#[derive(Debug, Deserialize)]
pub(crate) struct HistoryQuery {
    format: Option<String>,
}

/// Query of `GET /sagas/{id}/wait`.
#[derive(Debug, Deserialize)]
pub(crate) struct WaitQuery {
    timeout_ms: Option<u64>,
}

pub(crate) async fn wait(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = saga_id(path)?;
    let Query(query) = query.map_err(|err| query_rejection(&err))?;
    let timeout = query
        .timeout_ms
        .map_or(app.config.default_wait, Duration::from_millis)
        .min(app.config.max_wait);
    match app.engine.wait(id, timeout).await {
        Ok(outcome) => Ok(Json(outcome_json(&outcome)).into_response()),
        // Set aside for bad data: it will not run again until an operator acts, so the wait
        // is over from the caller's point of view.
        Err(saga_core::EngineError::Quarantined { saga, reason }) => Ok(Json(json!({
            "id": saga,
            "status": "quarantined",
            "terminal": true,
            "reason": reason,
        }))
        .into_response()),
        Err(saga_core::EngineError::WaitTimedOut { saga, status }) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "id": saga, "status": status, "terminal": false })),
        )
            .into_response()),
        Err(err) => Err(err.into()),
    }
}

/// Body of `POST /sagas/{id}/cancel`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    reason: Option<String>,
}

pub(crate) async fn cancel(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = saga_id(path)?;
    let body = body.map_err(|err| body_rejection(&err))?;
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        require_json(&headers, false)?;
        CancelRequest::default()
    } else {
        require_json(&headers, true)?;
        serde_json::from_slice::<CancelRequest>(&body).map_err(|err| {
            ApiError::bad_request(
                "bad_json",
                format!(
                    "the cancel body must be a JSON object like {{\"reason\": \"...\"}}: {err}"
                ),
            )
        })?
    };
    let reason = request
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_CANCEL_REASON.to_owned());
    match app.engine.cancel(id, &reason).await? {
        CancelOutcome::Requested => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "cancel": "requested" })),
        )
            .into_response()),
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("saga {id} has already finished ({status}); there is nothing to cancel"),
        )
        .with("id", id.to_string())
        .with("status", status.as_str())),
        other => Err(ApiError::internal(format!(
            "cancel of saga {id} returned an outcome this API does not know: {other:?}"
        ))),
    }
}

pub(crate) async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

pub(crate) async fn readyz(State(app): State<AppState>) -> Response {
    if app.engine.is_shutting_down() {
        return unavailable("the engine is shutting down");
    }
    let timeout = app.config.ready_timeout;
    let probe = ready_probe(app.engine.store().as_ref());
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(err)) => unavailable(&format!("the store failed: {err}")),
        Err(_) => unavailable(&format!(
            "the store did not answer within {} ms",
            timeout.as_millis()
        )),
    }
}

/// Ready means "can take work": the store answers a read and accepts a write. The write is
/// an idempotency claim on a key of its own (released at once, and lapsing after a few
/// seconds if the release fails), so that a store refusing writes — out of memory, a
/// read-only replica, still loading — is not ready even though it answers reads.
async fn ready_probe(store: &dyn saga_core::SagaStore) -> Result<(), saga_core::StoreError> {
    store.load(SagaId(uuid::Uuid::nil())).await?;
    let key = format!("readyz-probe:{}", uuid::Uuid::new_v4());
    match store
        .guard_claim(&key, "readyz", Duration::from_secs(5))
        .await?
    {
        saga_core::store::GuardClaim::Claimed { token } => store.guard_release(&key, &token).await,
        // A fresh key is never found in another state; if it is, the write still happened.
        _ => Ok(()),
    }
}

fn unavailable(message: &str) -> Response {
    tracing::warn!(error = message, "not ready");
    let mut body = error_body(message);
    if let Value::Object(fields) = &mut body {
        fields.insert("status".to_owned(), json!("unavailable"));
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

pub(crate) async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let Some(handle) = &app.metrics else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_disabled",
            "metrics are not enabled on this server (no Prometheus handle was given to the router)",
        ));
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

pub(crate) async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no route for {method} {}", uri.path()),
    )
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

fn saga_id(path: Result<Path<String>, PathRejection>) -> Result<SagaId, ApiError> {
    let Path(raw) = path.map_err(|err| path_rejection(&err))?;
    parse_saga_id(&raw)
}

/// The saga id of a path.
pub(crate) fn parse_saga_id(raw: &str) -> Result<SagaId, ApiError> {
    raw.parse::<SagaId>().map_err(|err| {
        ApiError::bad_request(
            "bad_saga_id",
            format!("`{raw}` is not a saga id (a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8): {err}"),
        )
    })
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "bad_idempotency_key",
            "send the Idempotency-Key header once",
        ));
    }
    let key = value.to_str().map_err(|_| {
        ApiError::bad_request(
            "bad_idempotency_key",
            "the Idempotency-Key header must be visible ASCII text",
        )
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "bad_idempotency_key",
            "the Idempotency-Key header is empty; omit it or send a key",
        ));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::bad_request(
            "bad_idempotency_key",
            format!(
                "the Idempotency-Key header is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_LEN}",
                key.len()
            ),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Checks that the body is declared as JSON (`application/json` or `application/*+json`).
/// Without a body (`required` false) a missing Content-Type is fine.
pub(crate) fn require_json(headers: &HeaderMap, required: bool) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        if required {
            return Err(unsupported("no Content-Type header"));
        }
        return Ok(());
    };
    let Ok(text) = value.to_str() else {
        return Err(unsupported("an unreadable Content-Type header"));
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(unsupported(&format!("Content-Type `{text}`")))
    }
}

fn unsupported(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "the request has {what}; send the body as JSON with `Content-Type: application/json`"
        ),
    )
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "bad_json",
            "the body is empty; send the saga input as JSON (`null` for a saga without input)",
        ));
    }
    serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request("bad_json", format!("the body is not valid JSON: {err}"))
    })
}

pub(crate) fn body_rejection(err: &BytesRejection) -> ApiError {
    let status = err.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            status,
            "body_too_large",
            format!(
                "the request body is over this server's limit: {}",
                err.body_text()
            ),
        );
    }
    let code = if status.is_server_error() {
        "internal"
    } else {
        "bad_body"
    };
    rejection(
        status,
        code,
        format!("cannot read the request body: {}", err.body_text()),
    )
}

pub(crate) fn path_rejection(err: &PathRejection) -> ApiError {
    let status = if err.status().is_server_error() {
        err.status()
    } else {
        StatusCode::BAD_REQUEST
    };
    rejection(status, "bad_path", err.body_text())
}

fn query_rejection(err: &QueryRejection) -> ApiError {
    rejection(StatusCode::BAD_REQUEST, "bad_query", err.body_text())
}

fn time(at: Timestamp) -> Value {
    json!(at.to_rfc3339())
}

fn outcome_json(outcome: &SagaOutcome) -> Value {
    json!({
        "id": outcome.id,
        "status": outcome.status,
        "terminal": outcome.status.is_terminal(),
        "output": outcome.output,
        "compensation_reason": outcome.compensation_reason,
        "failure": failure_json(outcome.failure.as_ref()),
    })
}

fn failure_json(failure: Option<&(saga_core::FailureKind, String)>) -> Value {
    failure.map_or(
        Value::Null,
        |(kind, error)| json!({ "kind": kind, "error": error }),
    )
}

fn state_json(state: &SagaState, quarantined: Option<&str>) -> Value {
    let journal: Vec<Value> = state.journal.iter().map(record_json).collect();
    let steps = state.journal.iter().filter(|r| !r.is_value);
    let succeeded = steps
        .clone()
        .filter(|r| r.status == saga_core::StepStatus::Succeeded)
        .count();
    json!({
        "id": state.id,
        "saga_type": state.saga_type,
        "version": state.version,
        "status": state.status,
        "terminal": state.status.is_terminal(),
        "input": state.input,
        "idempotency_key": state.idempotency_key,
        "created_at": time(state.created_at),
        "updated_at": time(state.updated_at),
        "cancel_requested": state.cancel_requested,
        "cancel_refused": state.cancel_refused,
        "past_pivot": state.past_pivot.as_ref().map(|p| json!({
            "step": p.step,
            "position": p.position,
            "at": time(p.at),
        })),
        "quarantined": quarantined,
        "output": state.output,
        "compensation_reason": state.compensation_reason,
        "failure": failure_json(state.failure.as_ref()),
        "resumes": state.resumes,
        "parent": state.parent,
        "children": state.children(),
        "waiting": state.waiting().as_ref().map(waiting_json),
        "parallel": state.parallel_blocks(),
        "signals_taken": state.signals_taken().into_iter().map(|(name, sequence)| json!({
            "name": name,
            "sequence": sequence,
        })).collect::<Vec<_>>(),
        "steps": { "total": steps.count(), "succeeded": succeeded },
        "journal": journal,
    })
}

/// What a suspended saga waits for, with its deadline as a readable time.
fn waiting_json(waiting: &saga_core::Waiting) -> Value {
    let mut value = serde_json::to_value(waiting).unwrap_or(Value::Null);
    let until = match waiting {
        saga_core::Waiting::Sleep { until, .. } | saga_core::Waiting::Signal { until, .. } => {
            Some(*until)
        }
        _ => None,
    };
    if let (Some(until), Some(object)) = (until, value.as_object_mut()) {
        object.insert("until".into(), time(until));
    }
    value
}

fn record_json(record: &StepRecord) -> Value {
    json!({
        "position": record.position,
        "name": record.name,
        "kind": if record.is_value { "value" } else { "step" },
        "status": record.status,
        "attempts": record.attempts,
        "error": record.error,
        "started_at": record.first_started_at.map(time),
        "finished_at": record.finished_at.map(time),
        "next_retry_at": record.next_retry_at.map(time),
        "compensation": record.compensation.as_ref().map(|c| json!({
            "status": c.status,
            "attempts": c.attempts,
            "error": c.error,
            "next_retry_at": c.next_retry_at.map(time),
            "skipped_because": c.skipped_because,
        })),
    })
}
