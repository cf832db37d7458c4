//! Authentication and authorisation on every route (issue 8, item 1): 401 without or with a
//! bad token, 403 without the route's scope, the route's answer with it; idempotency keys
//! scoped to the principal that used them; probes open or closed as configured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use saga_core::{Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError, SagaId};
use saga_http::{ApiTokens, Auth, GeneratedToken, HttpApi, Principal, PrometheusHandle, Scope};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;
use tower::ServiceExt as _;

struct Echo;

impl Saga for Echo {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "echo";
    async fn run(&self, _saga: &mut SagaContext, text: String) -> Result<String, SagaError> {
        Ok(text)
    }
}

static METRICS: LazyLock<PrometheusHandle> =
    LazyLock::new(|| saga_http::install_metrics().expect("install the metrics recorder"));

/// A principal per scope, one with every scope, and their tokens.
struct Callers {
    tokens: ApiTokens,
    by_name: Vec<(String, String)>,
}

impl Callers {
    fn new() -> Self {
        let mut lines = Vec::new();
        let mut by_name = Vec::new();
        let mut add = |name: &str, scopes: BTreeSet<Scope>| {
            let principal = Principal::new(name, scopes).unwrap();
            let generated = GeneratedToken::new(&principal).unwrap();
            lines.push(generated.config_line);
            by_name.push((name.to_owned(), generated.token));
        };
        for scope in Scope::ALL {
            add(scope.as_str(), BTreeSet::from([scope]));
        }
        add("all", Scope::ALL.into_iter().collect());
        add("other", BTreeSet::from([Scope::Start, Scope::Read]));
        Self {
            tokens: ApiTokens::parse(&lines.join("\n")).unwrap(),
            by_name,
        }
    }

    fn token(&self, name: &str) -> &str {
        &self.by_name.iter().find(|(n, _)| n == name).unwrap().1
    }
}

fn engine() -> Engine {
    Engine::builder(MemoryStore::new())
        .register(Echo)
        .build()
        .unwrap()
}

fn api(engine: &Engine, callers: &Callers) -> HttpApi {
    HttpApi::new(engine.clone(), Auth::tokens(callers.tokens.clone())).metrics(METRICS.clone())
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Value, Option<String>) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if !body.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let challenge = response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value, challenge)
}

#[tokio::test]
async fn every_route_needs_a_token_with_its_scope() {
    let engine = engine();
    let callers = Callers::new();
    let app = api(&engine, &callers).router();
    let started = engine
        .start_with::<Echo>(&"hello".to_owned(), Default::default())
        .await
        .unwrap();
    let id = started.id;
    let routes: Vec<(&str, String, &str, Scope)> = vec![
        ("POST", "/sagas/echo".to_owned(), "\"hi\"", Scope::Start),
        ("GET", format!("/sagas/{id}"), "", Scope::Read),
        ("GET", format!("/sagas/{id}/history"), "", Scope::Read),
        (
            "GET",
            format!("/sagas/{id}/wait?timeout_ms=1"),
            "",
            Scope::Read,
        ),
        ("POST", format!("/sagas/{id}/cancel"), "", Scope::Operate),
        ("GET", "/metrics".to_owned(), "", Scope::Metrics),
    ];
    for (method, path, body, scope) in &routes {
        // No token: 401 with a Bearer challenge, nothing about the saga.
        let (status, reply, challenge) = call(&app, method, path, None, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {reply}");
        assert_eq!(reply["code"], "unauthenticated", "{reply}");
        assert!(challenge.unwrap().starts_with("Bearer realm=\"saga\""));
        assert!(!reply.to_string().contains("hello"));
        // A token nobody issued: 401 invalid_token.
        let (status, reply, challenge) = call(&app, method, path, Some("saga_forged"), body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {reply}");
        assert_eq!(reply["code"], "bad_token");
        assert!(challenge.unwrap().contains("error=\"invalid_token\""));
        // Every principal holding one other scope: 403 naming the scope.
        for other in Scope::ALL.into_iter().filter(|s| s != scope) {
            let (status, reply, _) = call(
                &app,
                method,
                path,
                Some(callers.token(other.as_str())),
                body,
            )
            .await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{method} {path} as {other}: {reply}"
            );
            assert_eq!(reply["code"], "forbidden");
            assert_eq!(reply["required_scope"], scope.as_str());
            assert_eq!(reply["principal"], other.as_str());
        }
        // The scope itself, and the principal with every scope, get through to the route.
        for name in [scope.as_str(), "all"] {
            let (status, reply, _) =
                call(&app, method, path, Some(callers.token(name)), body).await;
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{method} {path} as {name}: {status} {reply}"
            );
            assert!(
                status.is_success() || status == StatusCode::CONFLICT,
                "{method} {path} as {name}: {status} {reply}"
            );
        }
    }
    // Malformed Authorization headers are 401 with invalid_request, never 500.
    for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "token"] {
        let request = Request::get(format!("/sagas/{id}"))
            .header(header::AUTHORIZATION, bad)
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{bad}");
    }
}

