//! The compensation phase: undo every completed step in exact reverse order of completion.

use serde_json::Value;
use tracing::Instrument;

use super::context::{AttemptLog, Halt, Registered, SagaContext};
use crate::store::Schedule;
use crate::{
    Compensation, CompensationStatus, ErrorClass, EventKind, FailureKind, Phase, Reconciled,
    RetryDecision, SagaStatus, StepError, StepRecord, StepStatus, StepTimeout,
};

use super::guarded::{Guarded, run_guarded};

enum Undo {
    Run(Option<Value>),
    Skip(String),
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
        match decide(ctx, registered, &record).await {
            Undo::Lost(reason) => return Err(Halt::Interrupted(reason)),
            Undo::Skip(why) => ctx.record(EventKind::CompensationSkipped {
                position: record.position,
                step: record.name.clone(),
                why,
            })?,
            Undo::Run(output) => {
                if let Some(status) = undo(ctx, registered, &record, output).await? {
                    return Ok(status);
                }
            }
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
            let checked = match checked {
                Guarded::Done(result) => result,
                Guarded::TimedOut(limit) => Err(StepError {
                    message: StepTimeout(limit).to_string(),
                    class: ErrorClass::TRANSIENT,
                    timeout: true,
                }),
                Guarded::Lost(err) => return Undo::Lost(err.to_string()),
            };
            match checked {
                Ok(Reconciled::Applied(output)) => Undo::Run(Some(output)),
                Ok(Reconciled::NotApplied) => {
                    Undo::Skip("reconciliation found its effect was not applied".into())
                }
                Ok(Reconciled::Unknown) | Err(_) if mode == Compensation::Always => Undo::Run(None),
                Ok(Reconciled::Unknown) | Err(_) => Undo::Skip(
                    "it did not complete, and it only compensates completed effects \
                     (declare Compensation::Always or a reconcile check to undo partial effects)"
                        .into(),
                ),
            }
        }
    }
}

/// Runs one compensation to success or until it gives up. `Ok(Some(status))` ends the saga.
async fn undo(
    ctx: &mut SagaContext,
    registered: &Registered,
    record: &StepRecord,
    output: Option<Value>,
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
    let first_started = ctx.shared.clock.now();
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
        let seconds = clock.elapsed().as_secs_f64();
        let failure = match outcome {
            Guarded::Done(Ok(())) => {
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
            Guarded::TimedOut(limit) => StepError {
                message: StepTimeout(limit).to_string(),
                class: ErrorClass::TRANSIENT,
                timeout: true,
            },
            Guarded::Lost(err) => return Err(Halt::Interrupted(err.to_string())),
        };
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
