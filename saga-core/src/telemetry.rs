//! The engine's metrics: every name as a public constant, and one recording function per
//! event, so that each metric is recorded under one name with one label set everywhere.
//!
//! Metrics go through the [`metrics`] facade and cost nothing until a recorder is installed
//! (`saga_http::install_metrics` installs a Prometheus one and calls [`describe`]). The names
//! and labels are a public contract: dashboards and alerts depend on them.

use metrics::{SharedString, Unit};

use crate::SagaStatus;

/// Counter `saga_started_total{saga_type}`: sagas created (an idempotent repeat counts in
/// [`IDEMPOTENCY_HITS_TOTAL`] instead).
pub const STARTED_TOTAL: &str = "saga_started_total";
/// Counter `saga_finished_total{status}`: sagas that reached a terminal status
/// (`completed`, `compensated`, `failed`). Recorded with [`DURATION_SECONDS`] on every path.
pub const FINISHED_TOTAL: &str = "saga_finished_total";
/// Histogram `saga_duration_seconds{status}`: from creation to the terminal status.
pub const DURATION_SECONDS: &str = "saga_duration_seconds";
/// Counter `saga_step_attempts_total{step,outcome}` (`outcome`: `success`, `retry`,
/// `failure`, `compensated`).
pub const STEP_ATTEMPTS_TOTAL: &str = "saga_step_attempts_total";
/// Histogram `saga_step_duration_seconds{step}`: one attempt, forward or compensation.
pub const STEP_DURATION_SECONDS: &str = "saga_step_duration_seconds";
/// Counter `saga_idempotency_hits_total`: starts and guarded effects whose key was used.
pub const IDEMPOTENCY_HITS_TOTAL: &str = "saga_idempotency_hits_total";
/// Counter `saga_resumed_total{reason}` (`reason`: `recovery`, `timer`).
pub const RESUMED_TOTAL: &str = "saga_resumed_total";
/// Counter `saga_quarantined_total`: sagas set aside because their data is unusable.
pub const QUARANTINED_TOTAL: &str = "saga_quarantined_total";
/// Counter `saga_fenced_writes_total`: writes and renewals refused because another
/// coordinator holds the saga's lease.
pub const FENCED_WRITES_TOTAL: &str = "saga_fenced_writes_total";
/// Counter `saga_purged_total`: terminal sagas removed by retention.
pub const PURGED_TOTAL: &str = "saga_purged_total";
/// Gauge `saga_stored_sagas{status}`: sagas in the store, by status.
pub const STORED_SAGAS: &str = "saga_stored_sagas";
/// Gauge `saga_due_sagas{partition}`: sagas due to run, by due-index partition.
pub const DUE_SAGAS: &str = "saga_due_sagas";
/// Gauge `saga_active_sagas{saga_type, version, status}`: running and compensating sagas by
/// type and workflow version (`version="unknown"` for sagas stored before versions were
/// kept), so an operator sees when an old version has drained.
pub const ACTIVE_SAGAS: &str = "saga_active_sagas";
/// Counter `saga_compensation_failed_total{saga_type, step}`: sagas that ended `Failed` because
/// a compensation gave up (the systems it touches may hold partial effects): alert on any
/// increase.
pub const COMPENSATION_FAILED_TOTAL: &str = "saga_compensation_failed_total";
/// Counter `saga_signals_total{outcome}`: signals by what became of them (`delivered` to
/// an inbox, `duplicate` key dropped, `taken` by a wait, `rejected` because the payload did
/// not decode as the wait's type).
pub const SIGNALS_TOTAL: &str = "saga_signals_total";
/// Counter `saga_timers_fired_total{kind}`: durable waits that ended by their clock (`sleep`,
/// `signal_timeout`).
pub const TIMERS_FIRED_TOTAL: &str = "saga_timers_fired_total";
/// Counter `saga_children_started_total{saga_type}`: child sagas started by a parent, by the
/// child's type.
pub const CHILDREN_STARTED_TOTAL: &str = "saga_children_started_total";

