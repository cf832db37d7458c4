//! Pivots and versions through the HTTP API (issue 9): a cancel past the pivot is a 409
//! `past_pivot` that changes nothing, the status shows `past_pivot`, a failure after the
//! pivot ends the saga `failed` (`after_pivot`) without compensating; `POST
//! /sagas/{type}?version=N` starts that version, the newest without it, 404 for a version
//! that is not registered and 400 for one that is not a positive integer. Every request
//! carries a bearer token, a coordinator runs the sagas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use saga_core::{
    Compensation, Coordinator, CoordinatorReport, Engine, HttpStatus, MemoryStore, Saga,
    SagaContext, SagaError, Step, StepContext,
};
use saga_http::{ApiTokens, Auth, GeneratedToken, HttpApi, Principal, Scope};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tower::ServiceExt as _;

/// How long a test waits for anything before it fails (never slept: a bound on a wait).
const BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// An order: book (compensated), commit (the pivot), ship (gated, or failing for good).

/// A rendezvous with the ship step: it says when it is running, then waits to be let go.
#[derive(Default)]
struct Gate {
    entered: Notify,
    release: Notify,
}

struct Book {
    undone: Arc<AtomicUsize>,
}

impl Step for Book {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "book";
    const COMPENSATION: Compensation = Compensation::OnSuccess;

    async fn forward(&self, _ctx: &StepContext, item: String) -> Result<String, HttpStatus> {
        Ok(format!("booked {item}"))
    }

    async fn compensate(
        &self,
        _ctx: &StepContext,
        _item: String,
        _booking: Option<String>,
    ) -> Result<(), HttpStatus> {
        self.undone.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Commit;

impl Step for Commit {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "commit";
    const COMPENSATION: Compensation = Compensation::Pivot;

    async fn forward(&self, _ctx: &StepContext, item: String) -> Result<String, HttpStatus> {
        Ok(format!("committed {item}"))
    }
}

struct Ship {
    gate: Arc<Gate>,
}

impl Step for Ship {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "ship";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, _ctx: &StepContext, mode: String) -> Result<String, HttpStatus> {
        match mode.as_str() {
            "gated" => {
                self.gate.entered.notify_one();
                self.gate.release.notified().await;
                Ok("shipped".into())
            }
            // Declined for good: no retry, and past the pivot no compensation either.
            "fail" => Err(HttpStatus::new(422)),
            _ => Ok("shipped".into()),
        }
    }
}

struct Order {
    gate: Arc<Gate>,
    undone: Arc<AtomicUsize>,
}

impl Saga for Order {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "order";

    async fn run(&self, saga: &mut SagaContext, mode: String) -> Result<String, SagaError> {
        let booked = saga
            .run(
                Book {
                    undone: Arc::clone(&self.undone),
                },
                mode.clone(),
            )
            .await?;
        let committed = saga.run(Commit, mode.clone()).await?;
        let shipped = saga
            .run(
                Ship {
                    gate: Arc::clone(&self.gate),
                },
                mode,
            )
            .await?;
        Ok(format!("{booked}, {committed}, {shipped}"))
    }
}

// ---------------------------------------------------------------------------------------
// Two versions of one type, side by side.

#[saga_core::saga(name = "priced", version = 1)]
async fn priced_v1(_saga: &mut SagaContext, item: String) -> Result<String, SagaError> {
    Ok(format!("v1 price of {item}"))
}

#[saga_core::saga(name = "priced", version = 2)]
async fn priced_v2(_saga: &mut SagaContext, item: String) -> Result<String, SagaError> {
    Ok(format!("v2 price of {item}"))
}

// ---------------------------------------------------------------------------------------
// Helpers.

struct Fixture {
    engine: Engine,
    app: Router,
    token: String,
    gate: Arc<Gate>,
    undone: Arc<AtomicUsize>,
    stop: tokio::sync::oneshot::Sender<()>,
    workers: tokio::task::JoinHandle<CoordinatorReport>,
}

impl Fixture {
    fn new() -> Self {
        let gate = Arc::new(Gate::default());
        let undone = Arc::new(AtomicUsize::new(0));
        let engine = Engine::builder(MemoryStore::new())
            .register(Order {
                gate: Arc::clone(&gate),
                undone: Arc::clone(&undone),
            })
            .register(PricedV1)
            .register(PricedV2)
            .build()
            .unwrap();
        let principal =
            Principal::new("operator", Scope::ALL.into_iter().collect::<BTreeSet<_>>()).unwrap();
        let generated = GeneratedToken::new(&principal).unwrap();
        let tokens = ApiTokens::parse(&generated.config_line).unwrap();
        let app = HttpApi::new(engine.clone(), Auth::tokens(tokens)).router();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let coordinator = Coordinator::new(engine.clone()).poll_interval(Duration::from_millis(20));
        let workers = tokio::spawn(coordinator.run(async {
            let _ = stopped.await;
        }));
        Self {
            engine,
            app,
            token: generated.token,
            gate,
            undone,
            stop,
            workers,
        }
    }

