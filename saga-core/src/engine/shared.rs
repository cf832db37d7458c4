//! What every clone of an engine and every running saga shares: the store, the registry,
//! the settings, and the store writes and telemetry that running sagas go through.

use std::sync::Arc;

use super::client_retry::Backoff;
use super::context::AttemptLog;
use super::registry::Registry;
use super::{EngineConfig, local};
use crate::store::{CommitOutcome, Lease, SagaStore, StoreError, Transition};
use crate::telemetry;
use crate::{Clock, Resources, SagaId, SagaState};

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn SagaStore>,
    pub(crate) registry: Registry,
    pub(crate) resources: Arc<Resources>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: EngineConfig,
    /// The sagas this engine runs itself, their waiters and the local coordinator.
    pub(crate) local: Arc<local::LocalState>,
    /// Set by [`Engine::begin_shutdown`](crate::Engine::begin_shutdown): running sagas stop
    /// at their next step boundary.
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    /// The ids of sagas cancelled through this engine, so that a run of one waiting here
    /// (a backoff, a durable timer) wakes at once instead of at its retry time.
    pub(crate) cancels: tokio::sync::broadcast::Sender<SagaId>,
}

impl Shared {
    /// Commits with bounded retries while the store is unavailable. Safe to retry: the
    /// transition carries a commit id that the store applies at most once.
    pub(crate) async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        // The policy's attempt count bounds the retries, not its elapsed time: the lease does.
        let mut backoff = Backoff::until(&self.config.store_retry, None);
        loop {
            match self.store.commit(lease, transition.clone()).await {
                Err(err) if err.is_transient() => {
                    let Some(delay) = backoff.next_delay() else {
                        return Err(err);
                    };
                    tracing::warn!(saga_id = %lease.saga_id, error = %err, retry_in = ?delay, "store commit failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(err @ StoreError::Fenced { .. }) => {
                    // Another coordinator owns the saga now: this run must stop. Counted so
                    // that rejected late writes (a paused or partitioned coordinator) show.
                    telemetry::fenced_write();
                    tracing::warn!(saga_id = %lease.saga_id, fence = lease.fence, error = %err, "write fenced; stopping this run");
                    return Err(err);
                }
                other => return other,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn observe_attempt(
        &self,
        span: &tracing::Span,
        state: &SagaState,
        position: u32,
        step: &'static str,
        key: &str,
        attempt: u32,
        seconds: f64,
        outcome: &AttemptLog<'_>,
    ) {
        let _entered = span.enter();
        let workflow_id = state.id.to_string();
        telemetry::step_duration(step, seconds);
        match *outcome {
            AttemptLog::Succeeded => {
                telemetry::step_attempt(step, "success");
                tracing::info!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "succeeded",
                    attempt,
                    "step attempt succeeded"
                );
            }
            AttemptLog::Compensated => {
                telemetry::step_attempt(step, "compensated");
                tracing::info!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "compensated",
                    attempt,
                    "compensation succeeded"
                );
            }
            AttemptLog::Retry {
                error,
                delay,
                next_retry_at,
            } => {
                telemetry::step_attempt(step, "retry");
                tracing::warn!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "retry",
                    attempt,
                    error = %error.message,
                    class = %error.class,
                    backoff_seconds = delay.as_secs_f64(),
                    next_retry_at = %next_retry_at,
                    "attempt failed; retrying"
                );
            }
            AttemptLog::Failed { error, reason } => {
                telemetry::step_attempt(step, "failure");
                tracing::error!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "failed",
                    attempt,
                    error = %error.message,
                    class = %error.class,
                    reason = %reason,
                    "attempt failed for good"
                );
            }
        }
    }
}