/// Describes every engine metric (unit and help text) to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        STARTED_TOTAL,
        Unit::Count,
        "Sagas started, by saga_type (idempotent repeats are counted in saga_idempotency_hits_total)."
    );
    metrics::describe_counter!(
        FINISHED_TOTAL,
        Unit::Count,
        "Sagas that reached a terminal status (completed, compensated, failed), by status."
    );
    metrics::describe_counter!(
        STEP_ATTEMPTS_TOTAL,
        Unit::Count,
        "Step attempts by step and outcome (success, retry, failure, compensated)."
    );
    metrics::describe_counter!(
        IDEMPOTENCY_HITS_TOTAL,
        Unit::Count,
        "Starts and guarded effects that found their idempotency key already used."
    );
    metrics::describe_counter!(
        RESUMED_TOTAL,
        Unit::Count,
        "Sagas resumed from their journal, by reason (recovery after a lost lease, or a durable timer)."
    );
    metrics::describe_counter!(
        QUARANTINED_TOTAL,
        Unit::Count,
        "Sagas set aside because their stored data is unusable; they need an operator."
    );
    metrics::describe_counter!(
        FENCED_WRITES_TOTAL,
        Unit::Count,
        "Writes rejected because another coordinator had taken the saga's lease."
    );
    metrics::describe_counter!(
        PURGED_TOTAL,
        Unit::Count,
        "Terminal sagas removed by retention."
    );
    metrics::describe_gauge!(
        STORED_SAGAS,
        Unit::Count,
        "Sagas in the store, by status (published by coordinator housekeeping)."
    );
    metrics::describe_gauge!(
        DUE_SAGAS,
        Unit::Count,
        "Sagas due to run, by due-index partition (published by coordinator housekeeping)."
    );
    metrics::describe_gauge!(
        ACTIVE_SAGAS,
        Unit::Count,
        "Running and compensating sagas by saga_type and version (published by coordinator housekeeping)."
    );
    metrics::describe_counter!(
        COMPENSATION_FAILED_TOTAL,
        Unit::Count,
        "Sagas that ended Failed because a compensation gave up, by saga_type and step; alert on any increase."
    );
    metrics::describe_counter!(
        SIGNALS_TOTAL,
        Unit::Count,
        "Signals by outcome (delivered, duplicate, taken by a wait, rejected for a payload that does not decode)."
    );
    metrics::describe_counter!(
        TIMERS_FIRED_TOTAL,
        Unit::Count,
        "Durable waits that ended by their clock, by kind (sleep, signal_timeout)."
    );
    metrics::describe_counter!(
        CHILDREN_STARTED_TOTAL,
        Unit::Count,
        "Child sagas started by a parent saga, by the child's saga_type."
    );
    metrics::describe_histogram!(
        DURATION_SECONDS,
        Unit::Seconds,
        "End-to-end saga duration from start to terminal status, by status."
    );
    metrics::describe_histogram!(
        STEP_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one step attempt (forward or compensation), by step."
    );
}

pub(crate) fn saga_started(saga_type: impl Into<SharedString>) {
    metrics::counter!(STARTED_TOTAL, "saga_type" => saga_type.into()).increment(1);
}

/// The one place a finish is recorded, so that every terminal path records the same set.
pub(crate) fn saga_finished(status: SagaStatus, seconds: f64) {
    metrics::counter!(FINISHED_TOTAL, "status" => status.as_str()).increment(1);
    metrics::histogram!(DURATION_SECONDS, "status" => status.as_str()).record(seconds);
}

pub(crate) fn step_duration(step: &'static str, seconds: f64) {
    metrics::histogram!(STEP_DURATION_SECONDS, "step" => step).record(seconds);
}

pub(crate) fn step_attempt(step: &'static str, outcome: &'static str) {
    metrics::counter!(STEP_ATTEMPTS_TOTAL, "step" => step, "outcome" => outcome).increment(1);
}

pub(crate) fn idempotency_hit() {
    metrics::counter!(IDEMPOTENCY_HITS_TOTAL).increment(1);
}

pub(crate) fn resumed(reason: &'static str) {
    metrics::counter!(RESUMED_TOTAL, "reason" => reason).increment(1);
}

pub(crate) fn compensation_failed(saga_type: &str, step: &'static str) {
    metrics::counter!(
        COMPENSATION_FAILED_TOTAL,
        "saga_type" => saga_type.to_owned(),
        "step" => step
    )
    .increment(1);
}

pub(crate) fn signal(outcome: &'static str) {
    metrics::counter!(SIGNALS_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn signal_taken() {
    signal("taken");
}

pub(crate) fn signal_rejected() {
    signal("rejected");
}

pub(crate) fn signal_wait_timed_out() {
    timer_fired("signal_timeout");
}

pub(crate) fn timer_fired(kind: &'static str) {
    metrics::counter!(TIMERS_FIRED_TOTAL, "kind" => kind).increment(1);
}

pub(crate) fn child_started(saga_type: &'static str) {
    metrics::counter!(CHILDREN_STARTED_TOTAL, "saga_type" => saga_type).increment(1);
}

pub(crate) fn quarantined() {
    metrics::counter!(QUARANTINED_TOTAL).increment(1);
}

pub(crate) fn fenced_write() {
    metrics::counter!(FENCED_WRITES_TOTAL).increment(1);
}

pub(crate) fn purged(n: u64) {
    metrics::counter!(PURGED_TOTAL).increment(n);
}

// Gauges are f64; counts of stored sagas are far below 2^52.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn stored_sagas(status: SagaStatus, n: u64) {
    metrics::gauge!(STORED_SAGAS, "status" => status.as_str()).set(n as f64);
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn active_sagas(saga_type: &str, version: &str, status: SagaStatus, n: u64) {
    metrics::gauge!(
        ACTIVE_SAGAS,
        "saga_type" => saga_type.to_owned(),
        "version" => version.to_owned(),
        "status" => status.as_str()
    )
    .set(n as f64);
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn due_sagas(partition: usize, n: u64) {
    metrics::gauge!(DUE_SAGAS, "partition" => partition.to_string()).set(n as f64);
}
