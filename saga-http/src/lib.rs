//! An HTTP API for the saga engine, for services that are not written in Rust: start sagas of
//! registered types with JSON input and an idempotency key, read their status and history,
//! long-poll for their outcome, cancel them, send them signals, and expose health checks and
//! Prometheus metrics.
//!
//! The router works on any [`Engine`] (and therefore any store). It only submits and reads
//! sagas: run a [`Coordinator`](saga_core::Coordinator) in the same process (or elsewhere)
//! to execute them.
//!
//! Every route but `/healthz` needs a bearer token whose principal has the route's scope
//! ([`Auth`], [`ApiTokens`]); `/readyz` is open by default and `/metrics` needs `metrics`
//! unless made public. Without a token the answer is 401, without the scope 403.
//!
//! | route | scope | success | errors |
//! |---|---|---|---|
//! | `POST /sagas/{saga_type}[?version=N]` (JSON input, optional `Idempotency-Key`) | `start` | 201 `{"id","created":true,"status"}` (version N of the type, the newest without it); 200 with `created:false` for a repeated key and the same input | 404 unknown type (lists `known_types`) or unregistered version (with `version`, `known_versions`), 400 bad JSON, key, query or `version` (`invalid_version`: not a positive integer), 409 key reused with another input, 413 body over the limit, 415 not JSON, 422 input not the type's `Input` |
//! | `GET /sagas/{id}` | `read` | 200 status, version, output, compensation reason, failure, `past_pivot`, journal summary | 400 bad id, 404 unknown |
//! | `GET /sagas/{id}/history[?format=text]` | `read` | 200 `{"id","events","timeline"}`, or the timeline as `text/plain` | 400, 404 |
//! | `GET /sagas/{id}/wait[?timeout_ms=N]` | `read` | 200 the outcome once terminal (or `quarantined`); 202 `{"id","status","terminal":false}` when the wait ends first | 400, 404 |
//! | `POST /sagas/{id}/cancel` (optional `{"reason": "..."}`) | `operate` | 202 `{"id","cancel":"requested"}` | 409 already finished, 409 `past_pivot` (with `pivot_step`, `pivot_position`: the saga only goes forward), 400, 404 |
//! | `POST /sagas/{id}/signals/{name}` (JSON payload, `null` for none; `Idempotency-Key` required) | `operate` | 202 `{"id","signal","key","sequence","delivered":true,"duplicate":false}`: in the saga's inbox for its `wait_for_signal(name)`, now or later; 200 with `delivered:false`, `duplicate:true` and the first delivery's `sequence` for a key sent before with the same payload | 400 `missing_idempotency_key`, `invalid_signal_name`, `bad_idempotency_key` (a name or key is 1 to 128 letters, digits, `_-.:`), `bad_json`; 404 unknown saga; 409 `saga_finished` (with `status`), 409 `signal_conflict` (the key was sent with another payload); 413 `body_too_large`, or `signal_inbox_full` (the saga took its 1000 signals); 415 not JSON; 422 `invalid_signal` (a name the saga's type does not declare, or a payload that does not decode as declared, with `problem`) |
//! | `GET /healthz` | none | 200 always | |
//! | `GET /readyz` | none (or `metrics`) | 200 when the store answers a read and accepts a write in time (can take work) | 503 with the error |
//! | `GET /metrics` | `metrics` (or none) | 200 Prometheus text | 404 without a metrics handle |
//!
//! Idempotency keys of starts are scoped to the principal that sent them: the same key from
//! two principals starts two sagas, so no client can squat or probe another's keys. A
//! signal's key is the signal's own, not scoped: the same name and key sent by anyone (the
//! CLI, another principal, the engine) is the same signal, delivered once.
//!
//! Every error is a JSON object `{"error": "<message>", "code": "<machine code>", ...}`; see
//! [`ApiError`] for how engine and store errors map to statuses. Client mistakes are 4xx,
//! never 500. A handler that panics answers 500 without taking the server down. A request
//! that takes longer than [`ApiConfig::request_timeout`] (a dripped body, a store that does
//! not answer) gets 408.
//!
//! [`HttpApi::serve`] (or [`serve_with`]) bounds connections: header-read, idle and TLS
//! handshake timeouts, a connection limit with a few overflow slots that answer health
//! probes only, and optional HTTPS ([`ServeConfig`], [`TlsConfig`]).
//!
//! [`client::ApiClient`] calls the API from Rust with a bearer token, over HTTP or HTTPS,
//! retrying what is safe to retry (the `saga api` commands and `deal-flow-load --api-url`
//! use it).
//!
//! ```no_run
//! use saga_core::{Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError};
//!
//! struct Hello;
//!
//! impl Saga for Hello {
//!     type Input = String;
//!     type Output = String;
//!     const NAME: &'static str = "hello";
//!     async fn run(&self, _saga: &mut SagaContext, name: String) -> Result<String, SagaError> {
//!         Ok(format!("hello, {name}"))
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::builder(MemoryStore::new()).register(Hello).build()?;
//! let metrics = saga_http::install_metrics()?;
//! // One line per principal: `name scopes sha256:<hash of the token>`.
//! let tokens = saga_http::ApiTokens::from_file("/etc/saga/api-tokens".as_ref())?;
//! let api = saga_http::HttpApi::new(engine.clone(), saga_http::Auth::tokens(tokens))
//!     .body_limit(256 * 1024)
//!     .metrics(metrics);
//!
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! let (stop_workers, workers_stopped) = tokio::sync::oneshot::channel::<()>();
//! let workers = tokio::spawn(Coordinator::new(engine).run(async {
//!     let _ = workers_stopped.await;
//! }));
//! // curl -X POST http://coordinator:8080/sagas/hello -H "authorization: Bearer $TOKEN" \
//! //      -H 'content-type: application/json' -H 'idempotency-key: greet-1' -d '"deal team"'
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! api.serve(listener, saga_http::ServeConfig::default(), shutdown).await?;
//! let _ = stop_workers.send(());
//! workers.await?;
//! # Ok(())
//! # }
//! ```

