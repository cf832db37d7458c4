//! The compensation phase: undo every completed step in exact reverse order of completion.

use serde_json::Value;
use tracing::Instrument;

use super::Interruption;
use super::attempt::{AttemptPhase, Current, FailedAttempt, Tried, run_attempts, wait_for_retry};
use super::context::{AttemptLog, Halt, Mode, Registered, SagaContext};
use super::guarded::{Guarded, run_guarded};
use crate::store::Schedule;
use crate::{
    Compensation, CompensationStatus, EventKind, FailureKind, GiveUpReason, Phase, Reconciled,
    RetryPolicy, SagaStatus, StepContext, StepError, StepRecord, StepStatus, Timestamp,
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
    Lost(Interruption),
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
    Lost(Interruption),
}

/// Runs the compensations still owed, newest first. Returns the terminal status reached
/// (`Compensated`, or `Failed` when a compensation gave up), or the halt that stopped it.
pub(crate) async fn compensate(ctx: &mut SagaContext) -> Result<SagaStatus, Halt> {
    let mut steps = ctx.take_steps();
    // Parallel branches complete in any order: undo them newest completion first. Steps that
    // did not complete (in flight, failed) stay last, in the order seen, so they are looked
    // at first. A saga written before completion orders were kept (journal format 1) has
    // none: its steps stay in the order the workflow reached them, which was its order.
    if ctx.state().journal_format >= 2 {
        let state = ctx.state();
        steps.sort_by_key(|r| {
            state
                .record(r.position)
                .and_then(|record| record.completed)
                .unwrap_or(u32::MAX)
        });
    }
    // A saga loaded while `Compensating` may have had an undo running when its previous
    // coordinator stopped (a crash, a lost lease): the history records an undo's outcome, not
    // its start. That can only be the first undo this run gets to run (skips before it may
    // not have been committed yet), so that one's outcome is treated as unknown.
    let mut maybe_in_flight = ctx.mode() == Mode::Collect;
    for registered in steps.iter().rev() {
        let Some(record) = ctx.state().record(registered.position).cloned() else {
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
            .shared()
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
    match mode {
        Compensation::None => {
            return Undo::Skip("declares no compensation (read-only step)".into());
        }
        Compensation::Pivot => {
            return Undo::Skip("is a pivot step, which declares no compensation".into());
        }
        _ => {}
    }
    match record.status {
        StepStatus::Succeeded => Undo::Run(record.output.clone()),
        // A failed, in-flight or retrying step may have had its effect anyway (a timeout
        // after the effect, a crash mid-attempt): ask its reconciliation check.
        StepStatus::Failed | StepStatus::Started | StepStatus::Retrying => {
            if ctx.unexecuted() == Some(record.position) {
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
                &*ctx.shared().store,
                ctx.lease(),
                ctx.shared().config.lease_ttl,
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
                     (to undo partial effects: add `compensate_on_failure` to its \
                     `#[saga_step]`, set `COMPENSATION = Compensation::Always` on a \
                     hand-written `Step`, or give it a reconcile check)"
                        .into(),
                ),
                Guarded::Done(Err(err)) => Undo::CheckFailed(err),
                Guarded::TimedOut(limit) => Undo::CheckFailed(StepError::timed_out(limit)),
                Guarded::Lost(cause) => Undo::Lost(cause),
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
        &*ctx.shared().store,
        ctx.lease(),
        ctx.shared().config.lease_ttl,
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
        Guarded::Lost(cause) => UndoCheck::Lost(cause),
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
    let previous = record.compensation.as_ref();
    let first_attempt = previous.map_or(0, |c| c.attempts) + 1;
    if let Some(at) = previous.and_then(|c| c.next_retry_at) {
        wait_for_retry(ctx, at).await?;
    }
    // The elapsed-time budget counts from the first attempt, across resumes.
    let first_started = previous
        .and_then(|c| c.started_at)
        .unwrap_or_else(|| ctx.shared().clock.now());
    let mut phase = Undoing {
        registered,
        record,
        input: record.input.clone().unwrap_or(Value::Null),
        first_started,
        maybe_in_flight,
        unresolved: None,
        doubtful: false,
        decided: None,
        check_just_failed: false,
    };
    run_attempts(ctx, &mut phase, first_attempt).await
}

/// One step's compensation attempts, as the shared attempt loop runs them. Settles to
/// `Some(Failed)` when the compensation gave up (the saga ends), `None` when the step is done.
struct Undoing<'a> {
    registered: &'a Registered,
    record: &'a StepRecord,
    input: Value,
    first_started: Timestamp,
    maybe_in_flight: &'a mut bool,
    /// The latest attempt whose outcome is unknown (cut off, or timed out): the compensation's
    /// reconciliation check is asked about it before the undo runs again.
    unresolved: Option<u32>,
    /// Whether an attempt's outcome is unknown and the check has not since answered "not
    /// applied": a permanent error then does not show that the undo did not happen, so the
    /// check is asked before giving up (running out of retries always asks).
    doubtful: bool,
    /// The output this attempt's undo got, once decided; the check that may end the loop
    /// needs it.
    decided: Option<Option<Value>>,
    /// This attempt's failure is the check's own: asking it again at once would tell nothing.
    check_just_failed: bool,
}

impl Undoing<'_> {
    /// Runs a decided undo, after asking the compensation's check about an unresolved attempt.
    async fn run_undo(
        &mut self,
        ctx: &mut SagaContext,
        attempt: u32,
        step_ctx: &StepContext,
        clock: tokio::time::Instant,
        output: Option<Value>,
    ) -> Result<Tried<Option<SagaStatus>>, Halt> {
        let (position, name) = (self.record.position, self.registered.step.name());
        let verdict = match self.unresolved {
            Some(suspect) => {
                check_undo(
                    ctx,
                    self.registered,
                    position,
                    suspect,
                    &self.input,
                    output.as_ref(),
                )
                .await
            }
            None => UndoCheck::Unknown,
        };
        match verdict {
            UndoCheck::Applied => {
                let suspect = self.unresolved.unwrap_or(attempt);
                record_reconciled(ctx, position, name, suspect, Vec::new()).await?;
                return Ok(Tried::Settled(None));
            }
            UndoCheck::Lost(reason) => return Err(Halt::Interrupted(reason)),
            UndoCheck::Failed(error) => {
                self.check_just_failed = true;
                self.decided = Some(output);
                let seconds = clock.elapsed().as_secs_f64();
                return Ok(Tried::Failed { error, seconds });
            }
            UndoCheck::NotApplied => self.doubtful = false,
            UndoCheck::Unknown => {}
        }
        // Unknown or not applied: run it (again) with the same key.
        self.unresolved = None;
        let span = step_ctx.span().clone();
        let outcome = run_guarded(
            &*ctx.shared().store,
            ctx.lease(),
            ctx.shared().config.lease_ttl,
            self.registered.step.timeout(),
            self.registered
                .step
                .compensate(step_ctx, &self.input, output.as_ref())
                .instrument(span.clone()),
        )
        .await;
        self.decided = Some(output);
        let error = match outcome {
            Guarded::Done(Ok(())) => {
                let seconds = clock.elapsed().as_secs_f64();
                let key = step_ctx.idempotency_key();
                let log = AttemptLog::Compensated;
                ctx.shared().observe_attempt(
                    &span,
                    ctx.state(),
                    position,
                    name,
                    key,
                    attempt,
                    seconds,
                    &log,
                );
                let done = EventKind::StepCompensated {
                    position,
                    step: name.to_owned(),
                    attempt,
                    reconciled: false,
                };
                let ttl = ctx.shared().config.lease_ttl;
                ctx.commit(vec![done], Schedule::Continue { ttl }).await?;
                return Ok(Tried::Settled(None));
            }
            Guarded::Done(Err(err)) => err,
            Guarded::TimedOut(limit) => {
                // The undo may have been applied before the timeout fired.
                self.unresolved = Some(attempt);
                self.doubtful = true;
                StepError::timed_out(limit)
            }
            Guarded::Lost(cause) => return Err(Halt::Interrupted(cause)),
        };
        let seconds = clock.elapsed().as_secs_f64();
        Ok(Tried::Failed { error, seconds })
    }
}

impl AttemptPhase for Undoing<'_> {
    type Output = Option<SagaStatus>;
    const PHASE: Phase = Phase::Compensate;

    fn step(&self) -> &'static str {
        self.registered.step.name()
    }

    fn position(&self) -> u32 {
        self.record.position
    }

    fn policy(&self) -> RetryPolicy {
        self.registered.step.compensation_policy()
    }

    fn span(&self, attempt: u32, key: &str) -> tracing::Span {
        let span = tracing::info_span!(
            "step",
            step = self.step(),
            position = self.position(),
            attempt,
            phase = "compensate",
            idempotency_key = tracing::field::Empty
        );
        span.record("idempotency_key", key);
        span
    }

    fn budget_start(&self, _ctx: &SagaContext, _now: Timestamp) -> Timestamp {
        self.first_started
    }

    async fn attempt(
        &mut self,
        ctx: &mut SagaContext,
        current: &Current,
    ) -> Result<Tried<Self::Output>, Halt> {
        let (position, name) = (self.record.position, self.registered.step.name());
        let attempt = current.number;
        let span = current.span.clone();
        let mut step_ctx = ctx.step_context(name, position, attempt, Phase::Compensate, span);
        let step = &self.registered.step;
        step_ctx.key_lifetime = ctx.key_lifetime(&step.compensation_policy(), step.timeout());
        let clock = tokio::time::Instant::now();
        self.decided = None;
        self.check_just_failed = false;
        let decision = decide(ctx, self.registered, self.record).await;
        if matches!(decision, Undo::Run(_)) && std::mem::take(self.maybe_in_flight) {
            self.unresolved = Some(attempt);
            self.doubtful = true;
        }
        let error = match decision {
            Undo::Lost(reason) => return Err(Halt::Interrupted(reason)),
            Undo::Skip(why) => {
                ctx.record(EventKind::CompensationSkipped {
                    position,
                    step: name.to_owned(),
                    why,
                })?;
                return Ok(Tried::Settled(None));
            }
            Undo::CheckFailed(err) => err,
            Undo::Run(output) => {
                return self.run_undo(ctx, attempt, &step_ctx, clock, output).await;
            }
        };
        let seconds = clock.elapsed().as_secs_f64();
        Ok(Tried::Failed { error, seconds })
    }

    fn attempt_failed(&self, failed: FailedAttempt) -> EventKind {
        let FailedAttempt {
            attempt,
            error,
            backoff_seconds,
            next_retry_at,
        } = failed;
        EventKind::CompensationAttemptFailed {
            position: self.record.position,
            step: self.registered.step.name().to_owned(),
            attempt,
            error,
            backoff_seconds,
            next_retry_at,
        }
    }

    async fn give_up(
        &mut self,
        ctx: &mut SagaContext,
        last: FailedAttempt,
        reason: GiveUpReason,
    ) -> Result<Self::Output, Halt> {
        let (position, name) = (self.record.position, self.registered.step.name());
        let (attempt, message) = (last.attempt, last.error.message.clone());
        // Before ending the saga `Failed`: an earlier attempt may have applied the undo
        // without the engine hearing of it (a timeout, then refusals).
        let ask = !self.check_just_failed && (reason != GiveUpReason::Permanent || self.doubtful);
        let verdict = match &self.decided {
            Some(output) if ask => Some(
                check_undo(
                    ctx,
                    self.registered,
                    position,
                    attempt,
                    &self.input,
                    output.as_ref(),
                )
                .await,
            ),
            _ => None,
        };
        // Recorded like the attempts before it, with no retry to come.
        let last_attempt = self.attempt_failed(last);
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
            "compensation of step {position} `{name}` gave up after attempt {attempt} ({reason}): {message}{note}"
        );
        let failed = EventKind::SagaFailed {
            kind: FailureKind::CompensationFailed,
            error,
        };
        ctx.commit(vec![last_attempt, failed], Schedule::Finished)
            .await?;
        crate::telemetry::compensation_failed(&ctx.state().saga_type, name);
        Ok(Some(SagaStatus::Failed))
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
    let ttl = ctx.shared().config.lease_ttl;
    ctx.commit(events, Schedule::Continue { ttl }).await?;
    Ok(())
}
