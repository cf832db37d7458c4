//! The compensation phase: undo every completed step in exact reverse order of completion.

use serde_json::Value;
use tracing::Instrument;

use super::context::{AttemptLog, Halt, Registered, SagaContext};
use super::guarded::{Guarded, run_guarded};
use crate::store::Schedule;
use crate::{
    Compensation, CompensationStatus, EventKind, FailureKind, Phase, Reconciled, RetryDecision,
    SagaStatus, StepError, StepRecord, StepStatus,
};

/// What to do about one step, decided before each compensation attempt.
enum Undo {
    /// Run its compensation with this output (`None` for an `Always` step that did not
    /// complete).
    Run(Option<Value>),
    /// Nothing to undo, and why.
    Skip(String),
    /// The reconciliation check that should decide it failed: retried like a failed
    /// compensation attempt, never taken as "nothing to undo".
    CheckFailed(StepError),
    /// The lease was lost while asking the reconciliation check.
    Lost(String),
}

/// Runs the compensations still owed, newest first. Returns the terminal status reached
/// (`Compensated`, or `Failed` when a compensation gave up), or the halt that stopped it.
pub(crate) async fn compensate(ctx: &mut SagaContext) -> Result<SagaStatus, Halt> {
    let steps = std::mem::take(&mut ctx.steps);
    for registered in steps.iter().rev() {
        let Some(record) = ctx.state.record(registered.position).cloned() else {
            continue;
        };
        if record.compensation.as_ref().is_some_and(|c| {
            matches!(
                c.status,
                CompensationStatus::Done | CompensationStatus::Skipped
            )
        }) {
            continue;
        }
        if ctx
            .shared
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ctx.release_for_shutdown().await);
        }
        if let Some(status) = undo(ctx, registered, &record).await? {
            return Ok(status);
        }
    }
    ctx.commit(vec![EventKind::SagaCompensated], Schedule::Finished)
        .await?;
    Ok(SagaStatus::Compensated)
}

async fn decide(ctx: &mut SagaContext, registered: &Registered, record: &StepRecord) -> Undo {
    let mode = registered.step.compensation();
    if mode == Compensation::None {
        return Undo::Skip("declares no compensation (pivot or read-only step)".into());
    }
    match record.status {
        StepStatus::Succeeded => Undo::Run(record.output.clone()),
        // A failed, in-flight or retrying step may have had its effect anyway (a timeout
        // after the effect, a crash mid-attempt): ask its reconciliation check.
        StepStatus::Failed | StepStatus::Started | StepStatus::Retrying => {
            if ctx.unexecuted == Some(record.position) {
                return Undo::Skip("cancelled before its attempt ran".into());
            }
            let span = tracing::info_span!(
                "reconcile",
                step = registered.step.name(),
                position = record.position
            );
            let step_ctx = ctx.step_context(
                registered.step.name(),
                record.position,
                record.attempts,
                Phase::Forward,
                span.clone(),
            );
            let input = record.input.clone().unwrap_or(Value::Null);
            let checked = run_guarded(
                &*ctx.shared.store,
                &ctx.lease,
                ctx.shared.config.lease_ttl,
                registered.step.timeout(),
                registered
                    .step
                    .reconcile(&step_ctx, &input)
                    .instrument(span),
            )
            .await;
            match checked {
                Guarded::Done(Ok(Reconciled::Applied(output))) => Undo::Run(Some(output)),
                Guarded::Done(Ok(Reconciled::NotApplied)) => {
                    Undo::Skip("reconciliation found its effect was not applied".into())
                }
                Guarded::Done(Ok(Reconciled::Unknown)) if mode == Compensation::Always => {
                    Undo::Run(None)
                }
                Guarded::Done(Ok(Reconciled::Unknown)) => Undo::Skip(
                    "it did not complete, and it only compensates completed effects \
                     (declare Compensation::Always or a reconcile check to undo partial effects)"
                        .into(),
                ),
                Guarded::Done(Err(err)) => Undo::CheckFailed(err),
                Guarded::TimedOut(limit) => Undo::CheckFailed(StepError::timed_out(limit)),
                Guarded::Lost(err) => Undo::Lost(err.to_string()),
            }
        }
    }
}