#[tokio::test]
async fn health_is_open_and_readiness_and_metrics_are_configurable() {
    let engine = engine();
    let callers = Callers::new();
    let app = api(&engine, &callers).router();
    assert_eq!(
        call(&app, "GET", "/healthz", None, "").await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/readyz", None, "").await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/metrics", None, "").await.0,
        StatusCode::UNAUTHORIZED
    );

    let closed = api(&engine, &callers).public_readyz(false).router();
    assert_eq!(
        call(&closed, "GET", "/readyz", None, "").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&closed, "GET", "/readyz", Some(callers.token("read")), "")
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(
            &closed,
            "GET",
            "/readyz",
            Some(callers.token("metrics")),
            ""
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&closed, "GET", "/healthz", None, "").await.0,
        StatusCode::OK
    );

    let open = api(&engine, &callers).public_metrics(true).router();
    assert_eq!(
        call(&open, "GET", "/metrics", None, "").await.0,
        StatusCode::OK
    );
    // Unknown routes do not tell an unauthenticated caller more than that.
    let (status, _, _) = call(&app, "GET", "/nowhere", None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // An unknown saga type is not revealed before authentication.
    let (status, reply, _) = call(&app, "POST", "/sagas/secret_type", None, "1").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!reply.to_string().contains("echo"), "{reply}");
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_principal() {
    let engine = engine();
    let callers = Callers::new();
    let app = api(&engine, &callers).router();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let workers = tokio::spawn(
        Coordinator::new(engine.clone())
            .poll_interval(Duration::from_millis(20))
            .run(async {
                let _ = stopped.await;
            }),
    );
    let start = |token: String, input: &'static str| {
        let app = app.clone();
        async move {
            let request = Request::post("/sagas/echo")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .header("idempotency-key", "order-1")
                .body(Body::from(input))
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    let all = callers.token("all").to_owned();
    let other = callers.token("other").to_owned();
    let (status, first) = start(all.clone(), "\"from all\"").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    // The same key from another principal is another saga, with its own input: neither a
    // conflict (which would reveal that the key is in use) nor the first saga.
    let (status, second) = start(other.clone(), "\"from other\"").await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_ne!(first["id"], second["id"]);
    // Each principal's repeat finds its own saga.
    let (status, again) = start(all.clone(), "\"from all\"").await;
    assert_eq!(
        (status, &again["id"], &again["created"]),
        (StatusCode::OK, &first["id"], &Value::Bool(false))
    );
    let (status, again) = start(other.clone(), "\"from other\"").await;
    assert_eq!((status, &again["id"]), (StatusCode::OK, &second["id"]));
    // A different input under one's own key is a conflict, as before.
    let (status, conflict) = start(other, "\"changed\"").await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    // The unscoped id (what anyone could compute offline from the type and key) is neither.
    let unscoped = SagaId::from_idempotency_key("echo", "order-1").to_string();
    assert_ne!(first["id"], unscoped.as_str());
    assert_ne!(second["id"], unscoped.as_str());
    let outcome = engine
        .wait(
            first["id"].as_str().unwrap().parse().unwrap(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(outcome.output, Some(Value::String("from all".into())));
    let _ = stop.send(());
    workers.await.unwrap();
}

#[tokio::test]
async fn serving_without_auth_is_refused_on_a_public_address() {
    let engine = engine();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = HttpApi::new(engine.clone(), Auth::Disabled)
        .serve(listener, saga_http::ServeConfig::default(), async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("without authentication"), "{err}");
    // On loopback it serves (and stops when told).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    HttpApi::new(engine.clone(), Auth::Disabled)
        .serve(listener, saga_http::ServeConfig::default(), async {})
        .await
        .unwrap();
    // Insisting is allowed.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    HttpApi::new(engine, Auth::Disabled)
        .unauthenticated_on_public_address(true)
        .serve(listener, saga_http::ServeConfig::default(), async {})
        .await
        .unwrap();
}