mod auth;
pub mod client;
mod error;
mod handlers;
mod metrics;
mod serve;
mod signals;

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use futures_util::FutureExt as _;
use saga_core::Engine;
use tokio::net::TcpListener;

pub use auth::{
    ApiTokens, Auth, ExposureError, GeneratedToken, Principal, Scope, TokenConfigError,
    check_exposure, hash_token, parse_scopes,
};
pub use client::{ApiClient, ClientError};
pub use error::ApiError;
pub use handlers::{IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_LEN};
pub use metrics::{MetricsError, SAGA_DURATION_BUCKETS, STEP_DURATION_BUCKETS, install_metrics};
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use serve::{
    SHUTDOWN_GRACE, ServeConfig, TlsConfig, TlsConfigError, serve, serve_listener, serve_with,
};

/// Limits of the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiConfig {
    /// The largest request body accepted, in bytes (default 1 MiB); larger ones get 413.
    pub body_limit: usize,
    /// How long `GET /sagas/{id}/wait` waits without `timeout_ms` (default 30 s).
    pub default_wait: Duration,
    /// The longest wait a client may ask for (default 120 s); longer requests are shortened
    /// to it.
    pub max_wait: Duration,
    /// How long `GET /readyz` gives the store to answer (default 2 s).
    pub ready_timeout: Duration,
    /// How long a request may take from its head to its response, body upload included
    /// (default 30 s); a wait gets this on top of its own length. Beyond it the client gets
    /// 408 and the connection is closed.
    pub request_timeout: Duration,
    /// Whether `GET /readyz` answers without a token (default `true`: orchestrators' probes
    /// rarely send one). When `false` it needs the `metrics` scope.
    pub public_readyz: bool,
    /// Whether `GET /metrics` answers without a token (default `false`: it needs the
    /// `metrics` scope).
    pub public_metrics: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            default_wait: Duration::from_secs(30),
            max_wait: Duration::from_secs(120),
            ready_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            public_readyz: true,
            public_metrics: false,
        }
    }
}

/// Builds the router with non-default limits.
#[derive(Clone, Debug)]
pub struct HttpApi {
    engine: Engine,
    auth: Auth,
    config: ApiConfig,
    metrics: Option<PrometheusHandle>,
    unauthenticated_on_public_address: bool,
}

