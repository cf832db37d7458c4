//! The compensation phase: undo every completed step in exact reverse order of completion.

use serde_json::Value;
use tracing::Instrument;

use super::context::{AttemptLog, Halt, Mode, Registered, SagaContext};
use super::guarded::{Guarded, run_guarded};
use crate::store::Schedule;
use crate::{
    Compensation, CompensationStatus, EventKind, FailureKind, GiveUpReason, Phase, Reconciled,
    RetryDecision, SagaStatus, StepError, StepRecord, StepStatus,
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

/// What the compensation's own reconciliation check ([`crate::Step::reconcile_compensation`])
/// answered about an undo whose outcome is unknown.
enum UndoCheck {
    Applied,
    NotApplied,
    Unknown,
    /// The check failed or timed out: counted as a failed attempt, never as "applied".
    Failed(StepError),
    /// The lease was lost while asking.
    Lost(String),
}

/// Runs the compensations still owed, newest first. Returns the terminal status reached
/// (`Compensated`, or `Failed` when a compensation gave up), or the halt that stopped it.
pub(crate) async fn compensate(ctx: &mut SagaContext) -> Result<SagaStatus, Halt> {
    let steps = std::mem::take(&mut ctx.steps);
    // A saga loaded while `Compensating` may have had an undo running when its previous
    // coordinator stopped (a crash, a lost lease): the history records an undo's outcome, not
    // its start. That can only be the first undo this run gets to run (skips before it may
    // not have been committed yet), so that one's outcome is treated as unknown.
    let mut maybe_in_flight = ctx.mode == Mode::Collect;
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
        if let Some(status) = undo(ctx, registered, &record, &mut maybe_in_flight).await? {
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

/// Asks the compensation's reconciliation check whether the undo was applied, as attempt
/// `attempt` (the latest one whose outcome is unknown), with the compensation's key.
async fn check_undo(
    ctx: &SagaContext,
    registered: &Registered,
    position: u32,
    attempt: u32,
    input: &Value,
    output: Option<&Value>,
) -> UndoCheck {
    let name = registered.step.name();
    let span = tracing::info_span!(
        "reconcile",
        step = name,
        position,
        attempt,
        phase = "compensate",
        idempotency_key = tracing::field::Empty
    );
    let step_ctx = ctx.step_context(name, position, attempt, Phase::Compensate, span.clone());
    span.record("idempotency_key", step_ctx.idempotency_key());
    let checked = run_guarded(
        &*ctx.shared.store,
        &ctx.lease,
        ctx.shared.config.lease_ttl,
        registered.step.timeout(),
        registered
            .step
            .reconcile_compensation(&step_ctx, input, output)
            .instrument(span.clone()),
    )
    .await;
    let _entered = span.enter();
    match checked {
        Guarded::Done(Ok(Reconciled::Applied(()))) => {
            tracing::info!("reconciliation found the undo applied; not re-running it");
            UndoCheck::Applied
        }
        Guarded::Done(Ok(Reconciled::NotApplied)) => UndoCheck::NotApplied,
        Guarded::Done(Ok(Reconciled::Unknown)) => UndoCheck::Unknown,
        Guarded::Done(Err(err)) => check_failed(err),
        Guarded::TimedOut(limit) => check_failed(StepError::timed_out(limit)),
        Guarded::Lost(err) => UndoCheck::Lost(err.to_string()),
    }
}

fn check_failed(err: StepError) -> UndoCheck {
    let StepError {
        message,
        class,
        timeout,
    } = err;
    tracing::warn!(error = %message, "the undo's reconciliation check failed; counted as a failed attempt");
    UndoCheck::Failed(StepError {
        message: format!("reconciliation check of the undo failed: {message}"),
        class,
        timeout,
    })
}

/// Undoes one step: to success, to a skip, or until its policy gives up (`Ok(Some(Failed))`
/// ends the saga). `maybe_in_flight`: this may be the undo a previous coordinator was running
/// when it stopped (taken by the first undo that gets to run).
async fn undo(
    ctx: &mut SagaContext,
    registered: &Registered,
    record: &StepRecord,
    maybe_in_flight: &mut bool,
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
    // The latest attempt whose outcome is unknown (cut off, or timed out): the compensation's
    // reconciliation check is asked about it before the undo runs again.
    let mut unresolved: Option<u32> = None;
    // Whether an attempt's outcome is unknown and the check has not since answered "not
    // applied": a permanent error then does not show that the undo did not happen, so the
    // check is asked before giving up (running out of retries always asks).
    let mut doubtful = false;
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
        let decision = decide(ctx, registered, record).await;
        if matches!(decision, Undo::Run(_)) && std::mem::take(maybe_in_flight) {
            unresolved = Some(attempt);
            doubtful = true;
        }
        // The output the undo gets, once decided; the check that may end the loop needs it.
        let mut decided: Option<Option<Value>> = None;
        // The failure below is the check's own: asking it again at once would tell nothing.
        let mut check_just_failed = false;
        let failure = match decision {
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
                let verdict = match unresolved {
                    Some(suspect) => {
                        check_undo(ctx, registered, position, suspect, &input, output.as_ref())
                            .await
                    }
                    None => UndoCheck::Unknown,
                };
                let failure = match verdict {
                    UndoCheck::Applied => {
                        let suspect = unresolved.unwrap_or(attempt);
                        record_reconciled(ctx, position, name, suspect, Vec::new()).await?;
                        return Ok(None);
                    }
                    UndoCheck::Lost(reason) => return Err(Halt::Interrupted(reason)),
                    UndoCheck::Failed(err) => {
                        check_just_failed = true;
                        Some(err)
                    }
                    UndoCheck::NotApplied => {
                        doubtful = false;
                        None
                    }
                    UndoCheck::Unknown => None,
                };
                match failure {
                    Some(err) => {
                        decided = Some(output);
                        err
                    }
                    None => {
                        // Unknown or not applied: run it (again) with the same key.
                        unresolved = None;
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
                        decided = Some(output);
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
                                        reconciled: false,
                                    }],
                                    Schedule::Continue { ttl },
                                )
                                .await?;
                                return Ok(None);
                            }
                            Guarded::Done(Err(err)) => err,
                            Guarded::TimedOut(limit) => {
                                // The undo may have been applied before the timeout fired.
                                unresolved = Some(attempt);
                                doubtful = true;
                                StepError::timed_out(limit)
                            }
                            Guarded::Lost(err) => return Err(Halt::Interrupted(err.to_string())),
                        }
                    }
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
                // Before ending the saga `Failed`: an earlier attempt may have applied the
                // undo without the engine hearing of it (a timeout, then refusals).
                let ask = !check_just_failed && (reason != GiveUpReason::Permanent || doubtful);
                let verdict = match &decided {
                    Some(output) if ask => Some(
                        check_undo(ctx, registered, position, attempt, &input, output.as_ref())
                            .await,
                    ),
                    _ => None,
                };
                let last_attempt = EventKind::CompensationAttemptFailed {
                    position,
                    step: name.to_owned(),
                    attempt,
                    error: failure.clone(),
                    backoff_seconds: 0.0,
                    next_retry_at: now,
                };
                let note = match verdict {
                    Some(UndoCheck::Applied) => {
                        record_reconciled(ctx, position, name, attempt, vec![last_attempt]).await?;
                        return Ok(None);
                    }
                    Some(UndoCheck::Lost(reason)) => return Err(Halt::Interrupted(reason)),
                    Some(UndoCheck::Failed(err)) => format!("; {}", err.message),
                    Some(UndoCheck::NotApplied) => {
                        "; its reconciliation check found the undo not applied".to_owned()
                    }
                    Some(UndoCheck::Unknown) | None => String::new(),
                };
                let error = format!(
                    "compensation of step {position} `{name}` gave up after attempt {attempt} ({reason}): {}{note}",
                    failure.message
                );
                ctx.commit(
                    vec![
                        last_attempt,
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

/// Records an undo that its reconciliation check found applied as done, after `events`.
async fn record_reconciled(
    ctx: &mut SagaContext,
    position: u32,
    name: &'static str,
    attempt: u32,
    mut events: Vec<EventKind>,
) -> Result<(), Halt> {
    events.push(EventKind::StepCompensated {
        position,
        step: name.to_owned(),
        attempt,
        reconciled: true,
    });
    let ttl = ctx.shared.config.lease_ttl;
    ctx.commit(events, Schedule::Continue { ttl }).await?;
    Ok(())
}
