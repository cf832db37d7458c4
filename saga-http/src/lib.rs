//! An HTTP API for the saga engine, for services that are not written in Rust: start sagas of
//! registered types with JSON input and an idempotency key, read their status and history,
//! long-poll for their outcome, cancel them, and expose health checks and Prometheus metrics.
//!
//! The router works on any [`Engine`] (and therefore any store). It only submits and reads
//! sagas: run a [`Coordinator`](saga_core::Coordinator) in the same process (or elsewhere)
//! to execute them.
//!
//! | route | success | errors |
//! |---|---|---|
//! | `POST /sagas/{saga_type}` (JSON input, optional `Idempotency-Key`) | 201 `{"id","created":true,"status"}`; 200 with `created:false` for a repeated key and the same input | 404 unknown type (lists `known_types`), 400 bad JSON or key, 409 key reused with another input, 413 body over the limit, 415 not JSON |
//! | `GET /sagas/{id}` | 200 status, output, compensation reason, failure, journal summary | 400 bad id, 404 unknown |
//! | `GET /sagas/{id}/history[?format=text]` | 200 `{"id","events","timeline"}`, or the timeline as `text/plain` | 400, 404 |
//! | `GET /sagas/{id}/wait[?timeout_ms=N]` | 200 the outcome once terminal; 202 `{"id","status","terminal":false}` when the wait ends first | 400, 404 |
//! | `POST /sagas/{id}/cancel` (optional `{"reason": "..."}`) | 202 `{"id","cancel":"requested"}` | 409 already finished, 400, 404 |
//! | `GET /healthz` | 200 always | |
//! | `GET /readyz` | 200 when the store answers a read and accepts a write in time (can take work) | 503 with the error |
//! | `GET /metrics` | 200 Prometheus text | 404 without a metrics handle |
//!
//! Every error is a JSON object `{"error": "<message>", "code": "<machine code>", ...}`; see
//! [`ApiError`] for how engine and store errors map to statuses. Client mistakes are 4xx,
//! never 500. A handler that panics answers 500 without taking the server down.
//!
//! ```no_run
//! use saga_core::{Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError};
//!
//! struct Hello;
//!
//! #[saga_core::async_trait]
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
//! let app = saga_http::HttpApi::new(engine.clone())
//!     .body_limit(256 * 1024)
//!     .metrics(metrics)
//!     .router();
//!
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! let (stop_workers, workers_stopped) = tokio::sync::oneshot::channel::<()>();
//! let workers = tokio::spawn(Coordinator::new(engine).run(async {
//!     let _ = workers_stopped.await;
//! }));
//! // curl -X POST localhost:8080/sagas/hello -H 'content-type: application/json' \
//! //      -H 'idempotency-key: greet-1' -d '"deal team"'
//! saga_http::serve(app, "127.0.0.1:8080", shutdown).await?;
//! let _ = stop_workers.send(());
//! workers.await?;
//! # Ok(())
//! # }
//! ```

mod error;
mod handlers;
mod metrics;
mod serve;

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::FutureExt as _;
use saga_core::Engine;

pub use error::ApiError;
pub use handlers::{IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_LEN};
pub use metrics::{MetricsError, SAGA_DURATION_BUCKETS, STEP_DURATION_BUCKETS, install_metrics};
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use serve::{SHUTDOWN_GRACE, serve, serve_listener};

/// Limits of the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            default_wait: Duration::from_secs(30),
            max_wait: Duration::from_secs(120),
            ready_timeout: Duration::from_secs(2),
        }
    }
}

/// Builds the router with non-default limits.
#[derive(Clone, Debug)]
pub struct HttpApi {
    engine: Engine,
    config: ApiConfig,
    metrics: Option<PrometheusHandle>,
}

impl HttpApi {
    /// An API on `engine` with the default [`ApiConfig`] and no `/metrics`.
    #[must_use]
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            config: ApiConfig::default(),
            metrics: None,
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

    /// Serves `handle` (from [`install_metrics`]) on `GET /metrics`.
    #[must_use]
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The router, ready for [`serve`] or any other axum/hyper server.
    pub fn router(self) -> Router {
        let body_limit = self.config.body_limit;
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
                post(handlers::start).get(handlers::status),
            )
            .route("/sagas/{id}/history", get(handlers::history))
            .route("/sagas/{id}/wait", get(handlers::wait))
            .route("/sagas/{id}/cancel", post(handlers::cancel))
            .route("/healthz", get(handlers::healthz))
            .route("/readyz", get(handlers::readyz))
            .route("/metrics", get(handlers::metrics))
            .fallback(handlers::not_found)
            .method_not_allowed_fallback(handlers::method_not_allowed)
            .with_state(state)
            .layer(DefaultBodyLimit::max(body_limit))
            .layer(axum::middleware::from_fn(catch_panic))
    }
}

/// The router on `engine` with the default [`ApiConfig`], serving `metrics` on
/// `GET /metrics` when given (see [`install_metrics`]).
pub fn router(engine: Engine, metrics: Option<PrometheusHandle>) -> Router {
    let api = HttpApi::new(engine);
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