impl HttpApi {
    /// An API on `engine` authenticating callers with `auth` ([`Auth::Disabled`] only for
    /// development on a loopback address), with the default [`ApiConfig`] and no `/metrics`.
    #[must_use]
    pub fn new(engine: Engine, auth: Auth) -> Self {
        Self {
            engine,
            auth,
            config: ApiConfig::default(),
            metrics: None,
            unauthenticated_on_public_address: false,
        }
    }

    /// Replaces every limit at once.
    #[must_use]
    pub fn config(mut self, config: ApiConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the largest request body accepted, in bytes.
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// Sets how long a wait without `timeout_ms` lasts.
    #[must_use]
    pub fn default_wait(mut self, wait: Duration) -> Self {
        self.config.default_wait = wait;
        self
    }

    /// Sets the longest wait a client may ask for.
    #[must_use]
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.config.max_wait = wait;
        self
    }

    /// Sets how long `/readyz` gives the store to answer.
    #[must_use]
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.config.ready_timeout = timeout;
        self
    }

    /// Sets how long a request may take (see [`ApiConfig::request_timeout`]).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Sets whether `/readyz` answers without a token.
    #[must_use]
    pub fn public_readyz(mut self, public: bool) -> Self {
        self.config.public_readyz = public;
        self
    }

    /// Sets whether `/metrics` answers without a token.
    #[must_use]
    pub fn public_metrics(mut self, public: bool) -> Self {
        self.config.public_metrics = public;
        self
    }

    /// Lets [`HttpApi::serve`] listen without authentication on an address other hosts can
    /// reach (behind a proxy that authenticates, say). It logs a loud error at start.
    #[must_use]
    pub fn unauthenticated_on_public_address(mut self, insist: bool) -> Self {
        self.unauthenticated_on_public_address = insist;
        self
    }

    /// Serves `GET /metrics` from `handle` (from [`install_metrics`]).
    #[must_use]
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Serves the API on `listener` with `serve` limits until `shutdown` completes (see
    /// [`serve_with`]).
    ///
    /// # Errors
    /// [`ServeError::Exposure`] when authentication is disabled and the listener is not on a
    /// loopback address (unless [`unauthenticated_on_public_address`](Self::unauthenticated_on_public_address));
    /// [`ServeError::Io`] when the listener fails.
    pub async fn serve<F>(
        self,
        listener: TcpListener,
        serve: ServeConfig,
        shutdown: F,
    ) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr()?;
        check_exposure(&self.auth, addr, self.unauthenticated_on_public_address)?;
        let router = self.router();
        serve_with(router, listener, serve, shutdown).await?;
        Ok(())
    }

    /// The router, ready for [`serve_with`] or any other axum/hyper server. Every route but
    /// `/healthz` (and `/readyz`, `/metrics` where public) checks the caller's token and
    /// scope first.
    pub fn router(self) -> Router {
        let body_limit = self.config.body_limit;
        let bounds = RequestBounds {
            request_timeout: self.config.request_timeout,
            max_wait: self.config.max_wait,
        };
        let guard = Guard(self.auth.clone());
        let readyz = if self.config.public_readyz {
            get(handlers::readyz)
        } else {
            guard.scope(get(handlers::readyz), Scope::Metrics)
        };
        let metrics = if self.config.public_metrics {
            get(handlers::metrics)
        } else {
            guard.scope(get(handlers::metrics), Scope::Metrics)
        };
        let state = AppState {
            engine: self.engine,
            config: self.config,
            metrics: self.metrics,
        };
        Router::new()
            // One path, two meanings: `POST /sagas/{saga_type}` and `GET /sagas/{id}` (the
            // router allows one parameter name per position).
            .route(
                "/sagas/{type_or_id}",
                guard
                    .scope(post(handlers::start), Scope::Start)
                    .merge(guard.scope(get(handlers::status), Scope::Read)),
            )
            .route(
                "/sagas/{id}/history",
                guard.scope(get(handlers::history), Scope::Read),
            )
            .route(
                "/sagas/{id}/wait",
                guard.scope(get(handlers::wait), Scope::Read),
            )
            .route(
                "/sagas/{id}/cancel",
                guard.scope(post(handlers::cancel), Scope::Operate),
            )
            .route(
                "/sagas/{id}/signals/{name}",
                guard.scope(post(signals::signal), Scope::Operate),
            )
            .route("/healthz", get(handlers::healthz))
            .route("/readyz", readyz)
            .route("/metrics", metrics)
            .fallback(handlers::not_found)
            .method_not_allowed_fallback(handlers::method_not_allowed)
            .with_state(state)
            .layer(DefaultBodyLimit::max(body_limit))
            .layer(axum::middleware::from_fn_with_state(bounds, bound_request))
            .layer(axum::middleware::from_fn(catch_panic))
    }
}

