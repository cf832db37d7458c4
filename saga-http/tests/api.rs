//! The HTTP API end to end: routes driven through `tower::ServiceExt::oneshot`, one test over
//! a real TCP socket, a coordinator running the sagas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, GuardClaim, Lease,
    ListPage, ListQuery, NewSaga, StoredSaga, Transition,
};
use saga_core::{
    Compensation, Coordinator, CoordinatorReport, Engine, HttpStatus, MemoryStore, Saga,
    SagaContext, SagaError, SagaId, SagaStatus, SagaStore, Step, StepContext, StoreError,
};
use saga_http::{Auth, HttpApi, PrometheusHandle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

// ---------------------------------------------------------------------------------------
// A test saga: one step that shouts the name, with a compensation.

#[derive(Debug, Serialize, Deserialize)]
struct GreetInput {
    name: String,
}

struct Shout;

impl Step for Shout {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "shout";
    const COMPENSATION: Compensation = Compensation::OnSuccess;

    async fn forward(&self, _ctx: &StepContext, name: String) -> Result<String, HttpStatus> {
        Ok(name.to_uppercase())
    }

    async fn compensate(
        &self,
        _ctx: &StepContext,
        _name: String,
        _shouted: Option<String>,
    ) -> Result<(), HttpStatus> {
        Ok(())
    }
}

struct Greet;

impl Saga for Greet {
    type Input = GreetInput;
    type Output = String;
    const NAME: &'static str = "greet";

    async fn run(&self, saga: &mut SagaContext, input: GreetInput) -> Result<String, SagaError> {
        let shouted = saga.run(Shout, input.name).await?;
        Ok(format!("HELLO, {shouted}"))
    }
}

// ---------------------------------------------------------------------------------------
// A store whose reads can be made to fail or hang, for /readyz and 503 mapping.

const UP: u8 = 0;
const FAILING: u8 = 1;
const HANGING: u8 = 2;

#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    mode: Arc<AtomicU8>,
}

#[async_trait]
impl SagaStore for FlakyStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        self.inner.create(new).await
    }
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        match self.mode.load(Ordering::SeqCst) {
            FAILING => Err(StoreError::Unavailable {
                message: "connection refused (test)".into(),
                source: None,
            }),
            HANGING => std::future::pending().await,
            _ => self.inner.load(id).await,
        }
    }
    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        self.inner.events(id).await
    }
    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.inner.claim(id, request).await
    }
    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.inner.claim_due(request, limit).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(lease).await
    }
    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.inner.commit(lease, transition).await
    }
    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.inner.request_cancel(id, event).await
    }
    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.inner.quarantine(id, reason).await
    }
    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        self.inner
            .guard_claim(key, fingerprint, in_progress_ttl)
            .await
    }
    async fn guard_complete(
        &self,
        key: &str,
        token: &str,
        result: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.guard_complete(key, token, result, ttl).await
    }
    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.inner.guard_release(key, token).await
    }
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.inner.list(query).await
    }
    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        self.inner.count_by_status().await
    }
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        self.inner.purge(older_than, limit).await
    }
    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.wakeups()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// The process-wide recorder, installed once per test binary.
static METRICS: LazyLock<PrometheusHandle> =
    LazyLock::new(|| saga_http::install_metrics().expect("install the metrics recorder"));

fn engine() -> Engine {
    Engine::builder(MemoryStore::new())
        .register(Greet)
        .build()
        .unwrap()
}

fn app(engine: &Engine) -> Router {
    saga_http::router(engine.clone(), Auth::Disabled, None)
}

struct Workers {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<CoordinatorReport>,
}

