//! The drive state machine: loads a claimed saga, replays its journal through the workflow,
//! and decides from how the workflow ended whether to complete, compensate, suspend, fail or
//! stop.

use std::sync::Arc;

use tracing::Instrument;

use super::context::{Halt, after_pivot_error};
use super::decide::{Decision, Ended, decide};
use super::definition::ErasedSaga;
use super::queries::decode_state;
use super::{Engine, EngineError, Interruption, RunOutcome, SagaContext, SagaOutcome, compensate};
use crate::store::{Lease, Schedule, StoreError};
use crate::telemetry;
use crate::{
    CompensationReason, EventKind, FailureKind, SagaId, SagaState, SagaStatus, StepStatus,
};

impl Engine {
    async fn quarantine(&self, id: SagaId, reason: String) -> EngineError {
        tracing::error!(saga_id = %id, %reason, "saga quarantined");
        telemetry::quarantined();
        match self.shared.store.quarantine(id, &reason).await {
            Ok(()) => EngineError::Quarantined { saga: id, reason },
            Err(err) => err.into(),
        }
    }

    /// Runs a claimed saga: replays its journal, executes what remains, compensates when it
    /// must. The lease stays fenced against every other writer throughout.
    pub(crate) async fn drive(&self, lease: Lease) -> Result<RunOutcome, EngineError> {
        let id = lease.saga_id;
        let stored = match self.shared.store.load(id).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Err(EngineError::NotFound(id)),
            Err(StoreError::Corrupt { problem, .. }) => {
                return Err(self
                    .quarantine(id, format!("stored saga is corrupt: {problem}"))
                    .await);
            }
            Err(err) => return Err(err.into()),
        };
        let state = match decode_state(&stored) {
            Ok(state) => state,
            Err(err) => {
                return Err(self
                    .quarantine(id, format!("stored state does not decode: {err}"))
                    .await);
            }
        };
        self.drive_state(lease, state).await
    }

    /// Runs a claimed saga whose current state is known.
    pub(super) async fn drive_state(
        &self,
        lease: Lease,
        state: SagaState,
    ) -> Result<RunOutcome, EngineError> {
        let id = lease.saga_id;
        if state.status.is_terminal() {
            return Ok(RunOutcome::Finished(SagaOutcome::from_state(&state)));
        }
        if state.journal_format > crate::JOURNAL_FORMAT {
            let reason = format!(
                "the saga's journal is in format {}, newer than this coordinator reads (up to {}): it was written by a newer release of saga; run it on a coordinator of that release (or newer), then retry it",
                state.journal_format,
                crate::JOURNAL_FORMAT
            );
            return Err(self.quarantine(id, reason).await);
        }
        let registry = &self.shared.registry;
        let Some(saga) = registry.get(&state.saga_type, state.version).cloned() else {
            let reason = registry.missing_reason(&state.saga_type, state.version);
            return Err(self.quarantine(id, reason).await);
        };
        let span = tracing::info_span!(
            "saga",
            saga_id = %id,
            saga_type = %state.saga_type,
            version = state.version
        );
        self.drive_with(saga, lease, state).instrument(span).await
    }

    async fn drive_with(
        &self,
        saga: Arc<dyn ErasedSaga>,
        lease: Lease,
        state: SagaState,
    ) -> Result<RunOutcome, EngineError> {
        let id = lease.saga_id;
        let input = state.input.clone();
        let resumed_from = resumed_from(&state);
        let mut ctx = SagaContext::new(Arc::clone(&self.shared), saga.name(), lease, state);
        let owner = ctx.lease().owner.clone();
        let fence = ctx.lease().fence;
        ctx.record(EventKind::LeaseAcquired {
            owner: owner.clone(),
            fence,
        })
        .map_err(|h| halt_error(id, h))?;
        ctx.refuse_cancel_past_pivot()
            .map_err(|h| halt_error(id, h))?;
        if let Some(reason) = resumed_from {
            telemetry::resumed(reason);
            tracing::info!(status = %ctx.state().status, reason, "resuming saga from its journal");
            let completed_steps = ctx
                .state()
                .journal
                .iter()
                .filter(|r| !r.is_value && r.status == StepStatus::Succeeded)
                .count() as u32;
            let status = ctx.state().status;
            ctx.record(EventKind::SagaResumed {
                owner,
                status,
                completed_steps,
            })
            .map_err(|h| halt_error(id, h))?;
        }
        let result = saga.run_erased(&mut ctx, input).await;
        let ended = Ended {
            mode: ctx.mode(),
            halt: ctx.take_halt(),
            result,
            position: ctx.position(),
            journal: &ctx.state().journal,
            seen: ctx.steps().iter().map(|r| r.position).collect(),
            past_pivot: ctx.state().past_pivot.is_some(),
        };
        let compensating = match decide(ended) {
            Decision::Complete(output) => {
                ctx.commit(
                    vec![EventKind::SagaCompleted { output }],
                    Schedule::Finished,
                )
                .await
                .map_err(|h| halt_error(id, h))?;
                false
            }
            Decision::Abort(message) => {
                let reason = CompensationReason::Aborted { message };
                self.start_compensation(&mut ctx, reason).await?;
                true
            }
            Decision::Cancel => {
                let reason = self.cancel_reason(id).await;
                self.start_compensation(&mut ctx, CompensationReason::Cancelled { reason })
                    .await?;
                true
            }
            Decision::Compensate => true,
            Decision::Suspend(until) => return Ok(RunOutcome::Suspended(until)),
            Decision::QuarantineNondeterministic { position, message } => {
                // Set aside rather than failed: the journal was written by other code, so
                // the fix is a deploy, after which the saga resumes (`saga retry`). A
                // terminal `Failed` would instead tell a waiting client or a parent saga that
                // the work failed, and the parent would compensate for a deploy mistake.
                let state = ctx.state();
                let reason = format!(
                    "non-deterministic workflow at journal position {position}: {message}; the journal was written by other code than the `{}` v{} registered on this coordinator: deploy the code the saga started under (a changed workflow needs a new `Saga::VERSION`), then `saga retry` it",
                    state.saga_type, state.version
                );
                // The quarantine itself takes no lease, and this decision comes at the end of
                // a replay: a coordinator that lost the saga meanwhile (paused, cut off) must
                // not set aside a saga another owner now runs, maybe under the right code. A
                // fenced renewal proves the lease is still this run's just before.
                let ttl = self.shared.config.lease_ttl;
                if let Err(err) = self.shared.store.renew(ctx.lease(), ttl).await {
                    return Err(EngineError::Interrupted {
                        saga: id,
                        cause: super::Interruption::from_store(err),
                    });
                }
                return Err(self.quarantine(id, reason).await);
            }
            Decision::FailAfterPivot(message) => {
                let error = after_pivot_error(ctx.state(), &message);
                return self.fail(&mut ctx, FailureKind::AfterPivot, error).await;
            }
            // The run recorded the saga's end itself (a step that gave up past the pivot).
            Decision::Ended => false,
            Decision::Stop(halt) => return Err(self.halted(id, halt).await),
        };
        if compensating {
            match compensate::compensate(&mut ctx).await {
                Ok(_) => {}
                Err(Halt::Suspended(until)) => return Ok(RunOutcome::Suspended(until)),
                Err(halt) => return Err(self.halted(id, halt).await),
            }
        }
        let outcome = SagaOutcome::from_state(ctx.state());
        let seconds = ctx
            .state()
            .updated_at
            .since(ctx.state().created_at)
            .as_secs_f64();
        telemetry::saga_finished(outcome.status, seconds);
        tracing::info!(status = %outcome.status, "saga finished");
        Ok(RunOutcome::Finished(outcome))
    }

    async fn start_compensation(
        &self,
        ctx: &mut SagaContext,
        reason: CompensationReason,
    ) -> Result<(), EngineError> {
        tracing::warn!(%reason, "compensating");
        let ttl = self.shared.config.lease_ttl;
        match ctx
            .commit(
                vec![EventKind::CompensationStarted { reason }],
                Schedule::Continue { ttl },
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(halt) => Err(self.halted(ctx.lease().saga_id, halt).await),
        }
    }

    async fn cancel_reason(&self, id: SagaId) -> String {
        let history = self.history(id).await.unwrap_or_default();
        history
            .iter()
            .rev()
            .find_map(|event| match &event.kind {
                EventKind::CancelRequested { reason } => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "cancel requested".to_owned())
    }

    /// Ends the saga `Failed` without compensating.
    async fn fail(
        &self,
        ctx: &mut SagaContext,
        kind: FailureKind,
        error: String,
    ) -> Result<RunOutcome, EngineError> {
        tracing::error!(%error, ?kind, "saga failed");
        ctx.commit(
            vec![EventKind::SagaFailed { kind, error }],
            Schedule::Finished,
        )
        .await
        .map_err(|h| halt_error(ctx.lease().saga_id, h))?;
        let seconds = ctx
            .state()
            .updated_at
            .since(ctx.state().created_at)
            .as_secs_f64();
        telemetry::saga_finished(SagaStatus::Failed, seconds);
        Ok(RunOutcome::Finished(SagaOutcome::from_state(ctx.state())))
    }

    async fn halted(&self, id: SagaId, halt: Halt) -> EngineError {
        match halt {
            Halt::BadData(reason) => self.quarantine(id, reason).await,
            other => halt_error(id, other),
        }
    }
}

