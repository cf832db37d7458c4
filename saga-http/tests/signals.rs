//! `POST /sagas/{id}/signals/{name}` on a memory store: a signal wakes a waiting workflow,
//! which completes with the payload; the same key again is a duplicate, another payload under
//! it a conflict; a key is required; the route needs `operate`; a finished or unknown saga,
//! a malformed name or key, an undeclared signal or a payload that does not decode as
//! declared are refused with their own codes and deliver nothing; a full inbox is 413.
//! `ApiClient::signal` over a real socket reports deliveries and duplicates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use saga_core::{
    Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError, SagaId, SignalSpec,
    StartOptions,
};
use saga_http::client::ApiClient;
use saga_http::{ApiTokens, Auth, GeneratedToken, HttpApi, Principal, Scope, ServeConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// Waits (up to a day) for `approval` and returns its payload as its output.
struct AwaitApproval;

impl Saga for AwaitApproval {
    type Input = String;
    type Output = Value;
    const NAME: &'static str = "await_approval";

    async fn run(&self, saga: &mut SagaContext, _deal: String) -> Result<Value, SagaError> {
        match saga
            .wait_for_signal::<Value>("approval", Duration::from_secs(24 * 3600))
            .await?
        {
            Some(payload) => Ok(payload),
            None => Err(SagaError::Aborted("no approval within a day".into())),
        }
    }
}

/// The committee's answer, as `Declared` declares it.
#[derive(Debug, Serialize, Deserialize)]
struct Approval {
    partner: String,
    amount: u64,
}

/// Declares its one signal: anything else is refused when sent.
struct Declared;

impl Saga for Declared {
    type Input = String;
    type Output = u64;
    const NAME: &'static str = "declared_approval";
    const SIGNALS: &'static [SignalSpec] = &[SignalSpec::of::<Approval>("approval")];

    async fn run(&self, saga: &mut SagaContext, _deal: String) -> Result<u64, SagaError> {
        let approval = saga
            .wait_for_signal::<Approval>("approval", Duration::from_secs(24 * 3600))
            .await?;
        Ok(approval.map_or(0, |a| a.amount))
    }
}

/// An operator (read, operate) and a reader (read only).
struct Tokens {
    config: ApiTokens,
    operator: String,
    reader: String,
}

fn tokens() -> Tokens {
    let mut lines = Vec::new();
    let mut issue = |name: &str, scopes: BTreeSet<Scope>| {
        let generated = GeneratedToken::new(&Principal::new(name, scopes).unwrap()).unwrap();
        lines.push(generated.config_line);
        generated.token
    };
    let operator = issue("ops", BTreeSet::from([Scope::Read, Scope::Operate]));
    let reader = issue("reader", BTreeSet::from([Scope::Read]));
    Tokens {
        config: ApiTokens::parse(&lines.join("\n")).unwrap(),
        operator,
        reader,
    }
}

fn engine() -> Engine {
    Engine::builder(MemoryStore::new())
        .register(AwaitApproval)
        .register(Declared)
        .build()
        .unwrap()
}

fn app(engine: &Engine, tokens: &Tokens) -> Router {
    HttpApi::new(engine.clone(), Auth::tokens(tokens.config.clone())).router()
}

/// A coordinator running the engine's sagas until stopped.
struct Workers {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<saga_core::CoordinatorReport>,
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

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

async fn start<S: Saga<Input = String>>(engine: &Engine) -> SagaId {
    engine
        .start_with::<S>(&"deal-7".to_owned(), StartOptions::default())
        .await
        .unwrap()
        .id
}

/// A request with the bearer token, and the other headers when given.
struct Post<'a> {
    uri: String,
    token: &'a str,
    key: Option<&'a str>,
    content_type: Option<&'a str>,
    body: String,
}

impl<'a> Post<'a> {
    fn signal(id: SagaId, name: &str, token: &'a str, key: &'a str, payload: &Value) -> Self {
        Self {
            uri: format!("/sagas/{id}/signals/{name}"),
            token,
            key: Some(key),
            content_type: Some("application/json"),
            body: payload.to_string(),
        }
    }

    async fn send(self, app: &Router) -> (StatusCode, Value) {
        let mut request = Request::post(&self.uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if let Some(key) = self.key {
            request = request.header("idempotency-key", key);
        }
        if let Some(content_type) = self.content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(self.body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", String::from_utf8_lossy(&bytes)));
        (status, body)
    }
}

/// Asserts an error reply: its status, its code and a message; returns the body.
fn refused(reply: (StatusCode, Value), status: StatusCode, code: &str) -> Value {
    let (got, body) = reply;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(!body["error"].as_str().unwrap().is_empty(), "{body}");
    body
}

async fn wait_json(app: &Router, id: SagaId, token: &str) -> Value {
    let request = Request::get(format!("/sagas/{id}/wait?timeout_ms=60000"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

async fn inbox(engine: &Engine, id: SagaId) -> usize {
    engine.store().signals(id, 0).await.unwrap().len()
}

#[tokio::test]
async fn a_signal_is_delivered_once_and_the_saga_completes_with_its_payload() {
    let engine = engine();
    let tokens = tokens();
    let app = app(&engine, &tokens);
    let id = start::<AwaitApproval>(&engine).await;
    let payload = json!({ "partner": "ada", "amount": 250 });
    let op = tokens.operator.as_str();

    // Sent before any coordinator ran the saga: kept for its wait.
    let (status, body) = Post::signal(id, "approval", op, "committee-1", &payload)
        .send(&app)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body,
        json!({
            "id": id.to_string(),
            "signal": "approval",
            "key": "committee-1",
            "sequence": 1,
            "delivered": true,
            "duplicate": false,
        })
    );

    // The same key and payload again (a client retrying after a lost answer): nothing new.
    let (status, body) = Post::signal(id, "approval", op, "committee-1", &payload)
        .send(&app)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["delivered"], false);
    assert_eq!(body["duplicate"], true);
    assert_eq!(body["sequence"], 1);

    // The same key with another payload: refused, the first one stands.
    let other = json!({ "partner": "bob", "amount": 1 });
    let body = refused(
        Post::signal(id, "approval", op, "committee-1", &other)
            .send(&app)
            .await,
        StatusCode::CONFLICT,
        "signal_conflict",
    );
    assert_eq!(body["signal"], "approval");
    assert_eq!(body["idempotency_key"], "committee-1");
    assert_eq!(inbox(&engine, id).await, 1);

    let workers = Workers::spawn(&engine);
    let outcome = wait_json(&app, id, &tokens.reader).await;
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["output"], payload);
    workers.stop().await;

    // A finished saga takes no more signals, and says why.
    let body = refused(
        Post::signal(id, "approval", op, "committee-2", &payload)
            .send(&app)
            .await,
        StatusCode::CONFLICT,
        "saga_finished",
    );
    assert_eq!(body["status"], "completed");
    assert_eq!(body["id"], id.to_string());
    assert_eq!(inbox(&engine, id).await, 1);
}

#[tokio::test]
async fn malformed_and_unauthorised_signals_are_refused_and_deliver_nothing() {
    let engine = engine();
    let tokens = tokens();
    let app = app(&engine, &tokens);
    let id = start::<AwaitApproval>(&engine).await;
    let op = tokens.operator.as_str();
    let payload = json!("yes");

    // No key, or an empty one: a retry could not be told from a new signal.
    for key in [None, Some("  ")] {
        let mut post = Post::signal(id, "approval", op, "unused", &payload);
        post.key = key;
        let body = refused(
            post.send(&app).await,
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
        );
        assert!(
            body["error"].as_str().unwrap().contains("delivered once"),
            "{body}"
        );
    }

    // A reader may not signal.
    let body = refused(
        Post::signal(id, "approval", &tokens.reader, "k-1", &payload)
            .send(&app)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(body["required_scope"], "operate");

    // No such saga.
    refused(
        Post::signal(SagaId::random(), "approval", op, "k-1", &payload)
            .send(&app)
            .await,
        StatusCode::NOT_FOUND,
        "saga_not_found",
    );

    // Malformed names (a reserved one too) and keys are client mistakes of their own.
    for name in ["saga.cancel", "a%20b"] {
        let body = refused(
            Post::signal(id, name, op, "k-1", &payload).send(&app).await,
            StatusCode::BAD_REQUEST,
            "invalid_signal_name",
        );
        assert!(
            body["error"].as_str().unwrap().contains("refused"),
            "{body}"
        );
    }
    refused(
        Post::signal(id, "approval", op, "key/with/slashes", &payload)
            .send(&app)
            .await,
        StatusCode::BAD_REQUEST,
        "bad_idempotency_key",
    );

    // The body is JSON, and there is one.
    let mut post = Post::signal(id, "approval", op, "k-1", &payload);
    post.body = "{not json".into();
    refused(post.send(&app).await, StatusCode::BAD_REQUEST, "bad_json");
    let mut post = Post::signal(id, "approval", op, "k-1", &payload);
    post.body = String::new();
    let body = refused(post.send(&app).await, StatusCode::BAD_REQUEST, "bad_json");
    assert!(body["error"].as_str().unwrap().contains("null"), "{body}");
    let mut post = Post::signal(id, "approval", op, "k-1", &payload);
    post.content_type = Some("text/plain");
    refused(
        post.send(&app).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    assert_eq!(inbox(&engine, id).await, 0);
    // `null` is a payload like any other.
    let (status, body) = Post::signal(id, "approval", op, "k-1", &Value::Null)
        .send(&app)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn a_declared_signal_is_checked_when_sent() {
    let engine = engine();
    let tokens = tokens();
    let app = app(&engine, &tokens);
    let id = start::<Declared>(&engine).await;
    let op = tokens.operator.as_str();

    let body = refused(
        Post::signal(id, "approval", op, "k-1", &json!({ "partner": "ada" }))
            .send(&app)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_signal",
    );
    assert_eq!(body["signal"], "approval");
    assert!(
        body["problem"].as_str().unwrap().contains("amount"),
        "{body}"
    );
    let body = refused(
        Post::signal(id, "rejection", op, "k-2", &json!(null))
            .send(&app)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_signal",
    );
    assert!(
        body["problem"].as_str().unwrap().contains("approval"),
        "the problem names the declared signals: {body}"
    );
    assert_eq!(inbox(&engine, id).await, 0);

    let good = json!({ "partner": "ada", "amount": 9 });
    let (status, body) = Post::signal(id, "approval", op, "k-3", &good)
        .send(&app)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let workers = Workers::spawn(&engine);
    let outcome = wait_json(&app, id, &tokens.reader).await;
    assert_eq!(outcome["output"], 9, "{outcome}");
    workers.stop().await;
}

#[tokio::test]
async fn a_full_inbox_is_413() {
    let engine = engine();
    let tokens = tokens();
    let app = app(&engine, &tokens);
    let id = start::<AwaitApproval>(&engine).await;
    for n in 0..saga_core::store::MAX_SIGNALS_PER_SAGA {
        engine
            .signal(id, "noise", &n, &format!("n-{n}"))
            .await
            .unwrap();
    }
    let body = refused(
        Post::signal(id, "approval", &tokens.operator, "last", &json!(1))
            .send(&app)
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "signal_inbox_full",
    );
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["limit"], saga_core::store::MAX_SIGNALS_PER_SAGA);
}

#[tokio::test]
async fn the_client_reports_deliveries_and_duplicates() {
    let engine = engine();
    let tokens = tokens();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let api = HttpApi::new(engine.clone(), Auth::tokens(tokens.config.clone()));
    let server = tokio::spawn(async move {
        api.serve(listener, ServeConfig::default(), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let client = ApiClient::new(&format!("http://{addr}"))
        .unwrap()
        .token(&tokens.operator);
    let id = start::<AwaitApproval>(&engine).await;

    let first = client
        .signal(id, "approval", &json!("go"), "ticket-42")
        .await
        .unwrap();
    assert_eq!((first.sequence, first.duplicate), (1, false));
    let again = client
        .signal(id, "approval", &json!("go"), "ticket-42")
        .await
        .unwrap();
    assert_eq!((again.sequence, again.duplicate), (1, true));
    let second = client
        .signal(id, "note", &"a second signal", "ticket-43")
        .await
        .unwrap();
    assert_eq!((second.sequence, second.duplicate), (2, false));

    // Refusals come back with the server's code.
    match client
        .signal(id, "approval", &json!("no"), "ticket-42")
        .await
    {
        Err(saga_http::ClientError::Api { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (409, "signal_conflict"));
        }
        other => panic!("expected a 409 signal_conflict, got {other:?}"),
    }
    let _ = stop.send(());
    server.await.unwrap();
}

/// `GET /sagas/{id}` says what a suspended saga waits for (the signal and its deadline), and
/// stops saying it once the signal was taken.
#[tokio::test]
async fn the_status_shows_the_signal_a_saga_waits_for() {
    let engine = Engine::builder(MemoryStore::new())
        .register(AwaitApproval)
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap();
    let tokens = tokens();
    let app = app(&engine, &tokens);
    let id = start::<AwaitApproval>(&engine).await;
    let suspended = engine.run_once(id).await.unwrap();
    assert!(
        matches!(suspended, saga_core::RunOutcome::Suspended(_)),
        "{suspended:?}"
    );
    let reader = tokens.reader.clone();
    let status = |app: Router| {
        let reader = reader.clone();
        async move {
            let request = Request::get(format!("/sagas/{id}"))
                .header(header::AUTHORIZATION, format!("Bearer {reader}"))
                .body(Body::empty())
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        }
    };
    let body = status(app.clone()).await;
    assert_eq!(body["waiting"]["kind"], "signal", "{body}");
    assert_eq!(body["waiting"]["name"], "approval", "{body}");
    assert!(
        body["waiting"]["until"]
            .as_str()
            .is_some_and(|t| t.contains('T')),
        "{body}"
    );
    assert_eq!(body["children"], json!([]), "{body}");
    assert_eq!(body["parent"], Value::Null, "{body}");

    engine
        .signal(id, "approval", &json!({"ok": true}), "k1")
        .await
        .unwrap();
    let finished = engine.run_to_end(id).await.unwrap();
    assert_eq!(finished.status, saga_core::SagaStatus::Completed);
    let body = status(app).await;
    assert_eq!(body["waiting"], Value::Null, "{body}");
    assert_eq!(
        body["signals_taken"],
        json!([{ "name": "approval", "sequence": 1 }]),
        "{body}"
    );
}