/// Undoes one step: to success, to a skip, or until its policy gives up (`Ok(Some(Failed))`
/// ends the saga).
async fn undo(
    ctx: &mut SagaContext,
    registered: &Registered,
    record: &StepRecord,
) -> Result<Option<SagaStatus>, Halt> {
    let policy = registered.step.compensation_policy();
    let ttl = ctx.shared.config.lease_ttl;
    let name = registered.step.name();
    let position = record.position;
    let input = record.input.clone().unwrap_or(Value::Null);
    let previous = record.compensation.as_ref();
    let mut attempt = previous.map_or(0, |c| c.attempts) + 1;
    if let Some(at) = previous.and_then(|c| c.next_retry_at) {
        let remaining = at.since(ctx.shared.clock.now());
        if remaining > ctx.shared.config.inline_wait_max {
            ctx.commit(Vec::new(), Schedule::WakeAfter(remaining))
                .await?;
            return Err(Halt::Suspended(at));
        }
        tokio::time::sleep(remaining).await;
    }
    // The elapsed-time budget counts from the first attempt, across resumes.
    let first_started = previous
        .and_then(|c| c.started_at)
        .unwrap_or_else(|| ctx.shared.clock.now());
    loop {
        let span = tracing::info_span!(
            "step",
            step = name,
            position,
            attempt,
            phase = "compensate",
            idempotency_key = tracing::field::Empty
        );
        let step_ctx = ctx.step_context(name, position, attempt, Phase::Compensate, span.clone());
        span.record("idempotency_key", step_ctx.idempotency_key());
        let key = step_ctx.idempotency_key().to_owned();
        let clock = tokio::time::Instant::now();
        let failure = match decide(ctx, registered, record).await {
            Undo::Lost(reason) => return Err(Halt::Interrupted(reason)),
            Undo::Skip(why) => {
                ctx.record(EventKind::CompensationSkipped {
                    position,
                    step: name.to_owned(),
                    why,
                })?;
                return Ok(None);
            }
            Undo::CheckFailed(err) => err,
            Undo::Run(output) => {
                let outcome = run_guarded(
                    &*ctx.shared.store,
                    &ctx.lease,
                    ttl,
                    registered.step.timeout(),
                    registered
                        .step
                        .compensate(&step_ctx, &input, output.as_ref())
                        .instrument(span.clone()),
                )
                .await;
                match outcome {
                    Guarded::Done(Ok(())) => {
                        let seconds = clock.elapsed().as_secs_f64();
                        ctx.shared.observe_attempt(
                            &span,
                            &ctx.state,
                            position,
                            name,
                            &key,
                            attempt,
                            seconds,
                            &AttemptLog::Compensated,
                        );
                        ctx.commit(
                            vec![EventKind::StepCompensated {
                                position,
                                step: name.to_owned(),
                                attempt,
                            }],
                            Schedule::Continue { ttl },
                        )
                        .await?;
                        return Ok(None);
                    }
                    Guarded::Done(Err(err)) => err,
                    Guarded::TimedOut(limit) => StepError::timed_out(limit),
                    Guarded::Lost(err) => return Err(Halt::Interrupted(err.to_string())),
                }
            }
        };
        let seconds = clock.elapsed().as_secs_f64();
        let now = ctx.shared.clock.now();
        match policy.decide(
            attempt,
            failure.class,
            now.since(first_started),
            &mut ctx.rng,
        ) {
            RetryDecision::RetryAfter(delay) => {
                let next_retry_at = now.plus(delay);
                ctx.shared.observe_attempt(
                    &span,
                    &ctx.state,
                    position,
                    name,
                    &key,
                    attempt,
                    seconds,
                    &AttemptLog::Retry {
                        error: &failure,
                        delay,
                        next_retry_at,
                    },
                );
                let inline = delay <= ctx.shared.config.inline_wait_max;
                let schedule = if inline {
                    Schedule::Continue { ttl }
                } else {
                    Schedule::WakeAfter(delay)
                };
                ctx.commit(
                    vec![EventKind::CompensationAttemptFailed {
                        position,
                        step: name.to_owned(),
                        attempt,
                        error: failure,
                        backoff_seconds: delay.as_secs_f64(),
                        next_retry_at,
                    }],
                    schedule,
                )
                .await?;
                if !inline {
                    return Err(Halt::Suspended(next_retry_at));
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            RetryDecision::GiveUp(reason) => {
                ctx.shared.observe_attempt(
                    &span,
                    &ctx.state,
                    position,
                    name,
                    &key,
                    attempt,
                    seconds,
                    &AttemptLog::Failed {
                        error: &failure,
                        reason,
                    },
                );
                let error = format!(
                    "compensation of step {position} `{name}` gave up after attempt {attempt} ({reason}): {}",
                    failure.message
                );
                ctx.commit(
                    vec![
                        EventKind::CompensationAttemptFailed {
                            position,
                            step: name.to_owned(),
                            attempt,
                            error: failure,
                            backoff_seconds: 0.0,
                            next_retry_at: now,
                        },
                        EventKind::SagaFailed {
                            kind: FailureKind::CompensationFailed,
                            error,
                        },
                    ],
                    Schedule::Finished,
                )
                .await?;
                return Ok(Some(SagaStatus::Failed));
            }
        }
    }
}
