//! Child sagas, as the engine runs them: the step that starts a child (exactly once, by a key
//! derived from the parent and the journal position), the undo of a child when its parent
//! compensates (cancel a running child, reopen a completed one, wait until it has
//! compensated), and the wake-up a finished child sends its parent.
//!
//! Parent and child are linked by ids only (the child's `SagaStarted` names its parent, the
//! parent's journal names the child), so they may live in different partitions of the store:
//! each is changed by its own store operations, never by one that spans both.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Engine, EngineError, StartOptions};
use crate::store::{SignalDelivery, StoreError};
use crate::{
    Classify, Compensation, CompensationReason, ErrorClass, EventKind, ParentLink, Reconciled,
    RetryPolicy, SagaEvent, SagaId, SagaStatus, Step, StepContext,
};

/// The name of the step that starts a child saga.
pub(crate) const START_CHILD: &str = "start_child";
/// The journaled-value name of a child's outcome, as the parent's wait recorded it.
pub(crate) const CHILD_OUTCOME: &str = "child_outcome";
/// The engine's own signal that tells a parent one of its children finished.
pub(crate) const CHILD_FINISHED: &str = "saga.child_finished";
/// How long a parent waiting for a child sleeps before it looks again, should the child's
/// wake-up signal have been lost (its coordinator crashed right after the child finished).
pub(crate) const CHILD_RECHECK: Duration = Duration::from_secs(60);

/// What the start step records as its input: enough to start the same child again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChildStart {
    pub(crate) saga_type: String,
    pub(crate) version: u32,
    /// The child's idempotency key: `<parent id>/<position>`.
    pub(crate) key: String,
    pub(crate) input: Value,
}

/// What the start step records as its output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChildRef {
    pub(crate) id: SagaId,
    pub(crate) saga_type: String,
    pub(crate) version: u32,
}

/// Why starting or undoing a child did not work (yet).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ChildError {
    message: String,
    transient: bool,
}

impl ChildError {
    fn transient(message: String) -> Self {
        Self {
            message,
            transient: true,
        }
    }

    fn permanent(message: String) -> Self {
        Self {
            message,
            transient: false,
        }
    }

    fn from_engine(what: &str, err: &EngineError) -> Self {
        let transient = matches!(err, EngineError::Store(e) if e.is_transient())
            || matches!(err, EngineError::Busy { .. });
        Self {
            message: format!("{what}: {err}"),
            transient,
        }
    }
}

impl Classify for ChildError {
    fn classify(&self) -> ErrorClass {
        if self.transient {
            ErrorClass::TRANSIENT
        } else {
            ErrorClass::Permanent
        }
    }
}

/// The step that starts a child saga; its compensation undoes the child.
pub(crate) struct StartChild {
    pub(crate) engine: Engine,
    pub(crate) parent: ParentLink,
}

impl Step for StartChild {
    type Input = ChildStart;
    type Output = ChildRef;
    type Error = ChildError;
    const NAME: &'static str = START_CHILD;
    const COMPENSATION: Compensation = Compensation::OnSuccess;

    async fn forward(&self, _ctx: &StepContext, input: ChildStart) -> Result<ChildRef, ChildError> {
        self.engine.start_child(&self.parent, input).await
    }

    async fn compensate(
        &self,
        _ctx: &StepContext,
        _input: ChildStart,
        output: Option<ChildRef>,
    ) -> Result<(), ChildError> {
        match output {
            Some(child) => self.engine.undo_child(self.parent.id, child.id).await,
            None => Ok(()),
        }
    }

    /// Whether the child exists: an attempt whose create reached the store but whose reply
    /// was lost (then timed out, or gave up) did start it, and then it must be undone.
    async fn reconcile(
        &self,
        _ctx: &StepContext,
        input: &ChildStart,
    ) -> Result<Reconciled<ChildRef>, ChildError> {
        let id = SagaId::from_idempotency_key(&input.saga_type, &input.key);
        match self.engine.shared.store.load(id).await {
            Ok(Some(_)) => Ok(Reconciled::Applied(ChildRef {
                id,
                saga_type: input.saga_type.clone(),
                version: input.version,
            })),
            Ok(None) => Ok(Reconciled::NotApplied),
            Err(err) => Err(ChildError {
                message: format!("looking for child saga {id}: {err}"),
                transient: err.is_transient(),
            }),
        }
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default().with_max_attempts(10)
    }

    /// Undoing a child waits for the child's own compensation, however long it takes: each
    /// look that finds it still compensating is a failed attempt, retried up to every 5 s
    /// (a far retry is a durable timer, so the parent holds no worker meanwhile).
    fn compensation_retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_max_attempts(u32::MAX)
            .with_initial_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
    }

    fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(30))
    }
}