impl Workers {
    fn spawn(engine: &Engine) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let coordinator = Coordinator::new(engine.clone()).poll_interval(Duration::from_millis(20));
        let task = tokio::spawn(coordinator.run(async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    async fn stop(self) -> CoordinatorReport {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }

    /// Asserts an error reply: the status, a JSON body with an `error` message and `code`.
    fn assert_error(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.content_type(), "application/json", "{}", self.text());
        let body = self.json();
        assert_eq!(body["code"], code, "{body}");
        let message = body["error"].as_str().expect("an error message");
        assert!(!message.is_empty());
        body
    }
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

fn post_json(uri: &str, body: impl Into<Body>, key: Option<&str>) -> Request<Body> {
    let mut request = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(body.into()).unwrap()
}

async fn start(app: &Router, name: &str, key: Option<&str>) -> Reply {
    let body = json!({ "name": name }).to_string();
    send(app, post_json("/sagas/greet", body, key)).await
}

fn id_of(reply: &Reply) -> String {
    reply.json()["id"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn start_without_key_then_status_and_history() {
    let engine = engine();
    let app = app(&engine);

    let started = start(&app, "ada", None).await;
    assert_eq!(started.status, StatusCode::CREATED, "{}", started.text());
    let body = started.json();
    assert_eq!(body["created"], true);
    assert_eq!(body["status"], "running");
    let id = id_of(&started);
    assert_eq!(
        started.headers.get(header::LOCATION).unwrap(),
        &format!("/sagas/{id}")
    );

    // A second start without a key is another saga.
    let again = start(&app, "ada", None).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_ne!(id_of(&again), id);

    let status = get(&app, &format!("/sagas/{id}")).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.text());
    let state = status.json();
    assert_eq!(state["id"], id);
    assert_eq!(state["saga_type"], "greet");
    assert_eq!(state["status"], "running");
    assert_eq!(state["terminal"], false);
    assert_eq!(state["input"], json!({ "name": "ada" }));
    assert_eq!(state["journal"], json!([]));
    assert_eq!(state["output"], Value::Null);
    assert_eq!(state["quarantined"], Value::Null);
    assert!(state["created_at"].as_str().unwrap().ends_with('Z'));

    let history = get(&app, &format!("/sagas/{id}/history")).await;
    assert_eq!(history.status, StatusCode::OK, "{}", history.text());
    let history = history.json();
    assert_eq!(history["id"], id);
    let events = history["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "SagaStarted");
    assert_eq!(events[0]["seq"], 0);
    assert_eq!(events[0]["saga_type"], "greet");
    assert!(
        history["timeline"]
            .as_str()
            .unwrap()
            .contains("started greet v1")
    );

    let text = get(&app, &format!("/sagas/{id}/history?format=text")).await;
    assert_eq!(text.status, StatusCode::OK);
    assert!(text.content_type().starts_with("text/plain"));
    assert!(text.text().contains("started greet v1"), "{}", text.text());

    let json_format = get(&app, &format!("/sagas/{id}/history?format=json")).await;
    assert_eq!(json_format.status, StatusCode::OK);
}

#[tokio::test]
async fn idempotency_key_returns_the_same_saga_and_rejects_another_body() {
    let engine = engine();
    let app = app(&engine);

    let first = start(&app, "grace", Some("order-17")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert_eq!(first.json()["created"], true);
    let id = id_of(&first);

    // Same body (spelled differently: whitespace does not matter) → the same saga, 200.
    let repeat = send(
        &app,
        post_json("/sagas/greet", r#"{ "name" :  "grace" }"#, Some("order-17")),
    )
    .await;
    assert_eq!(repeat.status, StatusCode::OK, "{}", repeat.text());
    let body = repeat.json();
    assert_eq!(body["id"], id);
    assert_eq!(body["created"], false);
    assert_eq!(body["status"], "running");

    // Another body with the same key → 409 with a clear message.
    let conflict = start(&app, "hopper", Some("order-17")).await;
    let body = conflict.assert_error(StatusCode::CONFLICT, "idempotency_conflict");
    assert_eq!(body["saga_id"], id);
    assert_eq!(body["idempotency_key"], "order-17");
    assert!(
        body["error"].as_str().unwrap().contains("order-17"),
        "{body}"
    );

    // Still exactly one saga for the key.
    let state = get(&app, &format!("/sagas/{id}")).await.json();
    assert_eq!(state["input"], json!({ "name": "grace" }));
    assert_eq!(state["idempotency_key"], "order-17");
}

#[tokio::test]
async fn wait_returns_the_outcome_once_a_coordinator_runs_the_saga() {
    let engine = engine();
    let app = app(&engine);
    let workers = Workers::spawn(&engine);

    let id = id_of(&start(&app, "ada", Some("wait-1")).await);
    let done = get(&app, &format!("/sagas/{id}/wait?timeout_ms=60000")).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    let outcome = done.json();
    assert_eq!(outcome["id"], id);
    assert_eq!(outcome["status"], "completed");
    assert_eq!(outcome["terminal"], true);
    assert_eq!(outcome["output"], "HELLO, ADA");
    assert_eq!(outcome["failure"], Value::Null);

    let state = get(&app, &format!("/sagas/{id}")).await.json();
    assert_eq!(state["status"], "completed");
    assert_eq!(state["output"], "HELLO, ADA");
    assert_eq!(state["steps"], json!({ "total": 1, "succeeded": 1 }));
    let step = &state["journal"][0];
    assert_eq!(step["name"], "shout");
    assert_eq!(step["kind"], "step");
    assert_eq!(step["status"], "succeeded");
    assert_eq!(step["attempts"], 1);

    let history = get(&app, &format!("/sagas/{id}/history")).await.json();
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"StepSucceeded"), "{types:?}");
    assert_eq!(types.last(), Some(&"SagaCompleted"));
    let text = get(&app, &format!("/sagas/{id}/history?format=text"))
        .await
        .text();
    assert!(text.contains("shout"), "{text}");
    assert!(text.contains("COMPLETED"), "{text}");

    // A finished saga cannot be cancelled.
    let cancel = send(
        &app,
        Request::post(format!("/sagas/{id}/cancel"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let body = cancel.assert_error(StatusCode::CONFLICT, "already_finished");
    assert_eq!(body["status"], "completed");

    let report = workers.stop().await;
    assert_eq!(report.finished, 1);
}

#[tokio::test]
async fn wait_answers_202_with_the_status_when_the_wait_ends_first() {
    // No coordinator: the saga stays running.
    let engine = engine();
    let app = app(&engine);
    let id = id_of(&start(&app, "ada", None).await);

    let pending = get(&app, &format!("/sagas/{id}/wait?timeout_ms=10")).await;
    assert_eq!(pending.status, StatusCode::ACCEPTED, "{}", pending.text());
    let body = pending.json();
    assert_eq!(body["id"], id);
    assert_eq!(body["status"], "running");
    assert_eq!(body["terminal"], false);

    // timeout_ms=0 looks once.
    let now = get(&app, &format!("/sagas/{id}/wait?timeout_ms=0")).await;
    assert_eq!(now.status, StatusCode::ACCEPTED);

    // The default wait is configurable (and bounded by max_wait).
    let short = HttpApi::new(engine.clone(), Auth::Disabled)
        .default_wait(Duration::from_millis(10))
        .router();
    let pending = get(&short, &format!("/sagas/{id}/wait")).await;
    assert_eq!(pending.status, StatusCode::ACCEPTED);
    let capped = HttpApi::new(engine.clone(), Auth::Disabled)
        .max_wait(Duration::from_millis(10))
        .router();
    let pending = get(&capped, &format!("/sagas/{id}/wait?timeout_ms=3600000")).await;
    assert_eq!(pending.status, StatusCode::ACCEPTED);

    get(&app, &format!("/sagas/{id}/wait?timeout_ms=soon"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_query");
    get(&app, &format!("/sagas/{id}/wait?timeout_ms=-1"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_query");
}

#[tokio::test]
async fn cancel_makes_the_saga_compensate() {
    let engine = engine();
    let app = app(&engine);
    let id = id_of(&start(&app, "ada", None).await);

    let cancel = send(
        &app,
        post_json(
            &format!("/sagas/{id}/cancel"),
            r#"{"reason": "client changed its mind"}"#,
            None,
        ),
    )
    .await;
    assert_eq!(cancel.status, StatusCode::ACCEPTED, "{}", cancel.text());
    assert_eq!(cancel.json(), json!({ "id": id, "cancel": "requested" }));

    // Asking again is fine.
    let again = send(
        &app,
        Request::post(format!("/sagas/{id}/cancel"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text());

    let state = get(&app, &format!("/sagas/{id}")).await.json();
    assert_eq!(state["cancel_requested"], true);

    let workers = Workers::spawn(&engine);
    let done = get(&app, &format!("/sagas/{id}/wait?timeout_ms=60000")).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    let outcome = done.json();
    assert_eq!(outcome["status"], "compensated");
    assert_eq!(
        outcome["compensation_reason"],
        json!({ "cause": "cancelled", "reason": "client changed its mind" })
    );
    workers.stop().await;

    let timeline = get(&app, &format!("/sagas/{id}/history?format=text"))
        .await
        .text();
    assert!(
        timeline.contains("cancel requested: client changed its mind"),
        "{timeline}"
    );

    // Bad cancel bodies.
    let other = id_of(&start(&app, "bob", None).await);
    let uri = format!("/sagas/{other}/cancel");
    send(&app, post_json(&uri, "{not json", None))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_json");
    send(&app, post_json(&uri, r#"{"why": "typo"}"#, None))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_json");
    let plain = Request::post(&uri)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("stop"))
        .unwrap();
    send(&app, plain)
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
}

#[tokio::test]
async fn bad_requests_get_json_errors_not_500() {
    let engine = engine();
    let app = app(&engine);

    // Body is not JSON.
    send(&app, post_json("/sagas/greet", "{\"name\": ", None))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_json");
    send(&app, post_json("/sagas/greet", "", None))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_json");

    // Unknown saga type: 404 listing the known ones.
    let unknown = send(&app, post_json("/sagas/nope", "{}", None)).await;
    let body = unknown.assert_error(StatusCode::NOT_FOUND, "unknown_saga_type");
    assert_eq!(body["known_types"], json!(["greet"]));
    assert!(body["error"].as_str().unwrap().contains("greet"));

    // Wrong or missing Content-Type: 415.
    let text = Request::post("/sagas/greet")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(r#"{"name":"ada"}"#))
        .unwrap();
    send(&app, text)
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let missing = Request::post("/sagas/greet")
        .body(Body::from(r#"{"name":"ada"}"#))
        .unwrap();
    send(&app, missing)
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // Parameters and +json types are JSON.
    let charset = Request::post("/sagas/greet")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(r#"{"name":"ada"}"#))
        .unwrap();
    assert_eq!(send(&app, charset).await.status, StatusCode::CREATED);

    // Over the body limit: 413 (default 1 MiB, and a configured one).
    let big = json!({ "name": "x".repeat(1024 * 1024) }).to_string();
    send(&app, post_json("/sagas/greet", big, None))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    let small = HttpApi::new(engine.clone(), Auth::Disabled)
        .body_limit(1024)
        .router();
    let body = json!({ "name": "y".repeat(2048) }).to_string();
    send(&small, post_json("/sagas/greet", body, None))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    // A streamed body of unknown length over the limit.
    let chunks = futures_chunks(vec![vec![b' '; 800], vec![b' '; 800]]);
    send(&small, post_json("/sagas/greet", chunks, None))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    assert_eq!(
        send(&small, post_json("/sagas/greet", r#"{"name":"z"}"#, None))
            .await
            .status,
        StatusCode::CREATED
    );

    // Bad idempotency keys.
    send(
        &app,
        post_json("/sagas/greet", r#"{"name":"a"}"#, Some("  ")),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "bad_idempotency_key");
    let long = "k".repeat(saga_http::MAX_IDEMPOTENCY_KEY_LEN + 1);
    send(
        &app,
        post_json("/sagas/greet", r#"{"name":"a"}"#, Some(&long)),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "bad_idempotency_key");

    // Bad and unknown ids on every saga route.
    let unknown_id = SagaId::random();
    for suffix in ["", "/history", "/wait?timeout_ms=0"] {
        get(&app, &format!("/sagas/not-a-uuid{suffix}"))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "bad_saga_id");
        let body = get(&app, &format!("/sagas/{unknown_id}{suffix}"))
            .await
            .assert_error(StatusCode::NOT_FOUND, "saga_not_found");
        assert_eq!(body["id"], unknown_id.to_string());
    }
    send(
        &app,
        Request::post("/sagas/not-a-uuid/cancel")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "bad_saga_id");
    send(
        &app,
        Request::post(format!("/sagas/{unknown_id}/cancel"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "saga_not_found");

    // Unknown history format, unknown route, wrong method, no metrics handle.
    let id = id_of(&start(&app, "ada", None).await);
    get(&app, &format!("/sagas/{id}/history?format=xml"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_format");
    get(&app, "/nowhere")
        .await
        .assert_error(StatusCode::NOT_FOUND, "no_route");
    send(
        &app,
        Request::delete(format!("/sagas/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    get(&app, "/metrics")
        .await
        .assert_error(StatusCode::NOT_FOUND, "metrics_disabled");
}

/// A request body streamed in chunks, without a length.
fn futures_chunks(chunks: Vec<Vec<u8>>) -> Body {
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|chunk| Ok::<_, std::io::Error>(Bytes::from(chunk))),
    );
    Body::from_stream(stream)
}

#[tokio::test]
async fn health_and_readiness() {
    let store = FlakyStore::default();
    let mode = Arc::clone(&store.mode);
    let engine = Engine::builder(store).register(Greet).build().unwrap();
    let app = HttpApi::new(engine.clone(), Auth::Disabled)
        .ready_timeout(Duration::from_millis(50))
        .router();

    let health = get(&app, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), json!({ "status": "ok" }));
    let ready = get(&app, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["status"], "ready");
    let id = id_of(&start(&app, "ada", None).await);

    // The store fails: not ready, and reads answer 503 (not 500).
    mode.store(FAILING, Ordering::SeqCst);
    let ready = get(&app, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = ready.json();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("connection refused"),
        "{body}"
    );
    get(&app, &format!("/sagas/{id}"))
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert_eq!(get(&app, "/healthz").await.status, StatusCode::OK);

    // The store hangs: not ready once the probe's timeout passes.
    mode.store(HANGING, Ordering::SeqCst);
    let ready = get(&app, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.json()["error"]
            .as_str()
            .unwrap()
            .contains("did not answer")
    );
    assert_eq!(get(&app, "/healthz").await.status, StatusCode::OK);

    // Back up; then a shutting-down engine is not ready.
    mode.store(UP, Ordering::SeqCst);
    assert_eq!(get(&app, "/readyz").await.status, StatusCode::OK);
    engine.begin_shutdown();
    let ready = get(&app, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.json()["error"]
            .as_str()
            .unwrap()
            .contains("shutting down")
    );
}

#[tokio::test]
async fn metrics_show_saga_counters_and_duration_histograms_after_a_run() {
    let handle = METRICS.clone();
    let engine = engine();
    let app = saga_http::router(engine.clone(), Auth::Disabled, Some(handle));
    let workers = Workers::spawn(&engine);

    let id = id_of(&start(&app, "metrics", Some("metrics-1")).await);
    assert_eq!(
        start(&app, "metrics", Some("metrics-1")).await.status,
        StatusCode::OK
    );
    let done = get(&app, &format!("/sagas/{id}/wait?timeout_ms=60000")).await;
    assert_eq!(done.json()["status"], "completed");
    // The worker records the metrics after its last commit: stop it before scraping.
    assert_eq!(workers.stop().await.finished, 1);

    let scrape = get(&app, "/metrics").await;
    assert_eq!(scrape.status, StatusCode::OK);
    assert!(scrape.content_type().starts_with("text/plain"));
    let text = scrape.text();
    for needle in [
        "# TYPE saga_started_total counter",
        "saga_started_total{saga_type=\"greet\"}",
        "saga_finished_total{status=\"completed\"}",
        "saga_step_attempts_total{step=\"shout\",outcome=\"success\"}",
        "saga_idempotency_hits_total",
        "# HELP saga_duration_seconds",
        "# TYPE saga_duration_seconds histogram",
        "saga_duration_seconds_bucket{status=\"completed\",le=\"0.001\"}",
        "saga_duration_seconds_bucket{status=\"completed\",le=\"3600\"}",
        "# TYPE saga_step_duration_seconds histogram",
        "saga_step_duration_seconds_bucket{step=\"shout\",le=\"60\"}",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let count = |name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(count("saga_duration_seconds_count{status=\"completed\"}") >= 1.0);
    assert!(count("saga_step_duration_seconds_count{step=\"shout\"}") >= 1.0);
    assert!(count("saga_duration_seconds_bucket{status=\"completed\",le=\"+Inf\"}") >= 1.0);

    // Installing a second recorder fails cleanly.
    assert!(saga_http::install_metrics().is_err());
}

/// One HTTP/1.1 exchange over a fresh connection; returns the status code and the body.
async fn http(addr: std::net::SocketAddr, request: String) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

#[tokio::test]
async fn serves_over_a_real_tcp_socket() {
    let engine = engine();
    let workers = Workers::spawn(&engine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(saga_http::serve_listener(
        app(&engine),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));

    let input = r#"{"name":"tcp"}"#;
    let (status, body) = http(
        addr,
        format!(
            "POST /sagas/greet HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Idempotency-Key: tcp-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{input}",
            input.len()
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, body) = http(
        addr,
        format!(
            "GET /sagas/{id}/wait?timeout_ms=60000 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let outcome: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["output"], "HELLO, TCP");

    let (status, body) = http(
        addr,
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    workers.stop().await;
}

#[tokio::test]
async fn an_input_that_does_not_fit_the_saga_type_is_refused_and_nothing_is_stored() {
    let engine = engine();
    let app = app(&engine);
    for (body, path) in [
        (json!({ "foo": 1 }), "."),
        (json!(null), "."),
        (json!({ "name": 7 }), "name"),
    ] {
        let reply = send(
            &app,
            post_json("/sagas/greet", body.to_string(), Some("k-1")),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            reply.text()
        );
        let error = reply.json();
        assert_eq!(error["code"], "invalid_input", "{error}");
        assert_eq!(error["saga_type"], "greet");
        assert_eq!(error["path"], path, "{error}");
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .contains("nothing was started")
        );
    }
    let counts = engine.store().count_by_status().await.unwrap();
    assert_eq!(
        counts.values().sum::<u64>(),
        0,
        "nothing stored: {counts:?}"
    );
    // The key was not used up: a fitting input starts the saga under it.
    let started = start(&app, "ada", Some("k-1")).await;
    assert_eq!(started.status, StatusCode::CREATED, "{}", started.text());
}

#[tokio::test]
async fn wait_on_a_quarantined_saga_ends_with_its_reason() {
    let engine = engine();
    let app = app(&engine);
    let started = start(&app, "ada", None).await;
    let id: SagaId = id_of(&started).parse().unwrap();
    engine
        .store()
        .quarantine(id, "stored input does not decode (test)")
        .await
        .unwrap();
    let reply = get(&app, &format!("/sagas/{id}/wait?timeout_ms=5000")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["status"], "quarantined");
    assert_eq!(body["terminal"], true);
    assert_eq!(body["reason"], "stored input does not decode (test)");
}