    async fn stop(self) {
        // A gated step still waiting would hold the coordinator's shutdown.
        self.gate.release.notify_one();
        let _ = self.stop.send(());
        self.workers.await.unwrap();
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        let body = match body {
            Some(value) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(value.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .app
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            panic!("not JSON ({err}): {:?}", String::from_utf8_lossy(&bytes))
        });
        (status, value)
    }

    /// Starts a saga through the API; its id.
    async fn start(&self, uri: &str, input: &str) -> String {
        let (status, body) = self.call("POST", uri, Some(json!(input))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// The saga's outcome once it has ended, through the long-poll route.
    async fn wait(&self, id: &str) -> Value {
        let (status, body) = self
            .call("GET", &format!("/sagas/{id}/wait?timeout_ms=30000"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["terminal"], true, "{body}");
        body
    }

    /// How many sagas the store holds.
    async fn saga_count(&self) -> u64 {
        let counts = self.engine.store().count_by_status().await.unwrap();
        counts.values().sum()
    }

    async fn history_types(&self, id: &str) -> Vec<String> {
        let (status, body) = self
            .call("GET", &format!("/sagas/{id}/history"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// Asserts an error answer: the status, a non-empty message and the code; the body.
fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------
// Pivot.

#[tokio::test]
async fn a_cancel_past_the_pivot_is_refused_and_changes_nothing() {
    let fx = Fixture::new();
    let id = fx.start("/sagas/order", "gated").await;
    tokio::time::timeout(BOUND, fx.gate.entered.notified())
        .await
        .expect("the ship step runs, past the pivot");

    let (status, before) = fx.call("GET", &format!("/sagas/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    let events_before = fx.history_types(&id).await;

    let (status, body) = fx
        .call(
            "POST",
            &format!("/sagas/{id}/cancel"),
            Some(json!({ "reason": "customer changed their mind" })),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "past_pivot");
    assert_eq!(body["id"], id, "{body}");
    assert_eq!(body["pivot_step"], "commit", "{body}");
    assert_eq!(body["pivot_position"], 1, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("cannot be cancelled"), "{message}");
    assert!(message.contains("`commit`"), "{message}");

    // Nothing changed: no cancel flag, no new event, the same state.
    let (_, after) = fx.call("GET", &format!("/sagas/{id}"), None).await;
    for field in [
        "status",
        "cancel_requested",
        "past_pivot",
        "journal",
        "failure",
    ] {
        assert_eq!(after[field], before[field], "{field}: {after} vs {before}");
    }
    assert_eq!(after["status"], "running", "{after}");
    assert_eq!(after["cancel_requested"], false, "{after}");
    assert_eq!(fx.history_types(&id).await, events_before);
    let pivot = &after["past_pivot"];
    assert_eq!(pivot["step"], "commit", "{after}");
    assert_eq!(pivot["position"], 1, "{after}");
    assert!(
        pivot["at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{after}"
    );

    // It goes on and completes.
    fx.gate.release.notify_one();
    let outcome = fx.wait(&id).await;
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(
        outcome["output"], "booked gated, committed gated, shipped",
        "{outcome}"
    );
    let (_, done) = fx.call("GET", &format!("/sagas/{id}"), None).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["past_pivot"]["step"], "commit", "{done}");
    assert_eq!(done["cancel_requested"], false, "{done}");
    assert_eq!(fx.undone.load(Ordering::SeqCst), 0);

    // Once it has ended, a cancel is refused because it has ended.
    let (status, body) = fx.call("POST", &format!("/sagas/{id}/cancel"), None).await;
    assert_error(status, &body, StatusCode::CONFLICT, "already_finished");
    fx.stop().await;
}

#[tokio::test]
async fn a_failure_after_the_pivot_fails_the_saga_without_compensation() {
    let fx = Fixture::new();
    let id = fx.start("/sagas/order", "fail").await;

    let outcome = fx.wait(&id).await;
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert_eq!(outcome["output"], Value::Null, "{outcome}");
    assert_eq!(outcome["compensation_reason"], Value::Null, "{outcome}");
    assert_eq!(outcome["failure"]["kind"], "after_pivot", "{outcome}");
    let error = outcome["failure"]["error"].as_str().unwrap();
    assert!(error.contains("ship"), "{error}");
    assert!(error.contains("commit"), "{error}");

    let (status, state) = fx.call("GET", &format!("/sagas/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["status"], "failed", "{state}");
    assert_eq!(state["terminal"], true, "{state}");
    assert_eq!(state["failure"]["kind"], "after_pivot", "{state}");
    assert_eq!(state["compensation_reason"], Value::Null, "{state}");
    assert_eq!(state["past_pivot"]["step"], "commit", "{state}");
    assert_eq!(state["past_pivot"]["position"], 1, "{state}");
    let journal = state["journal"].as_array().unwrap();
    assert_eq!(journal.len(), 3, "{state}");
    assert_eq!(journal[2]["name"], "ship", "{state}");
    assert_eq!(journal[2]["status"], "failed", "{state}");
    for record in journal {
        assert_eq!(record["compensation"], Value::Null, "{state}");
    }

    let types = fx.history_types(&id).await;
    assert!(
        types
            .iter()
            .all(|t| !t.contains("Compensat") && t != "CancelRequested"),
        "{types:?}"
    );
    assert_eq!(
        types.last().map(String::as_str),
        Some("SagaFailed"),
        "{types:?}"
    );
    assert_eq!(fx.undone.load(Ordering::SeqCst), 0, "nothing was undone");
    fx.stop().await;
}

// ---------------------------------------------------------------------------------------
// Versions.

#[tokio::test]
async fn a_start_runs_the_newest_version_unless_the_query_picks_one() {
    let fx = Fixture::new();

    let newest = fx.start("/sagas/priced", "tea").await;
    let outcome = fx.wait(&newest).await;
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["output"], "v2 price of tea", "{outcome}");
    let (_, state) = fx.call("GET", &format!("/sagas/{newest}"), None).await;
    assert_eq!(state["saga_type"], "priced", "{state}");
    assert_eq!(state["version"], 2, "{state}");

    let old = fx.start("/sagas/priced?version=1", "tea").await;
    let outcome = fx.wait(&old).await;
    assert_eq!(outcome["output"], "v1 price of tea", "{outcome}");
    let (_, state) = fx.call("GET", &format!("/sagas/{old}"), None).await;
    assert_eq!(state["version"], 1, "{state}");

    let explicit = fx.start("/sagas/priced?version=2", "jam").await;
    assert_eq!(fx.wait(&explicit).await["output"], "v2 price of jam");
    fx.stop().await;
}

#[tokio::test]
async fn a_version_that_is_not_registered_is_404_naming_what_is() {
    let fx = Fixture::new();
    let (status, body) = fx
        .call("POST", "/sagas/priced?version=3", Some(json!("tea")))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "unknown_saga_type");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("priced v3"), "{message}");
    assert!(
        message.contains("priced v1") && message.contains("priced v2"),
        "{message}"
    );
    assert_eq!(body["version"], 3, "{body}");
    assert_eq!(body["known_versions"], json!([1, 2]), "{body}");
    assert_eq!(
        body["known_types"],
        json!(["priced v1", "priced v2"]),
        "{body}"
    );

    // An unknown type is still the type's 404, whatever the version.
    let (status, body) = fx
        .call("POST", "/sagas/nope?version=1", Some(json!("tea")))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "unknown_saga_type");
    assert_eq!(body["saga_type"], "nope", "{body}");
    assert_eq!(body["known_types"], json!(["order", "priced"]), "{body}");

    // Nothing was started by either.
    assert_eq!(fx.saga_count().await, 0);
    fx.stop().await;
}

#[tokio::test]
async fn a_version_that_is_not_a_positive_integer_is_400() {
    let fx = Fixture::new();
    for raw in ["abc", "0", "-1", "1.5", "", "99999999999"] {
        let uri = format!("/sagas/priced?version={raw}");
        let (status, body) = fx.call("POST", &uri, Some(json!("tea"))).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_version");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains("positive integer"), "{raw}: {message}");
        assert!(message.contains(&format!("version={raw}")), "{message}");
        assert_eq!(body["version"], raw, "{body}");
    }

    // A misspelt parameter is refused rather than silently starting the newest version.
    let (status, body) = fx
        .call("POST", "/sagas/priced?verison=1", Some(json!("tea")))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_query");
    assert!(
        body["error"].as_str().unwrap().contains("verison"),
        "{body}"
    );
    // Twice is ambiguous.
    let (status, body) = fx
        .call(
            "POST",
            "/sagas/priced?version=1&version=2",
            Some(json!("tea")),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_query");

    assert_eq!(fx.saga_count().await, 0);
    fx.stop().await;
}