impl Engine {
    /// Starts (or finds, after a crash or a replay) the child saga of `parent` described by
    /// `start`: its id comes from its key, so there is exactly one.
    async fn start_child(
        &self,
        parent: &ParentLink,
        start: ChildStart,
    ) -> Result<ChildRef, ChildError> {
        let Some(saga) = self.shared.registry.get(&start.saga_type, start.version) else {
            return Err(ChildError::permanent(format!(
                "child saga type `{}` v{} is not registered on this coordinator; register it on every coordinator that runs `{}`",
                start.saga_type, start.version, parent.saga_type
            )));
        };
        let name = saga.name();
        let options = StartOptions {
            idempotency_key: Some(start.key.clone()),
            version: Some(start.version),
            parent: Some(parent.clone()),
        };
        match self
            .start_value(name, start.version, start.input, options)
            .await
        {
            Ok(started) => {
                if started.created {
                    crate::telemetry::child_started(name);
                    tracing::info!(child = %started.id, child_type = name, "child saga started");
                }
                Ok(ChildRef {
                    id: started.id,
                    saga_type: start.saga_type,
                    version: start.version,
                })
            }
            Err(EngineError::IdempotencyConflict { saga, .. }) => {
                Err(ChildError::permanent(format!(
                    "child saga {saga} already exists with another input: the parent's workflow is not deterministic (the input of its child at this position changed)"
                )))
            }
            Err(err) => Err(ChildError::from_engine("starting the child saga", &err)),
        }
    }

    /// Undoes child `child` of `parent`: a running child is cancelled, a completed one is
    /// reopened to compensate; done once the child has compensated. A child that failed, or
    /// that is past its pivot, cannot be undone: a permanent error, so that the parent ends
    /// `Failed` for an operator.
    async fn undo_child(&self, parent: SagaId, child: SagaId) -> Result<(), ChildError> {
        // A quarantined child runs nothing until an operator acts: waiting for it would keep
        // the parent compensating for ever instead of asking for that operator.
        if let Ok(Some(stored)) = self.shared.store.load(child).await
            && let Some(reason) = stored.quarantined
        {
            return Err(ChildError::permanent(format!(
                "child saga {child} is quarantined ({reason}); fix it and retry it, then retry this saga"
            )));
        }
        let state = match self.state(child).await {
            Ok(state) => state,
            // Purged by retention: it ended long ago and cannot be undone any more.
            Err(EngineError::NotFound(_)) => {
                return Err(ChildError::permanent(format!(
                    "child saga {child} is gone from the store (purged?); its effects cannot be undone by the engine"
                )));
            }
            Err(err) => return Err(ChildError::from_engine("reading the child saga", &err)),
        };
        let still = |what: &str| {
            Err(ChildError::transient(format!(
                "child saga {child} is {what}; waiting for it to finish compensating"
            )))
        };
        match state.status {
            SagaStatus::Compensated => Ok(()),
            SagaStatus::Compensating => still("compensating"),
            SagaStatus::Failed => Err(ChildError::permanent(format!(
                "child saga {child} failed ({}); it cannot be undone automatically: resolve it, then retry this saga",
                state.failure.map_or_else(String::new, |(_, error)| error)
            ))),
            SagaStatus::Running if state.past_pivot.is_some() => {
                Err(ChildError::permanent(format!(
                    "child saga {child} is past its pivot and only goes forward; it cannot be undone"
                )))
            }
            SagaStatus::Running => {
                let reason = format!("its parent saga {parent} is compensating");
                match self.cancel(child, &reason).await {
                    Ok(_) => still("cancelled"),
                    Err(err) => Err(ChildError::from_engine("cancelling the child saga", &err)),
                }
            }
            SagaStatus::Completed if state.past_pivot.is_some() => Err(ChildError::permanent(
                format!("child saga {child} completed past its pivot; it cannot be undone"),
            )),
            SagaStatus::Completed => {
                let event = EventKind::SagaReopened {
                    reason: CompensationReason::ParentCompensating { parent },
                };
                let reopened = self
                    .operator_commit(
                        child,
                        SagaStatus::Completed,
                        state,
                        event,
                        crate::store::Schedule::WakeAfter(Duration::ZERO),
                    )
                    .await;
                match reopened {
                    Ok(()) => {
                        tracing::info!(%child, "completed child saga reopened to compensate");
                        still("reopened to compensate")
                    }
                    // Someone else reopened it meanwhile: look again at the next attempt.
                    Err(EngineError::WrongStatus { .. }) => still("changing"),
                    Err(err) => Err(ChildError::from_engine("reopening the child saga", &err)),
                }
            }
        }
    }

    /// Tells the parent of a child that just finished, so that a parent waiting for it is
    /// due at once. Best effort: a parent that misses it looks again after
    /// [`CHILD_RECHECK`].
    pub(crate) async fn notify_parent(
        &self,
        child: SagaId,
        parent: &ParentLink,
        status: SagaStatus,
    ) {
        let at = self.shared.clock.now();
        let payload = serde_json::json!({ "child": child, "status": status });
        // One key per child and status: a reopened child finishes twice.
        let key = format!("{child}.{status}");
        let event = SagaEvent {
            seq: 0,
            at,
            kind: EventKind::SignalReceived {
                name: CHILD_FINISHED.to_owned(),
                key: key.clone(),
                payload: payload.clone(),
            },
        };
        let (Ok(payload), Ok(event)) = (
            serde_json::to_string(&payload),
            serde_json::to_string(&event),
        ) else {
            return;
        };
        let delivery = SignalDelivery {
            name: CHILD_FINISHED.to_owned(),
            key,
            payload,
            at,
            event,
        };
        match self.shared.store.deliver_signal(parent.id, delivery).await {
            Ok(_) => {}
            // A parent that ended or went away needs no wake-up.
            Err(StoreError::NotFound(_)) => {}
            Err(err) => {
                tracing::warn!(%child, parent = %parent.id, error = %err, "could not wake the parent of a finished child saga; it looks again within a minute");
            }
        }
    }
}