/// Serving the API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Authentication is disabled on a public address.
    #[error(transparent)]
    Exposure(#[from] ExposureError),
    /// The listener failed.
    #[error("the HTTP API's listener failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The router on `engine` authenticating with `auth`, with the default [`ApiConfig`],
/// serving `metrics` on `GET /metrics` when given (see [`install_metrics`]).
pub fn router(engine: Engine, auth: Auth, metrics: Option<PrometheusHandle>) -> Router {
    let api = HttpApi::new(engine, auth);
    match metrics {
        Some(handle) => api.metrics(handle),
        None => api,
    }
    .router()
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) engine: Engine,
    pub(crate) config: ApiConfig,
    pub(crate) metrics: Option<PrometheusHandle>,
}

/// Puts a scope check in front of method routers.
struct Guard(Auth);

impl Guard {
    fn scope(&self, route: MethodRouter<AppState>, scope: Scope) -> MethodRouter<AppState> {
        let requirement = auth::Requirement {
            auth: self.0.clone(),
            scope,
        };
        route.route_layer(axum::middleware::from_fn_with_state(
            requirement,
            auth::require_scope,
        ))
    }
}

#[derive(Clone, Copy)]
struct RequestBounds {
    request_timeout: Duration,
    max_wait: Duration,
}

/// Bounds a request from head to response (body upload included): a client dripping its
/// body, or a store that stopped answering, costs at most the timeout. A wait may last its
/// own maximum on top.
async fn bound_request(
    State(bounds): State<RequestBounds>,
    request: Request,
    next: Next,
) -> Response {
    let timeout = if is_wait(request.uri().path()) {
        bounds.request_timeout + bounds.max_wait
    } else {
        bounds.request_timeout
    };
    let Ok(response) = tokio::time::timeout(timeout, next.run(request)).await else {
        ::metrics::counter!(crate::metrics::HTTP_REQUESTS_TIMED_OUT_TOTAL).increment(1);
        let mut response = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request did not complete within {} ms (a slow upload, or a store that is not answering); retry it (starts are safe to retry with the same Idempotency-Key)",
                timeout.as_millis()
            ),
        )
        .into_response();
        // The rest of a dripped body is not worth reading.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    };
    response
}

/// Whether `path` is `/sagas/{id}/wait` (and not, say, a signal named `wait`).
fn is_wait(path: &str) -> bool {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    matches!(
        (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next()
        ),
        (Some("sagas"), Some(_), Some("wait"), None)
    )
}

/// Turns a panicking handler into a 500 JSON response.
async fn catch_panic(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            tracing::error!(%method, path, panic = panic_message(panic.as_ref()), "request handler panicked");
            ApiError::internal("internal error while handling the request (see the server log)")
                .into_response()
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "non-text panic payload"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    #[test]
    fn only_the_wait_route_gets_the_longer_bound() {
        assert!(is_wait("/sagas/6f1c/wait"));
        assert!(!is_wait("/sagas/6f1c/signals/wait"));
        assert!(!is_wait("/sagas/wait"));
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json() {
        async fn boom() -> &'static str {
            panic!("handler bug")
        }
        let app = Router::new()
            .route("/boom", get(boom))
            .layer(axum::middleware::from_fn(catch_panic));
        let response = app
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "internal");
        // The panic message stays in the log.
        assert!(!body["error"].as_str().unwrap().contains("handler bug"));
    }
}
