//! The Prometheus recorder for the engine's metrics.

use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

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
/// engine emits:
///
/// - `saga_started_total{saga_type}`
/// - `saga_finished_total{status}`
/// - `saga_step_attempts_total{step,outcome}` (`outcome`: success, retry, failure, compensated)
/// - `saga_idempotency_hits_total`
/// - `saga_resumed_total{reason}` (`reason`: recovery, timer)
/// - `saga_quarantined_total`
/// - `saga_fenced_writes_total`
/// - `saga_duration_seconds{status}` and `saga_step_duration_seconds{step}` (histograms)
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
            Matcher::Full("saga_duration_seconds".to_owned()),
            SAGA_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("saga_step_duration_seconds".to_owned()),
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
    metrics::describe_counter!(
        "saga_started_total",
        Unit::Count,
        "Sagas started, by saga_type (idempotent repeats are counted in saga_idempotency_hits_total)."
    );
    metrics::describe_counter!(
        "saga_finished_total",
        Unit::Count,
        "Sagas that reached a terminal status (completed, compensated, failed), by status."
    );
    metrics::describe_counter!(
        "saga_step_attempts_total",
        Unit::Count,
        "Step attempts by step and outcome (success, retry, failure, compensated)."
    );
    metrics::describe_counter!(
        "saga_idempotency_hits_total",
        Unit::Count,
        "Starts and guarded effects that found their idempotency key already used."
    );
    metrics::describe_counter!(
        "saga_resumed_total",
        Unit::Count,
        "Sagas resumed from their journal, by reason (recovery after a lost lease, or a durable timer)."
    );
    metrics::describe_counter!(
        "saga_quarantined_total",
        Unit::Count,
        "Sagas set aside because their stored data is unusable; they need an operator."
    );
    metrics::describe_counter!(
        "saga_fenced_writes_total",
        Unit::Count,
        "Writes rejected because another coordinator had taken the saga's lease."
    );
    metrics::describe_histogram!(
        "saga_duration_seconds",
        Unit::Seconds,
        "End-to-end saga duration from start to terminal status, by status."
    );
    metrics::describe_histogram!(
        "saga_step_duration_seconds",
        Unit::Seconds,
        "Duration of one step attempt (forward or compensation), by step."
    );
}
