//! The Prometheus recorder for the engine's metrics.

use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use saga_core::telemetry;

/// Histogram buckets (seconds) for `saga_step_duration_seconds`: 1 ms to 60 s.
pub const STEP_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Histogram buckets (seconds) for `saga_duration_seconds`: 1 ms to 1 h (a saga that waits
/// out durable timers between attempts takes minutes).
pub const SAGA_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Counter `saga_http_requests_timed_out_total`.
pub(crate) const HTTP_REQUESTS_TIMED_OUT_TOTAL: &str = "saga_http_requests_timed_out_total";
/// Counter `saga_http_auth_failures_total{reason}`.
pub(crate) const HTTP_AUTH_FAILURES_TOTAL: &str = "saga_http_auth_failures_total";
/// Gauge `saga_http_connections_open{pool}`.
pub(crate) const HTTP_CONNECTIONS_OPEN: &str = "saga_http_connections_open";
/// Counter `saga_http_connections_timed_out_total{phase}`.
pub(crate) const HTTP_CONNECTIONS_TIMED_OUT_TOTAL: &str = "saga_http_connections_timed_out_total";
/// Counter `saga_http_connections_overflow_total`.
pub(crate) const HTTP_CONNECTIONS_OVERFLOW_TOTAL: &str = "saga_http_connections_overflow_total";
/// Counter `saga_http_connections_refused_total`.
pub(crate) const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "saga_http_connections_refused_total";
/// Counter `saga_http_accept_errors_total`.
pub(crate) const HTTP_ACCEPT_ERRORS_TOTAL: &str = "saga_http_accept_errors_total";

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installing the metrics recorder failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The recorder could not be built or installed (a global recorder is already set, for
    /// example: install it once per process).
    #[error("cannot install the Prometheus metrics recorder: {0}")]
    Install(#[from] BuildError),
    /// The background thread that keeps histograms compact could not be started.
    #[error("cannot start the metrics upkeep thread: {0}")]
    Upkeep(#[source] std::io::Error),
}

/// Installs the process-wide `metrics` recorder that renders Prometheus text, with explicit
/// histogram buckets for `saga_duration_seconds` ([`SAGA_DURATION_BUCKETS`]) and
/// `saga_step_duration_seconds` ([`STEP_DURATION_BUCKETS`]), and describes the metrics the
/// engine emits (their names are the constants of [`saga_core::telemetry`]) and the HTTP
/// ones (`saga_http_*`: request timeouts, auth failures, connections).
///
/// Pass the handle to [`router`](crate::router) to serve it on `GET /metrics`. A background
/// thread runs the recorder's upkeep every few seconds, so histograms stay compact between
/// scrapes.
///
/// # Errors
/// [`MetricsError::Install`] when a global recorder is already installed (call this once per
/// process), or [`MetricsError::Upkeep`] when the upkeep thread cannot be started.
pub fn install_metrics() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(telemetry::DURATION_SECONDS.to_owned()),
            SAGA_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::STEP_DURATION_SECONDS.to_owned()),
            STEP_DURATION_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("saga-metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .map_err(MetricsError::Upkeep)?;
    Ok(handle)
}

fn describe() {
    saga_core::telemetry::describe();
    metrics::describe_counter!(
        HTTP_REQUESTS_TIMED_OUT_TOTAL,
        Unit::Count,
        "HTTP requests stopped because they ran past the request timeout."
    );
    metrics::describe_counter!(
        HTTP_AUTH_FAILURES_TOTAL,
        Unit::Count,
        "HTTP requests refused by authentication or authorisation, by reason."
    );
    metrics::describe_gauge!(
        HTTP_CONNECTIONS_OPEN,
        Unit::Count,
        "Open HTTP connections, by pool."
    );
    metrics::describe_counter!(
        HTTP_CONNECTIONS_TIMED_OUT_TOTAL,
        Unit::Count,
        "HTTP connections closed for being too slow, by phase."
    );
    metrics::describe_counter!(
        HTTP_CONNECTIONS_OVERFLOW_TOTAL,
        Unit::Count,
        "HTTP connections served from the overflow pool because the main pool was full."
    );
    metrics::describe_counter!(
        HTTP_CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "HTTP connections refused because every pool was full."
    );
    metrics::describe_counter!(
        HTTP_ACCEPT_ERRORS_TOTAL,
        Unit::Count,
        "Errors accepting HTTP connections."
    );
}