fn halt_error(id: SagaId, halt: Halt) -> EngineError {
    let reason = match halt {
        Halt::Interrupted(cause) => return EngineError::Interrupted { saga: id, cause },
        Halt::BadData(reason) => reason,
        Halt::StepFailed(err) => {
            format!("stopped after a step failed ({err}) before compensation was recorded")
        }
        Halt::FailedAfterPivot(err) => {
            format!(
                "stopped after a step failed past the pivot ({err}) before the saga's failure was recorded"
            )
        }
        Halt::Cancelled => {
            "stopped by a cancel request before compensation was recorded".to_owned()
        }
        Halt::Suspended(until) => format!("suspended until {until}"),
        Halt::NonDeterministic { position, message } => {
            format!("non-deterministic workflow at journal position {position}: {message}")
        }
        Halt::Collected => "stopped while replaying for compensation".to_owned(),
    };
    EngineError::Interrupted {
        saga: id,
        cause: Interruption::Stopped(reason),
    }
}

/// Why a claimed saga counts as resumed, or `None` for its first run.
fn resumed_from(state: &SagaState) -> Option<&'static str> {
    state.owner.as_ref()?;
    let waiting = state.journal.last().is_some_and(|r| {
        r.status == StepStatus::Retrying
            || (r.is_value && r.name == super::SLEEP_UNTIL)
            || r.compensation
                .as_ref()
                .is_some_and(|c| c.next_retry_at.is_some())
    });
    Some(if waiting { "timer" } else { "recovery" })
}
